//! `courierctl` against data directories written by the real `courier` server: clean, with a
//! torn tail, with a flipped bit in an older segment, many segments; while the server runs
//! and after it stopped. `--json` output is parsed.
//!
//! The server binary is the one built beside `courierctl` (`cargo test --workspace` builds
//! it; alone, run `cargo build -p courier` first).
#![allow(
    clippy::disallowed_methods,
    reason = "the tests wait for the server with deadlines"
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Starts the real server on a loopback port with `flags`; returns it and the line it prints
/// once listening (`courier listening on <url>`).
fn spawn_courier<S: AsRef<std::ffi::OsStr>>(data: &Path, flags: &[S]) -> (Child, String) {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_courierctl")).with_file_name("courier");
    assert!(
        exe.exists(),
        "{} is missing: build the server first (cargo build -p courier)",
        exe.display()
    );
    let mut child = Command::new(exe)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--segment-bytes",
            "4096",
            "--data-dir",
        ])
        .arg(data)
        .args(flags)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn courier");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the listening line");
    (child, line)
}

/// A real server on a loopback port.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(data: &Path) -> Self {
        Self::start_with(data, &[])
    }

    /// A server with extra flags.
    fn start_with(data: &Path, flags: &[&str]) -> Self {
        let (child, line) = spawn_courier(data, flags);
        let addr = line
            .trim()
            .strip_prefix("courier listening on http://")
            .expect("the listening line")
            .parse()
            .expect("an address");
        let deadline = Instant::now() + Duration::from_secs(20);
        while http(addr, "GET", "/readyz", None).0 != 200 {
            assert!(Instant::now() < deadline, "the server never got ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, addr }
    }

    fn send(&self, method: &str, path: &str, body: Value) -> Value {
        let (status, reply) = http(self.addr, method, path, Some(&body));
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {reply}"
        );
        reply
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request; returns the status and the body's JSON (Null if none).
fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let body = body.map(Value::to_string).unwrap_or_default();
    let (status, text) = http_text(addr, method, path, &body);
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// One HTTP/1.1 request with a JSON text body; returns the status and the body's text.
fn http_text(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    http_as(addr, None, method, path, body)
}

/// [`http_text`] with a bearer token.
fn http_as(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return (0, String::new());
    };
    let authorization = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{authorization}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("send");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).expect("receive");
    let status = raw.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let text = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
    (status, text.unwrap_or_default())
}

fn courierctl(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_courierctl"))
        .args(args)
        .arg(dir)
        .output()
        .expect("run courierctl")
}

fn json_of(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// A data directory with agents `a` and `b`, 60 messages to `a` (several segments of 4 KiB)
/// and 3 to `b`, one message of `a` leased; the server still running.
fn populated(dir: &Path) -> Server {
    let server = Server::start(dir);
    for agent in ["a", "b"] {
        server.send("PUT", &format!("/v1/agents/{agent}"), json!({}));
    }
    for n in 0..60 {
        let body = json!({"n": n, "pad": "x".repeat(300)});
        let msg =
            json!({"to": "agent:a", "from": "w", "headers": {"n": n.to_string()}, "body": body});
        server.send("POST", "/v1/messages", msg);
    }
    for n in 0..3 {
        server.send(
            "POST",
            "/v1/messages",
            json!({"to": "agent:b", "from": "w", "body": [n]}),
        );
    }
    server.send(
        "POST",
        "/v1/agents/a/receive",
        json!({"max": 1, "wait_ms": 0}),
    );
    server
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("log"))
        .expect("log dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}

#[test]
fn clean_directory_verify_inspect_and_dump_while_running_and_after() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    let server = populated(&dir);

    let verify = courierctl(&["verify", "--json"], &dir);
    assert_eq!(verify.status.code(), Some(0), "{verify:?}");
    let report = json_of(&verify);
    assert_eq!(report["clean"], true);
    assert!(report["segments"].as_array().expect("segments").len() > 3);
    assert_eq!(report["records"], 2 + 63 + 1);

    let inspect = json_of(&courierctl(&["inspect", "--json"], &dir));
    assert_eq!(inspect["server_running"], true);
    assert_eq!(inspect["damaged"], false);
    assert_eq!(inspect["next_offset"], 66);
    let agents = inspect["agents"].as_array().expect("agents");
    assert_eq!(
        agents[0],
        json!({"agent": "a", "registered": true, "ready": 59, "in_flight": 1, "dead_letters": 0})
    );
    assert_eq!(
        agents[1],
        json!({"agent": "b", "registered": true, "ready": 3, "in_flight": 0, "dead_letters": 0})
    );

    let refused = courierctl(&["repair"], &dir);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("running server"));

    server.stop();
    let dump = courierctl(
        &[
            "dump", "--agent", "a", "--from", "10", "--to", "40", "--limit", "5",
        ],
        &dir,
    );
    assert_eq!(dump.status.code(), Some(0));
    let lines: Vec<Value> = String::from_utf8_lossy(&dump.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 5);
    assert_eq!(lines[0]["offset"], 10);
    assert_eq!(lines[0]["body"]["n"], 8);
    assert_eq!(lines[0]["headers"], json!({"n": "8"}));
    assert_eq!(lines[0]["from"], "w");
    assert_eq!(lines[0]["to"], "agent:a");
    assert!(lines[0]["id"].as_str().is_some_and(|id| id.len() == 26));
    assert!(lines[0]["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert_eq!(lines[4]["offset"], 14);

    let only_b = courierctl(&["dump", "--agent", "b"], &dir);
    assert_eq!(String::from_utf8_lossy(&only_b.stdout).lines().count(), 3);

    let table = courierctl(&["inspect"], &dir);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("server not running"), "{text}");
    assert!(
        text.contains("AGENT") && text.contains("DEAD_LETTERS"),
        "{text}"
    );
}

#[test]
fn torn_tail_is_reported_but_only_strict_counts_it() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    populated(&dir).stop();
    let newest = segments(&dir).pop().expect("a segment");
    // Garbage right after the last record: where the records end, not where the file does
    // (the newest segment may be preallocated, its tail zeros).
    let clean = courierctl(&["verify", "--json"], &dir);
    let rows = json_of(&clean)["segments"].clone();
    let end = rows[rows.as_array().expect("segments").len() - 1]["bytes"]
        .as_u64()
        .expect("bytes");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .expect("open");
    file.set_len(end).expect("cut the zero tail");
    std::os::unix::fs::FileExt::write_all_at(&file, &[0x5a; 13], end).expect("garbage");

    let verify = courierctl(&["verify", "--json"], &dir);
    assert_eq!(verify.status.code(), Some(0), "{verify:?}");
    let problems = json_of(&verify)["problems"].clone();
    assert_eq!(problems[0]["torn_tail"], true);
    assert_eq!(problems[0]["bytes"], 13);
    let strict = courierctl(&["verify", "--strict"], &dir);
    assert_eq!(strict.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&strict.stdout).contains("torn tail"));
}

#[test]
fn flipped_bit_is_reported_with_file_and_position_then_repaired() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    populated(&dir).stop();
    let older = segments(&dir)[1].clone();
    let mut bytes = std::fs::read(&older).expect("read");
    let at = 100;
    bytes[at] ^= 0x10;
    std::fs::write(&older, &bytes).expect("write");

    let verify = courierctl(&["verify"], &dir);
    assert_eq!(verify.status.code(), Some(1));
    let text = String::from_utf8_lossy(&verify.stdout);
    let name = older
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert!(text.contains(&name) && text.contains("DAMAGED"), "{text}");
    let report = json_of(&courierctl(&["verify", "--json"], &dir));
    let problem = &report["problems"][0];
    assert!(problem["segment"]
        .as_str()
        .expect("segment")
        .ends_with(&name));
    assert!(problem["position"].as_u64().expect("position") <= at as u64);
    assert_eq!(problem["torn_tail"], false);

    let inspect = courierctl(&["inspect", "--json"], &dir);
    assert_eq!(inspect.status.code(), Some(1));
    let inspected = json_of(&inspect);
    assert_eq!(inspected["damaged"], true);
    assert_eq!(inspected["agents"], Value::Null);
    let dump = courierctl(&["dump"], &dir);
    let warning = String::from_utf8_lossy(&dump.stderr);
    assert!(
        warning.contains(&name) && warning.contains("damaged"),
        "{warning}"
    );

    let repair = courierctl(&["repair", "--json"], &dir);
    assert_eq!(repair.status.code(), Some(0), "{repair:?}");
    let repaired = json_of(&repair)["repaired"].clone();
    let quarantine = repaired[0]["quarantine_file"].as_str().expect("file");
    assert!(Path::new(quarantine).exists(), "{quarantine}");
    assert_eq!(courierctl(&["verify"], &dir).status.code(), Some(0));
    // Every undamaged message is still there; the server starts on the repaired directory.
    let dumped = courierctl(&["dump", "--agent", "a"], &dir);
    let count = String::from_utf8_lossy(&dumped.stdout).lines().count();
    assert!((55..60).contains(&count), "{count} messages of a left");
    let server = Server::start(&dir);
    let got = server.send(
        "POST",
        "/v1/agents/b/receive",
        json!({"max": 10, "wait_ms": 0}),
    );
    assert_eq!(got["messages"].as_array().expect("messages").len(), 3);
}

#[test]
fn usage_errors_exit_2() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let missing = courierctl(&["verify"], &tmp.path().join("nothing"));
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not a Courier data directory"));
    let bad_flag = courierctl(&["dump", "--frm", "3"], tmp.path());
    assert_eq!(bad_flag.status.code(), Some(2));
    let from_after_to = Command::new(env!("CARGO_BIN_EXE_courierctl"))
        .args(["dump", "--from", "9", "--to", "3"])
        .arg(tmp.path())
        .output()
        .expect("run");
    assert_eq!(from_after_to.status.code(), Some(2));
    let help = Command::new(env!("CARGO_BIN_EXE_courierctl"))
        .args(["verify", "--help"])
        .output()
        .expect("run");
    assert!(String::from_utf8_lossy(&help.stdout).contains("Example: courierctl verify"));
}

fn dlq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_courierctl"))
        .arg("dlq")
        .args(args)
        .output()
        .expect("run courierctl")
}

#[test]
fn dlq_lists_and_redrives_dead_letters_of_a_running_server() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let server = populated(&tmp.path().join("data"));
    let url = format!("http://{}", server.addr);
    let got = server.send(
        "POST",
        "/v1/agents/b/receive",
        json!({"max": 3, "wait_ms": 0}),
    );
    let receipts: Vec<Value> = got["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["receipt"].clone())
        .collect();
    let body = json!({"receipts": receipts, "dead_letter": true});
    server.send("POST", "/v1/agents/b/nack", body);

    let list = dlq(&["list", "--server", &url, "--agent", "b", "--json"]);
    assert_eq!(list.status.code(), Some(0), "{list:?}");
    let listed = json_of(&list)["dead_letters"].clone();
    let offsets: Vec<u64> = listed
        .as_array()
        .expect("dead letters")
        .iter()
        .map(|d| d["offset"].as_u64().expect("offset"))
        .collect();
    assert_eq!(offsets.len(), 3);
    assert_eq!(listed[0]["reason"], "rejected");
    assert_eq!(listed[0]["attempts"], 1);
    let table = dlq(&["list", "--server", &url, "--agent", "b"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("3 dead letters for b"));

    let one = offsets[0].to_string();
    let redrive = dlq(&[
        "redrive", "--server", &url, "--agent", "b", "--offset", &one, "--json",
    ]);
    assert_eq!(json_of(&redrive)["redriven"], 1);
    let rest = dlq(&[
        "redrive", "--server", &url, "--agent", "b", "--all", "--json",
    ]);
    assert_eq!(json_of(&rest)["redriven"], 2);
    let empty = json_of(&dlq(&["list", "--server", &url, "--agent", "b", "--json"]));
    assert_eq!(empty["dead_letters"], json!([]));

    let unknown = dlq(&["list", "--server", &url, "--agent", "nobody"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("404"));
    let neither = dlq(&["redrive", "--server", &url, "--agent", "b"]);
    assert_eq!(neither.status.code(), Some(2));
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_courierctl"))
        .args(args)
        .output()
        .expect("run courierctl")
}

#[test]
fn replay_republishes_history_resumably_and_spares_the_owner() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let old = tmp.path().join("old");
    populated(&old).stop();
    let target = Server::start(&tmp.path().join("new"));
    let url = format!("http://{}", target.addr);
    target.send("PUT", "/v1/agents/a", json!({}));
    let old_dir = old.to_str().expect("utf-8 path");

    // Agent b is not registered on the target: the replay stops at its first message.
    let stopped = run(&["replay", old_dir, "--server", &url, "--rate", "0", "--json"]);
    assert_eq!(stopped.status.code(), Some(1), "{stopped:?}");
    let report = json_of(&stopped);
    assert_eq!(report["replayed"], 60);
    assert_eq!(report["stopped"]["offset"], 62);
    assert!(report["stopped"]["error"]
        .as_str()
        .expect("error")
        .contains("404"));
    assert_eq!(report["next_from"], 62);

    target.send("PUT", "/v1/agents/b", json!({}));
    let resumed = run(&[
        "replay", old_dir, "--server", &url, "--from", "62", "--json",
    ]);
    assert_eq!(resumed.status.code(), Some(0), "{resumed:?}");
    let report = json_of(&resumed);
    assert_eq!(report["replayed"], 3);
    assert_eq!(report["stopped"], Value::Null);
    assert_eq!(report["next_from"], 65);

    // Within the dedupe window, replaying again stores nothing twice.
    let again = json_of(&run(&[
        "replay", old_dir, "--server", &url, "--agent", "b", "--json",
    ]));
    assert_eq!(again["replayed"], 3);
    assert_eq!(again["duplicates"], 3);

    let got = target.send(
        "POST",
        "/v1/agents/a/receive",
        json!({"max": 100, "wait_ms": 0}),
    );
    let messages = got["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), 60);
    let first = &messages[0];
    assert_eq!(first["body"]["n"], 0);
    assert_eq!(first["from"], "w");
    assert_eq!(first["headers"]["n"], "0");
    assert_eq!(first["headers"]["courier-original-offset"], "2");
    assert_eq!(
        first["headers"]["courier-original-id"]
            .as_str()
            .map(str::len),
        Some(26)
    );

    // Into the server that writes the directory itself only when asked.
    target.stop();
    let owner = Server::start(&old);
    let owner_url = format!("http://{}", owner.addr);
    let refused = run(&["replay", old_dir, "--server", &owner_url]);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--into-owner"));
    let redirected = run(&[
        "replay",
        old_dir,
        "--server",
        &owner_url,
        "--into-owner",
        "--agent",
        "b",
        "--to-address",
        "agent:a",
        "--json",
    ]);
    assert_eq!(json_of(&redirected)["replayed"], 3);
    let inbox = owner.send("GET", "/v1/agents/a", json!({}));
    assert_eq!(inbox["inbox"]["ready"], 59 + 3);
}

#[test]
fn bench_reports_throughput_and_latency_percentiles() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&tmp.path().join("data"));
    let url = format!("http://{}", server.addr);
    for (batch, requests) in [("1", 300), ("25", 12)] {
        let out = run(&[
            "bench",
            "--server",
            &url,
            "--publishers",
            "2",
            "--consumers",
            "2",
            "--size",
            "64",
            "--count",
            "300",
            "--batch",
            batch,
            "--json",
        ]);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let report = json_of(&out);
        assert_eq!(report["publish"]["count"], requests);
        assert_eq!(report["delivery"]["count"], 300);
        assert!(report["ack"]["count"].as_u64().expect("acks") >= 1);
        for what in ["publish", "delivery", "ack"] {
            let f = &report[what];
            let (p50, p99, max) = (
                f["p50_ms"].as_f64(),
                f["p99_ms"].as_f64(),
                f["max_ms"].as_f64(),
            );
            assert!(p50 > Some(0.0) && p50 <= p99 && p99 <= max, "{what}: {f}");
        }
        assert!(report["messages_per_second"].as_f64().expect("rate") > 0.0);
    }
    let table = run(&["bench", "--server", &url, "--count", "50"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("publish->delivery") && text.contains("P99_MS"),
        "{text}"
    );
}

/// A body nested far deeper than serde_json's tree reader takes (128), accepted by a server
/// whose `limits.max_json_depth` allows it, goes through `dlq list`, `dump` and `replay`
/// intact.
#[test]
fn deeply_nested_bodies_are_listed_dumped_and_replayed_intact() {
    let depth = ["--limits-max-json-depth", "1000"];
    let deep = format!("{}{}", "[".repeat(300), "]".repeat(300));
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("old");
    let server = Server::start_with(&dir, &depth);
    server.send("PUT", "/v1/agents/a", json!({}));
    let publish = format!(r#"{{"to": "agent:a", "from": "w", "body": {deep}}}"#);
    assert_eq!(
        http_text(server.addr, "POST", "/v1/messages", &publish).0,
        201
    );
    let (status, received) = http_text(
        server.addr,
        "POST",
        "/v1/agents/a/receive",
        r#"{"max": 1, "wait_ms": 0}"#,
    );
    assert_eq!(status, 200);
    let at = received.find("\"receipt\":\"").expect("a receipt") + 11;
    let nack = format!(
        r#"{{"receipts": ["{}"], "dead_letter": true}}"#,
        &received[at..at + 25]
    );
    assert_eq!(
        http_text(server.addr, "POST", "/v1/agents/a/nack", &nack).0,
        200
    );

    let url = format!("http://{}", server.addr);
    let list = dlq(&["list", "--server", &url, "--agent", "a", "--json"]);
    assert_eq!(list.status.code(), Some(0), "{list:?}");
    assert_eq!(json_of(&list)["dead_letters"][0]["reason"], "rejected");
    server.stop();

    let dump = courierctl(&["dump"], &dir);
    assert_eq!(dump.status.code(), Some(0), "{dump:?}");
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(text.contains(&format!("\"body\":{deep}")), "{text}");

    let target = Server::start_with(&tmp.path().join("new"), &depth);
    target.send("PUT", "/v1/agents/a", json!({}));
    let url = format!("http://{}", target.addr);
    let old_dir = dir.to_str().expect("utf-8 path");
    let replayed = run(&["replay", old_dir, "--server", &url, "--json"]);
    assert_eq!(replayed.status.code(), Some(0), "{replayed:?}");
    assert_eq!(json_of(&replayed)["replayed"], 1);
    let (_, received) = http_text(
        target.addr,
        "POST",
        "/v1/agents/a/receive",
        r#"{"max": 1, "wait_ms": 0}"#,
    );
    assert!(received.contains(&format!("\"body\":{deep}")), "{received}");
}

#[test]
fn online_commands_take_a_token_and_rotate_agent_tokens() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let data = tmp.path().join("data");
    let server = Server::start_with(&data, &["--auth-mode", "token"]);
    let admin = std::fs::read_to_string(data.join("admin.token"))
        .expect("the generated admin token")
        .trim()
        .to_owned();
    let url = format!("http://{}", server.addr);
    let (status, reply) = http_as(server.addr, Some(&admin), "PUT", "/v1/agents/worker", "{}");
    assert_eq!(status, 201, "{reply}");
    let first: Value = serde_json::from_str(&reply).expect("json");
    let first = first["token"].as_str().expect("a token").to_owned();

    let refused = run(&["dlq", "list", "--server", &url, "--agent", "worker"]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("401") && stderr.contains("--token"),
        "{stderr}"
    );

    let rotated = run(&[
        "agents",
        "token-rotate",
        "--server",
        &url,
        "--agent",
        "worker",
        "--token",
        &admin,
    ]);
    assert!(rotated.status.success(), "{rotated:?}");
    let second = String::from_utf8_lossy(&rotated.stdout).trim().to_owned();
    assert!(second.starts_with("cour_") && second != first, "{second}");
    let heartbeat = |token: &str| {
        http_as(
            server.addr,
            Some(token),
            "POST",
            "/v1/agents/worker/heartbeat",
            "{}",
        )
        .0
    };
    assert_eq!(heartbeat(&first), 401);
    assert_eq!(heartbeat(&second), 200);

    let listed = Command::new(env!("CARGO_BIN_EXE_courierctl"))
        .args([
            "dlq", "list", "--server", &url, "--agent", "worker", "--json",
        ])
        .env("COURIER_TOKEN", &second)
        .output()
        .expect("run courierctl");
    assert!(listed.status.success(), "the agent's own token: {listed:?}");
    server.stop();

    let dump = courierctl(&["dump"], &data);
    let inspect = courierctl(&["inspect", "--json"], &data);
    for output in [&dump, &inspect] {
        assert!(output.status.success(), "{output:?}");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(!text.contains(&first) && !text.contains(&second) && !text.contains(&admin));
    }
}

#[test]
fn online_commands_speak_https_with_a_cacert() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let tmp = tempfile::tempdir().expect("temp dir");
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "courierctl test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let (ca_pem, cert_pem, key_pem) = (
        tmp.path().join("ca.pem"),
        tmp.path().join("cert.pem"),
        tmp.path().join("key.pem"),
    );
    std::fs::write(&ca_pem, ca.pem()).unwrap();
    std::fs::write(&cert_pem, cert.pem()).unwrap();
    std::fs::write(&key_pem, key.serialize_pem()).unwrap();
    let tls_flags = [
        "--tls-cert".as_ref(),
        cert_pem.as_os_str(),
        "--tls-key".as_ref(),
        key_pem.as_os_str(),
    ];
    let (mut child, line) = spawn_courier(&tmp.path().join("data"), &tls_flags);
    let port = line.trim().rsplit(':').next().expect("a port").to_owned();
    let url = format!("https://localhost:{port}");
    let ca_arg = ca_pem.display().to_string();
    let list = |extra: &[&str]| {
        let mut args = vec!["dlq", "list", "--server", &url, "--agent", "nobody"];
        args.extend_from_slice(extra);
        run(&args)
    };
    // Up once the server answers over TLS: an unknown agent's 404.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let output = list(&["--cacert", &ca_arg]);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        if stderr.contains("404") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never answered over TLS: {stderr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Without the CA the server's certificate is not trusted.
    let untrusted = list(&[]);
    assert_eq!(untrusted.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&untrusted.stderr);
    assert!(!stderr.contains("404"), "{stderr}");
    let _ = child.kill();
    let _ = child.wait();
}
