// Masked hidden-state MSE over several (student, teacher) layer pairs: the GPU side of
// crates/kd-kernels/src/ops/hidden_mse.rs, which states the maths and is the reference.
//
// One launch per call (per KD_MSE_MAX_PAIRS pairs), grid (blocks, pairs), after the host has
// zeroed the launch's block counter:
//   - every block counts the real tokens (mask == 1) itself, from L2, since it needs the count
//     to scale the gradients it writes; a mask value other than 0 or 1 (the CPU's error, found
//     without a synchronising copy) makes every loss NaN and no gradient is written;
//   - each warp takes whole token rows of its block's pair, reads the row's mask once and
//     skips padding rows, with 16-byte loads where D % 4 == 0 and the pair's buffers are
//     16-byte aligned (scalar loads otherwise); the block's sum of (s - t)^2 goes to one partial;
//   - the block that finishes last (a counter, the only atomic, counts the blocks) sums each
//     pair's partials in block order, in double, so the losses are reproducible bit for bit.
// Traffic: s and t once and dstudent read and written, 16 bytes per real element (8 without
// gradients), plus the mask and the partials.
#include "common.cuh"

#define KD_MSE_MAX_PAIRS 32
// Threads per block (MSE_BLOCK in ops/hidden_mse.rs), and the blocks an SM should hold at
// once: at most 40 registers a thread, so that the host's grid of 6 blocks per SM is one wave.
#define KD_MSE_THREADS 256
#define KD_MSE_BLOCKS_PER_SM 6

// Device pointers of one launch's pairs; ds[p] null when pair p's gradient is not wanted.
struct MsePairs {
    const float* s[KD_MSE_MAX_PAIRS];
    const float* t[KD_MSE_MAX_PAIRS];
    float* ds[KD_MSE_MAX_PAIRS];
};

struct MseCounts {
    int real, bad;
};

struct MseCountsAdd {
    __device__ MseCounts operator()(MseCounts a, MseCounts b) const { return MseCounts{a.real + b.real, a.bad | b.bad}; }
};

__device__ __forceinline__ bool kd_aligned16(const void* p) { return ((unsigned long long)p & 15) == 0; }

// One token row: adds its squared differences to `sum` and grad_coef * (s - t) to ds (when
// given), lane by lane across a warp.
__device__ __forceinline__ void mse_row(const float* s, const float* t, float* ds, int d, bool vec, float grad_coef,
                                        int lane, float& sum) {
    if (vec) {
        const float4* s4 = reinterpret_cast<const float4*>(s);
        const float4* t4 = reinterpret_cast<const float4*>(t);
        float4* ds4 = reinterpret_cast<float4*>(ds);
        for (int q = lane; q < d / 4; q += 32) {
            const float4 a = s4[q], b = t4[q];
            const float dx = a.x - b.x, dy = a.y - b.y, dz = a.z - b.z, dw = a.w - b.w;
            sum += dx * dx;
            sum += dy * dy;
            sum += dz * dz;
            sum += dw * dw;
            if (ds) {
                float4 g = ds4[q];
                g.x += grad_coef * dx;
                g.y += grad_coef * dy;
                g.z += grad_coef * dz;
                g.w += grad_coef * dw;
                ds4[q] = g;
            }
        }
    } else {
        for (int j = lane; j < d; j += 32) {
            const float diff = s[j] - t[j];
            sum += diff * diff;
            if (ds) ds[j] += grad_coef * diff;
        }
    }
}

// partials[p * gridDim.x + blockIdx.x]: the block's sum of (s - t)^2 over its real rows of pair
// p; `done` counts finished blocks (zero at launch); losses[p] for the launch's pairs.
extern "C" __global__ void __launch_bounds__(KD_MSE_THREADS, KD_MSE_BLOCKS_PER_SM) hidden_mse_f32(MsePairs pairs, const float* __restrict__ mask, int n, int d,
                                          float grad_scale, float* __restrict__ partials,
                                          unsigned int* __restrict__ done, float* __restrict__ losses) {
    BlockTeam team{(int)threadIdx.x, (int)blockDim.x};
    int real = 0, bad = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float m = mask[i];
        real += m == 1.f;
        bad |= m != 0.f && m != 1.f;
    }
    const MseCounts counts = team.reduce(MseCounts{real, bad}, MseCountsAdd{});

    const int p = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float sum = 0.f;
    if (counts.real > 0 && !counts.bad) {
        const float* s = pairs.s[p];
        const float* t = pairs.t[p];
        float* ds = pairs.ds[p];
        const float norm = 1.f / (float)((long long)counts.real * d);
        const float grad_coef = grad_scale * 2.f * norm;
        const bool vec = d % 4 == 0 && kd_aligned16(s) && kd_aligned16(t) && (!ds || kd_aligned16(ds));
        for (int row = blockIdx.x * warps + warp; row < n; row += gridDim.x * warps) {
            if (mask[row] != 1.f) continue;
            const size_t base = (size_t)row * d;
            mse_row(s + base, t + base, ds ? ds + base : nullptr, d, vec, grad_coef, lane, sum);
        }
    }
    sum = team.reduce(sum, KdSum{});

    // The last block to finish: the writer's fence orders its partial before its count, the
    // reader's after the count, and __ldcg reads the partials from L2, past this SM's L1.
    __shared__ bool last;
    if (threadIdx.x == 0) {
        partials[p * gridDim.x + blockIdx.x] = sum;
        __threadfence();
        last = atomicAdd(done, 1u) == gridDim.x * gridDim.y - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    const float norm = 1.f / (float)((long long)counts.real * d);
    for (int q = warp; q < (int)gridDim.y; q += warps) {
        double total = 0.0;
        for (int b = lane; b < (int)gridDim.x; b += 32) total += (double)__ldcg(partials + q * gridDim.x + b);
        // Lanes and then the butterfly add in a fixed order, whatever the scheduling.
        for (int offset = 16; offset > 0; offset >>= 1) total += __shfl_xor_sync(KD_FULL_MASK, total, offset);
        if (lane == 0) {
            if (counts.bad) losses[q] = KD_NAN;
            else if (counts.real == 0 || d == 0) losses[q] = 0.f;
            else losses[q] = (float)(total * (double)norm);
        }
    }
}
