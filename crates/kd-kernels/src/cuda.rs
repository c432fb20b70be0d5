//! The CUDA side's plumbing: the PTX that `cargo xtask build-kernels` builds from
//! `kernels/*.cu` (embedded, so a GPU user needs no CUDA toolkit), loaded into a device's
//! context on first use, and the helpers every op's launch shares. The launches themselves sit
//! beside their CPU references in `ops/`.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaFunction, CudaModule, CudaSlice, LaunchArgs, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;

use crate::device::CudaDevice;
use crate::tensor::cuda_err;
use crate::{Bf16Storage, Bf16Tensor, Error, IdStorage, IdTensor, Result, Storage, Tensor};

/// One `kernels/<name>.cu`, compiled to `kernels/ptx/<name>.ptx`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) enum Module {
    AdamW,
    Attention,
    Bias,
    Convert,
    CrossEntropy,
    Dropout,
    Embedding,
    Gelu,
    GradNorm,
    Gumbel,
    HiddenMse,
    LayerNorm,
    SoftmaxKl,
}

impl Module {
    fn ptx(self) -> &'static str {
        match self {
            Module::AdamW => include_str!("../../../kernels/ptx/adamw.ptx"),
            Module::Attention => include_str!("../../../kernels/ptx/attention.ptx"),
            Module::Bias => include_str!("../../../kernels/ptx/bias.ptx"),
            Module::Convert => include_str!("../../../kernels/ptx/convert.ptx"),
            Module::CrossEntropy => include_str!("../../../kernels/ptx/cross_entropy.ptx"),
            Module::Dropout => include_str!("../../../kernels/ptx/dropout.ptx"),
            Module::Embedding => include_str!("../../../kernels/ptx/embedding.ptx"),
            Module::Gelu => include_str!("../../../kernels/ptx/gelu.ptx"),
            Module::GradNorm => include_str!("../../../kernels/ptx/grad_norm.ptx"),
            Module::Gumbel => include_str!("../../../kernels/ptx/gumbel.ptx"),
            Module::HiddenMse => include_str!("../../../kernels/ptx/hidden_mse.ptx"),
            Module::LayerNorm => include_str!("../../../kernels/ptx/layernorm.ptx"),
            Module::SoftmaxKl => include_str!("../../../kernels/ptx/softmax_kl.ptx"),
        }
    }
}

/// A device's loaded modules and functions, its cuBLAS handle and one scratch buffer. All load
/// lazily: the driver JIT-compiles PTX at load time and cuBLAS is a large library, so a run pays
/// only for what it uses.
#[derive(Default)]
pub(crate) struct Kernels {
    modules: Mutex<HashMap<Module, Arc<CudaModule>>>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    blas: Mutex<Option<Arc<CudaBlas>>>,
    scratch: Mutex<Option<CudaSlice<f32>>>,
}

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    m.lock().map_err(|_| Error::Cuda("a thread panicked while holding the kernel cache".into()))
}

impl CudaDevice {
    /// The kernel `name` of `module`, loading the module on first use.
    pub(crate) fn function(&self, module: Module, name: &'static str) -> Result<CudaFunction> {
        let mut functions = lock(&self.kernels.functions)?;
        if let Some(f) = functions.get(name) {
            return Ok(f.clone());
        }
        let module = {
            let mut modules = lock(&self.kernels.modules)?;
            match modules.get(&module) {
                Some(m) => m.clone(),
                None => {
                    let loaded = self
                        .ctx
                        .load_module(Ptx::from_src(module.ptx()))
                        .map_err(|e| Error::Cuda(format!("loading the {module:?} kernels: {e}")))?;
                    modules.insert(module, loaded.clone());
                    loaded
                }
            }
        };
        let f = module.load_function(name).map_err(|e| Error::Cuda(format!("kernel {name}: {e}")))?;
        functions.insert(name, f.clone());
        Ok(f)
    }

    /// The cuBLAS handle bound to the device's stream, created on first use.
    pub(crate) fn blas(&self) -> Result<Arc<CudaBlas>> {
        let mut blas = lock(&self.kernels.blas)?;
        if let Some(b) = blas.as_ref() {
            return Ok(b.clone());
        }
        // SAFETY: only probes whether the shared library can be dlopen'ed; a missing libcublas
        // would otherwise panic inside cudarc on the first call.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::NoCuda(
                "no cuBLAS library (libcublas.so) on this machine: add its folder to LD_LIBRARY_PATH".into(),
            ));
        }
        let handle = Arc::new(CudaBlas::new(self.stream.clone()).map_err(|e| Error::Cuda(format!("cuBLAS: {e}")))?);
        *blas = Some(handle.clone());
        Ok(handle)
    }

    /// Runs `f` with a device buffer of at least `len` floats, uninitialised, reused across
    /// calls (every op is issued on the one stream, so a later op's use of the buffer is ordered
    /// after an earlier op's kernels).
    pub(crate) fn with_scratch<R>(&self, len: usize, f: impl FnOnce(&mut CudaSlice<f32>) -> Result<R>) -> Result<R> {
        let mut guard = lock(&self.kernels.scratch)?;
        let buf = match guard.take() {
            Some(buf) if buf.len() >= len => buf,
            // SAFETY: the kernels write every scratch value before they read it.
            _ => unsafe { self.stream.alloc::<f32>(len.max(1)) }.map_err(cuda_err)?,
        };
        f(guard.insert(buf))
    }
}

/// The device buffer of a tensor that `common_device` has placed on a GPU.
pub(crate) fn slice(t: &Tensor) -> Result<&CudaSlice<f32>> {
    match t.storage() {
        Storage::Cuda { data, .. } => Ok(data),
        Storage::Cpu(_) => Err(Error::invalid("cuda", "a CPU tensor reached a CUDA launch")),
    }
}

pub(crate) fn slice_mut(t: &mut Tensor) -> Result<&mut CudaSlice<f32>> {
    match t.storage_mut() {
        Storage::Cuda { data, .. } => Ok(data),
        Storage::Cpu(_) => Err(Error::invalid("cuda", "a CPU tensor reached a CUDA launch")),
    }
}

pub(crate) fn id_slice(t: &IdTensor) -> Result<&CudaSlice<u32>> {
    match t.storage() {
        IdStorage::Cuda { data, .. } => Ok(data),
        IdStorage::Cpu(_) => Err(Error::invalid("cuda", "CPU ids reached a CUDA launch")),
    }
}

/// The raw bf16 bits of a tensor on a GPU (the kernels' `kd_bf16`).
pub(crate) fn bf16_slice(t: &Bf16Tensor) -> Result<&CudaSlice<u16>> {
    match t.storage() {
        Bf16Storage::Cuda { data, .. } => Ok(data),
        Bf16Storage::Cpu(_) => Err(Error::invalid("cuda", "a CPU bf16 tensor reached a CUDA launch")),
    }
}

/// A size as the `int` kernels take, or an error naming the op.
pub(crate) fn int(op: &'static str, what: &str, n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| Error::invalid(op, format!("{what} = {n} is too large for the CUDA kernels")))
}

/// A kernel's null pointer argument (an optional buffer left out).
static NULL: u64 = 0;

/// Optional buffer arguments: the buffer, or a null pointer the kernel tests for.
pub(crate) trait OptionalArg<'a> {
    fn opt<T>(&mut self, s: Option<&'a CudaSlice<T>>) -> &mut Self;
    fn opt_mut<T>(&mut self, s: Option<&'a mut CudaSlice<T>>) -> &mut Self;
}

impl<'a> OptionalArg<'a> for LaunchArgs<'a> {
    fn opt<T>(&mut self, s: Option<&'a CudaSlice<T>>) -> &mut Self {
        match s {
            Some(s) => self.arg(s),
            None => self.arg(&NULL),
        }
    }

    fn opt_mut<T>(&mut self, s: Option<&'a mut CudaSlice<T>>) -> &mut Self {
        match s {
            Some(s) => self.arg(s),
            None => self.arg(&NULL),
        }
    }
}

/// Threads per block of the row kernels.
pub(crate) const ROW_BLOCK: u32 = 256;
/// Threads per block when one block takes a whole (vocabulary-wide) row.
pub(crate) const WIDE_ROW_BLOCK: u32 = 512;
/// The longest row the `*_warp` kernels take; longer rows get a block each.
pub(crate) const MAX_WARP_ROW: usize = 1024;

/// How a row kernel covers `rows` rows of `c` values: `Some(group)` lanes of a warp per row
/// (the `*_warp` kernel, `group` the power of two covering `c`, at most 32), or `None` for one
/// block per row (the `*_block` kernel).
pub(crate) fn row_launch(rows: usize, c: usize) -> (LaunchConfig, Option<i32>) {
    if c <= MAX_WARP_ROW {
        let group = c.next_power_of_two().min(32) as u32;
        let per_block = ROW_BLOCK / group;
        let cfg = LaunchConfig {
            grid_dim: ((rows as u32).div_ceil(per_block), 1, 1),
            block_dim: (ROW_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        (cfg, Some(group as i32))
    } else {
        let cfg =
            LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (WIDE_ROW_BLOCK, 1, 1), shared_mem_bytes: 0 };
        (cfg, None)
    }
}

/// One thread per element, `ROW_BLOCK` per block.
pub(crate) fn elementwise_launch(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: ((n as u32).div_ceil(ROW_BLOCK), 1, 1), block_dim: (ROW_BLOCK, 1, 1), shared_mem_bytes: 0 }
}
