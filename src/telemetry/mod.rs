//! What the runtime tells the outside world: the one log stream on stdout
//! (supervisor events and every worker's output) and the Kubernetes probes.

pub mod logs;
pub mod probes;
