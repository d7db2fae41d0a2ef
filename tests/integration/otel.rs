//! Trace export (feature `otel`, SPEC §8): a real OTLP/HTTP receiver in the test process
//! decodes what the server sends with the OpenTelemetry protobuf types; the spans of a
//! publish → receive → ack form the trees the trace context says; a collector that is down or
//! hangs neither fails nor delays a request, and what it costs is counted as dropped.
#![allow(
    clippy::disallowed_methods,
    reason = "the test bounds its own waits; the server's time is not read here"
)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::json;

use crate::metrics::scrape;
use crate::support::{eventually, post_in_background, receipts, TestServer};

/// How the receiver answers.
#[derive(Clone, Copy)]
enum Collector {
    /// 200 with an empty `ExportTraceServiceResponse`.
    Accepting,
    /// Never answers (holds each request for a minute).
    Hanging,
}

/// An OTLP/HTTP receiver on a loopback port; the spans it decoded, as they arrive.
fn receiver(behaviour: Collector) -> (SocketAddr, Arc<Mutex<Vec<Span>>>) {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("address");
    let received = spans.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let app = axum::Router::new()
                .route(
                    "/v1/traces",
                    post(move |body: Bytes| async move {
                        if let Collector::Hanging = behaviour {
                            tokio::time::sleep(Duration::from_secs(60)).await;
                        }
                        let request =
                            ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                        let mut spans = received.lock().unwrap();
                        for resource in request.resource_spans {
                            let service = resource.resource.expect("a resource").attributes;
                            assert!(service.iter().any(|kv| kv.key == "service.name"
                                && kv.value.as_ref().and_then(|v| v.value.as_ref())
                                    == Some(&AnyValue::StringValue("courier".into()))));
                            for scope in resource.scope_spans {
                                spans.extend(scope.spans);
                            }
                        }
                        (
                            [("content-type", "application/x-protobuf")],
                            ExportTraceServiceResponse::default().encode_to_vec(),
                        )
                    }),
                )
                // A collector takes large requests; axum's default limit is 2 MB.
                .layer(axum::extract::DefaultBodyLimit::disable());
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            axum::serve(listener, app).await.expect("serve");
        });
    });
    (addr, spans)
}

/// Waits until at least `n` spans that `pick` picks arrived; everything received by then.
fn all_of(spans: &Mutex<Vec<Span>>, pick: impl Fn(&Span) -> bool, n: usize) -> Vec<Span> {
    eventually(Duration::from_secs(15), "the spans", || {
        let spans = spans.lock().unwrap();
        (spans.iter().filter(|s| pick(s)).count() >= n).then(|| spans.clone())
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn string_attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => Some(s.clone()),
            AnyValue::IntValue(i) => Some(i.to_string()),
            _ => None,
        })
}

/// The one span named `name` whose parent is `parent` (span id bytes).
fn child<'a>(spans: &'a [Span], name: &str, parent: &[u8]) -> &'a Span {
    let found: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == name && s.parent_span_id == parent)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one `{name}` under {}: {spans:#?}",
        hex(parent)
    );
    found[0]
}

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const PRODUCER: &str = "b7ad6b7169203331";
const CONSUMER: &str = "00f067aa0ba902b7";
const UNSAMPLED: &str = "11111111111111111111111111111111";

#[test]
fn a_publish_receive_ack_is_exported_as_one_trace_of_nested_spans() {
    let (collector, spans) = receiver(Collector::Accepting);
    let server = TestServer::start(&["--otel-endpoint", &format!("http://{collector}")]);
    server.register("worker", json!({}));
    // A trace its caller does not record: nothing of it is exported.
    let unsampled = format!("00-{UNSAMPLED}-{PRODUCER}-00");
    let message = json!({"to": "agent:worker", "from": "planner", "body": "skip me"});
    let published = server.post_traced("/v1/messages", &message, &unsampled);
    assert_eq!(published.status, 201);
    let skipped = server.receive("worker", json!({"wait_ms": 0}));
    let receipt = skipped[0]["receipt"].as_str().unwrap();
    server.settle("worker", "ack", json!({}), &[receipt]);

    let id = publish_receive_ack(&server);
    // The seven spans of the producer's trace (the ack's request ends last of all, and
    // spans go out in the order they end).
    let spans = all_of(&spans, |s| hex(&s.trace_id) == TRACE, 7);
    assert!(
        spans.iter().all(|s| hex(&s.trace_id) != UNSAMPLED),
        "an unsampled trace was exported: {spans:#?}"
    );
    let ids: HashSet<&Vec<u8>> = spans.iter().map(|s| &s.span_id).collect();
    assert_eq!(ids.len(), spans.len(), "span ids are unique");
    assert_publish_spans(&spans);
    assert_delivery_spans(&spans, &id);
    // Ack: in the consumer's span, and its append inside.
    let request = child(&spans, "POST /v1/agents/{agent}/ack", &hex_bytes(CONSUMER));
    assert_eq!(hex(&request.trace_id), TRACE);
    let ack = child(&spans, "ack", &request.span_id);
    assert_eq!(hex(&ack.trace_id), TRACE);
    child(&spans, "append", &ack.span_id);

    let metrics = scrape(&server);
    assert!(metrics["courier_trace_spans_exported_total"] >= spans.len() as f64);
    assert_eq!(
        metrics[r#"courier_trace_spans_dropped_total{reason="queue_full"}"#],
        0.0
    );
    assert_eq!(
        metrics[r#"courier_trace_spans_dropped_total{reason="export_failed"}"#],
        0.0
    );
}

/// A producer publishes in its trace, a consumer receives (no trace context) and acks in
/// its own span of the producer's trace; the message's id.
fn publish_receive_ack(server: &TestServer) -> String {
    let producer = format!("00-{TRACE}-{PRODUCER}-01");
    let message = json!({"to": "agent:worker", "from": "planner", "body": {"task": 1}});
    let published = server.post_traced("/v1/messages", &message, &producer);
    assert_eq!(published.status, 201, "{published:?}");
    let delivered = server.receive("worker", json!({"wait_ms": 0}));
    assert_eq!(delivered[0]["headers"]["traceparent"], json!(producer));
    let consumer = format!("00-{TRACE}-{CONSUMER}-01");
    let ack = json!({"receipts": receipts(&delivered)});
    let acked = server.post_traced("/v1/agents/worker/ack", &ack, &consumer);
    assert_eq!(acked.status, 200);
    published.json["id"].as_str().unwrap().to_owned()
}

/// The publish request joins the producer's span; publish and its append nest inside.
fn assert_publish_spans(spans: &[Span]) {
    let request = child(spans, "POST /v1/messages", &hex_bytes(PRODUCER));
    assert_eq!(hex(&request.trace_id), TRACE);
    assert_eq!(request.kind, i32::from(SpanKind::Server));
    assert_eq!(request.flags & 0x300, 0x300, "a remote parent");
    assert_eq!(
        string_attribute(request, "http.response.status_code").as_deref(),
        Some("201")
    );
    assert_eq!(
        string_attribute(request, "http.route").as_deref(),
        Some("/v1/messages")
    );
    let publish = child(spans, "publish", &request.span_id);
    assert_eq!(publish.kind, i32::from(SpanKind::Producer));
    let append = child(spans, "append", &publish.span_id);
    assert_eq!(
        string_attribute(append, "courier.write").as_deref(),
        Some("publish")
    );
    for (outer, inner) in [(request, publish), (publish, append)] {
        assert_eq!(hex(&inner.trace_id), TRACE);
        assert!(outer.start_time_unix_nano <= inner.start_time_unix_nano);
        assert!(inner.end_time_unix_nano <= outer.end_time_unix_nano);
        assert!(inner.start_time_unix_nano <= inner.end_time_unix_nano);
    }
}

/// The receive is a trace of its own (it had no traceparent) with its lease's append
/// inside; the delivery continues the producer's trace and links the receive.
fn assert_delivery_spans(spans: &[Span], id: &str) {
    let deliver = child(spans, "deliver", &hex_bytes(PRODUCER));
    assert_eq!(hex(&deliver.trace_id), TRACE);
    assert_eq!(deliver.kind, i32::from(SpanKind::Consumer));
    assert_eq!(
        string_attribute(deliver, "messaging.message.id").as_deref(),
        Some(id)
    );
    assert_eq!(deliver.links.len(), 1, "{deliver:#?}");
    let receive = spans
        .iter()
        .find(|r| r.span_id == deliver.links[0].span_id)
        .expect("the delivery links its receive");
    assert_eq!(receive.name, "POST /v1/agents/{agent}/receive");
    assert_eq!(receive.trace_id, deliver.links[0].trace_id);
    assert_ne!(hex(&receive.trace_id), TRACE);
    assert!(receive.parent_span_id.is_empty());
    let lease = child(spans, "append", &receive.span_id);
    assert_eq!(
        string_attribute(lease, "courier.write").as_deref(),
        Some("lease")
    );
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn a_collector_that_is_down_fails_no_request_and_its_spans_are_counted_as_dropped() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = TestServer::start(&["--otel-endpoint", &format!("http://127.0.0.1:{port}")]);
    server.register("worker", json!({}));
    for n in 0..20 {
        server.publish("worker", json!(n));
    }
    // Every request answered so far has its span (the scrapes too), and each publish two
    // more (`publish`, `append`), the registration one (`append`).
    eventually(Duration::from_secs(15), "dropped spans", || {
        let metrics = scrape(&server);
        let answered: f64 = metrics
            .iter()
            .filter(|(series, _)| series.starts_with("courier_http_requests_total"))
            .map(|(_, n)| n)
            .sum();
        let failed = metrics[r#"courier_trace_spans_dropped_total{reason="export_failed"}"#];
        (failed >= answered + 2.0 * 20.0 + 1.0).then_some(())
    });
    assert_eq!(scrape(&server)["courier_trace_spans_exported_total"], 0.0);
    assert!(
        server.logs().contains("exporting trace spans failed"),
        "{}",
        server.logs()
    );
}

#[test]
fn a_collector_that_hangs_delays_no_request_and_what_overflows_is_counted() {
    let (collector, _spans) = receiver(Collector::Hanging);
    let server = TestServer::start(&["--otel-endpoint", &format!("http://{collector}")]);
    // One span per request, until the exporter's queue (8,192) overflows while its batches
    // hang (10 s each).
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    for n in 0_u32.. {
        let sent = Instant::now();
        assert_eq!(server.get("/healthz").status, 200);
        slowest = slowest.max(sent.elapsed());
        if n % 500 == 499 {
            let full = r#"courier_trace_spans_dropped_total{reason="queue_full"}"#;
            if scrape(&server)[full] > 0.0 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the queue never overflowed"
            );
        }
    }
    // Far below the export timeout (10 s) the collector makes the exporter wait.
    assert!(
        slowest < Duration::from_secs(2),
        "a request took {slowest:?}"
    );
}

#[test]
fn a_request_and_its_reply_have_spans_of_their_own() {
    let (collector, spans) = receiver(Collector::Accepting);
    let server = TestServer::start(&["--otel-endpoint", &format!("http://{collector}")]);
    server.register("asker", json!({}));
    server.register("worker", json!({"capabilities": ["answer"]}));
    // The asker's trace context travels in the request message's own headers.
    let asker = format!("00-{TRACE}-{PRODUCER}-01");
    let call = post_in_background(
        &server,
        "/v1/requests?timeout_ms=20000",
        &json!({"to": "capability:answer", "from": "asker", "body": {"q": 1},
                "headers": {"traceparent": asker}}),
    );
    let got = server.receive("worker", json!({"max": 1, "wait_ms": 10000}));
    assert_eq!(got[0]["headers"]["traceparent"], json!(asker));
    let id = got[0]["id"].as_str().unwrap();
    // The worker replies within the asker's trace.
    let reply = json!({"from": "worker", "in_reply_to": id, "body": {"a": 1}});
    let consumer = format!("00-{TRACE}-{CONSUMER}-01");
    assert_eq!(
        server.post_traced("/v1/messages", &reply, &consumer).status,
        201
    );
    let (answer, _) = call.join().unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");

    // The call's request span (it ends after its children) and the four spans of the asker's
    // trace: the delivery, and the reply's request, publish and append.
    all_of(&spans, |s| s.name == "POST /v1/requests", 1);
    let spans = all_of(&spans, |s| hex(&s.trace_id) == TRACE, 4);
    let request = spans
        .iter()
        .find(|s| s.name == "POST /v1/requests")
        .unwrap();
    let waited = child(&spans, "request_reply", &request.span_id);
    let publish = child(&spans, "publish", &waited.span_id);
    child(&spans, "append", &publish.span_id);
    assert!(waited.end_time_unix_nano >= publish.end_time_unix_nano);
    let deliver = child(&spans, "deliver", &hex_bytes(PRODUCER));
    assert_eq!(hex(&deliver.trace_id), TRACE);
    let replied = child(&spans, "POST /v1/messages", &hex_bytes(CONSUMER));
    assert_eq!(hex(&replied.trace_id), TRACE);
}
