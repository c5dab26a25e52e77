//! The one error type a user sees.
//!
//! Library code returns [`Error`]; `main` renders it once, as a single line
//! `error: <where>: <what>` followed, when there is one, by a `hint:` line that
//! says what to do. Config errors carry the file, line and column; flag errors
//! name the flag.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where in a config file a problem is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub path: PathBuf,
    /// 1-based; 0 when the problem is the whole file.
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.path.display())
        } else {
            write!(f, "{}:{}:{}", self.path.display(), self.line, self.column)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config file that does not parse or does not match the schema.
    #[error("{at}: {message}")]
    Config {
        at: Location,
        message: String,
        hint: Option<String>,
    },

    /// A command-line flag with a bad value.
    #[error("{flag}: {message}")]
    Flag { flag: &'static str, message: String },

    /// The app could not be found or its start command could not be told.
    #[error("{message}")]
    App {
        message: String,
        hint: Option<String>,
    },

    /// The service address could not be bound.
    #[error("cannot listen on {addr}: {reason}")]
    Bind {
        addr: String,
        reason: String,
        hint: Option<String>,
    },

    /// An I/O failure with what we were doing at the time.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn config(path: &Path, line: usize, column: usize, message: impl Into<String>) -> Self {
        Error::Config {
            at: Location {
                path: path.to_path_buf(),
                line,
                column,
            },
            message: message.into(),
            hint: None,
        }
    }

    pub fn app(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Error::App {
            message: message.into(),
            hint: Some(hint.into()),
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// What the user can do about it, if we know.
    pub fn hint(&self) -> Option<&str> {
        match self {
            Error::Config { hint, .. } | Error::App { hint, .. } | Error::Bind { hint, .. } => {
                hint.as_deref()
            }
            Error::Flag { .. } | Error::Io { .. } => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
