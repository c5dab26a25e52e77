//! Finding running runtimes: every runtime has a directory named by its pid
//! (`<pid>-<n>` where that was taken in another pid namespace) under this
//! user's base directory ([`crate::agent::base_dir`]), with the
//! admin socket in it. Directories of runtimes that are gone (killed before
//! they could clean up) are detected and removed.

use std::path::{Path, PathBuf};

use nix::sys::signal::kill;
use nix::unistd::Pid;

use super::SOCKET;
use crate::error::Error;

/// A runtime's admin socket.
#[derive(Debug, Clone)]
pub struct Found {
    pub pid: u32,
    pub socket: PathBuf,
}

/// The runtimes of this user that are alive. Stale directories (nothing
/// listens on the socket any more, or without a socket, the pid is gone)
/// are removed.
pub fn list() -> Vec<Found> {
    let base = crate::agent::base_dir();
    let Ok(entries) = std::fs::read_dir(&base) else {
        return Vec::new();
    };
    let mut found: Vec<Found> = entries
        .flatten()
        .filter_map(|e| {
            // `<pid>`, or `<pid>-<n>` where another pid namespace's
            // runtime with the same pid had it first.
            let name = e.file_name();
            let pid: u32 = name.to_str()?.split('-').next()?.parse().ok()?;
            let dir = e.path();
            let socket = dir.join(SOCKET);
            if pid == std::process::id() {
                return None;
            }
            if stale(pid, &socket) {
                let _ = std::fs::remove_dir_all(&dir);
                return None;
            }
            socket.exists().then_some(Found { pid, socket })
        })
        .collect();
    found.sort_by_key(|f| f.pid);
    found
}

/// Whether a runtime directory is left over: judged by its socket where it
/// has one, since a runtime in another pid namespace (a container sharing
/// /tmp) is alive although its pid is not.
fn stale(pid: u32, socket: &Path) -> bool {
    if socket.exists() {
        refused(socket)
    } else {
        !alive(pid)
    }
}

fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // EPERM: alive, but another user's (a reused pid).
    !matches!(
        kill(Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

/// Whether a live runtime has the runtime directory `dir`: something
/// listens on its admin socket.
pub fn in_use(dir: &Path) -> bool {
    let socket = dir.join(SOCKET);
    socket.exists() && !refused(&socket)
}

/// Nobody listens on the socket: its runtime died and the pid was reused.
fn refused(socket: &Path) -> bool {
    matches!(
        std::os::unix::net::UnixStream::connect(socket),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// The admin socket for `runtime`: a pid, or a socket path; when omitted,
/// the one runtime running.
pub fn pick(runtime: Option<&str>) -> Result<PathBuf, Error> {
    if let Some(r) = runtime {
        if r.contains('/') {
            return Ok(PathBuf::from(r));
        }
        let pid: u32 = r.parse().map_err(|_| Error::Flag {
            flag: "--runtime",
            message: format!("{r:?} is neither a pid nor a socket path"),
        })?;
        return list()
            .into_iter()
            .find(|f| f.pid == pid)
            .map(|f| f.socket)
            .ok_or_else(|| Error::App {
                message: format!("no ampere runtime with pid {pid} runs as this user"),
                hint: Some("`ampere ps` lists the running runtimes".into()),
            });
    }
    let mut all = list();
    match all.len() {
        0 => Err(Error::App {
            message: "no ampere runtime is running as this user".into(),
            hint: Some(format!(
                "start one with `ampere start`; runtimes are found under {}",
                crate::agent::base_dir().display()
            )),
        }),
        1 => Ok(all.remove(0).socket),
        _ => Err(Error::App {
            message: format!(
                "{} runtimes are running (pids {}); say which",
                all.len(),
                all.iter()
                    .map(|f| f.pid.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            hint: Some("pass its pid, e.g. `ampere status PID` or `--runtime PID`".into()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pid no process has here (above the kernel's pid_max).
    const GONE: u32 = 1 << 23;

    #[test]
    fn a_runtime_is_judged_by_its_socket_not_its_pid() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join(SOCKET);
        // Listening, though its pid is not in this namespace: alive.
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        assert!(!stale(GONE, &socket));
        // Nobody listens any more: left over, whatever its pid.
        drop(listener);
        assert!(stale(std::process::id(), &socket));
        // No socket (a runtime just starting, or one without an admin
        // API): the pid decides.
        let none = dir.path().join("none.sock");
        assert!(!stale(std::process::id(), &none));
        assert!(stale(GONE, &none));
    }
}
