//! What the runtime tells the outside world. For now: the one log stream on
//! stdout that carries the supervisor's events and every worker's output.

pub mod logs;
