//! The admin API server: axum on the runtime's Unix socket. It reads what
//! the supervisor publishes (worker state, metrics, the log tap) and sends
//! it commands over a channel; nothing here waits on a worker, except
//! `inject`, which is a request to the service.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, serve::Listener};
use serde::Deserialize;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

use super::{Command, InjectRequest, InjectResponse, RuntimeInfo, SOCKET, WorkerStatus};
use crate::error::Error;
use crate::telemetry::logs::Tap;
use crate::telemetry::metrics::Metrics;

/// What the API serves from.
pub struct Admin {
    pub info: RuntimeInfo,
    pub started: Instant,
    pub metrics: Arc<Metrics>,
    pub tap: Arc<Tap>,
    /// The effective config, with secrets redacted (a reload replaces it).
    pub config: watch::Receiver<serde_json::Value>,
    pub commands: mpsc::UnboundedSender<Command>,
    /// Where `inject` connects: the service's address.
    pub service_addr: SocketAddr,
}

/// Binds `<dir>/admin.sock`, readable and writable by the owner only.
pub fn bind(dir: &Path) -> Result<(std::os::unix::net::UnixListener, PathBuf), Error> {
    let path = dir.join(SOCKET);
    let context = |e| Error::io(format!("creating the admin socket {}", path.display()), e);
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path).map_err(context)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(context)?;
    listener.set_nonblocking(true).map_err(context)?;
    Ok((listener, path))
}

/// Serves the API until the runtime ends.
pub async fn serve(
    listener: std::os::unix::net::UnixListener,
    admin: Arc<Admin>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/v1/runtime", get(runtime))
        .route("/v1/workers", get(workers))
        .route("/v1/metrics", get(metrics))
        .route("/v1/config", get(config))
        .route("/v1/logs", get(logs))
        .route("/v1/restart", post(restart))
        .route("/v1/reload", post(reload))
        .route("/v1/stop", post(stop))
        .route("/v1/inject", post(inject))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route; see /v1/...") })
        .with_state(admin);
    let listener = SameUser {
        inner: UnixListener::from_std(listener)?,
        uid: nix::unistd::geteuid().as_raw(),
    };
    axum::serve(listener, app).await
}

/// Accepts only connections from this process's user or root: the
/// directory and socket modes already keep others out, this holds even if
/// they are loosened.
struct SameUser {
    inner: UnixListener,
    uid: u32,
}

impl Listener for SameUser {
    type Io = UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => match stream.peer_cred() {
                    Ok(cred) if cred.uid() == self.uid || cred.uid() == 0 => {
                        return (stream, addr);
                    }
                    Ok(cred) => tracing::warn!(
                        peer_uid = cred.uid(),
                        peer_pid = cred.pid(),
                        "admin socket: refused a connection from another user"
                    ),
                    Err(e) => tracing::warn!(error = %e, "admin socket: no peer credentials"),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "admin socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

async fn runtime(State(a): State<Arc<Admin>>) -> Json<RuntimeInfo> {
    let mut info = a.info.clone();
    info.uptime_s = a.started.elapsed().as_secs_f64();
    let workers = a.metrics.snapshot().workers.len();
    for s in &mut info.services {
        s.workers = workers;
    }
    Json(info)
}

async fn workers(State(a): State<Arc<Admin>>) -> Json<Vec<WorkerStatus>> {
    let snap = a.metrics.snapshot();
    let now = Instant::now();
    let list = snap
        .workers
        .iter()
        .map(|w| {
            let hb = w.heartbeat.as_ref();
            WorkerStatus {
                service: snap.service.clone(),
                slot: w.slot,
                pid: w.pid,
                state: w.state.to_owned(),
                uptime_s: w.since.map(|t| now.duration_since(t).as_secs_f64()),
                restarts: w.restarts,
                elu: hb.map(|h| h.elu),
                delay_p99_ms: hb.map(|h| h.delay_p99_ms),
                heap_used: hb.map(|h| h.heap_used),
                rss: hb.map(|h| h.rss),
                inflight: hb.map(|h| h.inflight),
                rps: w.rps,
            }
        })
        .collect();
    Json(list)
}

async fn metrics(State(a): State<Arc<Admin>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        a.metrics.render(),
    )
        .into_response()
}

async fn config(State(a): State<Arc<Admin>>) -> Json<serde_json::Value> {
    Json(a.config.borrow().clone())
}

#[derive(Deserialize)]
struct LogsQuery {
    /// Recent records to send first.
    #[serde(default = "default_lines")]
    lines: usize,
    /// Keep the response open and stream new records.
    #[serde(default)]
    follow: bool,
    /// Only records of this service (and the supervisor's own).
    service: Option<String>,
}

fn default_lines() -> usize {
    100
}

/// A record belongs to `service` if it names it, or names no service at all
/// (supervisor events about the runtime).
fn belongs(line: &str, service: Option<&str>) -> bool {
    let Some(service) = service else {
        return true;
    };
    let quoted = serde_json::to_string(service).unwrap_or_default();
    line.contains(&format!("\"service\":{quoted}")) || !line.contains("\"service\":")
}

async fn logs(State(a): State<Arc<Admin>>, Query(q): Query<LogsQuery>) -> Response {
    let service = q.service.clone();
    let recent: String = a
        .tap
        .recent(q.lines)
        .iter()
        .filter(|l| belongs(l, service.as_deref()))
        .map(|l| &**l)
        .collect();
    let ndjson = [(header::CONTENT_TYPE, "application/x-ndjson")];
    if !q.follow {
        return (ndjson, recent).into_response();
    }
    let rx = a.tap.subscribe();
    let first =
        futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(recent.into()) });
    let live = futures_util::stream::unfold((rx, service), |(mut rx, service)| async move {
        loop {
            match rx.recv().await {
                Ok(line) if belongs(&line, service.as_deref()) => {
                    return Some((Ok(Bytes::from(line.to_string())), (rx, service)));
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    let note = format!(
                        "{{\"level\":40,\"name\":\"ampere\",\"msg\":\"ampere logs fell behind: {n} records skipped\"}}\n"
                    );
                    return Some((Ok(Bytes::from(note)), (rx, service)));
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    let body = Body::from_stream(futures_util::StreamExt::chain(first, live));
    (ndjson, body).into_response()
}

#[derive(Deserialize)]
struct RestartQuery {
    service: Option<String>,
}

async fn restart(State(a): State<Arc<Admin>>, Query(q): Query<RestartQuery>) -> Response {
    let (reply, wait) = oneshot::channel();
    let service = q.service.clone();
    if a.commands
        .send(Command::Restart { service, reply })
        .is_err()
    {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the runtime is stopping");
    }
    match wait.await {
        Ok(Ok(())) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "restarting": q.service.unwrap_or_else(|| "all".into()) })),
        )
            .into_response(),
        Ok(Err(e)) => error(StatusCode::NOT_FOUND, e),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "the runtime is stopping"),
    }
}

async fn reload(State(a): State<Arc<Admin>>) -> Response {
    let (reply, wait) = oneshot::channel();
    if a.commands.send(Command::Reload { reply }).is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the runtime is stopping");
    }
    match wait.await {
        Ok(Ok(changes)) => Json(serde_json::json!({ "changes": changes })).into_response(),
        Ok(Err(e)) => error(StatusCode::UNPROCESSABLE_ENTITY, e),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "the runtime is stopping"),
    }
}

async fn stop(State(a): State<Arc<Admin>>) -> Response {
    if a.commands.send(Command::Stop).is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the runtime is stopping");
    }
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "stopping": true })),
    )
        .into_response()
}

/// Sends the request to the service's port on this machine: the kernel
/// steers it to one of the workers, as it would any client's.
async fn inject(State(a): State<Arc<Admin>>, Json(req): Json<InjectRequest>) -> Response {
    // With no worker ready, the request would wait in an accept queue until
    // one is, or until the timeout: say so at once instead.
    let states = a.metrics.snapshot().states;
    if states.get("ready").copied().unwrap_or(0) == 0 {
        let others: Vec<String> = states
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(state, n)| format!("{n} {state}"))
            .collect();
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "no worker is ready to take the request ({}); `ampere status` says why",
                if others.is_empty() {
                    "no workers".to_owned()
                } else {
                    others.join(", ")
                }
            ),
        );
    }
    let mut addr = a.service_addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    match tokio::time::timeout(Duration::from_secs(30), super::client::http(addr, &req)).await {
        Ok(Ok(r)) => Json::<InjectResponse>(r).into_response(),
        Ok(Err(e)) => error(StatusCode::BAD_GATEWAY, format!("request to {addr}: {e}")),
        Err(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            format!("request to {addr}: no response in 30s"),
        ),
    }
}
