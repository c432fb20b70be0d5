// Embedding lookups by id: the GPU side of crates/kd-kernels/src/ops/embedding.rs, which states
// the maths and is the reference. One thread per element of the [N, D] rows.
//
// An id >= V is not checked on the host (that would need a synchronising copy): the forward
// writes NaN into its row (so the error shows in the loss) and the backward adds nothing for it.
#include "common.cuh"

// out[i, :] = table[ids[i], :], or += when `accumulate`.
extern "C" __global__ void embedding_forward_f32(float* __restrict__ out, const unsigned* __restrict__ ids,
                                                 const float* __restrict__ table, int n, int d, int vocab,
                                                 int accumulate) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n * d) return;
    unsigned id = ids[i / d];
    float x = id < (unsigned)vocab ? table[(size_t)id * d + i % d] : KD_NAN;
    out[i] = accumulate ? out[i] + x : x;
}

// dtable[ids[i], :] += dout[i, :]. Repeated ids make threads add into the same row, so the adds
// are atomic: float atomics make the order of the additions (and so the last bits of a sum over
// repeated ids) vary from run to run. PyTorch's CUDA embedding backward is deterministic only by
// sorting the ids first; kd accepts the variation here.
extern "C" __global__ void embedding_backward_f32(float* __restrict__ dtable, const float* __restrict__ dout,
                                                  const unsigned* __restrict__ ids, int n, int d, int vocab) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n * d) return;
    unsigned id = ids[i / d];
    if (id >= (unsigned)vocab) return;
    atomicAdd(&dtable[(size_t)id * d + i % d], dout[i]);
}
