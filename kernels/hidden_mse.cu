// Masked hidden-state MSE over several (student, teacher) layer pairs: the GPU side of
// crates/kd-kernels/src/ops/hidden_mse.rs, which states the maths and is the reference.
//
// Three launches per call, whatever the number of pairs (up to KD_MSE_MAX_PAIRS per launch):
//   hidden_mse_count_f32:    one block counts the real tokens (mask == 1) and flags a mask
//                            value other than 0 or 1 (the CPU's error, found without a
//                            synchronising copy): then every loss is NaN and no gradient is
//                            written;
//   hidden_mse_f32:          grid (blocks, pairs): squared differences of real tokens summed
//                            into one partial per block, and the gradient written;
//   hidden_mse_finalize_f32: sums each pair's partials in a fixed order (in double), so the
//                            losses are reproducible bit for bit.
#include "common.cuh"

#define KD_MSE_MAX_PAIRS 32

// Device pointers of one launch's pairs; ds[p] null when pair p's gradient is not wanted.
struct MsePairs {
    const float* s[KD_MSE_MAX_PAIRS];
    const float* t[KD_MSE_MAX_PAIRS];
    float* ds[KD_MSE_MAX_PAIRS];
};

// stats[0]: the number of real tokens (int bits), stats[1]: 1 when the mask is invalid.
extern "C" __global__ void hidden_mse_count_f32(const float* __restrict__ mask, int n, float* __restrict__ stats) {
    BlockTeam team{(int)threadIdx.x, (int)blockDim.x};
    int real = 0, bad = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float m = mask[i];
        real += m == 1.f;
        bad |= m != 0.f && m != 1.f;
    }
    struct Counts {
        int real, bad;
    };
    struct Add {
        __device__ Counts operator()(Counts a, Counts b) const { return Counts{a.real + b.real, a.bad | b.bad}; }
    };
    Counts c = team.reduce(Counts{real, bad}, Add{});
    if (threadIdx.x == 0) {
        stats[0] = __int_as_float(c.real);
        stats[1] = c.bad ? 1.f : 0.f;
    }
}

// partials[p * gridDim.x + blockIdx.x]: block's sum of (s - t)^2 over real tokens of pair p.
extern "C" __global__ void hidden_mse_f32(MsePairs pairs, const float* __restrict__ mask, int n, int d,
                                          float grad_scale, const float* __restrict__ stats,
                                          float* __restrict__ partials) {
    BlockTeam team{(int)threadIdx.x, (int)blockDim.x};
    const int p = blockIdx.y;
    const int real = __float_as_int(stats[0]);
    const bool bad = stats[1] != 0.f;
    const float* s = pairs.s[p];
    const float* t = pairs.t[p];
    float* ds = bad ? nullptr : pairs.ds[p];
    const float norm = 1.f / (float)((long long)real * d);
    const float grad_coef = grad_scale * 2.f * norm;
    const int total = n * d;  // the host keeps n * d below 2^31
    float sum = 0.f;
    if (real > 0) {
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
            if (mask[i / d] != 1.f) continue;
            float diff = s[i] - t[i];
            sum += diff * diff;
            if (ds) ds[i] += grad_coef * diff;
        }
    }
    sum = team.reduce(sum, KdSum{});
    if (threadIdx.x == 0) partials[p * gridDim.x + blockIdx.x] = sum;
}

// losses[p] for the launch's pairs, one thread per pair.
extern "C" __global__ void hidden_mse_finalize_f32(const float* __restrict__ partials, int blocks, int pairs, int d,
                                                   const float* __restrict__ stats, float* __restrict__ losses) {
    int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= pairs) return;
    const int real = __float_as_int(stats[0]);
    if (stats[1] != 0.f) {
        losses[p] = KD_NAN;
        return;
    }
    if (real == 0 || d == 0) {
        losses[p] = 0.f;
        return;
    }
    double total = 0.0;
    for (int b = 0; b < blocks; ++b) total += (double)partials[p * blocks + b];
    const float norm = 1.f / (float)((long long)real * d);
    losses[p] = (float)(total * (double)norm);
}
