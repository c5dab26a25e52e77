//! Management: the admin API that a running runtime serves on a private
//! Unix socket, the client the CLI talks to it with, and the discovery of
//! running runtimes through their runtime directories.
//!
//! The socket is `<runtime dir>/admin.sock` (directory 0700, socket 0600;
//! see [`crate::agent::RuntimeDir`]), and the server also checks each
//! connection's peer credentials: only the same user, or root, gets in.
//! Routes are JSON over HTTP/1.1, versioned under `/v1/`.

pub mod client;
pub mod discovery;
pub mod server;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// File name of the admin socket in a runtime directory.
pub const SOCKET: &str = "admin.sock";

/// `GET /v1/runtime`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuntimeInfo {
    pub pid: u32,
    pub version: String,
    pub cwd: String,
    /// Unix epoch milliseconds.
    pub started_ms: u64,
    pub uptime_s: f64,
    pub services: Vec<ServiceInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub name: String,
    pub address: String,
    pub workers: usize,
    pub app: String,
    pub dir: String,
    pub config: Option<String>,
    pub metrics: Option<String>,
}

/// `GET /v1/workers`: one per slot.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub service: String,
    pub slot: usize,
    pub pid: Option<u32>,
    /// starting, ready, draining, suspect, or down (no process, waiting to
    /// restart).
    pub state: String,
    pub uptime_s: Option<f64>,
    pub restarts: u64,
    pub elu: Option<f64>,
    pub delay_p99_ms: Option<f64>,
    pub heap_used: Option<u64>,
    pub rss: Option<u64>,
    pub inflight: Option<u64>,
    pub rps: Option<f64>,
}

/// `POST /v1/inject`: an HTTP request to send to the service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InjectRequest {
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub body: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InjectResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// What the admin API asks of the supervisor.
pub enum Command {
    /// Rolling restart of the service (`None`: every service).
    Restart {
        service: Option<String>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Re-read the config and apply what changed; the changes, or why
    /// nothing was applied.
    Reload {
        reply: oneshot::Sender<Result<Vec<String>, String>>,
    },
    /// Graceful shutdown, as on SIGTERM.
    Stop,
}
