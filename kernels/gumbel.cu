// Straight-through Gumbel-softmax: the GPU side of crates/kd-kernels/src/ops/gumbel.rs, which
// states the maths and is the reference. One row of [rows, V] per team of threads, as in
// softmax_kl.cu: `group` lanes of a warp for rows up to 1,024 (the *_warp kernels), a block
// for vocabulary-wide rows (the *_block kernels). Each thread revisits only the elements it
// wrote itself, so the passes over `soft` need no barrier beyond the reductions'.
#include "common.cuh"

// rng.rs's draws lie in [0, 1 - 2^-24]; gumbel.rs's U_MIN (2^-25) and U_MAX keep both logs finite.
#define GUMBEL_U_MIN (1.0f / 33554432.0f)
#define GUMBEL_U_MAX (1.0f - 1.0f / 16777216.0f)

// gumbel.rs's gumbel_noise: -ln(-ln(u)) in f32, each log rounded to f32 from double. The CPU's
// f32 ln is glibc's logf, which is almost always the correctly rounded value; the double log
// rounded once gives that value too, where CUDA's logf may be an ulp off.
__device__ __forceinline__ float gumbel_noise(unsigned long long seed, unsigned long long index) {
    float u = fminf(fmaxf(kd_uniform(seed, index), GUMBEL_U_MIN), GUMBEL_U_MAX);
    float ln_u = (float)log((double)u);
    return -(float)log((double)-ln_u);
}

// The first maximum of a row: the larger value, the smaller index on ties.
struct ArgMax {
    float v;
    int i;
};

struct ArgMaxMerge {
    __device__ __forceinline__ ArgMax operator()(const ArgMax& a, const ArgMax& b) const {
        return b.v > a.v || (b.v == a.v && b.i < a.i) ? b : a;
    }
};

template <class Team>
__device__ __forceinline__ void gumbel_forward_row(const Team& team, int row, float* hard, float* soft,
                                                   const float* logits, int v, float tau,
                                                   unsigned long long seed) {
    const size_t base = (size_t)row * v;
    float mx = KD_NEG_INF;
    for (int j = team.lane; j < v; j += team.size) {
        float s = (logits[base + j] + gumbel_noise(seed, base + j)) / tau;
        soft[base + j] = s;
        mx = fmaxf(mx, s);
    }
    mx = team.reduce(mx, KdMax{});
    float sum = 0.f;
    for (int j = team.lane; j < v; j += team.size) {
        float e = expf(soft[base + j] - mx);
        soft[base + j] = e;
        sum += e;
    }
    sum = team.reduce(sum, KdSum{});
    const float inv = 1.f / sum;
    // Taken on the rounded soft row, as on the CPU, so `hard` is exactly its one-hot.
    ArgMax best{KD_NEG_INF, 0x7fffffff};
    for (int j = team.lane; j < v; j += team.size) {
        float p = soft[base + j] * inv;
        soft[base + j] = p;
        if (p > best.v) best = ArgMax{p, j};
    }
    best = team.reduce(best, ArgMaxMerge{});
    const int arg = best.i < v ? best.i : 0;  // no value above -inf (a NaN row): the CPU keeps 0
    for (int j = team.lane; j < v; j += team.size) hard[base + j] = j == arg ? 1.f : 0.f;
}

// dlogits += inv_tau * soft * (dout - sum(dout * soft)), per row.
template <class Team>
__device__ __forceinline__ void gumbel_backward_row(const Team& team, int row, float* dlogits, const float* dout,
                                                    const float* soft, int v, float inv_tau) {
    const size_t base = (size_t)row * v;
    float dot = 0.f;
    for (int j = team.lane; j < v; j += team.size) dot += dout[base + j] * soft[base + j];
    dot = team.reduce(dot, KdSum{});
    for (int j = team.lane; j < v; j += team.size) {
        dlogits[base + j] += inv_tau * soft[base + j] * (dout[base + j] - dot);
    }
}

#define GUMBEL_FWD_PARAMS                                                                          \
    float *__restrict__ hard, float *__restrict__ soft, const float *__restrict__ logits, int rows, \
        int v, float tau, unsigned long long seed
#define GUMBEL_BWD_PARAMS                                                                                    \
    float *__restrict__ dlogits, const float *__restrict__ dout, const float *__restrict__ soft, int rows, \
        int v, float inv_tau

extern "C" __global__ void gumbel_forward_f32_warp(GUMBEL_FWD_PARAMS, int group) {
    GroupTeam team;
    int row = kd_group_row(group, rows, &team);
    if (row < 0) return;
    gumbel_forward_row(team, row, hard, soft, logits, v, tau, seed);
}

extern "C" __global__ void gumbel_forward_f32_block(GUMBEL_FWD_PARAMS) {
    if ((int)blockIdx.x >= rows) return;
    BlockTeam team{(int)threadIdx.x, (int)blockDim.x};
    gumbel_forward_row(team, blockIdx.x, hard, soft, logits, v, tau, seed);
}

extern "C" __global__ void gumbel_backward_f32_warp(GUMBEL_BWD_PARAMS, int group) {
    GroupTeam team;
    int row = kd_group_row(group, rows, &team);
    if (row < 0) return;
    gumbel_backward_row(team, row, dlogits, dout, soft, v, inv_tau);
}

extern "C" __global__ void gumbel_backward_f32_block(GUMBEL_BWD_PARAMS) {
    if ((int)blockIdx.x >= rows) return;
    BlockTeam team{(int)threadIdx.x, (int)blockDim.x};
    gumbel_backward_row(team, blockIdx.x, dlogits, dout, soft, v, inv_tau);
}
