//! T13: with `auth.mode = token`, every route × {no token, malformed, wrong, another agent's,
//! own, admin} answers as the table says; tokens are revoked by rotation and deletion (also
//! after SIGKILL and restart); no raw token reaches the data directory or the logs.

use serde_json::{json, Value};

use crate::support::{Response, TestServer};

/// The six ways of calling a route, in the table's column order.
const CALLERS: [&str; 6] = ["none", "malformed", "wrong", "other", "own", "admin"];

/// One row: a route, the request, and the status each caller gets. The route's subject
/// agent is `alice` (declares capability `work`); "other" is `bob` (declares nothing).
/// `dave` is the rotation's subject and `carol` the deletion's: their own token is theirs.
struct Row {
    method: &'static str,
    path: &'static str,
    body: Option<&'static str>,
    /// The agent whose token is "own" (and whose other is bob).
    own: &'static str,
    /// A request run with the admin token before each case (so that each can succeed).
    setup: Option<(&'static str, &'static str)>,
    expected: [u16; 6],
}

const fn row(
    method: &'static str,
    path: &'static str,
    body: Option<&'static str>,
    expected: [u16; 6],
) -> Row {
    Row {
        method,
        path,
        body,
        own: "alice",
        setup: None,
        expected,
    }
}

const OPEN: [u16; 6] = [200; 6];
const ANY: [u16; 6] = [401, 401, 401, 200, 200, 200];
const OWN: [u16; 6] = [401, 401, 401, 403, 200, 200];
const ADMIN: [u16; 6] = [401, 401, 401, 403, 403, 200];

#[expect(clippy::too_many_lines, reason = "a table: one row per route")]
fn table() -> Vec<Row> {
    let ack = Some(r#"{"receipts": ["00000000000000000000000001"]}"#);
    vec![
        row("GET", "/healthz", None, OPEN),
        row("GET", "/readyz", None, OPEN),
        row("GET", "/v1/stats", None, ADMIN),
        row("GET", "/metrics", None, ADMIN),
        row("GET", "/openapi.json", None, OPEN),
        row(
            "POST",
            "/v1/messages",
            Some(r#"{"to": "agent:bob", "from": "alice", "body": 1}"#),
            [401, 401, 401, 403, 201, 201],
        ),
        row(
            "POST",
            "/v1/messages/batch",
            Some(r#"{"messages": [{"to": "agent:bob", "from": "alice", "body": 1}]}"#),
            [401, 401, 401, 403, 201, 201],
        ),
        row(
            "POST",
            "/v1/requests?timeout_ms=20",
            Some(r#"{"to": "agent:bob", "from": "alice", "body": 1}"#),
            [401, 401, 401, 403, 504, 504],
        ),
        row("GET", "/v1/agents", None, ANY),
        row("GET", "/v1/agents/alice", None, ANY),
        row(
            "PUT",
            "/v1/agents/alice",
            Some(r#"{"capabilities": ["work"]}"#),
            ADMIN,
        ),
        row("POST", "/v1/agents/alice/heartbeat", None, OWN),
        row(
            "POST",
            "/v1/agents/alice/receive",
            Some(r#"{"wait_ms": 0}"#),
            OWN,
        ),
        row("POST", "/v1/agents/alice/ack", ack, OWN),
        row("POST", "/v1/agents/alice/nack", ack, OWN),
        row("POST", "/v1/agents/alice/extend", ack, OWN),
        row("GET", "/v1/agents/alice/dead-letters", None, OWN),
        row(
            "POST",
            "/v1/agents/alice/dead-letters/redrive",
            Some(r#"{"all": true}"#),
            OWN,
        ),
        row("GET", "/v1/agents/alice/subscriptions", None, OWN),
        row(
            "PUT",
            "/v1/agents/alice/subscriptions/news.%3E",
            Some("{}"),
            [401, 401, 401, 403, 201, 200],
        ),
        Row {
            setup: Some(("PUT", "/v1/agents/alice/subscriptions/old.%3E")),
            ..row(
                "DELETE",
                "/v1/agents/alice/subscriptions/old.%3E",
                None,
                [401, 401, 401, 403, 204, 204],
            )
        },
        row("GET", "/v1/topics", None, ANY),
        row("GET", "/v1/capabilities", None, ANY),
        row("GET", "/v1/capabilities/work", None, ANY),
        row("GET", "/v1/capabilities/work/dead-letters", None, OWN),
        row(
            "POST",
            "/v1/capabilities/work/dead-letters/redrive",
            Some(r#"{"all": true}"#),
            OWN,
        ),
        Row {
            own: "dave",
            ..row("POST", "/v1/agents/dave/token", None, OWN)
        },
        Row {
            own: "carol",
            ..row(
                "DELETE",
                "/v1/agents/carol",
                None,
                [401, 401, 401, 403, 403, 204],
            )
        },
    ]
}

/// `Authorization` headers of the six callers.
struct Tokens {
    admin: String,
    agents: std::collections::HashMap<String, String>,
}

impl Tokens {
    fn header(&self, caller: &str, own: &str) -> Option<String> {
        let bearer = |t: &str| format!("Bearer {t}");
        match caller {
            "none" => None,
            "malformed" => Some("Token abc".into()),
            "wrong" => Some(bearer(&format!("cour_{}", "0".repeat(64)))),
            "other" => Some(bearer(&self.agents["bob"])),
            "own" => Some(bearer(&self.agents[own])),
            "admin" => Some(bearer(&self.admin)),
            _ => unreachable!("a caller of CALLERS"),
        }
    }
}

fn call(
    server: &TestServer,
    method: &str,
    path: &str,
    body: Option<&str>,
    auth: Option<&str>,
) -> Response {
    let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
    server.raw(
        method,
        path,
        Some(body.unwrap_or("{}").as_bytes()).filter(|_| body.is_some()),
        Some("application/json"),
        &headers,
    )
}

fn admin_token(server: &TestServer) -> String {
    std::fs::read_to_string(server.data_dir().join("admin.token"))
        .expect("the admin token file")
        .trim()
        .to_owned()
}

/// Registers `agent` with the admin token; returns its token.
fn register(server: &TestServer, admin: &str, agent: &str, settings: Value) -> String {
    let auth = format!("Bearer {admin}");
    let body = settings.to_string();
    let response = call(
        server,
        "PUT",
        &format!("/v1/agents/{agent}"),
        Some(&body),
        Some(&auth),
    );
    assert_eq!(response.status, 201, "{response:?}");
    response.json["token"].as_str().expect("a token").to_owned()
}

/// The table as markdown, as TESTING.md prints it.
fn markdown(rows: &[Row]) -> String {
    let mut text = format!(
        "| route | {} |\n|---|---|---|---|---|---|---|\n",
        CALLERS.join(" | ")
    );
    for row in rows {
        let cells: Vec<String> = row.expected.iter().map(u16::to_string).collect();
        text.push_str(&format!(
            "| `{} {}` | {} |\n",
            row.method,
            row.path,
            cells.join(" | ")
        ));
    }
    text
}

#[test]
fn t13_every_route_answers_every_caller_as_the_table_says() {
    let server = TestServer::start(&["--auth-mode", "token"]);
    let admin = admin_token(&server);
    assert!(admin.starts_with("cour_"), "a generated admin token");
    let mut tokens = Tokens {
        admin: admin.clone(),
        agents: Default::default(),
    };
    for (agent, settings) in [
        ("alice", json!({"capabilities": ["work"]})),
        ("bob", json!({})),
        ("carol", json!({})),
        ("dave", json!({})),
    ] {
        let token = register(&server, &admin, agent, settings);
        tokens.agents.insert(agent.into(), token);
    }
    let admin_auth = format!("Bearer {admin}");
    let rows = table();
    let mut mismatches = Vec::new();
    for row in &rows {
        for (caller, expected) in CALLERS.iter().zip(row.expected) {
            if let Some((method, path)) = row.setup {
                let set_up = call(&server, method, path, Some("{}"), Some(&admin_auth));
                assert!(set_up.status < 300, "setup of {}: {set_up:?}", row.path);
            }
            let auth = tokens.header(caller, row.own);
            let response = call(&server, row.method, row.path, row.body, auth.as_deref());
            if response.status != expected {
                mismatches.push(format!(
                    "{} {} as {caller}: {} (expected {expected}): {}",
                    row.method, row.path, response.status, response.text
                ));
            }
            if response.status == 401 {
                assert!(
                    response
                        .header("www-authenticate")
                        .is_some_and(|h| h.starts_with("Bearer")),
                    "401 without WWW-Authenticate: {response:?}"
                );
            }
            if matches!(response.status, 401 | 403) {
                assert!(!response.code().is_empty(), "the error shape: {response:?}");
            }
            if row.path.ends_with("/token") && caller == &"own" && response.status == 200 {
                let rotated = response.json["token"].as_str().expect("the new token");
                tokens.agents.insert(row.own.into(), rotated.to_owned());
            }
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    let testing = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/TESTING.md"))
        .expect("TESTING.md");
    let expected = markdown(&rows);
    assert!(
        testing.contains(&expected),
        "TESTING.md must print the T13 table as the test has it:\n{expected}"
    );
    // Refusals are counted.
    let stats = call(&server, "GET", "/v1/stats", None, Some(&admin_auth));
    let counted = |what: &str| stats.json["auth"][what].as_u64().unwrap_or(0);
    // Each route that needs a token refused the three callers without a good one.
    let closed = rows.iter().filter(|row| row.expected[0] == 401).count() as u64;
    assert!(counted("unauthenticated") >= 3 * closed, "{stats:?}");
    assert!(counted("forbidden") > 10, "{stats:?}");
}

#[test]
fn rotation_and_deletion_revoke_tokens_also_after_a_restart() {
    let mut server = TestServer::start(&["--auth-mode", "token"]);
    let admin = admin_token(&server);
    let old = register(&server, &admin, "erin", json!({}));
    let gone = register(&server, &admin, "frank", json!({}));
    let as_token = |token: &str| format!("Bearer {token}");
    let heartbeat = |server: &TestServer, agent: &str, token: &str| {
        call(
            server,
            "POST",
            &format!("/v1/agents/{agent}/heartbeat"),
            None,
            Some(&as_token(token)),
        )
        .status
    };
    assert_eq!(heartbeat(&server, "erin", &old), 200);
    let rotated = call(
        &server,
        "POST",
        "/v1/agents/erin/token",
        None,
        Some(&as_token(&old)),
    );
    assert_eq!(rotated.status, 200, "{rotated:?}");
    let new = rotated.json["token"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    assert_eq!(
        heartbeat(&server, "erin", &old),
        401,
        "the old token stops at once"
    );
    assert_eq!(heartbeat(&server, "erin", &new), 200);
    // An update keeps the token (and does not show it again).
    let update = call(
        &server,
        "PUT",
        "/v1/agents/erin",
        Some(r#"{"capabilities": ["x"]}"#),
        Some(&as_token(&admin)),
    );
    assert_eq!(update.status, 200, "{update:?}");
    assert!(update.json.get("token").is_none(), "{update:?}");
    assert_eq!(heartbeat(&server, "erin", &new), 200);
    let deleted = call(
        &server,
        "DELETE",
        "/v1/agents/frank",
        None,
        Some(&as_token(&admin)),
    );
    assert_eq!(deleted.status, 204);
    assert_eq!(heartbeat(&server, "frank", &gone), 401);

    server.kill9();
    server.restart();
    assert_eq!(admin_token(&server), admin, "the admin token file is kept");
    assert_eq!(
        heartbeat(&server, "erin", &old),
        401,
        "rotation holds after a restart"
    );
    assert_eq!(heartbeat(&server, "erin", &new), 200);
    // Re-registering a deleted agent gives a new token, not the old one back.
    let again = register(&server, &admin, "frank", json!({}));
    assert_ne!(again, gone);
    assert_eq!(heartbeat(&server, "frank", &gone), 401);
    assert_eq!(heartbeat(&server, "frank", &again), 200);

    assert_no_raw_token(&server, &[&old, &new, &gone, &again], &admin);
}

/// No raw agent token anywhere in the data directory or the logs of any start; the admin
/// token only in its own file.
fn assert_no_raw_token(server: &TestServer, agents: &[&str], admin: &str) {
    let logs = server.all_logs();
    let mut files = Vec::new();
    collect_files(&server.data_dir(), &mut files);
    for token in agents.iter().chain([&admin]) {
        assert!(!logs.contains(token), "a token in the logs");
        for file in &files {
            if token == &admin && file.ends_with("admin.token") {
                continue;
            }
            let bytes = std::fs::read(file).unwrap();
            assert!(
                !bytes.windows(token.len()).any(|w| w == token.as_bytes()),
                "a raw token in {}",
                file.display()
            );
        }
    }
}

fn collect_files(dir: &std::path::Path, files: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_files(&path, files);
        } else {
            files.push(path);
        }
    }
}

#[test]
fn the_admin_token_can_come_from_the_environment_and_agents_get_tokens_when_auth_turns_on() {
    // Registered while auth was off: no token yet.
    let mut server = TestServer::start(&[]);
    server.register("gail", json!({}));
    server.terminate();
    let configured = "an-admin-token-of-thirty-two-chars";
    server.set_env("COURIER_ADMIN_TOKEN", Some(configured));
    server.set_args(&["--auth-mode", "token"]);
    server.restart();
    assert!(
        !server.data_dir().join("admin.token").exists(),
        "a configured token is not written"
    );
    let admin = format!("Bearer {configured}");
    let no_token = call(&server, "POST", "/v1/agents/gail/heartbeat", None, None);
    assert_eq!(no_token.status, 401);
    // The next registration hands gail its first token.
    let update = call(&server, "PUT", "/v1/agents/gail", Some("{}"), Some(&admin));
    assert_eq!(update.status, 200, "{update:?}");
    let token = update.json["token"]
        .as_str()
        .expect("a first token")
        .to_owned();
    let heartbeat = call(
        &server,
        "POST",
        "/v1/agents/gail/heartbeat",
        None,
        Some(&format!("Bearer {token}")),
    );
    assert_eq!(heartbeat.status, 200, "{heartbeat:?}");
}

/// A route without its own rule would be the admin's only (closed, not open): still, every
/// route the router has gets an explicit rule, so that the table above covers it.
#[test]
fn every_route_has_an_access_rule() {
    let routes = crate::support::api_routes();
    let rules = courier::api::access::RULES;
    for route in routes {
        assert!(
            rules.iter().any(|(_, r, _)| *r == route.as_str()),
            "{route} has no rule in api::access::RULES"
        );
    }
    for (method, route, _) in rules {
        assert!(
            table()
                .iter()
                .filter(|row| row.method == method.as_str())
                .any(|row| {
                    let path = row.path.split('?').next().unwrap_or_default();
                    let template = route
                        .replace("{agent}", "alice")
                        .replace("{name}", "work")
                        .replace("{pattern}", "news.%3E");
                    path == template
                        || path == route.replace("{agent}", "dave")
                        || path == route.replace("{agent}", "carol")
                        || path
                            == route
                                .replace("{agent}", "alice")
                                .replace("{pattern}", "old.%3E")
                }),
            "the T13 table has no row for {method} {route}"
        );
    }
}

/// Another agent's request id gets neither that request's reply nor a wait for it; HEAD is
/// treated as GET (open where GET is).
#[test]
fn a_request_id_is_its_senders_and_head_follows_get() {
    let server = TestServer::start(&["--auth-mode", "token"]);
    let admin = admin_token(&server);
    let alice = format!("Bearer {}", register(&server, &admin, "alice", json!({})));
    let bob = format!("Bearer {}", register(&server, &admin, "bob", json!({})));
    let body = |from: &str| {
        json!({"id": "req-1", "to": "agent:alice", "from": from, "body": 1}).to_string()
    };
    let first = call(
        &server,
        "POST",
        "/v1/requests?timeout_ms=20",
        Some(&body("alice")),
        Some(&alice),
    );
    assert_eq!(first.status, 504, "{first:?}");
    let taken = call(
        &server,
        "POST",
        "/v1/requests?timeout_ms=20",
        Some(&body("bob")),
        Some(&bob),
    );
    assert_eq!(taken.status, 409, "{taken:?}");
    assert_eq!(taken.code(), "id_taken");
    assert!(
        !taken.text.contains("alice"),
        "the owner is not named: {taken:?}"
    );
    assert_eq!(call(&server, "HEAD", "/healthz", None, None).status, 200);
    assert_eq!(
        call(&server, "HEAD", "/v1/agents", None, Some(&bob)).status,
        200
    );
}

/// A client id answers duplicates of its own sender's message only: another agent's
/// publish with that id gets 409 (it neither learns the offset nor has its message dropped
/// as a duplicate), in a batch too, with nothing written.
#[test]
fn a_client_id_is_its_senders() {
    let server = TestServer::start(&["--auth-mode", "token"]);
    let admin = admin_token(&server);
    let alice = format!("Bearer {}", register(&server, &admin, "alice", json!({})));
    let bob = format!("Bearer {}", register(&server, &admin, "bob", json!({})));
    let publish = |from: &str, auth: &str| {
        let body = json!({"id": "order-42", "to": "agent:alice", "from": from, "body": 1});
        call(
            &server,
            "POST",
            "/v1/messages",
            Some(&body.to_string()),
            Some(auth),
        )
    };
    assert_eq!(publish("alice", &alice).status, 201);
    let again = publish("alice", &alice);
    assert_eq!(
        (again.status, again.json["duplicate"].as_bool()),
        (200, Some(true))
    );
    let stats = |server: &TestServer| {
        let auth = format!("Bearer {admin}");
        call(server, "GET", "/v1/stats", None, Some(&auth)).json["log"]["next_offset"].clone()
    };
    let before = stats(&server);
    let taken = publish("bob", &bob);
    assert_eq!(taken.status, 409, "{taken:?}");
    assert_eq!(taken.code(), "id_taken");
    assert!(
        taken.json["offset"].is_null() && !taken.text.contains("alice"),
        "{taken:?}"
    );
    let batch = json!({"messages": [
        {"to": "agent:alice", "from": "bob", "body": 2},
        {"id": "order-42", "to": "agent:alice", "from": "bob", "body": 3},
    ]});
    let refused = call(
        &server,
        "POST",
        "/v1/messages/batch",
        Some(&batch.to_string()),
        Some(&bob),
    );
    assert_eq!(refused.status, 409, "{refused:?}");
    assert_eq!(stats(&server), before, "a refused publish wrote something");
}
