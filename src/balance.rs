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
    /// A ready worker whose agent said it rejects requests, within the last
    /// 250 ms and since its last heartbeat (which says how much, and ends
    /// this), or whose accept queue stalls in an overload episode.
    Overloaded,
    /// A ready worker whose accept queue stalls (connections would wait
    /// long for it) while it rejects nothing: its share goes to calm
    /// slots, but never to the overflow listener. A moment's stall (a
    /// collection, the CPU's other tenants) is not a reason for a 503.
    Stalled,
    /// Starting, blocked, draining, or no process at all.
    Unavailable,
    /// Scaled away by a reload: its socket stays, nobody serves it.
    Inactive,
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
/// How busy a loop must be ([`Beat::busy`]) to count as saturated: under
/// overload it gets no new connections (its keep-alive clients keep it busy;
/// a new connection would only queue behind them).
const SATURATED_ELU: f64 = 0.95;
/// No slot's share falls below this fraction of an equal share, so that its
/// capacity keeps being measured.
const MIN_SHARE: f64 = 0.1;
/// Smoothing of utilisation and capacity samples (weight of a new sample).
const ELU_ALPHA: f64 = 0.5;
const CAPACITY_ALPHA: f64 = 0.2;
/// Heartbeats of a new worker that say nothing yet: its code is still being
/// compiled, its first interval is partly idle.
const WARM_UP_BEATS: u32 = 2;
/// A slot rejecting less than this share of its requests counts as calm:
/// it takes what the rejecting slots cannot.
const CALM: f64 = 0.02;
/// How fast the overflow share grows while every worker rejects (per
/// round of heartbeats, times the share rejected) and decays otherwise.
const OVERFLOW_GAIN: f64 = 0.5;
const OVERFLOW_DECAY: f64 = 0.2;
/// Below this busyness ([`Beat::busy`]) a calm worker has room: the overflow
/// share halves at each such heartbeat.
const IDLE_ELU: f64 = 0.8;
/// Smoothing of the share of requests a slot rejects.
const REJECT_ALPHA: f64 = 0.5;
/// After shedding, a worker waits this long before it sheds again: long
/// enough for the moved load to show in its smoothed utilisation.
const SHED_COOLDOWN: Duration = Duration::from_secs(2);

#[derive(Debug, Default, Clone)]
struct SlotLoad {
    /// Smoothed event-loop utilisation.
    elu: Option<f64>,
    /// How busy the loop was over the last heartbeat's interval: its
    /// utilisation, or its thread's CPU demand where that is higher (see
    /// [`Beat::busy`]).
    busy_last: Option<f64>,
    /// Smoothed requests per second per unit of utilisation.
    capacity: Option<f64>,
    /// The previous heartbeat: when, and the request counter then.
    last: Option<(Instant, u64)>,
    /// Open connections.
    conns: u64,
    shed_at: Option<Instant>,
    /// Heartbeats since the worker became ready.
    beats: u32,
    /// Smoothed share (0..1) of its requests that the worker answers 503.
    rejecting: f64,
    /// Requests per second over the last heartbeat's interval.
    rps: Option<f64>,
    /// Its loop waited for work since the last heartbeat, after rejecting.
    hungry: bool,
}

/// What the balancer reads from one heartbeat.
#[derive(Debug, Clone, Copy, Default)]
pub struct Beat {
    pub elu: f64,
    /// The share of the time the worker's main thread ran or waited to run
    /// since its previous heartbeat, where the kernel says.
    pub demand: Option<f64>,
    /// The interval the utilisation was measured on.
    pub interval: Option<Duration>,
    /// Requests since the worker started (rejected ones included).
    pub requests: u64,
    /// Requests answered 503 over the interval.
    pub rejected: u64,
    pub conns: u64,
}

impl Beat {
    /// How busy the loop was: its utilisation, or the CPU demand of its
    /// thread where that is higher. Workers that share a CPU count the time
    /// they wait for it, with their events ready, as idle; they are as
    /// saturated as a loop that never idles, and have no room to offer.
    fn busy(&self) -> f64 {
        self.demand.map_or(self.elu, |d| d.max(self.elu))
    }

    /// The seconds this heartbeat covers: the interval the agent measured
    /// on, or else the time since the previous heartbeat (`at`).
    fn seconds(&self, at: Instant, now: Instant) -> f64 {
        self.interval
            .filter(|d| !d.is_zero())
            .unwrap_or_else(|| now.duration_since(at))
            .as_secs_f64()
    }
}

pub struct Balancer {
    cfg: BalanceConfig,
    overflow: bool,
    /// The overflow listener's share of new connections: grows while every
    /// worker rejects, shrinks once one does not.
    overflow_share: f64,
    slots: Vec<SlotLoad>,
    attached: Option<Weights>,
}

impl Balancer {
    /// `overflow`: whether an overflow listener exists.
    pub fn new(cfg: BalanceConfig, slots: usize, overflow: bool) -> Self {
        Balancer {
            overflow: overflow && cfg.overflow,
            overflow_share: 0.0,
            cfg,
            slots: vec![SlotLoad::default(); slots],
            attached: None,
        }
    }

    /// New settings from a config reload (the overflow listener stays as
    /// it was: it is opened at start).
    pub fn set_config(&mut self, cfg: BalanceConfig) {
        self.overflow = self.overflow && cfg.overflow;
        self.cfg = cfg;
    }

    /// The service has `slots` slots now.
    pub fn resize(&mut self, slots: usize) {
        self.slots.resize(slots, SlotLoad::default());
        self.attached = None;
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
        s.busy_last = Some(beat.busy());
        let hungry = std::mem::take(&mut s.hungry);
        if let Some((at, before)) = s.last {
            let dt = beat.seconds(at, now);
            if dt > 0.0 {
                s.rps = Some(beat.requests.saturating_sub(before) as f64 / dt);
            }
            let done = beat.requests.saturating_sub(before);
            let share = if done == 0 {
                0.0
            } else {
                (beat.rejected as f64 / done as f64).min(1.0)
            };
            // Rejections from before the loop went hungry are over.
            if !hungry {
                s.rejecting = s.rejecting + REJECT_ALPHA * (share - s.rejecting);
            }
        } else if beat.rejected > 0 && !hungry {
            s.rejecting = 1.0;
        }
        self.update_overflow_share();
        let Some(s) = self.slots.get_mut(slot) else {
            return;
        };
        if s.beats <= WARM_UP_BEATS {
            s.last = Some((now, beat.requests));
            return;
        }
        s.elu = Some(ewma(s.elu, beat.elu, ELU_ALPHA));
        if let Some((at, before)) = s.last {
            let dt = beat.seconds(at, now);
            // Rejected requests cost next to nothing: they say nothing of
            // what a served request costs.
            let done = beat
                .requests
                .saturating_sub(before)
                .saturating_sub(beat.rejected);
            if dt > 0.0 && done > 0 && beat.elu >= MIN_ELU {
                let sample = done as f64 / dt / beat.elu;
                s.capacity = Some(ewma(s.capacity, sample, CAPACITY_ALPHA));
            }
        }
        s.last = Some((now, beat.requests));
    }

    /// The slot's event loop waits for work and would let a new request in:
    /// it rejects nothing now and is not saturated, whatever its last
    /// heartbeat said, and the overflow listener's share halves. Its next
    /// heartbeat counts no rejections into its smoothed share.
    pub fn on_hungry(&mut self, slot: usize) {
        let Some(s) = self.slots.get_mut(slot) else {
            return;
        };
        s.rejecting = 0.0;
        s.hungry = true;
        if let Some(b) = &mut s.busy_last {
            *b = b.min(IDLE_ELU);
        }
        self.overflow_share /= 2.0;
        if self.overflow_share < 0.001 {
            self.overflow_share = 0.0;
        }
    }

    /// Integrates the overflow share over heartbeats: while every worker
    /// with a heartbeat rejects requests and none has room, a part of what
    /// still reaches the workers moves to the overflow listener; once one
    /// rejects nothing or has room, the share decays. It settles where the
    /// workers get about what they can serve, so that the 503s come from
    /// Rust, not from busy event loops.
    fn update_overflow_share(&mut self) {
        if !self.overflow {
            return;
        }
        // A new worker's first heartbeats say little: it rejects while its
        // app still compiles, which no share for the overflow would fix.
        let live: Vec<f64> = self
            .slots
            .iter()
            .filter(|s| s.beats > WARM_UP_BEATS)
            .map(|s| s.rejecting)
            .collect();
        let n = self.slots.len().max(1) as f64;
        // A calm worker whose loop idles a fifth of the time or more could
        // take what goes to the overflow listener now.
        let has_room = |s: &SlotLoad| s.busy_last.is_some_and(|e| e < IDLE_ELU);
        let idle = self
            .slots
            .iter()
            .any(|s| s.beats > 0 && s.rejecting < CALM && has_room(s));
        // A worker that rejects while its loop idles a fifth of the time
        // turns bursts away, not a load beyond its capacity: fewer new
        // connections would idle it further (its kept connections are what
        // brings it work, and every 503 closes one).
        let room = self
            .slots
            .iter()
            .any(|s| s.beats > WARM_UP_BEATS && has_room(s));
        if !room && !live.is_empty() && live.iter().all(|r| *r >= CALM) {
            let mean = live.iter().sum::<f64>() / live.len() as f64;
            self.overflow_share += (1.0 - self.overflow_share) * mean * OVERFLOW_GAIN / n;
        } else if idle {
            self.overflow_share /= 2.0;
        } else {
            self.overflow_share *= 1.0 - OVERFLOW_DECAY / n;
        }
        if self.overflow_share < 0.001 {
            self.overflow_share = 0.0;
        }
    }

    /// The requests per second the current worker serves at full
    /// utilisation, as measured so far.
    pub fn capacity(&self, slot: usize) -> Option<f64> {
        self.slots.get(slot).and_then(|s| s.capacity)
    }

    /// Whether the current worker's event loop had no idle time over its
    /// last heartbeat's interval (or its thread waited for the CPU when it
    /// idled): it has all the work it can do. Not in its first heartbeats,
    /// when a loop still compiling the app's code (a first render) reads as
    /// saturated at any load.
    pub fn saturated(&self, slot: usize) -> bool {
        !self.warming(slot)
            && self
                .slots
                .get(slot)
                .and_then(|s| s.busy_last)
                .is_some_and(|elu| elu >= SATURATED_ELU)
    }

    /// Whether the slot's worker is new: no more than its first heartbeats
    /// (`WARM_UP_BEATS`) since it became ready, whose load says little.
    pub fn warming(&self, slot: usize) -> bool {
        self.slots
            .get(slot)
            .is_none_or(|s| s.beats <= WARM_UP_BEATS)
    }

    /// The current worker's requests per second (served and rejected) over
    /// its last heartbeat's interval.
    pub fn rps(&self, slot: usize) -> Option<f64> {
        self.slots.get(slot).and_then(|s| s.rps)
    }

    /// The weights for slots in the given states.
    ///
    /// Ready slots share new connections by capacity. The part of a slot's
    /// share that it is rejecting (503s over requests, smoothed; all of it
    /// while the agent says it is rejecting now) moves to the slots that
    /// reject nothing, or, when every ready slot is rejecting, to the
    /// overflow listener. So at twice the capacity about half of the new
    /// connections get their 503 from Rust, and the ramp back after an
    /// overload follows the measured rejections instead of flooding a
    /// worker that just recovered.
    ///
    /// `limits`, per slot: the most of the new connections it may get (a busy
    /// event loop accepts one connection per turn). What a cap cuts goes to
    /// the uncapped slots, or else to the overflow listener.
    pub fn weights(&self, avail: &[Availability], limits: &[Option<f64>]) -> Weights {
        let n = avail.len();
        let ready: Vec<usize> = (0..n)
            .filter(|i| {
                !matches!(
                    avail[*i],
                    Availability::Unavailable | Availability::Inactive
                )
            })
            .collect();
        if ready.is_empty() {
            // Nothing better: connections wait in the queues of the slots
            // whose workers are starting.
            return Weights {
                slots: avail
                    .iter()
                    .map(|a| u32::from(*a != Availability::Inactive))
                    .collect(),
                overflow: 0,
            };
        }
        let capacities: Vec<Option<f64>> = ready
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
        let floor = MIN_SHARE / ready.len() as f64;
        let shares: Vec<f64> = caps.iter().map(|c| (c / total).max(floor)).collect();
        let sum: f64 = shares.iter().sum();
        let shares: Vec<f64> = shares.iter().map(|s| s / sum).collect();

        let smoothed = |i: usize| self.slots.get(i).map_or(0.0, |s| s.rejecting);
        let calm_elsewhere = ready
            .iter()
            .any(|i| avail[*i] == Availability::Accepting && smoothed(*i) < CALM);
        let rejecting: Vec<f64> = ready
            .iter()
            .map(|i| match avail[*i] {
                Availability::Overloaded => 1.0,
                Availability::Stalled if calm_elsewhere => 1.0,
                _ => smoothed(*i),
            })
            .collect();
        let mut kept: Vec<f64> = shares
            .iter()
            .zip(&rejecting)
            .map(|(s, r)| s * (1.0 - r))
            .collect();
        let spilled: f64 = shares.iter().zip(&rejecting).map(|(s, r)| s * r).sum();
        let calm: Vec<usize> = (0..ready.len()).filter(|k| rejecting[*k] < CALM).collect();
        let mut overflow = 0.0;
        if !calm.is_empty() {
            let calm_total: f64 = calm.iter().map(|k| kept[*k]).sum();
            for k in &calm {
                kept[*k] += spilled * kept[*k] / calm_total;
            }
        } else if self.overflow {
            // With no calm slot, only what is rejected right now (by the
            // agent's word, or at a stalled queue in an episode) goes to
            // the overflow listener. The share the heartbeats measured is
            // the integrator's to learn (`overflow_share`, below): spilling
            // it as well answered 503s for seconds after a burst that the
            // workers had already got over.
            for (k, i) in ready.iter().enumerate() {
                if avail[*i] == Availability::Overloaded {
                    overflow += shares[k];
                } else {
                    kept[k] = shares[k];
                }
            }
        }
        // What the integrator learnt the workers cannot take, on top.
        if self.overflow && self.overflow_share > overflow {
            let scale = (1.0 - self.overflow_share) / (1.0 - overflow).max(f64::EPSILON);
            kept.iter_mut().for_each(|k| *k *= scale);
            overflow = self.overflow_share;
        }
        if self.overflow {
            let cap = |k: usize| limits.get(ready[k]).copied().flatten();
            let mut cut = 0.0;
            for (k, kept) in kept.iter_mut().enumerate() {
                if let Some(c) = cap(k)
                    && *kept > c
                {
                    cut += *kept - c;
                    *kept = c;
                }
            }
            let open: Vec<usize> = (0..ready.len())
                .filter(|k| cap(*k).is_none() && kept[*k] > 0.0)
                .collect();
            let open_total: f64 = open.iter().map(|k| kept[*k]).sum();
            if open_total > 0.0 {
                for k in &open {
                    kept[*k] += cut * kept[*k] / open_total;
                }
            } else {
                overflow += cut;
            }
        }
        let mut slots = vec![0u32; n];
        if kept.iter().all(|k| *k <= 0.0) && overflow <= 0.0 {
            // Every slot rejects everything and there is no overflow
            // listener: share equally, the agents answer 503 themselves.
            for i in &ready {
                slots[*i] = 1;
            }
            return Weights { slots, overflow: 0 };
        }
        for (i, k) in ready.iter().zip(&kept) {
            if *k > 0.0 {
                slots[*i] = ((k * SCALE).round() as u32).max(1);
            }
        }
        Weights {
            slots,
            overflow: (overflow * SCALE).round() as u32,
        }
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
                    demand: None,
                    interval: None,
                    requests,
                    rejected: 0,
                    conns: *conns,
                };
                b.on_heartbeat(i, now, beat);
            }
            now += Duration::from_millis(500);
        }
        now
    }

    /// Both slots' `k`-th heartbeats, 500 ms apart from `start`: 100
    /// requests each since the one before, `rejected` of them answered 503.
    fn beat_both(
        b: &mut Balancer,
        start: Instant,
        k: u64,
        (elu, demand): (f64, Option<f64>),
        rejected: u64,
    ) {
        for i in 0..2 {
            let beat = Beat {
                elu,
                demand,
                interval: None,
                requests: k * 100,
                rejected,
                conns: 10,
            };
            b.on_heartbeat(i, start + Duration::from_millis(500 * k), beat);
        }
    }

    #[test]
    fn equal_workers_get_equal_shares() {
        let mut b = balancer();
        feed(&mut b, &[(1000.0, 0.5, 10), (1000.0, 0.5, 10)], 4);
        let w = b.weights(&[Accepting, Accepting], &[]);
        assert_eq!(w.slots, vec![5000, 5000]);
        assert_eq!(w.overflow, 0);
    }

    #[test]
    fn a_slower_worker_gets_a_smaller_share() {
        let mut b = balancer();
        // Slot 1 needs three times the CPU per request.
        feed(&mut b, &[(1000.0, 0.25, 10), (1000.0, 0.75, 10)], 6);
        let (shares, _) = b.weights(&[Accepting, Accepting], &[]).shares();
        assert!((shares[0] - 0.75).abs() < 0.02, "{shares:?}");
        // Off: equal shares.
        let cfg = BalanceConfig {
            load_aware: false,
            ..BalanceConfig::default()
        };
        let mut b = Balancer::new(cfg, 2, true);
        feed(&mut b, &[(1000.0, 0.25, 10), (1000.0, 0.75, 10)], 6);
        assert_eq!(
            b.weights(&[Accepting, Accepting], &[]).slots,
            vec![5000, 5000]
        );
    }

    #[test]
    fn rejected_shares_move_to_calm_slots_or_else_to_the_overflow_listener() {
        let b = balancer();
        // Rejecting now, by the agent's word: its whole share moves.
        let w = b.weights(&[Overloaded, Accepting], &[]);
        assert_eq!((w.slots.clone(), w.overflow), (vec![0, 10000], 0));
        let w = b.weights(&[Overloaded, Overloaded], &[]);
        assert_eq!((w.slots.clone(), w.overflow), (vec![0, 0], 10000));
        let w = b.weights(&[Overloaded, Unavailable], &[]);
        assert_eq!((w.slots.clone(), w.overflow), (vec![0, 0], 10000));
        // Measured: both reject everything.
        let mut b = balancer();
        let start = Instant::now();
        for k in 0..4u64 {
            beat_both(&mut b, start, k, (0.9, None), if k == 0 { 0 } else { 100 });
        }
        let w = b.weights(&[Overloaded, Overloaded], &[]);
        let (shares, overflow) = w.shares();
        assert!(overflow > 0.85, "{shares:?} {overflow}");
        // Measured, but neither says it rejects right now: the overflow
        // listener gets what the integrator learnt, not the measured share
        // on top (that answered 503s for seconds after a short burst).
        let w = b.weights(&[Accepting, Accepting], &[]);
        let (shares, overflow) = w.shares();
        assert!(
            (overflow - b.overflow_share).abs() < 1e-3 && overflow < 0.85,
            "{shares:?} {overflow} {}",
            b.overflow_share
        );
        assert_eq!(b.weights(&[Unavailable, Unavailable], &[]).overflow, 0);
        // Nothing ready: queue only where a worker is coming.
        let w = b.weights(&[Unavailable, Inactive], &[]);
        assert_eq!((w.slots.clone(), w.overflow), (vec![1, 0], 0));
        // Nobody ready yet: connections wait in the queues.
        let w = b.weights(&[Unavailable, Unavailable], &[]);
        assert_eq!((w.slots.clone(), w.overflow), (vec![1, 1], 0));
        // Without an overflow listener, overloaded workers keep their queues.
        let b = Balancer::new(BalanceConfig::default(), 2, false);
        let w = b.weights(&[Overloaded, Overloaded], &[]);
        assert_eq!((w.slots.clone(), w.overflow), (vec![1, 1], 0));
    }

    #[test]
    fn a_new_workers_first_heartbeats_never_read_saturated() {
        let mut b = balancer();
        let start = Instant::now();
        // A loop busy all the time from the start: a first render, code
        // still compiling.
        for k in 0..u64::from(WARM_UP_BEATS) {
            beat_both(&mut b, start, k, (1.0, None), 0);
            assert!(b.warming(0) && !b.saturated(0), "heartbeat {k}");
        }
        beat_both(&mut b, start, u64::from(WARM_UP_BEATS), (1.0, None), 0);
        assert!(!b.warming(0) && b.saturated(0));
        // A new process in the slot starts over.
        b.reset(0);
        assert!(b.warming(0) && !b.saturated(0));
    }

    #[test]
    fn a_hungry_worker_gets_its_share_back_until_a_heartbeat_after_it_rejects_again() {
        let mut b = balancer();
        let start = Instant::now();
        // Both saturated and rejecting half of their requests.
        for k in 0..4u64 {
            beat_both(&mut b, start, k, (0.99, None), if k == 0 { 0 } else { 50 });
        }
        let (before, overflow_before) = b.weights(&[Accepting, Accepting], &[]).shares();
        assert!(
            overflow_before > 0.0 && b.saturated(0),
            "{before:?} {overflow_before}"
        );
        // Worker 0's loop waits for work: it takes what worker 1 rejects,
        // and the overflow listener's share halves.
        b.on_hungry(0);
        assert!(!b.saturated(0));
        let (shares, overflow) = b.weights(&[Accepting, Accepting], &[]).shares();
        assert!(
            overflow <= overflow_before / 2.0 + 1e-3,
            "{overflow} {overflow_before}"
        );
        assert!(
            shares[0] > before[0] && shares[0] > shares[1],
            "{before:?} -> {shares:?}"
        );
        // Its next heartbeat still counts the rejections from before it
        // idled: they do not take the share away again.
        let beat = |k: u64| Beat {
            elu: 0.99,
            demand: None,
            interval: None,
            requests: k * 100,
            rejected: 50,
            conns: 10,
        };
        b.on_heartbeat(0, start + Duration::from_millis(2000), beat(4));
        let (after, _) = b.weights(&[Accepting, Accepting], &[]).shares();
        assert!(after[0] > after[1], "{after:?}");
        // Rejections in a later interval do.
        b.on_heartbeat(0, start + Duration::from_millis(2500), beat(5));
        let (later, _) = b.weights(&[Accepting, Accepting], &[]).shares();
        assert!(later[0] < after[0], "{after:?} -> {later:?}");
    }

    #[test]
    fn the_overflow_share_falls_fast_once_a_calm_worker_idles() {
        let mut b = balancer();
        let start = Instant::now();
        for k in 0..4u64 {
            beat_both(&mut b, start, k, (0.99, None), if k == 0 { 0 } else { 100 });
        }
        let high = b.overflow_share;
        assert!(high > 0.5, "{high}");
        // Calm again (the rejected share is smoothed), both still busy: a
        // slow decay.
        for k in 4..12u64 {
            beat_both(&mut b, start, k, (0.99, None), 0);
        }
        let busy = b.overflow_share;
        assert!(busy > 0.2 && busy < high, "{high} -> {busy}");
        // One of them idles half the time: halved at each heartbeat.
        let idle = Beat {
            elu: 0.5,
            demand: None,
            interval: None,
            requests: 1200,
            rejected: 0,
            conns: 10,
        };
        b.on_heartbeat(0, start + Duration::from_millis(6000), idle);
        assert!(
            (b.overflow_share - busy / 2.0).abs() < 1e-9,
            "{busy} -> {}",
            b.overflow_share
        );
    }

    /// Two workers on one CPU at twice its capacity, as measured: each loop
    /// idles a quarter of the time, waiting for the CPU with its events
    /// ready. It has no room: it counts as saturated, its rejections build
    /// an overflow share, and when the workers have stopped rejecting for a
    /// moment, that share decays slowly. Without the CPU's word the loop
    /// seems to have room: no share builds, or what there is halves at each
    /// heartbeat.
    #[test]
    fn a_loop_that_waits_for_its_cpu_has_no_room() {
        let start = Instant::now();
        let mut shares = Vec::new();
        for demand in [Some(0.97), None] {
            let mut b = balancer();
            for k in 0..4u64 {
                beat_both(
                    &mut b,
                    start,
                    k,
                    (0.75, demand),
                    if k == 0 { 0 } else { 100 },
                );
            }
            let high = b.overflow_share;
            for k in 4..12u64 {
                beat_both(&mut b, start, k, (0.75, demand), 0);
            }
            assert_eq!(b.saturated(0), demand.is_some());
            shares.push((high, b.overflow_share));
        }
        let ((high, kept), (_, halved)) = (shares[0], shares[1]);
        assert!(high > 0.5 && kept > high / 2.0, "{shares:?}");
        assert!(halved < high / 8.0, "{shares:?}");
    }

    /// Measured with Next.js at twice the capacity: both workers reject
    /// bursts while their loops idle a quarter of the time. A share for the
    /// overflow listener would only idle them further.
    #[test]
    fn workers_that_reject_with_room_build_no_overflow_share() {
        let start = Instant::now();
        let mut grown = Vec::new();
        for elu in [0.75, 0.9] {
            let mut b = balancer();
            for k in 0..8u64 {
                beat_both(&mut b, start, k, (elu, None), if k == 0 { 0 } else { 15 });
            }
            grown.push(b.overflow_share);
        }
        assert_eq!(grown[0], 0.0, "{grown:?}");
        assert!(grown[1] > 0.2, "{grown:?}");
    }

    #[test]
    fn rejections_while_new_workers_start_build_no_overflow_share() {
        let mut b = balancer();
        let start = Instant::now();
        for k in 1..=WARM_UP_BEATS as u64 {
            beat_both(&mut b, start, k, (0.99, None), 100);
        }
        assert_eq!(b.overflow_share, 0.0);
    }

    #[test]
    fn a_stalled_slot_goes_to_calm_ones_but_never_to_the_overflow() {
        let b = balancer();
        let w = b.weights(&[Stalled, Accepting], &[]);
        assert_eq!((w.slots[0], w.overflow), (0, 0), "{w:?}");
        assert!(w.slots[1] > 0);
        // Nobody else to take it: the slots keep their shares.
        let w = b.weights(&[Stalled, Stalled], &[]);
        assert_eq!(w.slots, vec![5000, 5000]);
        assert_eq!(w.overflow, 0);
        // While overloaded, the overflow listener takes it.
        let w = b.weights(&[Overloaded, Stalled], &[]);
        assert_eq!(w.slots[0], 0);
        assert!(w.slots[1] > 0, "{w:?}");
    }

    #[test]
    fn a_capped_slot_gives_the_rest_to_an_uncapped_one_or_the_overflow() {
        let b = balancer();
        // Both capped: what the caps cut goes to the overflow listener.
        let w = b.weights(&[Accepting, Accepting], &[Some(0.1), Some(0.2)]);
        let (shares, overflow) = w.shares();
        assert!((shares[0] - 0.1).abs() < 0.01, "{shares:?}");
        assert!((shares[1] - 0.2).abs() < 0.01, "{shares:?}");
        assert!((overflow - 0.7).abs() < 0.01, "{overflow}");
        // One uncapped: it takes the rest.
        let w = b.weights(&[Accepting, Accepting], &[Some(0.1), None]);
        let (shares, overflow) = w.shares();
        assert!((shares[1] - 0.9).abs() < 0.01, "{shares:?}");
        assert_eq!(overflow, 0.0);
        // A cap above the share changes nothing.
        let w = b.weights(&[Accepting, Accepting], &[Some(0.9), None]);
        assert_eq!(w.slots, vec![5000, 5000]);
    }

    #[test]
    fn an_idle_slot_keeps_a_minimum_share() {
        let mut b = balancer();
        feed(&mut b, &[(2000.0, 0.5, 10), (10.0, 0.9, 10)], 6);
        let (shares, _) = b.weights(&[Accepting, Accepting], &[]).shares();
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
