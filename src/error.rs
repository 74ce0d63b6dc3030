//! Typed errors. Each variant knows who is at fault and maps to one documented exit code
//! (design.md "Exit codes"). The first line of `Display` is what the CLI prints on stderr: it
//! says what failed and what to do.

use std::path::PathBuf;

/// Result type of the library.
pub type Result<T, E = BtuError> = std::result::Result<T, E>;

/// Every failure btu reports.
#[derive(Debug, thiserror::Error)]
pub enum BtuError {
    /// An input file, directory or object is absent (exit 66).
    #[error("{path}: not found; {hint}")]
    InputMissing {
        /// The path or URL that is absent.
        path: String,
        /// What to give instead.
        hint: String,
    },

    /// Input data is malformed: wrong schema or type, nulls, corrupt file, labels out of range (exit 65).
    #[error("{source_name}: {message}")]
    BadData {
        /// The file, column or stage the bad data came from.
        source_name: String,
        /// What is wrong and how to fix it.
        message: String,
    },

    /// The output exists and `--overwrite` was not given (exit 73).
    #[error(
        "{path}: output already exists; pass --overwrite to replace it or choose another path"
    )]
    OutputExists {
        /// The existing output.
        path: PathBuf,
    },

    /// The output cannot be created (exit 73).
    #[error("{path}: cannot create output ({reason}); choose a writable location")]
    OutputUnwritable {
        /// The output that could not be created.
        path: PathBuf,
        /// Why: the operating system's error, or another run holding its lock.
        reason: String,
    },

    /// An I/O error while reading or writing (exit 74).
    #[error("{path}: I/O error: {source}")]
    Io {
        /// The file or directory being read or written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A failure worth retrying, such as an object-store timeout (exit 75).
    #[error("{context}: temporary failure, retry later: {message}")]
    Temporary {
        /// What was being accessed (a URL).
        context: String,
        /// The transport's message.
        message: String,
    },

    /// Bad configuration: flags that contradict each other, a bad filter expression (exit 78).
    #[error("{flag}: {message}")]
    Config {
        /// The flag or configuration key at fault (`--alpha`, `detect.alpha`).
        flag: String,
        /// What is wrong with it.
        message: String,
    },

    /// A bug in btu (exit 70).
    #[error("internal error (please report): {0}")]
    Internal(String),
}

impl BtuError {
    /// The process exit code design.md assigns to this kind of failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            BtuError::BadData { .. } => 65,
            BtuError::InputMissing { .. } => 66,
            BtuError::OutputExists { .. } | BtuError::OutputUnwritable { .. } => 73,
            BtuError::Io { .. } => 74,
            BtuError::Temporary { .. } => 75,
            BtuError::Config { .. } => 78,
            BtuError::Internal(_) => 70,
        }
    }

    /// Shorthand for [`BtuError::BadData`].
    pub fn bad_data(source_name: impl Into<String>, message: impl Into<String>) -> Self {
        BtuError::BadData {
            source_name: source_name.into(),
            message: message.into(),
        }
    }

    /// Shorthand for [`BtuError::Config`].
    pub fn config(flag: impl Into<String>, message: impl Into<String>) -> Self {
        BtuError::Config {
            flag: flag.into(),
            message: message.into(),
        }
    }

    /// Shorthand for [`BtuError::InputMissing`].
    pub fn missing(path: impl Into<String>, hint: impl Into<String>) -> Self {
        BtuError::InputMissing {
            path: path.into(),
            hint: hint.into(),
        }
    }

    /// Shorthand for [`BtuError::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BtuError::Io {
            path: path.into(),
            source,
        }
    }

    /// Shorthand for [`BtuError::Internal`].
    pub fn internal(message: impl std::fmt::Display) -> Self {
        BtuError::Internal(message.to_string())
    }
}

impl From<candle_core::Error> for BtuError {
    fn from(e: candle_core::Error) -> Self {
        BtuError::Internal(format!("tensor operation failed: {e}"))
    }
}
