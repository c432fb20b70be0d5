//! Bias and residual arithmetic: broadcast bias add and its column-sum backward, element-wise
//! add (residual connections), in-place accumulate and scale.
use rayon::prelude::*;

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
        Device::Cuda(_) => Err(Error::CudaUnsupported { op: OP }),
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
        Device::Cuda(_) => Err(Error::CudaUnsupported { op: OP }),
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
        Device::Cuda(_) => Err(Error::CudaUnsupported { op: OP }),
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
        Device::Cuda(_) => Err(Error::CudaUnsupported { op: OP }),
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
        Device::Cuda(_) => Err(Error::CudaUnsupported { op: OP }),
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
fn expect_last_dim(op: &'static str, what: &str, t: &Tensor, v: &Tensor) -> Result<()> {
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
