//! The spans Courier records for export: one per request (`<METHOD> <route>`), and inside it
//! `publish`, `append` (submitted → durable: the group commit and its fsync), `deliver` (one
//! per message handed out, in the trace of the `traceparent` stored with it), `ack` / `nack` /
//! `extend` and `request_reply`.
//!
//! They are recorded only with the cargo feature `otel` and `otel.endpoint` set, and only in a
//! trace its caller records (see [`super::export`]); otherwise every function here costs a
//! check of one pointer. The current span of a request travels in a task-local, set for the
//! request's task once ([`within`]) and changed by [`enter`] while a child span lives: a
//! child started anywhere in the request's task joins it (`append` is started there and ended
//! when its write is awaited; a write nobody awaits is not exported). No future is wrapped
//! per child span, so a span costs no copies of the (large) futures it covers. These are not
//! `tracing` spans: the request's `tracing` span ([`super::request_span`]) is what the logs
//! read; these are built for export alone, without the subscriber's per-span bookkeeping.

#[cfg(feature = "otel")]
use std::cell::Cell;
use std::future::Future;

#[cfg(feature = "otel")]
use futures_util::future::Either;

use super::context::{SpanId, TraceId, TraceParent};
#[cfg(feature = "otel")]
use super::{export, otlp::Name};

/// What a span is, in OTLP's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Answers a request from outside (the request span).
    Server,
    /// Publishes messages.
    Producer,
    /// Hands a message to its consumer.
    Consumer,
    /// Anything else.
    Internal,
}

/// Where a span sits: its trace and its own id (what its children name as parent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    /// The trace.
    pub trace_id: TraceId,
    /// The span.
    pub span_id: SpanId,
}

#[cfg(feature = "otel")]
tokio::task_local! {
    /// The span the current task works in.
    static CURRENT: Cell<Context>;
}

/// A span being recorded: ends, and is queued for export, when dropped.
#[derive(Debug)]
pub struct Recording {
    #[cfg(feature = "otel")]
    open: export::Open,
}

impl Recording {
    /// Where it sits.
    pub fn context(&self) -> Context {
        #[cfg(feature = "otel")]
        return self.open.context();
        #[cfg(not(feature = "otel"))]
        unreachable!("no span is recorded without the feature `otel`")
    }

    /// Adds a string attribute.
    pub fn text(&mut self, key: &'static str, value: &str) {
        #[cfg(feature = "otel")]
        self.open.text(key, value);
        #[cfg(not(feature = "otel"))]
        let _ = (key, value);
    }

    /// Adds a string attribute known at compile time (no copy).
    pub fn static_text(&mut self, key: &'static str, value: &'static str) {
        #[cfg(feature = "otel")]
        self.open.static_text(key, value);
        #[cfg(not(feature = "otel"))]
        let _ = (key, value);
    }

    /// Adds an integer attribute.
    pub fn int(&mut self, key: &'static str, value: u64) {
        #[cfg(feature = "otel")]
        self.open.int(key, value);
        #[cfg(not(feature = "otel"))]
        let _ = (key, value);
    }

    /// Drops the span without exporting it (work that nobody waits for, whose end is not
    /// known).
    pub fn discard(self) {
        #[cfg(feature = "otel")]
        self.open.discard();
    }

    /// Marks the span failed, with what went wrong.
    pub fn error(&mut self, message: String) {
        #[cfg(feature = "otel")]
        self.open.error(message);
        #[cfg(not(feature = "otel"))]
        let _ = message;
    }
}

/// Whether spans are being exported (then [`delivered`] is worth its header lookup).
pub fn exporting() -> bool {
    #[cfg(feature = "otel")]
    return export::exporter().is_some();
    #[cfg(not(feature = "otel"))]
    false
}

/// The span of a request (`<method> <route>`, kind server) in trace `trace_id`, a child of
/// the caller's span when it sent a `traceparent`; `None` when nothing is exported or the
/// caller does not record this trace.
pub fn server(
    method: &'static str,
    route: &str,
    trace_id: TraceId,
    caller: Option<TraceParent>,
) -> Option<Recording> {
    #[cfg(feature = "otel")]
    {
        if caller.is_some_and(|c| !c.sampled) {
            return None;
        }
        let exporter = export::exporter()?;
        let mut span = exporter.open(
            Name::Owned(format!("{method} {route}")),
            Kind::Server,
            trace_id,
            caller.map(|c| (c.parent_id, true)),
            None,
        );
        span.static_text("http.request.method", method);
        span.text("http.route", route);
        Some(Recording { open: span })
    }
    #[cfg(not(feature = "otel"))]
    {
        let _ = (method, route, trace_id, caller);
        None
    }
}

/// Starts a span `name`, a child of the current task's span; `None` outside a recorded
/// request. For work that ends elsewhere (`append` ends when its `Commit` is awaited).
pub fn start(name: &'static str, kind: Kind) -> Option<Recording> {
    #[cfg(feature = "otel")]
    {
        let exporter = export::exporter()?;
        let parent = CURRENT.try_with(Cell::get).ok()?;
        let open = exporter.open(
            Name::Static(name),
            kind,
            parent.trace_id,
            Some((parent.span_id, false)),
            None,
        );
        Some(Recording { open })
    }
    #[cfg(not(feature = "otel"))]
    {
        let _ = (name, kind);
        None
    }
}

/// `future`, run in `span` (if any): spans started inside are its children. Without a span,
/// `future` itself, unwrapped.
#[cfg(feature = "otel")]
pub fn within<F: Future>(span: Option<&Recording>, future: F) -> impl Future<Output = F::Output> {
    match span {
        Some(span) => Either::Right(CURRENT.scope(Cell::new(span.context()), future)),
        None => Either::Left(future),
    }
}

/// `future` itself: without the feature `otel` nothing is recorded.
#[cfg(not(feature = "otel"))]
pub fn within<F: Future>(span: Option<&Recording>, future: F) -> impl Future<Output = F::Output> {
    let _ = span;
    future
}

/// A span entered in the current task ([`enter`]): spans started in the task while it lives
/// are its children. Dropping it ends the span and makes its parent current again.
#[derive(Debug)]
pub struct Entered {
    #[cfg(feature = "otel")]
    #[expect(
        dead_code,
        reason = "held so that the span ends when the guard is dropped"
    )]
    span: Recording,
    #[cfg(feature = "otel")]
    parent: Context,
}

/// Starts a span `name`, a child of the current one described by `describe`, and makes it
/// the task's current span until the returned guard is dropped (keep it across the work it
/// covers: `let _span = enter(..); work.await`). Spans entered in one task nest: one task
/// does not run two entered spans side by side. `None` outside a recorded request.
pub fn enter(
    name: &'static str,
    kind: Kind,
    describe: impl FnOnce(&mut Recording),
) -> Option<Entered> {
    #[cfg(feature = "otel")]
    {
        let mut span = start(name, kind)?;
        describe(&mut span);
        let parent = CURRENT
            .try_with(|current| current.replace(span.context()))
            .ok()?;
        Some(Entered { span, parent })
    }
    #[cfg(not(feature = "otel"))]
    {
        let _ = (name, kind, describe);
        None
    }
}

#[cfg(feature = "otel")]
impl Drop for Entered {
    /// The span's parent is current again (the span itself ends as it is dropped next).
    fn drop(&mut self) {
        let _ = CURRENT.try_with(|current| current.set(self.parent));
    }
}

/// Records a message's delivery (`deliver`, kind consumer, no duration): in the trace of its
/// stored `traceparent` (the producer's span its parent), linked to the current span (the
/// receive that hands it out); without a valid one, a child of the current span.
pub fn delivered(traceparent: Option<&str>, describe: impl FnOnce(&mut Recording)) {
    #[cfg(feature = "otel")]
    {
        let Some(exporter) = export::exporter() else {
            return;
        };
        let current = CURRENT.try_with(Cell::get).ok();
        let (trace_id, parent, link) = match traceparent.and_then(TraceParent::parse) {
            Some(producer) if !producer.sampled => return,
            Some(producer) => (producer.trace_id, (producer.parent_id, true), current),
            None => {
                let Some(current) = current else {
                    return;
                };
                (current.trace_id, (current.span_id, false), None)
            }
        };
        let span = exporter.open(
            Name::Static("deliver"),
            Kind::Consumer,
            trace_id,
            Some(parent),
            link,
        );
        let mut recording = Recording { open: span };
        describe(&mut recording);
    }
    #[cfg(not(feature = "otel"))]
    {
        let _ = (traceparent, describe);
    }
}
