//! Health verdicts: from the heartbeats a worker's agent sends (or fails to
//! send), decide whether the worker is fine, suspect, blocked, saturated or
//! running out of memory. Pure bookkeeping: the supervisor acts on verdicts.

use std::time::{Duration, Instant};

use crate::config::HealthConfig;
use crate::worker::Heartbeat;

/// Why a worker should be replaced, with the numbers that say so.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// No heartbeat for `suspect_after`: stop sending it connections and
    /// start a replacement.
    Suspect { silent: Duration },
    /// No heartbeat for `unresponsive_after`: its event loop is blocked.
    Unresponsive { silent: Duration },
    /// Event-loop utilisation above `max_elu` for `elu_grace`.
    Saturated { elu: f64, since: Duration },
    /// Heap or RSS above their bounds for `memory_samples` samples in a row.
    Memory {
        heap_used: u64,
        heap_limit: u64,
        rss: u64,
    },
    /// Not a health problem: a rolling restart replaces every worker.
    Rolling,
    /// The app closed its server on its own: it takes no more connections.
    ServerClosed,
}

impl Verdict {
    /// The reason label of the restarts metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Verdict::Suspect { .. } | Verdict::Unresponsive { .. } => "blocked",
            Verdict::Saturated { .. } => "saturated",
            Verdict::Memory { .. } => "memory",
            Verdict::Rolling => "rolling_restart",
            Verdict::ServerClosed => "server_closed",
        }
    }

    /// A short reason for logs.
    pub fn reason(&self) -> String {
        match self {
            Verdict::Suspect { silent } => {
                format!("no heartbeat for {} (suspect)", ms(*silent))
            }
            Verdict::Unresponsive { silent } => {
                format!("no heartbeat for {}: event loop blocked", ms(*silent))
            }
            Verdict::Saturated { elu, since } => {
                format!("event-loop utilisation {elu:.2} for {}", ms(*since))
            }
            Verdict::Memory {
                heap_used,
                heap_limit,
                rss,
            } => format!(
                "memory: heap {} MiB of {} MiB limit, RSS {} MiB",
                heap_used >> 20,
                heap_limit >> 20,
                rss >> 20
            ),
            Verdict::Rolling => "rolling restart".to_owned(),
            Verdict::ServerClosed => {
                "the app closed its server: it takes no more connections".to_owned()
            }
        }
    }
}

fn ms(d: Duration) -> String {
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64)).to_string()
}

/// Health bookkeeping of one worker process.
#[derive(Debug, Clone)]
pub struct Tracker {
    /// When the last heartbeat arrived (or the worker became ready).
    pub last_beat: Instant,
    pub last: Option<Heartbeat>,
    elu_high_since: Option<Instant>,
    memory_high: u32,
}

impl Tracker {
    pub fn new(now: Instant) -> Self {
        Tracker {
            last_beat: now,
            last: None,
            elu_high_since: None,
            memory_high: 0,
        }
    }

    /// Records a heartbeat; returns a verdict when the sample (with the ones
    /// before it) says the worker should be replaced.
    pub fn beat(&mut self, hb: Heartbeat, cfg: &HealthConfig, now: Instant) -> Option<Verdict> {
        self.last_beat = now;
        let verdict = self.judge(&hb, cfg, now);
        self.last = Some(hb);
        verdict
    }

    fn judge(&mut self, hb: &Heartbeat, cfg: &HealthConfig, now: Instant) -> Option<Verdict> {
        let heap_high =
            hb.heap_limit > 0 && (hb.heap_used as f64) > cfg.max_heap_used * hb.heap_limit as f64;
        let rss_high = cfg.max_rss.is_some_and(|max| hb.rss > max.bytes());
        if heap_high || rss_high {
            self.memory_high += 1;
        } else {
            self.memory_high = 0;
        }
        if self.memory_high >= cfg.memory_samples.max(1) {
            return Some(Verdict::Memory {
                heap_used: hb.heap_used,
                heap_limit: hb.heap_limit,
                rss: hb.rss,
            });
        }
        if hb.elu > cfg.max_elu {
            let since = *self.elu_high_since.get_or_insert(now);
            if now.duration_since(since) >= cfg.elu_grace.get() {
                return Some(Verdict::Saturated {
                    elu: hb.elu,
                    since: now.duration_since(since),
                });
            }
        } else {
            self.elu_high_since = None;
        }
        None
    }

    /// How long since the last heartbeat.
    pub fn silent(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_beat)
    }

    /// The silence verdict, if any.
    pub fn silence(&self, cfg: &HealthConfig, now: Instant) -> Option<Verdict> {
        let silent = self.silent(now);
        if silent >= cfg.unresponsive_after.get() {
            Some(Verdict::Unresponsive { silent })
        } else if silent >= cfg.suspect_after.get() {
            Some(Verdict::Suspect { silent })
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Duration as Dur, Size};

    fn cfg() -> HealthConfig {
        HealthConfig {
            max_rss: Some(Size(500 << 20)),
            memory_samples: 2,
            elu_grace: Dur::from_secs(2),
            ..HealthConfig::default()
        }
    }

    fn hb(elu: f64, heap_used: u64, rss: u64) -> Heartbeat {
        Heartbeat {
            elu,
            heap_used,
            heap_limit: 1000,
            rss,
            ..Heartbeat::default()
        }
    }

    #[test]
    fn memory_needs_consecutive_samples() {
        let (c, t0) = (cfg(), Instant::now());
        let mut t = Tracker::new(t0);
        assert_eq!(t.beat(hb(0.1, 950, 0), &c, t0), None);
        assert_eq!(t.beat(hb(0.1, 100, 0), &c, t0), None);
        assert_eq!(t.beat(hb(0.1, 950, 0), &c, t0), None);
        assert!(matches!(
            t.beat(hb(0.1, 960, 0), &c, t0),
            Some(Verdict::Memory { heap_used: 960, .. })
        ));
        let mut t = Tracker::new(t0);
        t.beat(hb(0.1, 1, 600 << 20), &c, t0);
        assert!(matches!(
            t.beat(hb(0.1, 1, 600 << 20), &c, t0),
            Some(Verdict::Memory { .. })
        ));
    }

    #[test]
    fn saturation_needs_a_sustained_window() {
        let (c, t0) = (cfg(), Instant::now());
        let mut t = Tracker::new(t0);
        assert_eq!(t.beat(hb(1.0, 1, 1), &c, t0), None);
        assert_eq!(t.beat(hb(1.0, 1, 1), &c, t0 + Duration::from_secs(1)), None);
        assert_eq!(
            t.beat(hb(0.5, 1, 1), &c, t0 + Duration::from_millis(1500)),
            None
        );
        assert_eq!(t.beat(hb(1.0, 1, 1), &c, t0 + Duration::from_secs(2)), None);
        assert!(matches!(
            t.beat(hb(1.0, 1, 1), &c, t0 + Duration::from_secs(4)),
            Some(Verdict::Saturated { .. })
        ));
    }

    #[test]
    fn silence_turns_suspect_then_unresponsive() {
        let (c, t0) = (cfg(), Instant::now());
        let t = Tracker::new(t0);
        assert_eq!(t.silence(&c, t0), None);
        assert!(matches!(
            t.silence(&c, t0 + c.suspect_after.get()),
            Some(Verdict::Suspect { .. })
        ));
        assert!(matches!(
            t.silence(&c, t0 + c.unresponsive_after.get()),
            Some(Verdict::Unresponsive { .. })
        ));
    }
}
