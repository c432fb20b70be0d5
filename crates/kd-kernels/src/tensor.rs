use std::sync::Arc;

use cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};
use half::bf16;
use rayon::prelude::*;

use crate::cuda::{self, Module};
use crate::device::CudaDevice;
use crate::{Device, Error, Result};

/// A dense row-major f32 array on one device.
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

pub enum Storage {
    Cpu(Vec<f32>),
    Cuda { data: CudaSlice<f32>, device: Arc<CudaDevice> },
}

pub(crate) fn cuda_err(e: impl std::fmt::Display) -> Error {
    Error::Cuda(e.to_string())
}

impl Tensor {
    pub fn zeros(shape: &[usize], device: &Device) -> Result<Tensor> {
        let n = shape.iter().product();
        let storage = match device {
            Device::Cpu => Storage::Cpu(vec![0.0; n]),
            Device::Cuda(d) => {
                Storage::Cuda { data: d.stream.alloc_zeros::<f32>(n).map_err(cuda_err)?, device: d.clone() }
            }
        };
        Ok(Tensor { shape: shape.to_vec(), storage })
    }

    pub fn from_vec(data: Vec<f32>, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if data.len() != n {
            return Err(Error::shape("Tensor::from_vec", format!("{} values for shape {shape:?}", data.len())));
        }
        let storage = match device {
            Device::Cpu => Storage::Cpu(data),
            Device::Cuda(d) => Storage::Cuda { data: d.stream.clone_htod(&data).map_err(cuda_err)?, device: d.clone() },
        };
        Ok(Tensor { shape: shape.to_vec(), storage })
    }

    pub fn from_slice(data: &[f32], shape: &[usize], device: &Device) -> Result<Tensor> {
        Tensor::from_vec(data.to_vec(), shape, device)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of the last dimension (1 for a scalar).
    pub fn last_dim(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Number of rows when the tensor is read as `[numel / last_dim, last_dim]`.
    pub fn rows(&self) -> usize {
        self.numel() / self.last_dim().max(1)
    }

    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda { device, .. } => Device::Cuda(device.clone()),
        }
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    pub fn storage_mut(&mut self) -> &mut Storage {
        &mut self.storage
    }

    /// Same data, another shape with the same number of elements.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Tensor> {
        if shape.iter().product::<usize>() != self.numel() {
            return Err(Error::shape("Tensor::reshape", format!("{:?} -> {shape:?}", self.shape)));
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// The host slice of a CPU tensor; `op` names the caller in the error for a CUDA tensor.
    pub fn cpu(&self) -> Result<&[f32]> {
        match &self.storage {
            Storage::Cpu(v) => Ok(v),
            Storage::Cuda { .. } => Err(Error::invalid("Tensor::cpu", "tensor lives on a CUDA device")),
        }
    }

    pub fn cpu_mut(&mut self) -> Result<&mut [f32]> {
        match &mut self.storage {
            Storage::Cpu(v) => Ok(v),
            Storage::Cuda { .. } => Err(Error::invalid("Tensor::cpu_mut", "tensor lives on a CUDA device")),
        }
    }

    /// Copies the values to a host vector, from any device.
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        match &self.storage {
            Storage::Cpu(v) => Ok(v.clone()),
            Storage::Cuda { data, device } => device.stream.clone_dtoh(data).map_err(cuda_err),
        }
    }

    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        Tensor::from_vec(self.to_vec()?, &self.shape, device)
    }

    /// Overwrites every element with `value`.
    pub fn fill(&mut self, value: f32) -> Result<()> {
        match &mut self.storage {
            Storage::Cpu(v) => {
                v.fill(value);
                Ok(())
            }
            // Zeroing (every gradient, every step) is a device memset; other values are rare
            // enough to go through a host copy.
            Storage::Cuda { data, device } if value == 0.0 && value.is_sign_positive() => {
                device.stream.memset_zeros(data).map_err(cuda_err)
            }
            Storage::Cuda { data, device } => {
                let host = vec![value; data.len()];
                device.stream.memcpy_htod(&host, data).map_err(cuda_err)
            }
        }
    }
}

impl Tensor {
    /// A copy on the same device (a device copy can fail, so this is no `Clone`).
    pub fn try_clone(&self) -> Result<Tensor> {
        let storage = match &self.storage {
            Storage::Cpu(v) => Storage::Cpu(v.clone()),
            Storage::Cuda { data, device } => {
                Storage::Cuda { data: device.stream.clone_dtod(data).map_err(cuda_err)?, device: device.clone() }
            }
        };
        Ok(Tensor { shape: self.shape.clone(), storage })
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?} on {})", self.shape, self.device())
    }
}

/// The device that all of an op's tensors share, or an error naming the op.
pub fn common_device(op: &'static str, tensors: &[&Tensor]) -> Result<Device> {
    let first = tensors[0].device();
    for t in &tensors[1..] {
        let d = t.device();
        if !first.same(&d) {
            return Err(Error::DeviceMismatch { op, a: first.to_string(), b: d.to_string() });
        }
    }
    Ok(first)
}

/// Errors unless `t` has exactly `shape`; `what` names the argument in the message.
pub fn expect_shape(op: &'static str, what: &str, t: &Tensor, shape: &[usize]) -> Result<()> {
    if t.shape() != shape {
        return Err(Error::shape(op, format!("{what} is {:?}, expected {shape:?}", t.shape())));
    }
    Ok(())
}

/// Integer data that ops index with (token ids, labels), on one device.
pub struct IdTensor {
    shape: Vec<usize>,
    storage: IdStorage,
}

pub enum IdStorage {
    Cpu(Vec<u32>),
    Cuda { data: CudaSlice<u32>, device: Arc<CudaDevice> },
}

impl IdTensor {
    pub fn from_vec(data: Vec<u32>, shape: &[usize], device: &Device) -> Result<IdTensor> {
        if data.len() != shape.iter().product::<usize>() {
            return Err(Error::shape("IdTensor::from_vec", format!("{} values for shape {shape:?}", data.len())));
        }
        let storage = match device {
            Device::Cpu => IdStorage::Cpu(data),
            Device::Cuda(d) => {
                IdStorage::Cuda { data: d.stream.clone_htod(&data).map_err(cuda_err)?, device: d.clone() }
            }
        };
        Ok(IdTensor { shape: shape.to_vec(), storage })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn device(&self) -> Device {
        match &self.storage {
            IdStorage::Cpu(_) => Device::Cpu,
            IdStorage::Cuda { device, .. } => Device::Cuda(device.clone()),
        }
    }

    pub fn storage(&self) -> &IdStorage {
        &self.storage
    }

    pub fn cpu(&self) -> Result<&[u32]> {
        match &self.storage {
            IdStorage::Cpu(v) => Ok(v),
            IdStorage::Cuda { .. } => Err(Error::invalid("IdTensor::cpu", "ids live on a CUDA device")),
        }
    }

    pub fn to_vec(&self) -> Result<Vec<u32>> {
        match &self.storage {
            IdStorage::Cpu(v) => Ok(v.clone()),
            IdStorage::Cuda { data, device } => device.stream.clone_dtoh(data).map_err(cuda_err),
        }
    }
}

impl Tensor {
    /// Gives the tensor a new shape, keeping the values that still fit. On the CPU this reuses
    /// the allocation while the new size is within its capacity, so per-batch buffers sized for
    /// the largest batch never reallocate when a later batch is shorter.
    pub fn resize(&mut self, shape: &[usize]) -> Result<()> {
        let n: usize = shape.iter().product();
        match &mut self.storage {
            Storage::Cpu(v) => v.resize(n, 0.0),
            Storage::Cuda { data, device } => {
                if data.len() != n {
                    *data = device.stream.alloc_zeros::<f32>(n).map_err(cuda_err)?;
                }
            }
        }
        self.shape = shape.to_vec();
        Ok(())
    }
}

/// bf16 values on one device: inputs kept at half the bytes of f32, such as the logits that
/// `ops::softmax_kl` takes in either type. Ops widen each value to f32 as they read it and
/// compute in f32; nothing is computed in bf16.
pub struct Bf16Tensor {
    shape: Vec<usize>,
    storage: Bf16Storage,
}

pub enum Bf16Storage {
    Cpu(Vec<bf16>),
    /// The raw bits: cudarc's device traits cover `half::bf16` only with its `f16` feature.
    Cuda {
        data: CudaSlice<u16>,
        device: Arc<CudaDevice>,
    },
}

impl Bf16Tensor {
    /// `t` rounded to the nearest bf16, ties to even, on `t`'s device (the same bits on both).
    /// Values past bf16's range round to infinities, f32::MIN to -inf as in PyTorch; NaN stays
    /// NaN.
    pub fn from_f32(t: &Tensor) -> Result<Bf16Tensor> {
        let storage = match t.storage() {
            Storage::Cpu(v) => Bf16Storage::Cpu(v.par_iter().map(|&x| bf16::from_f32(x)).collect()),
            Storage::Cuda { data, device } => {
                // SAFETY: f32_to_bf16 writes every value before anything reads it.
                let mut out = unsafe { device.stream.alloc::<u16>(data.len()) }.map_err(cuda_err)?;
                convert_cuda(device, "f32_to_bf16", &mut out, data)?;
                Bf16Storage::Cuda { data: out, device: device.clone() }
            }
        };
        Ok(Bf16Tensor { shape: t.shape().to_vec(), storage })
    }

    /// The values as an f32 tensor on the same device (exact: every bf16 is an f32).
    pub fn to_f32(&self) -> Result<Tensor> {
        match &self.storage {
            Bf16Storage::Cpu(v) => {
                Tensor::from_vec(v.par_iter().map(|x| x.to_f32()).collect(), &self.shape, &Device::Cpu)
            }
            Bf16Storage::Cuda { data, device } => {
                let mut out = Tensor::zeros(&self.shape, &Device::Cuda(device.clone()))?;
                convert_cuda(device, "bf16_to_f32", cuda::slice_mut(&mut out)?, data)?;
                Ok(out)
            }
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn device(&self) -> Device {
        match &self.storage {
            Bf16Storage::Cpu(_) => Device::Cpu,
            Bf16Storage::Cuda { device, .. } => Device::Cuda(device.clone()),
        }
    }

    pub fn storage(&self) -> &Bf16Storage {
        &self.storage
    }

    pub fn cpu(&self) -> Result<&[bf16]> {
        match &self.storage {
            Bf16Storage::Cpu(v) => Ok(v),
            Bf16Storage::Cuda { .. } => Err(Error::invalid("Bf16Tensor::cpu", "tensor lives on a CUDA device")),
        }
    }
}

/// Runs `kernels/convert.cu`'s kernel `name` over the elements of `x`, writing as many into `out`.
fn convert_cuda<I: DeviceRepr, O: DeviceRepr>(
    dev: &CudaDevice,
    name: &'static str,
    out: &mut CudaSlice<O>,
    x: &CudaSlice<I>,
) -> Result<()> {
    let n = cuda::int(name, "the element count", x.len())?;
    if n == 0 {
        return Ok(());
    }
    let f = dev.function(Module::Convert, name)?;
    let mut b = dev.stream.launch_builder(&f);
    b.arg(out).arg(x).arg(&n);
    // SAFETY: `out` and `x` both hold n values, and the kernel's thread i touches element i only.
    unsafe { b.launch(cuda::elementwise_launch(x.len())) }.map_err(cuda_err)?;
    Ok(())
}
