//! The supervisor: owns the service's listening sockets and one slot per
//! worker, starts a worker process in each slot, restarts crashed workers
//! with backoff, and shuts down gracefully on SIGTERM / SIGINT.
//!
//! Everything runs on one thread (a current-thread tokio runtime): the
//! supervisor's work is small, a single thread keeps the state machine free
//! of locks, and it makes PR_SET_PDEATHSIG reliable (children are forked
//! from the main thread, which lives as long as the process).

use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::config::Settings;
use crate::listeners::Listeners;
use crate::telemetry::logs::Logs;
use crate::worker::{
    self, AgentMessage, Command, Event, State, SupervisorMessage, Worker, WorkerEvent,
};

/// One worker position: its socket (in [`Listeners`]) outlives the processes
/// that serve it.
struct Slot {
    index: usize,
    worker: Option<Worker>,
    /// Consecutive failures since the last stable run.
    failures: u32,
    restart_at: Option<Instant>,
    /// Why we killed the current worker, if we did (e.g. a start timeout).
    kill_reason: Option<String>,
}

pub struct Supervisor {
    settings: Settings,
    service: Arc<str>,
    command: Command,
    listeners: Listeners,
    logs: Logs,
    slots: Vec<Slot>,
    next_id: u64,
    events_tx: mpsc::UnboundedSender<WorkerEvent>,
    events: mpsc::UnboundedReceiver<WorkerEvent>,
    shutting_down: bool,
}

/// How the run ended.
pub enum Outcome {
    /// Graceful shutdown completed.
    Stopped,
    /// A second signal cut the shutdown short.
    Interrupted(Signal),
}

impl Supervisor {
    pub fn new(settings: Settings, command: Command, listeners: Listeners, logs: Logs) -> Self {
        let (events_tx, events) = mpsc::unbounded_channel();
        let slots = (0..settings.workers)
            .map(|index| Slot {
                index,
                worker: None,
                failures: 0,
                restart_at: None,
                kill_reason: None,
            })
            .collect();
        Supervisor {
            service: settings.service.as_str().into(),
            settings,
            command,
            listeners,
            logs,
            slots,
            next_id: 0,
            events_tx,
            events,
            shutting_down: false,
        }
    }

    pub async fn run(mut self) -> std::io::Result<Outcome> {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
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
        for slot in 0..self.slots.len() {
            self.spawn(slot);
        }
        let first = loop {
            let wake = self.next_deadline();
            tokio::select! {
                Some(ev) = self.events.recv() => self.on_event(ev),
                _ = term.recv() => break Signal::SIGTERM,
                _ = int.recv() => break Signal::SIGINT,
                _ = hup.recv() => {
                    warn!("SIGHUP received: rolling restarts are not implemented yet; ignoring it");
                }
                _ = sleep_until(wake) => self.on_timer(),
            }
        };
        Ok(self.shutdown(first, &mut term, &mut int).await)
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
            }
        }
    }

    fn on_event(&mut self, ev: WorkerEvent) {
        let service = self.service.clone();
        let Some(slot) = self.slots.get_mut(ev.slot) else {
            return;
        };
        if let Event::Exited(status) = ev.event {
            if let Some(w) = slot.worker.take_if(|w| w.id == ev.id) {
                self.on_exit(ev.slot, w, status);
            }
            return;
        }
        let current = slot.worker.as_mut().filter(|w| w.id == ev.id);
        match ev.event {
            Event::Exited(_) => {}
            Event::Message(msg) => {
                let Some(w) = current else { return };
                match msg {
                    AgentMessage::Listening { node } => {
                        if w.state == State::Starting {
                            w.state = State::Ready;
                            w.ready_at = Some(Instant::now());
                            info!(
                                service = &*service,
                                worker = ev.slot,
                                worker_pid = w.pid,
                                startup_ms = w.started.elapsed().as_millis() as u64,
                                node = node.unwrap_or_default(),
                                "worker ready"
                            );
                        }
                    }
                    AgentMessage::ListenOther { port } => warn!(
                        service = &*service,
                        worker = ev.slot,
                        worker_pid = w.pid,
                        port,
                        service_port = self.listeners.addr().port(),
                        "the app listens on port {port}, which ampere does not serve; make it listen on process.env.PORT, or set server.port = {port}"
                    ),
                    AgentMessage::Heartbeat(h) => w.health = Some(h),
                    AgentMessage::Drained => {
                        // The agent finished its connections; now the app may
                        // run its own SIGTERM handler, or die of the default.
                        w.signal(Signal::SIGTERM);
                    }
                    AgentMessage::Unknown => {}
                }
            }
            Event::BadMessage(e) => {
                if let Some(w) = current {
                    warn!(service = &*service, worker = ev.slot, worker_pid = w.pid, error = %e, "unreadable message on the control channel");
                }
            }
        }
    }

    fn on_exit(&mut self, index: usize, w: Worker, status: std::process::ExitStatus) {
        let how = worker::describe_exit(&status);
        let slot = &mut self.slots[index];
        if self.shutting_down || w.state == State::Draining {
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
        let reason = slot.kill_reason.take().unwrap_or_else(|| {
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
            stderr = tail.join("\n"),
            "worker {reason}{cause}; failure {} in a row, restarting in {}",
            slot.failures,
            humantime::format_duration(Duration::from_millis(delay.as_millis() as u64)),
        );
        slot.restart_at = Some(Instant::now() + delay);
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        let start_timeout = self.settings.config.worker.start_timeout.get();
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
                slot.kill_reason = Some(reason);
            }
            if !self.shutting_down
                && slot.worker.is_none()
                && slot.restart_at.is_some_and(|t| now >= t)
            {
                self.spawn(index);
            }
        }
    }

    /// The next moment `on_timer` has something to do.
    fn next_deadline(&self) -> Option<Instant> {
        let start_timeout = self.settings.config.worker.start_timeout.get();
        self.slots
            .iter()
            .flat_map(|s| {
                let start = s
                    .worker
                    .as_ref()
                    .filter(|w| w.state == State::Starting && s.kill_reason.is_none())
                    .map(|w| w.started + start_timeout);
                [start, s.restart_at]
            })
            .flatten()
            .min()
    }

    fn workers(&self) -> impl Iterator<Item = &Worker> {
        self.slots.iter().filter_map(|s| s.worker.as_ref())
    }

    async fn shutdown(
        mut self,
        signal_received: Signal,
        term: &mut tokio::signal::unix::Signal,
        int: &mut tokio::signal::unix::Signal,
    ) -> Outcome {
        let timeout = self.settings.config.shutdown.timeout.get();
        let deadline = Instant::now() + timeout;
        info!(
            signal = signal_received.as_str(),
            timeout_ms = timeout.as_millis() as u64,
            "shutting down: finishing in-flight requests (a second signal stops at once)"
        );
        self.shutting_down = true;
        for slot in &mut self.slots {
            slot.restart_at = None;
        }

        // 1. No new handshakes; ready workers accept what is already queued.
        if let Err(e) = self.listeners.refuse_new_connections() {
            warn!(error = %e, "cannot stop new connections at the socket; queued connections may be reset");
        }
        let queue_deadline = Instant::now() + (timeout / 2).min(Duration::from_secs(5));
        loop {
            let queued: u32 = self
                .slots
                .iter()
                .filter(|s| s.worker.as_ref().is_some_and(|w| w.state == State::Ready))
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
                Some(ev) = self.events.recv() => self.on_event(ev),
                _ = tokio::time::sleep(Duration::from_millis(2)) => {}
                _ = term.recv() => return self.stop_now(Signal::SIGTERM).await,
                _ = int.recv() => return self.stop_now(Signal::SIGINT).await,
            }
        }

        // 2. Drain: stop accepting, finish in-flight requests, then exit.
        for slot in &mut self.slots {
            if let Some(w) = &mut slot.worker {
                match w.state {
                    State::Ready => w.send(SupervisorMessage::Drain),
                    // Not serving yet: nothing to finish.
                    State::Starting => w.signal(Signal::SIGTERM),
                    State::Draining => {}
                }
                w.state = State::Draining;
            }
        }
        while self.workers().next().is_some() {
            tokio::select! {
                Some(ev) = self.events.recv() => self.on_event(ev),
                _ = tokio::time::sleep_until(deadline.into()) => break,
                _ = term.recv() => return self.stop_now(Signal::SIGTERM).await,
                _ = int.recv() => return self.stop_now(Signal::SIGINT).await,
            }
        }
        let left: Vec<u32> = self.workers().map(|w| w.pid).collect();
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
        for w in self.workers() {
            w.signal(Signal::SIGKILL);
        }
        let limit = Instant::now() + Duration::from_secs(5);
        while self.workers().next().is_some() {
            tokio::select! {
                Some(ev) = self.events.recv() => self.on_event(ev),
                _ = tokio::time::sleep_until(limit.into()) => break,
            }
        }
    }
}

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
/// one that is not part of a stack trace or node's closing version banner.
fn last_error_line(tail: &[String]) -> Option<&str> {
    tail.iter().rev().map(|l| l.trim_end()).find(|l| {
        !l.is_empty()
            && !l.trim_start().starts_with("at ")
            && !l.starts_with("Node.js v")
            && l.trim() != "^"
    })
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
