//! The supervisor's HTTP server on the metrics port: Kubernetes probes
//! (`/live`, its alias `/status`, `/ready`) and Prometheus `/metrics`. All
//! read state that the supervisor publishes; they never ask a worker
//! anything, so they answer while every worker is busy or blocked.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use super::metrics::Metrics;

/// How long the supervisor's loop may go without ticking before `/live`
/// says it is stuck.
const STALL: Duration = Duration::from_secs(5);

/// What the supervisor publishes for the probes.
pub struct ProbeState {
    started: Instant,
    /// Milliseconds after `started` of the loop's last tick.
    last_tick_ms: AtomicU64,
    ready_workers: AtomicUsize,
    workers: AtomicUsize,
    shutting_down: AtomicBool,
}

impl ProbeState {
    pub fn new() -> Arc<Self> {
        Arc::new(ProbeState {
            started: Instant::now(),
            last_tick_ms: AtomicU64::new(0),
            ready_workers: AtomicUsize::new(0),
            workers: AtomicUsize::new(0),
            shutting_down: AtomicBool::new(false),
        })
    }

    /// The supervisor's loop is alive.
    pub fn tick(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_tick_ms.store(ms, Ordering::Relaxed);
    }

    pub fn set_workers(&self, ready: usize, total: usize) {
        self.ready_workers.store(ready, Ordering::Relaxed);
        self.workers.store(total, Ordering::Relaxed);
    }

    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    fn live(&self) -> bool {
        let now = self.started.elapsed().as_millis() as u64;
        now.saturating_sub(self.last_tick_ms.load(Ordering::Relaxed)) < STALL.as_millis() as u64
    }

    fn ready(&self) -> bool {
        !self.shutting_down.load(Ordering::Relaxed)
            && self.ready_workers.load(Ordering::Relaxed) > 0
    }
}

pub fn router(state: Arc<ProbeState>, metrics: Arc<Metrics>) -> Router {
    let probes = Router::new()
        .route("/live", get(live))
        .route("/status", get(live))
        .route("/ready", get(ready))
        .with_state(state);
    let metrics = Router::new()
        .route("/metrics", get(render_metrics))
        .with_state(metrics);
    probes.merge(metrics)
}

/// How long a client may take to send a request's head, and how long a
/// kept-alive connection may sit idle: a client that holds connections
/// open without asking (or a port scanner) must not take the supervisor's
/// descriptors, which new workers need.
const HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves probes and metrics until the process ends.
pub async fn serve(
    listener: std::net::TcpListener,
    state: Arc<ProbeState>,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let service = hyper_util::service::TowerToHyperService::new(router(state, metrics));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of descriptors, most likely: try again shortly, rather
            // than in a busy loop.
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let service = service.clone();
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn render_metrics(State(m): State<Arc<Metrics>>) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
}

async fn live(State(s): State<Arc<ProbeState>>) -> (StatusCode, String) {
    if s.live() {
        (StatusCode::OK, "ok\n".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "supervisor loop stalled\n".into(),
        )
    }
}

async fn ready(State(s): State<Arc<ProbeState>>) -> (StatusCode, String) {
    let ready = s.ready_workers.load(Ordering::Relaxed);
    let total = s.workers.load(Ordering::Relaxed);
    if s.shutting_down.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into())
    } else if s.ready() {
        (StatusCode::OK, format!("ready: {ready}/{total} workers\n"))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {ready}/{total} workers\n"),
        )
    }
}
