// Inverted dropout, one thread per element: the GPU side of crates/kd-kernels/src/ops/dropout.rs,
// which is the reference. Element j of row r is dropped iff kd_uniform(seed, r * row_step + j) < p,
// the CPU's exact draw (row_step = row_len: the flat index), so the mask is bit-identical to the
// CPU's and the backward recomputes it.
#include "common.cuh"

// dst = (or +=, when `accumulate`) src * mask / (1 - p), with scale = 1 / (1 - p) computed on the
// host in f32 as the CPU does. __fmul_rn keeps the product from being fused into an FMA with
// the accumulation: the CPU rounds the product first, and the results must match bit for bit.
extern "C" __global__ void dropout_f32(float* __restrict__ dst, const float* __restrict__ src, int n, int row_len,
                                       unsigned long long row_step, float p, float scale, unsigned long long seed,
                                       int accumulate) {
    long long i = kd_element_index();
    if (i >= n) return;
    int row = (int)i / row_len, col = (int)i - row * row_len;
    bool kept = p == 0.f || kd_uniform(seed, (unsigned long long)row * row_step + col) >= p;
    float v = kept ? __fmul_rn(src[i], scale) : 0.f;
    if (accumulate) {
        dst[i] += v;
    } else {
        dst[i] = v;
    }
}
