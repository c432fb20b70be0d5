//! Every op of kd, one file per family, each with its CPU reference and its CUDA launch.
pub mod adamw;
pub mod attention;
pub mod bias;
pub mod cls_attention;
pub mod cross_entropy;
pub mod dropout;
pub mod embedding;
pub mod gelu;
pub mod gemm;
pub mod grad_norm;
pub mod gumbel;
pub mod hidden_mse;
pub mod layernorm;
pub mod softmax_kl;

use rayon::iter::{Either, IndexedParallelIterator, IntoParallelIterator, ParallelIterator};
use rayon::slice::ParallelSliceMut;

/// The rows of an optional gradient buffer, or `count` Nones: lets a loss op that writes its
/// gradient only when asked zip that output with its rows in one parallel loop. `len` must be
/// positive.
pub(crate) fn opt_rows_mut(
    buf: Option<&mut [f32]>,
    len: usize,
    count: usize,
) -> impl IndexedParallelIterator<Item = Option<&mut [f32]>> {
    match buf {
        Some(b) => Either::Left(b.par_chunks_mut(len).map(Some)),
        None => Either::Right((0..count).into_par_iter().map(|_| None)),
    }
}
