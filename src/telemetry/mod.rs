//! Logging and tracing (SPEC §8).
//!
//! - Logs: `tracing` to stderr, text or JSON, filtered by `RUST_LOG` or else `log_level`.
//! - Traces: every request runs in a [`request_span`] that joins the caller's W3C
//!   `traceparent` ([`context`]), so every log line written while answering it carries its
//!   `trace_id`. The broker's work has spans of its own at `debug` level: `publish`,
//!   `append` (submitted → durable: the group commit and its fsync), `deliver` (one per
//!   message handed out, in the trace of the `traceparent` stored with the message),
//!   `ack`/`nack`/`extend` and `request_reply`. Nothing records them unless `RUST_LOG` asks
//!   for them or, with the cargo feature `otel` and `otel.endpoint` set, the span exporter
//!   ([`export`]) does, which sends them over OTLP/HTTP.

pub mod context;
#[cfg(feature = "otel")]
pub mod export;

use std::time::Duration;

use tracing::{Span, Subscriber};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{Config, LogFormat};
use crate::metrics::SpanCounts;
use context::{TraceId, TraceParent};

/// What stays of the logging and tracing set-up: the span exporter, if any.
#[derive(Debug, Default)]
pub struct Telemetry {
    #[cfg(feature = "otel")]
    flusher: Option<export::Flusher>,
}

impl Telemetry {
    /// Waits up to `timeout` for the spans finished so far to be exported (at shutdown).
    pub fn flush(&self, timeout: Duration) {
        #[cfg(feature = "otel")]
        if let Some(flusher) = &self.flusher {
            flusher.flush(timeout);
        }
        #[cfg(not(feature = "otel"))]
        let _ = timeout;
    }
}

/// Installs the global subscriber. Stdout is left to the one line that names the address.
///
/// # Errors
/// The span exporter's thread could not be started.
pub fn init(config: &Config) -> std::io::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{},sled=warn", config.log_level)));
    #[cfg(feature = "otel")]
    if let Some(endpoint) = &config.otel.endpoint {
        let (spans, flusher) = export::start(endpoint)?;
        // Each layer its own filter: the exporter takes every span of Courier's, whatever
        // the log level.
        let ours = tracing_subscriber::filter::Targets::new()
            .with_target("courier", tracing::Level::DEBUG);
        tracing_subscriber::registry()
            .with(logs(config.log_format).with_filter(filter))
            .with(spans.with_filter(ours))
            .init();
        return Ok(Telemetry {
            flusher: Some(flusher),
        });
    }
    tracing_subscriber::registry()
        .with(filter)
        .with(logs(config.log_format))
        .init();
    Ok(Telemetry::default())
}

/// The log lines, in `format`, to stderr.
fn logs<S>(format: LogFormat) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(false).boxed(),
        LogFormat::Json => logs.json().boxed(),
    }
}

/// What became of the spans exported so far; `None` when none are (no feature `otel`, or no
/// `otel.endpoint`).
pub fn span_counts() -> Option<SpanCounts> {
    #[cfg(feature = "otel")]
    if let Some(counts) = export::counts() {
        use std::sync::atomic::Ordering::Relaxed;
        return Some(SpanCounts {
            exported: counts.exported.load(Relaxed),
            queue_full: counts.queue_full.load(Relaxed),
            export_failed: counts.export_failed.load(Relaxed),
        });
    }
    None
}

/// The span a request runs in, joining `caller`'s trace when the request carried a valid
/// `traceparent` (else starting a trace of its own). Its fields: `method`, `route` (the
/// template), `trace_id`, the caller's span as `parent_id`, `unsampled` when the caller
/// does not record the trace (then nothing of it is exported), and `status` once answered.
pub fn request_span(method: &str, route: &str, caller: Option<TraceParent>) -> Span {
    let trace_id = caller.map_or_else(TraceId::random, |c| c.trace_id);
    tracing::info_span!(
        target: "courier::request",
        "request",
        method = %method,
        route = %route,
        trace_id = %trace_id,
        parent_id = caller.map(|c| tracing::field::display(c.parent_id)),
        unsampled = caller.filter(|c| !c.sampled).map(|_| true),
        status = tracing::field::Empty,
    )
}
