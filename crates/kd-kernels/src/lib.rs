//! kd-kernels: the compute layer of kd.
//!
//! A [`Tensor`] is a dense row-major f32 array on one [`Device`]. Every op is a free function
//! with one signature for both devices: the CPU body is the readable reference (rayon over rows
//! or heads), the CUDA body launches a kernel from `kernels/*.cu`. One file per op family under
//! [`ops`], CPU and CUDA side by side.
//!
//! Conventions, stated once for every op:
//! - Shapes are row-major. Token activations are `[N, D]` with `N = B * L` (batch-major, then
//!   position); attention inputs are `[B, L, H * Dh]` (heads interleaved along the last axis, as
//!   HF's linear layers produce them); attention maps and scores are `[B, H, L, L]`.
//! - Forward ops overwrite their outputs. Backward ops **accumulate** (`+=`) into every
//!   gradient they write, like llm.c: the caller zeroes gradients once per step, and residual
//!   branches and tied weights need no extra adds.
//! - Outputs are caller-provided buffers, sized once and reused, so a training step allocates
//!   nothing; an op checks shapes and devices and returns an [`Error`] naming itself.
//! - A padding mask is `[B, L]` with 1.0 for a real token and 0.0 for padding.
pub mod assets;
mod cuda;
pub mod device;
pub mod error;
pub mod io;
pub mod ops;
pub mod rng;
mod simd;
pub mod tensor;
pub mod testing;

pub use device::{CudaDevice, Device};
pub use error::{Error, Result};
pub use tensor::{common_device, expect_shape, Bf16Storage, Bf16Tensor, IdStorage, IdTensor, Storage, Tensor};
