//! One worker process in one slot: how it is started (inherited listening
//! socket and control channel, agent preloaded, tied to the supervisor's
//! life), its state, and the tasks that forward its output and messages.

pub mod control;
mod cpu;
mod memory;
mod spawn;

use std::collections::VecDeque;
use std::os::fd::BorrowedFd;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};

pub use control::{AgentMessage, Heartbeat, SupervisorMessage};
pub use cpu::CpuDemand;
pub use memory::MIN_OLD_SPACE_MIB;
pub use spawn::Command;

use crate::health::Tracker;
use crate::telemetry::logs::{self, Logs, Origin};

/// Where a worker process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Spawned, not yet listening.
    Starting,
    /// Listening on the service port.
    Ready,
    /// Asked to stop accepting and finish its requests.
    Draining,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Ready => "ready",
            State::Draining => "draining",
        }
    }
}

/// What a worker's tasks tell the supervisor.
#[derive(Debug)]
pub enum Event {
    Message(AgentMessage),
    /// The control channel sent something that is not a message.
    BadMessage(String),
    Exited(ExitStatus),
}

/// An event with the worker it is about.
#[derive(Debug)]
pub struct WorkerEvent {
    pub slot: usize,
    /// Which process of the slot (slots outlive their processes).
    pub id: u64,
    pub event: Event,
}

/// A running worker process.
pub struct Worker {
    pub id: u64,
    pub pid: u32,
    pub state: State,
    pub started: Instant,
    pub ready_at: Option<Instant>,
    /// Heartbeats and what they say.
    pub tracker: Tracker,
    /// Silent for `suspect_after`: no new connections are steered to it.
    pub suspect: bool,
    /// The process that runs the app: `pid`, or with `[app] command` the
    /// child of a wrapper (npm start), as its agent reported.
    pub app_pid: u32,
    /// Its main thread's CPU time, sampled at each heartbeat.
    pub cpu: CpuDemand,
    control: mpsc::UnboundedSender<SupervisorMessage>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
}

impl Worker {
    /// Starts `command` in `slot`, accepting from `listener`.
    pub fn spawn(
        command: &Command,
        slot: usize,
        id: u64,
        listener: BorrowedFd<'_>,
        service: Arc<str>,
        events: mpsc::UnboundedSender<WorkerEvent>,
        logs: &Logs,
    ) -> std::io::Result<Worker> {
        let spawned = command.spawn(slot, listener)?;
        let mut child = spawned.child;
        let pid = child.id().unwrap_or(0);
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(logs::STDERR_TAIL)));
        let origin = Origin {
            service,
            worker: slot,
            pid,
            stderr: false,
        };
        let stdout_done = child
            .stdout
            .take()
            .map(|stdout| tokio::spawn(logs::pump(stdout, origin.clone(), logs.clone(), None)));
        let stderr_done = child.stderr.take().map(|stderr| {
            tokio::spawn(logs::pump(
                stderr,
                Origin {
                    stderr: true,
                    ..origin
                },
                logs.clone(),
                Some(tail.clone()),
            ))
        });

        let (read, mut write) = spawned.control.into_split();
        let tx = events.clone();
        tokio::spawn(async move {
            read_messages(read, |event| {
                tx.send(WorkerEvent { slot, id, event }).is_ok()
            })
            .await
        });
        let (control, mut outbox) = mpsc::unbounded_channel::<SupervisorMessage>();
        tokio::spawn(async move {
            while let Some(msg) = outbox.recv().await {
                let mut line = serde_json::to_vec(&msg).unwrap_or_default();
                line.push(b'\n');
                if write.write_all(&line).await.is_err() {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            let status = child.wait().await;
            // Anything the app started in its process group goes with it
            // (and lets go of the worker's pipes).
            spawn::kill_group(pid, nix::sys::signal::Signal::SIGKILL);
            // Let both pumps reach end of file: the last words of a crashing
            // worker are then in the tail before we report its exit, and
            // what it wrote last is in the log stream before a shutdown
            // ends. A grandchild outside the group may hold a pipe open:
            // don't wait for it long.
            let pumps = async {
                for done in [stdout_done, stderr_done].into_iter().flatten() {
                    let _ = done.await;
                }
            };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), pumps).await;
            let status =
                status.unwrap_or_else(|_| std::os::unix::process::ExitStatusExt::from_raw(0));
            let _ = events.send(WorkerEvent {
                slot,
                id,
                event: Event::Exited(status),
            });
        });

        Ok(Worker {
            id,
            pid,
            state: State::Starting,
            started: Instant::now(),
            ready_at: None,
            tracker: Tracker::new(Instant::now()),
            suspect: false,
            app_pid: pid,
            cpu: CpuDemand::default(),
            control,
            stderr_tail: tail,
        })
    }

    pub fn send(&self, msg: SupervisorMessage) {
        let _ = self.control.send(msg);
    }

    /// Signals the worker's whole process group.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        spawn::kill_group(self.pid, signal);
    }

    /// The last lines the worker wrote to stderr, oldest first.
    pub fn stderr_tail(&self) -> Vec<String> {
        self.stderr_tail
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// Describes an exit status for people: "exit code 1", "signal SIGKILL".
pub fn describe_exit(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        format!("exit code {code}")
    } else if let Some(sig) = status.signal() {
        match nix::sys::signal::Signal::try_from(sig) {
            Ok(s) => format!("signal {}", s.as_str()),
            Err(_) => format!("signal {sig}"),
        }
    } else {
        "unknown status".to_owned()
    }
}

/// Reads the agent's messages from `read` and hands each to `deliver` (which
/// says whether to go on), until the channel ends. One oversized line is
/// reported and skipped: it must not cut the channel (heartbeats, drains).
async fn read_messages<R: tokio::io::AsyncRead + Unpin>(
    read: R,
    mut deliver: impl FnMut(Event) -> bool,
) {
    let mut lines = FramedRead::new(read, LinesCodec::new_with_max_length(control::MAX_LINE));
    while let Some(line) = lines.next().await {
        let event = match line {
            Ok(line) => match serde_json::from_str(&line) {
                Ok(msg) => Event::Message(msg),
                Err(e) => Event::BadMessage(e.to_string()),
            },
            // A worker that dies (killed, say) while messages to it wait
            // unread resets the channel: its end, not a bad message.
            Err(LinesCodecError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return;
            }
            Err(e) => {
                let too_long = matches!(e, LinesCodecError::MaxLineLengthExceeded);
                if !deliver(Event::BadMessage(e.to_string())) || !too_long {
                    return;
                }
                // The codec goes on to skip the rest of that line, in a
                // fresh reader (the old one ends after an error) with what
                // was read already.
                let codec = lines.decoder().clone();
                let rest = lines.read_buffer().clone();
                lines = FramedRead::new(lines.into_inner(), codec);
                lines.read_buffer_mut().extend_from_slice(&rest);
                continue;
            }
        };
        if !deliver(event) {
            return;
        }
    }
}

#[cfg(test)]
mod reading_tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn an_oversized_message_is_reported_and_the_next_one_read() {
        let (mut agent, ours) = tokio::io::duplex(64 * 1024);
        let writer = tokio::spawn(async move {
            let long = vec![b'x'; control::MAX_LINE + 10];
            agent.write_all(&long).await.unwrap();
            agent.write_all(b"\n{\"type\":\"pong\"}\n").await.unwrap();
        });
        let mut events = Vec::new();
        read_messages(ours, |e| {
            events.push(e);
            true
        })
        .await;
        writer.await.unwrap();
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(matches!(events[0], Event::BadMessage(_)), "{events:?}");
        assert!(
            matches!(events[1], Event::Message(AgentMessage::Pong)),
            "{events:?}"
        );
    }

    #[tokio::test]
    async fn a_reset_channel_ends_without_a_bad_message() {
        let (mut ours, agent) = tokio::net::UnixStream::pair().unwrap();
        // A message the agent never reads, then it goes away: the kernel
        // resets the channel.
        ours.write_all(b"{\"type\":\"drain\"}\n").await.unwrap();
        drop(agent);
        let mut events = Vec::new();
        read_messages(ours, |e| {
            events.push(e);
            true
        })
        .await;
        assert!(events.is_empty(), "{events:?}");
    }
}
