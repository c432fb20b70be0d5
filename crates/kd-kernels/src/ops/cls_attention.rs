//! Attention of one query per example, its first token ([CLS]), over all `L` keys: all that a
//! logits-only last layer needs (kd-model's `Outputs::Logits`), at `1 / L` of the full
//! attention's work and without the other rows' queries. It computes row 0 of
//! [`super::attention`]'s maps: HF's mask (`(1 - mask) * f32::MIN` added to the scaled scores),
//! the softmax, and dropout drawn at the full map's indices `((b * H + h) * L + 0) * L + j`, so
//! its output is the full forward's row 0 (up to the order of the sums) and its backward the
//! full backward with zero gradients on the other rows.
//!
//! CPU only: on a GPU the encoder runs the full attention and gathers the [CLS] rows.
//!
//! Shapes: `q`, `out` `[B, H * Dh]` (the [CLS] rows); `k`, `v` `[B, L, H * Dh]` (heads
//! interleaved, as everywhere); `mask` `[B, L]`; `probs` `[B, H, L]`, the undropped softmax.
use rayon::prelude::*;

use super::attention::{active_dropout, dot, scale_by_keep, softmax_in_place, AttentionDropout};
use crate::{common_device, expect_shape, Device, Error, Result, Tensor};

/// The sizes of one call, read from `probs` `[B, H, L]` and `q` `[B, H * Dh]`.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    heads: usize,
    l: usize,
    dh: usize,
}

impl Dims {
    fn of(op: &'static str, q: &Tensor, k: &Tensor, v: &Tensor, probs: &Tensor) -> Result<Dims> {
        let [b, heads, l] = *probs.shape() else {
            return Err(Error::shape(op, format!("probs is {:?}, expected [B, H, L]", probs.shape())));
        };
        let d = q.last_dim();
        if heads == 0 || !d.is_multiple_of(heads) {
            return Err(Error::shape(op, format!("{d} query features do not split into {heads} heads")));
        }
        expect_shape(op, "q", q, &[b, d])?;
        expect_shape(op, "k", k, &[b, l, d])?;
        expect_shape(op, "v", v, &[b, l, d])?;
        Ok(Dims { b, heads, l, dh: d / heads })
    }

    fn d(&self) -> usize {
        self.heads * self.dh
    }

    /// Head `h` of key (or value) row `j` of example `b`.
    fn key<'a>(&self, t: &'a [f32], b: usize, j: usize, h: usize) -> &'a [f32] {
        &t[(b * self.l + j) * self.d() + h * self.dh..][..self.dh]
    }

    /// The flat index in the full `[B, H, L, L]` map of row 0 of head `(b, h)`: its dropout counter.
    fn map_row(&self, b: usize, h: usize) -> usize {
        (b * self.heads + h) * self.l * self.l
    }
}

/// Whether this op runs on `device`: the CPU only (on a GPU, `attention_forward` and a gather).
pub fn cls_attention_runs_on(device: &Device) -> bool {
    matches!(device, Device::Cpu)
}

fn cpu_only(op: &'static str, device: Device) -> Result<()> {
    if !cls_attention_runs_on(&device) {
        return Err(Error::invalid(op, "runs on the CPU only (on a GPU, attention_forward and a gather)"));
    }
    Ok(())
}

/// Forward: `out` and `probs` are overwritten.
pub fn cls_attention_forward(
    out: &mut Tensor,
    probs: &mut Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    dropout: Option<AttentionDropout>,
) -> Result<()> {
    const OP: &str = "cls_attention_forward";
    let dropout = active_dropout(OP, dropout)?;
    let dims = Dims::of(OP, q, k, v, probs)?;
    expect_shape(OP, "out", out, q.shape())?;
    expect_shape(OP, "mask", mask, &[dims.b, dims.l])?;
    cpu_only(OP, common_device(OP, &[&*out, &*probs, q, k, v, mask])?)?;
    let Dims { heads, l, dh, .. } = dims;
    let (q, k, v, mask) = (q.cpu()?, k.cpu()?, v.cpu()?, mask.cpu()?);
    let scale = 1.0 / (dh as f32).sqrt();
    let rows = out.cpu_mut()?.par_chunks_mut(dims.d()).zip(probs.cpu_mut()?.par_chunks_mut(heads * l));
    rows.enumerate().for_each_init(
        || vec![0.0f32; l],
        |weights, (b, (out, probs))| {
            let mask = &mask[b * l..][..l];
            for (h, (out, p)) in out.chunks_exact_mut(dh).zip(probs.chunks_exact_mut(l)).enumerate() {
                let qh = &q[b * dims.d() + h * dh..][..dh];
                for (j, (p, &m)) in p.iter_mut().zip(mask).enumerate() {
                    *p = dot(qh, dims.key(k, b, j, h)) * scale + (1.0 - m) * f32::MIN;
                }
                softmax_in_place(p);
                weights.copy_from_slice(p);
                scale_by_keep(weights, dropout, dims.map_row(b, h));
                out.fill(0.0);
                for (j, &w) in weights.iter().enumerate() {
                    out.iter_mut().zip(dims.key(v, b, j, h)).for_each(|(o, &vj)| *o += w * vj);
                }
            }
        },
    );
    Ok(())
}

/// Backward with the forward's `dropout`: `dq` `[B, H * Dh]`, `dk` and `dv` `[B, L, H * Dh]`
/// accumulate, from `dout` `[B, H * Dh]` and the forward's `probs`.
#[allow(clippy::too_many_arguments)]
pub fn cls_attention_backward(
    dq: &mut Tensor,
    dk: &mut Tensor,
    dv: &mut Tensor,
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probs: &Tensor,
    dropout: Option<AttentionDropout>,
) -> Result<()> {
    const OP: &str = "cls_attention_backward";
    let dropout = active_dropout(OP, dropout)?;
    let dims = Dims::of(OP, q, k, v, probs)?;
    for (what, t) in [("dq", &*dq), ("dout", dout)] {
        expect_shape(OP, what, t, q.shape())?;
    }
    for (what, t) in [("dk", &*dk), ("dv", &*dv)] {
        expect_shape(OP, what, t, k.shape())?;
    }
    cpu_only(OP, common_device(OP, &[&*dq, &*dk, &*dv, dout, q, k, v, probs])?)?;
    let Dims { heads, l, dh, .. } = dims;
    let (dout, q, k, v, probs) = (dout.cpu()?, q.cpu()?, k.cpu()?, v.cpu()?, probs.cpu()?);
    let (d, scale) = (dims.d(), 1.0 / (dh as f32).sqrt());
    // Each example's task owns its dq row and its L rows of dk and dv.
    let examples = dq
        .cpu_mut()?
        .par_chunks_mut(d)
        .zip(dk.cpu_mut()?.par_chunks_mut(l * d))
        .zip(dv.cpu_mut()?.par_chunks_mut(l * d));
    examples.enumerate().for_each_init(
        || (vec![0.0f32; l], vec![0.0f32; l]),
        |(keep, ds), (b, ((dq, dk), dv))| {
            for h in 0..heads {
                let p = &probs[(b * heads + h) * l..][..l];
                let (qh, doh) = (&q[b * d + h * dh..][..dh], &dout[b * d + h * dh..][..dh]);
                keep.fill(1.0);
                scale_by_keep(keep, dropout, dims.map_row(b, h));
                // dv_j += dropped(p)_j * dout; d(probs)_j = keep_j * (dout . v_j)
                for j in 0..l {
                    let dv_j = &mut dv[j * d + h * dh..][..dh];
                    let w = p[j] * keep[j];
                    dv_j.iter_mut().zip(doh).for_each(|(dv, &g)| *dv += w * g);
                    ds[j] = dot(doh, dims.key(v, b, j, h)) * keep[j];
                }
                let rowdot = dot(p, ds);
                ds.iter_mut().zip(p).for_each(|(ds, &pj)| *ds = pj * (*ds - rowdot));
                let dq_h = &mut dq[h * dh..][..dh];
                for (j, &s) in ds.iter().enumerate() {
                    let kj = dims.key(k, b, j, h);
                    dq_h.iter_mut().zip(kj).for_each(|(dq, &kv)| *dq += scale * s * kv);
                    let dk_j = &mut dk[j * d + h * dh..][..dh];
                    dk_j.iter_mut().zip(qh).for_each(|(dk, &qv)| *dk += scale * s * qv);
                }
            }
        },
    );
    Ok(())
}
