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
}

pub type Result<T> = std::result::Result<T, Error>;
