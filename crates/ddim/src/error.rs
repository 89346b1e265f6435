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

    /// A model folder lacks a file it needs (a config or weights).
    #[error("{}: no {what} found (looked for {looked_for})", path.display())]
    ModelFileNotFound {
        /// The folder that was searched.
        path: PathBuf,
        /// What is missing, e.g. `UNet weights`.
        what: String,
        /// The file names that were tried.
        looked_for: String,
    },

    /// The weights of a model do not fit its config: tensors missing, unexpected or of the
    /// wrong shape. Every problem found is listed.
    #[error(
        "weights in {} do not match the model config ({} problem(s)):\n{}",
        path.display(),
        problems.len(),
        WeightProblem::list(problems)
    )]
    WeightMismatch {
        /// The weights file (or the first shard).
        path: PathBuf,
        /// What does not match.
        problems: Vec<WeightProblem>,
    },

    /// A weights file that cannot be read as one: truncated, a malformed header, offsets past
    /// its end, or a PyTorch pickle holding more than tensors.
    #[error("{}: not a usable weights file: {reason}", path.display())]
    BadWeights {
        /// The weights file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

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

    /// A model argument that is neither an existing folder nor a valid Hugging Face hub id.
    #[error(
        "model folder or hub id not found: `{spec}` ({reason}); give an existing model folder, \
         or a Hugging Face hub id like `google/ddpm-cifar10-32` or `owner/name@revision`"
    )]
    ModelNotFound {
        /// The argument as given.
        spec: String,
        /// Why it is neither.
        reason: String,
    },

    /// Offline mode (`HF_HUB_OFFLINE`) is on and the hub repo's files are not in the cache.
    #[error(
        "`{repo_id}` (revision `{revision}`) is not in the Hugging Face cache at {}: {detail}; \
         offline mode (HF_HUB_OFFLINE) is on, so nothing was downloaded. Run once without \
         HF_HUB_OFFLINE (or `huggingface-cli download {repo_id} --revision {revision}`) to fill \
         the cache, or point HF_HUB_CACHE / HF_HOME at the cache that holds it",
        cache_dir.display()
    )]
    HubNotCached {
        /// The hub id, e.g. `google/ddpm-cifar10-32`.
        repo_id: String,
        /// The branch, tag or commit asked for.
        revision: String,
        /// The cache folder that was looked in.
        cache_dir: PathBuf,
        /// What is missing.
        detail: String,
    },

    /// A request to the Hugging Face hub failed (network, unknown repo, no access).
    #[error(
        "fetching `{repo_id}` (revision `{revision}`) from the Hugging Face hub: {source}; {hint}"
    )]
    HubRequest {
        /// The hub id.
        repo_id: String,
        /// The branch, tag or commit asked for.
        revision: String,
        /// The underlying error.
        source: Box<dyn std::error::Error + Send + Sync>,
        /// What to try.
        hint: String,
    },

    /// A hub repo that does not hold a diffusers UNet (config and single-file weights).
    #[error("hub repo `{repo_id}` (revision `{revision}`) holds no diffusers UNet: {reason}")]
    HubRepoLayout {
        /// The hub id.
        repo_id: String,
        /// The branch, tag or commit asked for.
        revision: String,
        /// What is missing.
        reason: String,
    },

    /// Training produced a loss or gradient that is not finite; the weights were not updated.
    #[error(
        "training diverged at step {step}: {what}; the weights were left as they were before this \
         step (try a lower --lr, or --max-grad-norm)"
    )]
    Diverged {
        /// The step that failed, from 1.
        step: u64,
        /// What was not finite.
        what: String,
    },
}

/// One way in which a weights file and a model config disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightProblem {
    /// The config needs this tensor and the file does not have it.
    Missing {
        /// The diffusers tensor name, e.g. `down_blocks.0.resnets.1.conv1.weight`.
        name: String,
        /// The shape the config needs.
        expected: Vec<usize>,
    },
    /// The file has this tensor and the config does not use it.
    Unexpected {
        /// The tensor name as stored in the file.
        name: String,
        /// Its shape in the file.
        shape: Vec<usize>,
    },
    /// The tensor exists with another shape than the config needs.
    WrongShape {
        /// The diffusers tensor name.
        name: String,
        /// The shape the config needs.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
}

impl std::fmt::Display for WeightProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WeightProblem::Missing { name, expected } => {
                write!(
                    f,
                    "missing tensor `{name}` (the config needs shape {expected:?})"
                )
            }
            WeightProblem::Unexpected { name, shape } => {
                write!(
                    f,
                    "unexpected tensor `{name}` with shape {shape:?} (not used by the config)"
                )
            }
            WeightProblem::WrongShape {
                name,
                expected,
                found,
            } => write!(
                f,
                "tensor `{name}` has shape {found:?} in the file but the config needs {expected:?}"
            ),
        }
    }
}

impl WeightProblem {
    /// The problems one per line, at most 20 of them, for [`Error::WeightMismatch`].
    fn list(problems: &[WeightProblem]) -> String {
        const SHOWN: usize = 20;
        let mut lines: Vec<String> = problems
            .iter()
            .take(SHOWN)
            .map(|p| format!("  {p}"))
            .collect();
        if problems.len() > SHOWN {
            lines.push(format!("  ... and {} more", problems.len() - SHOWN));
        }
        lines.join("\n")
    }
}

/// `Result` with the library's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// What kind of failure an [`Error`] is, for a program's exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Caused by what the user gave: an argument, a config, a file, a model folder, a hub id.
    /// The message names the value and what is allowed.
    Input,
    /// A failure of the run itself (a device, a network request, training that diverged), not
    /// of the input.
    Failure,
}

impl Error {
    /// The kind of failure. Every variant is listed (no catch-all arm), so a new variant must
    /// say which kind it is before the crate compiles.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidConfig { .. }
            | Error::InvalidArgument { .. }
            | Error::Io { .. }
            | Error::Json { .. }
            | Error::ModelFileNotFound { .. }
            | Error::WeightMismatch { .. }
            | Error::BadWeights { .. }
            | Error::Npy { .. }
            | Error::Image { .. }
            | Error::ModelNotFound { .. }
            | Error::HubNotCached { .. }
            | Error::HubRepoLayout { .. } => ErrorKind::Input,
            Error::Candle(_) | Error::HubRequest { .. } | Error::Diverged { .. } => {
                ErrorKind::Failure
            }
        }
    }
}

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
