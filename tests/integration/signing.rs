//! T14: with `auth.signing = true`, publishes, batches and requests carry a
//! `Courier-Signature`; a flipped body bit, the wrong key, a time off by more than 300 s, a
//! reused nonce (also after SIGKILL and restart) or a malformed header → 401 with nothing
//! appended; ±299 s is accepted.
#![expect(
    clippy::disallowed_methods,
    reason = "signatures carry the client's wall-clock time"
)]

use serde_json::json;

use crate::support::{Response, TestServer};

struct Signer {
    token: String,
}

impl Signer {
    /// `POST /v1/messages` of `body` with this signer's token and `signature`.
    fn publish(&self, server: &TestServer, body: &[u8], signature: &str) -> Response {
        send(server, "/v1/messages", &self.token, body, Some(signature))
    }

    /// `Courier-Signature` of `body` at `time_s` with `nonce`.
    fn header(&self, time_s: u64, nonce: &str, body: &[u8]) -> String {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.token.as_bytes());
        let mut message = format!("{time_s}.{nonce}.").into_bytes();
        message.extend_from_slice(body);
        let tag = ring::hmac::sign(&key, &message);
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        format!("t={time_s},n={nonce},s={hex}")
    }
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// A signature time `skew` seconds from now, in whole seconds rounded so that its distance
/// from the server's clock (read a moment later) falls on the intended side of the 300 s
/// limit: toward now within it, away from now beyond it.
fn time_off(skew: i64) -> u64 {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis();
    let target = i64::try_from(now_ms).expect("ms fit") + skew * 1000;
    let toward_now = skew.unsigned_abs() <= 300;
    let seconds = if (skew > 0) == toward_now {
        target.div_euclid(1000)
    } else {
        (target + 999).div_euclid(1000)
    };
    u64::try_from(seconds).expect("after 1970")
}

fn send(
    server: &TestServer,
    path: &str,
    token: &str,
    body: &[u8],
    signature: Option<&str>,
) -> Response {
    let auth = format!("Bearer {token}");
    let mut headers = vec![("Authorization", auth.as_str())];
    if let Some(signature) = signature {
        headers.push(("Courier-Signature", signature));
    }
    server.raw("POST", path, Some(body), Some("application/json"), &headers)
}

/// The log's end offset (what a refused request must not move).
fn end(server: &TestServer, admin: &str) -> u64 {
    let stats = server.raw(
        "GET",
        "/v1/stats",
        None,
        None,
        &[("Authorization", &format!("Bearer {admin}"))],
    );
    stats.json["log"]["next_offset"]
        .as_u64()
        .expect("next_offset")
}

fn setup() -> (TestServer, String, Signer, Signer) {
    setup_with(&[])
}

/// A signing server (with `extra` flags) and the admin's, alice's and bob's tokens.
fn setup_with(extra: &[&str]) -> (TestServer, String, Signer, Signer) {
    let mut args = vec!["--auth-mode", "token", "--auth-signing", "true"];
    args.extend_from_slice(extra);
    let server = TestServer::start(&args);
    let admin = std::fs::read_to_string(server.data_dir().join("admin.token"))
        .expect("admin token")
        .trim()
        .to_owned();
    let mut tokens = Vec::new();
    for agent in ["alice", "bob"] {
        let response = server.raw(
            "PUT",
            &format!("/v1/agents/{agent}"),
            Some(b"{}"),
            Some("application/json"),
            &[("Authorization", &format!("Bearer {admin}"))],
        );
        assert_eq!(response.status, 201, "{response:?}");
        tokens.push(response.json["token"].as_str().unwrap().to_owned());
    }
    let bob = Signer {
        token: tokens.pop().unwrap(),
    };
    let alice = Signer {
        token: tokens.pop().unwrap(),
    };
    (server, admin, alice, bob)
}

fn refused(response: &Response, what: &str) {
    assert_eq!(response.status, 401, "{what}: {response:?}");
    assert_eq!(response.code(), "bad_signature", "{what}: {response:?}");
    assert!(
        response
            .header("www-authenticate")
            .is_some_and(|h| h.starts_with("Courier-Signature")),
        "{what}: {response:?}"
    );
}

/// A publish from alice to bob.
fn alice_to_bob() -> Vec<u8> {
    serde_json::to_vec(&json!({"to": "agent:bob", "from": "alice", "body": {"n": 1}})).unwrap()
}

#[test]
fn t14_bad_signatures_write_nothing() {
    let (server, admin, alice, bob) = setup();
    let (body, now) = (alice_to_bob(), now_s());
    let before = end(&server, &admin);
    let publish = |body: &[u8], signature: &str| alice.publish(&server, body, signature);

    let unsigned = send(&server, "/v1/messages", &alice.token, &body, None);
    refused(&unsigned, "no signature");
    for bad in ["t=1", "t=x,n=a,s=00", "", "t=1,n=a,s=b,n=c"] {
        refused(&publish(&body, bad), bad);
    }
    let mut flipped = body.clone();
    flipped[10] ^= 1;
    let signature = alice.header(now, "flip", &body);
    refused(&publish(&flipped, &signature), "a flipped body bit");
    let wrong_key = bob.header(now, "wrong", &body);
    refused(
        &publish(&body, &wrong_key),
        "signed with another agent's token",
    );
    for skew in [-301i64, 301] {
        let time = time_off(skew);
        let signature = alice.header(time, &format!("skew{}", skew + 1000), &body);
        refused(&publish(&body, &signature), &format!("skew {skew} s"));
    }
    assert_eq!(
        end(&server, &admin),
        before,
        "a refused request wrote something"
    );
}

#[test]
fn t14_signatures_299_s_off_pass_and_replays_of_each_kind_are_refused() {
    let (server, admin, alice, _bob) = setup();
    let (body, now) = (alice_to_bob(), now_s());
    // ±299 s is accepted.
    for skew in [-299i64, 299] {
        let time = time_off(skew);
        let signature = alice.header(time, &format!("ok{}", skew + 1000), &body);
        let response = alice.publish(&server, &body, &signature);
        assert_eq!(response.status, 201, "skew {skew}: {response:?}");
    }
    // A replay of an accepted publish, batch or request is refused and writes nothing.
    let batch =
        serde_json::to_vec(&json!({"messages": [{"to": "agent:bob", "from": "alice", "body": 2}]}))
            .unwrap();
    for (path, body, status) in [
        ("/v1/messages", &body, 201),
        ("/v1/messages/batch", &batch, 201),
        ("/v1/requests?timeout_ms=20", &body, 504),
    ] {
        let signature = alice.header(now, &format!("once-{}", path.len()), body);
        let first = send(&server, path, &alice.token, body, Some(&signature));
        assert_eq!(first.status, status, "{path}: {first:?}");
        let written = end(&server, &admin);
        let replay = send(&server, path, &alice.token, body, Some(&signature));
        refused(&replay, &format!("a replayed {path}"));
        assert_eq!(end(&server, &admin), written, "the replay of {path} wrote");
    }
}

#[test]
fn t14_used_nonces_survive_sigkill_and_are_each_signers_own() {
    let (mut server, admin, alice, bob) = setup();
    let (body, now) = (alice_to_bob(), now_s());
    let signature = alice.header(now, "once", &body);
    let first = alice.publish(&server, &body, &signature);
    assert_eq!(first.status, 201, "{first:?}");
    // Seen nonces survive SIGKILL: the replay is still refused after a restart.
    server.kill9();
    server.restart();
    let restarted = end(&server, &admin);
    refused(
        &alice.publish(&server, &body, &alice.header(now, "once", &body)),
        "a replay after a restart",
    );
    assert_eq!(
        end(&server, &admin),
        restarted,
        "the replay wrote something"
    );
    // A nonce is the signer's own: bob may use "once" too.
    let bobs = serde_json::to_vec(&json!({"to": "agent:alice", "from": "bob", "body": 3})).unwrap();
    let signature = bob.header(now, "once", &bobs);
    let response = bob.publish(&server, &bobs, &signature);
    assert_eq!(response.status, 201, "{response:?}");
    // And so may the admin (signing with the admin token), once.
    let root = Signer { token: admin };
    once_then_refused(&server, &root, &bobs, "once");
}

/// Publishes `body` signed by `signer` with `nonce` (201), then replays it (401).
fn once_then_refused(server: &TestServer, signer: &Signer, body: &[u8], nonce: &str) {
    let signature = signer.header(now_s(), nonce, body);
    let first = signer.publish(server, body, &signature);
    assert_eq!(first.status, 201, "{first:?}");
    let replay = signer.publish(server, body, &signature);
    refused(&replay, &format!("the replay of nonce {nonce}"));
}

/// A replay is refused before anything else is counted: it costs its signer no publish-rate
/// token (with one message a second, the replay gets 401, not 429).
#[test]
fn t14_a_replay_costs_nothing() {
    let (server, _admin, alice, _bob) = setup_with(&["--limits-publish-rate", "1"]);
    once_then_refused(&server, &alice, &alice_to_bob(), "rate");
}

/// Bob's messages, received with his token (at most 10, without waiting).
fn receive_bob(server: &TestServer, bob: &Signer) -> Vec<serde_json::Value> {
    let response = server.raw(
        "POST",
        "/v1/agents/bob/receive",
        Some(br#"{"max": 10, "wait_ms": 0}"#),
        Some("application/json"),
        &[("Authorization", &format!("Bearer {}", bob.token))],
    );
    assert_eq!(response.status, 200, "{response:?}");
    response.json["messages"].as_array().unwrap().clone()
}

/// A signed publish writes its nonce and its messages in one append, the nonce first: the
/// answer names each message's own offset.
#[test]
fn a_signed_publish_writes_its_nonce_ahead_of_its_messages_and_answers_their_offsets() {
    let (server, admin, alice, bob) = setup();
    let now = now_s();
    let before = end(&server, &admin);
    let body = alice_to_bob();
    let one = alice.publish(&server, &body, &alice.header(now, "one", &body));
    assert_eq!(one.status, 201, "{one:?}");
    assert_eq!(
        one.json["offset"],
        json!(before + 1),
        "the nonce is at {before}"
    );
    assert_eq!(end(&server, &admin), before + 2);

    let batch = serde_json::to_vec(&json!({"messages": [
        {"to": "agent:bob", "from": "alice", "body": 2, "id": "two"},
        {"to": "agent:bob", "from": "alice", "body": 3},
    ]}))
    .unwrap();
    let signature = alice.header(now, "batch", &batch);
    let two = send(
        &server,
        "/v1/messages/batch",
        &alice.token,
        &batch,
        Some(&signature),
    );
    assert_eq!(two.status, 201, "{two:?}");
    let offsets: Vec<_> = two.json["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["offset"].clone())
        .collect();
    assert_eq!(offsets, vec![json!(before + 3), json!(before + 4)]);
    let received: Vec<_> = receive_bob(&server, &bob)
        .iter()
        .map(|m| (m["offset"].clone(), m["body"].clone()))
        .collect();
    assert_eq!(
        received,
        vec![
            (json!(before + 1), json!({"n": 1})),
            (json!(before + 3), json!(2)),
            (json!(before + 4), json!(3)),
        ]
    );
}

/// A signed publish whose messages are all duplicates still spends its nonce, and writes
/// nothing else.
#[test]
fn a_signed_publish_of_duplicates_spends_its_nonce_alone() {
    let (server, admin, alice, _bob) = setup();
    let now = now_s();
    let first =
        serde_json::to_vec(&json!({"to": "agent:bob", "from": "alice", "body": 2, "id": "two"}))
            .unwrap();
    let signature = alice.header(now, "first", &first);
    let published = alice.publish(&server, &first, &signature);
    assert_eq!(published.status, 201, "{published:?}");
    // The same message again, with a new nonce: only the nonce is written, and it is spent.
    let again = first;
    let written = end(&server, &admin);
    let signature = alice.header(now, "dup", &again);
    let dup = alice.publish(&server, &again, &signature);
    assert_eq!(dup.status, 200, "{dup:?}");
    assert_eq!(dup.json["duplicate"], json!(true));
    assert_eq!(dup.json["offset"], published.json["offset"]);
    assert_eq!(end(&server, &admin), written + 1, "the nonce alone");
    let replay = alice.publish(&server, &again, &signature);
    refused(&replay, "the replay of a duplicate's nonce");
}

/// A crash between a signed publish's submission and its answer, or after it is durable and
/// before the answer, leaves its nonce and its message both written or both not: after the
/// restart the client's retry of the same signed request either is refused (both written)
/// or publishes (neither), so the message is there exactly once.
#[cfg(feature = "failpoints")]
#[test]
fn a_signed_publish_crashed_before_its_answer_is_there_once_after_the_retry() {
    for point in ["publish.submitted", "publish.durable"] {
        let (mut server, _admin, alice, bob) = setup();
        let body = alice_to_bob();
        let signature = alice.header(now_s(), "crash", &body);
        server.set_env("FAILPOINTS", Some(&format!("{point}=return")));
        server.restart();
        let auth = format!("Bearer {}", alice.token);
        let headers = [
            ("Authorization", auth.as_str()),
            ("Courier-Signature", &signature),
        ];
        let crashed = crate::support::send_via(
            server.addr,
            None,
            "POST",
            "/v1/messages",
            Some(&body),
            Some("application/json"),
            &headers,
        );
        // The connection closes without an answer.
        assert!(
            crashed.is_err(),
            "{point}: answered before the crash: {crashed:?}"
        );
        assert!(
            server
                .wait_exit(std::time::Duration::from_secs(10))
                .is_some(),
            "{point}: the server did not crash"
        );
        server.set_env("FAILPOINTS", None);
        server.restart();
        let retry = alice.publish(&server, &body, &signature);
        assert!(
            retry.status == 201 || retry.status == 401,
            "{point}: the retry: {retry:?}"
        );
        let received = receive_bob(&server, &bob);
        assert_eq!(
            received.len(),
            1,
            "{point} (retry {}): {received:?}",
            retry.status
        );
        if point == "publish.durable" {
            refused(&retry, "the retry of a publish durable before the crash");
        }
    }
}
