// Fused softmax-KL with temperature, forward and backward in one launch: the GPU side of
// crates/kd-kernels/src/ops/softmax_kl.rs, which states the maths and is the reference.
//
// Each thread scans its strided share of a row with the same online update as the CPU's
// RowScan (running maxima of the raw logits, sums rescaled when the maximum moves), the
// partial scans are merged exactly (a merge is the online update applied to a whole partial
// state), and a second read of the row, from L1/L2, writes the gradients. Two launch shapes:
//   softmax_kl_f32_warp:  `group` lanes of a warp (a power of two <= 32) per row, several rows
//                         per warp when rows are short, for rows up to 1,024 classes (labels,
//                         attention keys);
//   softmax_kl_f32_block: one block per row, for vocabulary-wide rows (30,522).
// Masked entries (f32::MIN or -inf in both rows) get zero teacher probability and so add 0 to
// the loss and to both gradients; a row of only f32::MIN is uniform, as on the CPU.
#include "common.cuh"

struct KlStats {
    float max_t;  // teacher: max logit, sum e, sum e x, sum e (z_t - z_s) / T
    float sum_t;  //   with x = (z_t - max_t) / T, e = exp x
    float ent_t;
    float cross;
    float max_s;  // student: max logit, sum exp((z_s - max_s) / T)
    float sum_s;
};

__device__ __forceinline__ KlStats kl_empty() {
    KlStats r;
    r.max_t = KD_F32_MIN;
    r.sum_t = 0.f;
    r.ent_t = 0.f;
    r.cross = 0.f;
    r.max_s = KD_F32_MIN;
    r.sum_s = 0.f;
    return r;
}

// RowScan::new's loop body for one (student, teacher) pair of logits.
__device__ __forceinline__ void kl_push(KlStats& r, float s, float t, float inv_t) {
    if (t > r.max_t) {
        float shift = (r.max_t - t) * inv_t;
        float rescale = expf(shift);
        r.ent_t = rescale > 0.f ? rescale * (r.ent_t + r.sum_t * shift) : 0.f;
        r.sum_t *= rescale;
        r.cross *= rescale;
        r.max_t = t;
    }
    float x = (t - r.max_t) * inv_t;
    float e = expf(x);
    if (e > 0.f) {
        r.sum_t += e;
        r.ent_t += e * x;
        r.cross += e * (t - s) * inv_t;
    }
    if (s > r.max_s) {
        r.sum_s *= expf((r.max_s - s) * inv_t);
        r.max_s = s;
    }
    r.sum_s += expf((s - r.max_s) * inv_t);
}

// Moves a partial teacher state to the maximum m and adds it to r (the rescale step of kl_push).
__device__ __forceinline__ void kl_add_teacher(KlStats& r, const KlStats& a, float m, float inv_t) {
    float shift = (a.max_t - m) * inv_t;
    float rescale = expf(shift);
    r.ent_t += rescale > 0.f ? rescale * (a.ent_t + a.sum_t * shift) : 0.f;
    r.sum_t += a.sum_t * rescale;
    r.cross += a.cross * rescale;
}

struct KlMerge {
    float inv_t;
    __device__ __forceinline__ KlStats operator()(const KlStats& a, const KlStats& b) const {
        KlStats r = kl_empty();
        r.max_t = fmaxf(a.max_t, b.max_t);
        kl_add_teacher(r, a, r.max_t, inv_t);
        kl_add_teacher(r, b, r.max_t, inv_t);
        r.max_s = fmaxf(a.max_s, b.max_s);
        r.sum_s = a.sum_s * expf((a.max_s - r.max_s) * inv_t) + b.sum_s * expf((b.max_s - r.max_s) * inv_t);
        return r;
    }
};

struct KlArgs {
    float* loss;          // [R], overwritten
    float* ds;            // [R, C] or null, accumulated
    float* dt;            // [R, C] or null, accumulated
    const float* zs;      // [R, C]
    const float* zt;      // [R, C]
    const float* w;       // [R] or null (all 1)
    int c;
    float t;
    float inv_t;          // 1 / t, computed on the host as the CPU reference does
    int form;             // 0: KL, 1: cross-entropy form
    float grad_scale;
};

template <class Team>
__device__ __forceinline__ void kl_row(const Team& team, int row, const KlArgs& a) {
    float w = a.w ? a.w[row] : 1.f;
    if (w == 0.f) {
        if (team.lane == 0) a.loss[row] = 0.f;
        return;
    }
    const size_t base = (size_t)row * a.c;
    const float* zs = a.zs + base;
    const float* zt = a.zt + base;
    const float inv_t = a.inv_t;
    KlStats st = kl_empty();
    for (int i = team.lane; i < a.c; i += team.size) kl_push(st, zs[i], zt[i], inv_t);
    st = team.reduce(st, KlMerge{inv_t});

    // RowScan::log_norm_gap and RowScan::divergence.
    float gap = (st.max_s - st.max_t) * inv_t + logf(st.sum_s) - logf(st.sum_t);
    float div = st.cross / st.sum_t + gap;
    if (a.form == 1) div = div + logf(st.sum_t) - st.ent_t / st.sum_t;
    if (team.lane == 0) a.loss[row] = w * a.t * a.t * div;
    if (!a.ds && !a.dt) return;

    // RowScan::gradients.
    float scale = a.grad_scale * w * a.t;
    float inv_sum_t = 1.f / st.sum_t, inv_sum_s = 1.f / st.sum_s, log_sum_s = logf(st.sum_s);
    for (int i = team.lane; i < a.c; i += team.size) {
        float s = zs[i], t = zt[i];
        float pt = expf((t - st.max_t) * inv_t) * inv_sum_t;
        float rel_s = (s - st.max_s) * inv_t;
        if (a.ds) a.ds[base + i] += scale * (expf(rel_s) * inv_sum_s - pt);
        // p_t = 0 has no gradient; d there may be -inf - -inf.
        if (a.dt && pt > 0.f) {
            float d = a.form == 0 ? (t - s) * inv_t + gap : log_sum_s - rel_s;
            a.dt[base + i] += scale * pt * (d - div);
        }
    }
}

// Flat parameter lists (not KlArgs by value) so that the host passes each buffer through
// cudarc's launch builder, which orders it against other streams.
#define KL_PARAMS                                                                                    \
    float *__restrict__ loss, float *__restrict__ ds, float *__restrict__ dt,                        \
        const float *__restrict__ zs, const float *__restrict__ zt, const float *__restrict__ w,     \
        int rows, int c, float t, float inv_t, int form, float grad_scale
#define KL_ARGS KlArgs{loss, ds, dt, zs, zt, w, c, t, inv_t, form, grad_scale}

extern "C" __global__ void softmax_kl_f32_warp(KL_PARAMS, int group) {
    GroupTeam team;
    int row = kd_group_row(group, rows, &team);
    if (row < 0) return;
    kl_row(team, row, KL_ARGS);
}

extern "C" __global__ void softmax_kl_f32_block(KL_PARAMS) {
    if ((int)blockIdx.x >= rows) return;
    BlockTeam team{(int)threadIdx.x, (int)blockDim.x};
    kl_row(team, blockIdx.x, KL_ARGS);
}
