//! `kd`: knowledge distillation for BERT-family encoders.
//!
//! The root package re-exports the workspace crates and owns the end-to-end tests (`tests/`)
//! and the criterion benchmarks (`benches/`).
pub use kd_kernels as kernels;
pub use kd_methods as methods;
pub use kd_model as model;
