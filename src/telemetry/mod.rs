//! Logging and tracing (SPEC §8).
//!
//! - Logs: `tracing` to stderr, text or JSON, filtered by `RUST_LOG` or else `log_level`.
//! - Trace context: every request runs in a `tracing` span ([`request_span`]) that joins the
//!   caller's W3C `traceparent` ([`context`]), so every log line written while answering it
//!   carries its `trace_id`.
//! - Spans for export ([`spans`]): the request, `publish`, `append`, `deliver`,
//!   `ack`/`nack`/`extend` and `request_reply`, recorded only with the cargo feature `otel`
//!   and `otel.endpoint` set, and sent over OTLP/HTTP by [`export`].

pub mod context;
#[cfg(feature = "otel")]
pub mod export;
#[cfg(feature = "otel")]
pub mod otlp;
pub mod spans;

use std::time::Duration;

use tracing::{Span, Subscriber};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{Config, LogFormat};
use crate::metrics::SpanCounts;
use context::{TraceId, TraceParent};

/// Waits up to `timeout` for the spans finished so far to be exported, if spans are
/// exported (at shutdown).
pub fn flush(timeout: Duration) {
    #[cfg(feature = "otel")]
    if let Some(exporter) = export::exporter() {
        exporter.flush(timeout);
    }
    #[cfg(not(feature = "otel"))]
    let _ = timeout;
}

/// Installs the global subscriber, and starts the span exporter when `otel.endpoint` is set.
/// Stdout is left to the one line that names the address.
///
/// # Errors
/// The span exporter's thread could not be started.
pub fn init(config: &Config) -> std::io::Result<()> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{},sled=warn", config.log_level)));
    tracing_subscriber::registry()
        .with(filter)
        .with(logs(config.log_format))
        .init();
    #[cfg(feature = "otel")]
    if let Some(endpoint) = &config.otel.endpoint {
        export::start(endpoint)?;
    }
    Ok(())
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

/// The `tracing` span a request runs in, in trace `trace_id` (the caller's, from its
/// `traceparent`, else a new one): its fields `method`, `route` (the template), `trace_id` and
/// the caller's span as `parent_id` are in every log line written while answering. At level
/// ERROR so that no log level hides it: a span's level only decides whether it is recorded,
/// and the warnings and errors of a request are the lines that most need its trace id.
pub fn request_span(
    method: &str,
    route: &str,
    trace_id: TraceId,
    caller: Option<TraceParent>,
) -> Span {
    tracing::error_span!(
        target: "courier::request",
        "request",
        method = %method,
        route = %route,
        trace_id = %trace_id,
        parent_id = caller.map(|c| tracing::field::display(c.parent_id)),
    )
}
