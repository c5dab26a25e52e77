//! Traces: exports the server spans that the agents record over OTLP/HTTP
//! (protobuf), with the opentelemetry crates. Agents ship finished spans in
//! batches over their control channels; the supervisor hands each batch to
//! one exporting task through a bounded queue. When the collector is slow or
//! down, batches are dropped and counted (`ampere_spans_dropped_total`),
//! never buffered without bound and never waited on by the supervisor.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use tokio::sync::mpsc;

use super::metrics::Metrics;
use crate::config::TelemetryConfig;
use crate::error::Error;
use crate::worker::control::AgentSpan;

/// Batches waiting for the exporter; beyond this, new batches are dropped.
const QUEUE: usize = 256;
/// Spans sent to the collector in one request at most.
const MAX_EXPORT: usize = 2048;

/// Where the supervisor submits the agents' span batches.
pub struct Traces {
    tx: mpsc::Sender<Vec<AgentSpan>>,
    metrics: Arc<Metrics>,
}

/// The task that exports; spawn [`ExportTask::run`] on the runtime.
pub struct ExportTask {
    exporter: opentelemetry_otlp::SpanExporter,
    rx: mpsc::Receiver<Vec<AgentSpan>>,
    metrics: Arc<Metrics>,
    endpoint: String,
    scope: InstrumentationScope,
}

/// Sets up the exporter when tracing is on.
pub fn start(
    cfg: &TelemetryConfig,
    service: &str,
    metrics: Arc<Metrics>,
) -> Result<Option<(Traces, ExportTask)>, Error> {
    if !cfg.enabled {
        return Ok(None);
    }
    let endpoint = cfg.endpoint.as_str().to_owned();
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint.clone())
        .with_protocol(Protocol::HttpBinary)
        .with_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| Error::App {
            message: format!("cannot set up the OTLP exporter for {endpoint}: {e}"),
            hint: Some(
                "set [telemetry] endpoint to an OTLP/HTTP traces URL, such as http://localhost:4318/v1/traces"
                    .into(),
            ),
        })?;
    let name = cfg
        .service_name
        .as_ref()
        .map_or(service, |s| s.as_str())
        .to_owned();
    exporter.set_resource(&Resource::builder_empty().with_service_name(name).build());
    let (tx, rx) = mpsc::channel(QUEUE);
    Ok(Some((
        Traces {
            tx,
            metrics: metrics.clone(),
        },
        ExportTask {
            exporter,
            rx,
            metrics,
            endpoint,
            scope: InstrumentationScope::builder("ampere")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        },
    )))
}

impl Traces {
    /// Queues a batch for export, or drops and counts it when the queue is
    /// full.
    pub fn submit(&self, spans: Vec<AgentSpan>) {
        let n = spans.len() as u64;
        if self.tx.try_send(spans).is_err() {
            self.metrics.count_spans_dropped(n);
        }
    }
}

impl ExportTask {
    pub async fn run(mut self) {
        let mut failing = false;
        while let Some(mut spans) = self.rx.recv().await {
            while spans.len() < MAX_EXPORT {
                match self.rx.try_recv() {
                    Ok(more) => spans.extend(more),
                    Err(_) => break,
                }
            }
            let batch: Vec<SpanData> = spans
                .iter()
                .filter_map(|s| span_data(s, &self.scope))
                .collect();
            // Spans with ids that are not hex are lost here, and counted.
            self.metrics
                .count_spans_dropped((spans.len() - batch.len()) as u64);
            let n = batch.len() as u64;
            match self.exporter.export(batch).await {
                Ok(()) => {
                    self.metrics.count_spans_exported(n);
                    if failing {
                        failing = false;
                        tracing::info!(endpoint = %self.endpoint, "exporting spans again");
                    }
                }
                Err(e) => {
                    self.metrics.count_spans_dropped(n);
                    // Once per outage, not once per batch.
                    if !failing {
                        failing = true;
                        tracing::warn!(endpoint = %self.endpoint, error = %e, "cannot export spans; dropping them until the collector answers");
                    }
                }
            }
        }
    }
}

/// The OpenTelemetry form of an agent's span; `None` if its ids are not
/// valid hex.
fn span_data(s: &AgentSpan, scope: &InstrumentationScope) -> Option<SpanData> {
    let trace_id = TraceId::from_hex(&s.trace_id).ok()?;
    let span_id = SpanId::from_hex(&s.span_id).ok()?;
    let parent = match &s.parent_span_id {
        Some(p) => Some(SpanId::from_hex(p).ok()?),
        None => None,
    };
    let mut attributes = vec![
        KeyValue::new("http.request.method", s.method.clone()),
        KeyValue::new("url.path", s.path.clone()),
        KeyValue::new("http.response.status_code", i64::from(s.status)),
    ];
    if let Some(route) = &s.route {
        attributes.push(KeyValue::new("http.route", route.clone()));
    }
    // Semantic conventions: "{method} {route}", or the method alone.
    let name = match &s.route {
        Some(route) => format!("{} {route}", s.method),
        None => s.method.clone(),
    };
    Some(SpanData {
        span_context: SpanContext::new(
            trace_id,
            span_id,
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: parent.unwrap_or(SpanId::INVALID),
        parent_span_is_remote: parent.is_some(),
        span_kind: SpanKind::Server,
        name: Cow::Owned(name),
        start_time: UNIX_EPOCH + Duration::from_micros(s.start_us),
        end_time: UNIX_EPOCH + Duration::from_micros(s.end_us.max(s.start_us)),
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        // Server spans: 5xx is an error, 4xx is the client's.
        status: if s.status >= 500 {
            Status::error(format!("HTTP {}", s.status))
        } else {
            Status::Unset
        },
        instrumentation_scope: scope.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_spans_become_server_spans() {
        let s = AgentSpan {
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            span_id: "00f067aa0ba902b7".into(),
            parent_span_id: Some("a3ce929d0e0e4736".into()),
            method: "GET".into(),
            path: "/users/7".into(),
            route: Some("/users/:id".into()),
            status: 503,
            start_us: 1_000_000,
            end_us: 1_250_000,
        };
        let scope = InstrumentationScope::builder("ampere").build();
        let d = span_data(&s, &scope).unwrap();
        assert_eq!(d.name, "GET /users/:id");
        assert_eq!(d.span_kind, SpanKind::Server);
        assert!(d.parent_span_is_remote);
        assert_eq!(
            d.end_time.duration_since(d.start_time).unwrap(),
            Duration::from_millis(250)
        );
        assert!(matches!(d.status, Status::Error { .. }));
        let bad = AgentSpan {
            trace_id: "zz".into(),
            ..s
        };
        assert!(span_data(&bad, &scope).is_none());
    }
}
