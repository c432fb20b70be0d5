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
//                                   optionally kept as `scores`, softmax into `probs`, optionally
//                                   the row's (max, sum) statistics (see the flash path), and
//                                   with dropout the dropped probabilities for P v;
//   attention_softmax_backward_f32: one warp per map row: dP (from cuBLAS) times the dropout
//                                   factor, dS = P (dP - P . dP) (+ dscores_extra) in place, and
//                                   with dropout the dropped probabilities for P^T dO.
// With dropout (drop_p > 0) map element (b, h, i, j) at flat index ((b * H + h) * L + i) * L + j
// is dropped iff kd_uniform(seed, index) < drop_p, as in the CPU's AttentionDropout: the forward
// weights v by the dropped probabilities, `probs` keeps the undropped ones, and the backward
// redraws the same mask.
//
// The flash path (the second half of this file) computes the same attention without the maps.
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
// elements. scores, stats and dropped may be null.
extern "C" __global__ void attention_softmax_f32(float* __restrict__ probs, float* __restrict__ scores,
                                                 float* __restrict__ stats, float* __restrict__ dropped,
                                                 const float* __restrict__ mask, int rows, int L, int hl,
                                                 float drop_p, unsigned long long seed) {
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
    sum = team.reduce(sum, KdSum{});
    if (stats && team.lane == 0) {
        stats[2 * (size_t)row] = mx;
        stats[2 * (size_t)row + 1] = sum;
    }
    const float inv = 1.f / sum;
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

// ---------------------------------------------------------------------------------------------
// The flash path: the same attention without the [B, H, L, L] maps, FlashAttention-2's schedule
// on the CUDA cores (fp32 FMA). The semantics are the CPU reference's, padding masks, fully
// padded rows and dropout included; crates/kd-kernels/tests/flash_attention_algorithm.rs runs
// these loops (tiles, update order, tails) on the CPU against the reference.
//
// Every block is FA_THREADS threads on one (b, h) and a tile of FA_TILE rows (queries for the
// forward and dq, keys for dk/dv); the other side streams through shared memory FA_TILE rows at
// a time. Thread (tr, tc) = (tid / 16, tid % 16) holds a 4 x 4 register tile of each 64 x 64
// score tile, rows tr + 16x and columns tc + 16y: the 16 lanes of a half warp share their rows
// (row max and sum by shuffles, no shared memory) and read 16 consecutive rows of the streamed
// tile, whose rows are padded by FA_PAD floats so those float4 reads hit distinct banks.
//
// stats [B, H, L, 2] holds each query row's max score m and sum l of exp(s - m), so that the
// backward's p = exp(s - m) * (1 / l) is softmax_in_place's formula. One logsumexp would not do:
// in a fully padded row every score is f32::MIN, f32::MIN + log L rounds back to f32::MIN, and
// the backward would get p = 1 where the reference has the uniform 1 / L.
//
//   attention_flash_forward_d{32,64}_f32: block = 64 queries. For each key tile: s = scale q.k
//       + the mask's offset (keys past L: -inf, so exp gives 0), the running max m, per-thread
//       partial sums of exp(s - m) and the output accumulators rescaled by exp(m_old - m_new),
//       then P (times the dropout factor) through shared memory into the accumulators.
//       Finally out = acc / l (l the half warp's sum of the partial sums) and stats.
//   attention_flash_rowdot_d{32,64}_f32: D = rowsum(dO * O) per query row, FlashAttention-2's
//       precomputation. With dropout O is the dropped output, and D is still the reference's
//       rowdot P . (Z * dO v^T) (Z the dropout factors).
//   attention_flash_dkv_d{32,64}_f32: block = 64 keys. For each query tile it recomputes s,
//       P = exp(s - m) / l and dP = dO . v^T, forms dS = P (Z dP - D), and accumulates
//       dv += (Z P)^T dO and dk += scale dS^T q in registers, added to memory once at the end.
//   attention_flash_dq_d{32,64}_f32: block = 64 queries. For each key tile it recomputes dS and
//       accumulates dq += scale dS k. dq takes this pass of its own (recomputing s and dP: 7 tile
//       products in the backward instead of 5) rather than FlashAttention-2's atomicAdd from the
//       dk/dv blocks, so every gradient element is written by one thread in a fixed order (the
//       backward is deterministic) and no per-key-tile partials of dq go through memory.
//
// Storage: q, k, v, out and dout go through FaIo<T>; shared memory, statistics and all
// arithmetic are f32, and the gradients f32. A bf16 variant is one line: specialise FaIo for
// __nv_bfloat16 (convert on load and store) and add FA_KERNELS(32, __nv_bfloat16, bf16) and
// FA_KERNELS(64, __nv_bfloat16, bf16). For bf16 the tile products (fa_dots, fa_rows_times,
// fa_cols_times) should then move to the tensor cores: mma.sync.m16n8k16 bf16 -> f32 with
// ldmatrix fragments from the same shared-memory tiles; masking, softmax and dropout stay.
#define FA_THREADS 256
#define FA_TILE 64
#define FA_PAD 4
#define FA_LDP (FA_TILE + FA_PAD)

// Dynamic shared memory of each kernel in floats (attention.rs's flash_shared_floats mirrors
// these): row tiles of DH + FA_PAD floats, score tiles of FA_LDP, vectors of FA_TILE.
#define FA_FORWARD_FLOATS(DH) (3 * FA_TILE * ((DH) + FA_PAD) + FA_TILE * FA_LDP + FA_TILE)
#define FA_DKV_FLOATS(DH) (4 * FA_TILE * ((DH) + FA_PAD) + 2 * FA_TILE * FA_LDP + 4 * FA_TILE)
#define FA_DQ_FLOATS(DH) (4 * FA_TILE * ((DH) + FA_PAD) + FA_TILE * FA_LDP + FA_TILE)

// n = 2 or 4 consecutive floats, 8- or 16-byte aligned, as one vector access.
template <int N>
__device__ __forceinline__ void fa_ld(float (&r)[N], const float* p) {
    static_assert(N == 2 || N == 4, "2 or 4 columns per thread");
    if constexpr (N == 4) {
        const float4 t = *reinterpret_cast<const float4*>(p);
        r[0] = t.x, r[1] = t.y, r[2] = t.z, r[3] = t.w;
    } else {
        const float2 t = *reinterpret_cast<const float2*>(p);
        r[0] = t.x, r[1] = t.y;
    }
}

template <int N>
__device__ __forceinline__ void fa_st(float* p, const float (&r)[N]) {
    if constexpr (N == 4) {
        *reinterpret_cast<float4*>(p) = make_float4(r[0], r[1], r[2], r[3]);
    } else {
        *reinterpret_cast<float2*>(p) = make_float2(r[0], r[1]);
    }
}

template <class T>
struct FaIo;

// 16-byte aligned loads of 4 values and stores of 2 or 4, as f32.
template <>
struct FaIo<float> {
    static __device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
    template <int N>
    static __device__ __forceinline__ void store(float* p, const float (&r)[N]) {
        fa_st(p, r);
    }
};

__device__ __forceinline__ float fa_comp(const float4& v, int k) { return k == 0 ? v.x : k == 1 ? v.y : k == 2 ? v.z : v.w; }

// The dropout factor of map element `index`, att_keep's with kd_uniform's first mix (of the seed
// alone) done once per thread instead of once per element.
struct FaDropout {
    unsigned long long key;
    float p, keep;
    __device__ FaDropout(float drop_p, unsigned long long seed)
        : key(kd_mix64(seed ^ 0x9e3779b97f4a7c15ull)), p(drop_p), keep(1.f / (1.f - drop_p)) {}
    __device__ __forceinline__ float factor(unsigned long long index) const {
        if (p <= 0.f) return 1.f;
        const float u = (float)(kd_mix64(key + index) >> 40) * (1.0f / 16777216.0f);
        return u < p ? 0.f : keep;
    }
};

// Merges v over the 16 lanes of this half warp; every lane gets the same bits (each butterfly
// step adds the same two values on both lanes). All 32 lanes must take part.
template <class Merge>
__device__ __forceinline__ float fa_row_reduce(float v, Merge merge) {
    for (int off = 8; off > 0; off >>= 1) v = merge(v, __shfl_xor_sync(KD_FULL_MASK, v, off));
    return v;
}

// Rows r0 .. r0 + FA_TILE of one head of a [B, L, H * DH] tensor (`head`: its row 0, rows hd
// apart) into shared memory rows DH + FA_PAD apart; rows past L are zeros.
template <int DH, class T>
__device__ __forceinline__ void fa_load_tile(float* dst, const T* __restrict__ head, int hd, int r0, int L) {
    constexpr int V = DH / 4;
    for (int idx = threadIdx.x; idx < FA_TILE * V; idx += FA_THREADS) {
        const int r = idx / V, c = (idx % V) * 4;
        float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
        if (r0 + r < L) x = FaIo<T>::load4(head + (size_t)(r0 + r) * hd + c);
        *reinterpret_cast<float4*>(dst + r * (DH + FA_PAD) + c) = x;
    }
}

// bias[j]: the mask's offset (1 - m) * f32::MIN for key j0 + j, or -inf past L.
__device__ __forceinline__ void fa_load_bias(float* bias, const float* __restrict__ mask_row, int j0, int L) {
    if (threadIdx.x < FA_TILE) {
        const int j = j0 + threadIdx.x;
        bias[threadIdx.x] = j < L ? (1.f - mask_row[j]) * KD_F32_MIN : KD_NEG_INF;
    }
}

// acc[x][y] += sum over d, in order, of a[tr + 16x][d] * b[tc + 16y][d] (rows DH + FA_PAD apart).
template <int DH>
__device__ __forceinline__ void fa_dots(float (&acc)[4][4], const float* a, const float* b, int tr, int tc) {
    constexpr int LD = DH + FA_PAD;
#pragma unroll 2
    for (int d = 0; d < DH; d += 4) {
        float4 av[4], bv[4];
#pragma unroll
        for (int x = 0; x < 4; ++x) av[x] = *reinterpret_cast<const float4*>(a + (tr + 16 * x) * LD + d);
#pragma unroll
        for (int y = 0; y < 4; ++y) bv[y] = *reinterpret_cast<const float4*>(b + (tc + 16 * y) * LD + d);
#pragma unroll
        for (int k = 0; k < 4; ++k)
#pragma unroll
            for (int x = 0; x < 4; ++x)
#pragma unroll
                for (int y = 0; y < 4; ++y) acc[x][y] = fmaf(fa_comp(av[x], k), fa_comp(bv[y], k), acc[x][y]);
    }
}

// acc[x][c] += sum over j < FA_TILE, in order, of p[tr + 16x][j] * v[j][tc * CPT + c]
// (p rows FA_LDP apart, v rows DH + FA_PAD apart, CPT = DH / 16).
template <int DH>
__device__ __forceinline__ void fa_rows_times(float (&acc)[4][DH / 16], const float* p, const float* v, int tr,
                                              int tc) {
    constexpr int LD = DH + FA_PAD, CPT = DH / 16;
#pragma unroll 2
    for (int j = 0; j < FA_TILE; j += 4) {
        float4 pv[4];
#pragma unroll
        for (int x = 0; x < 4; ++x) pv[x] = *reinterpret_cast<const float4*>(p + (tr + 16 * x) * FA_LDP + j);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            float vv[CPT];
            fa_ld(vv, v + (j + k) * LD + tc * CPT);
#pragma unroll
            for (int x = 0; x < 4; ++x)
#pragma unroll
                for (int c = 0; c < CPT; ++c) acc[x][c] = fmaf(fa_comp(pv[x], k), vv[c], acc[x][c]);
        }
    }
}

// acc[a][c] += sum over i < FA_TILE, in order, of p[i][4 tr + a] * x[i][tc * CPT + c]: the
// transposed product of the dk/dv blocks, whose thread rows are the keys 4 tr .. 4 tr + 3.
template <int DH>
__device__ __forceinline__ void fa_cols_times(float (&acc)[4][DH / 16], const float* p, const float* x, int tr,
                                              int tc) {
    constexpr int LD = DH + FA_PAD, CPT = DH / 16;
#pragma unroll 4
    for (int i = 0; i < FA_TILE; ++i) {
        const float4 pv = *reinterpret_cast<const float4*>(p + i * FA_LDP + 4 * tr);
        float xv[CPT];
        fa_ld(xv, x + i * LD + tc * CPT);
#pragma unroll
        for (int a = 0; a < 4; ++a)
#pragma unroll
            for (int c = 0; c < CPT; ++c) acc[a][c] = fmaf(fa_comp(pv, a), xv[c], acc[a][c]);
    }
}

// The position of one flash block: head (b, h) = blockIdx.y, its tile blockIdx.x, the offset of
// the head's row 0 in [B, L, H * DH] tensors, and the thread's (tr, tc).
struct FaBlock {
    int bh, b, r0, hd, tr, tc;
    size_t head;
    __device__ FaBlock(int L, int H, int DH) {
        bh = blockIdx.y;
        b = bh / H;
        r0 = blockIdx.x * FA_TILE;
        hd = H * DH;
        head = (size_t)b * L * hd + (size_t)(bh % H) * DH;
        tr = threadIdx.x / 16;
        tc = threadIdx.x % 16;
    }
};

template <int DH, class T>
__device__ __forceinline__ void fa_forward(T* __restrict__ out, float* __restrict__ stats, const T* __restrict__ q,
                                           const T* __restrict__ k, const T* __restrict__ v,
                                           const float* __restrict__ mask, int L, int H, float scale, float drop_p,
                                           unsigned long long seed) {
    constexpr int LD = DH + FA_PAD, CPT = DH / 16;
    extern __shared__ float4 fa_shared[];
    float* qs = reinterpret_cast<float*>(fa_shared);
    float* ks = qs + FA_TILE * LD;
    float* vs = ks + FA_TILE * LD;
    float* ps = vs + FA_TILE * LD;
    float* bias = ps + FA_TILE * FA_LDP;
    const FaBlock blk(L, H, DH);
    const int tr = blk.tr, tc = blk.tc;
    const FaDropout drop(drop_p, seed);
    fa_load_tile<DH>(qs, q + blk.head, blk.hd, blk.r0, L);
    float m[4], l[4], acc[4][CPT];
#pragma unroll
    for (int x = 0; x < 4; ++x) {
        m[x] = KD_NEG_INF;
        l[x] = 0.f;
#pragma unroll
        for (int c = 0; c < CPT; ++c) acc[x][c] = 0.f;
    }
    for (int j0 = 0; j0 < L; j0 += FA_TILE) {
        __syncthreads();  // the previous tile's k, v and p are consumed (and q is written)
        fa_load_tile<DH>(ks, k + blk.head, blk.hd, j0, L);
        fa_load_tile<DH>(vs, v + blk.head, blk.hd, j0, L);
        fa_load_bias(bias, mask + (size_t)blk.b * L, j0, L);
        __syncthreads();
        float s[4][4] = {};
        fa_dots<DH>(s, qs, ks, tr, tc);
#pragma unroll
        for (int x = 0; x < 4; ++x) {
            float mx = m[x];
#pragma unroll
            for (int y = 0; y < 4; ++y) {
                s[x][y] = s[x][y] * scale + bias[tc + 16 * y];
                mx = fmaxf(mx, s[x][y]);
            }
            // Key j0 < L is in this tile and its score is finite, so mx is too.
            mx = fa_row_reduce(mx, KdMax{});
            const float rescale = expf(m[x] - mx);
            m[x] = mx;
            l[x] *= rescale;
#pragma unroll
            for (int c = 0; c < CPT; ++c) acc[x][c] *= rescale;
            const unsigned long long row = ((unsigned long long)blk.bh * L + blk.r0 + tr + 16 * x) * L + j0;
#pragma unroll
            for (int y = 0; y < 4; ++y) {
                const float p = expf(s[x][y] - mx);
                l[x] += p;
                ps[(tr + 16 * x) * FA_LDP + tc + 16 * y] = p * drop.factor(row + tc + 16 * y);
            }
        }
        __syncthreads();
        fa_rows_times<DH>(acc, ps, vs, tr, tc);
    }
#pragma unroll
    for (int x = 0; x < 4; ++x) {
        const float sum = fa_row_reduce(l[x], KdSum{});
        const int i = blk.r0 + tr + 16 * x;
        if (i >= L) continue;
        const float inv = 1.f / sum;
        float o[CPT];
#pragma unroll
        for (int c = 0; c < CPT; ++c) o[c] = acc[x][c] * inv;
        FaIo<T>::store(out + blk.head + (size_t)i * blk.hd + tc * CPT, o);
        if (tc == 0) {
            const size_t r = (size_t)blk.bh * L + i;
            stats[2 * r] = m[x];
            stats[2 * r + 1] = sum;
        }
    }
}

// One group of DH / 4 lanes per query row r = (b * L + i) * H + h, which is also the row's
// place in [B, L, H * DH]; D goes to [B, H, L].
template <int DH, class T>
__device__ __forceinline__ void fa_rowdot(float* __restrict__ drow, const T* __restrict__ dout,
                                          const T* __restrict__ out, int rows, int L, int H) {
    GroupTeam team;
    const int r = kd_group_row(DH / 4, rows, &team);
    if (r < 0) return;
    const float4 g = FaIo<T>::load4(dout + (size_t)r * DH + 4 * team.lane);
    const float4 o = FaIo<T>::load4(out + (size_t)r * DH + 4 * team.lane);
    float d = g.x * o.x;
    d = fmaf(g.y, o.y, d);
    d = fmaf(g.z, o.z, d);
    d = fmaf(g.w, o.w, d);
    d = team.reduce(d, KdSum{});
    if (team.lane == 0) {
        const int h = r % H, bi = r / H;
        drow[((size_t)(bi / L) * H + h) * L + bi % L] = d;
    }
}

// ps[i][j] = Z P and ds[i][j] = P (Z dP - D) for the thread's 4 x 4 elements of a (query tile
// at i0, key tile at j0) pair: s and dp hold the raw dot products, rmax / rinv / rdot the query
// rows' m, 1 / l and D by the thread's row slot x, bias the keys' mask offsets.
struct FaGrad {
    float scale;
    FaDropout drop;
    int L;
    __device__ __forceinline__ void tile(float* ps, float* ds, const float (&s)[4][4], const float (&dp)[4][4],
                                         const float (&rmax)[4], const float (&rinv)[4], const float (&rdot)[4],
                                         const float* bias, int bh, int i0, int j0, int tr, int tc) const {
#pragma unroll
        for (int x = 0; x < 4; ++x) {
            const int il = tr + 16 * x;
            const unsigned long long row = ((unsigned long long)bh * L + i0 + il) * L + j0;
#pragma unroll
            for (int y = 0; y < 4; ++y) {
                const int jl = tc + 16 * y;
                const float p = expf(s[x][y] * scale + bias[jl] - rmax[x]) * rinv[x];
                const float z = drop.factor(row + jl);
                if (ps) ps[il * FA_LDP + jl] = p * z;
                ds[il * FA_LDP + jl] = p * (dp[x][y] * z - rdot[x]);
            }
        }
    }
};

// The query row statistics of row slot x; rows past L get m = 0, 1 / l = 0, D = 0, so their P
// is exp(s) * 0 = 0 (their q is zero, so s <= 0 and exp(s) is finite).
__device__ __forceinline__ void fa_row_stats(float& rmax, float& rinv, float& rdot, const float* __restrict__ stats,
                                             const float* __restrict__ drow, int bh, int i, int L) {
    const bool in = i < L;
    const size_t r = (size_t)bh * L + i;
    rmax = in ? stats[2 * r] : 0.f;
    rinv = in ? 1.f / stats[2 * r + 1] : 0.f;
    rdot = in ? drow[r] : 0.f;
}

template <int DH, class T>
__device__ __forceinline__ void fa_dkv(float* __restrict__ dk, float* __restrict__ dv, const T* __restrict__ q,
                                       const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
                                       const float* __restrict__ stats, const float* __restrict__ drow,
                                       const float* __restrict__ mask, int L, int H, float scale, float drop_p,
                                       unsigned long long seed) {
    constexpr int LD = DH + FA_PAD, CPT = DH / 16;
    extern __shared__ float4 fa_shared[];
    float* ks = reinterpret_cast<float*>(fa_shared);
    float* vs = ks + FA_TILE * LD;
    float* qs = vs + FA_TILE * LD;
    float* dos = qs + FA_TILE * LD;
    float* ps = dos + FA_TILE * LD;
    float* dss = ps + FA_TILE * FA_LDP;
    float* bias = dss + FA_TILE * FA_LDP;
    float* rows = bias + FA_TILE;  // [3][FA_TILE]: the query tile's m, 1 / l and D
    const FaBlock blk(L, H, DH);
    const int tr = blk.tr, tc = blk.tc, j0 = blk.r0;
    const FaGrad grad{scale, FaDropout(drop_p, seed), L};
    fa_load_tile<DH>(ks, k + blk.head, blk.hd, j0, L);
    fa_load_tile<DH>(vs, v + blk.head, blk.hd, j0, L);
    fa_load_bias(bias, mask + (size_t)blk.b * L, j0, L);
    float gk[4][CPT] = {}, gv[4][CPT] = {};
    for (int i0 = 0; i0 < L; i0 += FA_TILE) {
        __syncthreads();  // the previous query tile is consumed (and k, v, bias are written)
        fa_load_tile<DH>(qs, q + blk.head, blk.hd, i0, L);
        fa_load_tile<DH>(dos, dout + blk.head, blk.hd, i0, L);
        if (threadIdx.x < FA_TILE) {
            const int t = threadIdx.x;
            fa_row_stats(rows[t], rows[FA_TILE + t], rows[2 * FA_TILE + t], stats, drow, blk.bh, i0 + t, L);
        }
        __syncthreads();
        float s[4][4] = {}, dp[4][4] = {};
        fa_dots<DH>(s, qs, ks, tr, tc);
        fa_dots<DH>(dp, dos, vs, tr, tc);
        float rmax[4], rinv[4], rdot[4];
#pragma unroll
        for (int x = 0; x < 4; ++x) {
            rmax[x] = rows[tr + 16 * x];
            rinv[x] = rows[FA_TILE + tr + 16 * x];
            rdot[x] = rows[2 * FA_TILE + tr + 16 * x];
        }
        grad.tile(ps, dss, s, dp, rmax, rinv, rdot, bias, blk.bh, i0, j0, tr, tc);
        __syncthreads();
        fa_cols_times<DH>(gv, ps, dos, tr, tc);
        fa_cols_times<DH>(gk, dss, qs, tr, tc);
    }
#pragma unroll
    for (int a = 0; a < 4; ++a) {
        const int j = j0 + 4 * tr + a;
        if (j >= L) continue;
        const size_t at = blk.head + (size_t)j * blk.hd + tc * CPT;
        float ok[CPT], ov[CPT];
        fa_ld(ok, dk + at);
        fa_ld(ov, dv + at);
#pragma unroll
        for (int c = 0; c < CPT; ++c) {
            ok[c] += scale * gk[a][c];
            ov[c] += gv[a][c];
        }
        fa_st(dk + at, ok);
        fa_st(dv + at, ov);
    }
}

template <int DH, class T>
__device__ __forceinline__ void fa_dq(float* __restrict__ dq, const T* __restrict__ q, const T* __restrict__ k,
                                      const T* __restrict__ v, const T* __restrict__ dout,
                                      const float* __restrict__ stats, const float* __restrict__ drow,
                                      const float* __restrict__ mask, int L, int H, float scale, float drop_p,
                                      unsigned long long seed) {
    constexpr int LD = DH + FA_PAD, CPT = DH / 16;
    extern __shared__ float4 fa_shared[];
    float* qs = reinterpret_cast<float*>(fa_shared);
    float* dos = qs + FA_TILE * LD;
    float* ks = dos + FA_TILE * LD;
    float* vs = ks + FA_TILE * LD;
    float* dss = vs + FA_TILE * LD;
    float* bias = dss + FA_TILE * FA_LDP;
    const FaBlock blk(L, H, DH);
    const int tr = blk.tr, tc = blk.tc, i0 = blk.r0;
    const FaGrad grad{scale, FaDropout(drop_p, seed), L};
    fa_load_tile<DH>(qs, q + blk.head, blk.hd, i0, L);
    fa_load_tile<DH>(dos, dout + blk.head, blk.hd, i0, L);
    float rmax[4], rinv[4], rdot[4];
#pragma unroll
    for (int x = 0; x < 4; ++x) fa_row_stats(rmax[x], rinv[x], rdot[x], stats, drow, blk.bh, i0 + tr + 16 * x, L);
    float gq[4][CPT] = {};
    for (int j0 = 0; j0 < L; j0 += FA_TILE) {
        __syncthreads();  // the previous key tile and dS are consumed (and q, dout are written)
        fa_load_tile<DH>(ks, k + blk.head, blk.hd, j0, L);
        fa_load_tile<DH>(vs, v + blk.head, blk.hd, j0, L);
        fa_load_bias(bias, mask + (size_t)blk.b * L, j0, L);
        __syncthreads();
        float s[4][4] = {}, dp[4][4] = {};
        fa_dots<DH>(s, qs, ks, tr, tc);
        fa_dots<DH>(dp, dos, vs, tr, tc);
        grad.tile(nullptr, dss, s, dp, rmax, rinv, rdot, bias, blk.bh, i0, j0, tr, tc);
        __syncthreads();
        fa_rows_times<DH>(gq, dss, ks, tr, tc);
    }
#pragma unroll
    for (int x = 0; x < 4; ++x) {
        const int i = i0 + tr + 16 * x;
        if (i >= L) continue;
        const size_t at = blk.head + (size_t)i * blk.hd + tc * CPT;
        float o[CPT];
        fa_ld(o, dq + at);
#pragma unroll
        for (int c = 0; c < CPT; ++c) o[c] += scale * gq[x][c];
        fa_st(dq + at, o);
    }
}

// The entry points of one (head dim, storage type). Grids: (ceil(L / FA_TILE), B * H) blocks of
// FA_THREADS with FA_*_FLOATS(DH) floats of dynamic shared memory; rowdot: one group of DH / 4
// lanes per row of [B * L * H], ROW_BLOCK threads per block.
#define FA_KERNELS(DH, T, NAME)                                                                                    \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, 2) attention_flash_forward_d##DH##_##NAME(            \
        T* __restrict__ out, float* __restrict__ stats, const T* __restrict__ q, const T* __restrict__ k,          \
        const T* __restrict__ v, const float* __restrict__ mask, int L, int H, float scale, float drop_p,          \
        unsigned long long seed) {                                                                                 \
        fa_forward<DH, T>(out, stats, q, k, v, mask, L, H, scale, drop_p, seed);                                   \
    }                                                                                                              \
    extern "C" __global__ void attention_flash_rowdot_d##DH##_##NAME(float* __restrict__ drow,                     \
                                                                     const T* __restrict__ dout,                   \
                                                                     const T* __restrict__ out, int rows, int L,   \
                                                                     int H) {                                      \
        fa_rowdot<DH, T>(drow, dout, out, rows, L, H);                                                             \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, 2) attention_flash_dkv_d##DH##_##NAME(                \
        float* __restrict__ dk, float* __restrict__ dv, const T* __restrict__ q, const T* __restrict__ k,          \
        const T* __restrict__ v, const T* __restrict__ dout, const float* __restrict__ stats,                      \
        const float* __restrict__ drow, const float* __restrict__ mask, int L, int H, float scale, float drop_p,   \
        unsigned long long seed) {                                                                                 \
        fa_dkv<DH, T>(dk, dv, q, k, v, dout, stats, drow, mask, L, H, scale, drop_p, seed);                        \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, 2) attention_flash_dq_d##DH##_##NAME(                 \
        float* __restrict__ dq, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,         \
        const T* __restrict__ dout, const float* __restrict__ stats, const float* __restrict__ drow,               \
        const float* __restrict__ mask, int L, int H, float scale, float drop_p, unsigned long long seed) {        \
        fa_dq<DH, T>(dq, q, k, v, dout, stats, drow, mask, L, H, scale, drop_p, seed);                             \
    }

FA_KERNELS(32, float, f32)
FA_KERNELS(64, float, f32)
