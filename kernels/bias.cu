// Bias and residual arithmetic: the GPU side of crates/kd-kernels/src/ops/bias.rs, which is
// the reference. Element-wise kernels take one thread per element (n < 2^31, checked on the
// host); bias_backward is a deterministic column sum (see kd_sum_chunks in common.cuh).
#include "common.cuh"

// x[r, c] += bias[c] for x [n / d, d].
extern "C" __global__ void add_bias_f32(float* __restrict__ x, const float* __restrict__ bias, int n, int d) {
    long long i = kd_element_index();
    if (i >= n) return;
    x[i] += bias[i % d];
}

// partials[y * d + col]: the sum of dout[r, col] over chunk y's rows.
extern "C" __global__ void bias_backward_partials_f32(const float* __restrict__ dout, int rows, int d,
                                                      int rows_per_chunk, float* __restrict__ partials) {
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= d) return;
    int begin = blockIdx.y * rows_per_chunk;
    int end = min(begin + rows_per_chunk, rows);
    float acc = 0.f;
    for (int r = begin; r < end; ++r) acc += dout[(size_t)r * d + col];
    partials[(size_t)blockIdx.y * d + col] = acc;
}

// dbias[col] += the sum of its `chunks` partials.
extern "C" __global__ void bias_backward_finalize_f32(const float* __restrict__ partials, int chunks, int d,
                                                      float* __restrict__ dbias) {
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= d) return;
    dbias[col] += kd_sum_chunks(partials, chunks, d, col);
}

// out = a + b; out may not alias a or b (distinct tensors on the host).
extern "C" __global__ void add_f32(float* __restrict__ out, const float* __restrict__ a, const float* __restrict__ b,
                                   int n) {
    long long i = kd_element_index();
    if (i >= n) return;
    out[i] = a[i] + b[i];
}

extern "C" __global__ void add_inplace_f32(float* __restrict__ dst, const float* __restrict__ src, int n) {
    long long i = kd_element_index();
    if (i >= n) return;
    dst[i] += src[i];
}

extern "C" __global__ void scale_inplace_f32(float* __restrict__ x, float s, int n) {
    long long i = kd_element_index();
    if (i >= n) return;
    x[i] *= s;
}
