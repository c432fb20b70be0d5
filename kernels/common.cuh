// Shared pieces of kd's kernels: constants and the deterministic reductions of a row's
// statistics over a "team" of threads (a group of lanes of one warp, or a whole block).
//
// Every reduction here merges partial states in a fixed tree order and then hands every thread
// the same (lane 0's) result, so a launch is bitwise reproducible and all threads of a row use
// identical statistics when they write gradients.
#pragma once

// f32::MIN: HF's additive mask and the CPU references' starting maximum.
#define KD_F32_MIN (-3.40282346638528859812e+38f)
#define KD_FULL_MASK 0xffffffffu
#define KD_NEG_INF __int_as_float(0xff800000)
#define KD_NAN __int_as_float(0x7fc00000)

// Shuffles a struct of 32-bit fields, field by field. The fields go through memcpy (which the
// compiler turns into register moves): reading a float through an unsigned pointer would break
// strict aliasing, and an optimiser may then reorder the reads around the writes.
template <class S>
__device__ __forceinline__ S kd_shfl_xor(const S& s, int offset, unsigned mask) {
    static_assert(sizeof(S) % 4 == 0, "states must be made of 32-bit fields");
    unsigned words[sizeof(S) / 4];
    memcpy(words, &s, sizeof(S));
#pragma unroll
    for (int k = 0; k < (int)(sizeof(S) / 4); ++k) words[k] = __shfl_xor_sync(mask, words[k], offset);
    S r;
    memcpy(&r, words, sizeof(S));
    return r;
}

template <class S>
__device__ __forceinline__ S kd_shfl_first(const S& s, unsigned mask, int width) {
    unsigned words[sizeof(S) / 4];
    memcpy(words, &s, sizeof(S));
#pragma unroll
    for (int k = 0; k < (int)(sizeof(S) / 4); ++k) words[k] = __shfl_sync(mask, words[k], 0, width);
    S r;
    memcpy(&r, words, sizeof(S));
    return r;
}

// `size` consecutive lanes of one warp (a power of two up to 32) working on one row: short
// rows (a few classes, L attention keys) put several rows in one warp.
struct GroupTeam {
    int lane;       // 0 .. size - 1
    int size;
    unsigned mask;  // this group's lanes within the warp

    // Called with the group's lanes converged (the group is uniform in every branch before it).
    template <class S, class Merge>
    __device__ __forceinline__ S reduce(S s, Merge merge) const {
        for (int offset = size >> 1; offset > 0; offset >>= 1) s = merge(s, kd_shfl_xor(s, offset, mask));
        return kd_shfl_first(s, mask, size);
    }
};

// A whole block on one row (vocabulary-wide rows); blockDim.x is a multiple of 32, <= 1024.
struct BlockTeam {
    int lane;  // threadIdx.x
    int size;  // blockDim.x

    // Called by every thread of the block (it synchronises the block).
    template <class S, class Merge>
    __device__ __forceinline__ S reduce(S s, Merge merge) const {
        __shared__ S parts[32];
        for (int offset = 16; offset > 0; offset >>= 1) s = merge(s, kd_shfl_xor(s, offset, KD_FULL_MASK));
        if ((lane & 31) == 0) parts[lane >> 5] = s;
        __syncthreads();
        S r = parts[0];
        for (int w = 1; w < (size >> 5); ++w) r = merge(r, parts[w]);
        __syncthreads();  // `parts` is free again for the next reduction
        return r;
    }
};

// The team of lanes that a row of the group kernels gets: `group` lanes (a power of two <= 32)
// per row, blockDim.x / group rows per block. Returns the row, or -1 for a group past `rows`.
__device__ __forceinline__ int kd_group_row(int group, int rows, GroupTeam* team) {
    int lane_in_warp = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x / group) + threadIdx.x / group;
    unsigned lanes = group == 32 ? KD_FULL_MASK : (1u << group) - 1u;
    team->lane = lane_in_warp % group;
    team->size = group;
    team->mask = lanes << (lane_in_warp / group * group);
    return row < rows ? row : -1;
}

struct KdSum {
    __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

struct KdMax {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// The counter-based generator of crates/kd-kernels/src/rng.rs, bit for bit: the CPU and the
// kernels draw the same dropout mask / Gumbel noise for the same (seed, element index).
__device__ __forceinline__ unsigned long long kd_mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// Uniform in [0, 1) with 24 bits: (bits >> 40) < 2^24 converts to f32 exactly, and the scale is
// a power of two, so the product is exact too.
__device__ __forceinline__ float kd_uniform(unsigned long long seed, unsigned long long index) {
    unsigned long long bits = kd_mix64(kd_mix64(seed ^ 0x9e3779b97f4a7c15ull) + index);
    return (float)(bits >> 40) * (1.0f / 16777216.0f);
}

// Deterministic column sums of a [rows, d] matrix (bias and LayerNorm parameter gradients) take
// two launches and no atomics: block (x, y) has one thread per column sum rows
// [y * rows_per_chunk, (y + 1) * rows_per_chunk) in row order into partials[y * d + col], then
// one thread per column adds its chunks up in chunk order here, so the result depends only on
// the shape. Double keeps the sum of up to a few hundred partials from adding its own error.
__device__ __forceinline__ float kd_sum_chunks(const float* partials, int chunks, int d, int col) {
    double total = 0.0;
    for (int c = 0; c < chunks; ++c) total += (double)partials[(size_t)c * d + col];
    return (float)total;
}

// The flat index of this thread in a one-thread-per-element launch; 64-bit, since the last
// block of a launch over nearly 2^31 elements reaches past INT_MAX.
__device__ __forceinline__ long long kd_element_index() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}
