//! Global gradient norm and norm clipping (`torch.nn.utils.clip_grad_norm_`).
//!
//! The sum of squares is accumulated in f64 over fixed-size chunks whose partial sums are added
//! in chunk order, so the norm is bit-identical run to run whatever rayon's scheduling: a
//! training run with a seed must reproduce, and clipping decisions feed straight into it.
//!
//! On a GPU the same sum runs as fixed per-block partials added in a fixed order (in double),
//! the clipping factor is formed and applied on the device, and only the norm is copied back.
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use rayon::prelude::*;

use crate::cuda;
use crate::cuda::Module;
use crate::device::CudaDevice;
use crate::simd::with_avx2;
use crate::tensor::cuda_err;
use crate::{common_device, Device, Error, Result, Tensor};

/// Elements per partial sum; fixed, so the summation order never depends on the thread count.
const CHUNK: usize = 1 << 14;

/// The L2 norm of all gradients taken together, as if concatenated into one vector.
/// An empty list has norm 0.
pub fn global_grad_norm(grads: &[&Tensor]) -> Result<f32> {
    const OP: &str = "global_grad_norm";
    if grads.is_empty() {
        return Ok(0.0);
    }
    match common_device(OP, grads)? {
        Device::Cpu => Ok(sum_of_squares_cpu(grads)?.sqrt() as f32),
        // An infinite max_norm never clips: the kernels then give the norm only.
        Device::Cuda(dev) => {
            let layout = ScratchLayout::new(OP, grads)?;
            dev.with_scratch(layout.len(), |scratch| {
                norm_cuda(&dev, grads, f32::INFINITY, &layout, scratch)?;
                read_norm(&dev, scratch)
            })
        }
    }
}

/// Scales every gradient by `max_norm / (norm + 1e-6)` when that factor is below 1, like
/// `clip_grad_norm_`, and returns the norm before clipping. A non-finite norm is returned
/// with the gradients untouched: scaling by NaN would only destroy them, and the trainer
/// decides whether to skip the step.
pub fn clip_grad_norm(grads: &mut [&mut Tensor], max_norm: f32) -> Result<f32> {
    const OP: &str = "clip_grad_norm";
    if max_norm.is_nan() || max_norm <= 0.0 {
        return Err(Error::invalid(OP, format!("max_norm must be positive, got {max_norm}")));
    }
    if grads.is_empty() {
        return Ok(0.0);
    }
    let views: Vec<&Tensor> = grads.iter().map(|g| &**g).collect();
    match common_device(OP, &views)? {
        Device::Cpu => {
            let norm = sum_of_squares_cpu(&views)?.sqrt() as f32;
            // torch forms the factor in the gradients' dtype.
            let coef = max_norm / (norm + 1e-6);
            if norm.is_finite() && coef < 1.0 {
                for g in grads.iter_mut() {
                    scale_cpu(g.cpu_mut()?, coef);
                }
            }
            Ok(norm)
        }
        Device::Cuda(dev) => {
            let layout = ScratchLayout::new(OP, &views)?;
            dev.with_scratch(layout.len(), |scratch| {
                // Views again: the first ones end here, before `grads` is borrowed mutably.
                let views: Vec<&Tensor> = grads.iter().map(|g| &**g).collect();
                norm_cuda(&dev, &views, max_norm, &layout, scratch)?;
                scale_cuda(&dev, grads, &layout, scratch)?;
                read_norm(&dev, scratch)
            })
        }
    }
}

fn sum_of_squares_cpu(grads: &[&Tensor]) -> Result<f64> {
    grads.iter().try_fold(0.0, |acc, g| Ok(acc + tensor_sum_of_squares_cpu(g.cpu()?)))
}

fn tensor_sum_of_squares_cpu(x: &[f32]) -> f64 {
    let partials: Vec<f64> = x.par_chunks(CHUNK).map(chunk_sum_of_squares).collect();
    partials.iter().sum()
}

/// In sixteen running f64 sums added up in a fixed order at the end: vector lanes, same result
/// whatever the CPU. Sixteen, not four, so that four independent AVX2 accumulators hide the
/// adds' latency (four lanes were one dependent chain: 1.5% of a standard step).
fn chunk_sum_of_squares(x: &[f32]) -> f64 {
    with_avx2!(-> f64; x: &[f32] => {
        let mut lanes = [0.0f64; 16];
        let mut chunks = x.chunks_exact(16);
        for chunk in &mut chunks {
            for (lane, &v) in lanes.iter_mut().zip(chunk) {
                *lane += v as f64 * v as f64;
            }
        }
        for (lane, &v) in lanes.iter_mut().zip(chunks.remainder()) {
            *lane += v as f64 * v as f64;
        }
        let mut width = 16;
        while width > 1 {
            width /= 2;
            for i in 0..width {
                lanes[i] += lanes[i + width];
            }
        }
        lanes[0]
    })
}

fn scale_cpu(x: &mut [f32], coef: f32) {
    x.par_chunks_mut(CHUNK).for_each(|c| c.iter_mut().for_each(|v| *v *= coef));
}

/// Tensors per launch: the size of `NormTensors` in `kernels/grad_norm.cu`.
const MAX_TENSORS: usize = 64;
/// Threads per block of the partial-sum and scaling kernels, and the elements each thread
/// takes at least.
const NORM_BLOCK: u32 = 256;
const NORM_PER_THREAD: usize = 8;
/// Threads of the one-block finalize kernel.
const FINALIZE_BLOCK: u32 = 1024;

/// The scratch buffer of one call: floats 0 and 1 are the norm and the clipping factor, then
/// `blocks` partial sums per tensor as doubles (two floats each, at an even offset so that they
/// stay 8-byte aligned). Every tensor gets the same number of blocks, set by the largest, so the
/// order of the sum depends only on the tensors' sizes.
struct ScratchLayout {
    tensors: usize,
    blocks: usize,
}

impl ScratchLayout {
    fn new(op: &'static str, grads: &[&Tensor]) -> Result<ScratchLayout> {
        let largest = grads.iter().map(|g| g.numel()).max().unwrap_or(0);
        let blocks = largest.div_ceil(NORM_BLOCK as usize * NORM_PER_THREAD).clamp(1, 256);
        cuda::int(op, "partial sums", grads.len() * blocks)?;
        Ok(ScratchLayout { tensors: grads.len(), blocks })
    }

    fn len(&self) -> usize {
        2 + 2 * self.tensors * self.blocks
    }

    /// The launch of the per-tensor kernels for `count` tensors.
    fn grid(&self, count: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.blocks as u32, count as u32, 1),
            block_dim: (NORM_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// `NormTensors`: device pointers, then element counts; slots past the launch's tensors are 0.
type NormTensors = [[u64; MAX_TENSORS]; 2];

/// Writes the norm and the clipping factor for `max_norm` into the first two scratch floats.
fn norm_cuda(
    dev: &CudaDevice,
    grads: &[&Tensor],
    max_norm: f32,
    layout: &ScratchLayout,
    scratch: &mut CudaSlice<f32>,
) -> Result<()> {
    let partials_f = dev.function(Module::GradNorm, "grad_norm_partials_f32")?;
    let finalize = dev.function(Module::GradNorm, "grad_norm_finalize_f32")?;
    let (mut out, mut partials) = scratch.split_at_mut(2);
    for (chunk, first) in grads.chunks(MAX_TENSORS).zip((0i32..).step_by(MAX_TENSORS)) {
        let mut tensors: NormTensors = [[0; MAX_TENSORS]; 2];
        let mut reads = Vec::with_capacity(chunk.len());
        for (k, g) in chunk.iter().enumerate() {
            let (ptr, read) = cuda::slice(g)?.device_ptr(&dev.stream);
            tensors[0][k] = ptr;
            tensors[1][k] = g.numel() as u64;
            reads.push(read);
        }
        let mut b = dev.stream.launch_builder(&partials_f);
        b.arg(&tensors).arg(&first).arg(&mut partials);
        // SAFETY: grad_norm_partials_f32(tensors, first, partials); every pointer in `tensors`
        // is a live buffer of the count beside it (its guard in `reads` records the use after
        // the launch), and partials holds 2 * blocks floats per tensor of the call.
        unsafe { b.launch(layout.grid(chunk.len())) }.map_err(cuda_err)?;
    }
    let count = (layout.tensors * layout.blocks) as i32;
    let partials = partials.as_view();
    let mut b = dev.stream.launch_builder(&finalize);
    b.arg(&partials).arg(&count).arg(&max_norm).arg(&mut out);
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (FINALIZE_BLOCK, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: grad_norm_finalize_f32(partials, count, max_norm, out); partials holds `count`
    // doubles, `out` two floats.
    unsafe { b.launch(cfg) }.map_err(cuda_err)?;
    Ok(())
}

/// Multiplies every gradient by the scratch's clipping factor where it is below 1.
fn scale_cuda(
    dev: &CudaDevice,
    grads: &mut [&mut Tensor],
    layout: &ScratchLayout,
    scratch: &CudaSlice<f32>,
) -> Result<()> {
    let f = dev.function(Module::GradNorm, "grad_norm_scale_f32")?;
    for chunk in grads.chunks_mut(MAX_TENSORS) {
        let cfg = layout.grid(chunk.len());
        let mut tensors: NormTensors = [[0; MAX_TENSORS]; 2];
        let mut writes = Vec::with_capacity(chunk.len());
        for (k, g) in chunk.iter_mut().enumerate() {
            let n = g.numel() as u64;
            let (ptr, write) = cuda::slice_mut(g)?.device_ptr_mut(&dev.stream);
            tensors[0][k] = ptr;
            tensors[1][k] = n;
            writes.push(write);
        }
        let mut b = dev.stream.launch_builder(&f);
        b.arg(&tensors).arg(scratch);
        // SAFETY: grad_norm_scale_f32(tensors, factor); every pointer in `tensors` is a live
        // buffer of the count beside it (its guard in `writes` records the use after the
        // launch); the factor is scratch float 1.
        unsafe { b.launch(cfg) }.map_err(cuda_err)?;
    }
    Ok(())
}

/// The norm that norm_cuda wrote: the call's one device-to-host copy.
fn read_norm(dev: &CudaDevice, scratch: &CudaSlice<f32>) -> Result<f32> {
    let norm = dev.stream.clone_dtoh(&scratch.slice(0..1)).map_err(cuda_err)?;
    Ok(norm[0])
}
