//! Prometheus metrics (SPEC §8), served at `GET /metrics` in the text format.
//!
//! Two kinds of series. **Events** are counted as they happen, by the code that makes them
//! durable: the broker's commit primitive tallies the records of each write once it is
//! durable ([`Tally`]), the log's writer reports each fsync and group commit
//! ([`LogObserver`]), the API counts each answer by route template and status class. They are
//! process counters: they start at 0 when the server starts (as `courier_start_time_seconds`
//! says) and only go up while it runs; Prometheus's `rate()` and `increase()` handle the
//! reset. **State** (depths, log size, open long-polls) is read when scraped.
//!
//! Labels are bounded: route templates (never raw paths), methods, status classes, dead-letter
//! reasons, and inbox names only for the `metrics.max_agent_series` deepest inboxes (the rest
//! summed under `inbox="$other"`, so a `sum()` is still the whole).

use std::sync::Arc;
use std::time::Duration;

use courier_storage::{DeadReason, LogObserver, Record};
use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::delivery::Depth;

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// fsync durations: 50 µs to 1 s.
const FSYNC_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];
/// Publish → first delivery: 100 µs to 60 s.
const END_TO_END_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];
/// A publish, received to answered: 50 µs to 10 s.
const PUBLISH_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];
/// Records per group commit.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// The series the server counts as it works.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    published: IntCounter,
    deliveries: IntCounter,
    redeliveries: IntCounter,
    acks: IntCounter,
    nacks: IntCounter,
    lease_expiries: IntCounter,
    /// `courier_dead_letters_total` of each reason, in [`REASONS`] order.
    dead_letters: [IntCounter; 3],
    expired: IntCounter,
    publish_seconds: Histogram,
    end_to_end_seconds: Histogram,
    fsync_seconds: Histogram,
    commit_records: Histogram,
    http_requests: IntCounterVec,
    long_polls: IntGauge,
    start_time_seconds: f64,
}

/// What one durable write did, by the records it wrote (see [`Metrics::count`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    published: u64,
    delivered: u64,
    redelivered: u64,
    acked: u64,
    nacked: u64,
    lease_expired: u64,
    /// Dead letters by reason, in [`REASONS`] order.
    dead: [u64; 3],
}

/// What a write's `Leased` and `Released` records mean: both are written for more than one
/// reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writing {
    /// Leases are deliveries (a receive).
    Deliveries,
    /// Releases are nacks.
    Nacks,
    /// Releases are leases that ran out (the sweeper).
    Expiries,
    /// Anything else: leases are extensions, nothing released.
    Other,
}

impl Tally {
    /// The events in `records`, a write of kind `writing`.
    pub fn of(records: &[Record], writing: Writing) -> Self {
        let mut tally = Self::default();
        for record in records {
            match record {
                Record::Message(_) => tally.published += 1,
                Record::Leased { leases, .. } | Record::LeasedTo { leases, .. }
                    if writing == Writing::Deliveries =>
                {
                    tally.delivered += leases.len() as u64;
                    tally.redelivered += leases.iter().filter(|l| l.attempt > 1).count() as u64;
                }
                Record::Acked { slots, .. } => tally.acked += slots.len() as u64,
                Record::Released { releases, .. } => {
                    let released = releases.len() as u64;
                    match writing {
                        Writing::Nacks => tally.nacked += released,
                        Writing::Expiries => tally.lease_expired += released,
                        Writing::Deliveries | Writing::Other => {}
                    }
                }
                Record::DeadLettered { letters, .. } => {
                    for letter in letters {
                        tally.dead[reason_index(letter.reason)] += 1;
                        // A nack with `dead_letter: true` (the only `rejected` dead letters),
                        // or on the message's last attempt (`max_attempts`), is a nack too.
                        let nack = letter.reason == DeadReason::Rejected
                            || (writing == Writing::Nacks
                                && letter.reason == DeadReason::MaxAttempts);
                        tally.nacked += u64::from(nack);
                    }
                }
                _ => {}
            }
        }
        tally
    }

    /// Whether the write did nothing counted.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

const REASONS: [DeadReason; 3] = [
    DeadReason::MaxAttempts,
    DeadReason::Rejected,
    DeadReason::Expired,
];

fn reason_index(reason: DeadReason) -> usize {
    match reason {
        DeadReason::MaxAttempts => 0,
        DeadReason::Rejected => 1,
        DeadReason::Expired => 2,
    }
}

/// `metric`, registered in `registry` (each name once).
fn registered<M: Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("registered once");
    metric
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    registered(
        registry,
        IntCounter::new(name, help).expect("a valid counter"),
    )
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    registered(
        registry,
        Histogram::with_opts(opts).expect("a valid histogram"),
    )
}

impl Metrics {
    /// Every event series at zero; `start_time_seconds` is when the server started.
    pub fn new(start_time_seconds: f64) -> Self {
        let registry = Registry::new();
        let r = &registry;
        let dead_letters = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "courier_dead_letters_total",
                    "Messages moved to dead letters, by reason (max_attempts, rejected, expired).",
                ),
                &["reason"],
            )
            .expect("a valid counter"),
        );
        let http_requests = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "courier_http_requests_total",
                    "HTTP requests answered, by route template, method and status class.",
                ),
                &["route", "method", "status"],
            )
            .expect("a valid counter"),
        );
        let long_polls = registered(
            r,
            IntGauge::new(
                "courier_long_polls_open",
                "Receive calls in progress (long-polls waiting for messages, and calls being answered).",
            )
            .expect("a valid gauge"),
        );
        Self {
            published: counter(r, "courier_messages_published_total", "Messages published (each once, whatever the number of its destinations)."),
            deliveries: counter(r, "courier_deliveries_total", "Messages handed to a consumer under a lease, redeliveries included."),
            redeliveries: counter(r, "courier_redeliveries_total", "Deliveries of a message delivered before (attempt 2 or later)."),
            acks: counter(r, "courier_acks_total", "Messages acknowledged."),
            nacks: counter(r, "courier_nacks_total", "Messages nacked by a consumer (released to be delivered again, or dead-lettered: with dead_letter: true, or on their last attempt)."),
            lease_expiries: counter(r, "courier_lease_expirations_total", "Leases that ran out without an ack and were released for another delivery (one that runs out on the last attempt is a max_attempts dead letter instead)."),
            expired: counter(r, "courier_messages_expired_total", "Messages whose ttl_ms passed before they were acked (also counted in courier_dead_letters_total{reason=\"expired\"})."),
            dead_letters: REASONS.map(|reason| dead_letters.with_label_values(&[reason.as_str()])),
            publish_seconds: histogram(r, "courier_publish_duration_seconds", "Publishes (single and batch), from the decision to the durable answer.", PUBLISH_BUCKETS),
            end_to_end_seconds: histogram(r, "courier_end_to_end_latency_seconds", "From a message's publish to its first delivery (a redriven message's next delivery counts again, from its publish).", END_TO_END_BUCKETS),
            fsync_seconds: histogram(r, "courier_fsync_duration_seconds", "fdatasync calls of the log's segments.", FSYNC_BUCKETS),
            commit_records: histogram(r, "courier_group_commit_records", "Records made durable together by one group commit.", BATCH_BUCKETS),
            http_requests,
            long_polls,
            registry,
            start_time_seconds,
        }
    }

    /// Counts a durable write's events.
    pub fn count(&self, tally: &Tally) {
        self.published.inc_by(tally.published);
        self.deliveries.inc_by(tally.delivered);
        self.redeliveries.inc_by(tally.redelivered);
        self.acks.inc_by(tally.acked);
        self.nacks.inc_by(tally.nacked);
        self.lease_expiries.inc_by(tally.lease_expired);
        for (counter, n) in self.dead_letters.iter().zip(tally.dead) {
            counter.inc_by(n);
        }
        self.expired
            .inc_by(tally.dead[reason_index(DeadReason::Expired)]);
    }

    /// A publish took `seconds` from its decision to its durable answer.
    pub fn published_in(&self, seconds: f64) {
        self.publish_seconds.observe(seconds);
    }

    /// A message was delivered for the first time `seconds` after it was published.
    pub fn first_delivery_after(&self, seconds: f64) {
        self.end_to_end_seconds.observe(seconds);
    }

    /// An HTTP request was answered.
    pub fn answered(&self, route: &str, method: &str, status: u16) {
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.http_requests
            .with_label_values(&[route, method, class])
            .inc();
    }

    /// A long-poll starts waiting; it counts as open until the guard is dropped.
    pub fn long_poll(self: &Arc<Self>) -> LongPoll {
        self.long_polls.inc();
        LongPoll(self.clone())
    }

    /// The text exposition of every series: the counted ones and `state`'s.
    pub fn render(&self, state: &Scraped) -> String {
        let mut families = self.registry.gather();
        families.extend(state.families(self.start_time_seconds));
        // A family without series (no inbox yet) is not written at all.
        families.retain(|f| !f.get_metric().is_empty());
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut out)
            .expect("the text format of valid families");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl LogObserver for Metrics {
    fn synced(&self, took: Duration) {
        self.fsync_seconds.observe(took.as_secs_f64());
    }

    fn committed(&self, records: u64) {
        self.commit_records.observe(records as f64);
    }
}

/// An open long-poll (see [`Metrics::long_poll`]).
#[derive(Debug)]
pub struct LongPoll(Arc<Metrics>);

impl Drop for LongPoll {
    fn drop(&mut self) {
        self.0.long_polls.dec();
    }
}

/// The state read at a scrape.
#[derive(Debug, Default)]
pub struct Scraped {
    /// Whether the server is ready (`/readyz`).
    pub ready: bool,
    /// The offset after the last durable record.
    pub next_offset: u64,
    /// Bytes in the log's segments.
    pub log_bytes: u64,
    /// The log's segments.
    pub segments: u64,
    /// Records, group commits, fsyncs and bytes written since the start.
    pub records_written: u64,
    /// Group commits since the start.
    pub commits: u64,
    /// fsyncs since the start.
    pub fsyncs: u64,
    /// Bytes written to segments since the start.
    pub bytes_written: u64,
    /// Requests refused for a missing, malformed or unknown token (401).
    pub unauthenticated: u64,
    /// Requests refused for want of the right (403).
    pub forbidden: u64,
    /// Signed requests refused (401 `bad_signature`).
    pub bad_signatures: u64,
    /// Every inbox (agents' and capability queues') and its depth.
    pub inboxes: Vec<(Arc<str>, Depth)>,
    /// How many inboxes get series of their own.
    pub max_inbox_series: usize,
    /// What became of finished trace spans, when they are exported (feature `otel`).
    pub trace_spans: Option<SpanCounts>,
}

/// What became of finished trace spans since the start (see `telemetry::export`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SpanCounts {
    /// Accepted by the collector.
    pub exported: u64,
    /// Dropped: the export queue was full.
    pub queue_full: u64,
    /// Dropped: their export failed, timed out, or the collector rejected them.
    pub export_failed: u64,
}

impl SpanCounts {
    fn families(self) -> Vec<MetricFamily> {
        let mut all = total(
            "courier_trace_spans_exported_total",
            "Trace spans the OTLP collector accepted.",
            self.exported,
        );
        all.extend(by_reason(
            "courier_trace_spans_dropped_total",
            "Trace spans dropped, by reason: queue_full (the collector is slower than the server), export_failed (unreachable, failed, timed out or rejected).",
            &[
                ("queue_full", self.queue_full),
                ("export_failed", self.export_failed),
            ],
        ));
        all
    }
}

fn family(metric: &impl Collector) -> Vec<MetricFamily> {
    metric.collect()
}

fn gauge(name: &str, help: &str, value: i64) -> Vec<MetricFamily> {
    let gauge = IntGauge::new(name, help).expect("a valid gauge");
    gauge.set(value);
    family(&gauge)
}

fn total(name: &str, help: &str, value: u64) -> Vec<MetricFamily> {
    let counter = IntCounter::new(name, help).expect("a valid counter");
    counter.inc_by(value);
    family(&counter)
}

/// A counter with one series per `reason`.
fn by_reason(name: &str, help: &str, counts: &[(&str, u64)]) -> Vec<MetricFamily> {
    let counter = IntCounterVec::new(Opts::new(name, help), &["reason"]).expect("a valid counter");
    for (reason, n) in counts {
        counter.with_label_values(&[*reason]).inc_by(*n);
    }
    family(&counter)
}

fn signed(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Scraped {
    fn families(&self, start_time_seconds: f64) -> Vec<MetricFamily> {
        let mut all = Vec::new();
        all.extend(gauge(
            "courier_ready",
            "1 when the server is ready (recovered, log writable), else 0.",
            i64::from(self.ready),
        ));
        let start = prometheus::Gauge::new("courier_start_time_seconds", "When this server process started (Unix seconds): the process counters count from here.")
            .expect("a valid gauge");
        start.set(start_time_seconds);
        all.extend(family(&start));
        all.extend(gauge(
            "courier_log_next_offset",
            "The offset the next record gets.",
            signed(self.next_offset),
        ));
        all.extend(gauge(
            "courier_log_bytes",
            "Bytes in the log's segments.",
            signed(self.log_bytes),
        ));
        all.extend(gauge(
            "courier_log_segments",
            "Segments of the log.",
            signed(self.segments),
        ));
        all.extend(total(
            "courier_log_records_written_total",
            "Records written to the log.",
            self.records_written,
        ));
        all.extend(total(
            "courier_log_commits_total",
            "Group commits of the log.",
            self.commits,
        ));
        all.extend(total(
            "courier_log_fsyncs_total",
            "fdatasync calls of the log's segments.",
            self.fsyncs,
        ));
        all.extend(total(
            "courier_log_written_bytes_total",
            "Bytes written to the log's segments.",
            self.bytes_written,
        ));
        all.extend(by_reason(
            "courier_auth_failures_total",
            "Requests refused by authentication or authorization, by reason (unauthenticated, forbidden, bad_signature).",
            &[
                ("unauthenticated", self.unauthenticated),
                ("forbidden", self.forbidden),
                ("bad_signature", self.bad_signatures),
            ],
        ));
        if let Some(spans) = self.trace_spans {
            all.extend(spans.families());
        }
        all.extend(self.depths());
        all
    }

    /// Ready, in-flight and dead-letter depth per inbox: the deepest ones by name, the rest
    /// summed under `$other`.
    fn depths(&self) -> Vec<MetricFamily> {
        let vec = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), &["inbox"]).expect("a valid gauge")
        };
        let ready = vec(
            "courier_inbox_ready_messages",
            "Messages pending and not leased (delayed ones included), by inbox.",
        );
        let in_flight = vec(
            "courier_inbox_in_flight_messages",
            "Messages leased and not yet acked, by inbox.",
        );
        let dead = vec("courier_inbox_dead_letters", "Dead letters kept, by inbox.");
        let mut inboxes: Vec<&(Arc<str>, Depth)> = self.inboxes.iter().collect();
        inboxes.sort_by_key(|(name, d)| {
            (
                std::cmp::Reverse(d.ready + d.in_flight + d.dead_letters),
                name.clone(),
            )
        });
        let mut other = Depth::default();
        for (i, (name, depth)) in inboxes.into_iter().enumerate() {
            if i < self.max_inbox_series {
                ready.with_label_values(&[name]).set(signed(depth.ready));
                in_flight
                    .with_label_values(&[name])
                    .set(signed(depth.in_flight));
                dead.with_label_values(&[name])
                    .set(signed(depth.dead_letters));
            } else {
                other.ready += depth.ready;
                other.in_flight += depth.in_flight;
                other.dead_letters += depth.dead_letters;
            }
        }
        if self.inboxes.len() > self.max_inbox_series {
            ready
                .with_label_values(&["$other"])
                .set(signed(other.ready));
            in_flight
                .with_label_values(&["$other"])
                .set(signed(other.in_flight));
            dead.with_label_values(&["$other"])
                .set(signed(other.dead_letters));
        }
        let mut all = family(&ready);
        all.extend(family(&in_flight));
        all.extend(family(&dead));
        all
    }
}
