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
    /// Its directory's name: the pid, or `<pid>-<n>` (see [`list`]).
    pub id: String,
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
            let id = name.to_str()?.to_owned();
            let pid: u32 = id.split('-').next()?.parse().ok()?;
            let dir = e.path();
            let socket = dir.join(SOCKET);
            if pid == std::process::id() {
                return None;
            }
            if stale(pid, &socket) {
                let _ = std::fs::remove_dir_all(&dir);
                return None;
            }
            socket.exists().then_some(Found { pid, id, socket })
        })
        .collect();
    found.sort_by_key(|f| f.pid);
    found
}

/// Whether a runtime directory is left over: judged by its lock, which a
/// live runtime holds (see [`lock`]), else by its socket, since a runtime in
/// another pid namespace (a container sharing /tmp) is alive although its
/// pid is not.
fn stale(pid: u32, socket: &Path) -> bool {
    let lock_file = socket.with_file_name(LOCK);
    if lock_file.exists() {
        lock(&lock_file).is_ok_and(|held| held.is_some())
    } else if socket.exists() {
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

/// The lock file in each runtime directory.
const LOCK: &str = "lock";

/// Takes the lock of a runtime directory `dir`, for as long as the
/// returned lock lives; None when a live runtime holds it (in this pid
/// namespace or another: the lock is on the file). A runtime of an older
/// ampere, without a lock, counts as holding it while its socket answers.
pub fn claim(dir: &Path) -> std::io::Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    let socket = dir.join(SOCKET);
    if socket.exists() && !refused(&socket) && !dir.join(LOCK).exists() {
        return Ok(None);
    }
    lock(&dir.join(LOCK))
}

fn lock(path: &Path) -> std::io::Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(held) => Ok(Some(held)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e.into()),
    }
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
        let all = list();
        // `2-1`: a runtime whose pid another pid namespace's had first.
        if r.contains('-')
            && let Some(f) = all.iter().find(|f| f.id == r)
        {
            return Ok(f.socket.clone());
        }
        let pid: u32 = r.parse().map_err(|_| Error::Flag {
            flag: "--runtime",
            message: format!("{r:?} is neither a pid nor a socket path"),
        })?;
        let mut same: Vec<Found> = all.into_iter().filter(|f| f.pid == pid).collect();
        return match same.len() {
            0 => Err(Error::App {
                message: format!("no ampere runtime with pid {pid} runs as this user"),
                hint: Some("`ampere ps` lists the running runtimes".into()),
            }),
            1 => Ok(same.remove(0).socket),
            _ => Err(Error::App {
                message: format!(
                    "{} runtimes have pid {pid} (in containers that share this directory)",
                    same.len()
                ),
                hint: Some(format!(
                    "pass its admin socket: --runtime {}",
                    same.iter()
                        .map(|f| f.socket.display().to_string())
                        .collect::<Vec<_>>()
                        .join(" or ")
                )),
            }),
        };
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
                    .map(|f| f.id.clone())
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
