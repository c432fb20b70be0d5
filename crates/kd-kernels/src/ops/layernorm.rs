//! LayerNorm over the last axis, as HF/PyTorch define it: biased variance, `eps` inside the
//! square root. The forward saves each row's mean and reciprocal standard deviation for the
//! backward.
use rayon::prelude::*;

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
        Device::Cuda(_) => Err(Error::CudaUnsupported { op: OP }),
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
        Device::Cuda(_) => Err(Error::CudaUnsupported { op: OP }),
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
    out.par_chunks_mut(d).zip(mean.par_iter_mut()).zip(rstd.par_iter_mut()).zip(x.par_chunks(d)).for_each(
        |(((out, mean), rstd), x)| {
            let m = x.iter().sum::<f32>() / d as f32;
            let var = x.iter().map(|&v| (v - m) * (v - m)).sum::<f32>() / d as f32;
            let s = 1.0 / (var + eps).sqrt();
            for (((o, &v), &g), &b) in out.iter_mut().zip(x).zip(gamma).zip(beta) {
                *o = (v - m) * s * g + b;
            }
            *mean = m;
            *rstd = s;
        },
    );
}

/// `dx += rstd * (g - mean(g) - xhat * mean(g * xhat))` per row, with `g = dout * gamma`.
fn layernorm_dx_cpu(dx: &mut [f32], dout: &[f32], x: &[f32], mean: &[f32], rstd: &[f32], gamma: &[f32]) {
    let d = gamma.len();
    dx.par_chunks_mut(d).zip(dout.par_chunks(d)).zip(x.par_chunks(d)).zip(mean.par_iter().zip(rstd)).for_each(
        |(((dx, dout), x), (&m, &s))| {
            let (mut g_sum, mut gx_sum) = (0f32, 0f32);
            for ((&dy, &v), &gm) in dout.iter().zip(x).zip(gamma) {
                let g = dy * gm;
                g_sum += g;
                gx_sum += g * (v - m) * s;
            }
            let (g_mean, gx_mean) = (g_sum / d as f32, gx_sum / d as f32);
            for (((dx, &dy), &v), &gm) in dx.iter_mut().zip(dout).zip(x).zip(gamma) {
                *dx += s * (dy * gm - g_mean - (v - m) * s * gx_mean);
            }
        },
    );
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
