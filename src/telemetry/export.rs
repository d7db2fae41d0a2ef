//! Span export over OTLP/HTTP in protobuf (feature `otel`, config `otel.endpoint`).
//!
//! [`SpanExport`] is a `tracing` layer: it gives each span of a trace (see
//! [`super::request_span`]) a span id, and once the span closes, hands what it recorded to a
//! bounded queue without waiting. One thread, [`run`], takes the queue in batches (up to
//! [`BATCH_SPANS`] spans, or what came within [`BATCH_DELAY`]), encodes them with the
//! OpenTelemetry protobuf types and POSTs them to `<otel.endpoint>/v1/traces`. A collector
//! that is down or slow therefore never delays or fails a request: its batches fail (or time
//! out after [`EXPORT_TIMEOUT`]) on that thread, the queue fills, and what cannot be queued
//! or sent is dropped and counted ([`ExportCounts`], `courier_trace_spans_dropped_total`).

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    span, status, ResourceSpans, ScopeSpans, Span, Status,
};
use prost::Message;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use super::context::{SpanId, TraceId};
use crate::clock::{unix_nanos, Clock};

/// Finished spans waiting for the exporter; past this, new ones are dropped (and counted).
pub const QUEUE_SPANS: usize = 4096;
/// Most spans in one export request.
pub const BATCH_SPANS: usize = 512;
/// Longest a finished span waits for its batch to fill.
pub const BATCH_DELAY: Duration = Duration::from_secs(1);
/// Longest one export request may take before its batch counts as dropped.
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

/// The counts of the process's exporter (there is one global subscriber), once it started.
static COUNTS: OnceLock<Arc<ExportCounts>> = OnceLock::new();

/// The exporter's counts, if spans are being exported.
pub fn counts() -> Option<&'static ExportCounts> {
    COUNTS.get().map(|counts| &**counts)
}

/// What the queue carries.
enum Item {
    Span(Box<Finished>),
    /// Export what is queued, then say so.
    Flush(SyncSender<()>),
}

/// Starts the export thread; the layer that feeds it.
pub fn start(endpoint: &str) -> std::io::Result<(SpanExport, Flusher)> {
    let url = traces_url(endpoint);
    let counts = COUNTS.get_or_init(Arc::default).clone();
    let (queue, rx) = mpsc::sync_channel(QUEUE_SPANS);
    let thread_counts = counts.clone();
    std::thread::Builder::new()
        .name("courier-otlp".into())
        .spawn(move || run(&rx, &url, &thread_counts))?;
    Ok((
        SpanExport {
            queue: queue.clone(),
            counts,
        },
        Flusher(queue),
    ))
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

/// Exports what is queued, on demand (at shutdown).
#[derive(Debug, Clone)]
pub struct Flusher(SyncSender<Item>);

impl Flusher {
    /// Waits up to `timeout` for the spans queued so far to be exported (or dropped).
    pub fn flush(&self, timeout: Duration) {
        let (done, wait) = mpsc::sync_channel(1);
        let clock = Clock::start();
        let deadline = clock.now_ms().saturating_add(millis(timeout));
        let mut item = Item::Flush(done);
        loop {
            match self.0.try_send(item) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if clock.now_ms() < deadline => {
                    item = back;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return,
            }
        }
        let left = deadline.saturating_sub(clock.now_ms());
        let _ = wait.recv_timeout(Duration::from_millis(left));
    }
}

impl std::fmt::Debug for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Span(_) => "Span",
            Self::Flush(_) => "Flush",
        })
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The `tracing` layer that records the spans of traces and queues them once closed.
#[derive(Debug)]
pub struct SpanExport {
    queue: SyncSender<Item>,
    counts: Arc<ExportCounts>,
}

/// A span of a trace while it is open (in the span's extensions).
#[derive(Debug)]
struct Open {
    trace_id: TraceId,
    span_id: SpanId,
    parent_id: Option<SpanId>,
    /// The parent is the caller's span (from a `traceparent`), not one of ours.
    remote_parent: bool,
    /// The span of ours it was created in, when that is in another trace (a delivery links
    /// the receive that handed it out).
    link: Option<(TraceId, SpanId)>,
    sampled: bool,
    start_ns: u64,
    attributes: Vec<(&'static str, Attr)>,
}

/// A finished span, on its way to the exporter.
#[derive(Debug)]
struct Finished {
    name: &'static str,
    open: Open,
    end_ns: u64,
}

/// A span attribute's value.
#[derive(Debug, Clone, PartialEq)]
enum Attr {
    Str(String),
    Int(i64),
    Bool(bool),
    Float(f64),
}

/// The fields of a span: the trace context ones apart.
#[derive(Debug, Default)]
struct Fields {
    trace_id: Option<TraceId>,
    parent_id: Option<SpanId>,
    unsampled: bool,
    attributes: Vec<(&'static str, Attr)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "trace_id" => self.trace_id = TraceId::parse(value),
            "parent_id" => self.parent_id = SpanId::parse(value),
            name => self.attributes.push((name, Attr::Str(value.to_owned()))),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.attributes.push((field.name(), Attr::Int(value)));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        let value = i64::try_from(value).unwrap_or(i64::MAX);
        self.attributes.push((field.name(), Attr::Int(value)));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        match field.name() {
            "unsampled" => self.unsampled = value,
            name => self.attributes.push((name, Attr::Bool(value))),
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.attributes.push((field.name(), Attr::Float(value)));
    }
}

impl<S> Layer<S> for SpanExport
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        let parent = span.parent().and_then(|parent| {
            let extensions = parent.extensions();
            let open = extensions.get::<Open>()?;
            Some((open.trace_id, open.span_id, open.sampled))
        });
        let (trace_id, parent_id, remote_parent, link, sampled) = match (fields.trace_id, parent) {
            (Some(trace_id), parent) => (
                trace_id,
                fields.parent_id,
                fields.parent_id.is_some(),
                parent.map(|(trace, span, _)| (trace, span)),
                !fields.unsampled,
            ),
            (None, Some((trace_id, parent_id, sampled))) => {
                (trace_id, Some(parent_id), false, None, sampled)
            }
            // Outside any request or delivery (the sweeper's own writes): no trace.
            (None, None) => return,
        };
        span.extensions_mut().insert(Open {
            trace_id,
            span_id: SpanId::random(),
            parent_id,
            remote_parent,
            link,
            sampled,
            start_ns: unix_nanos(),
            attributes: fields.attributes,
        });
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut extensions = span.extensions_mut();
        if let Some(open) = extensions.get_mut::<Open>() {
            let mut fields = Fields::default();
            values.record(&mut fields);
            open.attributes.extend(fields.attributes);
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else {
            return;
        };
        let Some(open) = span.extensions_mut().remove::<Open>() else {
            return;
        };
        if !open.sampled {
            return;
        }
        let finished = Box::new(Finished {
            name: span.name(),
            open,
            end_ns: unix_nanos(),
        });
        match self.queue.try_send(Item::Span(finished)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.counts.queue_full.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {
                self.counts.export_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The export thread: batches, encodes and sends until the queue closes.
fn run(rx: &Receiver<Item>, url: &str, counts: &ExportCounts) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(EXPORT_TIMEOUT))
        .http_status_as_error(false)
        .user_agent(concat!("courier/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    let clock = Clock::start();
    let mut warned_at: Option<u64> = None;
    let mut batch = Vec::with_capacity(BATCH_SPANS);
    loop {
        let mut flush = None;
        match rx.recv() {
            Ok(Item::Span(span)) => batch.push(*span),
            Ok(Item::Flush(done)) => flush = Some(done),
            Err(_) => return,
        }
        let deadline = clock.now_ms().saturating_add(millis(BATCH_DELAY));
        while flush.is_none() && batch.len() < BATCH_SPANS {
            let left = Duration::from_millis(deadline.saturating_sub(clock.now_ms()));
            match rx.recv_timeout(left) {
                Ok(Item::Span(span)) => batch.push(*span),
                Ok(Item::Flush(done)) => flush = Some(done),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        if flush.is_some() {
            // Everything queued before the flush request.
            while let Ok(Item::Span(span)) = rx.try_recv() {
                batch.push(*span);
            }
        }
        for chunk in batch.chunks(BATCH_SPANS) {
            if let Err(error) = export(&agent, url, chunk, counts) {
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
        batch.clear();
        if let Some(done) = flush {
            let _ = done.send(());
        }
    }
}

/// Sends one batch; counts it as exported or dropped.
fn export(
    agent: &ureq::Agent,
    url: &str,
    batch: &[Finished],
    counts: &ExportCounts,
) -> Result<(), String> {
    let n = batch.len() as u64;
    let body = request(batch).encode_to_vec();
    let result = agent
        .post(url)
        .header("Content-Type", "application/x-protobuf")
        .send(&body[..]);
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

/// The export request of `batch`: one resource (this server), one scope.
fn request(batch: &[Finished]) -> ExportTraceServiceRequest {
    let text = |key: &str, value: &str| KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
        ..KeyValue::default()
    };
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    text("service.name", "courier"),
                    text("service.version", env!("CARGO_PKG_VERSION")),
                ],
                ..Resource::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "courier".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..InstrumentationScope::default()
                }),
                spans: batch.iter().map(Finished::to_proto).collect(),
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

/// Span flags (OTLP): the W3C sampled flag, and whether the parent is remote.
const SAMPLED: u32 = 0x1;
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

impl Finished {
    fn to_proto(&self) -> Span {
        let open = &self.open;
        let attribute = |key: &'static str| {
            open.attributes
                .iter()
                .rev()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v)
        };
        let status_code = match attribute("status") {
            Some(Attr::Int(code)) => Some(*code),
            _ => None,
        };
        let name = match (self.name, attribute("method"), attribute("route")) {
            ("request", Some(Attr::Str(method)), Some(Attr::Str(route))) => {
                format!("{method} {route}")
            }
            (name, _, _) => name.to_owned(),
        };
        let kind = match self.name {
            "request" => span::SpanKind::Server,
            "publish" => span::SpanKind::Producer,
            "deliver" => span::SpanKind::Consumer,
            _ => span::SpanKind::Internal,
        };
        let status = match status_code {
            Some(code) if code >= 500 => Some(Status {
                code: status::StatusCode::Error.into(),
                message: format!("answered {code}"),
            }),
            _ => None,
        };
        Span {
            trace_id: open.trace_id.to_bytes().to_vec(),
            span_id: open.span_id.to_bytes().to_vec(),
            parent_span_id: open
                .parent_id
                .map(|id| id.to_bytes().to_vec())
                .unwrap_or_default(),
            flags: SAMPLED | HAS_IS_REMOTE | if open.remote_parent { IS_REMOTE } else { 0 },
            name,
            kind: kind.into(),
            start_time_unix_nano: open.start_ns,
            end_time_unix_nano: self.end_ns.max(open.start_ns),
            attributes: open.attributes.iter().map(Attr::to_proto).collect(),
            links: open
                .link
                .map(|(trace_id, span_id)| span::Link {
                    trace_id: trace_id.to_bytes().to_vec(),
                    span_id: span_id.to_bytes().to_vec(),
                    flags: SAMPLED | HAS_IS_REMOTE,
                    ..span::Link::default()
                })
                .into_iter()
                .collect(),
            status,
            ..Span::default()
        }
    }
}

impl Attr {
    fn to_proto((key, value): &(&'static str, Self)) -> KeyValue {
        KeyValue {
            key: attribute_name(key),
            value: Some(AnyValue {
                value: Some(match value {
                    Self::Str(s) => any_value::Value::StringValue(s.clone()),
                    Self::Int(i) => any_value::Value::IntValue(*i),
                    Self::Bool(b) => any_value::Value::BoolValue(*b),
                    Self::Float(f) => any_value::Value::DoubleValue(*f),
                }),
            }),
            ..KeyValue::default()
        }
    }
}

/// An attribute's name in OpenTelemetry's semantic conventions where one fits, else
/// `courier.<field>`.
fn attribute_name(field: &str) -> String {
    match field {
        "method" => "http.request.method".into(),
        "route" => "http.route".into(),
        "status" => "http.response.status_code".into(),
        "message_id" => "messaging.message.id".into(),
        "messages" => "messaging.batch.message_count".into(),
        other => format!("courier.{other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
