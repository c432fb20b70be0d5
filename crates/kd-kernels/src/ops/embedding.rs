//! Embedding lookups: by id (a table row per token) and by a dense distribution over the
//! vocabulary ("soft one-hot" rows, as MATE-KD's generator feeds the student), which is the
//! product `probs . table`.
use cudarc::driver::{LaunchConfig, PushKernelArg};
use rayon::prelude::*;

use crate::cuda::{self, Module};
use crate::ops::bias::{expect_rows, lead_rows};
use crate::ops::gemm::{all_threads, gemm_cpu, gemm_cuda, GemmDims, GpuOperand, Mat};
use crate::tensor::cuda_err;
use crate::{common_device, expect_shape, Device, Error, IdTensor, Result, Tensor};

/// `out[i, :] = table[ids[i], :]`, or `+=` when `accumulate` (BERT sums the word, position and
/// token-type embeddings into one buffer). `out` holds one row of D per id, in any leading shape;
/// `table` is read as rows of its last dimension (a `[B, L, D]` activation serves as `[N, D]`).
/// An id >= V is an error (on a GPU, where finding it would need a synchronising copy, its row
/// of `out` becomes NaN).
pub fn embedding_forward(out: &mut Tensor, ids: &IdTensor, table: &Tensor, accumulate: bool) -> Result<()> {
    const OP: &str = "embedding_forward";
    let d = check_ids(OP, "out", out, ids, table)?;
    match ids_device(OP, ids, common_device(OP, &[out, table])?)? {
        Device::Cpu => {
            check_range(OP, ids.cpu()?, lead_rows(table))?;
            let (ids, table) = (ids.cpu()?, table.cpu()?);
            if d > 0 {
                out.cpu_mut()?.par_chunks_mut(d).zip(ids.par_iter()).for_each(|(row, &id)| {
                    let src = &table[id as usize * d..][..d];
                    if accumulate {
                        row.iter_mut().zip(src).for_each(|(o, &t)| *o += t);
                    } else {
                        row.copy_from_slice(src);
                    }
                });
            }
            Ok(())
        }
        Device::Cuda(dev) => {
            let Some((sizes, cfg)) = launch_sizes(OP, ids.numel(), d, lead_rows(table))? else { return Ok(()) };
            let accumulate = i32::from(accumulate);
            let f = dev.function(Module::Embedding, "embedding_forward_f32")?;
            let mut b = dev.stream.launch_builder(&f);
            b.arg(cuda::slice_mut(out)?).arg(cuda::id_slice(ids)?).arg(cuda::slice(table)?);
            b.arg(&sizes[0]).arg(&sizes[1]).arg(&sizes[2]).arg(&accumulate);
            // SAFETY: embedding_forward_f32(out, ids, table, n, d, vocab, accumulate); check_ids
            // checked that `out` holds n x d floats and the table vocab x d.
            unsafe { b.launch(cfg) }.map_err(cuda_err)?;
            Ok(())
        }
    }
}

/// Backward of [`embedding_forward`]: `dtable[ids[i], :] += dout[i, :]`. Each CPU task owns a
/// block of table rows and adds its ids' gradients in position order: no races, and the same
/// sums whatever the thread count. The GPU adds atomically, so where an id repeats, the order of
/// its additions (and the last bits of the sum) varies from run to run. An id >= V is an error
/// (on a GPU it adds nothing).
pub fn embedding_backward(dtable: &mut Tensor, dout: &Tensor, ids: &IdTensor) -> Result<()> {
    const OP: &str = "embedding_backward";
    let d = check_ids(OP, "dout", dout, ids, dtable)?;
    match ids_device(OP, ids, common_device(OP, &[dtable, dout])?)? {
        Device::Cpu => {
            let (ids, dout) = (ids.cpu()?, dout.cpu()?);
            let vocab = lead_rows(dtable);
            check_range(OP, ids, vocab)?;
            if d > 0 && vocab > 0 {
                let rows_per_task = vocab.div_ceil(4 * rayon::current_num_threads());
                dtable.cpu_mut()?.par_chunks_mut(rows_per_task * d).enumerate().for_each(|(t, block)| {
                    let first = t * rows_per_task;
                    let owned = first..first + block.len() / d;
                    for (&id, g) in ids.iter().zip(dout.chunks_exact(d)) {
                        if owned.contains(&(id as usize)) {
                            let row = &mut block[(id as usize - first) * d..][..d];
                            row.iter_mut().zip(g).for_each(|(r, &g)| *r += g);
                        }
                    }
                });
            }
            Ok(())
        }
        Device::Cuda(dev) => {
            let Some((sizes, cfg)) = launch_sizes(OP, ids.numel(), d, lead_rows(dtable))? else { return Ok(()) };
            let f = dev.function(Module::Embedding, "embedding_backward_f32")?;
            let mut b = dev.stream.launch_builder(&f);
            b.arg(cuda::slice_mut(dtable)?).arg(cuda::slice(dout)?).arg(cuda::id_slice(ids)?);
            b.arg(&sizes[0]).arg(&sizes[1]).arg(&sizes[2]);
            // SAFETY: embedding_backward_f32(dtable, dout, ids, n, d, vocab); check_ids checked
            // that `dout` holds n x d floats and `dtable` vocab x d.
            unsafe { b.launch(cfg) }.map_err(cuda_err)?;
            Ok(())
        }
    }
}

/// `[n, d, vocab]` as the kernels of `kernels/embedding.cu` take them, and their launch (one
/// thread per element of the n rows of d), or None when there is nothing to do.
fn launch_sizes(op: &'static str, n: usize, d: usize, vocab: usize) -> Result<Option<([i32; 3], LaunchConfig)>> {
    if n * d == 0 {
        return Ok(None);
    }
    cuda::int(op, "N x D", n * d)?;
    let sizes = [cuda::int(op, "N", n)?, cuda::int(op, "D", d)?, cuda::int(op, "V", vocab)?];
    Ok(Some((sizes, cuda::elementwise_launch(n * d))))
}

/// `out = probs . table` (or `+=` when `accumulate`): `probs` `[.., V]` holds one distribution
/// over the vocabulary per token, `table` is `[V, D]`, `out` one row of D per token.
pub fn soft_embedding_forward(out: &mut Tensor, probs: &Tensor, table: &Tensor, accumulate: bool) -> Result<()> {
    const OP: &str = "soft_embedding_forward";
    let (v, d) = check_soft(OP, "out", out, probs, table)?;
    match common_device(OP, &[out, probs, table])? {
        Device::Cpu => {
            let probs = Mat::new(probs.cpu()?, lead_rows(probs), v, false);
            let table = Mat::new(table.cpu()?, v, d, false);
            gemm_cpu(out.cpu_mut()?, probs, table, 1.0, if accumulate { 1.0 } else { 0.0 }, all_threads());
            Ok(())
        }
        Device::Cuda(dev) => {
            let dims = GemmDims { batch: 1, m: lead_rows(probs), n: d, k: v };
            let beta = if accumulate { 1.0 } else { 0.0 };
            gemm_cuda(&dev, out, (probs, GpuOperand::plain(v)), (table, GpuOperand::plain(d)), dims, 1.0, beta)
        }
    }
}

/// Backward of [`soft_embedding_forward`], accumulating: `dprobs += dout . table^T` (skipped when
/// `None`), `dtable += probs^T . dout`.
pub fn soft_embedding_backward(
    dprobs: Option<&mut Tensor>,
    dtable: &mut Tensor,
    dout: &Tensor,
    probs: &Tensor,
    table: &Tensor,
) -> Result<()> {
    const OP: &str = "soft_embedding_backward";
    let (v, d) = check_soft(OP, "dout", dout, probs, table)?;
    expect_shape(OP, "dtable", dtable, table.shape())?;
    if let Some(dp) = &dprobs {
        expect_rows(OP, "dprobs", dp, lead_rows(probs), v)?;
    }
    let mut all = vec![&*dtable, dout, probs, table];
    all.extend(dprobs.as_deref());
    match common_device(OP, &all)? {
        Device::Cpu => {
            let n = lead_rows(probs);
            let dout_mat = Mat::new(dout.cpu()?, n, d, false);
            if let Some(dp) = dprobs {
                gemm_cpu(dp.cpu_mut()?, dout_mat, Mat::new(table.cpu()?, v, d, true), 1.0, 1.0, all_threads());
            }
            let probs_t = Mat::new(probs.cpu()?, n, v, true);
            gemm_cpu(dtable.cpu_mut()?, probs_t, dout_mat, 1.0, 1.0, all_threads());
            Ok(())
        }
        Device::Cuda(dev) => {
            let n = lead_rows(probs);
            if let Some(dp) = dprobs {
                let dims = GemmDims { batch: 1, m: n, n: v, k: d };
                gemm_cuda(&dev, dp, (dout, GpuOperand::plain(d)), (table, GpuOperand::transposed(d)), dims, 1.0, 1.0)?;
            }
            let dims = GemmDims { batch: 1, m: v, n: d, k: n };
            gemm_cuda(&dev, dtable, (probs, GpuOperand::transposed(v)), (dout, GpuOperand::plain(d)), dims, 1.0, 1.0)
        }
    }
}

/// Checks `rows` (one row of D per id, any leading shape) against `table` `[V, D]`; returns D.
/// The table may have any leading shape (`[B, L, D]` activations are `[N, D]` tables of rows).
fn check_ids(op: &'static str, what: &str, rows: &Tensor, ids: &IdTensor, table: &Tensor) -> Result<usize> {
    let d = table.last_dim();
    if table.shape().len() < 2 {
        return Err(Error::shape(op, format!("table is {:?}, expected [V, D]", table.shape())));
    }
    expect_rows(op, what, rows, ids.numel(), d)?;
    Ok(d)
}

/// Errors unless `ids` lives on `device`; returns the device.
fn ids_device(op: &'static str, ids: &IdTensor, device: Device) -> Result<Device> {
    if !ids.device().same(&device) {
        return Err(Error::DeviceMismatch { op, a: device.to_string(), b: ids.device().to_string() });
    }
    Ok(device)
}

fn check_range(op: &'static str, ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().position(|&id| id as usize >= vocab) {
        Some(i) => {
            Err(Error::invalid(op, format!("id {} at position {i} is out of range (vocabulary {vocab})", ids[i])))
        }
        None => Ok(()),
    }
}

/// Checks `rows` (one row of D per row of `probs` `[.., V]`) and `table` `[V, D]`; returns (V, D).
fn check_soft(op: &'static str, what: &str, rows: &Tensor, probs: &Tensor, table: &Tensor) -> Result<(usize, usize)> {
    let [v, d] = *table.shape() else {
        return Err(Error::shape(op, format!("table is {:?}, expected [V, D]", table.shape())));
    };
    if probs.shape().is_empty() || probs.last_dim() != v {
        return Err(Error::shape(
            op,
            format!("probs is {:?}, expected [.., {v}] (table is {:?})", probs.shape(), table.shape()),
        ));
    }
    expect_rows(op, what, rows, lead_rows(probs), d)?;
    Ok((v, d))
}
