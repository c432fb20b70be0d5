//! One file per method, each reading like its paper's pseudo-code.
pub mod ce;
pub mod cr_ild;
pub mod generator;
pub mod ild;
pub mod kd;
pub mod mate_kd;
pub mod noisy_coteach;
pub mod noisy_relabel;
pub mod peer_advised;
pub mod teacher;
