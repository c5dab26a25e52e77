//! Prometheus metrics, rendered at scrape time from the latest state the
//! supervisor published: its own numbers and each worker's last heartbeat.
//! A scrape never waits on a worker.
//!
//! Per-worker series carry `service` and `worker` (the slot) labels and use
//! the names prom-client and Watt users already chart
//! (`nodejs_eventloop_utilization`, `nodejs_heap_size_used_bytes`, ...).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::telemetry::logs::Stall;
use crate::worker::Heartbeat;
use crate::worker::control::{HTTP_BUCKETS, HttpDurations, Rejected};

/// One slot's current worker, as of the last event.
#[derive(Debug, Clone)]
pub struct WorkerSample {
    pub slot: usize,
    pub heartbeat: Option<Heartbeat>,
    /// Request durations in this slot since the runtime started.
    pub http: Vec<HttpDurations>,
    /// Requests the agents in this slot answered 503 (overload).
    pub rejected: Rejected,
    /// Keep-alive connections the agents in this slot closed to rebalance.
    pub rebalanced: u64,
    /// The slot's share (0..1) of new connections in the steering program.
    pub share: f64,
    /// The current process, and its state: starting, ready, draining,
    /// suspect, or down.
    pub pid: Option<u32>,
    pub state: &'static str,
    /// Since when the current process runs.
    pub since: Option<Instant>,
    /// Restarts and replacements in this slot.
    pub restarts: u64,
    /// Requests per second over the last heartbeat interval.
    pub rps: Option<f64>,
    /// Connections waiting in the slot's accept queue, last sampled.
    pub queued: u32,
    /// Times new connections were steered away because the queue stalled.
    pub queue_stalls: u64,
    /// The share of the last heartbeat interval that the worker's main
    /// thread ran or waited to run, where the kernel says.
    pub cpu_demand: Option<f64>,
}

/// What the supervisor publishes for the metrics endpoint.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub service: String,
    pub workers: Vec<WorkerSample>,
    /// Processes by state (starting, ready, draining, suspect).
    pub states: BTreeMap<&'static str, u64>,
    /// Restarts and replacements by reason since start.
    pub restarts: BTreeMap<&'static str, u64>,
    /// Supervisor log records dropped because stdout did not keep up
    /// (worker output is never dropped: it waits).
    pub log_dropped: u64,
    /// The overflow listener's share (0..1) of new connections.
    pub overflow_share: f64,
}

pub struct Metrics {
    started: Instant,
    snapshot: Mutex<Snapshot>,
    /// Requests the overflow listener answered 503.
    overflow: AtomicU64,
    spans_exported: AtomicU64,
    spans_dropped: AtomicU64,
    /// How long ampere's stdout has held the log stream up.
    stdout: OnceLock<Arc<Stall>>,
}

type Labels = Vec<(&'static str, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            started: Instant::now(),
            snapshot: Mutex::new(Snapshot::default()),
            overflow: AtomicU64::new(0),
            spans_exported: AtomicU64::new(0),
            spans_dropped: AtomicU64::new(0),
            stdout: OnceLock::new(),
        }
    }

    /// Reports the time the log stream waited on stdout.
    pub fn watch_stdout(&self, stall: Arc<Stall>) {
        let _ = self.stdout.set(stall);
    }

    pub fn count_spans_exported(&self, n: u64) {
        self.spans_exported.fetch_add(n, Ordering::Relaxed);
    }

    /// Spans lost: the export queue was full or the collector failed.
    pub fn count_spans_dropped(&self, n: u64) {
        self.spans_dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// What the supervisor published last.
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// One request answered 503 by the overflow listener.
    pub fn count_overflow(&self) {
        self.overflow.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests the overflow listener answered so far.
    pub fn overflowed(&self) -> u64 {
        self.overflow.load(Ordering::Relaxed)
    }

    pub fn publish(&self, snapshot: Snapshot) {
        if let Ok(mut s) = self.snapshot.lock() {
            *s = snapshot;
        }
    }

    /// The Prometheus text exposition of everything known now.
    pub fn render(&self) -> String {
        let snap = self.snapshot.lock().map(|s| s.clone()).unwrap_or_default();
        let mut registry = Registry::default();
        let service = snap.service.clone();

        let workers = family::<Gauge>(&mut registry, "ampere_workers", "Worker processes by state");
        for (state, n) in &snap.states {
            workers
                .get_or_create(&vec![
                    ("service", service.clone()),
                    ("state", (*state).to_owned()),
                ])
                .set(*n as i64);
        }
        let restarts = family::<Counter>(
            &mut registry,
            "ampere_worker_restarts",
            "Worker restarts and replacements by reason",
        );
        for (reason, n) in &snap.restarts {
            restarts
                .get_or_create(&vec![
                    ("service", service.clone()),
                    ("reason", (*reason).to_owned()),
                ])
                .inc_by(*n);
        }
        let dropped = Counter::<u64>::default();
        dropped.inc_by(snap.log_dropped);
        registry.register(
            "ampere_log_records_dropped",
            "Supervisor log records dropped because stdout did not keep up",
            dropped,
        );
        if let Some(stall) = self.stdout.get() {
            let blocked = Counter::<f64, AtomicU64>::default();
            blocked.inc_by(stall.blocked_seconds(Instant::now()));
            registry.register(
                "ampere_log_stdout_blocked_seconds",
                "Time the log stream waited for ampere's stdout to be read (worker output waits meanwhile)",
                blocked,
            );
        }
        for (name, help, n) in [
            (
                "ampere_spans_exported",
                "Server spans exported over OTLP",
                &self.spans_exported,
            ),
            (
                "ampere_spans_dropped",
                "Server spans dropped: export queue full or collector failing",
                &self.spans_dropped,
            ),
        ] {
            let c = Counter::<u64>::default();
            c.inc_by(n.load(Ordering::Relaxed));
            registry.register(name, help, c);
        }
        let uptime = FloatGauge::default();
        uptime.set(self.started.elapsed().as_secs_f64());
        registry.register(
            "ampere_uptime_seconds",
            "Seconds since the supervisor started",
            uptime,
        );
        let (rss, cpu) = own_usage();
        let own_rss = Gauge::<i64>::default();
        own_rss.set(rss as i64);
        registry.register(
            "ampere_supervisor_resident_memory_bytes",
            "Resident memory of the supervisor process",
            own_rss,
        );
        let own_cpu = Counter::<f64, AtomicU64>::default();
        own_cpu.inc_by(cpu);
        registry.register(
            "ampere_supervisor_cpu_seconds",
            "CPU time (user + system) of the supervisor process",
            own_cpu,
        );

        let elu = family::<FloatGauge>(
            &mut registry,
            "nodejs_eventloop_utilization",
            "Event-loop utilisation over the last heartbeat interval",
        );
        let demand = family::<FloatGauge>(
            &mut registry,
            "ampere_worker_cpu_demand",
            "Share of the last heartbeat interval that the worker's main thread ran on a CPU or waited for one (/proc/PID/schedstat); above nodejs_eventloop_utilization when the worker waits for CPU (more workers than cores, a CPU limit)",
        );
        let lag_p50 = family::<FloatGauge>(
            &mut registry,
            "nodejs_eventloop_lag_p50_seconds",
            "Event-loop delay, 50th percentile",
        );
        let lag_p99 = family::<FloatGauge>(
            &mut registry,
            "nodejs_eventloop_lag_p99_seconds",
            "Event-loop delay, 99th percentile",
        );
        let lag_max = family::<FloatGauge>(
            &mut registry,
            "nodejs_eventloop_lag_max_seconds",
            "Event-loop delay, maximum",
        );
        let heap_used = family::<Gauge>(
            &mut registry,
            "nodejs_heap_size_used_bytes",
            "V8 heap in use",
        );
        let heap_total = family::<Gauge>(
            &mut registry,
            "nodejs_heap_size_total_bytes",
            "V8 heap allocated",
        );
        let heap_limit = family::<Gauge>(
            &mut registry,
            "nodejs_heap_space_limit_bytes",
            "V8 old-space limit",
        );
        let rss = family::<Gauge>(
            &mut registry,
            "process_resident_memory_bytes",
            "Resident memory of the worker",
        );
        let cpu = family::<Counter<f64, AtomicU64>>(
            &mut registry,
            "process_cpu_seconds",
            "CPU time (user + system) of the worker",
        );
        let inflight = family::<Gauge>(
            &mut registry,
            "http_requests_in_flight",
            "Requests being handled",
        );
        let requests = family::<Counter>(
            &mut registry,
            "http_requests",
            "Requests received by the worker since it started",
        );
        let durations = family::<Durations>(
            &mut registry,
            "http_request_duration_seconds",
            "Request durations (from the request event to the response's close), by method and status code",
        );
        let rejected = family::<Counter>(
            &mut registry,
            "ampere_rejected_requests",
            "Requests answered 503 before the app, by reason: inflight, delay (in a worker), all_overloaded (the overflow listener, worker=\"overflow\")",
        );
        rejected
            .get_or_create(&vec![
                ("service", service.clone()),
                ("worker", "overflow".to_owned()),
                ("reason", "all_overloaded".to_owned()),
            ])
            .inc_by(self.overflow.load(Ordering::Relaxed));
        let share = family::<FloatGauge>(
            &mut registry,
            "ampere_steering_share",
            "Share (0..1) of new connections the steering program gives each slot (worker=\"overflow\": the overflow listener)",
        );
        share
            .get_or_create(&vec![
                ("service", service.clone()),
                ("worker", "overflow".to_owned()),
            ])
            .set(snap.overflow_share);
        let rebalanced = family::<Counter>(
            &mut registry,
            "ampere_rebalanced_connections",
            "Keep-alive connections closed (Connection: close) to move load to a less busy worker",
        );
        let conns = family::<Gauge>(
            &mut registry,
            "ampere_open_connections",
            "Connections open on the worker",
        );
        let queued = family::<Gauge>(
            &mut registry,
            "ampere_accept_queue_connections",
            "Connections waiting in the slot's accept queue (sampled every 10 ms while steering by load)",
        );
        let stalls = family::<Counter>(
            &mut registry,
            "ampere_accept_queue_stalls",
            "Times new connections were steered away from a slot whose queued connections would wait longer than [overload] max_delay",
        );
        for w in &snap.workers {
            let labels: Labels = vec![("service", service.clone()), ("worker", w.slot.to_string())];
            share.get_or_create(&labels).set(w.share);
            queued.get_or_create(&labels).set(i64::from(w.queued));
            stalls.get_or_create(&labels).inc_by(w.queue_stalls);
            rebalanced.get_or_create(&labels).inc_by(w.rebalanced);
            for (reason, n) in [
                ("inflight", w.rejected.inflight),
                ("delay", w.rejected.delay),
            ] {
                let labels: Labels = vec![
                    ("service", service.clone()),
                    ("worker", w.slot.to_string()),
                    ("reason", reason.to_owned()),
                ];
                rejected.get_or_create(&labels).inc_by(n);
            }
            for d in &w.http {
                let labels: Labels = vec![
                    ("service", service.clone()),
                    ("worker", w.slot.to_string()),
                    ("method", d.method.clone()),
                    ("status_code", d.status.to_string()),
                ];
                durations.get_or_create(&labels).set(d);
            }
        }
        for w in &snap.workers {
            let Some(hb) = &w.heartbeat else { continue };
            let labels: Labels = vec![("service", service.clone()), ("worker", w.slot.to_string())];
            elu.get_or_create(&labels).set(hb.elu);
            if let Some(d) = w.cpu_demand {
                demand.get_or_create(&labels).set(d);
            }
            lag_p50.get_or_create(&labels).set(hb.delay_p50_ms / 1e3);
            lag_p99.get_or_create(&labels).set(hb.delay_p99_ms / 1e3);
            lag_max.get_or_create(&labels).set(hb.delay_max_ms / 1e3);
            heap_used.get_or_create(&labels).set(hb.heap_used as i64);
            heap_total.get_or_create(&labels).set(hb.heap_total as i64);
            heap_limit.get_or_create(&labels).set(hb.heap_limit as i64);
            rss.get_or_create(&labels).set(hb.rss as i64);
            cpu.get_or_create(&labels).inc_by(hb.cpu_us as f64 / 1e6);
            inflight.get_or_create(&labels).set(hb.inflight as i64);
            requests.get_or_create(&labels).inc_by(hb.requests);
            conns.get_or_create(&labels).set(hb.conns as i64);
        }

        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A histogram whose buckets were counted elsewhere (by the agents): set,
/// not observed.
#[derive(Debug, Default)]
struct Durations(Mutex<(f64, Vec<u64>)>);

impl Durations {
    fn set(&self, d: &HttpDurations) {
        if let Ok(mut inner) = self.0.lock() {
            *inner = (d.sum, d.counts.clone());
        }
    }
}

impl prometheus_client::metrics::TypedMetric for Durations {
    const TYPE: prometheus_client::metrics::MetricType =
        prometheus_client::metrics::MetricType::Histogram;
}

impl prometheus_client::encoding::EncodeMetric for Durations {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        let (sum, counts) = self.0.lock().map(|i| i.clone()).unwrap_or_default();
        // Per-bucket counts; the encoder makes them cumulative. The last
        // bound is +Inf.
        let buckets: Vec<(f64, u64)> = HTTP_BUCKETS
            .iter()
            .copied()
            // Written as le="+Inf" (only infinity is).
            .chain(std::iter::once(f64::INFINITY))
            .zip(counts.iter().copied().chain(std::iter::repeat(0)))
            .collect();
        let count = counts.iter().sum();
        encoder
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
}

/// Registers a labelled family and returns a handle to fill it.
fn family<M>(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, M>
where
    M: prometheus_client::metrics::TypedMetric
        + prometheus_client::encoding::EncodeMetric
        + Default
        + Send
        + Sync
        + std::fmt::Debug
        + 'static,
{
    let family = Family::<Labels, M>::default();
    registry.register(name, help, family.clone());
    family
}

/// This process's resident memory (bytes) and CPU time (seconds).
fn own_usage() -> (u64, f64) {
    use nix::unistd::{SysconfVar, sysconf};
    let page = sysconf(SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |v| v as u64);
    let ticks = sysconf(SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |v| v as f64);
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * page);
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s
                .rsplit(") ")
                .next()?
                .split_whitespace()
                .collect::<Vec<_>>();
            let utime: f64 = rest.get(11)?.parse().ok()?;
            let stime: f64 = rest.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks)
        })
        .unwrap_or(0.0);
    (rss, cpu)
}
