//! The JS agent that every worker preloads: embedded in the binary at build
//! time and written to this runtime's private directory at start, because
//! `node --require` takes a file path. The directory also holds the admin
//! socket.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The agent's source, as in `agent/agent.js`.
pub const SOURCE: &str = include_str!("../agent/agent.js");

/// This runtime's private directory (mode 0700) and the agent file in it;
/// both are removed when dropped.
pub struct RuntimeDir {
    dir: PathBuf,
    agent: PathBuf,
    /// Held for this runtime's life: the directory is taken.
    _lock: nix::fcntl::Flock<fs::File>,
}

impl RuntimeDir {
    /// Creates `<base>/<pid>/` under `$XDG_RUNTIME_DIR/ampere` or
    /// `$TMPDIR/ampere-<uid>` and writes the agent into it. Containers that
    /// share /tmp have the same pids (the supervisor is PID 1 or 2 in each):
    /// where a live runtime of another pid namespace has that directory,
    /// this one takes `<pid>-1`, `<pid>-2`...
    pub fn create() -> Result<RuntimeDir> {
        let base = base_dir();
        let making =
            |dir: &Path, e| unwritable(&format!("creating runtime directory {}", dir.display()), e);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&base)
            .map_err(|e| making(&base, e))?;
        check_private(&base)?;
        let pid = std::process::id();
        let mut taken = None;
        for n in 0..1000 {
            let candidate = match n {
                0 => base.join(pid.to_string()),
                n => base.join(format!("{pid}-{n}")),
            };
            match fs::DirBuilder::new().mode(0o700).create(&candidate) {
                // New, or left by a runtime that is gone: ours if its lock is
                // free.
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(making(&candidate, e)),
            }
            match crate::admin::discovery::claim(&candidate) {
                Ok(Some(lock)) => {
                    taken = Some((candidate, lock));
                    break;
                }
                // A live runtime of another pid namespace has it.
                Ok(None) => continue,
                Err(e) => return Err(making(&candidate, e)),
            }
        }
        let (dir, lock) = taken.ok_or_else(|| {
            Error::app(
                format!("no free runtime directory for pid {pid} under {}", base.display()),
                "remove the directories of runtimes that are gone, or set XDG_RUNTIME_DIR to another \
                 directory",
            )
        })?;
        let agent = dir.join("agent.js");
        write_private(&agent, SOURCE.as_bytes())
            .map_err(|e| unwritable(&format!("writing {}", agent.display()), e))?;
        Ok(RuntimeDir {
            dir,
            agent,
            _lock: lock,
        })
    }

    pub fn agent(&self) -> &Path {
        &self.agent
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

/// Where this user's runtimes keep their directories, one per pid:
/// `$XDG_RUNTIME_DIR/ampere`, else `$TMPDIR/ampere-<uid>`.
pub fn base_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("ampere"),
        _ => std::env::temp_dir().join(format!("ampere-{}", nix::unistd::geteuid())),
    }
}

/// The runtime directory cannot be made or written: a read-only root
/// filesystem (a hardened container) is the usual reason.
fn unwritable(doing: &str, e: std::io::Error) -> Error {
    Error::app(
        format!("{doing}: {e}"),
        "ampere keeps the workers' agent and its admin socket there: set XDG_RUNTIME_DIR or \
         TMPDIR to a writable directory (with a read-only root filesystem, mount an emptyDir or \
         tmpfs at /tmp)",
    )
}

/// The base directory may be in a shared place (`/tmp`): it must be this
/// user's own directory, closed to others, or whoever made it could swap
/// the agent that every worker runs.
fn check_private(base: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::symlink_metadata(base)
        .map_err(|e| Error::io(format!("checking runtime directory {}", base.display()), e))?;
    let problem = if !meta.file_type().is_dir() {
        Some("is not a directory (a symbolic link?)")
    } else if meta.uid() != nix::unistd::geteuid().as_raw() {
        Some("belongs to another user")
    } else if meta.mode() & 0o077 != 0 {
        Some("is open to other users")
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(Error::app(
            format!("runtime directory {} {problem}", base.display()),
            "remove it (ampere makes its own, mode 0700), or set XDG_RUNTIME_DIR to a private directory",
        )),
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_base_directory_others_could_change_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let private = tmp.path().join("private");
        fs::DirBuilder::new().mode(0o700).create(&private).unwrap();
        assert!(check_private(&private).is_ok());
        let open = tmp.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_private(&open).unwrap_err().to_string();
        assert!(e.contains("is open to other users"), "{e}");
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&private, &link).unwrap();
        let e = check_private(&link).unwrap_err().to_string();
        assert!(e.contains("is not a directory"), "{e}");
    }
}
