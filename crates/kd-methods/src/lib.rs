//! kd-methods: data, metrics, the trainer and the KD methods.
pub mod data;
pub mod error;
pub mod metrics;

pub use error::{Error, Result};
