// Scaled, masked multi-head attention, forward and backward: the GPU side of
// crates/kd-kernels/src/ops/attention.rs, which states the semantics and is the reference.
//
// q, k, v, out and their gradients are [B, L, H * Dh] (heads interleaved); probs and scores
// are [B, H, L, L]; mask is [B, L] (1 real, 0 pad) and adds (1 - m) * f32::MIN to the scores,
// so a query whose keys are all padded gets a uniform row, as in HF.
//
// The probabilities are materialised, as in HF's eager attention: the four kinds of matrix
// product (q k^T, P v, and the backward's dO v^T, P^T dO, dS k, dS^T q) run in cuBLAS over all
// B * H heads at once (cublasSgemmBatched, plain fp32), and these kernels do the rest:
//   attention_pointers_f32:         the pointer arrays those products read, one address per
//                                   head of each operand, written into the host's scratch;
//   attention_softmax_f32:          one warp per map row: the cuBLAS scores plus the mask,
//                                   optionally kept as `scores`, softmax into `probs`, and with
//                                   dropout the dropped probabilities for P v;
//   attention_softmax_backward_f32: one warp per map row: dP (from cuBLAS) times the dropout
//                                   factor, dS = P (dP - P . dP) (+ dscores_extra) in place, and
//                                   with dropout the dropped probabilities for P^T dO.
// With dropout (drop_p > 0) map element (b, h, i, j) at flat index ((b * H + h) * L + i) * L + j
// is dropped iff kd_uniform(seed, index) < drop_p, as in the CPU's AttentionDropout: the forward
// weights v by the dropped probabilities, `probs` keeps the undropped ones, and the backward
// redraws the same mask.
#include "common.cuh"

// The most operands one call's products read (the backward's q, k, v, dout, dq, dk, dv, dS and
// the weights of dv); ATT_OPERANDS in attention.rs.
#define ATT_OPERANDS 9

// Each operand's head (b, h) is the matrix at base + b * batch_stride + h * head_stride floats
// (an activation: L * H * Dh and Dh; a map: H * L * L and L * L); the host zeroes unused slots.
struct AttOperands {
    unsigned long long base[ATT_OPERANDS];
    unsigned long long batch_stride[ATT_OPERANDS];
    unsigned long long head_stride[ATT_OPERANDS];
};

// ptrs[t * B * H + b * H + h]: the address of head (b, h) of operand t, one thread each.
extern "C" __global__ void attention_pointers_f32(unsigned long long* __restrict__ ptrs, AttOperands ops,
                                                  int operands, int heads_total, int H) {
    const long long idx = kd_element_index();
    if (idx >= (long long)operands * heads_total) return;
    const int t = (int)(idx / heads_total), bh = (int)(idx % heads_total);
    const unsigned long long b = bh / H, h = bh % H;
    ptrs[idx] = ops.base[t] + (b * ops.batch_stride[t] + h * ops.head_stride[t]) * sizeof(float);
}

// The factor map element `index` is multiplied by: 0 when dropped, 1 / (1 - p) when kept, and
// exactly 1 without dropout.
__device__ __forceinline__ float att_keep(float drop_p, unsigned long long seed, size_t index) {
    if (drop_p <= 0.f) return 1.f;
    return kd_uniform(seed, index) < drop_p ? 0.f : 1.f / (1.f - drop_p);
}

// Row r = (b * H + h) * L + i of the maps, for r < rows = B * H * L; hl = H * L. On entry probs
// holds scale * q . k^T; softmax_in_place's steps follow, each lane rereading only its own
// elements. scores and dropped may be null.
extern "C" __global__ void attention_softmax_f32(float* __restrict__ probs, float* __restrict__ scores,
                                                 float* __restrict__ dropped, const float* __restrict__ mask,
                                                 int rows, int L, int hl, float drop_p, unsigned long long seed) {
    GroupTeam team;
    const int row = kd_group_row(32, rows, &team);
    if (row < 0) return;
    const size_t base = (size_t)row * L;
    float* p = probs + base;
    const float* m = mask + (size_t)(row / hl) * L;
    float mx = KD_NEG_INF;
    for (int j = team.lane; j < L; j += 32) {
        float s = p[j] + (1.f - m[j]) * KD_F32_MIN;
        p[j] = s;
        if (scores) scores[base + j] = s;
        mx = fmaxf(mx, s);
    }
    mx = team.reduce(mx, KdMax{});
    float sum = 0.f;
    for (int j = team.lane; j < L; j += 32) {
        float e = expf(p[j] - mx);
        p[j] = e;
        sum += e;
    }
    const float inv = 1.f / team.reduce(sum, KdSum{});
    for (int j = team.lane; j < L; j += 32) {
        float pj = p[j] * inv;
        p[j] = pj;
        if (dropped) dropped[base + j] = pj * att_keep(drop_p, seed, base + j);
    }
}

// Row r of the maps: on entry ds holds dO . v^T; the CPU's softmax backward follows. extra and
// dropped may be null.
extern "C" __global__ void attention_softmax_backward_f32(float* __restrict__ ds, float* __restrict__ dropped,
                                                          const float* __restrict__ probs,
                                                          const float* __restrict__ extra, int rows, int L,
                                                          float drop_p, unsigned long long seed) {
    GroupTeam team;
    const int row = kd_group_row(32, rows, &team);
    if (row < 0) return;
    const size_t base = (size_t)row * L;
    float* d = ds + base;
    const float* p = probs + base;
    float rowdot = 0.f;
    for (int j = team.lane; j < L; j += 32) rowdot += p[j] * (d[j] * att_keep(drop_p, seed, base + j));
    rowdot = team.reduce(rowdot, KdSum{});
    for (int j = team.lane; j < L; j += 32) {
        const float keep = att_keep(drop_p, seed, base + j);
        float g = p[j] * (d[j] * keep - rowdot);
        if (extra) g += extra[base + j];
        d[j] = g;
        if (dropped) dropped[base + j] = p[j] * keep;
    }
}
