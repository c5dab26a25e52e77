//! Starting a worker process: the command line (node, its options, the
//! preloaded agent, the app), the environment, and the descriptors it
//! inherits. The `unsafe` here is confined to the `pre_exec` hook that runs
//! between fork and exec.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::config::{Launch, Settings};

/// The descriptor numbers a worker finds its listening socket and its end
/// of the control channel at. Not 3 and 4: wrappers that start the app in
/// a child process put their own channel there (tsx an IPC pipe on fd 3),
/// which would hide ours from the app.
const WORKER_LISTEN_FD: i32 = 64;
const WORKER_CONTROL_FD: i32 = 65;
/// With `[overload] hold_target`, further copies of the listening socket,
/// at 66 and up. node (libuv) accepts one connection per descriptor per
/// turn of its event loop, so a worker whose turns are long (a busy
/// CPU-bound app) leaves new connections in the accept queue for many
/// turns; with these it takes up to `1 + WORKER_ACCEPT_FDS` per turn.
const WORKER_ACCEPT_FDS: i32 = 7;

/// Whether a node option (or a NODE_OPTIONS value) sets the V8 heap
/// limit; V8 takes `-` and `_` alike in flag names.
fn sets_heap(option: &str) -> bool {
    option.replace('_', "-").contains("--max-old-space-size")
}

/// How to start a worker of one service: the same for every slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    cwd: PathBuf,
    /// The agent file every worker preloads.
    agent: PathBuf,
    /// The container's memory limit and each worker's V8 old-space limit
    /// (MiB) from it, where ampere sets that (see [`super::memory`]).
    heap_share: Option<(u64, u64)>,
    /// How many further copies of the listening socket a worker gets.
    accept_fds: i32,
}

pub struct Spawned {
    pub child: tokio::process::Child,
    /// The supervisor's end of the control channel.
    pub control: tokio::net::UnixStream,
}

impl Command {
    pub fn new(settings: &Settings, agent: &Path) -> Command {
        let cfg = &settings.config;
        let mut node_options: Vec<OsString> = cfg
            .node
            .options
            .iter()
            .map(|o| o.0.clone().into())
            .collect();
        // The user's own heap flag wins over a share of the container,
        // wherever it is: [node] options, NODE_OPTIONS, a start script's
        // node options, a command's arguments (V8 takes - and _ alike).
        let launch_options: &[String] = match &settings.launch {
            Launch::Script { node_options, .. } => node_options,
            Launch::Command { args, .. } => args,
            Launch::Next { .. } => &[],
        };
        let user_heap = cfg.node.options.iter().any(|o| sets_heap(&o.0))
            || launch_options.iter().any(|o| sets_heap(o))
            || settings
                .env
                .get("NODE_OPTIONS")
                .is_some_and(|o| sets_heap(o));
        let heap_share = if cfg.health.max_heap.is_none() && !user_heap {
            super::memory::container_limit()
                .map(|limit| (limit, super::memory::old_space_mib(limit, settings.workers)))
        } else {
            None
        };
        let heap_mib = cfg
            .health
            .max_heap
            .map(|max| (max.bytes() >> 20).max(1))
            .or(heap_share.map(|(_, mib)| mib));
        if let Some(mib) = heap_mib {
            node_options.push(format!("--max-old-space-size={mib}").into());
        }
        let require = [OsString::from("--require"), agent.into()];
        let mut env: Vec<(OsString, OsString)> = settings
            .env
            .iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        let (program, args) = match &settings.launch {
            Launch::Script {
                entry,
                args,
                node_options: script_options,
            } => {
                let mut all = node_options;
                all.extend(script_options.iter().map(OsString::from));
                all.extend(require);
                all.push(entry.into());
                all.extend(args.iter().map(OsString::from));
                (settings.node.clone(), all)
            }
            Launch::Next { bin } => {
                let mut all = node_options;
                all.extend(require);
                all.push(bin.into());
                all.extend(
                    [
                        "start".to_owned(),
                        "-p".to_owned(),
                        settings.addr.port().to_string(),
                        "-H".to_owned(),
                        settings.host().to_string(),
                    ]
                    .map(OsString::from),
                );
                (settings.node.clone(), all)
            }
            Launch::Command { program, args } => {
                // Any node the command starts preloads the agent; only the
                // one that inherits the descriptors acts on it.
                let existing = settings
                    .env
                    .get("NODE_OPTIONS")
                    .cloned()
                    .unwrap_or_default();
                let extra: Vec<String> = node_options
                    .iter()
                    .map(|o| o.to_string_lossy().into_owned())
                    .collect();
                let quoted = format!("{} --require \"{}\"", extra.join(" "), agent.display());
                env.retain(|(k, _)| k != "NODE_OPTIONS");
                env.push((
                    "NODE_OPTIONS".into(),
                    format!("{existing} {quoted}").trim().into(),
                ));
                // The program may be a wrapper (npm start, npx, tsx) whose
                // own node preloads the agent too: the agent then acts only
                // in the process that listens on the service port.
                env.push(("AMPERE_AGENT_LAZY".into(), "1".into()));
                (
                    PathBuf::from(program),
                    args.iter().map(OsString::from).collect(),
                )
            }
        };
        env.push((
            "AMPERE_PORT".into(),
            settings.addr.port().to_string().into(),
        ));
        // node's listen() calls listen(2) again on the inherited socket,
        // with its own default backlog (511) unless told.
        env.push((
            "AMPERE_BACKLOG".into(),
            cfg.server.backlog.to_string().into(),
        ));
        if cfg.overload.enabled {
            let o = &cfg.overload;
            env.push((
                "AMPERE_MAX_INFLIGHT".into(),
                o.max_inflight.to_string().into(),
            ));
            let delay_ms = o.max_delay.get().as_millis();
            env.push(("AMPERE_MAX_DELAY_MS".into(), delay_ms.to_string().into()));
            let target_ms = o.target_delay.get().as_millis();
            env.push((
                "AMPERE_TARGET_DELAY_MS".into(),
                target_ms.to_string().into(),
            ));
            let retry = o.retry_after.get().as_secs().max(1);
            env.push(("AMPERE_RETRY_AFTER".into(), retry.to_string().into()));
            if o.hold_target {
                env.push(("AMPERE_HOLD_TARGET".into(), "1".into()));
            }
        }
        let accept_fds = if cfg.overload.enabled && cfg.overload.hold_target {
            WORKER_ACCEPT_FDS
        } else {
            0
        };
        if !cfg.metrics.requests {
            env.push(("AMPERE_REQUEST_METRICS".into(), "0".into()));
        }
        if cfg.telemetry.enabled {
            let ratio = cfg.telemetry.sampling_ratio.clamp(0.0, 1.0);
            env.push(("AMPERE_TRACE_RATIO".into(), ratio.to_string().into()));
        }
        env.push((
            "AMPERE_HEARTBEAT_MS".into(),
            cfg.worker
                .heartbeat_interval
                .get()
                .as_millis()
                .max(10)
                .to_string()
                .into(),
        ));
        Command {
            program,
            args,
            env,
            cwd: settings.app_dir.clone(),
            agent: agent.to_owned(),
            heap_share,
            accept_fds,
        }
    }

    /// The container's memory limit (bytes) and the V8 old-space limit
    /// (MiB) each worker gets from it, where ampere sets one: the container
    /// limits memory, and neither `[health] max_heap` nor a node option
    /// sets the heap.
    pub fn heap_share(&self) -> Option<(u64, u64)> {
        self.heap_share
    }

    /// How many connections a worker accepts per turn of its event loop,
    /// at most: one per listening descriptor.
    pub fn accepts_per_turn(&self) -> u32 {
        1 + self.accept_fds.unsigned_abs()
    }

    /// Starts the process of `slot`, accepting from `listener`.
    pub fn spawn(&self, slot: usize, listener: BorrowedFd<'_>) -> std::io::Result<Spawned> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let listen_fd = listener.as_raw_fd();
        let control_fd = theirs.as_raw_fd();
        let accept_fds = self.accept_fds;
        let parent = std::process::id();

        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(&self.args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("AMPERE_LISTEN_FD", WORKER_LISTEN_FD.to_string())
            .env("AMPERE_CONTROL_FD", WORKER_CONTROL_FD.to_string())
            .env("AMPERE_ACCEPT_FDS", accept_fds_env(accept_fds))
            // Which worker this is, 0..N, stable across restarts: for apps
            // that run a job in one worker only. NODE_APP_INSTANCE is PM2's
            // name for it.
            .env("AMPERE_WORKER", slot.to_string())
            .env("NODE_APP_INSTANCE", slot.to_string())
            .current_dir(&self.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a terminal's Ctrl-C reaches only the
            // supervisor, which stops workers in order; and stopping a
            // worker's group also stops what the app itself started.
            .process_group(0);
        // SAFETY: the hook runs in the child between fork and exec, where
        // only async-signal-safe calls are allowed: prctl, getppid, fcntl and
        // dup2 are, and it allocates nothing (errors are raw OS codes). It
        // captures only plain integers.
        unsafe {
            cmd.pre_exec(move || {
                // Die with the supervisor. PDEATHSIG fires when the forking
                // thread exits; the supervisor forks from its main thread,
                // which lives as long as the process.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The supervisor may have died before prctl took effect.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                // Both descriptors are close-on-exec in the supervisor (so no
                // other child gets them). Copy them to the worker's numbers,
                // by way of copies above all of those (so that no original
                // sits where another goes); dup2 leaves the new ones
                // inheritable, and everything else closes at exec.
                let above = WORKER_CONTROL_FD + accept_fds + 1;
                let listen_high = libc::fcntl(listen_fd, libc::F_DUPFD_CLOEXEC, above);
                let control_high = libc::fcntl(control_fd, libc::F_DUPFD_CLOEXEC, above);
                if listen_high < 0
                    || control_high < 0
                    || libc::dup2(listen_high, WORKER_LISTEN_FD) < 0
                    || libc::dup2(control_high, WORKER_CONTROL_FD) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                for fd in WORKER_CONTROL_FD + 1..=WORKER_CONTROL_FD + accept_fds {
                    if libc::dup2(listen_high, fd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        drop(theirs);
        ours.set_nonblocking(true)?;
        Ok(Spawned {
            child,
            control: tokio::net::UnixStream::from_std(ours)?,
        })
    }

    pub fn program(&self) -> &Path {
        &self.program
    }

    pub fn agent(&self) -> &Path {
        &self.agent
    }
}

/// `AMPERE_ACCEPT_FDS`: the numbers of the further listening descriptors.
fn accept_fds_env(count: i32) -> String {
    (WORKER_CONTROL_FD + 1..=WORKER_CONTROL_FD + count)
        .map(|fd| fd.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Sends `signal` to the process group led by `pid` (a worker's group).
pub fn kill_group(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid)
        && pid > 0
    {
        let _ = nix::sys::signal::killpg(Pid::from_raw(pid), signal);
    }
}

#[cfg(test)]
mod tests {
    use super::sets_heap;

    #[test]
    fn heap_flags_are_recognised_in_every_spelling() {
        assert!(sets_heap("--max-old-space-size=512"));
        assert!(sets_heap("--max_old_space_size=512"));
        assert!(sets_heap("--enable-source-maps --max-old_space-size=64"));
        assert!(!sets_heap("--max-semi-space-size=4"));
        assert!(!sets_heap("server.js"));
    }
}
