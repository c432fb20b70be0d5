//! One file per method, each reading like its paper's pseudo-code.
pub mod ce;
pub mod ild;
pub mod kd;
pub mod peer_advised;
pub mod teacher;
