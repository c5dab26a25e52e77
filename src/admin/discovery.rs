//! Finding running runtimes: every runtime has a directory named by its pid
//! under this user's base directory ([`crate::agent::base_dir`]), with the
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

/// The runtimes of this user that are alive. Stale directories (the pid is
/// gone, or nothing listens on the socket any more) are removed.
pub fn list() -> Vec<Found> {
    let base = crate::agent::base_dir();
    let Ok(entries) = std::fs::read_dir(&base) else {
        return Vec::new();
    };
    let mut found: Vec<Found> = entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let dir = e.path();
            let socket = dir.join(SOCKET);
            if pid == std::process::id() {
                return None;
            }
            if !alive(pid) || (socket.exists() && refused(&socket)) {
                let _ = std::fs::remove_dir_all(&dir);
                return None;
            }
            socket.exists().then_some(Found { pid, socket })
        })
        .collect();
    found.sort_by_key(|f| f.pid);
    found
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
            flag: "RUNTIME",
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
