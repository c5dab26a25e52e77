//! The control channel between the supervisor and the agent in one worker:
//! an inherited socketpair carrying newline-delimited JSON, one message per
//! line, in both directions.

use serde::{Deserialize, Serialize};

/// Longest message accepted from an agent; a longer line is a broken agent.
pub const MAX_LINE: usize = 1 << 20;

/// What the agent reports.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    /// The app listens on the service port: the worker is ready.
    Listening {
        #[serde(default)]
        node: Option<String>,
        /// The process that listens: a child of the one ampere started
        /// when that is a wrapper.
        #[serde(default)]
        pid: Option<u32>,
    },
    /// The app listens on another TCP port, which ampere does not serve.
    ListenOther {
        port: u16,
    },
    Heartbeat(Heartbeat),
    /// The worker stopped accepting and its last connection closed.
    Drained,
    /// The agent answers 503: sent at the first rejection and every 100 ms
    /// while they go on, until the next heartbeat; again after a heartbeat
    /// that counted none.
    Overloaded {
        #[serde(default)]
        reason: String,
        /// Whether requests would wait longer than `max_delay` (or past
        /// `max_inflight`): overload. False when they are rejected only
        /// because an episode holds queues to `target_delay`, which must
        /// not make the episode last longer.
        #[serde(default = "yes")]
        beyond_max: bool,
    },
    /// Server spans of finished requests, batched.
    Spans {
        spans: Vec<AgentSpan>,
    },
    /// The answer to a `ping`: the event loop got to I/O.
    Pong,
    /// The event loop waits for work although this worker rejected requests
    /// lately (or the service is in an overload episode), and would let a
    /// new request in: new connections should come to it again.
    Hungry,
    /// The app closed its server on the service port by itself (not a
    /// drain): the process takes no more connections.
    Closed,
    /// Anything newer than this supervisor knows.
    #[serde(other)]
    Unknown,
}

/// One health sample, sent every `worker.heartbeat_interval`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Heartbeat {
    /// Event-loop utilisation over the interval, 0..1.
    pub elu: f64,
    /// The interval `elu` covers, in milliseconds.
    pub interval_ms: f64,
    pub delay_p50_ms: f64,
    pub delay_p99_ms: f64,
    pub delay_max_ms: f64,
    pub heap_used: u64,
    pub heap_total: u64,
    /// V8's old-space limit, where it fails with "heap out of memory".
    pub heap_limit: u64,
    pub rss: u64,
    /// Requests being handled now.
    pub inflight: u64,
    /// Requests since the worker started.
    pub requests: u64,
    /// CPU time (user + system) since the worker started, in microseconds.
    pub cpu_us: u64,
    /// Request durations since the previous heartbeat.
    pub http: Vec<HttpDurations>,
    /// Requests answered 503 by the agent since the previous heartbeat.
    pub rejected: Rejected,
    /// Connections open now.
    pub conns: u64,
    /// The event loop's busy time per finished request, smoothed (0 until
    /// ten requests finished): with the requests in flight, the agent's
    /// estimate of how long a new request would wait.
    pub cost_ms: f64,
    /// Keep-alive connections closed on a `shed` order since the previous
    /// heartbeat.
    pub shed: u64,
}

/// One request's server span, as the agent records it.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct AgentSpan {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits.
    pub span_id: String,
    /// From the request's `traceparent`, if it had one.
    pub parent_span_id: Option<String>,
    pub method: String,
    pub path: String,
    /// The route pattern, where the framework says (Express `req.route`).
    pub route: Option<String>,
    pub status: u16,
    /// Microseconds since the Unix epoch.
    pub start_us: u64,
    pub end_us: u64,
}

/// Early rejections by reason.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct Rejected {
    /// In-flight requests at `overload.max_inflight`.
    pub inflight: u64,
    /// Event-loop delay over `overload.max_delay`.
    pub delay: u64,
}

impl Rejected {
    pub fn total(&self) -> u64 {
        self.inflight + self.delay
    }
}

/// Durations of the requests with one method and status code, counted in
/// the buckets of [`HTTP_BUCKETS`] (plus one for longer ones).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct HttpDurations {
    pub method: String,
    pub status: u16,
    /// Seconds, summed.
    pub sum: f64,
    pub counts: Vec<u64>,
}

/// Upper bounds (seconds) of the agent's duration buckets: prom-client's
/// defaults. Keep in step with `BUCKETS` in agent/agent.js.
pub const HTTP_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// What the supervisor asks of the agent.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SupervisorMessage {
    /// Stop accepting, finish in-flight requests with `Connection: close`,
    /// close idle keep-alive connections (at once when `urgent`, else after
    /// a grace period), then report `drained`.
    Drain { urgent: bool },
    /// Close this many keep-alive connections, one per response
    /// (`Connection: close`), to move load to a less busy worker. Replaces
    /// any earlier order not yet carried out.
    Shed { connections: u64 },
    /// Answer `pong` (sent while connections wait in the slot's queue).
    Ping,
    /// An overload episode of the service began (`on`) or ended: keep
    /// queues to `[overload] target_delay` while it lasts.
    Pressure { on: bool },
}

/// Serde's default for flags that older agents leave out.
fn yes() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_agent_messages() {
        let m: AgentMessage =
            serde_json::from_str(r#"{"type":"listening","pid":1,"node":"v20"}"#).unwrap();
        assert!(matches!(m, AgentMessage::Listening { .. }));
        let m: AgentMessage =
            serde_json::from_str(r#"{"type":"heartbeat","elu":0.5,"rss":10}"#).unwrap();
        assert!(matches!(m, AgentMessage::Heartbeat(h) if h.rss == 10));
        let m: AgentMessage =
            serde_json::from_str(r#"{"type":"overloaded","reason":"delay"}"#).unwrap();
        assert!(matches!(
            m,
            AgentMessage::Overloaded {
                beyond_max: true,
                ..
            }
        ));
        let m: AgentMessage =
            serde_json::from_str(r#"{"type":"overloaded","reason":"delay","beyond_max":false}"#)
                .unwrap();
        assert!(matches!(
            m,
            AgentMessage::Overloaded {
                beyond_max: false,
                ..
            }
        ));
        let m: AgentMessage = serde_json::from_str(r#"{"type":"hungry"}"#).unwrap();
        assert!(matches!(m, AgentMessage::Hungry));
        let m: AgentMessage = serde_json::from_str(r#"{"type":"future"}"#).unwrap();
        assert!(matches!(m, AgentMessage::Unknown));
        assert_eq!(
            serde_json::to_string(&SupervisorMessage::Drain { urgent: true }).unwrap(),
            r#"{"type":"drain","urgent":true}"#
        );
    }
}
