//! Every op of kd, one file per family, each with its CPU reference and its CUDA launch.
pub mod adamw;
pub mod attention;
pub mod bias;
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
