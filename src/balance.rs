//! Load-aware balancing decisions, from the workers' heartbeats: the share of
//! new connections each slot gets (the weights of the reuseport steering
//! program), which workers shed keep-alive connections, and when the
//! overflow listener takes new connections because every worker is
//! overloaded. Pure bookkeeping: the supervisor attaches the weights and
//! sends the orders.
//!
//! The share of a slot follows its measured capacity: requests per second
//! per unit of event-loop utilisation. Giving each slot new work in
//! proportion to its capacity makes the event loops equally busy, so a
//! slower worker (a heavier code path, a noisy CPU) gets fewer connections.
//! Capacity does not depend on the share a slot gets, so the weights do not
//! oscillate the way weights computed from the current load would.
//!
//! Keep-alive connections are not steered after they are made; a worker
//! that runs clearly busier than the average is asked to close some of them
//! (`Connection: close` on a response), and the clients reconnect through
//! the steering program.

use std::time::{Duration, Instant};

use crate::config::BalanceConfig;

/// What a slot can take, as the supervisor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// A ready worker that is not rejecting requests.
    Accepting,
    /// A ready worker that answered 503s in its last heartbeat.
    Overloaded,
    /// Starting, blocked, draining, or no process at all.
    Unavailable,
}

/// Steering weights: per slot in slot order, then the overflow listener.
/// The kernel picks a socket with probability weight / sum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Weights {
    pub slots: Vec<u32>,
    pub overflow: u32,
}

impl Weights {
    /// The share (0..1) of each slot and of the overflow listener.
    pub fn shares(&self) -> (Vec<f64>, f64) {
        let total: u32 = self.slots.iter().sum::<u32>() + self.overflow;
        let share = |w: u32| {
            if total == 0 {
                0.0
            } else {
                f64::from(w) / f64::from(total)
            }
        };
        (
            self.slots.iter().map(|w| share(*w)).collect(),
            share(self.overflow),
        )
    }
}

/// Weights are in parts of this.
const SCALE: f64 = 10_000.0;
/// Re-attach the program when a share moves by this many parts (3%).
const HYSTERESIS: u32 = 300;
/// Below this event-loop utilisation a sample says little about capacity,
/// and a service is too idle to rebalance.
const MIN_ELU: f64 = 0.05;
/// No slot's share falls below this fraction of an equal share, so that its
/// capacity keeps being measured.
const MIN_SHARE: f64 = 0.1;
/// Smoothing of utilisation and capacity samples (weight of a new sample).
const ELU_ALPHA: f64 = 0.5;
const CAPACITY_ALPHA: f64 = 0.2;
/// Heartbeats of a new worker that say nothing yet: its code is still being
/// compiled, its first interval is partly idle.
const WARM_UP_BEATS: u32 = 2;
/// After shedding, a worker waits this long before it sheds again: long
/// enough for the moved load to show in its smoothed utilisation.
const SHED_COOLDOWN: Duration = Duration::from_secs(2);

#[derive(Debug, Default, Clone)]
struct SlotLoad {
    /// Smoothed event-loop utilisation.
    elu: Option<f64>,
    /// Smoothed requests per second per unit of utilisation.
    capacity: Option<f64>,
    /// The previous heartbeat: when, and the request counter then.
    last: Option<(Instant, u64)>,
    /// Open connections.
    conns: u64,
    shed_at: Option<Instant>,
    /// Heartbeats since the worker became ready.
    beats: u32,
}

/// What the balancer reads from one heartbeat.
#[derive(Debug, Clone, Copy, Default)]
pub struct Beat {
    pub elu: f64,
    /// The interval the utilisation was measured on.
    pub interval: Option<Duration>,
    /// Requests since the worker started.
    pub requests: u64,
    pub conns: u64,
}

pub struct Balancer {
    cfg: BalanceConfig,
    overflow: bool,
    slots: Vec<SlotLoad>,
    attached: Option<Weights>,
}

impl Balancer {
    /// `overflow`: whether an overflow listener exists.
    pub fn new(cfg: BalanceConfig, slots: usize, overflow: bool) -> Self {
        Balancer {
            overflow: overflow && cfg.overflow,
            cfg,
            slots: vec![SlotLoad::default(); slots],
            attached: None,
        }
    }

    /// A new process serves the slot: what the old one measured is void.
    pub fn reset(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot) {
            *s = SlotLoad::default();
        }
    }

    /// A heartbeat of the slot's current worker: utilisation over the
    /// interval the agent measured it on (`interval`; when the agent does not
    /// say, the time between heartbeats here), its request counter, its open
    /// connections.
    pub fn on_heartbeat(&mut self, slot: usize, now: Instant, beat: Beat) {
        let Some(s) = self.slots.get_mut(slot) else {
            return;
        };
        s.beats += 1;
        s.conns = beat.conns;
        if s.beats <= WARM_UP_BEATS {
            s.last = Some((now, beat.requests));
            return;
        }
        s.elu = Some(ewma(s.elu, beat.elu, ELU_ALPHA));
        if let Some((at, before)) = s.last {
            let dt = beat
                .interval
                .filter(|d| !d.is_zero())
                .unwrap_or_else(|| now.duration_since(at))
                .as_secs_f64();
            let done = beat.requests.saturating_sub(before);
            if dt > 0.0 && done > 0 && beat.elu >= MIN_ELU {
                let sample = done as f64 / dt / beat.elu;
                s.capacity = Some(ewma(s.capacity, sample, CAPACITY_ALPHA));
            }
        }
        s.last = Some((now, beat.requests));
    }

    /// The weights for slots in the given states.
    pub fn weights(&self, avail: &[Availability]) -> Weights {
        let n = avail.len();
        let accepting: Vec<usize> = (0..n)
            .filter(|i| avail[*i] == Availability::Accepting)
            .collect();
        let mut slots = vec![0u32; n];
        if accepting.is_empty() {
            let overloaded = avail.contains(&Availability::Overloaded);
            if overloaded && self.overflow {
                return Weights { slots, overflow: 1 };
            }
            // Nothing better: connections wait in the slots' queues for
            // the workers starting there.
            return Weights {
                slots: vec![1; n],
                overflow: 0,
            };
        }
        let capacities: Vec<Option<f64>> = accepting
            .iter()
            .map(|i| {
                self.slots
                    .get(*i)
                    .and_then(|s| s.capacity)
                    .filter(|_| self.cfg.load_aware)
            })
            .collect();
        let known: Vec<f64> = capacities.iter().flatten().copied().collect();
        let fallback = if known.is_empty() {
            1.0
        } else {
            known.iter().sum::<f64>() / known.len() as f64
        };
        let caps: Vec<f64> = capacities.iter().map(|c| c.unwrap_or(fallback)).collect();
        let total: f64 = caps.iter().sum();
        let floor = MIN_SHARE / accepting.len() as f64;
        let shares: Vec<f64> = caps.iter().map(|c| (c / total).max(floor)).collect();
        let sum: f64 = shares.iter().sum();
        for (i, share) in accepting.iter().zip(shares) {
            slots[*i] = ((share / sum * SCALE).round() as u32).max(1);
        }
        Weights { slots, overflow: 0 }
    }

    /// Whether `w` differs enough from the attached weights to attach it: a
    /// slot or the overflow listener gains or loses all of its share, or a
    /// share moves by more than the hysteresis.
    pub fn should_attach(&self, w: &Weights) -> bool {
        let Some(old) = &self.attached else {
            return true;
        };
        if old.slots.len() != w.slots.len() || (old.overflow == 0) != (w.overflow == 0) {
            return true;
        }
        let (old_shares, _) = old.shares();
        let (new_shares, _) = w.shares();
        old.slots
            .iter()
            .zip(&w.slots)
            .zip(old_shares.iter().zip(&new_shares))
            .any(|((a, b), (sa, sb))| {
                (*a == 0) != (*b == 0) || ((sa - sb).abs() * SCALE) as u32 >= HYSTERESIS
            })
    }

    pub fn set_attached(&mut self, w: Weights) {
        self.attached = Some(w);
    }

    pub fn attached(&self) -> Option<&Weights> {
        self.attached.as_ref()
    }

    /// Keep-alive rebalancing: the accepting workers that run busier than
    /// the average by more than the tolerance, and how many connections each
    /// should close, so that the load they carry comes down to the average.
    pub fn shed_orders(&mut self, avail: &[Availability], now: Instant) -> Vec<(usize, u64)> {
        if !self.cfg.rebalance {
            return Vec::new();
        }
        let loads: Vec<(usize, f64)> = (0..avail.len())
            .filter(|i| avail[*i] == Availability::Accepting)
            .filter_map(|i| Some((i, self.slots.get(i)?.elu?)))
            .collect();
        if loads.len() < 2 {
            return Vec::new();
        }
        let mean = loads.iter().map(|(_, e)| e).sum::<f64>() / loads.len() as f64;
        if mean < MIN_ELU {
            return Vec::new();
        }
        let limit = mean * (1.0 + self.cfg.tolerance.max(0.0));
        let mut orders = Vec::new();
        for (i, elu) in loads {
            let s = &mut self.slots[i];
            let cooling = s
                .shed_at
                .is_some_and(|t| now.duration_since(t) < SHED_COOLDOWN);
            if elu <= limit || cooling || s.conns < 2 {
                continue;
            }
            // The fraction of its load above the average, in connections.
            let excess = (s.conns as f64 * (elu - mean) / elu).round() as u64;
            let count = excess.clamp(1, s.conns / 2);
            s.shed_at = Some(now);
            orders.push((i, count));
        }
        orders
    }
}

fn ewma(old: Option<f64>, sample: f64, alpha: f64) -> f64 {
    match old {
        Some(old) => old + alpha * (sample - old),
        None => sample,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Availability::*;

    fn balancer() -> Balancer {
        Balancer::new(BalanceConfig::default(), 2, true)
    }

    /// Feeds `beats` heartbeats 500 ms apart at the given rates and
    /// utilisations.
    fn feed(b: &mut Balancer, per_slot: &[(f64, f64, u64)], beats: u32) -> Instant {
        let start = Instant::now();
        let mut now = start;
        for k in 0..=beats {
            for (i, (rate, elu, conns)) in per_slot.iter().enumerate() {
                let requests = (rate * 0.5 * f64::from(k)) as u64;
                let beat = Beat {
                    elu: *elu,
                    interval: None,
                    requests,
                    conns: *conns,
                };
                b.on_heartbeat(i, now, beat);
            }
            now += Duration::from_millis(500);
        }
        now
    }

    #[test]
    fn equal_workers_get_equal_shares() {
        let mut b = balancer();
        feed(&mut b, &[(1000.0, 0.5, 10), (1000.0, 0.5, 10)], 4);
        let w = b.weights(&[Accepting, Accepting]);
        assert_eq!(w.slots, vec![5000, 5000]);
        assert_eq!(w.overflow, 0);
    }

    #[test]
    fn a_slower_worker_gets_a_smaller_share() {
        let mut b = balancer();
        // Slot 1 needs three times the CPU per request.
        feed(&mut b, &[(1000.0, 0.25, 10), (1000.0, 0.75, 10)], 6);
        let (shares, _) = b.weights(&[Accepting, Accepting]).shares();
        assert!((shares[0] - 0.75).abs() < 0.02, "{shares:?}");
        // Off: equal shares.
        let cfg = BalanceConfig {
            load_aware: false,
            ..BalanceConfig::default()
        };
        let mut b = Balancer::new(cfg, 2, true);
        feed(&mut b, &[(1000.0, 0.25, 10), (1000.0, 0.75, 10)], 6);
        assert_eq!(b.weights(&[Accepting, Accepting]).slots, vec![5000, 5000]);
    }

    #[test]
    fn unavailable_and_overloaded_slots_get_nothing_and_overflow_takes_the_rest() {
        let b = balancer();
        let w = b.weights(&[Overloaded, Accepting]);
        assert_eq!(w.slots[0], 0);
        assert!(w.slots[1] > 0);
        let w = b.weights(&[Overloaded, Overloaded]);
        assert_eq!((w.slots.clone(), w.overflow), (vec![0, 0], 1));
        let w = b.weights(&[Overloaded, Unavailable]);
        assert_eq!(w.overflow, 1);
        // Nobody ready yet: connections wait in the queues.
        let w = b.weights(&[Unavailable, Unavailable]);
        assert_eq!((w.slots.clone(), w.overflow), (vec![1, 1], 0));
        // Without an overflow listener, overloaded workers keep their queues.
        let b = Balancer::new(BalanceConfig::default(), 2, false);
        assert_eq!(b.weights(&[Overloaded, Overloaded]).overflow, 0);
    }

    #[test]
    fn an_idle_slot_keeps_a_minimum_share() {
        let mut b = balancer();
        feed(&mut b, &[(2000.0, 0.5, 10), (10.0, 0.9, 10)], 6);
        let (shares, _) = b.weights(&[Accepting, Accepting]).shares();
        assert!(shares[1] > 0.04, "{shares:?}");
    }

    #[test]
    fn small_changes_do_not_reattach() {
        let mut b = balancer();
        let w = Weights {
            slots: vec![5000, 5000],
            overflow: 0,
        };
        assert!(b.should_attach(&w));
        b.set_attached(w);
        let near = Weights {
            slots: vec![5100, 4900],
            overflow: 0,
        };
        assert!(!b.should_attach(&near));
        let far = Weights {
            slots: vec![5400, 4600],
            overflow: 0,
        };
        assert!(b.should_attach(&far));
        let gone = Weights {
            slots: vec![10000, 0],
            overflow: 0,
        };
        assert!(b.should_attach(&gone));
    }

    #[test]
    fn the_busier_worker_sheds_its_excess_once_per_cooldown() {
        let mut b = balancer();
        let now = feed(&mut b, &[(1000.0, 0.54, 54), (1000.0, 0.46, 46)], 4);
        let orders = b.shed_orders(&[Accepting, Accepting], now);
        assert_eq!(orders, vec![(0, 4)]);
        assert!(b.shed_orders(&[Accepting, Accepting], now).is_empty());
        let later = now + SHED_COOLDOWN;
        assert_eq!(b.shed_orders(&[Accepting, Accepting], later), vec![(0, 4)]);
        // Within the tolerance: nothing.
        let mut b = balancer();
        let now = feed(&mut b, &[(1000.0, 0.51, 51), (1000.0, 0.49, 49)], 4);
        assert!(b.shed_orders(&[Accepting, Accepting], now).is_empty());
        // Idle: nothing.
        let mut b = balancer();
        let now = feed(&mut b, &[(10.0, 0.02, 10), (10.0, 0.01, 2)], 4);
        assert!(b.shed_orders(&[Accepting, Accepting], now).is_empty());
    }
}
