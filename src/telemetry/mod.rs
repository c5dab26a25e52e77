//! What the runtime tells the outside world: the one log stream on stdout
//! (supervisor events and every worker's output), the Kubernetes probes and
//! Prometheus metrics, and OTLP traces.

pub mod logs;
pub mod metrics;
pub mod probes;
pub mod traces;
