//! When `ampere start` is a container's first process (PID 1). The kernel
//! makes PID 1 the parent of every orphaned process in the container (what
//! an app's children leave behind when they exit first: a headless browser's
//! helpers, a shell's background jobs), and nothing else reaps them, so they
//! would pile up as zombies. ampere then splits in two, as tini does: this
//! process stays PID 1, passes signals on to the supervisor and reaps every
//! child that ends; the supervisor runs in a child process.

use std::process::ExitCode;

use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, getpid, setpgid};

use crate::error::{Error, Result};

/// The signals passed on to the supervisor (`docker stop` sends SIGTERM,
/// Ctrl-C SIGINT, a reload SIGHUP).
const PASSED_ON: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// Splits when this process is PID 1: returns the supervisor's exit code in
/// the process that stays PID 1 (once the supervisor has ended), and None
/// in the supervisor, and where this is not PID 1, which go on to start.
/// Call it before any thread exists.
pub fn stand_in_if_pid1() -> Result<Option<ExitCode>> {
    if getpid().as_raw() != 1 {
        return Ok(None);
    }
    let mut set = SigSet::empty();
    for s in PASSED_ON {
        set.add(s);
    }
    set.add(Signal::SIGCHLD);
    // Blocked from before the fork, so that none arriving meanwhile is lost:
    // this process takes them with sigwait.
    let mut before = SigSet::empty();
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut before)).map_err(os_error)?;
    // SAFETY: called before any other thread exists (the CLI has only
    // parsed its arguments), so the child is a whole copy of this process
    // and may go on to run anything.
    match unsafe { fork() }.map_err(os_error)? {
        ForkResult::Child => {
            sigprocmask(SigmaskHow::SIG_SETMASK, Some(&before), None).map_err(os_error)?;
            // Out of PID 1's process group: a terminal's Ctrl-C (`docker run
            // -it`) goes to that whole group, and the supervisor would get
            // it twice, from the terminal and passed on, which is a second
            // signal: stop at once. Now it gets it once, from PID 1.
            setpgid(Pid::from_raw(0), Pid::from_raw(0)).map_err(os_error)?;
            Ok(None)
        }
        ForkResult::Parent { child } => Ok(Some(stand_in(child, &set))),
    }
}

/// PID 1's loop: signals on to `supervisor`, every ended child reaped,
/// until the supervisor itself ends; its exit code is ours.
fn stand_in(supervisor: Pid, set: &SigSet) -> ExitCode {
    loop {
        let Ok(signal) = set.wait() else { continue };
        if signal != Signal::SIGCHLD {
            let _ = kill(supervisor, signal);
            continue;
        }
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == supervisor => {
                    return ExitCode::from(u8::try_from(code).unwrap_or(1));
                }
                Ok(WaitStatus::Signaled(pid, signal, _)) if pid == supervisor => {
                    return ExitCode::from(128u8.saturating_add(signal as u8));
                }
                // No more children that ended, or none left at all.
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                // An orphan, reaped.
                Ok(_) => {}
            }
        }
    }
}

fn os_error(e: nix::errno::Errno) -> Error {
    Error::io("running as PID 1", std::io::Error::from(e))
}
