use std::path::PathBuf;

/// Every failure of kd-model. Messages are one line and name the file, tensor or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kernels(#[from] kd_kernels::Error),
    /// A file that cannot be read, parsed or written.
    #[error("{path}: {detail}")]
    File { path: PathBuf, detail: String },
    /// A tensor of a checkpoint that is unknown, missing or of the wrong shape.
    #[error("{path}: tensor '{name}' {detail}")]
    Tensor { path: PathBuf, name: String, detail: String },
    /// A model configuration that kd cannot run.
    #[error("invalid config: {0}")]
    Config(String),
    #[error("{0}")]
    Invalid(String),
    /// Batch or buffer shapes that do not fit the model.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A NaN or infinite value where training cannot go on.
    #[error("non-finite value: {0}")]
    NonFinite(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn file(path: impl Into<PathBuf>, detail: impl std::fmt::Display) -> Error {
        Error::File { path: path.into(), detail: detail.to_string() }
    }
}
