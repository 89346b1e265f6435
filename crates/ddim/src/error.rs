//! The library's one error type. Every message names the offending value and what is allowed,
//! so the command line can print it as is.

use std::path::PathBuf;

/// Errors returned by the `ddim` library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value (from a JSON file or a builder) that is not allowed.
    #[error("invalid config value `{key}` = {value}: {allowed}")]
    InvalidConfig {
        /// The config key, e.g. `beta_schedule`.
        key: String,
        /// The value that was given, as text.
        value: String,
        /// What is allowed instead.
        allowed: String,
    },

    /// An argument of a call (steps, eta, a timestep, a tensor shape) that is not allowed.
    #[error("invalid argument `{name}` = {value}: {allowed}")]
    InvalidArgument {
        /// The argument name, e.g. `eta`.
        name: String,
        /// The value that was given, as text.
        value: String,
        /// What is allowed instead.
        allowed: String,
    },

    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A JSON file could not be parsed.
    #[error("parsing {}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: serde_json::Error,
    },

    /// An error from candle (tensor shapes, devices, dtypes).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A NumPy `.npy` file that is malformed, truncated, or holds values that do not fit f32.
    #[error("{}: {reason}", path.display())]
    Npy {
        /// The file.
        path: PathBuf,
        /// What is wrong and what is allowed instead.
        reason: String,
    },

    /// An image file that could not be decoded or encoded.
    #[error("{}: {reason}", path.display())]
    Image {
        /// The file.
        path: PathBuf,
        /// What is wrong and what is allowed instead.
        reason: String,
    },
}

/// `Result` with the library's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::InvalidConfig`] for `key` = `value`, with what is allowed.
    pub fn config(key: &str, value: impl std::fmt::Display, allowed: impl Into<String>) -> Self {
        Error::InvalidConfig {
            key: key.to_string(),
            value: value.to_string(),
            allowed: allowed.into(),
        }
    }

    /// An [`Error::Npy`] for `path` with the given reason.
    pub fn npy(path: &std::path::Path, reason: impl Into<String>) -> Self {
        Error::Npy {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    /// An [`Error::Image`] for `path` with the given reason.
    pub fn image(path: &std::path::Path, reason: impl Into<String>) -> Self {
        Error::Image {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    /// An [`Error::Io`] for `path`.
    pub fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// An [`Error::InvalidArgument`] for `name` = `value`, with what is allowed.
    pub fn argument(name: &str, value: impl std::fmt::Display, allowed: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name: name.to_string(),
            value: value.to_string(),
            allowed: allowed.into(),
        }
    }
}
