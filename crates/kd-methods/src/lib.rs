//! kd-methods: data, metrics, losses, the trainer, one file per KD method, and the benchmark step.
pub mod augment;
pub mod batching;
pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod demo;
pub mod encode;
pub mod error;
pub mod losses;
pub mod methods;
pub mod metrics;
pub mod noise;
pub mod pseudo;
pub mod task;
pub mod trainer;

pub use error::{Error, Result};
