//! One file per method, each reading like its paper's pseudo-code.
pub mod ce;
pub mod generator;
pub mod ild;
pub mod kd;
pub mod mate_kd;
pub mod teacher;
