//! Load driver for a running `courier` server (not a criterion benchmark: it measures the
//! server over HTTP, and `benches/run.sh` runs it next to wrk, axum's hello-world and Redis).
//!
//! ```text
//! cargo bench --bench load -- fill    URL AGENT COUNT [BATCH] [THREADS]  publish 1 KiB messages in batches
//! cargo bench --bench load -- drain   URL AGENT COUNT [CONSUMERS]        receive (max 100) + ack until COUNT acked
//! cargo bench --bench load -- latency URL AGENT RATE SECONDS [ACKS]      publish → delivery at a steady rate
//! cargo bench --bench load -- fanout  URL TOPIC COUNT [SUBSCRIBERS]      1 KiB to a topic, every subscriber drains
//! cargo bench --bench load -- qdrain  URL CAPABILITY COUNT [AGENTS]      AGENTS capable agents drain its queue
//! cargo bench --bench load -- request URL CAPABILITY RATE SECONDS [WORKERS] request → worker → reply round trips
//! ```
//!
//! `fill`'s AGENT may also be a whole address (`capability:work`), to fill a queue.
//!
//! `ACKS` is `pipelined` (the default: a second connection acks while the consumer is back in
//! its long-poll, as a consumer that cares for latency does) or `sequential` (ack, then
//! receive again).
//!
//! Every loop is bounded by its count or its duration; figures are printed, never asserted.
#![allow(clippy::disallowed_methods, reason = "a load driver measures time")]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    reader: BufReader<TcpStream>,
    host: String,
}

impl Conn {
    fn open(url: &str) -> Self {
        let host = url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let stream = TcpStream::connect(&host).unwrap_or_else(|e| panic!("connect {host}: {e}"));
        stream.set_nodelay(true).expect("nodelay");
        Self {
            reader: BufReader::new(stream),
            host,
        }
    }

    fn post(&mut self, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        self.send("POST", path, body)
    }

    fn send(&mut self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        let stream = self.reader.get_mut();
        stream.write_all(head.as_bytes()).expect("write");
        stream.write_all(body).expect("write");
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("status line");
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        let mut length = 0usize;
        loop {
            line.clear();
            self.reader.read_line(&mut line).expect("header");
            let trimmed = line.trim_end();
            if trimmed.is_empty() {
                break;
            }
            if let Some((name, value)) = trimmed.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().expect("content-length");
                }
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).expect("body");
        (status, body)
    }
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: Option<T>) -> T {
    args.get(i)
        .and_then(|s| s.parse().ok())
        .or(default)
        .unwrap_or_else(|| {
            panic!("argument {i} missing or invalid; see the usage in benches/load.rs")
        })
}

/// A message to `agent:<agent>`, or to `agent` itself if it is an address (has a `:`).
fn message(agent: &str, body: &str) -> String {
    let to = if agent.contains(':') {
        agent.to_owned()
    } else {
        format!("agent:{agent}")
    };
    format!(r#"{{"to":"{to}","from":"loadgen","body":{body}}}"#)
}

fn pad() -> String {
    "x".repeat(1000)
}

fn fill(url: &str, agent: &str, count: u64, batch: u64, threads: u64) {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (url, agent, next) = (url.to_owned(), agent.to_owned(), next.clone());
            std::thread::spawn(move || {
                let mut conn = Conn::open(&url);
                let pad = pad();
                loop {
                    let first = next.fetch_add(batch, Ordering::Relaxed);
                    if first >= count {
                        return;
                    }
                    let n = batch.min(count - first);
                    let messages: Vec<String> = (first..first + n)
                        .map(|i| message(&agent, &format!(r#"{{"n":{i},"pad":"{pad}"}}"#)))
                        .collect();
                    let body = format!(r#"{{"messages":[{}]}}"#, messages.join(","));
                    let (status, reply) = conn.post("/v1/messages/batch", body.as_bytes());
                    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&reply));
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("publisher");
    }
    let secs = start.elapsed().as_secs_f64();
    println!("fill: {count} messages in {secs:.2} s = {:.0} msg/s (batches of {batch}, {threads} connections)", count as f64 / secs);
}

/// One long-poll receive (max 100, up to 1 s) of `agent` and the ack of what came; how many.
fn receive_and_ack(conn: &mut Conn, agent: &str) -> u64 {
    let (status, body) = conn.post(
        &format!("/v1/agents/{agent}/receive"),
        br#"{"max": 100, "wait_ms": 1000}"#,
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let reply: serde_json::Value = serde_json::from_slice(&body).expect("json");
    let receipts: Vec<&str> = reply["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["receipt"].as_str())
        .collect();
    if !receipts.is_empty() {
        ack(conn, agent, &receipts);
    }
    receipts.len() as u64
}

/// `consumers` consumers of `agent` drain it; see [`drain_as`].
fn drain(url: &str, agent: &str, count: u64, consumers: u64) {
    let agents = vec![agent.to_owned(); consumers as usize];
    drain_as(url, &agents, count, "drain");
}

/// One consumer per entry of `agents` (repeats allowed) receives (max 100) and acks until
/// `count` messages were acked in all.
fn drain_as(url: &str, agents: &[String], count: u64, label: &str) {
    let consumers = agents.len();
    let acked = Arc::new(AtomicU64::new(0));
    // When the last ack was answered: the consumers still in a long-poll then (the inbox is
    // empty) only return after their `wait_ms`, which is no part of the drain.
    let finished: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(600);
    let workers: Vec<_> = agents
        .iter()
        .map(|agent| {
            let (url, agent, acked) = (url.to_owned(), agent.clone(), acked.clone());
            let finished = finished.clone();
            std::thread::spawn(move || {
                let mut conn = Conn::open(&url);
                while acked.load(Ordering::Relaxed) < count && Instant::now() < deadline {
                    let n = receive_and_ack(&mut conn, &agent);
                    if n == 0 {
                        continue;
                    }
                    let before = acked.fetch_add(n, Ordering::Relaxed);
                    if before < count && before + n >= count {
                        *finished.lock().expect("finished") = Some(Instant::now());
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("consumer");
    }
    let end = finished
        .lock()
        .expect("finished")
        .unwrap_or_else(Instant::now);
    let secs = end.duration_since(start).as_secs_f64();
    let n = acked.load(Ordering::Relaxed);
    println!("{label}: {n} messages received and acked in {secs:.2} s = {:.0} msg/s ({consumers} consumers, max 100)", n as f64 / secs);
}

/// Registers `agent` with `capabilities` (a JSON array).
fn register(conn: &mut Conn, agent: &str, capabilities: &str) {
    let body = format!(r#"{{"capabilities":{capabilities}}}"#);
    let (status, reply) = conn.send("PUT", &format!("/v1/agents/{agent}"), body.as_bytes());
    assert!(
        status == 200 || status == 201,
        "{}",
        String::from_utf8_lossy(&reply)
    );
}

/// A capability queue drained by `agents` competing agents that declare it, one consumer
/// each, receiving and acking until `count` messages were acked in all.
fn qdrain(url: &str, capability: &str, count: u64, agents: u64) {
    let mut conn = Conn::open(url);
    let names: Vec<String> = (0..agents).map(|i| format!("{capability}-{i}")).collect();
    for name in &names {
        register(&mut conn, name, &format!(r#"["{capability}"]"#));
    }
    drain_as(url, &names, count, "qdrain");
}

/// Request/reply round trips at a steady `rate` for `seconds`: requests to
/// `capability:<capability>` from 8 requester connections (each waits for its reply), and
/// `workers` competing agents that take one request at a time, publish its reply without `to`
/// and ack it on a second connection. Prints the call's latency (request sent → reply
/// answered).
fn request(url: &str, capability: &str, rate: u64, seconds: u64, workers: u64) {
    let mut conn = Conn::open(url);
    register(&mut conn, "asker", "[]");
    let names: Vec<String> = (0..workers).map(|i| format!("answer-{i}")).collect();
    for name in &names {
        register(&mut conn, name, &format!(r#"["{capability}"]"#));
    }
    let total = rate * seconds;
    let base = Instant::now();
    let stop = base + Duration::from_secs(seconds + 10);
    let answered = Arc::new(AtomicU64::new(0));
    let answerers: Vec<_> = names
        .into_iter()
        .map(|name| {
            let (url, answered) = (url.to_owned(), answered.clone());
            std::thread::spawn(move || answer(&url, &name, total, stop, &answered))
        })
        .collect();
    let next = Arc::new(AtomicU64::new(0));
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let (url, capability, next) = (url.to_owned(), capability.to_owned(), next.clone());
            std::thread::spawn(move || {
                let mut conn = Conn::open(&url);
                let body = format!(
                    r#"{{"to":"capability:{capability}","from":"asker","body":{{"pad":"{}"}}}}"#,
                    "x".repeat(200)
                );
                let mut latencies = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return latencies;
                    }
                    let due = base + interval * i as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let sent = Instant::now();
                    let (status, reply) =
                        conn.post("/v1/requests?timeout_ms=10000", body.as_bytes());
                    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&reply));
                    latencies.push(sent.elapsed().as_micros() as u64);
                }
            })
        })
        .collect();
    let mut latencies: Vec<u64> = callers
        .into_iter()
        .flat_map(|c| c.join().expect("caller"))
        .collect();
    for a in answerers {
        a.join().expect("answerer");
    }
    latencies.sort_unstable();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "request/reply at {rate} req/s for {seconds} s, {workers} workers ({} calls): p50 {} µs, p99 {} µs, max {} µs",
        latencies.len(),
        pct(0.50),
        pct(0.99),
        latencies.last().copied().unwrap_or(0)
    );
}

/// A worker of [`request`]: takes one request at a time, publishes its reply and hands the
/// ack to a second connection (as a worker that cares for its callers' latency does).
fn answer(url: &str, agent: &str, total: u64, stop: Instant, answered: &AtomicU64) {
    let (receipts_tx, receipts_rx) = std::sync::mpsc::channel();
    let acker = spawn_acker(url, agent, receipts_rx);
    let mut conn = Conn::open(url);
    while answered.load(Ordering::Relaxed) < total && Instant::now() < stop {
        let (status, body) = conn.post(
            &format!("/v1/agents/{agent}/receive"),
            br#"{"max": 1, "wait_ms": 200}"#,
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let reply: serde_json::Value = serde_json::from_slice(&body).expect("json");
        let messages = reply["messages"].as_array().expect("messages");
        let mut receipts = Vec::new();
        for m in messages {
            let id = m["id"].as_str().expect("id");
            let body = format!(r#"{{"from":"{agent}","in_reply_to":"{id}","body":"done"}}"#);
            let (status, reply) = conn.post("/v1/messages", body.as_bytes());
            assert_eq!(status, 201, "{}", String::from_utf8_lossy(&reply));
            receipts.push(m["receipt"].as_str().expect("receipt").to_owned());
        }
        if !receipts.is_empty() {
            answered.fetch_add(receipts.len() as u64, Ordering::Relaxed);
            receipts_tx.send(receipts).expect("acker");
        }
    }
    drop(receipts_tx);
    acker.join().expect("acker");
}

/// How the latency scenario's consumer acks what it received.
#[derive(Clone, Copy)]
enum Acks {
    /// Ack, then receive again: the next message waits for the ack's fsync.
    Sequential,
    /// A second connection acks while the first one is already back in its long-poll.
    Pipelined,
}

/// Acks every batch of receipts sent to it on its own connection, joining what queued up.
fn spawn_acker(
    url: &str,
    agent: &str,
    receipts: std::sync::mpsc::Receiver<Vec<String>>,
) -> std::thread::JoinHandle<()> {
    let (url, agent) = (url.to_owned(), agent.to_owned());
    std::thread::spawn(move || {
        let mut conn = Conn::open(&url);
        while let Ok(mut batch) = receipts.recv() {
            batch.extend(receipts.try_iter().flatten());
            ack(&mut conn, &agent, &batch);
        }
    })
}

/// Acks `receipts` (strings) and checks the answer.
fn ack(conn: &mut Conn, agent: &str, receipts: &[impl serde::Serialize]) {
    let body = serde_json::json!({ "receipts": receipts }).to_string();
    let (status, reply) = conn.post(&format!("/v1/agents/{agent}/ack"), body.as_bytes());
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&reply));
}

/// Receives until `total` messages came (or `stop`), returning each one's latency since the
/// `t` its publisher wrote into it (µs since `base`).
fn spawn_consumer(
    url: &str,
    agent: &str,
    (base, stop, total): (Instant, Instant, u64),
    acks: Acks,
    acker: std::sync::mpsc::Sender<Vec<String>>,
) -> std::thread::JoinHandle<Vec<u64>> {
    let (url, agent) = (url.to_owned(), agent.to_owned());
    std::thread::spawn(move || {
        let mut conn = Conn::open(&url);
        let mut latencies_us = Vec::with_capacity(total as usize);
        while (latencies_us.len() as u64) < total && Instant::now() < stop {
            let (_, body) = conn.post(
                &format!("/v1/agents/{agent}/receive"),
                br#"{"max": 100, "wait_ms": 1000}"#,
            );
            let now = base.elapsed().as_micros() as u64;
            let reply: serde_json::Value = serde_json::from_slice(&body).expect("json");
            let messages = reply["messages"].as_array().expect("messages");
            let mut receipts = Vec::new();
            for m in messages {
                latencies_us.push(now - m["body"]["t"].as_u64().expect("t"));
                receipts.push(m["receipt"].as_str().expect("receipt").to_owned());
            }
            if receipts.is_empty() {
                continue;
            }
            match acks {
                Acks::Sequential => ack(&mut conn, &agent, &receipts),
                Acks::Pipelined => acker.send(receipts).expect("acker"),
            }
        }
        latencies_us
    })
}

fn latency(url: &str, agent: &str, rate: u64, seconds: u64, acks: Acks) {
    let base = Instant::now();
    let total = rate * seconds;
    let (receipts_tx, receipts_rx) = std::sync::mpsc::channel();
    let acker = spawn_acker(url, agent, receipts_rx);
    let stop = base + Duration::from_secs(seconds + 10);
    let consumer = spawn_consumer(url, agent, (base, stop, total), acks, receipts_tx);
    let mut conn = Conn::open(url);
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut acks_us = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = base + interval * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let t = base.elapsed().as_micros() as u64;
        let body = message(
            agent,
            &format!(r#"{{"t":{t},"pad":"{}"}}"#, "x".repeat(900)),
        );
        let (status, reply) = conn.post("/v1/messages", body.as_bytes());
        assert_eq!(status, 201, "{}", String::from_utf8_lossy(&reply));
        acks_us.push(base.elapsed().as_micros() as u64 - t);
    }
    let latencies = consumer.join().expect("consumer");
    acker.join().expect("acker");
    let mode = match acks {
        Acks::Sequential => "sequential acks",
        Acks::Pipelined => "pipelined acks",
    };
    for (what, mut figures) in [("publish→delivery", latencies), ("publish→201", acks_us)] {
        figures.sort_unstable();
        let pct = |p: f64| figures[((figures.len() as f64 * p) as usize).min(figures.len() - 1)];
        println!(
            "latency {what} at {rate} msg/s for {seconds} s, {mode} ({} messages): p50 {} µs, p99 {} µs, max {} µs",
            figures.len(),
            pct(0.50),
            pct(0.99),
            figures.last().copied().unwrap_or(0)
        );
    }
}

/// The log's `bytes_written` from `/v1/stats`.
fn bytes_written(conn: &mut Conn) -> u64 {
    let (status, body) = conn.send("GET", "/v1/stats", b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let stats: serde_json::Value = serde_json::from_slice(&body).expect("json");
    stats["log"]["bytes_written"]
        .as_u64()
        .expect("bytes_written")
}

/// Fan-out: `subscribers` agents subscribe to `topic`; `count` 1 KiB messages are published
/// to it one by one on 8 connections; then every subscriber drains its copies (one consumer
/// each). Prints the publish rate, the log bytes written per message (one record, however
/// many subscribers) and the deliveries per second of the drain.
fn fanout(url: &str, topic: &str, count: u64, subscribers: u64) {
    let mut conn = Conn::open(url);
    let agents: Vec<String> = (0..subscribers).map(|i| format!("fan-{i}")).collect();
    for agent in &agents {
        let (status, body) = conn.send("PUT", &format!("/v1/agents/{agent}"), b"{}");
        assert!(
            status == 200 || status == 201,
            "{}",
            String::from_utf8_lossy(&body)
        );
        let path = format!("/v1/agents/{agent}/subscriptions/{topic}");
        let (status, body) = conn.send("PUT", &path, b"{}");
        assert!(
            status == 200 || status == 201,
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
    let before = bytes_written(&mut conn);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let publishers: Vec<_> = (0..8)
        .map(|_| {
            let (url, topic, next) = (url.to_owned(), topic.to_owned(), next.clone());
            std::thread::spawn(move || {
                let mut conn = Conn::open(&url);
                let pad = pad();
                while next.fetch_add(1, Ordering::Relaxed) < count {
                    let body = format!(
                        r#"{{"to":"topic:{topic}","from":"loadgen","body":{{"pad":"{pad}"}}}}"#
                    );
                    let (status, reply) = conn.post("/v1/messages", body.as_bytes());
                    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&reply));
                }
            })
        })
        .collect();
    for p in publishers {
        p.join().expect("publisher");
    }
    let secs = start.elapsed().as_secs_f64();
    let bytes = bytes_written(&mut conn) - before;
    println!(
        "fanout publish: {count} messages to {subscribers} subscribers in {secs:.2} s = {:.0} msg/s; {:.0} log bytes per message",
        count as f64 / secs,
        bytes as f64 / count as f64
    );
    drain_each(url, agents, count, subscribers);
}

/// One consumer per agent receives (max 100) and acks until it has `count`.
fn drain_each(url: &str, agents: Vec<String>, count: u64, subscribers: u64) {
    let start = Instant::now();
    let consumers: Vec<_> = agents
        .into_iter()
        .map(|agent| {
            let url = url.to_owned();
            std::thread::spawn(move || {
                let mut conn = Conn::open(&url);
                let deadline = Instant::now() + Duration::from_secs(600);
                let mut acked = 0;
                while acked < count && Instant::now() < deadline {
                    acked += receive_and_ack(&mut conn, &agent);
                }
                acked
            })
        })
        .collect();
    let delivered: u64 = consumers
        .into_iter()
        .map(|c| c.join().expect("consumer"))
        .sum();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "fanout drain: {delivered} deliveries received and acked in {secs:.2} s = {:.0} deliveries/s ({subscribers} consumers, max 100)",
        delivered as f64 / secs
    );
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let Some(scenario) = args.first() else {
        eprintln!("usage: see the top of benches/load.rs");
        return;
    };
    let url: String = arg(&args, 1, None);
    let agent: String = arg(&args, 2, None);
    match scenario.as_str() {
        "fill" => fill(
            &url,
            &agent,
            arg(&args, 3, None),
            arg(&args, 4, Some(100)),
            arg(&args, 5, Some(8)),
        ),
        "drain" => drain(&url, &agent, arg(&args, 3, None), arg(&args, 4, Some(8))),
        "latency" => latency(
            &url,
            &agent,
            arg(&args, 3, Some(1000)),
            arg(&args, 4, Some(10)),
            match arg::<String>(&args, 5, Some("pipelined".to_owned())).as_str() {
                "sequential" => Acks::Sequential,
                "pipelined" => Acks::Pipelined,
                other => panic!("ACKS is sequential or pipelined, not {other:?}"),
            },
        ),
        "fanout" => fanout(
            &url,
            &agent,
            arg(&args, 3, Some(10_000)),
            arg(&args, 4, Some(100)),
        ),
        "qdrain" => qdrain(&url, &agent, arg(&args, 3, None), arg(&args, 4, Some(8))),
        "request" => request(
            &url,
            &agent,
            arg(&args, 3, Some(500)),
            arg(&args, 4, Some(10)),
            arg(&args, 5, Some(4)),
        ),
        other => eprintln!("unknown scenario {other:?}; see benches/load.rs"),
    }
}
