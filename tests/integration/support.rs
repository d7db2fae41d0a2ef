//! Test support: the real `courier` binary on a loopback port with a temporary data
//! directory, and a small blocking HTTP/1.1 client.
#![allow(
    clippy::disallowed_methods,
    reason = "tests wait for the server with deadlines; the server's own time is not read here"
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running server. Killed (SIGKILL) when dropped.
pub struct TestServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Where it listens.
    pub addr: SocketAddr,
    stderr_path: PathBuf,
    starts: u32,
    /// Speak TLS with this client configuration (a server started with `--tls-*`).
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl TestServer {
    /// Starts a server with extra flags (for example `["--lease", "1s"]`).
    pub fn start(args: &[&str]) -> Self {
        let mut server = Self::unstarted(args);
        server.spawn();
        server
    }

    /// A server not started yet: prepare its data directory, then [`TestServer::restart`].
    pub fn unstarted(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Self {
            child: None,
            stderr_path: dir.path().join("stderr-0.log"),
            dir,
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            env: Vec::new(),
            addr: "127.0.0.1:0".parse().unwrap(),
            starts: 0,
            tls: None,
        }
    }

    /// Starts a server with TLS flags, spoken to over TLS with `client`.
    pub fn start_tls(args: &[&str], client: Arc<rustls::ClientConfig>) -> Self {
        let mut server = Self::unstarted(args);
        server.tls = Some(client);
        server.spawn();
        server
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn spawn(&mut self) {
        if let Err(logs) = self.try_spawn() {
            panic!("courier did not start:\n{logs}");
        }
    }

    /// Starts the binary and waits until it is ready; if it exits instead, returns its logs.
    fn try_spawn(&mut self) -> Result<(), String> {
        self.starts += 1;
        self.stderr_path = self.dir.path().join(format!("stderr-{}.log", self.starts));
        let stderr = std::fs::File::create(&self.stderr_path).expect("stderr file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_courier"))
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(&self.args)
            .env_remove("RUST_LOG")
            .env_remove("FAILPOINTS")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn courier");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read stdout");
        let line = line.trim();
        if let Some(addr) = line
            .strip_prefix("courier listening on http://")
            .or_else(|| line.strip_prefix("courier listening on https://"))
        {
            self.addr = addr.parse().expect("address");
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("exited with {status}:\n{}", self.logs()));
            }
            let ready = send_via(
                self.addr,
                self.tls.as_ref(),
                "GET",
                "/readyz",
                None,
                None,
                &[],
            )
            .is_ok_and(|r| r.status == 200);
            if ready {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("never ready:\n{}", self.logs()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sets (or with `None` removes) an environment variable for the next starts.
    pub fn set_env(&mut self, name: &str, value: Option<&str>) {
        self.env.retain(|(n, _)| n != name);
        if let Some(value) = value {
            self.env.push((name.to_owned(), value.to_owned()));
        }
    }

    /// Restarts (after a SIGKILL if running); if the start fails, returns its logs.
    pub fn try_restart(&mut self) -> Result<(), String> {
        self.kill9();
        self.try_spawn()
    }

    /// Waits up to `timeout` for the server to exit by itself; returns its exit status.
    #[cfg_attr(
        not(feature = "failpoints"),
        expect(dead_code, reason = "used by the fail point tests only")
    )]
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let child = self.child.as_mut()?;
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    /// Restarts (after a SIGKILL if running) expecting the start to fail; returns the logs.
    pub fn restart_expecting_failure(&mut self) -> String {
        self.kill9();
        match self.try_spawn() {
            Ok(()) => panic!("the server started:\n{}", self.logs()),
            Err(logs) => logs,
        }
    }

    /// Replaces the extra flags for the next starts.
    pub fn set_args(&mut self, args: &[&str]) {
        self.args = args.iter().map(|s| (*s).to_owned()).collect();
    }

    /// Everything the server wrote to stderr, over all its starts.
    pub fn all_logs(&self) -> String {
        (1..=self.starts)
            .map(|n| {
                std::fs::read_to_string(self.dir.path().join(format!("stderr-{n}.log")))
                    .unwrap_or_default()
            })
            .collect()
    }

    /// Everything the server wrote to stderr since its last start.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Sends a signal (`HUP`, `TERM`, …) to the running server.
    pub fn signal(&self, name: &str) {
        let child = self.child.as_ref().expect("running");
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name}");
    }

    /// SIGKILL: no shutdown at all.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill");
            child.wait().expect("wait");
        }
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        child.wait().expect("wait")
    }

    /// Kills with SIGKILL (if running) and starts again on the same directory.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// A request; `body` is sent as JSON.
    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Response {
        let bytes = body.map(|b| serde_json::to_vec(b).unwrap());
        self.raw(
            method,
            path,
            bytes.as_deref(),
            Some("application/json"),
            &[],
        )
    }

    /// GET.
    pub fn get(&self, path: &str) -> Response {
        self.request("GET", path, None)
    }

    /// POST with a JSON body.
    pub fn post(&self, path: &str, body: Value) -> Response {
        self.request("POST", path, Some(&body))
    }

    /// POST with a JSON body and a `traceparent` header.
    pub fn post_traced(&self, path: &str, body: &Value, traceparent: &str) -> Response {
        let bytes = serde_json::to_vec(body).unwrap();
        self.raw(
            "POST",
            path,
            Some(&bytes),
            Some("application/json"),
            &[("traceparent", traceparent)],
        )
    }

    /// PUT with a JSON body.
    pub fn put(&self, path: &str, body: Value) -> Response {
        self.request("PUT", path, Some(&body))
    }

    /// A request with raw bytes, a content type and extra headers.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        content_type: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Response {
        send_via(
            self.addr,
            self.tls.as_ref(),
            method,
            path,
            body,
            content_type,
            headers,
        )
        .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.logs()))
    }

    /// Registers an agent (PUT with `settings`), asserting success.
    pub fn register(&self, agent: &str, settings: Value) {
        let response = self.put(&format!("/v1/agents/{agent}"), settings);
        assert!(
            response.status == 201 || response.status == 200,
            "register {agent}: {response:?}"
        );
    }

    /// Publishes `body` to `agent:to`, asserting 201; returns the offset.
    pub fn publish(&self, to: &str, body: Value) -> u64 {
        let response = self.post(
            "/v1/messages",
            serde_json::json!({"to": format!("agent:{to}"), "from": "tester", "body": body}),
        );
        assert_eq!(response.status, 201, "{response:?}");
        response.json["offset"].as_u64().expect("offset")
    }

    /// Receives (long-poll) with the given request; returns the messages.
    pub fn receive(&self, agent: &str, request: Value) -> Vec<Value> {
        let response = self.post(&format!("/v1/agents/{agent}/receive"), request);
        assert_eq!(response.status, 200, "{response:?}");
        response.json["messages"]
            .as_array()
            .expect("messages")
            .clone()
    }

    /// Settles receipts (`ack`, `nack` or `extend`); returns the statuses.
    pub fn settle(
        &self,
        agent: &str,
        verb: &str,
        mut body: Value,
        receipts: &[&str],
    ) -> Vec<String> {
        body["receipts"] = serde_json::json!(receipts);
        let response = self.post(&format!("/v1/agents/{agent}/{verb}"), body);
        assert_eq!(response.status, 200, "{response:?}");
        response.json["results"]
            .as_array()
            .expect("results")
            .iter()
            .map(|r| r["status"].as_str().expect("status").to_owned())
            .collect()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A response: status, headers (lowercase names), the body's JSON (Null if not JSON, or
/// nested deeper than serde_json's tree reader takes) and its text.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub json: Value,
    pub text: String,
}

impl Response {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The error code of an error response.
    pub fn code(&self) -> &str {
        self.json["error"]["code"].as_str().unwrap_or("")
    }
}

/// One HTTP/1.1 request on a new connection (`Connection: close`).
pub fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    content_type: Option<&str>,
    headers: &[(&str, &str)],
) -> std::io::Result<Response> {
    send_via(addr, None, method, path, body, content_type, headers)
}

/// [`send`], over TLS when `tls` is given.
pub fn send_via(
    addr: SocketAddr,
    tls: Option<&Arc<rustls::ClientConfig>>,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    content_type: Option<&str>,
    headers: &[(&str, &str)],
) -> std::io::Result<Response> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut stream: Box<dyn ReadWrite> = match tls {
        None => Box::new(tcp),
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
            let client = rustls::ClientConnection::new(config.clone(), name)
                .map_err(std::io::Error::other)?;
            Box::new(rustls::StreamOwned::new(client, tcp))
        }
    };
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let (Some(_), Some(ct)) = (body, content_type) {
        head.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\n\r\n",
        body.map_or(0, <[u8]>::len)
    ));
    stream.write_all(head.as_bytes())?;
    if let Some(body) = body {
        stream.write_all(body)?;
    }
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> std::io::Result<Response> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| bad("head not utf-8"))?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body).ok_or_else(|| bad("bad chunked body"))?;
    }
    let body = String::from_utf8(body).map_err(|_| bad("body not utf-8"))?;
    let json = serde_json::from_str(&body).unwrap_or(Value::Null);
    Ok(Response {
        status,
        headers,
        json,
        text: body,
    })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..line_end]).ok()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// A byte stream both ways: a TCP stream, or TLS over one.
pub trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Starts a POST with a JSON body on its own thread (a call that waits, to observe); join it
/// for the response and how long it took.
pub fn post_in_background(
    server: &TestServer,
    path: &str,
    body: &Value,
) -> std::thread::JoinHandle<(Response, Duration)> {
    let addr = server.addr;
    let path = path.to_owned();
    let bytes = serde_json::to_vec(body).expect("json");
    std::thread::spawn(move || {
        let start = Instant::now();
        let response = send(
            addr,
            "POST",
            &path,
            Some(&bytes),
            Some("application/json"),
            &[],
        )
        .expect("the call gets an answer");
        (response, start.elapsed())
    })
}

/// Starts a receive on its own thread (a long-poll to observe); join it for the response.
pub fn receive_in_background(
    server: &TestServer,
    agent: &str,
    body: &'static str,
) -> std::thread::JoinHandle<(Response, Duration)> {
    let body: Value = serde_json::from_str(body).expect("a JSON receive body");
    post_in_background(server, &format!("/v1/agents/{agent}/receive"), &body)
}

/// Polls `check` until it returns `Some`, or panics after `timeout` with `what`.
pub fn eventually<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Receipts of delivered messages.
pub fn receipts(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["receipt"].as_str().expect("receipt").to_owned())
        .collect()
}

/// Offsets of delivered messages.
pub fn offsets(messages: &[Value]) -> Vec<u64> {
    messages
        .iter()
        .map(|m| m["offset"].as_u64().expect("offset"))
        .collect()
}

/// splitmix64: the seeded tests' only source of randomness, so a seed replays exactly.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Epoch milliseconds of an RFC 3339 UTC time as the server writes it
/// (`2026-11-27T16:38:53.123Z`).
pub fn rfc3339_ms(text: &str) -> u64 {
    let number = |range: std::ops::Range<usize>| -> i64 {
        text.get(range)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an RFC 3339 time: {text}"))
    };
    assert!(
        text.len() == 24 && text.ends_with('Z'),
        "not an RFC 3339 time: {text}"
    );
    let (year, month, day) = (number(0..4), number(5..7), number(8..10));
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400 + number(11..13) * 3600 + number(14..16) * 60 + number(17..19);
    u64::try_from(seconds * 1000 + number(20..23)).expect("after 1970")
}

#[test]
fn rfc3339_ms_reads_the_servers_times() {
    assert_eq!(rfc3339_ms("1970-01-01T00:00:00.000Z"), 0);
    assert_eq!(rfc3339_ms("2000-02-29T00:00:00.000Z"), 951_782_400_000);
    assert_eq!(rfc3339_ms("2026-11-18T11:06:40.123Z"), 1_795_000_000_123);
}

/// The route templates of the router (`src/api/mod.rs`), as written there.
pub fn api_routes() -> Vec<String> {
    let api = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/api/mod.rs"))
        .expect("api/mod.rs");
    let routes: Vec<String> = api
        .split(".route(")
        .skip(1)
        .filter_map(|rest| rest.trim_start().strip_prefix('"')?.split('"').next())
        .map(str::to_owned)
        .collect();
    assert!(routes.len() >= 15, "routes not found: {routes:?}");
    routes
}
