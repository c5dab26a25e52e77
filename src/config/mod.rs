//! Configuration: the `ampere.toml` / `ampere.json` types, their defaults and
//! documentation (the JSON Schema is generated from these structs), and the
//! resolution of file + flags + app detection into the [`Settings`] the
//! supervisor runs with.
//!
//! Precedence: command-line flags, then the config file, then defaults.

mod detect;
mod interpolate;
mod load;
mod units;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use detect::Launch;
pub use load::{Overrides, resolve};
pub use units::{Duration, EnvString, Port, Size, Workers};

/// The configuration file of one ampere runtime. Every table and key is
/// optional; unknown keys are errors.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The JSON Schema this file follows (for editors); ignored by ampere.
    #[serde(rename = "$schema", skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    pub server: ServerConfig,
    pub app: AppConfig,
    pub node: NodeConfig,
    /// Environment variables for the workers. They override the process
    /// environment and the `.env` file.
    pub env: BTreeMap<String, EnvString>,
    pub worker: WorkerConfig,
    pub health: HealthConfig,
    pub restart: RestartConfig,
    pub shutdown: ShutdownConfig,
    pub overload: OverloadConfig,
    pub balance: BalanceConfig,
    pub metrics: MetricsConfig,
    pub logger: LoggerConfig,
    pub telemetry: TelemetryConfig,
}

impl Config {
    /// Settings that parse but cannot work, alone or together: the key to
    /// point at (dotted) and what is wrong, with what to do.
    pub fn check_values(&self) -> std::result::Result<(), (&'static str, String)> {
        let beat = self.worker.heartbeat_interval;
        let (suspect, unresponsive) = (self.health.suspect_after, self.health.unresponsive_after);
        if beat.get() < std::time::Duration::from_millis(10) {
            return Err((
                "worker.heartbeat_interval",
                format!("{beat} is too short: use 10ms or more (default 500ms)"),
            ));
        }
        if suspect.get() <= beat.get() {
            return Err((
                "health.suspect_after",
                format!(
                    "{suspect} must be longer than worker.heartbeat_interval ({beat}), or every \
                     worker turns suspect between two heartbeats: make it at least 3 intervals"
                ),
            ));
        }
        if unresponsive.get() < suspect.get() {
            return Err((
                "health.unresponsive_after",
                format!("{unresponsive} must not be shorter than health.suspect_after ({suspect})"),
            ));
        }
        let fractions = [
            ("health.max_elu", self.health.max_elu),
            ("health.max_heap_used", self.health.max_heap_used),
        ];
        for (key, value) in fractions {
            if !(value > 0.0 && value <= 1.0) {
                return Err((
                    key,
                    format!(
                        "{value} is not a fraction above 0 and up to 1 (0.75 means 75%); to turn \
                         the check off, set [health] enabled = false"
                    ),
                ));
            }
        }
        if self.health.max_rss.is_some_and(|s| s.bytes() == 0) {
            return Err((
                "health.max_rss",
                "0B would replace every worker at once: leave it unset for no bound".into(),
            ));
        }
        let endpoint = self.telemetry.endpoint.as_str();
        let http_url = endpoint
            .parse::<hyper::Uri>()
            .is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
        if self.telemetry.enabled && !http_url {
            return Err((
                "telemetry.endpoint",
                format!(
                    "{endpoint:?} is not an http(s) URL: write it like \"http://collector:4318/v1/traces\""
                ),
            ));
        }
        let ratio = self.telemetry.sampling_ratio;
        if !(0.0..=1.0).contains(&ratio) {
            return Err((
                "telemetry.sampling_ratio",
                format!("{ratio} is not a fraction from 0 to 1 (0.1 records one trace in ten)"),
            ));
        }
        Ok(())
    }
}

/// Where the service listens and how many workers serve it.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on: "::" (all IPv4 and IPv6, as node's own
    /// `listen(port)`; all IPv4 where the kernel has no IPv6), "0.0.0.0"
    /// (all IPv4), "127.0.0.1", ...
    pub host: EnvString,
    /// TCP port of the service. The workers also get it as `PORT`.
    pub port: Port,
    /// Number of worker processes, or "auto" for one per CPU this process may
    /// use (honouring cgroup CPU quotas, as a container limit sets them).
    pub workers: Workers,
    /// How workers share the port. "reuseport": one SO_REUSEPORT listening
    /// socket per worker, the kernel spreads connections (Linux default).
    /// "shared": one listening socket accepted from by every worker (the
    /// default where SO_REUSEPORT does not balance load).
    pub listener: ListenerMode,
    /// Accept-queue length of each listening socket.
    pub backlog: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "::".into(),
            port: Port(3000),
            workers: Workers::Auto,
            listener: ListenerMode::default(),
            backlog: 511,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ListenerMode {
    Reuseport,
    Shared,
}

impl Default for ListenerMode {
    fn default() -> Self {
        if cfg!(target_os = "linux") {
            ListenerMode::Reuseport
        } else {
            ListenerMode::Shared
        }
    }
}

/// The Node.js app. Leave `entry` and `command` out to detect the app from
/// its package.json (Next.js, `main`, or a `start` script `node <file>`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AppConfig {
    /// Service name used in logs (default: package.json `name`, else the
    /// directory's name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The app's directory, relative to this file (default: the directory of
    /// this file, or the DIR given to `ampere start`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Script that node runs, relative to the app directory, e.g. "server.js".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<EnvString>,
    /// Arguments passed to the entry script.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<EnvString>,
    /// A command to run instead of `node <entry>`, e.g. ["npx", "tsx",
    /// "server.ts"]; the agent is then loaded through NODE_OPTIONS.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<EnvString>,
    /// A dotenv file loaded into the workers' environment, relative to the app
    /// directory (default ".env", if it exists). The process environment wins
    /// over it; the `[env]` table wins over both.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env_file: Option<PathBuf>,
}

/// The Node.js runtime the workers run on.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// The node executable: a path, or a name looked up on PATH.
    pub executable: EnvString,
    /// Options for node, before the script, e.g. ["--max-old-space-size=512"].
    pub options: Vec<EnvString>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            executable: "node".into(),
            options: Vec::new(),
        }
    }
}

/// Worker process lifecycle.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// How long a new worker may take to listen before it is killed and
    /// counted as a failed start.
    pub start_timeout: Duration,
    /// How often the agent in each worker sends a heartbeat (10ms or more,
    /// and shorter than `[health] suspect_after`).
    pub heartbeat_interval: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            start_timeout: Duration::from_secs(60),
            heartbeat_interval: Duration::from_millis(500),
        }
    }
}

/// Health checks, judged from the heartbeats of each worker's agent. A
/// worker found unhealthy is replaced: a new process starts in its slot
/// first, and the old one is drained (or killed, if its event loop is
/// blocked) once the new one listens.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Replace unhealthy workers at all.
    pub enabled: bool,
    /// No heartbeat for this long: the worker is suspect. New connections
    /// are steered to the other slots at once and a replacement starts.
    /// Longer than `[worker] heartbeat_interval` (best 3 intervals or more).
    pub suspect_after: Duration,
    /// No heartbeat for this long: the event loop is blocked. The worker is
    /// killed as soon as its replacement listens. (A suspect that recovers
    /// before this is drained gracefully instead.) Not shorter than
    /// `suspect_after`.
    pub unresponsive_after: Duration,
    /// Event-loop utilisation (above 0, up to 1) above which a worker is
    /// saturated...
    pub max_elu: f64,
    /// ...when it stays there this long.
    pub elu_grace: Duration,
    /// Fraction (above 0, up to 1) of V8's old-space limit that the heap
    /// may use...
    pub max_heap_used: f64,
    /// Resident memory a worker may use (none by default)...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rss: Option<Size>,
    /// ...for this many heartbeats in a row before it is replaced.
    pub memory_samples: u32,
    /// V8 old-space limit of each worker (node's --max-old-space-size).
    /// Unset: where a container (cgroup) limits memory, three quarters of
    /// each worker's share of it (64 MiB at least), so that a leaking
    /// worker reaches `max_heap_used` before the container runs out;
    /// elsewhere, or with the flag in `[node] options` or NODE_OPTIONS,
    /// node's own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_heap: Option<Size>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            enabled: true,
            suspect_after: Duration::from_millis(1500),
            unresponsive_after: Duration::from_secs(5),
            max_elu: 0.99,
            elu_grace: Duration::from_secs(30),
            // Measured (bench/faults.py, leak): a worker keeping 256 KiB per
            // request at 150 requests/s grows its heap by ~38 MiB/s; with a
            // 256 MiB old space, 0.85 and 2 heartbeats 500 ms apart fired at
            // 254 MiB, 50 ms before "heap out of memory". 0.75 leaves about
            // a second, and the worker stops taking requests at once.
            max_heap_used: 0.75,
            max_rss: None,
            memory_samples: 2,
            max_heap: None,
        }
    }
}

/// Admission control in the agent: an overloaded worker answers new requests
/// with 503, `Retry-After` and `Connection: close` at once, before any app
/// code runs, so that clients and load balancers go elsewhere instead of
/// queueing behind a saturated event loop.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct OverloadConfig {
    pub enabled: bool,
    /// Reject while a worker has this many requests in flight (0: no bound).
    pub max_inflight: u32,
    /// Reject while the event loop runs this late (0s: no bound). With
    /// `[balance] load_aware`, a slot whose
    /// queued connections would wait longer than this (100 ms when 0s) gets
    /// no new connections until its worker takes them.
    pub max_delay: Duration,
    /// Once the service is overloaded (some requests already get 503: an
    /// overload episode), the wait that queues are kept to instead of
    /// `max_delay`: behind the requests in flight in a worker whose event
    /// loop is saturated (never below two requests' measured cost), and,
    /// with `[balance] load_aware`, in a worker's accept queue (never below
    /// two turns of its loop). Beyond it a standing queue adds latency
    /// without adding throughput. 0s: `max_delay` throughout.
    pub target_delay: Duration,
    /// Latency first: hold every request's wait to `target_delay` once a
    /// worker's queue stands (its event loop has not waited for work once
    /// in `max_delay`), also in apps whose handlers run one after another
    /// (CPU-bound ones), where the requests in flight never show the
    /// queue; and let each worker accept up to eight new connections per
    /// turn of its event loop instead of one. Under sustained overload the
    /// p99 of the 200s falls two to four times, and about a sixth less is
    /// served (bench/README, "Latency first"). Off: throughput first.
    pub hold_target: bool,
    /// The `Retry-After` of the 503s.
    pub retry_after: Duration,
}

impl Default for OverloadConfig {
    fn default() -> Self {
        OverloadConfig {
            enabled: true,
            max_inflight: 1000,
            // A loop running 100 ms late means every request on it has
            // waited that long already; GC pauses stay well below.
            max_delay: Duration::from_millis(100),
            // A fifth of max_delay (see bench/overload for what it does at
            // twice an app's capacity).
            target_delay: Duration::from_millis(20),
            hold_target: false,
            retry_after: Duration::from_secs(1),
        }
    }
}

/// Load-aware balancing of connections over the workers of a service
/// (reuseport listeners only). Each mechanism can be switched off.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BalanceConfig {
    /// Steer new connections by the load the workers report: a slot gets a
    /// share in proportion to its measured capacity (requests per second
    /// per unit of event-loop utilisation), so a slower worker gets fewer
    /// connections and the event loops run equally busy. Off: every ready
    /// slot gets an equal share. Either way, slots that are starting,
    /// blocked, draining or overloaded get none.
    pub load_aware: bool,
    /// Keep-alive rebalancing: a worker whose event-loop utilisation is more
    /// than `tolerance` above the average answers some responses with
    /// `Connection: close`, so that those clients reconnect and are steered
    /// to a less busy worker.
    pub rebalance: bool,
    /// Relative excess of event-loop utilisation over the average (0.05 =
    /// 5%) that a worker may carry before it sheds connections.
    pub tolerance: f64,
    /// When every worker is overloaded, new connections go to a listener of
    /// the supervisor's own that answers 503 with `Retry-After` and
    /// `Connection: close` at once, without touching a worker.
    pub overflow: bool,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig {
            load_aware: true,
            rebalance: true,
            tolerance: 0.05,
            overflow: true,
        }
    }
}

/// The supervisor's own HTTP server: Kubernetes probes (`/live`, `/ready`,
/// `/status`) and Prometheus `/metrics`. Answered by the supervisor, never
/// by a worker.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub enabled: bool,
    /// Address of the probe and metrics server; "::" as `server.host`.
    pub host: EnvString,
    pub port: Port,
    /// Time every request in the agent for `http_request_duration_seconds`
    /// (two clock reads and a bucket increment per request).
    pub requests: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            host: "::".into(),
            port: Port(9090),
            requests: true,
        }
    }
}

/// Restarts of crashed workers: exponential backoff.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RestartConfig {
    /// Delay before the second consecutive restart; the first restart after a
    /// stable run is immediate. Each further failure doubles the delay.
    pub delay: Duration,
    /// Upper bound of the delay.
    pub max_delay: Duration,
    /// A worker that stays up this long after becoming ready has run stably:
    /// its next crash starts the backoff afresh.
    pub reset_after: Duration,
    /// Once every worker has failed this many times in a row and none is
    /// serving, ampere stops with exit status 1 instead of retrying for
    /// ever, so that the platform sees the crash loop (Kubernetes'
    /// CrashLoopBackOff, systemd's `Restart=`). With the default backoff, 10
    /// failures take about half a minute. 0: never give up.
    pub give_up_after: u32,
}

impl Default for RestartConfig {
    fn default() -> Self {
        RestartConfig {
            delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(15),
            reset_after: Duration::from_secs(30),
            give_up_after: 10,
        }
    }
}

/// Graceful shutdown on SIGTERM, SIGINT or SIGQUIT.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long in-flight requests may take to finish; workers still running
    /// after it are killed. Keep it below Kubernetes'
    /// terminationGracePeriodSeconds (30s by default), with `delay`.
    pub timeout: Duration,
    /// How long to go on serving after the signal, with `/ready` already
    /// answering 503, before new connections are refused: Kubernetes sends
    /// SIGTERM as it takes the pod out of its Service's endpoints, and
    /// kube-proxy and ingresses go on sending for a few seconds. Unset: 5s
    /// where Kubernetes runs ampere (KUBERNETES_SERVICE_HOST is set), else
    /// 0s. Workers are still replaced and judged meanwhile; a second
    /// signal stops at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay: Option<Duration>,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            timeout: Duration::from_secs(10),
            delay: None,
        }
    }
}

impl ShutdownConfig {
    /// The delay in effect: `delay`, or the default for where ampere runs.
    pub fn delay(&self) -> std::time::Duration {
        match self.delay {
            Some(d) => d.get(),
            None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => {
                std::time::Duration::from_secs(5)
            }
            None => std::time::Duration::ZERO,
        }
    }
}

/// Traces: the agent records a server span for every sampled request (W3C
/// `traceparent` in, the span's own context passed on to the app) and the
/// supervisor exports them over OTLP/HTTP (protobuf). Off by default.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    pub enabled: bool,
    /// OTLP/HTTP traces endpoint (an OpenTelemetry Collector, Jaeger, Tempo...).
    pub endpoint: EnvString,
    /// `service.name` of the spans; the service's name when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_name: Option<EnvString>,
    /// Fraction (0..1) of requests without a `traceparent` that start a
    /// recorded trace. Requests with one follow its sampled flag.
    pub sampling_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            enabled: false,
            endpoint: "http://localhost:4318/v1/traces".into(),
            service_name: None,
            sampling_ratio: 1.0,
        }
    }
}

/// The log stream on ampere's stdout.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LoggerConfig {
    /// Lowest level written: trace, debug, info, warn, error, fatal.
    pub level: LogLevel,
    /// "json": one JSON object per line (pino-compatible). "pretty": for
    /// people. "auto": pretty on a terminal, JSON otherwise.
    pub format: LogFormat,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Deserialize, Serialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Trace,
    Debug,
    #[default]
    Info,
    Warn,
    Error,
    Fatal,
}

impl LogLevel {
    /// pino's numeric level.
    pub fn number(self) -> u8 {
        match self {
            LogLevel::Trace => 10,
            LogLevel::Debug => 20,
            LogLevel::Info => 30,
            LogLevel::Warn => 40,
            LogLevel::Error => 50,
            LogLevel::Fatal => 60,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Auto,
    Json,
    Pretty,
}

/// Everything resolved: what the supervisor runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The config file that was read, if any.
    pub source: Option<PathBuf>,
    pub config: Config,
    /// Service name for logs.
    pub service: String,
    pub app_dir: PathBuf,
    pub addr: SocketAddr,
    /// Where the probes are served; None when `metrics.enabled = false`.
    pub metrics_addr: Option<SocketAddr>,
    /// "::" became "0.0.0.0" for the service or the probes: the kernel has
    /// no IPv6.
    pub no_ipv6: bool,
    pub workers: usize,
    pub node: PathBuf,
    pub launch: Launch,
    /// The workers' environment, complete (process env, .env, [env], PORT).
    pub env: BTreeMap<String, String>,
}

impl Settings {
    pub fn host(&self) -> IpAddr {
        self.addr.ip()
    }
}

/// The JSON Schema of the config file.
pub fn schema() -> String {
    let schema = schemars::schema_for!(Config);
    serde_json::to_string_pretty(&schema).expect("a schema always serializes")
}
