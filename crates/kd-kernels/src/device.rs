use std::fmt;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};

use crate::cuda::Kernels;
use crate::{Error, Result};

/// Where a tensor's storage lives and where its ops run.
#[derive(Clone)]
pub enum Device {
    Cpu,
    Cuda(Arc<CudaDevice>),
}

/// One CUDA GPU: its primary context, the stream every op of kd is issued on, and kd's kernels
/// loaded on it.
pub struct CudaDevice {
    pub ordinal: usize,
    pub name: String,
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub(crate) kernels: Kernels,
}

impl Device {
    /// Opens GPU `ordinal`. With cudarc's dynamic loading a missing libcuda would panic on the
    /// first driver call, so the library is looked for first and its absence is an error.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        // SAFETY: only probes whether the shared library can be dlopen'ed.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::NoCuda("no CUDA driver library (libcuda.so) on this machine".into()));
        }
        let count = CudaContext::device_count().map_err(|e| Error::NoCuda(e.to_string()))?;
        if ordinal as i32 >= count {
            return Err(Error::NoCuda(format!("GPU {ordinal} asked for, {count} present")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::NoCuda(e.to_string()))?;
        let name = ctx.name().map_err(|e| Error::Cuda(e.to_string()))?;
        let stream = ctx.default_stream();
        Ok(Device::Cuda(Arc::new(CudaDevice { ordinal, name, ctx, stream, kernels: Kernels::default() })))
    }

    /// Parses a `--device` value: `cpu`, `cuda` or `cuda:N`.
    pub fn parse(spec: &str) -> Result<Device> {
        match spec {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Device::cuda(0),
            s => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
                Some(n) => Device::cuda(n),
                None => Err(Error::invalid("device", format!("'{spec}' is not cpu, cuda or cuda:N"))),
            },
        }
    }

    /// Waits until every op issued on this device has finished (nothing to wait for on the
    /// CPU): kernel launches return before the GPU runs them, so a clock read after this call
    /// measures their work.
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(d) => d.stream.synchronize().map_err(|e| Error::Cuda(e.to_string())),
        }
    }

    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }

    pub fn same(&self, other: &Device) -> bool {
        match (self, other) {
            (Device::Cpu, Device::Cpu) => true,
            (Device::Cuda(a), Device::Cuda(b)) => a.ordinal == b.ordinal,
            _ => false,
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(d) => write!(f, "cuda:{} ({})", d.ordinal, d.name),
        }
    }
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
