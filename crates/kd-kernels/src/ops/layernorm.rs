//! LayerNorm over the last axis, as HF/PyTorch define it: biased variance, `eps` inside the
//! square root. The forward saves each row's mean and reciprocal standard deviation for the
//! backward.
use cudarc::driver::PushKernelArg;
use rayon::prelude::*;

use crate::cuda::{self, Module};
use crate::device::CudaDevice;
use crate::ops::bias::ColumnSums;
use crate::simd::{sum_lanes, with_avx2};
use crate::tensor::cuda_err;
use crate::{common_device, expect_shape, Device, Error, Result, Tensor};

/// Columns per task in the dgamma/dbeta reduction; stack accumulators of this width vectorise.
const COLS: usize = 64;

/// `out = (x - mean) * rstd * gamma + beta` row by row, for `x` `[.., D]`; writes each row's
/// `mean` and `rstd = 1 / sqrt(var + eps)` (`numel` = number of rows).
pub fn layernorm_forward(
    out: &mut Tensor,
    mean: &mut Tensor,
    rstd: &mut Tensor,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<()> {
    const OP: &str = "layernorm_forward";
    check_shapes(OP, x, mean, rstd, gamma)?;
    expect_shape(OP, "out", out, x.shape())?;
    expect_shape(OP, "beta", beta, gamma.shape())?;
    if !(eps >= 0.0 && eps.is_finite()) {
        return Err(Error::invalid(OP, format!("eps = {eps}, expected a finite value >= 0")));
    }
    match common_device(OP, &[out, mean, rstd, x, gamma, beta])? {
        Device::Cpu => {
            let (x, gamma, beta) = (x.cpu()?, gamma.cpu()?, beta.cpu()?);
            layernorm_forward_cpu(out.cpu_mut()?, mean.cpu_mut()?, rstd.cpu_mut()?, x, gamma, beta, eps);
            Ok(())
        }
        Device::Cuda(dev) => layernorm_forward_cuda(&dev, out, mean, rstd, x, gamma, beta, eps),
    }
}

/// Backward of [`layernorm_forward`], accumulating into `dx`, `dgamma` and `dbeta`, from the
/// `mean` and `rstd` the forward saved.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dx: &mut Tensor,
    dgamma: &mut Tensor,
    dbeta: &mut Tensor,
    dout: &Tensor,
    x: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    gamma: &Tensor,
) -> Result<()> {
    const OP: &str = "layernorm_backward";
    check_shapes(OP, x, mean, rstd, gamma)?;
    expect_shape(OP, "dx", dx, x.shape())?;
    expect_shape(OP, "dout", dout, x.shape())?;
    expect_shape(OP, "dgamma", dgamma, gamma.shape())?;
    expect_shape(OP, "dbeta", dbeta, gamma.shape())?;
    match common_device(OP, &[dx, dgamma, dbeta, dout, x, mean, rstd, gamma])? {
        Device::Cpu => {
            let (dout, x, mean, rstd) = (dout.cpu()?, x.cpu()?, mean.cpu()?, rstd.cpu()?);
            layernorm_dx_cpu(dx.cpu_mut()?, dout, x, mean, rstd, gamma.cpu()?);
            layernorm_dparams_cpu(dgamma.cpu_mut()?, dbeta.cpu_mut()?, dout, x, mean, rstd);
            Ok(())
        }
        Device::Cuda(dev) => {
            layernorm_dx_cuda(&dev, dx, dout, x, mean, rstd, gamma)?;
            layernorm_dparams_cuda(&dev, dgamma, dbeta, dout, x, mean, rstd)
        }
    }
}

/// Shapes shared by forward and backward: `x` `[.., D]`, `gamma` `[D]`, one mean and rstd per row.
fn check_shapes(op: &'static str, x: &Tensor, mean: &Tensor, rstd: &Tensor, gamma: &Tensor) -> Result<()> {
    if gamma.shape().len() != 1 || x.shape().is_empty() || x.last_dim() != gamma.numel() || gamma.numel() == 0 {
        return Err(Error::shape(
            op,
            format!("x is {:?}, gamma is {:?}: expected [.., D] and [D], D > 0", x.shape(), gamma.shape()),
        ));
    }
    for (what, t) in [("mean", mean), ("rstd", rstd)] {
        if t.numel() != x.rows() {
            return Err(Error::shape(
                op,
                format!("{what} is {:?}, expected {} values (one per row of x)", t.shape(), x.rows()),
            ));
        }
    }
    Ok(())
}

/// Rows per rayon task on the CPU: one row of a few hundred floats is too little to hand out.
const ROWS_PER_TASK: usize = 16;

fn layernorm_forward_cpu(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) {
    let d = gamma.len();
    let rows = out.par_chunks_mut(d).zip(mean.par_iter_mut()).zip(rstd.par_iter_mut()).zip(x.par_chunks(d));
    rows.with_min_len(ROWS_PER_TASK).for_each(|(((out, mean), rstd), x)| {
        (*mean, *rstd) = layernorm_row(out, x, gamma, beta, eps);
    });
}

/// One row of [`layernorm_forward_cpu`]; returns its (mean, rstd).
fn layernorm_row(out: &mut [f32], x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) -> (f32, f32) {
    with_avx2!(-> (f32, f32); out: &mut [f32], x: &[f32], gamma: &[f32], beta: &[f32], eps: f32 => {
        let d = x.len() as f32;
        let m = sum_lanes(x, |_, v| v) / d;
        let var = sum_lanes(x, |_, v| (v - m) * (v - m)) / d;
        let s = 1.0 / (var + eps).sqrt();
        for (((o, &v), &g), &b) in out.iter_mut().zip(x).zip(gamma).zip(beta) {
            *o = (v - m) * s * g + b;
        }
        (m, s)
    })
}

/// `dx += rstd * (g - mean(g) - xhat * mean(g * xhat))` per row, with `g = dout * gamma`.
fn layernorm_dx_cpu(dx: &mut [f32], dout: &[f32], x: &[f32], mean: &[f32], rstd: &[f32], gamma: &[f32]) {
    let d = gamma.len();
    let rows = dx.par_chunks_mut(d).zip(dout.par_chunks(d)).zip(x.par_chunks(d)).zip(mean.par_iter().zip(rstd));
    rows.with_min_len(ROWS_PER_TASK).for_each(|(((dx, dout), x), (&m, &s))| layernorm_dx_row(dx, dout, x, m, s, gamma));
}

/// One row of [`layernorm_dx_cpu`].
fn layernorm_dx_row(dx: &mut [f32], dout: &[f32], x: &[f32], m: f32, s: f32, gamma: &[f32]) {
    with_avx2!(dx: &mut [f32], dout: &[f32], x: &[f32], m: f32, s: f32, gamma: &[f32] => {
        let d = x.len() as f32;
        let g_mean = sum_lanes(dout, |i, dy| dy * gamma[i]) / d;
        let gx_mean = sum_lanes(dout, |i, dy| dy * gamma[i] * (x[i] - m) * s) / d;
        for (((dx, &dy), &v), &gm) in dx.iter_mut().zip(dout).zip(x).zip(gamma) {
            *dx += s * (dy * gm - g_mean - (v - m) * s * gx_mean);
        }
    })
}

/// `dgamma += sum_rows(dout * xhat)`, `dbeta += sum_rows(dout)`: each task owns a block of
/// columns and sums it in row order, so the result does not depend on the thread count.
fn layernorm_dparams_cpu(dgamma: &mut [f32], dbeta: &mut [f32], dout: &[f32], x: &[f32], mean: &[f32], rstd: &[f32]) {
    let d = dgamma.len();
    dgamma.par_chunks_mut(COLS).zip(dbeta.par_chunks_mut(COLS)).enumerate().for_each(|(c, (dg, db))| {
        let cols = c * COLS..c * COLS + dg.len();
        let (mut g_acc, mut b_acc) = ([0f32; COLS], [0f32; COLS]);
        for (r, (dout, x)) in dout.chunks_exact(d).zip(x.chunks_exact(d)).enumerate() {
            let (m, s) = (mean[r], rstd[r]);
            let cols = dout[cols.clone()].iter().zip(&x[cols.clone()]);
            for ((ga, ba), (&dy, &v)) in g_acc.iter_mut().zip(b_acc.iter_mut()).zip(cols) {
                *ga += dy * (v - m) * s;
                *ba += dy;
            }
        }
        dg.iter_mut().zip(g_acc).for_each(|(d, a)| *d += a);
        db.iter_mut().zip(b_acc).for_each(|(d, a)| *d += a);
    });
}

/// `kernels/layernorm.cu`: a team of threads per row (`group` lanes of a warp for rows up to
/// `MAX_WARP_ROW`, else a block), reducing the row's sums in a fixed tree.
#[allow(clippy::too_many_arguments)]
fn layernorm_forward_cuda(
    dev: &CudaDevice,
    out: &mut Tensor,
    mean: &mut Tensor,
    rstd: &mut Tensor,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<()> {
    const OP: &str = "layernorm_forward";
    let (rows, d) = (x.rows(), gamma.numel());
    if rows == 0 {
        return Ok(());
    }
    let (rows_i, d_i) = (cuda::int(OP, "rows", rows)?, cuda::int(OP, "D", d)?);
    let (cfg, group) = cuda::row_launch(rows, d);
    let name = if group.is_some() { "layernorm_forward_f32_warp" } else { "layernorm_forward_f32_block" };
    let f = dev.function(Module::LayerNorm, name)?;
    let mut args = dev.stream.launch_builder(&f);
    args.arg(cuda::slice_mut(out)?).arg(cuda::slice_mut(mean)?).arg(cuda::slice_mut(rstd)?);
    args.arg(cuda::slice(x)?).arg(cuda::slice(gamma)?).arg(cuda::slice(beta)?);
    args.arg(&rows_i).arg(&d_i).arg(&eps);
    if let Some(group) = &group {
        args.arg(group);
    }
    // SAFETY: LN_FORWARD_PARAMS, then `group` for the warp kernel; layernorm_forward checked
    // that out and x hold rows * D floats, mean and rstd rows, gamma and beta D.
    unsafe { args.launch(cfg) }.map_err(cuda_err)?;
    Ok(())
}

/// `kernels/layernorm.cu`: dx with the forward's launch shape.
fn layernorm_dx_cuda(
    dev: &CudaDevice,
    dx: &mut Tensor,
    dout: &Tensor,
    x: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    gamma: &Tensor,
) -> Result<()> {
    const OP: &str = "layernorm_backward";
    let (rows, d) = (x.rows(), gamma.numel());
    if rows == 0 {
        return Ok(());
    }
    let (rows_i, d_i) = (cuda::int(OP, "rows", rows)?, cuda::int(OP, "D", d)?);
    let (cfg, group) = cuda::row_launch(rows, d);
    let name = if group.is_some() { "layernorm_dx_f32_warp" } else { "layernorm_dx_f32_block" };
    let f = dev.function(Module::LayerNorm, name)?;
    let mut args = dev.stream.launch_builder(&f);
    args.arg(cuda::slice_mut(dx)?).arg(cuda::slice(dout)?).arg(cuda::slice(x)?);
    args.arg(cuda::slice(mean)?).arg(cuda::slice(rstd)?).arg(cuda::slice(gamma)?);
    args.arg(&rows_i).arg(&d_i);
    if let Some(group) = &group {
        args.arg(group);
    }
    // SAFETY: LN_DX_PARAMS, then `group` for the warp kernel; layernorm_backward checked that
    // dx, dout and x hold rows * D floats, mean and rstd rows, gamma D.
    unsafe { args.launch(cfg) }.map_err(cuda_err)?;
    Ok(())
}

/// `kernels/layernorm.cu`: dgamma and dbeta as deterministic column sums ([`ColumnSums`]),
/// both sums' partials in one scratch buffer.
fn layernorm_dparams_cuda(
    dev: &CudaDevice,
    dgamma: &mut Tensor,
    dbeta: &mut Tensor,
    dout: &Tensor,
    x: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
) -> Result<()> {
    const OP: &str = "layernorm_backward";
    let (rows, d) = (x.rows(), dgamma.numel());
    if rows == 0 {
        return Ok(());
    }
    let sums = ColumnSums::new(OP, rows, d)?;
    let partials = dev.function(Module::LayerNorm, "layernorm_dparams_partials_f32")?;
    let finalize = dev.function(Module::LayerNorm, "layernorm_dparams_finalize_f32")?;
    dev.with_scratch(2 * sums.scratch_len(), |scratch| {
        {
            let mut args = dev.stream.launch_builder(&partials);
            args.arg(cuda::slice(dout)?).arg(cuda::slice(x)?).arg(cuda::slice(mean)?).arg(cuda::slice(rstd)?);
            args.arg(&sums.rows).arg(&sums.d).arg(&sums.rows_per_chunk).arg(&mut *scratch);
            // SAFETY: layernorm_dparams_partials_f32(dout, x [rows, d], mean, rstd [rows], rows,
            // d, rows_per_chunk, partials [2, chunks, d]); the scratch holds 2 * chunks * d.
            unsafe { args.launch(sums.partials_launch()) }.map_err(cuda_err)?;
        }
        let mut args = dev.stream.launch_builder(&finalize);
        args.arg(&*scratch).arg(&sums.chunks).arg(&sums.d);
        args.arg(cuda::slice_mut(dgamma)?).arg(cuda::slice_mut(dbeta)?);
        // SAFETY: layernorm_dparams_finalize_f32(partials [2, chunks, d], chunks, d, dgamma [d],
        // dbeta [d]).
        unsafe { args.launch(cuda::elementwise_launch(d)) }.map_err(cuda_err)?;
        Ok(())
    })
}
