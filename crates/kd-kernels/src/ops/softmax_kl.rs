//! Fused softmax-KL with temperature: the distillation loss between student and teacher rows of
//! logits, for any row length (2 classes, L attention keys, a 30,522-word vocabulary).
//!
//! Both softmaxes are taken online in one pass over a row (running max and rescaled sums, as in
//! flash attention), then a second pass writes the gradients; on a GPU a row of up to 30,720
//! classes stays on chip between the two, so it is read from memory once. Probabilities are
//! never formed as `log(softmax)`, only through log-sum-exp.
//! Entries that are `f32::MIN` (or `-inf`) in both rows, such as masked attention keys, have zero
//! teacher probability and so contribute 0 to the loss and 0 to both gradients, at any
//! temperature (`f32::MIN / T` overflows to `-inf` when T < 1, which the scan tolerates).
//!
//! The logits may be f32 [`Tensor`]s or [`Bf16Tensor`]s (see [`KlLogits`]): one scan, generic
//! over the element type, widens each value to f32 as it reads it, so the sums, the loss and the
//! gradients are f32 either way. `Bf16Tensor::from_f32` rounds `f32::MIN` to `-inf`, which
//! masks an entry just as well, but a row that is `-inf` throughout has no distribution (NaN):
//! fill a whole bf16 row with `bf16::MIN` instead, which stays finite and gives the uniform row.
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaFunction, CudaSlice, DeviceRepr, PushKernelArg};
use half::bf16;
use rayon::prelude::*;

use super::opt_rows_mut;
use crate::cuda::{self, Module, OptionalArg};
use crate::device::CudaDevice;
use crate::tensor::cuda_err;
use crate::{common_device, expect_shape, Bf16Tensor, Device, Error, Result, Tensor};

/// Which divergence a row's loss is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KlForm {
    /// `sum_c p_t,c (log p_t,c - log p_s,c)`: zero when the rows agree.
    Kl,
    /// `-sum_c p_t,c log p_s,c`, MATE-KD's "CE-form": the KL plus the teacher's entropy, which
    /// changes the teacher gradient (and the loss value) but not the student gradient.
    CrossEntropy,
}

#[derive(Clone, Copy, Debug)]
pub struct SoftmaxKl {
    pub temperature: f32,
    pub form: KlForm,
    /// Multiplies every gradient written (e.g. a loss weight or 1 / accumulation steps); the
    /// loss rows are not scaled by it.
    pub grad_scale: f32,
}

/// The logits [`softmax_kl`] reads: f32 [`Tensor`]s, or [`Bf16Tensor`]s at half the bytes, the
/// student and the teacher of one type.
pub trait KlLogits: sealed::Logits {}

impl KlLogits for Tensor {}
impl KlLogits for Bf16Tensor {}

mod sealed {
    use super::*;

    /// The kernels of `kernels/softmax_kl.cu` for one logits type.
    pub struct Kernels {
        pub warp: &'static str,
        pub block: &'static str,
        pub resident: &'static str,
    }

    /// What softmax_kl reads of a logits tensor; sealed, so that every type has its kernels.
    pub trait Logits: Sync {
        type Elem: Copy + Send + Sync + Into<f32>;
        /// The element as the kernels take it.
        type Raw: DeviceRepr;
        const KERNELS: Kernels;
        fn shape(&self) -> &[usize];
        fn device(&self) -> Device;
        fn host(&self) -> Result<&[Self::Elem]>;
        fn device_slice(&self) -> Result<&CudaSlice<Self::Raw>>;
    }

    impl Logits for Tensor {
        type Elem = f32;
        type Raw = f32;
        const KERNELS: Kernels =
            Kernels { warp: "softmax_kl_f32_warp", block: "softmax_kl_f32_block", resident: "softmax_kl_f32_resident" };
        fn shape(&self) -> &[usize] {
            Tensor::shape(self)
        }
        fn device(&self) -> Device {
            Tensor::device(self)
        }
        fn host(&self) -> Result<&[f32]> {
            self.cpu()
        }
        fn device_slice(&self) -> Result<&CudaSlice<f32>> {
            cuda::slice(self)
        }
    }

    impl Logits for Bf16Tensor {
        type Elem = bf16;
        type Raw = u16;
        const KERNELS: Kernels = Kernels {
            warp: "softmax_kl_bf16_warp",
            block: "softmax_kl_bf16_block",
            resident: "softmax_kl_bf16_resident",
        };
        fn shape(&self) -> &[usize] {
            Bf16Tensor::shape(self)
        }
        fn device(&self) -> Device {
            Bf16Tensor::device(self)
        }
        fn host(&self) -> Result<&[bf16]> {
            self.cpu()
        }
        fn device_slice(&self) -> Result<&CudaSlice<u16>> {
            cuda::bf16_slice(self)
        }
    }
}

/// Per-row loss `w_r * T^2 * D(p_t || p_s)` with `p = softmax(z / T)` over the last axis, `D`
/// given by `spec.form`. `loss_rows` `[R]` is overwritten, R being the number of rows of
/// `student` (any shape `[..., C]`); `dstudent` += `grad_scale * w_r * T * (p_s - p_t)`;
/// `dteacher` += `grad_scale * w_r * T * p_t * (d_c - D)` with `d_c = log p_t,c - log p_s,c`
/// (form Kl) or `d_c = -log p_s,c` (form CrossEntropy). Rows of weight 0 give 0 and no gradient.
/// The logits are f32 or bf16 ([`KlLogits`]); everything else is f32.
pub fn softmax_kl<L: KlLogits>(
    loss_rows: &mut Tensor,
    dstudent: Option<&mut Tensor>,
    dteacher: Option<&mut Tensor>,
    student: &L,
    teacher: &L,
    row_weights: Option<&Tensor>,
    spec: SoftmaxKl,
) -> Result<()> {
    const OP: &str = "softmax_kl";
    let shape = student.shape();
    let c = match shape.last() {
        Some(&c) if c > 0 => c,
        _ => return Err(Error::shape(OP, format!("student is {shape:?}, expected [..., C] with C >= 1"))),
    };
    if !(spec.temperature.is_finite() && spec.temperature > 0.0) {
        return Err(Error::invalid(OP, format!("temperature {} is not a positive number", spec.temperature)));
    }
    if !spec.grad_scale.is_finite() {
        return Err(Error::invalid(OP, format!("grad_scale {} is not finite", spec.grad_scale)));
    }
    let rows = shape.iter().product::<usize>() / c;
    if teacher.shape() != shape {
        return Err(Error::shape(OP, format!("teacher is {:?}, expected {shape:?}", teacher.shape())));
    }
    expect_shape(OP, "loss_rows", loss_rows, &[rows])?;
    let mut tensors = vec![&*loss_rows];
    for (what, g) in [("dstudent", &dstudent), ("dteacher", &dteacher)] {
        if let Some(g) = g {
            expect_shape(OP, what, g, shape)?;
            tensors.push(g);
        }
    }
    if let Some(w) = row_weights {
        expect_shape(OP, "row_weights", w, &[rows])?;
        tensors.push(w);
    }
    let device = common_device(OP, &tensors)?;
    for logits in [student.device(), teacher.device()] {
        if !device.same(&logits) {
            return Err(Error::DeviceMismatch { op: OP, a: device.to_string(), b: logits.to_string() });
        }
    }
    match device {
        Device::Cpu => {
            let ds = dstudent.map(Tensor::cpu_mut).transpose()?;
            let dt = dteacher.map(Tensor::cpu_mut).transpose()?;
            let w = row_weights.map(Tensor::cpu).transpose()?;
            softmax_kl_cpu(loss_rows.cpu_mut()?, ds, dt, student.host()?, teacher.host()?, w, c, spec);
            Ok(())
        }
        Device::Cuda(dev) => {
            softmax_kl_cuda(&dev, loss_rows, dstudent, dteacher, student, teacher, row_weights, c, spec)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn softmax_kl_cpu<E: Copy + Sync + Into<f32>>(
    loss: &mut [f32],
    ds: Option<&mut [f32]>,
    dt: Option<&mut [f32]>,
    zs: &[E],
    zt: &[E],
    w: Option<&[f32]>,
    c: usize,
    spec: SoftmaxKl,
) {
    let rows = loss.len();
    let t = spec.temperature;
    loss.par_iter_mut().zip(opt_rows_mut(ds, c, rows)).zip(opt_rows_mut(dt, c, rows)).enumerate().for_each(
        |(r, ((loss, ds), dt))| {
            let w = w.map_or(1.0, |w| w[r]);
            if w == 0.0 {
                *loss = 0.0;
                return;
            }
            let (zs, zt) = (&zs[r * c..][..c], &zt[r * c..][..c]);
            let row = RowScan::new(zs, zt, 1.0 / t);
            let div = row.divergence(spec.form);
            *loss = w * t * t * div;
            if ds.is_some() || dt.is_some() {
                row.gradients(ds, dt, zs, zt, spec.form, div, spec.grad_scale * w * t);
            }
        },
    );
}

/// `softmax_kl_*_resident`'s shape (`KD_KL_RESIDENT_*` and `KD_KL_SHARED_SLOTS` in
/// `kernels/softmax_kl.cu`): 1,024 threads of 30 slots each hold a row of up to 30,720 classes,
/// 16 of the student's slots and all 30 of the teacher's in shared memory.
const RESIDENT_THREADS: u32 = 1024;
const RESIDENT_MAX_C: usize = 1024 * 30;
const RESIDENT_SHARED_BYTES: usize = (16 + 30) * 1024 * 4;
/// Rows up to this wide take the two-pass block kernel instead: its 4 blocks an SM keep at most
/// 4 * 132 rows in flight on an H100, 35 MB at this width, so its second read mostly hits the
/// 50 MB L2, and a 1,024-thread block would leave most of its slots empty.
const RESIDENT_MIN_C: usize = 8192;

/// `kernels/softmax_kl.cu`: the same scan per row, split over a team of threads (a few lanes of
/// a warp for short rows, a block for vocabulary-wide ones, which holds rows of 8,193 to 30,720
/// classes on chip) whose partial statistics merge exactly; one launch for the loss and both
/// gradients.
#[allow(clippy::too_many_arguments)]
fn softmax_kl_cuda<L: KlLogits>(
    dev: &CudaDevice,
    loss: &mut Tensor,
    ds: Option<&mut Tensor>,
    dt: Option<&mut Tensor>,
    zs: &L,
    zt: &L,
    w: Option<&Tensor>,
    c: usize,
    spec: SoftmaxKl,
) -> Result<()> {
    const OP: &str = "softmax_kl";
    let rows = loss.numel();
    if rows == 0 {
        return Ok(());
    }
    let (rows_i, c_i) = (cuda::int(OP, "rows", rows)?, cuda::int(OP, "C", c)?);
    let form: i32 = match spec.form {
        KlForm::Kl => 0,
        KlForm::CrossEntropy => 1,
    };
    let inv_t = 1.0 / spec.temperature;
    let (mut cfg, group) = cuda::row_launch(rows, c);
    let resident = match group {
        None if (RESIDENT_MIN_C + 1..=RESIDENT_MAX_C).contains(&c) => {
            let f = dev.function(Module::SoftmaxKl, L::KERNELS.resident)?;
            allow_resident(dev, &f)?.then_some(f)
        }
        _ => None,
    };
    let f = match (resident, &group) {
        (Some(f), _) => {
            cfg.block_dim = (RESIDENT_THREADS, 1, 1);
            cfg.shared_mem_bytes = RESIDENT_SHARED_BYTES as u32;
            f
        }
        (None, Some(_)) => dev.function(Module::SoftmaxKl, L::KERNELS.warp)?,
        (None, None) => dev.function(Module::SoftmaxKl, L::KERNELS.block)?,
    };
    let (ds, dt) = (ds.map(cuda::slice_mut).transpose()?, dt.map(cuda::slice_mut).transpose()?);
    let w = w.map(cuda::slice).transpose()?;
    let mut b = dev.stream.launch_builder(&f);
    b.arg(cuda::slice_mut(loss)?).opt_mut(ds).opt_mut(dt).arg(zs.device_slice()?).arg(zt.device_slice()?).opt(w);
    b.arg(&rows_i).arg(&c_i).arg(&spec.temperature).arg(&inv_t).arg(&form).arg(&spec.grad_scale);
    if let Some(group) = &group {
        b.arg(group);
    }
    // SAFETY: the arguments follow the kernel's parameter list (KL_PARAMS, then `group` for the
    // warp kernel), L::KERNELS being the kernels that read L's element type; softmax_kl checked
    // that every buffer holds rows * C (or rows) values; the resident kernel gets its 1,024
    // threads and its shared memory, and C > 1,024 gives each of its threads a class.
    unsafe { b.launch(cfg) }.map_err(cuda_err)?;
    Ok(())
}

/// Lets the resident kernel use its shared memory, past the default 48 KiB, where the GPU has
/// that much for a block with room for the reduction's static 768 bytes; false where it does
/// not, and wide rows then take the block kernel.
fn allow_resident(dev: &CudaDevice, f: &CudaFunction) -> Result<bool> {
    let max = dev.ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN);
    if RESIDENT_SHARED_BYTES + 1024 > max.map_err(cuda_err)? as usize {
        return Ok(false);
    }
    dev.ctx.bind_to_thread().map_err(cuda_err)?;
    let bytes = CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
    f.set_attribute(bytes, RESIDENT_SHARED_BYTES as i32).map_err(cuda_err)?;
    Ok(true)
}

/// The one-pass statistics of a (student, teacher) row. Maxima are of the raw logits (T > 0
/// keeps the order), and exponents are `(z - max) / T`, so masked `f32::MIN` logits never meet
/// a division that could turn them into `-inf - -inf`.
struct RowScan {
    inv_t: f32,
    /// Teacher: max, `sum e`, `sum e x` (x = (z_t - max_t) / T, e = exp x), and
    /// `sum e (z_t - z_s) / T`.
    max_t: f32,
    sum_t: f32,
    ent_t: f32,
    cross: f32,
    /// Student: max and `sum exp((z_s - max_s) / T)`.
    max_s: f32,
    sum_s: f32,
}

impl RowScan {
    fn new<E: Copy + Into<f32>>(zs: &[E], zt: &[E], inv_t: f32) -> RowScan {
        // Starting the maxima at f32::MIN (not -inf) keeps every difference finite; a row of
        // only f32::MIN logits is then uniform, as HF's masked softmax is.
        let mut r = RowScan { inv_t, max_t: f32::MIN, sum_t: 0.0, ent_t: 0.0, cross: 0.0, max_s: f32::MIN, sum_s: 0.0 };
        for (&s, &t) in zs.iter().zip(zt) {
            let (s, t): (f32, f32) = (s.into(), t.into());
            if t > r.max_t {
                let shift = (r.max_t - t) * inv_t;
                let rescale = shift.exp();
                // sum e x under the new max: each old e shrinks by `rescale`, each x moves by
                // `shift`. When the old terms vanish (rescale 0) so does their x e^x.
                r.ent_t = if rescale > 0.0 { rescale * (r.ent_t + r.sum_t * shift) } else { 0.0 };
                r.sum_t *= rescale;
                r.cross *= rescale;
                r.max_t = t;
            }
            let x = (t - r.max_t) * inv_t;
            let e = x.exp();
            if e > 0.0 {
                r.sum_t += e;
                r.ent_t += e * x;
                r.cross += e * (t - s) * inv_t;
            }
            if s > r.max_s {
                r.sum_s *= ((r.max_s - s) * inv_t).exp();
                r.max_s = s;
            }
            r.sum_s += ((s - r.max_s) * inv_t).exp();
        }
        r
    }

    /// `log Z_s - log Z_t`, the part of `log p_t,c - log p_s,c` shared by every c.
    fn log_norm_gap(&self) -> f32 {
        (self.max_s - self.max_t) * self.inv_t + self.sum_s.ln() - self.sum_t.ln()
    }

    /// The row's divergence before weighting and the T^2 factor.
    fn divergence(&self, form: KlForm) -> f32 {
        let kl = self.cross / self.sum_t + self.log_norm_gap();
        match form {
            KlForm::Kl => kl,
            // Cross-entropy = KL + teacher entropy, entropy = log Z_t - E_t[(z_t - max_t) / T].
            KlForm::CrossEntropy => kl + self.sum_t.ln() - self.ent_t / self.sum_t,
        }
    }

    /// Adds `scale * (p_s - p_t)` to `ds` and `scale * p_t * (d_c - div)` to `dt`.
    #[allow(clippy::too_many_arguments)]
    fn gradients<E: Copy + Into<f32>>(
        &self,
        mut ds: Option<&mut [f32]>,
        mut dt: Option<&mut [f32]>,
        zs: &[E],
        zt: &[E],
        form: KlForm,
        div: f32,
        scale: f32,
    ) {
        let (inv_t, inv_sum_t, inv_sum_s) = (self.inv_t, 1.0 / self.sum_t, 1.0 / self.sum_s);
        let (gap, log_sum_s) = (self.log_norm_gap(), self.sum_s.ln());
        for (c, (&s, &t)) in zs.iter().zip(zt).enumerate() {
            let (s, t): (f32, f32) = (s.into(), t.into());
            let pt = ((t - self.max_t) * inv_t).exp() * inv_sum_t;
            let rel_s = (s - self.max_s) * inv_t;
            if let Some(ds) = ds.as_deref_mut() {
                ds[c] += scale * (rel_s.exp() * inv_sum_s - pt);
            }
            if let Some(dt) = dt.as_deref_mut() {
                // p_t = 0 has no gradient; d_c there may be -inf - -inf.
                if pt > 0.0 {
                    let d = match form {
                        KlForm::Kl => (t - s) * inv_t + gap,
                        KlForm::CrossEntropy => log_sum_s - rel_s,
                    };
                    dt[c] += scale * pt * (d - div);
                }
            }
        }
    }
}
