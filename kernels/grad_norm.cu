// Global gradient norm and norm clipping: the GPU side of crates/kd-kernels/src/ops/grad_norm.rs,
// which states the semantics and is the reference.
//
// No atomics, so the norm is the same bit for bit on every run:
//   grad_norm_partials_f32: grid (blocks, tensors): block b of tensor t sums the squares of its
//                           grid-stride share in double (like the CPU's f64 sum) into
//                           partials[(first + t) * blocks + b];
//   grad_norm_finalize_f32: one block adds all partials in a fixed order, writes the norm and
//                           the clipping factor (1 when the gradients are left alone);
//   grad_norm_scale_f32:    grid (blocks, tensors): multiplies every gradient by that factor, on
//                           the device, when it is below 1.
// The partials live in the device's float scratch buffer, two floats per double: its base is
// allocation-aligned and the host keeps the doubles' offset even.
#include "common.cuh"

#define KD_NORM_MAX_TENSORS 64

// One launch's tensors: pointers, then element counts (the host fills unused slots with zeros).
struct NormTensors {
    float* x[KD_NORM_MAX_TENSORS];
    long long n[KD_NORM_MAX_TENSORS];
};

struct DoubleSum {
    __device__ __forceinline__ double operator()(double a, double b) const { return a + b; }
};

extern "C" __global__ void grad_norm_partials_f32(NormTensors tensors, int first, double* __restrict__ partials) {
    BlockTeam team{(int)threadIdx.x, (int)blockDim.x};
    const int t = blockIdx.y;
    const float* x = tensors.x[t];
    const long long n = tensors.n[t];
    const long long stride = (long long)gridDim.x * blockDim.x;
    double sum = 0.0;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        double v = (double)x[i];
        sum += v * v;  // exact: a float's square fits a double
    }
    sum = team.reduce(sum, DoubleSum{});
    if (threadIdx.x == 0) partials[(size_t)(first + t) * gridDim.x + blockIdx.x] = sum;
}

// out[0]: the norm, sqrt of the total in double rounded to float (the CPU's
// `sum.sqrt() as f32`); out[1]: max_norm / (norm + 1e-6) in float when that is below 1 and the
// norm is finite, else 1 (no clipping; max_norm = inf asks for the norm only).
extern "C" __global__ void grad_norm_finalize_f32(const double* __restrict__ partials, int count, float max_norm,
                                                  float* __restrict__ out) {
    BlockTeam team{(int)threadIdx.x, (int)blockDim.x};
    double sum = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) sum += partials[i];
    sum = team.reduce(sum, DoubleSum{});
    if (threadIdx.x == 0) {
        float norm = (float)sqrt(sum);
        float coef = max_norm / (norm + 1e-6f);
        out[0] = norm;
        out[1] = isfinite(norm) && coef < 1.f ? coef : 1.f;
    }
}

extern "C" __global__ void grad_norm_scale_f32(NormTensors tensors, const float* __restrict__ factor) {
    const float coef = factor[1];
    if (!(coef < 1.f)) return;
    const int t = blockIdx.y;
    float* x = tensors.x[t];
    const long long n = tensors.n[t];
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) x[i] *= coef;
}
