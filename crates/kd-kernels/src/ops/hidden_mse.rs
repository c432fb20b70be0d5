//! Masked hidden-state MSE between student and teacher layers (TinyBERT, MiniLM-style
//! intermediate-layer distillation), several layer pairs in one call so a method issues one op
//! per step however many layers it maps.
use rayon::prelude::*;

use super::opt_rows_mut;
use crate::{common_device, expect_shape, Device, Error, Result, Tensor};

/// `losses` `[P]` is overwritten: for pair p, the sum over real tokens (mask 1) and hidden dims
/// of `(s - t)^2`, divided by `n_real * D`. `dstudents[p]` += `grad_scale * 2 (s - t) / (n_real * D)`
/// at real tokens; pass an empty slice for the forward only. Every student and teacher is
/// `[N, D]` with one D, `token_mask` is `[N]` of 0.0 and 1.0. With no real token the losses are 0.
pub fn hidden_mse(
    losses: &mut Tensor,
    dstudents: &mut [&mut Tensor],
    students: &[&Tensor],
    teachers: &[&Tensor],
    token_mask: &Tensor,
    grad_scale: f32,
) -> Result<()> {
    const OP: &str = "hidden_mse";
    let pairs = students.len();
    if teachers.len() != pairs || !(dstudents.is_empty() || dstudents.len() == pairs) {
        let detail = format!("{pairs} students, {} teachers, {} dstudents", teachers.len(), dstudents.len());
        return Err(Error::shape(OP, detail));
    }
    expect_shape(OP, "losses", losses, &[pairs])?;
    let [n] = *token_mask.shape() else {
        return Err(Error::shape(OP, format!("token_mask is {:?}, expected [N]", token_mask.shape())));
    };
    if !grad_scale.is_finite() {
        return Err(Error::invalid(OP, format!("grad_scale {grad_scale} is not finite")));
    }
    let d = match students.first() {
        Some(s) => match *s.shape() {
            [sn, d] if sn == n => d,
            _ => return Err(Error::shape(OP, format!("students[0] is {:?}, expected [{n}, D]", s.shape()))),
        },
        None => 0,
    };
    for (p, s) in students.iter().enumerate() {
        expect_shape(OP, &format!("students[{p}]"), s, &[n, d])?;
        expect_shape(OP, &format!("teachers[{p}]"), teachers[p], &[n, d])?;
    }
    for (p, g) in dstudents.iter().enumerate() {
        expect_shape(OP, &format!("dstudents[{p}]"), g, &[n, d])?;
    }
    let mut tensors: Vec<&Tensor> = vec![&*losses, token_mask];
    tensors.extend(students.iter().chain(teachers));
    tensors.extend(dstudents.iter().map(|g| &**g));
    match common_device(OP, &tensors)? {
        Device::Cpu => {
            let mask = token_mask.cpu()?;
            if let Some(i) = mask.iter().position(|&m| m != 0.0 && m != 1.0) {
                return Err(Error::invalid(OP, format!("token_mask[{i}] is {}, expected 0 or 1", mask[i])));
            }
            let losses = losses.cpu_mut()?;
            let mut grads = dstudents.iter_mut().map(|g| g.cpu_mut().map(Some)).collect::<Result<Vec<_>>>()?;
            grads.resize_with(pairs, || None);
            for (p, grad) in grads.into_iter().enumerate() {
                losses[p] = pair_mse_cpu(grad, students[p].cpu()?, teachers[p].cpu()?, mask, d, grad_scale);
            }
            Ok(())
        }
        Device::Cuda(_) => Err(Error::CudaUnsupported { op: OP }),
    }
}

/// One pair's loss, adding its gradient to `ds` when given.
fn pair_mse_cpu(ds: Option<&mut [f32]>, s: &[f32], t: &[f32], mask: &[f32], d: usize, grad_scale: f32) -> f32 {
    let real = mask.iter().filter(|&&m| m == 1.0).count();
    if real == 0 || d == 0 {
        return 0.0;
    }
    let norm = 1.0 / (real * d) as f32;
    let grad_coef = grad_scale * 2.0 * norm;
    let total: f64 = s
        .par_chunks(d)
        .zip(t.par_chunks(d))
        .zip(mask.par_iter())
        .zip(opt_rows_mut(ds, d, mask.len()))
        .filter(|(((_, _), &m), _)| m == 1.0)
        .map(|(((s, t), _), ds)| {
            let mut sum = 0.0f32;
            match ds {
                Some(ds) => s.iter().zip(t).zip(ds).for_each(|((s, t), g)| {
                    sum += (s - t) * (s - t);
                    *g += grad_coef * (s - t);
                }),
                None => sum = s.iter().zip(t).map(|(s, t)| (s - t) * (s - t)).sum(),
            }
            f64::from(sum)
        })
        .sum();
    (total * f64::from(norm)) as f32
}
