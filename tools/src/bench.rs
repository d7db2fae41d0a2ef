//! `bench --server URL`: a load generator. Publishers send messages (singly or in batches)
//! to one agent while consumers receive, and ack, what they send; it reports throughput and
//! latency percentiles (hdrhistogram, microsecond resolution) of three things:
//!
//! - **publish**: one publish request, from send to its 2xx (a batch counts once);
//! - **delivery**: publish → delivery, from just before the publish request to the moment a
//!   consumer holds the message (the publisher's send time travels in the body);
//! - **ack**: one ack request, from send to its answer.
//!
//! Only this run's messages are counted (the body carries a run id), so an inbox with older
//! messages in it does not skew the figures; those are acked too.
#![allow(
    clippy::disallowed_methods,
    reason = "a benchmark measures time: monotonic for durations, wall-clock across threads"
)]

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{json, Value};

use crate::online::{Client, ServerArgs};
use crate::output::{self, usage, Outcome};

/// The load to generate (the `bench` command's flags).
#[derive(clap::Args)]
pub struct BenchOptions {
    /// The server, and with auth on the admin token (the bench registers its agent and
    /// publishes and receives as it).
    #[command(flatten)]
    pub server: ServerArgs,
    /// The agent to publish to (registered if missing).
    #[arg(long, default_value = "bench")]
    pub agent: String,
    /// Publishing threads, each with its own connection.
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// Consuming threads (receive up to 100, then ack them).
    #[arg(long, default_value_t = 2)]
    pub consumers: usize,
    /// Bytes of padding in each message body.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Messages per publish request (1: single publishes, else the batch endpoint).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Stop after this many messages (if sooner than --duration).
    #[arg(long)]
    pub count: Option<u64>,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// What the threads share.
struct Shared {
    run: String,
    /// Publishers stop (the duration is over).
    stop_publishing: AtomicBool,
    /// Publishers have stopped: consumers stop once they have everything.
    publishing_done: AtomicBool,
    /// Everything stops (an error, or the drain is over).
    halt: AtomicBool,
    published: AtomicU64,
    delivered: AtomicU64,
    acked: AtomicU64,
    publish: Mutex<Histogram<u64>>,
    delivery: Mutex<Histogram<u64>>,
    ack: Mutex<Histogram<u64>>,
    error: Mutex<Option<String>>,
}

impl Shared {
    fn fail(&self, error: String) {
        self.error.lock().expect("error lock").get_or_insert(error);
        self.halt.store(true, Ordering::Relaxed);
    }
}

/// One message's JSON, built by splicing numbers into a text made once: at tens of
/// thousands of requests a second, the load generator's own cost matters.
struct MessageText {
    head: String,
    tail: String,
}

impl MessageText {
    fn new(agent: &str, run: &str, pad: usize) -> Self {
        let to = serde_json::to_string(&format!("agent:{agent}")).expect("a string");
        Self {
            head: format!(
                r#"{{"to":{to},"from":"bench","body":{{"run":"{run}","pad":"{}","sent_us":"#,
                "x".repeat(pad)
            ),
            tail: "}}".to_owned(),
        }
    }

    fn write(&self, out: &mut String, sent_us: u64, i: u64) {
        use std::fmt::Write;
        out.push_str(&self.head);
        write!(out, r#"{sent_us},"i":{i}"#).expect("writing to a String");
        out.push_str(&self.tail);
    }
}

fn publisher(client: &Client, shared: &Shared, options: &BenchOptions) {
    let text = MessageText::new(&options.agent, &shared.run, options.size);
    let mut local = histogram();
    let limit = options.count.unwrap_or(u64::MAX);
    while !shared.stop_publishing.load(Ordering::Relaxed) && !shared.halt.load(Ordering::Relaxed) {
        let n = options.batch as u64;
        let before = shared.published.fetch_add(n, Ordering::Relaxed);
        if before >= limit {
            shared.published.fetch_sub(n, Ordering::Relaxed);
            break;
        }
        let take = n.min(limit - before);
        if take < n {
            shared.published.fetch_sub(n - take, Ordering::Relaxed);
        }
        let sent_us = wall_us();
        let mut body = String::with_capacity((text.head.len() + 40) * take as usize + 16);
        let path = if options.batch == 1 {
            text.write(&mut body, sent_us, before);
            "/v1/messages"
        } else {
            body.push_str(r#"{"messages":["#);
            for i in 0..take {
                if i > 0 {
                    body.push(',');
                }
                text.write(&mut body, sent_us, before + i);
            }
            body.push_str("]}");
            "/v1/messages/batch"
        };
        let started = Instant::now();
        if let Err(failure) = client.call_raw("POST", path, body) {
            shared.fail(format!("publish: {:#}", failure.error));
            break;
        }
        local.record(micros(started.elapsed())).expect("in range");
    }
    shared
        .publish
        .lock()
        .expect("histogram")
        .add(&local)
        .expect("same bounds");
}

fn consumer(client: &Client, shared: &Shared, agent: &str) {
    let mut delivery = histogram();
    let mut acks = histogram();
    let receive = format!("/v1/agents/{agent}/receive");
    let ack = format!("/v1/agents/{agent}/ack");
    loop {
        let done = shared.publishing_done.load(Ordering::Relaxed)
            && shared.delivered.load(Ordering::Relaxed) >= shared.published.load(Ordering::Relaxed);
        if done || shared.halt.load(Ordering::Relaxed) {
            break;
        }
        let got = match client.call("POST", &receive, Some(&json!({"max": 100, "wait_ms": 200}))) {
            Ok(got) => got,
            Err(failure) => return shared.fail(format!("receive: {:#}", failure.error)),
        };
        let now_us = wall_us();
        let messages = got["messages"].as_array().cloned().unwrap_or_default();
        if messages.is_empty() {
            continue;
        }
        let mut ours = 0;
        for m in &messages {
            if m["body"]["run"] == shared.run.as_str() {
                let sent = m["body"]["sent_us"].as_u64().unwrap_or(now_us);
                delivery
                    .record(now_us.saturating_sub(sent).max(1))
                    .expect("in range");
                ours += 1;
            }
        }
        let receipts: Vec<&Value> = messages.iter().map(|m| &m["receipt"]).collect();
        let started = Instant::now();
        if let Err(failure) = client.call("POST", &ack, Some(&json!({"receipts": receipts}))) {
            return shared.fail(format!("ack: {:#}", failure.error));
        }
        acks.record(micros(started.elapsed())).expect("in range");
        shared.delivered.fetch_add(ours, Ordering::Relaxed);
        shared
            .acked
            .fetch_add(messages.len() as u64, Ordering::Relaxed);
    }
    shared
        .delivery
        .lock()
        .expect("histogram")
        .add(&delivery)
        .expect("same bounds");
    shared
        .ack
        .lock()
        .expect("histogram")
        .add(&acks)
        .expect("same bounds");
}

#[derive(Serialize)]
struct Figures {
    count: u64,
    per_second: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
}

fn figures(h: &Histogram<u64>, count: u64, seconds: f64) -> Figures {
    let ms = |us: u64| us as f64 / 1000.0;
    Figures {
        count,
        per_second: if seconds > 0.0 {
            count as f64 / seconds
        } else {
            0.0
        },
        p50_ms: ms(h.value_at_quantile(0.5)),
        p90_ms: ms(h.value_at_quantile(0.9)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
    }
}

#[derive(Serialize)]
struct BenchReport {
    server: String,
    agent: String,
    publishers: usize,
    consumers: usize,
    size: usize,
    batch: usize,
    seconds: f64,
    /// Messages per second published (each request's messages count).
    messages_per_second: f64,
    publish: Figures,
    delivery: Figures,
    ack: Figures,
}

/// `bench --server URL`.
pub fn bench(options: &BenchOptions) -> Outcome {
    if options.publishers == 0 || options.consumers == 0 || options.batch == 0 {
        return Err(usage(
            "--publishers, --consumers and --batch must be at least 1".into(),
        ));
    }
    let setup = Client::new(&options.server)?;
    setup.call(
        "PUT",
        &format!("/v1/agents/{}", options.agent),
        Some(&json!({})),
    )?;
    let shared = Arc::new(Shared {
        run: format!("{:x}", wall_us()),
        stop_publishing: AtomicBool::new(false),
        publishing_done: AtomicBool::new(false),
        halt: AtomicBool::new(false),
        published: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        publish: Mutex::new(histogram()),
        delivery: Mutex::new(histogram()),
        ack: Mutex::new(histogram()),
        error: Mutex::new(None),
    });
    let bar = output::spinner("benchmarking");
    let started = Instant::now();
    let publish_seconds = std::thread::scope(|scope| -> Result<f64, output::Failure> {
        let mut publishers = Vec::new();
        for _ in 0..options.publishers {
            let client = Client::without_timeout(&options.server)?;
            let shared = &shared;
            publishers.push(scope.spawn(move || publisher(&client, shared, options)));
        }
        for _ in 0..options.consumers {
            let client = Client::without_timeout(&options.server)?;
            let shared = &shared;
            scope.spawn(move || consumer(&client, shared, &options.agent));
        }
        let deadline = started + Duration::from_secs_f64(options.duration.max(0.0));
        while Instant::now() < deadline && publishers.iter().any(|p| !p.is_finished()) {
            std::thread::sleep(Duration::from_millis(20));
            bar.set_message(format!(
                "published {}, delivered {}",
                shared.published.load(Ordering::Relaxed),
                shared.delivered.load(Ordering::Relaxed)
            ));
        }
        shared.stop_publishing.store(true, Ordering::Relaxed);
        for p in publishers {
            p.join().expect("publisher thread");
        }
        let seconds = started.elapsed().as_secs_f64();
        shared.publishing_done.store(true, Ordering::Relaxed);
        // The consumers drain what was published, for at most 30 s more.
        let drain = Instant::now() + Duration::from_secs(30);
        while Instant::now() < drain
            && shared.delivered.load(Ordering::Relaxed) < shared.published.load(Ordering::Relaxed)
            && shared.error.lock().expect("error lock").is_none()
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        shared.halt.store(true, Ordering::Relaxed);
        Ok(seconds)
    })?;
    bar.finish_and_clear();
    report(
        options,
        &shared,
        publish_seconds,
        started.elapsed().as_secs_f64(),
    )
}

fn report(
    options: &BenchOptions,
    shared: &Shared,
    publish_seconds: f64,
    all_seconds: f64,
) -> Outcome {
    if let Some(error) = shared.error.lock().expect("error lock").clone() {
        return Err(output::failed(anyhow::anyhow!(error)));
    }
    let published = shared.published.load(Ordering::Relaxed);
    let delivered = shared.delivered.load(Ordering::Relaxed);
    let publish = shared.publish.lock().expect("histogram").clone();
    let delivery = shared.delivery.lock().expect("histogram").clone();
    let ack = shared.ack.lock().expect("histogram").clone();
    let report = BenchReport {
        server: options.server.server.clone(),
        agent: options.agent.clone(),
        publishers: options.publishers,
        consumers: options.consumers,
        size: options.size,
        batch: options.batch,
        seconds: publish_seconds,
        messages_per_second: published as f64 / publish_seconds.max(f64::EPSILON),
        publish: figures(&publish, publish.len(), publish_seconds),
        delivery: figures(&delivery, delivered, all_seconds),
        ack: figures(&ack, ack.len(), all_seconds),
    };
    if options.json {
        output::json(&report);
    } else {
        println!(
            "{} publishers, {} consumers, {} B padding, batches of {}: {published} messages in {:.1} s = {:.0} msg/s",
            report.publishers, report.consumers, report.size, report.batch, report.seconds, report.messages_per_second
        );
        let row = |name: &str, f: &Figures| {
            vec![
                name.to_owned(),
                f.count.to_string(),
                format!("{:.0}", f.per_second),
                format!("{:.3}", f.p50_ms),
                format!("{:.3}", f.p90_ms),
                format!("{:.3}", f.p99_ms),
                format!("{:.3}", f.p999_ms),
                format!("{:.3}", f.max_ms),
            ]
        };
        output::table(
            &[
                "LATENCY", "COUNT", "PER_S", "P50_MS", "P90_MS", "P99_MS", "P99.9_MS", "MAX_MS",
            ],
            &[
                row("publish request", &report.publish),
                row("publish->delivery", &report.delivery),
                row("ack request", &report.ack),
            ],
        );
    }
    if delivered < published {
        eprintln!(
            "courierctl: only {delivered} of {published} messages were delivered within 30 s"
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
