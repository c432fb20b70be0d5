// Supervised losses of the task heads: the GPU side of
// crates/kd-kernels/src/ops/cross_entropy.rs, which states the maths and is the reference.
//
// cross_entropy_f32_{warp,block}: one row of logits per team (as in softmax_kl.cu), hard labels
// (`labels` non-null) or soft targets (`soft` non-null), per-row weights. A first read of the
// row takes the online max / sum (and the soft targets' mass), a second read, from cache, the
// negative log-likelihood and the gradient. A hard label >= C is not checked on the host (that
// would need a synchronising copy): its row's loss is NaN and it gets no gradient.
// mse_loss_f32: regression loss, one thread per example.
#include "common.cuh"

struct CeStats {
    float max;   // running max of the logits (from f32::MIN, as the CPU's fold)
    float sum;   // sum exp(z - max)
    float mass;  // sum of the non-zero soft targets
};

struct CeMerge {
    __device__ __forceinline__ CeStats operator()(const CeStats& a, const CeStats& b) const {
        CeStats r;
        r.max = fmaxf(a.max, b.max);
        r.sum = a.sum * expf(a.max - r.max) + b.sum * expf(b.max - r.max);
        r.mass = a.mass + b.mass;
        return r;
    }
};

struct CeArgs {
    float* loss;              // [N], overwritten
    float* dz;                // [N, C] or null, accumulated
    const float* z;           // [N, C]
    const unsigned* labels;   // [N] or null
    const float* soft;        // [N, C] or null
    const float* w;           // [N] or null (all 1)
    int c;
    float grad_scale;
};

template <class Team>
__device__ __forceinline__ void ce_row(const Team& team, int row, const CeArgs& a) {
    float w = a.w ? a.w[row] : 1.f;
    if (w == 0.f) {
        if (team.lane == 0) a.loss[row] = 0.f;
        return;
    }
    const size_t base = (size_t)row * a.c;
    const float* z = a.z + base;
    const float* y = a.soft ? a.soft + base : nullptr;
    unsigned label = a.labels ? a.labels[row] : 0u;
    if (a.labels && label >= (unsigned)a.c) {
        if (team.lane == 0) a.loss[row] = KD_NAN;
        return;
    }

    CeStats st;
    st.max = KD_F32_MIN;
    st.sum = 0.f;
    st.mass = 0.f;
    for (int i = team.lane; i < a.c; i += team.size) {
        float zi = z[i];
        if (zi > st.max) {
            st.sum *= expf(st.max - zi);
            st.max = zi;
        }
        st.sum += expf(zi - st.max);
        if (y && y[i] != 0.f) st.mass += y[i];
    }
    st = team.reduce(st, CeMerge{});
    if (!y) st.mass = 1.f;
    float lse = st.max + logf(st.sum);

    // -sum_c y_c (z_c - lse); a zero target skips its term so a masked -inf logit is no NaN.
    float nll;
    if (y) {
        nll = 0.f;
        for (int i = team.lane; i < a.c; i += team.size) {
            if (y[i] != 0.f) nll += y[i] * (lse - z[i]);
        }
        nll = team.reduce(nll, KdSum{});
    } else {
        nll = lse - z[label];
    }
    if (team.lane == 0) a.loss[row] = w * nll;
    if (!a.dz) return;

    float scale = a.grad_scale * w;
    float inv_sum = 1.f / st.sum;
    for (int i = team.lane; i < a.c; i += team.size) {
        float yi = y ? y[i] : ((unsigned)i == label ? 1.f : 0.f);
        a.dz[base + i] += scale * (st.mass * expf(z[i] - st.max) * inv_sum - yi);
    }
}

#define CE_PARAMS                                                                                   \
    float *__restrict__ loss, float *__restrict__ dz, const float *__restrict__ z,                  \
        const unsigned *__restrict__ labels, const float *__restrict__ soft,                        \
        const float *__restrict__ w, int rows, int c, float grad_scale
#define CE_ARGS CeArgs{loss, dz, z, labels, soft, w, c, grad_scale}

extern "C" __global__ void cross_entropy_f32_warp(CE_PARAMS, int group) {
    GroupTeam team;
    int row = kd_group_row(group, rows, &team);
    if (row < 0) return;
    ce_row(team, row, CE_ARGS);
}

extern "C" __global__ void cross_entropy_f32_block(CE_PARAMS) {
    if ((int)blockIdx.x >= rows) return;
    BlockTeam team{(int)threadIdx.x, (int)blockDim.x};
    ce_row(team, blockIdx.x, CE_ARGS);
}

extern "C" __global__ void mse_loss_f32(float* __restrict__ loss, float* __restrict__ dpred,
                                        const float* __restrict__ pred, const float* __restrict__ target,
                                        const float* __restrict__ w, int n, float grad_scale) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float wi = w ? w[i] : 1.f;
    if (wi == 0.f) {
        loss[i] = 0.f;
        return;
    }
    float diff = pred[i] - target[i];
    loss[i] = wi * diff * diff;
    if (dpred) dpred[i] += grad_scale * wi * 2.f * diff;
}
