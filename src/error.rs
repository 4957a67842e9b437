//! The one error type of the library. Every variant names what is at fault:
//! the file, the tensor, the config field or the token.

use std::path::PathBuf;

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("{path}: invalid JSON: {cause}")]
    Json {
        path: PathBuf,
        cause: serde_json::Error,
    },

    #[error("{path}: config field `{field}`: {message}")]
    Config {
        path: PathBuf,
        field: String,
        message: String,
    },

    #[error("{file}: not a readable safetensors file: {message}")]
    BadCheckpointFile { file: PathBuf, message: String },

    #[error("no weights in {dir}: expected model.safetensors or model.safetensors.index.json")]
    NoWeights { dir: PathBuf },

    #[error("tensor `{name}` is missing from the checkpoint in {dir}")]
    MissingTensor { name: String, dir: PathBuf },

    #[error("tensor `{name}` in {file} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        file: PathBuf,
        expected: Vec<i64>,
        found: Vec<i64>,
    },

    #[error("tensor `{name}` in {file} has dtype {dtype}, which DeepScope cannot load as a weight")]
    UnsupportedDtype {
        name: String,
        file: PathBuf,
        dtype: String,
    },

    #[error("checkpoint in {dir} has {count} unexpected tensor(s), e.g. {examples}")]
    UnexpectedTensors {
        dir: PathBuf,
        count: usize,
        examples: String,
    },

    #[error(
        "memory budget {} on {device} is too small: tensor `{tensor}` alone takes {}, and loading needs at least {} (the largest weight read at once, room to convert it, and every norm and router)",
        crate::stats::human_bytes(*budget), crate::stats::human_bytes(*tensor_bytes), crate::stats::human_bytes(*needed)
    )]
    BudgetTooSmall {
        device: String,
        budget: u64,
        needed: u64,
        tensor: String,
        tensor_bytes: u64,
    },

    /// A value handed to a hook point (a hook's result, a patch, an added
    /// vector) does not fit the value there.
    #[error("{point}: {what} has shape {found:?}, expected {expected:?}")]
    HookShape {
        point: String,
        what: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },

    #[error("{point}: {what} has dtype {found}, expected {expected}")]
    HookDtype {
        point: String,
        what: String,
        expected: String,
        found: String,
    },

    #[error("{file}: {message}")]
    Tokenizer { file: PathBuf, message: String },

    /// A routing record of a serving engine (SGLang, vLLM), or the PyTorch
    /// archive it is stored in, that cannot be read or does not fit the model.
    #[error("{file}: {message}")]
    BadRecord { file: PathBuf, message: String },

    #[error("invalid input: {0}")]
    Input(String),

    /// A layer, expert, head or position beyond what the model or trace has.
    #[error("{context}{kind} {index} out of range (there are {len} {kind}s)")]
    OutOfRange {
        kind: IndexKind,
        index: i64,
        len: i64,
        /// What was being done, ending in ": " (or empty).
        context: String,
    },

    #[error("token id {id} at position {position} is out of range: the vocabulary has {vocab_size} tokens")]
    TokenOutOfRange {
        id: i64,
        position: usize,
        vocab_size: usize,
    },

    #[error("device `{0}` is not available (CUDA devices seen: {1})")]
    Device(String, usize),

    #[error("interrupted: the operation stopped at an interrupt request; values defined before it are kept")]
    Interrupted,

    #[error("malformed Jupyter message: {0}")]
    Protocol(String),

    #[error("kernel: {0}")]
    Kernel(String),

    #[error(transparent)]
    Plot(#[from] crate::plot::PlotError),

    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// What an [`Error::OutOfRange`] index counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexKind {
    Layer,
    Expert,
    Head,
    Position,
}

impl std::fmt::Display for IndexKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IndexKind::Layer => "layer",
            IndexKind::Expert => "expert",
            IndexKind::Head => "head",
            IndexKind::Position => "position",
        })
    }
}

impl Error {
    /// `index` is not below `len`.
    pub fn out_of_range(kind: IndexKind, index: impl TryInto<i64>, len: impl TryInto<i64>) -> Error {
        Error::OutOfRange { kind, index: index.try_into().unwrap_or(i64::MAX), len: len.try_into().unwrap_or(i64::MAX), context: String::new() }
    }

    /// Checks `index < len`.
    pub fn check_index(kind: IndexKind, index: usize, len: usize) -> Result<()> {
        if index < len {
            Ok(())
        } else {
            Err(Error::out_of_range(kind, index, len))
        }
    }

    /// The same error with `what` (e.g. an intervention) named in front.
    pub fn in_context(self, what: impl std::fmt::Display) -> Error {
        match self {
            Error::Input(m) => Error::Input(format!("{what}: {m}")),
            Error::OutOfRange { kind, index, len, context } => Error::OutOfRange { kind, index, len, context: format!("{what}: {context}") },
            Error::BadRecord { file, message } => Error::BadRecord { file, message: format!("{what}: {message}") },
            other => other,
        }
    }

    /// The variant's name (`"Input"`, `"MissingTensor"`, ...): what the
    /// kernel reports as a failed cell's `ename`.
    pub fn variant(&self) -> &'static str {
        match self {
            Error::Io { .. } => "Io",
            Error::Json { .. } => "Json",
            Error::Config { .. } => "Config",
            Error::BadCheckpointFile { .. } => "BadCheckpointFile",
            Error::NoWeights { .. } => "NoWeights",
            Error::MissingTensor { .. } => "MissingTensor",
            Error::ShapeMismatch { .. } => "ShapeMismatch",
            Error::UnsupportedDtype { .. } => "UnsupportedDtype",
            Error::UnexpectedTensors { .. } => "UnexpectedTensors",
            Error::BudgetTooSmall { .. } => "BudgetTooSmall",
            Error::HookShape { .. } => "HookShape",
            Error::HookDtype { .. } => "HookDtype",
            Error::Tokenizer { .. } => "Tokenizer",
            Error::BadRecord { .. } => "BadRecord",
            Error::Input(_) => "Input",
            Error::OutOfRange { .. } => "OutOfRange",
            Error::TokenOutOfRange { .. } => "TokenOutOfRange",
            Error::Device(..) => "Device",
            Error::Interrupted => "Interrupted",
            Error::Protocol(_) => "Protocol",
            Error::Kernel(_) => "Kernel",
            Error::Plot(_) => "Plot",
            Error::Torch(_) => "Torch",
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause,
        }
    }

    pub(crate) fn config(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Config {
            path: path.into(),
            field: field.into(),
            message: message.into(),
        }
    }
}
