//! Matrix products: the general (batched, transposed, scaled) `matmul` and the `nn.Linear` pair.
//!
//! On the CPU every product goes through the `gemm` crate, on a GPU through cuBLAS (plain fp32
//! math, no TF32, so both devices agree to rounding). A transposed operand is never copied: it is
//! the same row-major buffer read with its row and column strides swapped.
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig, StridedBatchedConfig};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::cuda;
use crate::device::CudaDevice;
use crate::ops::bias::{add_bias_inplace, bias_backward, expect_rows, lead_rows};
use crate::tensor::cuda_err;
use crate::{common_device, expect_shape, Device, Error, Result, Tensor};

/// How `matmul` combines its operands: `out = alpha * op(a) . op(b) + beta * out`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MatmulSpec {
    pub trans_a: bool,
    pub trans_b: bool,
    pub alpha: f32,
    pub beta: f32,
}

impl MatmulSpec {
    pub const NN: MatmulSpec = MatmulSpec { trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0 };
    pub const NT: MatmulSpec = MatmulSpec { trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0 };
    pub const TN: MatmulSpec = MatmulSpec { trans_a: true, trans_b: false, alpha: 1.0, beta: 0.0 };
    pub const TT: MatmulSpec = MatmulSpec { trans_a: true, trans_b: true, alpha: 1.0, beta: 0.0 };

    /// The same product added onto `out` (beta = 1), as gradients are.
    pub fn accumulate(self) -> Self {
        MatmulSpec { beta: 1.0, ..self }
    }
}

/// `out = alpha * op(a) . op(b) + beta * out`.
///
/// `a` is `[m, k]` or `[batch, m, k]` (`[k, m]` / `[batch, k, m]` when `trans_a`), `b` likewise
/// `[k, n]` or `[batch, k, n]` (`[n, k]` ... when `trans_b`); a rank-2 operand is shared across
/// the batch. `out` is `[m, n]` when both operands are rank 2, else `[batch, m, n]`. As in BLAS,
/// `out` is not read when `beta == 0`, so it may hold garbage (even NaN) then.
pub fn matmul(out: &mut Tensor, a: &Tensor, b: &Tensor, spec: MatmulSpec) -> Result<()> {
    const OP: &str = "matmul";
    let (batch_a, a_rows, a_cols) = batch_dims(OP, "a", a)?;
    let (batch_b, b_rows, b_cols) = batch_dims(OP, "b", b)?;
    let (m, ka) = if spec.trans_a { (a_cols, a_rows) } else { (a_rows, a_cols) };
    let (kb, n) = if spec.trans_b { (b_cols, b_rows) } else { (b_rows, b_cols) };
    if ka != kb {
        return Err(Error::shape(
            OP,
            format!(
                "inner dimensions differ: op(a) is {m}x{ka}, op(b) is {kb}x{n} (a {:?}, b {:?})",
                a.shape(),
                b.shape()
            ),
        ));
    }
    let batch = match (batch_a, batch_b) {
        (Some(x), Some(y)) if x != y => {
            return Err(Error::shape(OP, format!("batch sizes differ: a {:?}, b {:?}", a.shape(), b.shape())))
        }
        (Some(x), _) | (None, Some(x)) => Some(x),
        (None, None) => None,
    };
    match batch {
        Some(bs) => expect_shape(OP, "out", out, &[bs, m, n])?,
        None => expect_shape(OP, "out", out, &[m, n])?,
    }
    match common_device(OP, &[out, a, b])? {
        Device::Cpu => {
            let a_mat = Mat::new(a.cpu()?, a_rows, a_cols, spec.trans_a);
            let b_mat = Mat::new(b.cpu()?, b_rows, b_cols, spec.trans_b);
            let (a_step, b_step) = (batch_a.map_or(0, |_| a_rows * a_cols), batch_b.map_or(0, |_| b_rows * b_cols));
            matmul_cpu(out.cpu_mut()?, batch.unwrap_or(1), a_mat, a_step, b_mat, b_step, spec.alpha, spec.beta);
            Ok(())
        }
        Device::Cuda(dev) => {
            let a_op =
                GpuOperand { cols: a_cols, transpose: spec.trans_a, step: batch_a.map_or(0, |_| a_rows * a_cols) };
            let b_op =
                GpuOperand { cols: b_cols, transpose: spec.trans_b, step: batch_b.map_or(0, |_| b_rows * b_cols) };
            let dims = GemmDims { batch: batch.unwrap_or(1), m, n, k: ka };
            gemm_cuda(&dev, out, (a, a_op), (b, b_op), dims, spec.alpha, spec.beta)
        }
    }
}

/// HF `nn.Linear`: `out[.., out] = x[.., in] . w[out, in]^T + bias[out]` over every row of `x`.
/// `out` (and in the backward `dout` and `dx`) may view the same rows in another leading shape
/// than `x` (`[N, D]` against `[B, L, D]`).
pub fn linear_forward(out: &mut Tensor, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<()> {
    const OP: &str = "linear_forward";
    let (rows, d_out, d_in) = linear_dims(OP, x, w)?;
    expect_rows(OP, "out", out, rows, d_out)?;
    if let Some(bias) = bias {
        expect_shape(OP, "bias", bias, &[d_out])?;
    }
    let mut all = vec![&*out, x, w];
    all.extend(bias);
    match common_device(OP, &all)? {
        Device::Cpu => {
            let out = out.cpu_mut()?;
            let x_mat = Mat::new(x.cpu()?, rows, d_in, false);
            let w_t = Mat::new(w.cpu()?, d_out, d_in, true);
            // The product first, then the bias: the GEMM writes its output without reading it
            // (prefilling the bias and adding the product onto it measured about 1% slower per
            // standard step).
            gemm_cpu(out, x_mat, w_t, 1.0, 0.0, all_threads());
            if let Some(bias) = bias {
                let bias = bias.cpu()?;
                out.par_chunks_mut(d_out.max(1)).for_each(|row| row.iter_mut().zip(bias).for_each(|(o, &b)| *o += b));
            }
            Ok(())
        }
        Device::Cuda(dev) => {
            let dims = GemmDims { batch: 1, m: rows, n: d_out, k: d_in };
            gemm_cuda(&dev, out, (x, GpuOperand::plain(d_in)), (w, GpuOperand::transposed(d_in)), dims, 1.0, 0.0)?;
            match bias {
                Some(bias) => add_bias_inplace(out, bias),
                None => Ok(()),
            }
        }
    }
}

/// Backward of [`linear_forward`], accumulating: `dx += dout . w`, `dw += dout^T . x`,
/// `db += sum over rows of dout`. `dx` and `db` are skipped when `None` (an input that needs no
/// gradient, a layer without bias).
pub fn linear_backward(
    dx: Option<&mut Tensor>,
    dw: &mut Tensor,
    db: Option<&mut Tensor>,
    dout: &Tensor,
    x: &Tensor,
    w: &Tensor,
) -> Result<()> {
    const OP: &str = "linear_backward";
    let (rows, d_out, d_in) = linear_dims(OP, x, w)?;
    expect_rows(OP, "dout", dout, rows, d_out)?;
    expect_shape(OP, "dw", dw, w.shape())?;
    if let Some(dx) = &dx {
        expect_rows(OP, "dx", dx, rows, d_in)?;
    }
    if let Some(db) = &db {
        expect_shape(OP, "db", db, &[d_out])?;
    }
    let mut all = vec![&*dw, dout, x, w];
    all.extend(dx.as_deref());
    all.extend(db.as_deref());
    match common_device(OP, &all)? {
        Device::Cpu => {
            let dout_mat = Mat::new(dout.cpu()?, rows, d_out, false);
            if let Some(dx) = dx {
                gemm_cpu(dx.cpu_mut()?, dout_mat, Mat::new(w.cpu()?, d_out, d_in, false), 1.0, 1.0, all_threads());
            }
            let dout_t = Mat::new(dout.cpu()?, rows, d_out, true);
            gemm_cpu(dw.cpu_mut()?, dout_t, Mat::new(x.cpu()?, rows, d_in, false), 1.0, 1.0, all_threads());
            if let Some(db) = db {
                bias_backward(db, dout)?;
            }
            Ok(())
        }
        Device::Cuda(dev) => {
            if let Some(dx) = dx {
                let dims = GemmDims { batch: 1, m: rows, n: d_in, k: d_out };
                gemm_cuda(&dev, dx, (dout, GpuOperand::plain(d_out)), (w, GpuOperand::plain(d_in)), dims, 1.0, 1.0)?;
            }
            let dims = GemmDims { batch: 1, m: d_out, n: d_in, k: rows };
            gemm_cuda(&dev, dw, (dout, GpuOperand::transposed(d_out)), (x, GpuOperand::plain(d_in)), dims, 1.0, 1.0)?;
            match db {
                Some(db) => bias_backward(db, dout),
                None => Ok(()),
            }
        }
    }
}

/// `(batch, rows, cols)` of a rank-2 or rank-3 operand.
fn batch_dims(op: &'static str, what: &str, t: &Tensor) -> Result<(Option<usize>, usize, usize)> {
    match *t.shape() {
        [r, c] => Ok((None, r, c)),
        [b, r, c] => Ok((Some(b), r, c)),
        _ => Err(Error::shape(op, format!("{what} is {:?}, expected rank 2 or 3", t.shape()))),
    }
}

/// `(rows of x, out_features, in_features)` of a linear layer, checked against the input's last axis.
fn linear_dims(op: &'static str, x: &Tensor, w: &Tensor) -> Result<(usize, usize, usize)> {
    let [d_out, d_in] = *w.shape() else {
        return Err(Error::shape(op, format!("w is {:?}, expected [out_features, in_features]", w.shape())));
    };
    if x.shape().is_empty() || x.last_dim() != d_in {
        return Err(Error::shape(
            op,
            format!("x is {:?}, expected last axis {d_in} (w is {:?})", x.shape(), w.shape()),
        ));
    }
    Ok((lead_rows(x), d_out, d_in))
}

pub(crate) fn all_threads() -> Parallelism {
    Parallelism::Rayon(rayon::current_num_threads())
}

/// A logical `rows x cols` matrix over a row-major buffer; a transpose only swaps the strides.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: isize,
    col_stride: isize,
}

impl<'a> Mat<'a> {
    /// The `stored_rows x stored_cols` row-major matrix at the front of `data`, or its transpose.
    pub(crate) fn new(data: &'a [f32], stored_rows: usize, stored_cols: usize, transpose: bool) -> Self {
        let mat = Mat::strided(data, stored_rows, stored_cols, stored_cols);
        if transpose {
            mat.t()
        } else {
            mat
        }
    }

    /// `rows x cols` at the front of `data` with rows `row_stride` apart: a block of columns of a
    /// wider row-major matrix (one head of a `[B, L, H * Dh]` activation).
    pub(crate) fn strided(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        Mat { data, rows, cols, row_stride: row_stride as isize, col_stride: 1 }
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// The transpose, over the same memory.
    pub(crate) fn t(self) -> Self {
        Mat { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }

    /// The same view over `data[offset..]` (the next matrix of a batch).
    fn at(self, offset: usize) -> Self {
        Mat { data: &self.data[offset..], ..self }
    }
}

/// `out = alpha * a . b + beta * out` with `out` a contiguous row-major `[a.rows, b.cols]`.
pub(crate) fn gemm_cpu(out: &mut [f32], a: Mat, b: Mat, alpha: f32, beta: f32, par: Parallelism) {
    assert!(out.len() == a.rows * b.cols, "gemm_cpu: shapes checked by the caller");
    // SAFETY: `out` is an exclusive borrow of exactly the packed `[a.rows, b.cols]` output.
    unsafe { gemm_cpu_strided(out.as_mut_ptr(), b.cols, a, b, alpha, beta, par) }
}

/// [`gemm_cpu`] into an output whose rows lie `out_row_stride` floats apart (one head's columns
/// of a `[B, L, H * Dh]` buffer that other tasks write the other columns of).
///
/// # Safety
/// `out` must point to `a.rows` rows of `b.cols` writable floats, `out_row_stride` apart, that
/// nothing else reads or writes during the call.
pub(crate) unsafe fn gemm_cpu_strided(
    out: *mut f32,
    out_row_stride: usize,
    a: Mat,
    b: Mat,
    alpha: f32,
    beta: f32,
    par: Parallelism,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(b.rows == k && (m <= 1 || out_row_stride >= n), "gemm_cpu: shapes checked by the caller");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // An empty sum: only the beta term is left.
        for i in 0..m {
            // SAFETY: row i of the output, by the caller's contract.
            let row = unsafe { std::slice::from_raw_parts_mut(out.add(i * out_row_stride), n) };
            if beta == 0.0 {
                row.fill(0.0);
            } else {
                row.iter_mut().for_each(|o| *o *= beta);
            }
        }
        return;
    }
    let last = |mat: Mat| (mat.rows - 1) as isize * mat.row_stride + (mat.cols - 1) as isize * mat.col_stride;
    assert!(last(a) < a.data.len() as isize && last(b) < b.data.len() as isize, "gemm_cpu: operand out of bounds");
    // SAFETY: the asserts above keep every element the strides reach inside the slices, and the
    // caller guarantees `out` is exclusively ours, so no operand can alias it. The crate computes
    // `dst = alpha * dst + beta * lhs . rhs` (its alpha and beta are BLAS's swapped), reading
    // dst only when `read_dst`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out,
            1,
            out_row_stride as isize,
            beta != 0.0,
            a.data.as_ptr(),
            a.col_stride,
            a.row_stride,
            b.data.as_ptr(),
            b.col_stride,
            b.row_stride,
            beta,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// A row-major operand as cuBLAS reads it: `cols` columns as stored (its leading dimension), read
/// transposed or not, `step` floats between the matrices of a batch (0: one matrix for all).
#[derive(Clone, Copy)]
pub(crate) struct GpuOperand {
    pub cols: usize,
    pub transpose: bool,
    pub step: usize,
}

impl GpuOperand {
    pub(crate) fn plain(cols: usize) -> Self {
        GpuOperand { cols, transpose: false, step: 0 }
    }

    pub(crate) fn transposed(cols: usize) -> Self {
        GpuOperand { cols, transpose: true, step: 0 }
    }

    fn op(self) -> cublasOperation_t {
        blas_op(self.transpose)
    }
}

fn blas_op(transpose: bool) -> cublasOperation_t {
    if transpose {
        cublasOperation_t::CUBLAS_OP_T
    } else {
        cublasOperation_t::CUBLAS_OP_N
    }
}

/// `batch` products of `op(a)` `[m, k]` by `op(b)` `[k, n]`.
#[derive(Clone, Copy)]
pub(crate) struct GemmDims {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// `out = alpha * op(a) . op(b) + beta * out` through cuBLAS, `out` packed `[batch, m, n]`, the
/// shapes checked by the caller. cuBLAS is column-major, where a row-major matrix reads as its
/// transpose; so it is asked for `out^T = op(b)^T . op(a)^T`: b first, m and n swapped.
pub(crate) fn gemm_cuda(
    dev: &CudaDevice,
    out: &mut Tensor,
    (a, a_op): (&Tensor, GpuOperand),
    (b, b_op): (&Tensor, GpuOperand),
    dims: GemmDims,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    const OP: &str = "cuBLAS gemm";
    let GemmDims { batch, m, n, k } = dims;
    if batch == 0 || m == 0 || n == 0 {
        return Ok(());
    }
    let gemm = GemmConfig {
        transa: b_op.op(),
        transb: a_op.op(),
        m: cuda::int(OP, "n", n)?,
        n: cuda::int(OP, "m", m)?,
        k: cuda::int(OP, "k", k)?,
        alpha,
        lda: cuda::int(OP, "b's columns", b_op.cols.max(1))?,
        ldb: cuda::int(OP, "a's columns", a_op.cols.max(1))?,
        beta,
        ldc: cuda::int(OP, "n", n)?,
    };
    let cfg = StridedBatchedConfig {
        gemm,
        batch_size: cuda::int(OP, "batch", batch)?,
        stride_a: b_op.step as i64,
        stride_b: a_op.step as i64,
        stride_c: (m * n) as i64,
    };
    let blas = dev.blas()?;
    // SAFETY: the callers checked every operand's shape against (batch, m, n, k) and the strides,
    // so cuBLAS reads and writes only inside the three buffers; `out` is a distinct tensor from
    // `a` and `b` (Rust's borrows guarantee it).
    unsafe { blas.gemm_strided_batched(cfg, cuda::slice(b)?, cuda::slice(a)?, cuda::slice_mut(out)?) }.map_err(cuda_err)
}

/// One operand of [`gemm_batched_cuda`]: the device address of an array of device pointers, one
/// row-major matrix per batch entry with rows `ld` floats apart, read transposed or not.
#[derive(Clone, Copy)]
pub(crate) struct PointerOperand {
    pub ptrs: u64,
    pub ld: usize,
    pub transpose: bool,
}

impl PointerOperand {
    /// The same matrices read transposed.
    pub(crate) fn t(self) -> Self {
        PointerOperand { transpose: !self.transpose, ..self }
    }
}

/// [`gemm_cuda`] for matrices that no single batch stride reaches (attention's heads: Dh floats
/// apart within an example, L * H * Dh between examples), through cuBLAS's pointer-array
/// `cublasSgemmBatched`: `c[i] = alpha * op(a[i]) . op(b[i]) + beta * c[i]`, `c` never transposed.
/// As in BLAS, `c` is not read when `beta == 0`.
///
/// # Safety
/// The three arrays must hold `dims.batch` pointers each, written earlier on the device's stream,
/// to live matrices of the sizes `dims` and the leading dimensions describe; no `c` matrix may
/// overlap another operand's, and the caller must hold cudarc's guards of every buffer involved
/// until this call has returned (cuBLAS only sees raw addresses).
pub(crate) unsafe fn gemm_batched_cuda(
    dev: &CudaDevice,
    dims: GemmDims,
    a: PointerOperand,
    b: PointerOperand,
    c: PointerOperand,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    const OP: &str = "cuBLAS batched gemm";
    let GemmDims { batch, m, n, k } = dims;
    if batch == 0 || m == 0 || n == 0 {
        return Ok(());
    }
    debug_assert!(!c.transpose, "gemm_batched_cuda: the output is written as stored");
    let blas = dev.blas()?;
    // Column-major cuBLAS is asked for c^T = op(b)^T . op(a)^T, as in gemm_cuda.
    // SAFETY: the caller's contract; alpha and beta are host values (cuBLAS's default pointer mode).
    unsafe {
        cudarc::cublas::sys::cublasSgemmBatched(
            *blas.handle(),
            blas_op(b.transpose),
            blas_op(a.transpose),
            cuda::int(OP, "n", n)?,
            cuda::int(OP, "m", m)?,
            cuda::int(OP, "k", k)?,
            &alpha,
            b.ptrs as *const *const f32,
            cuda::int(OP, "b's leading dimension", b.ld.max(1))?,
            a.ptrs as *const *const f32,
            cuda::int(OP, "a's leading dimension", a.ld.max(1))?,
            &beta,
            c.ptrs as *const *mut f32,
            cuda::int(OP, "c's leading dimension", c.ld.max(1))?,
            cuda::int(OP, "batch", batch)?,
        )
    }
    .result()
    .map_err(cuda_err)
}

/// The batched product: one `gemm_cpu` per batch entry, `a_step`/`b_step` elements apart (0 for
/// an operand shared across the batch).
#[allow(clippy::too_many_arguments)]
fn matmul_cpu(out: &mut [f32], batch: usize, a: Mat, a_step: usize, b: Mat, b_step: usize, alpha: f32, beta: f32) {
    let (m, n) = (a.rows, b.cols);
    let threads = rayon::current_num_threads();
    if b_step == 0 && a_step != 0 && a.col_stride == 1 && a.row_stride == a.cols as isize {
        // A batch of packed row-major `a` against one shared `b` is a single taller product. (A
        // transposed `a` with one row also has unit column stride, but its rows are not packed.)
        let tall = Mat { rows: m * batch, ..a };
        gemm_cpu(out, tall, b, alpha, beta, all_threads());
    } else if batch >= threads && m * n > 0 {
        // Many small products (attention heads): one per task, each single-threaded.
        out.par_chunks_mut(m * n).enumerate().for_each(|(i, o)| {
            gemm_cpu(o, a.at(i * a_step), b.at(i * b_step), alpha, beta, Parallelism::None);
        });
    } else {
        for i in 0..batch {
            gemm_cpu(
                &mut out[i * m * n..(i + 1) * m * n],
                a.at(i * a_step),
                b.at(i * b_step),
                alpha,
                beta,
                all_threads(),
            );
        }
    }
}
