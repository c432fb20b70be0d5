//! Bias and residual arithmetic: broadcast bias add and its column-sum backward, element-wise
//! add (residual connections), in-place accumulate and scale.
use cudarc::driver::{LaunchConfig, PushKernelArg};
use rayon::prelude::*;

use crate::cuda::{self, Module, ROW_BLOCK};
use crate::device::CudaDevice;
use crate::tensor::cuda_err;
use crate::{common_device, Device, Error, Result, Tensor};

/// Elements per rayon task in element-wise loops: large enough to amortise the task.
const CHUNK: usize = 1 << 14;
/// Columns per task in column reductions; a stack accumulator of this width vectorises.
const COLS: usize = 64;

/// `x[r, :] += bias` for every row `r` of `x` (`[.., D]`, bias `[D]`).
pub fn add_bias_inplace(x: &mut Tensor, bias: &Tensor) -> Result<()> {
    const OP: &str = "add_bias_inplace";
    expect_last_dim(OP, "x", x, bias)?;
    match common_device(OP, &[x, bias])? {
        Device::Cpu => {
            add_bias_cpu(x.cpu_mut()?, bias.cpu()?);
            Ok(())
        }
        Device::Cuda(dev) => add_bias_cuda(&dev, x, bias),
    }
}

/// Backward of [`add_bias_inplace`]: `dbias += sum over rows of dout`. Each column is summed in
/// row order by one task, so the result does not depend on the thread count.
pub fn bias_backward(dbias: &mut Tensor, dout: &Tensor) -> Result<()> {
    const OP: &str = "bias_backward";
    expect_last_dim(OP, "dout", dout, dbias)?;
    match common_device(OP, &[dbias, dout])? {
        Device::Cpu => {
            bias_backward_cpu(dbias.cpu_mut()?, dout.cpu()?);
            Ok(())
        }
        Device::Cuda(dev) => bias_backward_cuda(&dev, dbias, dout),
    }
}

/// `out = a + b` (a residual connection). `b` and `out` hold the rows of `a`, in `a`'s shape or
/// another view of them (`[N, D]` against `[B, L, D]`).
pub fn add(out: &mut Tensor, a: &Tensor, b: &Tensor) -> Result<()> {
    const OP: &str = "add";
    expect_rows(OP, "b", b, lead_rows(a), a.last_dim())?;
    expect_rows(OP, "out", out, lead_rows(a), a.last_dim())?;
    match common_device(OP, &[out, a, b])? {
        Device::Cpu => {
            let (a, b) = (a.cpu()?, b.cpu()?);
            out.cpu_mut()?.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
                let at = c * CHUNK..c * CHUNK + o.len();
                o.iter_mut().zip(&a[at.clone()]).zip(&b[at]).for_each(|((o, &a), &b)| *o = a + b);
            });
            Ok(())
        }
        Device::Cuda(dev) => {
            let n = elements(OP, out)?;
            if n == 0 {
                return Ok(());
            }
            let f = dev.function(Module::Bias, "add_f32")?;
            let mut args = dev.stream.launch_builder(&f);
            args.arg(cuda::slice_mut(out)?).arg(cuda::slice(a)?).arg(cuda::slice(b)?).arg(&n);
            // SAFETY: add_f32(out, a, b, n); the three buffers hold the same n floats.
            unsafe { args.launch(cuda::elementwise_launch(n as usize)) }.map_err(cuda_err)?;
            Ok(())
        }
    }
}

/// `dst += src`, `src` holding the rows of `dst` in the same or another view (see [`add`]).
pub fn add_inplace(dst: &mut Tensor, src: &Tensor) -> Result<()> {
    const OP: &str = "add_inplace";
    expect_rows(OP, "src", src, lead_rows(dst), dst.last_dim())?;
    match common_device(OP, &[dst, src])? {
        Device::Cpu => {
            let src = src.cpu()?;
            dst.cpu_mut()?.par_chunks_mut(CHUNK).enumerate().for_each(|(c, d)| {
                d.iter_mut().zip(&src[c * CHUNK..]).for_each(|(d, &s)| *d += s);
            });
            Ok(())
        }
        Device::Cuda(dev) => {
            let n = elements(OP, dst)?;
            if n == 0 {
                return Ok(());
            }
            let f = dev.function(Module::Bias, "add_inplace_f32")?;
            let mut args = dev.stream.launch_builder(&f);
            args.arg(cuda::slice_mut(dst)?).arg(cuda::slice(src)?).arg(&n);
            // SAFETY: add_inplace_f32(dst, src, n); both buffers hold n floats.
            unsafe { args.launch(cuda::elementwise_launch(n as usize)) }.map_err(cuda_err)?;
            Ok(())
        }
    }
}

/// `x *= s`.
pub fn scale_inplace(x: &mut Tensor, s: f32) -> Result<()> {
    const OP: &str = "scale_inplace";
    match x.device() {
        Device::Cpu => {
            x.cpu_mut()?.par_chunks_mut(CHUNK).for_each(|c| c.iter_mut().for_each(|v| *v *= s));
            Ok(())
        }
        Device::Cuda(dev) => {
            let n = elements(OP, x)?;
            if n == 0 {
                return Ok(());
            }
            let f = dev.function(Module::Bias, "scale_inplace_f32")?;
            let mut args = dev.stream.launch_builder(&f);
            args.arg(cuda::slice_mut(x)?).arg(&s).arg(&n);
            // SAFETY: scale_inplace_f32(x, s, n); x holds n floats.
            unsafe { args.launch(cuda::elementwise_launch(n as usize)) }.map_err(cuda_err)?;
            Ok(())
        }
    }
}

/// Number of rows of `t` read as `[rows, last]`: the product of its leading axes.
pub(crate) fn lead_rows(t: &Tensor) -> usize {
    t.shape().split_last().map_or(1, |(_, lead)| lead.iter().product())
}

/// Errors unless `t` is `rows` rows of `last` values, in any leading shape (`[N, D]` and
/// `[B, L, D]` are two views of the same token rows).
pub(crate) fn expect_rows(op: &'static str, what: &str, t: &Tensor, rows: usize, last: usize) -> Result<()> {
    if t.last_dim() != last || lead_rows(t) != rows {
        return Err(Error::shape(
            op,
            format!("{what} is {:?}, expected {rows} rows of {last} ([.., {last}])", t.shape()),
        ));
    }
    Ok(())
}

/// Errors unless `t` is `[.., D]` for the `[D]` vector `v`.
pub(crate) fn expect_last_dim(op: &'static str, what: &str, t: &Tensor, v: &Tensor) -> Result<()> {
    if v.shape().len() != 1 || t.shape().is_empty() || t.last_dim() != v.numel() {
        return Err(Error::shape(
            op,
            format!("{what} is {:?}, bias is {:?}: expected [.., D] and [D]", t.shape(), v.shape()),
        ));
    }
    Ok(())
}

fn add_bias_cpu(x: &mut [f32], bias: &[f32]) {
    if bias.is_empty() {
        return;
    }
    x.par_chunks_mut(bias.len()).for_each(|row| row.iter_mut().zip(bias).for_each(|(x, &b)| *x += b));
}

fn bias_backward_cpu(dbias: &mut [f32], dout: &[f32]) {
    let d = dbias.len();
    dbias.par_chunks_mut(COLS).enumerate().for_each(|(c, db)| {
        let cols = c * COLS..c * COLS + db.len();
        let mut acc = [0f32; COLS];
        let acc = &mut acc[..db.len()];
        for row in dout.chunks_exact(d) {
            acc.iter_mut().zip(&row[cols.clone()]).for_each(|(a, &g)| *a += g);
        }
        db.iter_mut().zip(acc).for_each(|(b, a)| *b += *a);
    });
}

/// The number of elements of `t` as the element-wise kernels' `int n`.
pub(crate) fn elements(op: &'static str, t: &Tensor) -> Result<i32> {
    cuda::int(op, "number of elements", t.numel())
}

/// `kernels/bias.cu`: one thread per element.
fn add_bias_cuda(dev: &CudaDevice, x: &mut Tensor, bias: &Tensor) -> Result<()> {
    const OP: &str = "add_bias_inplace";
    let (n, d) = (elements(OP, x)?, cuda::int(OP, "D", bias.numel())?);
    if n == 0 {
        return Ok(());
    }
    let f = dev.function(Module::Bias, "add_bias_f32")?;
    let mut args = dev.stream.launch_builder(&f);
    args.arg(cuda::slice_mut(x)?).arg(cuda::slice(bias)?).arg(&n).arg(&d);
    // SAFETY: add_bias_f32(x, bias, n, d); x holds n floats, bias d > 0 (n > 0).
    unsafe { args.launch(cuda::elementwise_launch(n as usize)) }.map_err(cuda_err)?;
    Ok(())
}

/// `kernels/bias.cu`: a deterministic column sum (see [`ColumnSums`]).
fn bias_backward_cuda(dev: &CudaDevice, dbias: &mut Tensor, dout: &Tensor) -> Result<()> {
    const OP: &str = "bias_backward";
    let (rows, d) = (lead_rows(dout), dbias.numel());
    if rows == 0 || d == 0 {
        return Ok(());
    }
    let sums = ColumnSums::new(OP, rows, d)?;
    let partials = dev.function(Module::Bias, "bias_backward_partials_f32")?;
    let finalize = dev.function(Module::Bias, "bias_backward_finalize_f32")?;
    dev.with_scratch(sums.scratch_len(), |scratch| {
        {
            let mut args = dev.stream.launch_builder(&partials);
            args.arg(cuda::slice(dout)?).arg(&sums.rows).arg(&sums.d).arg(&sums.rows_per_chunk).arg(&mut *scratch);
            // SAFETY: bias_backward_partials_f32(dout [rows, d], rows, d, rows_per_chunk,
            // partials [chunks, d]); the scratch holds at least chunks * d floats.
            unsafe { args.launch(sums.partials_launch()) }.map_err(cuda_err)?;
        }
        let mut args = dev.stream.launch_builder(&finalize);
        args.arg(&*scratch).arg(&sums.chunks).arg(&sums.d).arg(cuda::slice_mut(dbias)?);
        // SAFETY: bias_backward_finalize_f32(partials [chunks, d], chunks, d, dbias [d]).
        unsafe { args.launch(cuda::elementwise_launch(d)) }.map_err(cuda_err)?;
        Ok(())
    })
}

/// How the CUDA column sums (bias_backward, LayerNorm's dgamma and dbeta) split a `[rows, d]`
/// matrix: one thread per column sums each chunk of `rows_per_chunk` rows in row order into a
/// partial, then a finalize kernel adds each column's partials in chunk order, so the result
/// depends only on the shape. Chunks of at least `MIN_ROWS` rows, at most `MAX_CHUNKS` of them,
/// keep a few hundred blocks busy at BERT's 4,096 token rows and the scratch within
/// `MAX_CHUNKS * d` floats per sum.
pub(crate) struct ColumnSums {
    pub rows: i32,
    pub d: i32,
    pub rows_per_chunk: i32,
    pub chunks: i32,
}

impl ColumnSums {
    const MIN_ROWS: usize = 32;
    const MAX_CHUNKS: usize = 256;

    /// For `rows` > 0 rows of `d` > 0 columns.
    pub fn new(op: &'static str, rows: usize, d: usize) -> Result<ColumnSums> {
        let rows_per_chunk = rows.div_ceil(Self::MAX_CHUNKS).max(Self::MIN_ROWS);
        Ok(ColumnSums {
            rows: cuda::int(op, "rows", rows)?,
            d: cuda::int(op, "D", d)?,
            rows_per_chunk: rows_per_chunk as i32,
            chunks: rows.div_ceil(rows_per_chunk) as i32,
        })
    }

    /// Floats of scratch for one sum's partials.
    pub fn scratch_len(&self) -> usize {
        self.chunks as usize * self.d as usize
    }

    /// The partials kernel's grid: `ROW_BLOCK` columns by one chunk per block.
    pub fn partials_launch(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((self.d as u32).div_ceil(ROW_BLOCK), self.chunks as u32, 1),
            block_dim: (ROW_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}
