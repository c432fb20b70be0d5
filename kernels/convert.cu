// f32 <-> bf16 conversions of whole tensors: the GPU side of Bf16Tensor::from_f32 / to_f32 in
// crates/kd-kernels/src/tensor.rs, which converts with the half crate on the CPU. One thread
// per element (n < 2^31, checked on the host).
#include "common.cuh"
#include "bf16.cuh"

extern "C" __global__ void f32_to_bf16(kd_bf16* __restrict__ out, const float* __restrict__ x, int n) {
    long long i = kd_element_index();
    if (i >= n) return;
    out[i] = kd_bf16_rn(x[i]);
}

extern "C" __global__ void bf16_to_f32(float* __restrict__ out, const kd_bf16* __restrict__ x, int n) {
    long long i = kd_element_index();
    if (i >= n) return;
    out[i] = kd_to_f32(x[i]);
}
