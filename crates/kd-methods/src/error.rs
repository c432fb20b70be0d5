use std::path::PathBuf;

/// Failures of the data and metrics layer. Data errors name the file, and the line when one
/// row is at fault, so a user can open the file at the right place.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}:{line}: {detail}", path.display())]
    BadRow { path: PathBuf, line: usize, detail: String },
    #[error("{}: {detail}", path.display())]
    File { path: PathBuf, detail: String },
    #[error("{0}")]
    Invalid(String),
    /// A method or model set-up that cannot run (a missing head, an empty training set).
    #[error("{0}")]
    Config(String),
    /// A NaN or infinite loss or gradient: training stops with the step number.
    #[error("non-finite value: {0}")]
    NonFinite(String),
    #[error(transparent)]
    Model(#[from] kd_model::Error),
    #[error(transparent)]
    Kernels(#[from] kd_kernels::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
