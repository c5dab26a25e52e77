//! Tracing: W3C `traceparent` in, a server span per request out over
//! OTLP/HTTP, received here by a real OTLP receiver that decodes the
//! protobuf with the opentelemetry-proto types.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

const READY: Duration = Duration::from_secs(30);

/// An OTLP/HTTP receiver: answers 200 to every POST and keeps the spans,
/// with the `service.name` of their resource.
struct Receiver {
    port: u16,
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let store = spans.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let store = store.clone();
                std::thread::spawn(move || serve(conn, &store));
            }
        });
        Receiver { port, spans }
    }

    fn spans(&self) -> Vec<(String, Span)> {
        self.spans.lock().unwrap().clone()
    }
}

fn serve(conn: TcpStream, store: &Mutex<Vec<(String, Span)>>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut len = 0;
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
        let req =
            ExportTraceServiceRequest::decode(body.as_slice()).expect("an OTLP protobuf body");
        for rs in req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    store.lock().unwrap().push((service.clone(), span));
                }
            }
        }
        conn.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
        )
        .unwrap();
    }
}

fn attr(span: &Span, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.clone())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_request_with_a_traceparent_produces_a_server_span_in_that_trace() {
    let receiver = Receiver::start();
    let config = hello_config(&format!(
        "[telemetry]\nenabled = true\nendpoint = \"http://127.0.0.1:{}/v1/traces\"\nservice_name = \"shop\"\n",
        receiver.port
    ));
    let mut ampere = Ampere::start(
        &fixture("hello"),
        &["--workers", "1", "--config", &config.path],
    );
    ampere.wait_ready(1, READY);
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let mut stream = TcpStream::connect(ampere.addr()).unwrap();
    write!(
        stream,
        "GET /slow?ms=150 HTTP/1.1\r\nHost: localhost\r\ntraceparent: 00-{trace_id}-{parent}-01\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let r = read_response(&mut stream).unwrap();
    assert_eq!(r.status, 200);
    // The app sees the trace continued from ampere's server span.
    let seen: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let seen = seen["traceparent"]
        .as_str()
        .expect("the app saw a traceparent");
    assert!(seen.starts_with(&format!("00-{trace_id}-")), "{seen}");
    assert!(!seen.contains(parent), "{seen}");
    // A request without one starts a trace of its own.
    assert_eq!(get(ampere.addr(), "/missing", READY).unwrap().status, 200);

    wait_until(READY, "2 spans at the receiver", || {
        receiver.spans().len() >= 2
    });
    let spans = receiver.spans();
    let (service, span) = spans
        .iter()
        .find(|(_, s)| hex(&s.trace_id) == trace_id)
        .unwrap_or_else(|| panic!("no span in trace {trace_id}: {spans:?}"));
    assert_eq!(service, "shop");
    assert_eq!(hex(&span.parent_span_id), parent);
    assert_eq!(format!("00-{trace_id}-{}-01", hex(&span.span_id)), seen);
    assert_eq!(span.kind, 2, "a server span");
    assert_eq!(span.name, "GET");
    assert_eq!(
        attr(span, "http.response.status_code"),
        Some(Value::IntValue(200))
    );
    assert_eq!(
        attr(span, "url.path"),
        Some(Value::StringValue("/slow".into()))
    );
    let took = Duration::from_nanos(span.end_time_unix_nano - span.start_time_unix_nano);
    assert!(
        took >= Duration::from_millis(150) && took < Duration::from_secs(10),
        "span duration {took:?} for a 150 ms request"
    );
    let (_, other) = spans
        .iter()
        .find(|(_, s)| attr(s, "url.path") == Some(Value::StringValue("/missing".into())))
        .expect("a span for the request without traceparent");
    assert!(other.parent_span_id.is_empty());
    assert_ne!(hex(&other.trace_id), trace_id);
    wait_until(READY, "the exported spans to be counted", || {
        metric(&ampere, "ampere_spans_exported_total", "") >= 2.0
    });
}

#[test]
fn unsampled_parents_are_followed_and_nothing_is_exported_when_off() {
    let receiver = Receiver::start();
    let config = hello_config(&format!(
        "[telemetry]\nenabled = true\nendpoint = \"http://127.0.0.1:{}/v1/traces\"\nsampling_ratio = 0.0\n",
        receiver.port
    ));
    let mut ampere = Ampere::start(
        &fixture("hello"),
        &["--workers", "1", "--config", &config.path],
    );
    ampere.wait_ready(1, READY);
    let addr = ampere.addr();
    let send = |traceparent: &str| {
        let mut stream = TcpStream::connect(addr).unwrap();
        write!(
            stream,
            "GET /{traceparent} HTTP/1.1\r\nHost: localhost\r\ntraceparent: {traceparent}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        read_response(&mut stream).unwrap()
    };
    // Not sampled upstream: the app still gets a context, nothing is
    // recorded. Ratio 0: a request without a traceparent is not recorded.
    let r = send("00-11111111111111111111111111111111-2222222222222222-00");
    assert!(r.body.contains("-00\""), "{}", r.body);
    assert_eq!(get(addr, "/none", READY).unwrap().status, 200);
    // Sampled upstream: recorded even at ratio 0.
    send("00-33333333333333333333333333333333-4444444444444444-01");
    wait_until(READY, "the sampled span", || !receiver.spans().is_empty());
    // Spans leave the worker in the order they finished and one task
    // exports them in order: had the earlier requests been recorded, they
    // would be here by now.
    let spans = receiver.spans();
    assert_eq!(spans.len(), 1, "{spans:?}");
    assert_eq!(
        hex(&spans[0].1.trace_id),
        "33333333333333333333333333333333"
    );
}
