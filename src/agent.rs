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
}

impl RuntimeDir {
    /// Creates `<base>/<pid>/` under `$XDG_RUNTIME_DIR/ampere` or
    /// `$TMPDIR/ampere-<uid>` and writes the agent into it.
    pub fn create() -> Result<RuntimeDir> {
        let dir = base_dir().join(std::process::id().to_string());
        let context = |e| Error::io(format!("creating runtime directory {}", dir.display()), e);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(context)?;
        let agent = dir.join("agent.js");
        write_private(&agent, SOURCE.as_bytes())
            .map_err(|e| Error::io(format!("writing {}", agent.display()), e))?;
        Ok(RuntimeDir { dir, agent })
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
