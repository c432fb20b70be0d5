use std::path::PathBuf;

/// Every failure of the compute layer. Messages are one line and name the op or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: shape mismatch: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("{op}: tensors live on different devices ({a} and {b})")]
    DeviceMismatch { op: &'static str, a: String, b: String },
    #[error("{op}: no CUDA kernel yet for this op; run it with --device cpu")]
    CudaUnsupported { op: &'static str },
    #[error("CUDA unavailable: {0}")]
    NoCuda(String),
    #[error("CUDA: {0}")]
    Cuda(String),
    #[error("{op}: invalid argument: {detail}")]
    Invalid { op: &'static str, detail: String },
    #[error("{path}: {detail}")]
    File { path: PathBuf, detail: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        Error::Shape { op, detail: detail.into() }
    }
    pub fn invalid(op: &'static str, detail: impl Into<String>) -> Self {
        Error::Invalid { op, detail: detail.into() }
    }
}
