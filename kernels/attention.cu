// Fused scaled, masked multi-head attention, forward and backward: the GPU side of
// crates/kd-kernels/src/ops/attention.rs, which states the semantics and is the reference.
//
// q, k, v, out and their gradients are [B, L, H * Dh] (heads interleaved); probs and scores
// are [B, H, L, L]; mask is [B, L] (1 real, 0 pad) and adds (1 - m) * f32::MIN to the scores,
// so a query whose keys are all padded gets a uniform row, as in HF.
//
// A straightforward tiled version with the probabilities materialised (the flash-style path
// is later work). Every dot product and every accumulation runs in the CPU reference's order
// (over Dh for a dot, over keys / queries for a sum), and an accumulated gradient starts from
// the value already in memory, as the CPU's `+=` does.
//   attention_forward_f32:      block = (16 queries, head, batch): scores for all L keys in
//                               shared memory, softmax by warps, then probs . V;
//   attention_backward_dq_f32:  block = (16 queries, head, batch): dP = dO . V^T, the softmax
//                               backward dS = P (dP - rowdot) (+ dscores_extra), dq += scale dS K;
//                               rowdot (one float per query) is kept for the next kernel;
//   attention_backward_dkv_f32: block = (32 keys, head, batch): recomputes its columns of dS
//                               and adds dk += scale dS^T Q, dv += P^T dO, so no [L, L] scratch
//                               and no atomics are needed.
// With dropout (drop_p > 0) map element (b, h, i, j) at flat index ((b * H + h) * L + i) * L + j
// is dropped iff kd_uniform(seed, index) < drop_p, as in the CPU's AttentionDropout: the forward
// weights V by the dropped probabilities, `probs` keeps the undropped ones, and the backward
// redraws the same mask.
// Head dims up to ATT_MAX_DH; L is bounded only by shared memory (16 * L floats), which the
// host checks against the device.
#include "common.cuh"

#define ATT_THREADS 256
#define ATT_BQ 16   // queries per block (forward, dq)
#define ATT_BK 32   // keys per shared-memory chunk, and keys per block of the dkv kernel
#define ATT_BI 32   // queries per shared-memory chunk of the dkv kernel
#define ATT_MAX_DH 128
#define ATT_Q_OUTS (ATT_BQ * ATT_MAX_DH / ATT_THREADS)
#define ATT_K_OUTS (ATT_BK * ATT_MAX_DH / ATT_THREADS)

// Offset of head h's first value at token (b, i) of a [B, L, H * Dh] tensor.
__device__ __forceinline__ size_t att_tok(int b, int i, int h, int L, int H, int Dh) {
    return ((size_t)(b * L + i) * H + h) * Dh;
}

// Offset of row i of head h in batch b of a [B, H, L, L] tensor.
__device__ __forceinline__ size_t att_map_row(int b, int h, int i, int L, int H) {
    return (((size_t)b * H + h) * L + i) * L;
}

// Tokens [r0, r0 + count) of head h, batch b, into dst with row stride `stride`.
__device__ __forceinline__ void att_load(float* dst, int stride, const float* __restrict__ src, int b, int r0,
                                         int count, int h, int L, int H, int Dh) {
    for (int idx = threadIdx.x; idx < count * Dh; idx += blockDim.x) {
        int r = idx / Dh, d = idx % Dh;
        dst[r * stride + d] = src[att_tok(b, r0 + r, h, L, H, Dh) + d];
    }
}

// s[i][j] = a_i . kv_j for the block's `rows` rows (a: [rows][Dh]) and all L keys, key chunks
// staged through skv ([ATT_BK][Dh + 1], padded against bank conflicts); `finish` maps
// (i, j, dot) to the stored value.
template <class Finish>
__device__ __forceinline__ void att_row_dots(float* s, const float* a, float* skv, const float* __restrict__ kv,
                                             int b, int h, int rows, int L, int H, int Dh, Finish finish) {
    for (int j0 = 0; j0 < L; j0 += ATT_BK) {
        int keys = min(ATT_BK, L - j0);
        __syncthreads();  // the previous chunk is consumed, `a` is written
        att_load(skv, Dh + 1, kv, b, j0, keys, h, L, H, Dh);
        __syncthreads();
        for (int idx = threadIdx.x; idx < rows * ATT_BK; idx += blockDim.x) {
            int i = idx / ATT_BK, jj = idx % ATT_BK;
            if (jj >= keys) continue;
            const float* ai = a + i * Dh;
            const float* kj = skv + jj * (Dh + 1);
            float acc = 0.f;
            for (int d = 0; d < Dh; ++d) acc += ai[d] * kj[d];
            s[i * L + j0 + jj] = finish(i, j0 + jj, acc);
        }
    }
    __syncthreads();
}

// acc[r] (output r of this thread: row i, dim d, idx = tid + r * ATT_THREADS < rows * Dh)
// += sum over keys j of (coef * s[i][j]) * kv_j[d], keys in order.
__device__ __forceinline__ void att_rows_times_kv(float (&acc)[ATT_Q_OUTS], const float* s, float coef, float* skv,
                                                  const float* __restrict__ kv, int b, int h, int rows, int L, int H,
                                                  int Dh) {
    for (int j0 = 0; j0 < L; j0 += ATT_BK) {
        int keys = min(ATT_BK, L - j0);
        __syncthreads();
        att_load(skv, Dh + 1, kv, b, j0, keys, h, L, H, Dh);
        __syncthreads();
#pragma unroll
        for (int r = 0; r < ATT_Q_OUTS; ++r) {
            int idx = threadIdx.x + r * ATT_THREADS;
            if (idx >= rows * Dh) continue;
            int i = idx / Dh, d = idx % Dh;
            const float* si = s + i * L + j0;
            for (int jj = 0; jj < keys; ++jj) acc[r] += (coef * si[jj]) * skv[jj * (Dh + 1) + d];
        }
    }
}

struct AttScore {
    const float* mask_row;
    float scale;
    __device__ __forceinline__ float operator()(int, int j, float dot) const {
        return dot * scale + (1.f - mask_row[j]) * KD_F32_MIN;
    }
};

// The factor map element `index` is multiplied by: 0 when dropped, 1 / (1 - p) when kept, and
// exactly 1 without dropout.
__device__ __forceinline__ float att_keep(float drop_p, unsigned long long seed, size_t index) {
    if (drop_p <= 0.f) return 1.f;
    return kd_uniform(seed, index) < drop_p ? 0.f : 1.f / (1.f - drop_p);
}

struct AttPlain {
    __device__ __forceinline__ float operator()(int, int, float dot) const { return dot; }
};

extern "C" __global__ void attention_forward_f32(float* __restrict__ out, float* __restrict__ probs,
                                                 float* __restrict__ scores, const float* __restrict__ q,
                                                 const float* __restrict__ k, const float* __restrict__ v,
                                                 const float* __restrict__ mask, int L, int H, int Dh, float scale,
                                                 float drop_p, unsigned long long seed) {
    extern __shared__ float smem[];
    float* sq = smem;                     // [ATT_BQ][Dh]
    float* skv = sq + ATT_BQ * Dh;        // [ATT_BK][Dh + 1]
    float* ss = skv + ATT_BK * (Dh + 1);  // [ATT_BQ][L]
    const int q0 = blockIdx.x * ATT_BQ, h = blockIdx.y, b = blockIdx.z;
    const int rows = min(ATT_BQ, L - q0);

    att_load(sq, Dh, q, b, q0, rows, h, L, H, Dh);
    att_row_dots(ss, sq, skv, k, b, h, rows, L, H, Dh, AttScore{mask + (size_t)b * L, scale});

    // Softmax of each row (softmax_in_place), one warp per row; scores are the pre-softmax row.
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const GroupTeam team{lane, 32, KD_FULL_MASK};
    for (int i = warp; i < rows; i += ATT_THREADS / 32) {
        float* row = ss + i * L;
        const size_t map = att_map_row(b, h, q0 + i, L, H);
        float mx = KD_NEG_INF;
        for (int j = lane; j < L; j += 32) {
            if (scores) scores[map + j] = row[j];
            mx = fmaxf(mx, row[j]);
        }
        mx = team.reduce(mx, KdMax{});
        float sum = 0.f;
        for (int j = lane; j < L; j += 32) {
            float e = expf(row[j] - mx);
            row[j] = e;
            sum += e;
        }
        float inv = 1.f / team.reduce(sum, KdSum{});
        for (int j = lane; j < L; j += 32) {
            float p = row[j] * inv;
            probs[map + j] = p;
            row[j] = p * att_keep(drop_p, seed, map + j);
        }
    }

    float acc[ATT_Q_OUTS];
#pragma unroll
    for (int r = 0; r < ATT_Q_OUTS; ++r) acc[r] = 0.f;
    att_rows_times_kv(acc, ss, 1.f, skv, v, b, h, rows, L, H, Dh);
#pragma unroll
    for (int r = 0; r < ATT_Q_OUTS; ++r) {
        int idx = threadIdx.x + r * ATT_THREADS;
        if (idx < rows * Dh) out[att_tok(b, q0 + idx / Dh, h, L, H, Dh) + idx % Dh] = acc[r];
    }
}

extern "C" __global__ void attention_backward_dq_f32(float* __restrict__ dq, float* __restrict__ rowdot,
                                                     const float* __restrict__ dout, const float* __restrict__ k,
                                                     const float* __restrict__ v, const float* __restrict__ probs,
                                                     const float* __restrict__ extra, int L, int H, int Dh,
                                                     float scale, float drop_p, unsigned long long seed) {
    extern __shared__ float smem[];
    float* sdo = smem;                    // [ATT_BQ][Dh]
    float* skv = sdo + ATT_BQ * Dh;       // [ATT_BK][Dh + 1]
    float* ss = skv + ATT_BK * (Dh + 1);  // [ATT_BQ][L]: dP, then dS
    const int q0 = blockIdx.x * ATT_BQ, h = blockIdx.y, b = blockIdx.z;
    const int rows = min(ATT_BQ, L - q0);

    att_load(sdo, Dh, dout, b, q0, rows, h, L, H, Dh);
    att_row_dots(ss, sdo, skv, v, b, h, rows, L, H, Dh, AttPlain{});

    // dP = mask (dO . V^T) / (1 - p), then dS = P (dP - P . dP) (+ extra), one warp per row.
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const GroupTeam team{lane, 32, KD_FULL_MASK};
    for (int i = warp; i < rows; i += ATT_THREADS / 32) {
        float* row = ss + i * L;
        const size_t map = att_map_row(b, h, q0 + i, L, H);
        float rd = 0.f;
        for (int j = lane; j < L; j += 32) {
            row[j] *= att_keep(drop_p, seed, map + j);
            rd += probs[map + j] * row[j];
        }
        rd = team.reduce(rd, KdSum{});
        if (lane == 0) rowdot[((size_t)b * H + h) * L + q0 + i] = rd;
        for (int j = lane; j < L; j += 32) {
            float ds = probs[map + j] * (row[j] - rd);
            if (extra) ds += extra[map + j];
            row[j] = ds;
        }
    }

    float acc[ATT_Q_OUTS];
#pragma unroll
    for (int r = 0; r < ATT_Q_OUTS; ++r) {
        int idx = threadIdx.x + r * ATT_THREADS;
        acc[r] = idx < rows * Dh ? dq[att_tok(b, q0 + idx / Dh, h, L, H, Dh) + idx % Dh] : 0.f;
    }
    att_rows_times_kv(acc, ss, scale, skv, k, b, h, rows, L, H, Dh);
#pragma unroll
    for (int r = 0; r < ATT_Q_OUTS; ++r) {
        int idx = threadIdx.x + r * ATT_THREADS;
        if (idx < rows * Dh) dq[att_tok(b, q0 + idx / Dh, h, L, H, Dh) + idx % Dh] = acc[r];
    }
}

extern "C" __global__ void attention_backward_dkv_f32(float* __restrict__ dk, float* __restrict__ dv,
                                                      const float* __restrict__ rowdot,
                                                      const float* __restrict__ dout, const float* __restrict__ q,
                                                      const float* __restrict__ v, const float* __restrict__ probs,
                                                      const float* __restrict__ extra, int L, int H, int Dh,
                                                      float scale, float drop_p, unsigned long long seed) {
    extern __shared__ float smem[];
    float* sv = smem;                        // [ATT_BK][Dh + 1]: this block's keys' values
    float* sq = sv + ATT_BK * (Dh + 1);      // [ATT_BI][Dh]
    float* sdo = sq + ATT_BI * Dh;           // [ATT_BI][Dh]
    float* sp = sdo + ATT_BI * Dh;           // [ATT_BI][ATT_BK + 1]: P tile, then dropped P
    float* sds = sp + ATT_BI * (ATT_BK + 1);  // [ATT_BI][ATT_BK + 1]: dS tile
    const int j0 = blockIdx.x * ATT_BK, h = blockIdx.y, b = blockIdx.z;
    const int keys = min(ATT_BK, L - j0);
    const float* rd = rowdot + ((size_t)b * H + h) * L;

    att_load(sv, Dh + 1, v, b, j0, keys, h, L, H, Dh);
    float acc_k[ATT_K_OUTS], acc_v[ATT_K_OUTS];
#pragma unroll
    for (int r = 0; r < ATT_K_OUTS; ++r) {
        int idx = threadIdx.x + r * ATT_THREADS;
        bool mine = idx < keys * Dh;
        size_t at = mine ? att_tok(b, j0 + idx / Dh, h, L, H, Dh) + idx % Dh : 0;
        acc_k[r] = mine ? dk[at] : 0.f;
        acc_v[r] = mine ? dv[at] : 0.f;
    }

    for (int i0 = 0; i0 < L; i0 += ATT_BI) {
        const int rows = min(ATT_BI, L - i0);
        __syncthreads();  // the previous chunk is consumed (and sv is written)
        att_load(sq, Dh, q, b, i0, rows, h, L, H, Dh);
        att_load(sdo, Dh, dout, b, i0, rows, h, L, H, Dh);
        for (int idx = threadIdx.x; idx < rows * ATT_BK; idx += ATT_THREADS) {
            int ii = idx / ATT_BK, jj = idx % ATT_BK;
            if (jj < keys) sp[ii * (ATT_BK + 1) + jj] = probs[att_map_row(b, h, i0 + ii, L, H) + j0 + jj];
        }
        __syncthreads();
        // This block's columns of dS, as attention_backward_dq_f32 computes them; each P entry is
        // then replaced by its dropped value, which dv needs.
        for (int idx = threadIdx.x; idx < rows * ATT_BK; idx += ATT_THREADS) {
            int ii = idx / ATT_BK, jj = idx % ATT_BK;
            if (jj >= keys) continue;
            const float* doi = sdo + ii * Dh;
            const float* vj = sv + jj * (Dh + 1);
            float dp = 0.f;
            for (int d = 0; d < Dh; ++d) dp += doi[d] * vj[d];
            const size_t at = att_map_row(b, h, i0 + ii, L, H) + j0 + jj;
            const float keep = att_keep(drop_p, seed, at);
            float* p = sp + ii * (ATT_BK + 1) + jj;
            float ds = *p * (dp * keep - rd[i0 + ii]);
            if (extra) ds += extra[at];
            sds[ii * (ATT_BK + 1) + jj] = ds;
            *p *= keep;
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < ATT_K_OUTS; ++r) {
            int idx = threadIdx.x + r * ATT_THREADS;
            if (idx >= keys * Dh) continue;
            int jj = idx / Dh, d = idx % Dh;
            for (int ii = 0; ii < rows; ++ii) {
                acc_v[r] += sp[ii * (ATT_BK + 1) + jj] * sdo[ii * Dh + d];
                acc_k[r] += (scale * sds[ii * (ATT_BK + 1) + jj]) * sq[ii * Dh + d];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ATT_K_OUTS; ++r) {
        int idx = threadIdx.x + r * ATT_THREADS;
        if (idx >= keys * Dh) continue;
        size_t at = att_tok(b, j0 + idx / Dh, h, L, H, Dh) + idx % Dh;
        dk[at] = acc_k[r];
        dv[at] = acc_v[r];
    }
}
