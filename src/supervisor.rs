//! The supervisor: owns the service's listening sockets and one slot per
//! worker, starts a worker process in each slot, restarts crashed workers
//! with backoff, replaces unhealthy ones (start the new process first, then
//! drain or kill the old), steers new connections away from slots without a
//! ready process, rolls restarts on SIGHUP, and shuts down gracefully on
//! SIGTERM / SIGINT.
//!
//! Everything runs on one thread (a current-thread tokio runtime): the
//! supervisor's work is small, a single thread keeps the state machine free
//! of locks, and it makes PR_SET_PDEATHSIG reliable (children are forked
//! from the main thread, which lives as long as the process).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::admin::Command as AdminCommand;
use crate::balance::{Availability, Balancer, Beat};
use crate::config::Settings;
use crate::error::Error;
use crate::health::{Tracker, Verdict};
use crate::listeners::Listeners;
use crate::telemetry::logs::{self, Logs};
use crate::telemetry::metrics::{Metrics, Snapshot, WorkerSample};
use crate::telemetry::probes::ProbeState;
use crate::telemetry::traces::Traces;
use crate::worker::control::{HTTP_BUCKETS, HttpDurations, Rejected};
use crate::worker::{
    self, AgentMessage, Command, Event, State, SupervisorMessage, Worker, WorkerEvent,
};

/// A worker process being replaced: its slot already has a new process.
struct Retiring {
    worker: Worker,
    reason: String,
    phase: Phase,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Until the replacement listens (and, for a suspect, until it either
    /// recovers or turns unresponsive).
    Waiting,
    /// Asked to drain; stopped with SIGTERM if not gone by the deadline.
    Draining { deadline: Instant },
    /// Did not finish draining (connections that never end: WebSockets,
    /// streams): SIGTERM sent, so that the app's own shutdown runs and
    /// closes them; killed if not gone by `kill_at`.
    Terminating { kill_at: Instant },
    /// SIGKILL sent; waiting for the exit.
    Killed,
}

/// A worker's state as metrics and `ampere status` show it.
fn state_label(w: &Worker) -> &'static str {
    if w.suspect {
        "suspect"
    } else {
        w.state.as_str()
    }
}

/// How many connections may wait in a slot's queue: as many as its worker
/// serves in `window` (each brings at least one request), once its
/// capacity is known; never more than half the backlog.
fn queue_limit(backlog: u32, capacity: Option<f64>, window: Duration) -> u32 {
    let half = (backlog / 2).max(8);
    match capacity {
        Some(c) if c > 0.0 => ((c * window.as_secs_f64()) as u32).clamp(8, half),
        _ => half,
    }
}

/// How long a replaced worker that did not finish draining has, after its
/// SIGTERM, to run the app's own shutdown before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(5);

/// What ampere says of a signal it does not act on.
const IGNORED: &str = "signal ignored: SIGHUP or `ampere restart` replaces the workers one at a \
    time, `ampere reload` applies a changed config, SIGTERM stops";

/// How long an overload episode lasts after the last rejection or stall.
const PRESSURE_HOLD: Duration = Duration::from_secs(1);
/// How long a worker's report that it rejects requests steers all of its
/// share away: a little longer than the agent's 100 ms between reports, so
/// that a worker that keeps rejecting stays steered away, and one that
/// rejected a short burst gets its share back after a moment.
const OVERLOADED_HOLD: Duration = Duration::from_millis(250);
/// The shortest span over which new connections are counted.
const ARRIVALS_SPAN: Duration = Duration::from_millis(50);

/// How long connections may wait in an accept queue (see
/// [`Supervisor::queue_window`]).
#[derive(Debug, Clone, Copy)]
struct Window {
    wait: Duration,
    /// `[overload] target_delay` within an episode.
    targeted: bool,
}

impl Window {
    /// The window for one slot: a target is at least two turns of the
    /// slot's loop, so that a worker whose turns are long (an app that
    /// renders in large synchronous steps) still has one connection to
    /// accept next, rather than none.
    fn of(self, queue: &QueueWatch) -> Duration {
        if self.targeted {
            self.wait.max(queue.turn.saturating_mul(2))
        } else {
            self.wait
        }
    }
}

/// How often the accept queues are sampled (one getsockopt per slot).
const QUEUE_CHECK: Duration = Duration::from_millis(10);

/// One worker position: its socket (in [`Listeners`]) outlives the processes
/// that serve it.
struct Slot {
    index: usize,
    worker: Option<Worker>,
    retiring: Vec<Retiring>,
    /// Consecutive failures since the last stable run.
    failures: u32,
    restart_at: Option<Instant>,
    /// Why we stopped the current worker, if we did: the restarts metric's
    /// reason, and words for the log (a start timeout, say).
    kill_reason: Option<(&'static str, String)>,
    /// Request durations of every process that served in this slot.
    http: BTreeMap<(String, u16), HttpDurations>,
    /// Early rejections (503) in this slot, and whether the last heartbeat
    /// reported any.
    rejected: Rejected,
    /// For the log: whether the last heartbeat reported rejections.
    overloaded: bool,
    /// For steering: when the current worker last said that it rejects
    /// requests (it says so every 100 ms while it does, until its next
    /// heartbeat, which ends this and says how much).
    rejecting_now: Option<Instant>,
    /// Keep-alive connections closed in this slot to rebalance.
    rebalanced: u64,
    /// Restarts and replacements in this slot.
    restarts: u64,
    /// Part of the service's worker count. A slot scaled away by a reload
    /// keeps its socket (closing it would reset its queue and renumber the
    /// reuseport group) but gets no connections and no process.
    active: bool,
    /// The slot's accept queue, as the supervisor last sampled it.
    queue: QueueWatch,
}

/// Whether a slot's worker takes the connections waiting in its accept
/// queue. While connections wait, the supervisor pings the worker over the
/// control channel; the agent answers when its event loop next gets to I/O,
/// which is when it would accept them. A worker that has not answered
/// within `[overload] max_delay` (one long event-loop turn, a blocked loop,
/// a stop for garbage collection) gets no new connections until it does:
/// they would wait behind it, and a heartbeat, hundreds of milliseconds
/// later, is too late to say so.
///
/// Node (libuv since 1.45) accepts one connection per listening descriptor
/// per turn of its event loop (a worker has one, or eight with `[overload]
/// hold_target`), so a busy worker drains its queue slowly: the last of
/// `len` waiting connections is accepted about `len / per_turn` turns
/// later. The answer's
/// round trip measures a turn; a slot whose queue would take longer than
/// the window to drain is steered away from too. So is one whose queue
/// holds more than its worker serves in the window (or half the backlog: a
/// full one drops new connections' SYNs, and clients retry only after a
/// second).
#[derive(Debug, Clone, Copy)]
struct QueueWatch {
    /// Connections waiting at the last sample, and how many may.
    len: u32,
    limit: u32,
    /// How many the worker accepts per turn of its loop.
    per_turn: u32,
    /// The ping the worker has not answered yet, sent then.
    ping_at: Option<Instant>,
    /// When the worker last answered one: within half the window, its loop
    /// counts as running without asking again.
    pong_at: Option<Instant>,
    /// How long the worker took to answer, smoothed: about one turn of its
    /// event loop, the time it takes to accept one more connection.
    turn: Duration,
    /// The most of the new connections the slot may get now (see `cap`).
    cap: Option<f64>,
    /// Steered away: connections wait and the worker has not answered for
    /// `max_delay`, or its queue would take longer than that to drain.
    stalled: bool,
    /// Times the slot was steered away for it.
    stalls: u64,
}

impl QueueWatch {
    fn new() -> Self {
        QueueWatch {
            len: 0,
            limit: u32::MAX,
            per_turn: 1,
            ping_at: None,
            pong_at: None,
            turn: Duration::ZERO,
            cap: None,
            stalled: false,
            stalls: 0,
        }
    }

    /// A new sample of the queue's length; (whether `stalled` changed,
    /// whether to ping the worker). `window`: how long the worker may take
    /// to answer; `limit`: how long the queue may grow.
    fn sample(&mut self, len: u32, now: Instant, window: Duration, limit: u32) -> (bool, bool) {
        self.len = len;
        self.limit = limit;
        if len == 0 {
            // It took every connection: its loop runs.
            self.ping_at = None;
        }
        let ping = len > 0
            && self.ping_at.is_none()
            && self
                .pong_at
                .is_none_or(|t| now.duration_since(t) >= window / 2);
        if ping {
            self.ping_at = Some(now);
        }
        // The turn in progress has lasted at least as long as the ping.
        let turn = self
            .ping_at
            .map_or(self.turn, |t| self.turn.max(now.duration_since(t)));
        (self.set(self.too_slow(turn, window)), ping)
    }

    /// The worker answered a ping; whether `stalled` changed.
    fn pong(&mut self, now: Instant, window: Duration) -> bool {
        if let Some(sent) = self.ping_at.take() {
            let rtt = now.duration_since(sent);
            self.turn = if self.turn.is_zero() {
                rtt
            } else {
                (self.turn + rtt) / 2
            };
        }
        self.pong_at = Some(now);
        self.set(self.too_slow(self.turn, window))
    }

    /// The most of the group's new connections (`arrivals` per second) this
    /// slot may get, while its loop runs long turns: what its worker accepts
    /// within the window, less what waits, per queue check (the supervisor
    /// looks again then). None while the loop turns faster than that, or
    /// has not been measured for a second.
    fn cap(&self, now: Instant, window: Duration, arrivals: Option<f64>) -> Option<f64> {
        let arrivals = arrivals.filter(|a| *a > 0.0)?;
        let answered = self.pong_at?;
        if self.turn < QUEUE_CHECK || now.duration_since(answered) > Duration::from_secs(1) {
            return None;
        }
        let budget = (window.as_secs_f64() / self.turn.as_secs_f64()).floor()
            * f64::from(self.per_turn)
            - f64::from(self.len);
        Some((budget.max(1.0) / (arrivals * QUEUE_CHECK.as_secs_f64())).min(1.0))
    }

    /// Whether the waiting connections would wait longer than the window:
    /// the worker takes `per_turn` per turn of its loop.
    fn too_slow(&self, turn: Duration, window: Duration) -> bool {
        self.len > 0 && (self.len >= self.limit || turn.saturating_mul(self.turns()) >= window)
    }

    /// The turns the worker takes to accept the waiting connections.
    fn turns(&self) -> u32 {
        self.len.div_ceil(self.per_turn.max(1))
    }

    /// Whether the waiting connections would wait `window` or longer, the
    /// turn in progress counted.
    fn waits_longer(&self, now: Instant, window: Duration) -> bool {
        let turn = self
            .ping_at
            .map_or(self.turn, |t| self.turn.max(now.duration_since(t)));
        self.len > 0 && turn.saturating_mul(self.turns()) >= window
    }

    fn set(&mut self, stalled: bool) -> bool {
        let changed = stalled != self.stalled;
        if stalled && changed {
            self.stalls += 1;
        }
        self.stalled = stalled;
        changed
    }
}

impl Slot {
    fn new(index: usize) -> Slot {
        Slot {
            index,
            worker: None,
            retiring: Vec::new(),
            failures: 0,
            restart_at: None,
            kill_reason: None,
            http: BTreeMap::new(),
            rejected: Rejected::default(),
            overloaded: false,
            rejecting_now: None,
            rebalanced: 0,
            restarts: 0,
            active: true,
            queue: QueueWatch::new(),
        }
    }

    /// A process in this slot accepts connections: the current one is ready,
    /// or a healthy old one still serves while its replacement starts.
    fn accepting(&self) -> bool {
        self.worker
            .as_ref()
            .is_some_and(|w| w.state == State::Ready && !w.suspect)
            || self
                .retiring
                .iter()
                .any(|r| r.worker.state == State::Ready && !r.worker.suspect)
    }

    fn processes(&self) -> impl Iterator<Item = &Worker> {
        self.worker
            .iter()
            .chain(self.retiring.iter().map(|r| &r.worker))
    }

    /// `pressure`: the service is in an overload episode (see
    /// [`Supervisor::pressure_until`]), so a stalled queue may send new
    /// connections to the overflow listener; not while the worker is new
    /// (`warming`): a loop still initialising the app stalls at any load,
    /// and what waits for it is served once it is done.
    fn availability(&self, pressure: bool, warming: bool) -> Availability {
        if !self.active {
            return Availability::Inactive;
        }
        if !self.accepting() {
            Availability::Unavailable
        } else if self.rejecting_now.is_some() || (self.queue.stalled && pressure && !warming) {
            Availability::Overloaded
        } else if self.queue.stalled {
            Availability::Stalled
        } else {
            Availability::Accepting
        }
    }
}

/// A rolling restart in progress: slots still to replace, one at a time.
struct Rolling {
    pending: VecDeque<usize>,
    current: Option<usize>,
    /// Worker ids from here on were started after the rolling restart
    /// began, with the current command: they are not replaced.
    since_id: u64,
}

pub struct Supervisor {
    settings: Settings,
    service: Arc<str>,
    command: Command,
    listeners: Listeners,
    logs: Logs,
    probes: Arc<ProbeState>,
    metrics: Arc<Metrics>,
    /// Restarts and replacements by reason, for the metrics.
    restarts: BTreeMap<&'static str, u64>,
    slots: Vec<Slot>,
    next_id: u64,
    events_tx: mpsc::UnboundedSender<WorkerEvent>,
    events: mpsc::UnboundedReceiver<WorkerEvent>,
    shutting_down: bool,
    rolling: Option<Rolling>,
    /// Steering weights and keep-alive rebalancing.
    balancer: Balancer,
    /// Where span batches go, when tracing is on.
    traces: Option<Traces>,
    /// Commands from the admin API.
    admin: Option<mpsc::UnboundedReceiver<AdminCommand>>,
    /// Reads the config again, for a reload.
    reloader: Option<(Reloader, Applied)>,
    /// Set once every worker kept failing (`[restart] give_up_after`).
    give_up: Option<u32>,
    /// New connections per second into the reuseport group, as measured
    /// at the overflow listener while it takes a part of them, and when.
    arrivals: Option<(f64, Instant)>,
    /// The overflow listener's count and share at the start of the current
    /// measurement.
    overflow_mark: Option<(Instant, u64, f64)>,
    /// The end of the current overload episode. It begins when a worker
    /// rejects requests or every accept queue stalls, and lasts while
    /// workers reject, stall or run saturated; within it a stalled queue's
    /// connections go to the overflow listener, and busy workers are
    /// capped. Outside, a stall only moves connections to the other
    /// workers: a moment's stall is no reason for a 503.
    pressure_until: Option<Instant>,
    /// Since when every worker's accept queue has stalled.
    all_stalled_since: Option<Instant>,
    /// Said that the overflow listener takes new connections, and not yet
    /// that the episode is over.
    overflow_logged: bool,
    /// Whether the last queue check saw an episode.
    pressure_seen: bool,
}

/// Resolves the settings again from the same files and flags.
pub type Reloader = Box<dyn Fn() -> Result<Settings, Error>>;

/// Told of the settings a reload applied (what the admin API and the
/// overflow listener serve from).
pub type Applied = Box<dyn Fn(&Settings)>;

/// How the run ended.
pub enum Outcome {
    /// Graceful shutdown completed.
    Stopped,
    /// Every worker kept failing (`[restart] give_up_after`): stopped.
    GaveUp,
    /// A second signal cut the shutdown short.
    Interrupted(Signal),
}

/// What to do after looking at an event, once the borrows are released.
enum Action {
    None,
    Replace(Verdict),
    /// Stop the current worker; it restarts as after a crash, with backoff.
    Stop(Verdict),
    SlotReady,
    Drain,
}

impl Supervisor {
    pub fn new(
        settings: Settings,
        command: Command,
        listeners: Listeners,
        logs: Logs,
        probes: Arc<ProbeState>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (events_tx, events) = mpsc::unbounded_channel();
        let slots = (0..settings.workers).map(Slot::new).collect();
        Supervisor {
            service: settings.service.as_str().into(),
            balancer: Balancer::new(
                settings.config.balance.clone(),
                settings.workers,
                listeners.has_overflow(),
            ),
            settings,
            command,
            listeners,
            logs,
            probes,
            metrics,
            // Every reason from the start, at 0, so that rate() and
            // increase() see the first one.
            restarts: RESTART_REASONS.iter().map(|r| (*r, 0)).collect(),
            slots,
            next_id: 0,
            events_tx,
            events,
            shutting_down: false,
            rolling: None,
            traces: None,
            admin: None,
            reloader: None,
            give_up: None,
            arrivals: None,
            overflow_mark: None,
            pressure_until: None,
            all_stalled_since: None,
            overflow_logged: false,
            pressure_seen: false,
        }
    }

    /// Takes commands from the admin API; `reloader` reads the config again,
    /// `applied` hears of what a reload applied.
    pub fn set_admin(
        &mut self,
        commands: mpsc::UnboundedReceiver<AdminCommand>,
        reloader: Reloader,
        applied: Applied,
    ) {
        self.admin = Some(commands);
        self.reloader = Some((reloader, applied));
    }

    /// Exports the agents' spans through `traces`.
    pub fn set_traces(&mut self, traces: Traces) {
        self.traces = Some(traces);
    }

    pub async fn run(mut self) -> std::io::Result<Outcome> {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        // Signals whose default action would end ampere on the spot, with
        // requests in flight: SIGQUIT stops gracefully (as nginx's does),
        // the user signals are refused with what to use instead.
        let mut quit = signal(SignalKind::quit())?;
        let mut usr1 = signal(SignalKind::user_defined1())?;
        let mut usr2 = signal(SignalKind::user_defined2())?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut queue_tick = tokio::time::interval(QUEUE_CHECK);
        queue_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        info!(
            service = &*self.service,
            address = %self.listeners.addr(),
            workers = self.slots.len(),
            listener = ?self.listeners.mode(),
            app = %self.settings.launch.describe(),
            dir = %self.settings.app_dir.display(),
            node = %self.command.program().display(),
            "starting"
        );
        self.log_heap_share();
        for slot in 0..self.slots.len() {
            self.spawn(slot);
        }
        self.after_change();
        // A stop signal with `[shutdown] delay`: the signal, and when the
        // delay ends. Meanwhile /ready says 503 and everything else goes on
        // (workers that crash are replaced, health is judged).
        let mut delayed: Option<(Signal, Instant)> = None;
        let first = loop {
            let wake = self.next_deadline();
            let watch = self.watches_queues();
            let delay_end = delayed.map(|(_, at)| at);
            let mut changed = true;
            let mut stop = None;
            tokio::select! {
                Some(ev) = self.events.recv() => changed = self.on_event(ev),
                _ = term.recv() => stop = Some(Signal::SIGTERM),
                _ = int.recv() => stop = Some(Signal::SIGINT),
                _ = quit.recv() => stop = Some(Signal::SIGQUIT),
                _ = hup.recv() => self.start_rolling_restart("SIGHUP"),
                _ = usr1.recv() => warn!(signal = "SIGUSR1", "{IGNORED}"),
                _ = usr2.recv() => warn!(signal = "SIGUSR2", "{IGNORED}"),
                Some(cmd) = next_command(&mut self.admin) => {
                    if let Some(stop) = self.on_admin(cmd) {
                        break stop;
                    }
                }
                _ = sleep_until(wake) => self.on_timer(),
                _ = sleep_until(delay_end), if delay_end.is_some() => {
                    break delayed.map_or(Signal::SIGTERM, |(sig, _)| sig);
                }
                _ = tick.tick() => self.probes.tick(),
                _ = queue_tick.tick(), if watch => changed = self.check_queues(),
            }
            if let Some(sig) = stop {
                if delayed.is_some() {
                    // A second signal stops at once, as always.
                    return Ok(self.stop_now(sig).await);
                }
                let delay = self.settings.config.shutdown.delay();
                if delay.is_zero() {
                    break sig;
                }
                info!(
                    signal = sig.as_str(),
                    delay_ms = delay.as_millis() as u64,
                    "unready: serving on while load balancers stop sending ([shutdown] delay; a second signal stops at once)"
                );
                self.probes.set_shutting_down();
                delayed = Some((sig, Instant::now() + delay));
            }
            if self.give_up.is_some() {
                break Signal::SIGTERM;
            }
            if changed {
                self.after_change();
            }
        };
        let gave_up = self.give_up.is_some();
        let outcome = self.shutdown(first, [&mut term, &mut int, &mut quit]).await;
        Ok(match outcome {
            Outcome::Stopped if gave_up => Outcome::GaveUp,
            other => other,
        })
    }

    fn spawn(&mut self, index: usize) {
        let id = self.next_id;
        self.next_id += 1;
        let slot = &mut self.slots[index];
        slot.restart_at = None;
        slot.kill_reason = None;
        match Worker::spawn(
            &self.command,
            index,
            id,
            self.listeners.fd(index),
            self.service.clone(),
            self.events_tx.clone(),
            &self.logs,
        ) {
            Ok(w) => {
                info!(
                    service = &*self.service,
                    worker = index,
                    worker_pid = w.pid,
                    "worker starting"
                );
                slot.worker = Some(w);
            }
            Err(e) => {
                *self.restarts.entry("spawn_error").or_default() += 1;
                slot.restarts += 1;
                slot.failures += 1;
                let delay = backoff(&self.settings, slot.failures);
                error!(
                    service = &*self.service,
                    worker = index,
                    error = %e,
                    program = %self.command.program().display(),
                    restart_in_ms = delay.as_millis() as u64,
                    "cannot start worker process"
                );
                slot.restart_at = Some(Instant::now() + delay);
                self.check_give_up();
            }
        }
    }

    /// Handles a worker's event; whether the supervisor's state may have
    /// changed (the steering weights, readiness and metrics need a look).
    fn on_event(&mut self, ev: WorkerEvent) -> bool {
        let now = Instant::now();
        let window = self.queue_window(now);
        let index = ev.slot;
        let Some(slot) = self.slots.get_mut(index) else {
            return false;
        };
        let is_current = slot.worker.as_ref().is_some_and(|w| w.id == ev.id);
        let retiring = slot.retiring.iter().position(|r| r.worker.id == ev.id);
        if !is_current && retiring.is_none() {
            return false;
        }
        // A pong only matters when it starts or ends a stall: pongs come up
        // to twenty times a second per worker while connections wait.
        if let Event::Message(AgentMessage::Pong) = ev.event {
            let window = window.of(&slot.queue);
            return is_current && slot.queue.pong(now, window);
        }
        if let Event::Exited(status) = ev.event {
            if is_current {
                let w = slot.worker.take().expect("checked above");
                slot.rejecting_now = None;
                self.balancer.reset(index);
                self.on_exit(index, w, status);
            } else if let Some(i) = retiring {
                let r = slot.retiring.remove(i);
                info!(
                    service = &*self.service,
                    worker = index,
                    worker_pid = r.worker.pid,
                    status = %worker::describe_exit(&status),
                    reason = r.reason,
                    "replaced worker stopped"
                );
            }
            return true;
        }
        let health = &self.settings.config.health;
        let shutting_down = self.shutting_down;
        let w = match retiring {
            Some(i) => &mut slot.retiring[i].worker,
            None => slot.worker.as_mut().expect("checked above"),
        };
        let mut durations = Vec::new();
        let mut rejected = None;
        let mut overloaded = None;
        let mut hungry = false;
        let action = match ev.event {
            Event::Exited(_) => Action::None,
            Event::BadMessage(e) => {
                warn!(service = &*self.service, worker = index, worker_pid = w.pid, error = %e, "unreadable message on the control channel");
                Action::None
            }
            Event::Message(AgentMessage::Listening { node, pid }) => {
                if w.state == State::Starting {
                    w.state = State::Ready;
                    w.app_pid = pid.unwrap_or(w.pid);
                    w.ready_at = Some(now);
                    w.tracker = Tracker::new(now);
                    if self.pressure_seen {
                        w.send(SupervisorMessage::Pressure { on: true });
                    }
                    if retiring.is_none() {
                        self.balancer.reset(index);
                        slot.queue = QueueWatch::new();
                    }
                    info!(
                        service = &*self.service,
                        worker = index,
                        worker_pid = w.pid,
                        startup_ms = w.started.elapsed().as_millis() as u64,
                        node = node.unwrap_or_default(),
                        "worker ready"
                    );
                    Action::SlotReady
                } else {
                    Action::None
                }
            }
            Event::Message(AgentMessage::ListenOther { port }) => {
                warn!(
                    service = &*self.service,
                    worker = index,
                    worker_pid = w.pid,
                    port,
                    service_port = self.listeners.addr().port(),
                    "the app listens on port {port}, which ampere does not serve; make it listen on process.env.PORT, or set server.port = {port}"
                );
                Action::None
            }
            Event::Message(AgentMessage::Heartbeat(mut hb)) => {
                durations = std::mem::take(&mut hb.http);
                rejected = Some((hb.rejected, hb.inflight, hb.delay_p99_ms));
                slot.rebalanced += hb.shed;
                if retiring.is_none() {
                    slot.rejecting_now = None;
                    // A stable run clears the slot's failures now, not only
                    // at its next crash: they count towards giving up.
                    if w.ready_at.is_some_and(|t| {
                        now.saturating_duration_since(t)
                            >= self.settings.config.restart.reset_after.get()
                    }) {
                        slot.failures = 0;
                    }
                    let beat = Beat {
                        elu: hb.elu,
                        demand: w.cpu.sample(w.app_pid, now),
                        interval: (hb.interval_ms > 0.0)
                            .then(|| Duration::from_secs_f64(hb.interval_ms / 1e3)),
                        requests: hb.requests,
                        rejected: hb.rejected.total(),
                        conns: hb.conns,
                    };
                    self.balancer.on_heartbeat(index, now, beat);
                }
                let verdict = w.tracker.beat(hb, health, now);
                if w.suspect {
                    w.suspect = false;
                    info!(
                        service = &*self.service,
                        worker = index,
                        worker_pid = w.pid,
                        "suspect worker recovered; it will be drained"
                    );
                }
                match (retiring, verdict) {
                    // Not while shutting down: a replacement would start
                    // only to be stopped, and take the slot's queue from
                    // the worker that is finishing it.
                    (None, Some(v))
                        if health.enabled && w.state == State::Ready && !self.shutting_down =>
                    {
                        Action::Replace(v)
                    }
                    // A recovered old worker whose replacement already
                    // listens: drain it now.
                    (Some(i), _)
                        if slot.retiring[i].phase == Phase::Waiting
                            && slot
                                .worker
                                .as_ref()
                                .is_some_and(|c| c.state == State::Ready) =>
                    {
                        Action::Drain
                    }
                    _ => Action::None,
                }
            }
            Event::Message(AgentMessage::Drained) => {
                // The agent finished its connections; now the app may run
                // its own SIGTERM handler, or die of the default.
                w.signal(Signal::SIGTERM);
                Action::None
            }
            Event::Message(AgentMessage::Overloaded { reason, beyond_max }) => {
                if retiring.is_none() {
                    overloaded = Some((reason, beyond_max));
                }
                Action::None
            }
            Event::Message(AgentMessage::Spans { spans }) => {
                if let Some(t) = &self.traces {
                    t.submit(spans);
                }
                Action::None
            }
            // (While shutting down, nothing is replaced.) After a stable run,
            // a replacement takes over first; a worker that closes soon
            // after it listened (an app that probes the port, then fails to
            // listen again) is stopped and restarted with backoff, so that
            // it cannot loop.
            Event::Message(AgentMessage::Closed)
                if retiring.is_none() && w.state == State::Ready && !shutting_down =>
            {
                let stable = w.ready_at.is_some_and(|t| {
                    now.saturating_duration_since(t)
                        >= self.settings.config.restart.reset_after.get()
                });
                if stable {
                    Action::Replace(Verdict::ServerClosed)
                } else {
                    Action::Stop(Verdict::ServerClosed)
                }
            }
            Event::Message(AgentMessage::Closed) => Action::None,
            Event::Message(AgentMessage::Pong) => Action::None,
            Event::Message(AgentMessage::Hungry) => {
                hungry = retiring.is_none();
                Action::None
            }
            Event::Message(AgentMessage::Unknown) => Action::None,
        };
        if let Some((r, inflight, delay_p99_ms)) = rejected {
            self.on_rejections(index, r, inflight, delay_p99_ms);
        }
        if let Some((reason, beyond_max)) = overloaded {
            self.on_overloaded(index, &reason, beyond_max);
        }
        if hungry {
            // Its loop waits for work: whatever steers new connections away
            // from it (its rejections, a saturated loop, the overflow
            // listener's learnt share) is out of date.
            self.slots[index].rejecting_now = None;
            self.balancer.on_hungry(index);
        }
        // Request durations add up per slot, across the processes in it.
        let slot_http = &mut self.slots[index].http;
        for d in durations {
            let acc = slot_http
                .entry((d.method.clone(), d.status))
                .or_insert_with(|| HttpDurations {
                    method: d.method,
                    status: d.status,
                    sum: 0.0,
                    counts: vec![0; HTTP_BUCKETS.len() + 1],
                });
            acc.sum += d.sum;
            for (total, n) in acc.counts.iter_mut().zip(&d.counts) {
                *total += n;
            }
        }
        match action {
            Action::None => {}
            Action::Replace(v) => self.replace(index, &v),
            Action::Stop(v) => {
                let slot = &mut self.slots[index];
                if let Some(w) = &slot.worker {
                    warn!(
                        service = &*self.service,
                        worker = index,
                        worker_pid = w.pid,
                        reason = v.reason(),
                        "stopping worker (SIGTERM); it restarts with backoff"
                    );
                    w.signal(Signal::SIGTERM);
                    slot.kill_reason = Some((v.kind(), v.reason()));
                }
            }
            Action::SlotReady => self.retire_old(index),
            Action::Drain => self.retire_old(index),
        }
        true
    }

    fn on_exit(&mut self, index: usize, w: Worker, status: std::process::ExitStatus) {
        let how = worker::describe_exit(&status);
        let slot = &mut self.slots[index];
        if self.shutting_down || w.state == State::Draining || !slot.active {
            info!(service = &*self.service, worker = index, worker_pid = w.pid, status = %how, "worker stopped");
            return;
        }
        let settings = &self.settings;
        if w.ready_at
            .is_some_and(|t| t.elapsed() >= settings.config.restart.reset_after.get())
        {
            slot.failures = 0;
        }
        slot.failures += 1;
        let delay = backoff(settings, slot.failures);
        let kind = match (&slot.kill_reason, w.ready_at) {
            (Some((kind, _)), _) => kind,
            (None, Some(_)) => "crash",
            (None, None) => "start_failure",
        };
        *self.restarts.entry(kind).or_default() += 1;
        slot.restarts += 1;
        let reason = slot.kill_reason.take().map(|(_, r)| r).unwrap_or_else(|| {
            if w.ready_at.is_some() {
                format!("crashed ({how})")
            } else {
                format!(
                    "exited before listening on port {} ({how})",
                    self.listeners.addr().port()
                )
            }
        });
        let tail = w.stderr_tail();
        let cause = last_error_line(&tail)
            .map(|l| format!(": {l}"))
            .unwrap_or_default();
        error!(
            service = &*self.service,
            worker = index,
            worker_pid = w.pid,
            status = %how,
            uptime_ms = w.started.elapsed().as_millis() as u64,
            failures = slot.failures,
            restart_in_ms = delay.as_millis() as u64,
            stderr = tail[tail.len().saturating_sub(logs::STDERR_SHOWN)..].join("\n"),
            "worker {reason}{cause}; failure {} in a row, restarting in {}",
            slot.failures,
            humantime::format_duration(Duration::from_millis(delay.as_millis() as u64)),
        );
        slot.restart_at = Some(Instant::now() + delay);
        self.check_give_up();
    }

    /// Gives up (see [`Outcome::GaveUp`]) once every active slot has failed
    /// `[restart] give_up_after` times in a row and none serves: not its
    /// current worker, nor an old one still taking connections while its
    /// replacement fails.
    fn check_give_up(&mut self) {
        let give_up_after = self.settings.config.restart.give_up_after;
        let failing = |s: &Slot| !s.active || s.failures >= give_up_after && !s.accepting();
        if give_up_after == 0
            || self.give_up.is_some()
            || !self.slots.iter().any(|s| s.active)
            || !self.slots.iter().all(failing)
        {
            return;
        }
        error!(
            service = &*self.service,
            give_up_after,
            "every worker failed {give_up_after} times in a row and none is serving: giving up \
             (exit status 1); the errors above say why. [restart] give_up_after sets the count, 0 \
             retries for ever"
        );
        self.give_up = Some(give_up_after);
    }

    /// Starts a new process in `index`'s slot; the current one retires and
    /// is drained or killed once the new one listens.
    fn replace(&mut self, index: usize, verdict: &Verdict) {
        // Shutting down: every worker drains and stops; none starts.
        if self.shutting_down {
            return;
        }
        let slot = &mut self.slots[index];
        let Some(mut old) = slot.worker.take() else {
            return;
        };
        *self.restarts.entry(verdict.kind()).or_default() += 1;
        slot.restarts += 1;
        let reason = verdict.reason();
        let hb = old.tracker.last.clone().unwrap_or_default();
        warn!(
            service = &*self.service,
            worker = index,
            worker_pid = old.pid,
            reason = reason,
            silent_ms = old.tracker.silent(Instant::now()).as_millis() as u64,
            elu = hb.elu,
            delay_p99_ms = hb.delay_p99_ms,
            heap_used_mib = hb.heap_used >> 20,
            heap_limit_mib = hb.heap_limit >> 20,
            rss_mib = hb.rss >> 20,
            inflight = hb.inflight,
            "replacing worker: {reason}"
        );
        old.suspect = matches!(
            verdict,
            Verdict::Suspect { .. } | Verdict::Unresponsive { .. }
        );
        // A worker running out of memory must stop taking requests now, not
        // once its replacement listens: every request it serves meanwhile
        // brings "heap out of memory" closer. Its slot's queue waits for the
        // replacement; the other slots take new connections.
        let phase = if matches!(verdict, Verdict::Memory { .. }) {
            old.send(SupervisorMessage::Drain { urgent: true });
            old.state = State::Draining;
            Phase::Draining {
                deadline: Instant::now() + self.settings.config.shutdown.timeout.get(),
            }
        } else {
            Phase::Waiting
        };
        slot.retiring.push(Retiring {
            worker: old,
            reason,
            phase,
        });
        self.spawn(index);
    }

    /// The slot's new process listens: drain its healthy predecessors, kill
    /// the blocked ones (suspects get until `unresponsive_after`).
    fn retire_old(&mut self, index: usize) {
        let now = Instant::now();
        let health = &self.settings.config.health;
        let drain_for = self.settings.config.shutdown.timeout.get();
        let slot = &mut self.slots[index];
        if !slot
            .worker
            .as_ref()
            .is_some_and(|w| w.state == State::Ready)
        {
            return;
        }
        for r in slot
            .retiring
            .iter_mut()
            .filter(|r| r.phase == Phase::Waiting)
        {
            let silent = r.worker.tracker.silent(now);
            if r.worker.suspect && silent >= health.unresponsive_after.get() {
                warn!(
                    service = &*self.service,
                    worker = index,
                    worker_pid = r.worker.pid,
                    silent_ms = silent.as_millis() as u64,
                    "killing blocked worker: its replacement is ready"
                );
                r.worker.signal(Signal::SIGKILL);
                r.phase = Phase::Killed;
            } else if !r.worker.suspect {
                r.worker.send(SupervisorMessage::Drain { urgent: false });
                r.worker.state = State::Draining;
                r.phase = Phase::Draining {
                    deadline: now + drain_for,
                };
            }
        }
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        let start_timeout = self.settings.config.worker.start_timeout.get();
        let health = self.settings.config.health.clone();
        for index in 0..self.slots.len() {
            let slot = &mut self.slots[index];
            if let Some(w) = &slot.worker
                && w.state == State::Starting
                && slot.kill_reason.is_none()
                && now >= w.started + start_timeout
            {
                let reason = format!(
                    "did not listen on port {} within {}",
                    self.listeners.addr().port(),
                    humantime::format_duration(start_timeout)
                );
                warn!(
                    service = &*self.service,
                    worker = index,
                    worker_pid = w.pid,
                    "worker {reason}; killing it"
                );
                w.signal(Signal::SIGKILL);
                slot.kill_reason = Some(("start_timeout", reason));
            }
            // Silence of the current worker: suspect.
            let silence = slot
                .worker
                .as_ref()
                .filter(|w| w.state == State::Ready && health.enabled && !self.shutting_down)
                .and_then(|w| w.tracker.silence(&health, now));
            if let Some(v) = silence {
                self.replace(index, &v);
                continue;
            }
            let slot = &mut self.slots[index];
            // Suspects that stayed silent become unresponsive: killed once
            // the replacement listens; stragglers past their drain deadline
            // are stopped with SIGTERM, and killed if that does not end them.
            let replacement_ready = slot
                .worker
                .as_ref()
                .is_some_and(|w| w.state == State::Ready);
            let mut blocked = false;
            for r in &mut slot.retiring {
                match r.phase {
                    Phase::Draining { deadline } if now >= deadline => {
                        warn!(
                            service = &*self.service,
                            worker = index,
                            worker_pid = r.worker.pid,
                            "replaced worker did not finish draining in time; stopping it (SIGTERM)"
                        );
                        r.worker.signal(Signal::SIGTERM);
                        r.phase = Phase::Terminating {
                            kill_at: now + TERM_GRACE,
                        };
                    }
                    Phase::Terminating { kill_at } if now >= kill_at => {
                        warn!(
                            service = &*self.service,
                            worker = index,
                            worker_pid = r.worker.pid,
                            grace_ms = TERM_GRACE.as_millis() as u64,
                            "replaced worker did not exit after SIGTERM; killing it"
                        );
                        r.worker.signal(Signal::SIGKILL);
                        r.phase = Phase::Killed;
                    }
                    Phase::Waiting
                        if r.worker.suspect
                            && r.worker.tracker.silent(now) >= health.unresponsive_after.get() =>
                    {
                        blocked = true;
                    }
                    _ => {}
                }
            }
            if blocked && replacement_ready {
                self.retire_old(index);
            }
            let slot = &mut self.slots[index];
            if !self.shutting_down
                && slot.active
                && slot.worker.is_none()
                && slot.restart_at.is_some_and(|t| now >= t)
            {
                self.spawn(index);
            }
        }
    }

    /// The next moment `on_timer` has something to do.
    fn next_deadline(&self) -> Option<Instant> {
        let cfg = &self.settings.config;
        let start_timeout = cfg.worker.start_timeout.get();
        let health = &cfg.health;
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for s in &self.slots {
            if let Some(w) = &s.worker {
                if w.state == State::Starting && s.kill_reason.is_none() {
                    consider(w.started + start_timeout);
                }
                if w.state == State::Ready && health.enabled && !self.shutting_down {
                    consider(w.tracker.last_beat + health.suspect_after.get());
                }
            }
            if let Some(t) = s.restart_at {
                consider(t);
            }
            let replacement_ready = s.worker.as_ref().is_some_and(|w| w.state == State::Ready);
            for r in &s.retiring {
                match r.phase {
                    Phase::Draining { deadline } => consider(deadline),
                    Phase::Terminating { kill_at } => consider(kill_at),
                    Phase::Waiting if r.worker.suspect && replacement_ready => {
                        consider(r.worker.tracker.last_beat + health.unresponsive_after.get())
                    }
                    _ => {}
                }
            }
        }
        // Never spin: a deadline in the past is looked at again shortly.
        next.map(|t| t.max(Instant::now() + Duration::from_millis(5)))
    }

    /// After every event: steer connections to the slots that accept (by
    /// their load), rebalance keep-alive connections, publish readiness, and
    /// move a rolling restart along.
    fn after_change(&mut self) {
        let pressure = self.under_pressure(Instant::now());
        let avail: Vec<Availability> = self
            .slots
            .iter()
            .map(|s| s.availability(pressure, self.balancer.warming(s.index)))
            .collect();
        // Capped only under pressure: what a cap cuts may go to the
        // overflow listener. A saturated worker gets nothing new then.
        let caps: Vec<Option<f64>> = self
            .slots
            .iter()
            .map(|s| {
                if !pressure {
                    None
                } else if self.balancer.saturated(s.index) {
                    Some(0.0)
                } else {
                    s.queue.cap
                }
            })
            .collect();
        let weights = self.balancer.weights(&avail, &caps);
        if self.listeners.can_steer() && self.balancer.should_attach(&weights) {
            match self.listeners.steer(&weights) {
                Ok(()) => {
                    tracing::debug!(service = &*self.service, weights = ?weights.slots, overflow = weights.overflow, "steering new connections");
                    self.balancer.set_attached(weights);
                }
                Err(e) if self.listeners.steering_refused().is_some() => {
                    warn!(error = %e, "{}", crate::listeners::STEERING_REFUSED)
                }
                Err(e) => warn!(error = %e, "cannot attach the steering program"),
            }
        }
        // Within an overload episode the overflow share comes and goes with
        // every stall: one line when it first takes connections, one when
        // the episode is over and it takes none.
        let overflowing = self.balancer.attached().is_some_and(|w| w.overflow > 0);
        match (self.overflow_logged, overflowing) {
            (false, true) => {
                self.overflow_logged = true;
                warn!(
                    service = &*self.service,
                    overflow_share = self.balancer.attached().map_or(0.0, |w| w.shares().1),
                    "every worker is overloaded: new connections get 503 from the overflow listener"
                );
            }
            (true, false) if !pressure => {
                self.overflow_logged = false;
                info!(
                    service = &*self.service,
                    "workers take new connections again"
                );
            }
            _ => {}
        }
        for (index, connections) in self.balancer.shed_orders(&avail, Instant::now()) {
            if let Some(w) = &self.slots[index].worker {
                tracing::debug!(
                    service = &*self.service,
                    worker = index,
                    worker_pid = w.pid,
                    connections,
                    "rebalancing: closing keep-alive connections of a busier worker"
                );
                w.send(SupervisorMessage::Shed { connections });
            }
        }
        self.drain_scaled_away();
        let ready = self
            .slots
            .iter()
            .filter(|s| s.active && s.accepting())
            .count();
        let active = self.slots.iter().filter(|s| s.active).count();
        self.probes.set_workers(ready, active);
        self.publish_metrics();
        self.advance_rolling();
    }

    /// Says, where the container limits memory, what heap limit each worker
    /// gets from it.
    fn log_heap_share(&self) {
        if let Some((limit, mib)) = self.command.heap_share() {
            let workers = self.settings.workers;
            info!(
                service = &*self.service,
                container_memory_mib = limit >> 20,
                workers,
                heap_limit_mib = mib,
                "each worker's V8 heap limit is a share of the container's memory, so that a \
                 leaking worker is replaced before the container runs out; [health] max_heap sets it"
            );
            if mib == crate::worker::MIN_OLD_SPACE_MIB {
                warn!(
                    service = &*self.service,
                    workers,
                    "the container's memory is small for this many workers: each gets the least heap ampere gives"
                );
            }
        }
    }

    /// Whether the accept queues are watched: steering by load is on and the
    /// kernel takes steering programs.
    fn watches_queues(&self) -> bool {
        self.settings.config.balance.load_aware && self.listeners.can_steer()
    }

    /// How long connections may wait in an accept queue: `[overload]
    /// max_delay`, or 100 ms where that check is off; within an overload
    /// episode, `target_delay` where set.
    fn queue_window(&self, now: Instant) -> Window {
        let o = &self.settings.config.overload;
        let target = Some(o.target_delay.get()).filter(|d| !d.is_zero() && o.enabled);
        match target {
            Some(t) if self.under_pressure(now) => Window {
                wait: t,
                targeted: true,
            },
            _ => Window {
                wait: self.max_wait(),
                targeted: false,
            },
        }
    }

    /// `[overload] max_delay`, or 100 ms where that check is off.
    fn max_wait(&self) -> Duration {
        Some(self.settings.config.overload.max_delay.get())
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_millis(100))
    }

    /// Starts or extends an overload episode.
    fn press(&mut self, now: Instant) {
        self.pressure_until = Some(now + PRESSURE_HOLD);
    }

    fn under_pressure(&self, now: Instant) -> bool {
        self.pressure_until.is_some_and(|t| now < t)
    }

    /// Samples every serving slot's accept queue, pinging the workers that
    /// have connections waiting, and starts, extends or ends overload
    /// episodes; whether the weights need recomputing (a slot stalled or
    /// moved again, a cap moved, an episode began or ended).
    fn check_queues(&mut self) -> bool {
        let now = Instant::now();
        let window = self.queue_window(now);
        let backlog = self.settings.config.server.backlog;
        let per_turn = self.command.accepts_per_turn();
        let mut changed = false;
        // What reaches the overflow listener, over its share (the program
        // splits at random), says how fast new connections arrive: measured
        // over 50 ms or more while it has a tenth of them or more. An
        // estimate a second old says nothing of now.
        let count = self.metrics.overflowed();
        let share = self.balancer.attached().map_or(0.0, |w| w.shares().1);
        match self.overflow_mark {
            Some((at, before, was)) if now.duration_since(at) >= ARRIVALS_SPAN => {
                let over = (share + was) / 2.0;
                if over >= 0.1 {
                    let secs = now.duration_since(at).as_secs_f64();
                    let sample = count.saturating_sub(before) as f64 / secs / over;
                    let smoothed = self
                        .arrivals
                        .map_or(sample, |(a, _)| a + (sample - a) * 0.3);
                    self.arrivals = Some((smoothed, now));
                }
                self.overflow_mark = Some((now, count, share));
            }
            Some(_) => {}
            None => self.overflow_mark = Some((now, count, share)),
        }
        let arrivals = self
            .arrivals
            .filter(|(_, at)| now.duration_since(*at) <= Duration::from_secs(1))
            .map(|(a, _)| a);
        for slot in self.slots.iter_mut() {
            if slot
                .rejecting_now
                .is_some_and(|t| now.duration_since(t) >= OVERLOADED_HOLD)
            {
                slot.rejecting_now = None;
                changed = true;
            }
            let window = window.of(&slot.queue);
            let limit = queue_limit(backlog, self.balancer.capacity(slot.index), window);
            // Watched while the current worker serves: its agent answers.
            let ready = slot
                .worker
                .as_ref()
                .filter(|w| w.state == State::Ready && !w.suspect);
            let len = match ready {
                Some(_) if slot.active => self.listeners.queued(slot.index).unwrap_or(0),
                _ => 0,
            };
            slot.queue.per_turn = per_turn;
            let (flipped, ping) = slot.queue.sample(len, now, window, limit);
            if ping && let Some(w) = ready {
                w.send(SupervisorMessage::Ping);
            }
            let cap = slot.queue.cap(now, window, arrivals);
            // Caps move with every sample; a change of a fifth or more is
            // worth a new look at the weights.
            let moved = match (cap, slot.queue.cap) {
                (Some(a), Some(b)) => (a - b).abs() > 0.2 * a.max(b),
                (a, b) => a.is_some() != b.is_some(),
            };
            slot.queue.cap = cap;
            changed |= moved;
            if flipped {
                changed = true;
                tracing::debug!(
                    service = &*self.service,
                    worker = slot.index,
                    queued = len,
                    stalled = slot.queue.stalled,
                    "accept queue"
                );
            }
        }
        // Every worker's queue stalled on two checks in a row also starts
        // an episode: their agents may not reject before the queues are
        // long, and each 10 ms adds a turn's worth of waiting connections.
        // Stalls and saturated event loops (whose new connections go to
        // the overflow listener, so their queues stay short) extend it.
        let watched = self.slots.iter().filter(|s| s.active && s.accepting());
        let all_stalled = watched.clone().count() > 0 && watched.clone().all(|s| s.queue.stalled);
        let since = *self.all_stalled_since.get_or_insert(now);
        if !all_stalled {
            self.all_stalled_since = None;
        }
        let onset = all_stalled && now.duration_since(since) >= QUEUE_CHECK;
        // Waits judged against `max_delay`, not the episode's tighter
        // target: a queue that only misses the target is no sign that the
        // overload goes on (with long turns it misses it at low load).
        let max_wait = self.max_wait();
        let busy = self.slots.iter().any(|s| {
            s.queue.waits_longer(now, max_wait)
                || (s.active && s.accepting() && self.balancer.saturated(s.index))
        });
        if onset || (busy && self.under_pressure(now)) {
            self.press(now);
        }
        // An episode that begins or ends changes where stalls send
        // connections.
        let pressure = self.under_pressure(now);
        if pressure != self.pressure_seen {
            changed = true;
            // The agents keep their queues to `target_delay` meanwhile.
            for w in self.slots.iter().filter_map(|s| s.worker.as_ref()) {
                w.send(SupervisorMessage::Pressure { on: pressure });
            }
        }
        self.pressure_seen = pressure;
        changed
    }

    /// The current worker's agent says it rejects requests: steer new
    /// connections away now, not at the next heartbeat, until
    /// `OVERLOADED_HOLD` after its last such report or that heartbeat,
    /// whichever comes first (the heartbeats' counts steer the rest).
    /// Requests that would wait beyond `max_delay` start or extend an
    /// overload episode; those rejected only to hold an episode's queues to
    /// `target_delay` do not, or an episode would feed itself.
    fn on_overloaded(&mut self, index: usize, reason: &str, beyond_max: bool) {
        let now = Instant::now();
        if beyond_max {
            self.press(now);
        }
        let slot = &mut self.slots[index];
        slot.rejecting_now = Some(now);
        if !slot.overloaded {
            slot.overloaded = true;
            warn!(
                service = &*self.service,
                worker = index,
                worker_pid = slot.worker.as_ref().map_or(0, |w| w.pid),
                reason,
                "worker overloaded: answering 503 before the app"
            );
        }
    }

    /// Counts a heartbeat's early rejections, and logs when a worker enters
    /// or leaves overload.
    fn on_rejections(&mut self, index: usize, r: Rejected, inflight: u64, delay_p99_ms: f64) {
        let slot = &mut self.slots[index];
        slot.rejected.inflight += r.inflight;
        slot.rejected.delay += r.delay;
        let pid = slot.worker.as_ref().map_or(0, |w| w.pid);
        // At the in-flight bound the next request is rejected: overloaded
        // already, even if none arrived since the last heartbeat.
        let o = &self.settings.config.overload;
        let at_bound = o.enabled && o.max_inflight > 0 && inflight >= u64::from(o.max_inflight);
        if r.total() > 0 || at_bound {
            self.press(Instant::now());
        }
        let slot = &mut self.slots[index];
        match (r.total() > 0 || at_bound, slot.overloaded) {
            (true, false) => {
                slot.overloaded = true;
                warn!(
                    service = &*self.service,
                    worker = index,
                    worker_pid = pid,
                    rejected_inflight = r.inflight,
                    rejected_delay = r.delay,
                    inflight,
                    delay_p99_ms,
                    "worker overloaded: answering 503 before the app"
                );
            }
            (false, true) => {
                slot.overloaded = false;
                info!(
                    service = &*self.service,
                    worker = index,
                    worker_pid = pid,
                    "worker no longer overloaded"
                );
            }
            _ => {}
        }
    }

    /// Workers of slots that a reload scaled away drain once no connection
    /// waits in their slot's queue any more (steering sends none there).
    fn drain_scaled_away(&mut self) {
        let deadline = Instant::now() + self.settings.config.shutdown.timeout.get();
        for slot in self.slots.iter_mut().filter(|s| !s.active) {
            slot.restart_at = None;
            let Some(w) = &slot.worker else { continue };
            let queued = if w.state == State::Ready {
                self.listeners.queued(slot.index).unwrap_or(0)
            } else {
                0
            };
            if queued > 0 {
                continue;
            }
            let mut w = slot.worker.take().expect("checked above");
            info!(
                service = &*self.service,
                worker = slot.index,
                worker_pid = w.pid,
                "worker count lowered: draining this worker"
            );
            if w.state == State::Ready {
                w.send(SupervisorMessage::Drain { urgent: false });
            } else {
                w.signal(Signal::SIGTERM);
            }
            w.state = State::Draining;
            slot.retiring.push(Retiring {
                worker: w,
                reason: "worker count lowered".into(),
                phase: Phase::Draining { deadline },
            });
        }
    }

    /// A command from the admin API; `Some` to stop the runtime.
    fn on_admin(&mut self, cmd: AdminCommand) -> Option<Signal> {
        match cmd {
            AdminCommand::Restart { service, reply } => {
                let result = match service {
                    Some(s) if s != *self.service => Err(format!(
                        "no service {s:?} here; this runtime runs {:?}",
                        &*self.service
                    )),
                    _ => {
                        self.start_rolling_restart("admin API");
                        Ok(())
                    }
                };
                let _ = reply.send(result);
                None
            }
            AdminCommand::Reload { reply } => {
                let result = self.reload();
                if let Err(e) = &result {
                    warn!(error = %e, "config reload refused; the runtime keeps its settings");
                }
                let _ = reply.send(result);
                None
            }
            AdminCommand::Stop => {
                info!("stop requested through the admin API");
                Some(Signal::SIGTERM)
            }
        }
    }

    /// Reads the config again and applies what changed: the worker count
    /// (slots start or drain; the others are left alone), the workers'
    /// command and environment (a rolling restart), and the supervisor's
    /// own settings (health, restart, shutdown, balancing). Changes that
    /// need a new process (address, probe server, log format, tracing) are
    /// refused, and so is a config with errors: either way nothing changes.
    fn reload(&mut self) -> Result<Vec<String>, String> {
        if self.shutting_down {
            return Err("the runtime is shutting down".into());
        }
        let Some((reloader, _)) = &self.reloader else {
            return Err("this runtime cannot reload".into());
        };
        let new = reloader().map_err(|e| match e.hint() {
            Some(hint) => format!("{e} (hint: {hint})"),
            None => e.to_string(),
        })?;
        let old = &self.settings;
        let mut fixed = Vec::new();
        if new.addr != old.addr {
            fixed.push(format!("address {} -> {}", old.addr, new.addr));
        }
        if new.service != old.service {
            fixed.push(format!(
                "service name {:?} -> {:?}",
                old.service, new.service
            ));
        }
        for (name, a, b) in [
            (
                "[server] listener/backlog",
                json(&(old.config.server.listener, old.config.server.backlog)),
                json(&(new.config.server.listener, new.config.server.backlog)),
            ),
            (
                "[metrics]",
                json(&old.config.metrics),
                json(&new.config.metrics),
            ),
            (
                "[logger]",
                json(&old.config.logger),
                json(&new.config.logger),
            ),
            (
                "[telemetry]",
                json(&old.config.telemetry),
                json(&new.config.telemetry),
            ),
            (
                "[balance] overflow",
                json(&old.config.balance.overflow),
                json(&new.config.balance.overflow),
            ),
        ] {
            if a != b {
                fixed.push(format!("{name} changed"));
            }
        }
        if new.metrics_addr != old.metrics_addr && !fixed.iter().any(|f| f.starts_with("[metrics]"))
        {
            fixed.push("probe server address changed".into());
        }
        if !fixed.is_empty() {
            return Err(format!(
                "these changes need a restart of ampere; nothing was applied: {}",
                fixed.join("; ")
            ));
        }
        let mut changes = Vec::new();
        for (name, a, b) in [
            (
                "[health]",
                json(&old.config.health),
                json(&new.config.health),
            ),
            (
                "[restart]",
                json(&old.config.restart),
                json(&new.config.restart),
            ),
            (
                "[shutdown]",
                json(&old.config.shutdown),
                json(&new.config.shutdown),
            ),
            (
                "[balance]",
                json(&old.config.balance),
                json(&new.config.balance),
            ),
        ] {
            if a != b {
                changes.push(format!("{name} applied"));
            }
        }
        let command = Command::new(&new, self.command.agent());
        let restart_workers = command != self.command;
        let heap_changed = command.heap_share() != self.command.heap_share();
        let from = self.slots.iter().filter(|s| s.active).count();
        let to = new.workers;
        // Sockets first: if one cannot be opened, nothing has changed yet.
        if let Err(e) = self.listeners.ensure_slot(to.saturating_sub(1)) {
            return Err(format!("cannot open the sockets of {to} workers: {e}"));
        }
        self.balancer.set_config(new.config.balance.clone());
        self.settings = new;
        self.command = command;
        if restart_workers {
            self.log_heap_share();
        }
        if let Some((_, applied)) = &self.reloader {
            applied(&self.settings);
        }
        if to > from {
            for index in 0..to {
                if index >= self.slots.len() {
                    self.slots.push(Slot::new(index));
                    self.balancer.resize(self.slots.len());
                }
                let slot = &mut self.slots[index];
                slot.active = true;
                if slot.worker.is_none() && slot.restart_at.is_none() {
                    self.spawn(index);
                }
            }
            changes.push(format!("workers {from} -> {to}"));
        } else if to < from {
            for slot in self.slots.iter_mut().skip(to) {
                slot.active = false;
                self.balancer.reset(slot.index);
            }
            changes.push(format!("workers {from} -> {to}"));
        }
        if restart_workers {
            // Workers started by this reload already run the new command.
            self.rolling = None;
            self.start_rolling_restart("config reload");
            if let Some(r) = &mut self.rolling {
                r.pending.retain(|i| *i < from.min(to));
            }
            changes.push(match self.command.heap_share() {
                Some((_, mib)) if heap_changed => format!(
                    "each worker's heap limit (a share of the container's memory) is now {mib} MiB: \
                     rolling restart"
                ),
                _ => "worker command or environment changed: rolling restart".into(),
            });
        }
        if changes.is_empty() {
            changes.push("nothing changed".into());
        }
        info!(changes = ?changes, "config reloaded");
        Ok(changes)
    }

    fn publish_metrics(&self) {
        let (shares, overflow_share) = self
            .balancer
            .attached()
            .map(|w| w.shares())
            .unwrap_or_default();
        let mut states: BTreeMap<&'static str, u64> = BTreeMap::new();
        for w in self.processes() {
            *states.entry(state_label(w)).or_default() += 1;
        }
        let workers = self
            .slots
            .iter()
            .filter(|s| s.active || s.worker.is_some() || !s.retiring.is_empty())
            .map(|s| WorkerSample {
                slot: s.index,
                heartbeat: s.worker.as_ref().and_then(|w| w.tracker.last.clone()),
                http: s.http.values().cloned().collect(),
                rejected: s.rejected,
                rebalanced: s.rebalanced,
                share: shares.get(s.index).copied().unwrap_or(0.0),
                pid: s.worker.as_ref().map(|w| w.pid),
                state: s.worker.as_ref().map_or("down", state_label),
                since: s.worker.as_ref().map(|w| w.started),
                restarts: s.restarts,
                rps: self.balancer.rps(s.index),
                queued: s.queue.len,
                queue_stalls: s.queue.stalls,
                cpu_demand: s.worker.as_ref().and_then(|w| w.cpu.share),
            })
            .collect();
        self.metrics.publish(Snapshot {
            service: self.service.to_string(),
            workers,
            states,
            restarts: self.restarts.clone(),
            log_dropped: self.logs.dropped(),
            overflow_share,
        });
    }

    fn start_rolling_restart(&mut self, why: &str) {
        if self.shutting_down {
            return;
        }
        if self.rolling.is_some() {
            warn!(trigger = why, "a rolling restart is already in progress");
            return;
        }
        info!(
            trigger = why,
            workers = self.slots.len(),
            "rolling restart: replacing workers one slot at a time"
        );
        self.rolling = Some(Rolling {
            pending: self
                .slots
                .iter()
                .filter(|s| s.active)
                .map(|s| s.index)
                .collect(),
            // (slots are filtered again as they come up: a reload may
            // deactivate some meanwhile)
            current: None,
            since_id: self.next_id,
        });
    }

    fn advance_rolling(&mut self) {
        let Some(rolling) = &mut self.rolling else {
            return;
        };
        if let Some(i) = rolling.current {
            let slot = &self.slots[i];
            if slot.active && !slot.retiring.is_empty() {
                return;
            }
            match &slot.worker {
                // Started before the rolling restart and still starting
                // (a reload came while it started): replaced once it listens.
                Some(w) if slot.active && w.id < rolling.since_id => {
                    if w.state == State::Ready {
                        self.replace(i, &Verdict::Rolling);
                    }
                    return;
                }
                // Its replacement is still starting.
                Some(w) if slot.active && w.state != State::Ready => return,
                // Done; or a slot that lost its process starts the next one
                // from the current command anyway.
                _ => rolling.current = None,
            }
        }
        while let Some(i) = rolling.pending.pop_front() {
            let slot = &self.slots[i];
            let Some(w) = slot.worker.as_ref().filter(|_| slot.active) else {
                // Inactive, or between processes: its next one starts from
                // the current command.
                continue;
            };
            if w.id >= rolling.since_id {
                continue;
            }
            rolling.current = Some(i);
            if w.state == State::Ready {
                self.replace(i, &Verdict::Rolling);
            }
            return;
        }
        info!("rolling restart complete");
        self.rolling = None;
    }

    fn processes(&self) -> impl Iterator<Item = &Worker> {
        self.slots.iter().flat_map(Slot::processes)
    }

    async fn shutdown(
        mut self,
        signal_received: Signal,
        [term, int, quit]: [&mut tokio::signal::unix::Signal; 3],
    ) -> Outcome {
        let timeout = self.settings.config.shutdown.timeout.get();
        if self.give_up.is_none() {
            info!(
                signal = signal_received.as_str(),
                timeout_ms = timeout.as_millis() as u64,
                "shutting down: finishing in-flight requests (a second signal stops at once)"
            );
        }
        self.shutting_down = true;
        self.probes.set_shutting_down();
        self.rolling = None;
        for slot in &mut self.slots {
            slot.restart_at = None;
        }
        // The loop stays alive for /live while it waits below.
        let mut tick = tokio::time::interval(Duration::from_secs(1));

        let deadline = Instant::now() + timeout;

        // 1. No new handshakes; ready workers accept what is already queued.
        if let Err(e) = self.listeners.refuse_new_connections() {
            // Some kernels refuse socket filters to users without privilege
            // (steering programs still attach): the overflow listener then
            // answers new connections with 503, rather than letting them
            // queue on sockets that close, and reset, at exit.
            let all_to_overflow = crate::balance::Weights {
                slots: vec![0; self.slots.len()],
                overflow: 1,
            };
            if self.listeners.has_overflow() && self.listeners.steer(&all_to_overflow).is_ok() {
                warn!(error = %e, "cannot stop new connections at the socket; until ampere exits, new connections get 503 from the overflow listener");
            } else {
                warn!(error = %e, "cannot stop new connections at the socket; queued connections may be reset");
            }
        }
        let queue_deadline = Instant::now() + (timeout / 2).min(Duration::from_secs(5));
        loop {
            let queued: u32 = self
                .slots
                .iter()
                .filter(|s| s.accepting())
                .map(|s| self.listeners.queued(s.index).unwrap_or(0))
                .sum();
            if queued == 0 {
                break;
            }
            if Instant::now() >= queue_deadline {
                warn!(
                    queued,
                    "connections still queued when workers stop accepting; they will be reset"
                );
                break;
            }
            tokio::select! {
                Some(ev) = self.events.recv() => {
                    self.on_event(ev);
                }
                _ = tokio::time::sleep(Duration::from_millis(2)) => {}
                _ = tick.tick() => self.probes.tick(),
                _ = term.recv() => return self.stop_now(Signal::SIGTERM).await,
                _ = int.recv() => return self.stop_now(Signal::SIGINT).await,
                _ = quit.recv() => return self.stop_now(Signal::SIGQUIT).await,
            }
        }

        // 2. Drain: stop accepting, finish in-flight requests, then exit.
        for slot in &mut self.slots {
            let retiring = slot.retiring.iter_mut().map(|r| &mut r.worker);
            for w in slot.worker.iter_mut().chain(retiring) {
                match w.state {
                    State::Ready if !w.suspect => {
                        w.send(SupervisorMessage::Drain { urgent: false })
                    }
                    // Blocked: it will not drain.
                    State::Ready => w.signal(Signal::SIGKILL),
                    // Not serving yet: nothing to finish.
                    State::Starting => w.signal(Signal::SIGTERM),
                    State::Draining => {}
                }
                w.state = State::Draining;
            }
        }
        while self.processes().next().is_some() {
            tokio::select! {
                Some(ev) = self.events.recv() => {
                    self.on_event(ev);
                }
                _ = tokio::time::sleep_until(deadline.into()) => break,
                _ = tick.tick() => self.probes.tick(),
                _ = term.recv() => return self.stop_now(Signal::SIGTERM).await,
                _ = int.recv() => return self.stop_now(Signal::SIGINT).await,
                _ = quit.recv() => return self.stop_now(Signal::SIGQUIT).await,
            }
        }
        let left: Vec<u32> = self.processes().map(|w| w.pid).collect();
        if !left.is_empty() {
            warn!(pids = ?left, "workers still running after the shutdown timeout; killing them");
            self.kill_all().await;
        }
        info!("stopped");
        Outcome::Stopped
    }

    async fn stop_now(mut self, second: Signal) -> Outcome {
        warn!(signal = second.as_str(), "second signal: stopping at once");
        self.kill_all().await;
        Outcome::Interrupted(second)
    }

    /// SIGKILLs every worker and waits (briefly) until each is reaped.
    async fn kill_all(&mut self) {
        for w in self.processes() {
            w.signal(Signal::SIGKILL);
        }
        let limit = Instant::now() + Duration::from_secs(5);
        while self.processes().next().is_some() {
            tokio::select! {
                Some(ev) = self.events.recv() => {
                    self.on_event(ev);
                }
                _ = tokio::time::sleep_until(limit.into()) => break,
            }
        }
    }
}

/// Every reason label of `ampere_worker_restarts_total`.
const RESTART_REASONS: [&str; 8] = [
    "crash",
    "start_failure",
    "start_timeout",
    "spawn_error",
    "blocked",
    "saturated",
    "memory",
    "rolling_restart",
];

/// The delay before restarting after `failures` consecutive failures: the
/// first restart is immediate (a healthy app that crashed once should serve
/// again at once), then `delay`, doubling, capped at `max_delay`.
fn backoff(settings: &Settings, failures: u32) -> Duration {
    let r = &settings.config.restart;
    if failures <= 1 {
        return Duration::ZERO;
    }
    let factor = 1u32 << (failures - 2).min(20);
    r.delay.get().saturating_mul(factor).min(r.max_delay.get())
}

/// The line of a crashed worker's stderr that most likely says why: the last
/// error heading node printed (`Error: Cannot find module 'x'`, `TypeError
/// [ERR_X]: ...`), else the last line that is not part of a stack trace, of
/// the error's own properties, or of node's closing banner.
fn last_error_line(tail: &[String]) -> Option<&str> {
    let lines = || tail.iter().rev().map(|l| l.trim_end());
    lines().find(|l| is_error_heading(l)).or_else(|| {
        lines().find(|l| {
            let t = l.trim_start();
            let noise = t.is_empty()
                || t.starts_with("at ")
                || l.starts_with("Node.js v")
                || l.starts_with("(Use `node --trace")
                || matches!(t, "^" | "}" | "{")
                // `  code: 'ERR_X',` and the like, inside the error's dump.
                || (l.starts_with(' ') && t.contains(": "));
            !noise
        })
    })
}

/// `Error: ...`, `TypeError: ...`, `Error [ERR_X]: ...`, `DOMException: ...`
/// at the start of a line: how node heads an uncaught error.
fn is_error_heading(line: &str) -> bool {
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '$'))
        .unwrap_or(line.len());
    let (name, rest) = line.split_at(name_end);
    (name.ends_with("Error") || name.ends_with("Exception"))
        && (rest.starts_with(": ") || rest.starts_with(" ["))
}

/// The next admin command; never, without an admin API.
async fn next_command(
    rx: &mut Option<mpsc::UnboundedReceiver<AdminCommand>>,
) -> Option<AdminCommand> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// A settings section as JSON, to compare old and new.
fn json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_default()
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_millis(100);
    /// Connections a worker accepts per turn of its loop (`hold_target`).
    const A: u32 = 8;

    impl QueueWatch {
        fn accepting(per_turn: u32) -> Self {
            QueueWatch {
                per_turn,
                ..QueueWatch::new()
            }
        }
    }

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn the_cause_of_a_crash_is_the_error_heading_not_the_dump_after_it() {
        // What node 20 prints for a missing module.
        let missing = lines(
            "node:internal/modules/cjs/loader:1228\n  throw err;\n  ^\n\n\
             Error: Cannot find module 'express'\nRequire stack:\n- /app/s.js\n    \
             at Module._resolveFilename (node:internal/modules/cjs/loader:1225:15)\n    \
             at node:internal/main/run_main_module:28:49 {\n  code: 'MODULE_NOT_FOUND',\n  \
             requireStack: [ '/app/s.js' ]\n}\n\nNode.js v20.20.2",
        );
        assert_eq!(
            last_error_line(&missing),
            Some("Error: Cannot find module 'express'")
        );
        let coded = lines(
            "Error [ERR_REQUIRE_ESM]: require() of ES Module /app/x.mjs not supported.\n    \
             at Object.<anonymous> (/app/s.js:1:1) {\n  code: 'ERR_REQUIRE_ESM'\n}",
        );
        assert_eq!(
            last_error_line(&coded),
            Some("Error [ERR_REQUIRE_ESM]: require() of ES Module /app/x.mjs not supported.")
        );
        // A thrown string has no heading: the last line that says something.
        let thrown = lines(
            "/app/s.js:1\nthrow 'no config';\n^\nno config\n\
             (Use `node --trace-uncaught ...` to show where the exception was thrown)\n\nNode.js v20.20.2",
        );
        assert_eq!(last_error_line(&thrown), Some("no config"));
        // An app's own last words.
        assert_eq!(
            last_error_line(&lines("starting\nDATABASE_URL is not set")),
            Some("DATABASE_URL is not set")
        );
        assert_eq!(last_error_line(&lines("\n\n")), None);
    }

    #[test]
    fn a_worker_that_does_not_answer_within_the_window_stalls() {
        let t0 = Instant::now();
        let mut q = QueueWatch::accepting(A);
        // A connection waits: ping once, and not again while it is
        // unanswered.
        assert_eq!(q.sample(1, t0, WINDOW, 100), (false, true));
        assert_eq!(
            q.sample(1, t0 + Duration::from_millis(90), WINDOW, 100),
            (false, false)
        );
        assert_eq!(
            q.sample(1, t0 + Duration::from_millis(100), WINDOW, 100),
            (true, false)
        );
        assert!(q.stalled);
        assert_eq!(q.stalls, 1);
        // Five turns' worth waiting behind a turn that has lasted 20 ms
        // would wait too.
        let mut q2 = QueueWatch::accepting(A);
        q2.sample(5 * A, t0, WINDOW, 100);
        assert_eq!(
            q2.sample(5 * A, t0 + Duration::from_millis(20), WINDOW, 100),
            (true, false)
        );
        // It answers, but at 110 ms a turn its queue still waits too long;
        // once it has taken the connection, the slot gets connections again.
        assert!(!q.pong(t0 + Duration::from_millis(110), WINDOW));
        assert!(q.stalled);
        assert_eq!(
            q.sample(0, t0 + Duration::from_millis(120), WINDOW, 100),
            (true, false)
        );
        assert!(!q.stalled);
    }

    #[test]
    fn within_an_episode_the_window_is_the_target_but_at_least_two_turns() {
        let t0 = Instant::now();
        let mut q = QueueWatch::accepting(A);
        let target = Window {
            wait: Duration::from_millis(20),
            targeted: true,
        };
        let plain = Window {
            wait: WINDOW,
            targeted: false,
        };
        assert_eq!(target.of(&q), Duration::from_millis(20));
        // Turns of 40 ms: one waiting connection is taken at the next.
        q.sample(1, t0, WINDOW, 100);
        q.pong(t0 + Duration::from_millis(40), WINDOW);
        assert_eq!(target.of(&q), Duration::from_millis(80));
        assert_eq!(plain.of(&q), WINDOW);
        let window = target.of(&q);
        assert!(!q.sample(A, t0 + Duration::from_millis(50), window, 100).0);
        assert!(
            q.sample(A + 1, t0 + Duration::from_millis(60), window, 100)
                .0
        );
    }

    #[test]
    fn an_episode_goes_on_only_while_queues_wait_longer_than_max_delay() {
        let t0 = Instant::now();
        let mut q = QueueWatch::accepting(A);
        q.sample(A + 1, t0, WINDOW, 100);
        q.pong(t0 + Duration::from_millis(40), WINDOW);
        // Two turns' worth behind 40 ms turns miss a 20 ms target, not
        // 100 ms.
        let now = t0 + Duration::from_millis(45);
        assert!(q.waits_longer(now, Duration::from_millis(20)));
        assert!(!q.waits_longer(now, WINDOW));
        // A turn in progress counts: two turns' worth behind one of 60 ms
        // so far would.
        let ping = t0 + Duration::from_millis(100);
        assert_eq!(q.sample(A + 1, ping, WINDOW, 100), (false, true));
        assert!(q.waits_longer(ping + Duration::from_millis(60), WINDOW));
        // None waiting: nothing waits at all.
        q.sample(0, ping + Duration::from_millis(70), WINDOW, 100);
        assert!(!q.waits_longer(ping + Duration::from_millis(70), Duration::ZERO));
    }

    #[test]
    fn a_queue_may_hold_what_the_worker_accepts_in_the_window() {
        // Turns of 40 ms: two turns' worth of waiting connections are taken
        // within 100 ms, one more is not.
        let t0 = Instant::now();
        let mut q = QueueWatch::accepting(A);
        assert_eq!(q.sample(2 * A, t0, WINDOW, 100), (false, true));
        assert!(!q.pong(t0 + Duration::from_millis(40), WINDOW));
        assert_eq!(q.turn, Duration::from_millis(40));
        let later = t0 + Duration::from_millis(50);
        assert_eq!(q.sample(2 * A, later, WINDOW, 100), (false, false));
        assert_eq!(q.sample(2 * A + 1, later, WINDOW, 100), (true, false));
        // Shorter turns later: the estimate follows (halfway per answer).
        assert_eq!(
            q.sample(2 * A + 1, t0 + Duration::from_millis(100), WINDOW, 100),
            (false, true)
        );
        assert!(q.pong(t0 + Duration::from_millis(110), WINDOW));
        assert_eq!(q.turn, Duration::from_millis(25));
        assert!(!q.stalled);
    }

    #[test]
    fn a_busy_worker_is_capped_at_what_it_accepts_per_check() {
        let t0 = Instant::now();
        let mut q = QueueWatch::accepting(A);
        // Not measured yet, or no arrival rate: no cap.
        assert_eq!(q.cap(t0, WINDOW, Some(1000.0)), None);
        q.sample(1, t0, WINDOW, 100);
        q.pong(t0 + Duration::from_millis(25), WINDOW);
        let now = t0 + Duration::from_millis(30);
        assert_eq!(q.cap(now, WINDOW, None), None);
        // Turns of 25 ms: 4 turns' accepts in the window, 1 waiting, so
        // 4A - 1 more; 10,000 arrivals a second bring 100 per 10 ms check.
        q.sample(1, now, WINDOW, 100);
        let cap = q.cap(now, WINDOW, Some(10_000.0)).unwrap();
        assert!((cap - f64::from(4 * A - 1) / 100.0).abs() < 1e-9, "{cap}");
        // A full queue still gets one connection's worth per check.
        q.sample(5 * A, now, WINDOW, 100);
        let cap = q.cap(now, WINDOW, Some(10_000.0)).unwrap();
        assert!((cap - 0.01).abs() < 1e-9, "{cap}");
        // A fast loop, or an old measurement: no cap.
        assert_eq!(
            q.cap(now + Duration::from_secs(2), WINDOW, Some(1000.0)),
            None
        );
        let mut fast = QueueWatch::accepting(A);
        fast.sample(1, t0, WINDOW, 100);
        fast.pong(t0 + Duration::from_millis(2), WINDOW);
        assert_eq!(
            fast.cap(t0 + Duration::from_millis(3), WINDOW, Some(1000.0)),
            None
        );
    }

    #[test]
    fn a_queue_may_hold_what_its_worker_serves_in_the_window() {
        assert_eq!(queue_limit(511, Some(500.0), WINDOW), 50);
        assert_eq!(queue_limit(511, None, WINDOW), 255);
        assert_eq!(queue_limit(511, Some(20.0), WINDOW), 8);
        assert_eq!(queue_limit(511, Some(1e6), WINDOW), 255);
    }

    #[test]
    fn a_busy_queue_with_a_live_worker_does_not_stall() {
        let t0 = Instant::now();
        let mut q = QueueWatch::accepting(A);
        let mut pings = 0;
        for k in 0..50u32 {
            let now = t0 + Duration::from_millis(10 * u64::from(k));
            let (changed, ping) = q.sample(2, now, WINDOW, 100);
            assert!(!changed && !q.stalled, "sample {k}");
            if ping {
                pings += 1;
                // Answered within a few milliseconds, as a running loop does.
                q.pong(now + Duration::from_millis(2), WINDOW);
            }
        }
        assert_eq!(q.stalls, 0);
        // Not every sample: an answer within half the window (50 ms) is
        // enough, so a ping goes out every 60 ms of the 500.
        assert_eq!(pings, 9);
    }

    #[test]
    fn an_empty_queue_never_stalls_and_a_long_one_does_at_once() {
        let t0 = Instant::now();
        let mut q = QueueWatch::accepting(A);
        assert_eq!(
            q.sample(0, t0 + Duration::from_secs(5), WINDOW, 100),
            (false, false)
        );
        assert_eq!(
            q.sample(100, t0 + Duration::from_secs(5), WINDOW, 100),
            (true, true)
        );
        // Answering is not enough while the queue stays that long.
        assert!(!q.pong(t0 + Duration::from_secs(5), WINDOW));
        assert!(q.stalled);
        assert_eq!(
            q.sample(0, t0 + Duration::from_secs(6), WINDOW, 100),
            (true, false)
        );
    }
}
