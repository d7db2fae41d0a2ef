//! Span export over OTLP/HTTP in protobuf (feature `otel`, config `otel.endpoint`).
//!
//! A span ([`super::spans`]) is recorded as an [`Open`]. When it ends, the thread that ends
//! it encodes it ([`super::otlp`]) into a bounded queue, waiting
//! for nothing but the queue's lock and waking nobody unless it completes a batch. One
//! thread, [`run`], takes the whole batches of [`BATCH_SPANS`] spans the queue holds (or all
//! of it, when [`BATCH_DELAY`] passed without a full batch or a flush is asked for), wraps them
//! into `ExportTraceServiceRequest`s of at most [`BATCH_SPANS`] spans and POSTs them to
//! `<otel.endpoint>/v1/traces`. A collector that is down or slow therefore never delays or
//! fails a request: its batches fail (or time out, a step at a time, after
//! [`EXPORT_TIMEOUT`]) on that thread, the queue fills, and what cannot be queued or sent is
//! dropped and counted ([`ExportCounts`], `courier_trace_spans_dropped_total`).

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
use prost::Message;

use super::context::{SpanId, TraceId};
use super::otlp::{Name, Record, Value};
use super::spans::{Context, Kind};
use crate::clock::{unix_nanos, Clock};

/// Finished spans waiting for the exporter; past this, new ones are dropped (and counted).
pub const QUEUE_SPANS: usize = 8192;
/// Most spans in one export request.
pub const BATCH_SPANS: usize = 2048;
/// Longest the export thread waits for a batch to fill before it sends what is queued (a span
/// left over from a full batch taken while an export ran may wait for that export too).
pub const BATCH_DELAY: Duration = Duration::from_secs(1);
/// Longest one step of an export request (resolving a host name, connecting, sending,
/// waiting for the answer, reading it) may take before its batch counts as dropped.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Least time between two warnings about failing exports.
const WARN_EVERY_MS: u64 = 60_000;

/// What became of finished spans since the start.
#[derive(Debug, Default)]
pub struct ExportCounts {
    /// Accepted by the collector.
    pub exported: AtomicU64,
    /// Dropped because the queue was full (the collector is slower than the server).
    pub queue_full: AtomicU64,
    /// Dropped because their export failed, timed out or the collector rejected them.
    pub export_failed: AtomicU64,
}

/// The process's span exporter: spans are recorded from anywhere in the server (the request
/// path and the tasks it spawns), like the global `tracing` subscriber they sit beside.
static EXPORTER: OnceLock<Exporter> = OnceLock::new();

/// The exporter, once started.
pub fn exporter() -> Option<&'static Exporter> {
    EXPORTER.get()
}

/// The exporter's counts, if spans are being exported.
pub fn counts() -> Option<&'static ExportCounts> {
    EXPORTER.get().map(|exporter| &exporter.counts)
}

/// The queue of encoded spans and what became of them.
#[derive(Debug, Default)]
pub struct Exporter {
    queue: Queue,
    counts: ExportCounts,
}

/// Starts the export thread (once per process).
///
/// # Errors
/// The thread could not be started, or an exporter runs already.
pub fn start(endpoint: &str) -> std::io::Result<()> {
    let url = traces_url(endpoint);
    if EXPORTER.set(Exporter::default()).is_err() {
        return Err(std::io::Error::other("the span exporter runs already"));
    }
    let exporter = EXPORTER.get().expect("set above");
    std::thread::Builder::new()
        .name("courier-otlp".into())
        .spawn(move || run(exporter, &url))?;
    Ok(())
}

/// Whether `url`'s host is a name (to be resolved), not an IP address.
fn names_a_host(url: &str) -> bool {
    let host = url
        .parse::<axum::http::Uri>()
        .ok()
        .and_then(|uri| uri.host().map(str::to_owned));
    host.is_none_or(|host| {
        host.trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_err()
    })
}

/// `<endpoint>/v1/traces`, unless the endpoint names that path already.
fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    }
}

impl Exporter {
    /// Waits up to `timeout` for the spans queued so far to be exported (or dropped).
    pub fn flush(&self, timeout: Duration) {
        let queue = &self.queue;
        let mut queued = queue.lock();
        queued.flushes_asked += 1;
        let asked = queued.flushes_asked;
        queue.ready.notify_one();
        let _ = queue
            .served
            .wait_timeout_while(queued, timeout, |q| q.flushes_served < asked);
    }
}

/// Encoded spans between the threads that end them and the export thread: a buffer under a
/// mutex, which the export thread takes a whole batch at a time (or all of it).
#[derive(Debug, Default)]
struct Queue {
    state: Mutex<Queued>,
    /// The export thread waits here for a full batch or a flush request.
    ready: Condvar,
    /// Flushers wait here for their request to be served.
    served: Condvar,
}

#[derive(Debug, Default)]
struct Queued {
    /// Each span as field 2 (`spans`) of a `ScopeSpans`: key, length, message.
    bytes: Vec<u8>,
    /// Where each span ends in `bytes`.
    ends: Vec<usize>,
    /// Flush requests made, and served (the thread exported what was queued before them).
    flushes_asked: u64,
    flushes_served: u64,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Queued> {
        // Nothing is left half-changed under this lock: a panic cannot break what it holds.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `span`, or counts it as dropped when the queue is full.
    fn push(&self, span: &Record, counts: &ExportCounts) {
        let mut queued = self.lock();
        if queued.ends.len() >= QUEUE_SPANS {
            drop(queued);
            counts.queue_full.fetch_add(1, Ordering::Relaxed);
            return;
        }
        span.encode_as_field(2, &mut queued.bytes);
        let end = queued.bytes.len();
        queued.ends.push(end);
        if queued.ends.len() == BATCH_SPANS {
            self.ready.notify_one();
        }
    }

    /// Waits up to [`BATCH_DELAY`] for a full batch or a flush request, then swaps what is
    /// queued into `taken` (empty); the flush requests that this serves. Woken by full
    /// batches, it takes only whole ones: the rest waits for its own batch to fill (or its
    /// delay to pass) instead of going out as a small request of its own.
    fn take(&self, taken: &mut Queued) -> u64 {
        let queued = self.lock();
        let (mut queued, waited) = self
            .ready
            .wait_timeout_while(queued, BATCH_DELAY, |q| {
                q.ends.len() < BATCH_SPANS && q.flushes_asked == q.flushes_served
            })
            .unwrap_or_else(PoisonError::into_inner);
        std::mem::swap(&mut queued.bytes, &mut taken.bytes);
        std::mem::swap(&mut queued.ends, &mut taken.ends);
        let whole = taken.ends.len() - taken.ends.len() % BATCH_SPANS;
        let flushing = queued.flushes_asked != queued.flushes_served;
        if !waited.timed_out() && !flushing && whole > 0 && whole < taken.ends.len() {
            let cut = taken.ends[whole - 1];
            queued.bytes.extend_from_slice(&taken.bytes[cut..]);
            queued
                .ends
                .extend(taken.ends[whole..].iter().map(|end| end - cut));
            taken.bytes.truncate(cut);
            taken.ends.truncate(whole);
        }
        queued.flushes_asked
    }

    /// Says that the flush requests up to `asked` are served.
    fn served(&self, asked: u64) {
        let mut queued = self.lock();
        if queued.flushes_served < asked {
            queued.flushes_served = asked;
            self.served.notify_all();
        }
    }
}

/// A span while it is recorded; encoded into the queue when dropped (unless discarded).
#[derive(Debug)]
pub struct Open {
    record: Record,
    discarded: bool,
}

impl Exporter {
    /// Starts a span `name` in `trace_id`; `parent` is the parent's id and whether it is
    /// remote (the caller's, from a `traceparent`); `link` another span it relates to.
    pub fn open(
        &'static self,
        name: Name,
        kind: Kind,
        trace_id: TraceId,
        parent: Option<(SpanId, bool)>,
        link: Option<Context>,
    ) -> Open {
        Open {
            record: Record {
                context: Context {
                    trace_id,
                    span_id: SpanId::random(),
                },
                parent,
                link,
                name,
                kind,
                start_ns: unix_nanos(),
                end_ns: 0,
                attributes: Vec::with_capacity(4),
                error: None,
            },
            discarded: false,
        }
    }
}

impl Open {
    /// Where it sits.
    pub fn context(&self) -> Context {
        self.record.context
    }

    /// Adds a string attribute.
    pub fn text(&mut self, key: &'static str, value: &str) {
        self.record
            .attributes
            .push((key, Value::Text(value.to_owned())));
    }

    /// Adds a string attribute known at compile time.
    pub fn static_text(&mut self, key: &'static str, value: &'static str) {
        self.record.attributes.push((key, Value::Static(value)));
    }

    /// Adds an integer attribute.
    pub fn int(&mut self, key: &'static str, value: u64) {
        let value = i64::try_from(value).unwrap_or(i64::MAX);
        self.record.attributes.push((key, Value::Int(value)));
    }

    /// Marks the span failed.
    pub fn error(&mut self, message: String) {
        self.record.error = Some(message);
    }

    /// Drops the span without queueing it.
    pub fn discard(mut self) {
        self.discarded = true;
    }
}

impl Drop for Open {
    /// The span ends: it is encoded into the queue (or counted as dropped).
    fn drop(&mut self) {
        let Some(exporter) = EXPORTER.get().filter(|_| !self.discarded) else {
            return;
        };
        self.record.end_ns = unix_nanos().max(self.record.start_ns);
        exporter.queue.push(&self.record, &exporter.counts);
    }
}

/// The export thread: takes what is queued, a batch at a time, and sends it.
fn run(exporter: &Exporter, url: &str) {
    // Each step has its own limit rather than one for the whole call: a limit on resolving
    // makes ureq resolve the host on a new thread for every request, so it is set only when
    // there is a name to resolve (an IP address is parsed, not looked up).
    let limit = Some(EXPORT_TIMEOUT);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_resolve(limit.filter(|_| names_a_host(url)))
        .timeout_connect(limit)
        .timeout_send_request(limit)
        .timeout_send_body(limit)
        .timeout_recv_response(limit)
        .timeout_recv_body(limit)
        .http_status_as_error(false)
        .user_agent(concat!("courier/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    let clock = Clock::start();
    let envelope = Envelope::new();
    let counts = &exporter.counts;
    let mut warned_at: Option<u64> = None;
    let mut taken = Queued::default();
    let mut body = Vec::new();
    loop {
        let flushes = exporter.queue.take(&mut taken);
        let mut start = 0;
        let mut failed = false;
        for ends in taken.ends.chunks(BATCH_SPANS) {
            if failed {
                // The collector just failed or timed out: the rest of this take is dropped
                // rather than tried for up to 10 s more each.
                counts
                    .export_failed
                    .fetch_add(ends.len() as u64, Ordering::Relaxed);
                continue;
            }
            let end = ends.last().copied().unwrap_or(start);
            envelope.wrap(&taken.bytes[start..end], &mut body);
            start = end;
            if let Err(error) = export(&agent, url, &body, ends.len() as u64, counts) {
                failed = true;
                let now = clock.now_ms();
                if warned_at.is_none_or(|at| now.saturating_sub(at) >= WARN_EVERY_MS) {
                    warned_at = Some(now);
                    tracing::warn!(
                        url,
                        %error,
                        dropped = counts.export_failed.load(Ordering::Relaxed),
                        "exporting trace spans failed; they are dropped (courier_trace_spans_dropped_total) and requests go on unaffected"
                    );
                }
            }
        }
        taken.bytes.clear();
        taken.ends.clear();
        exporter.queue.served(flushes);
    }
}

/// What surrounds the spans of every export request: this server as the resource, Courier
/// as the instrumentation scope, each encoded once.
struct Envelope {
    resource: Vec<u8>,
    scope: Vec<u8>,
}

impl Envelope {
    fn new() -> Self {
        let text = |key: &str, value: &str| KeyValue {
            key: key.to_owned(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value.to_owned())),
            }),
            ..KeyValue::default()
        };
        let resource = Resource {
            attributes: vec![
                text("service.name", "courier"),
                text("service.version", env!("CARGO_PKG_VERSION")),
            ],
            ..Resource::default()
        };
        let scope = InstrumentationScope {
            name: "courier".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            ..InstrumentationScope::default()
        };
        Self {
            resource: resource.encode_to_vec(),
            scope: scope.encode_to_vec(),
        }
    }

    /// `ExportTraceServiceRequest { resource_spans: [ResourceSpans { resource, scope_spans:
    /// [ScopeSpans { scope, spans }] }] }` into `body`, where `spans` are encoded spans as
    /// [`Queue::push`] writes them.
    fn wrap(&self, spans: &[u8], body: &mut Vec<u8>) {
        let field = |len: usize| key_len(1) + encoded_len_varint(len as u64) + len;
        let scope_spans = field(self.scope.len()) + spans.len();
        let resource_spans = field(self.resource.len()) + field(scope_spans);
        body.clear();
        body.reserve(field(resource_spans));
        encode_key(1, WireType::LengthDelimited, body);
        encode_varint(resource_spans as u64, body);
        encode_key(1, WireType::LengthDelimited, body);
        encode_varint(self.resource.len() as u64, body);
        body.extend_from_slice(&self.resource);
        encode_key(2, WireType::LengthDelimited, body);
        encode_varint(scope_spans as u64, body);
        encode_key(1, WireType::LengthDelimited, body);
        encode_varint(self.scope.len() as u64, body);
        body.extend_from_slice(&self.scope);
        body.extend_from_slice(spans);
    }
}

/// Sends one request of `n` spans; counts them as exported or dropped.
fn export(
    agent: &ureq::Agent,
    url: &str,
    body: &[u8],
    n: u64,
    counts: &ExportCounts,
) -> Result<(), String> {
    let result = agent
        .post(url)
        .header("Content-Type", "application/x-protobuf")
        .send(body);
    let outcome = match result {
        Ok(response) if response.status().is_success() => {
            // A partial success names how many spans the collector rejected.
            let mut answer = Vec::new();
            let _ = response
                .into_body()
                .into_reader()
                .take(1 << 20)
                .read_to_end(&mut answer);
            let rejected = ExportTraceServiceResponse::decode(&answer[..])
                .ok()
                .and_then(|r| r.partial_success)
                .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0).min(n));
            counts.exported.fetch_add(n - rejected, Ordering::Relaxed);
            counts.export_failed.fetch_add(rejected, Ordering::Relaxed);
            return Ok(());
        }
        Ok(response) => format!("the collector answered {}", response.status()),
        Err(error) => error.to_string(),
    };
    counts.export_failed.fetch_add(n, Ordering::Relaxed);
    Err(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::Span;

    #[test]
    fn the_traces_path_is_added_to_a_base_endpoint_once() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://c.example/otlp/v1/traces"),
            "https://c.example/otlp/v1/traces"
        );
    }

    #[test]
    fn only_a_host_name_is_resolved_with_a_time_limit() {
        assert!(!names_a_host("http://127.0.0.1:4318/v1/traces"));
        assert!(!names_a_host("http://[::1]:4318/v1/traces"));
        assert!(names_a_host("http://collector:4318/v1/traces"));
        assert!(names_a_host("https://otel.example.com/v1/traces"));
    }

    #[test]
    fn queued_spans_wrapped_in_the_envelope_decode_as_an_export_request() {
        let spans: Vec<Span> = (1..=3u8)
            .map(|n| Span {
                trace_id: vec![n; 16],
                span_id: vec![n; 8],
                name: format!("span {n}"),
                ..Span::default()
            })
            .collect();
        let mut queued = Vec::new();
        for span in &spans {
            prost::encoding::message::encode(2, span, &mut queued);
        }
        let mut body = Vec::new();
        Envelope::new().wrap(&queued, &mut body);
        let request = ExportTraceServiceRequest::decode(&body[..]).expect("a valid request");
        assert_eq!(request.resource_spans.len(), 1);
        let resource = &request.resource_spans[0];
        assert_eq!(
            resource.resource.as_ref().expect("resource").attributes[0].key,
            "service.name"
        );
        assert_eq!(resource.scope_spans.len(), 1);
        let scope = &resource.scope_spans[0];
        assert_eq!(scope.scope.as_ref().expect("scope").name, "courier");
        assert_eq!(scope.spans, spans);
    }

    /// The names of the spans in `taken`, in order.
    fn names(taken: &Queued) -> Vec<String> {
        let mut body = Vec::new();
        Envelope::new().wrap(&taken.bytes, &mut body);
        let request = ExportTraceServiceRequest::decode(&body[..]).expect("a valid request");
        let spans = &request.resource_spans[0].scope_spans[0].spans;
        assert_eq!(spans.len(), taken.ends.len());
        spans.iter().map(|span| span.name.clone()).collect()
    }

    #[test]
    fn a_full_batch_is_taken_whole_and_the_rest_waits_for_its_own() {
        let queue = Queue::default();
        let counts = ExportCounts::default();
        let span = |n: usize| Record {
            context: Context {
                trace_id: TraceId::random(),
                span_id: SpanId::random(),
            },
            parent: None,
            link: None,
            name: Name::Owned(format!("span {n}")),
            kind: Kind::Internal,
            start_ns: 1,
            end_ns: 2,
            attributes: Vec::new(),
            error: None,
        };
        let queued = BATCH_SPANS + 188;
        for n in 0..queued {
            queue.push(&span(n), &counts);
        }
        let mut taken = Queued::default();
        queue.take(&mut taken);
        let expected =
            |range: std::ops::Range<usize>| range.map(|n| format!("span {n}")).collect::<Vec<_>>();
        assert_eq!(names(&taken), expected(0..BATCH_SPANS));

        taken.bytes.clear();
        taken.ends.clear();
        queue.lock().flushes_asked += 1;
        let asked = queue.take(&mut taken);
        assert_eq!(asked, 1);
        assert_eq!(names(&taken), expected(BATCH_SPANS..queued));
    }
}
