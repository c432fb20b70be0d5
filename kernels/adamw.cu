// AdamW: the GPU side of crates/kd-kernels/src/ops/adamw.rs, which states the update and is the
// reference. One thread per element; the host forms the step's scalars exactly as the CPU does.
//
// Every operation is an explicitly rounded intrinsic, in the CPU's order: NVRTC would otherwise
// contract a multiply and an add into an FMA, which rounds once where the CPU rounds twice, and
// the two would drift apart over a run. As written the GPU's update is the CPU's bit for bit
// (IEEE division and square root on both sides).
#include "common.cuh"

// torch.lerp's formula (the CPU's `lerp`): switching ends at weight 0.5 hits either end exactly.
__device__ __forceinline__ float adamw_lerp(float start, float end, float weight) {
    if (fabsf(weight) < 0.5f) return __fadd_rn(start, __fmul_rn(weight, __fsub_rn(end, start)));
    return __fsub_rn(end, __fmul_rn(__fsub_rn(end, start), __fsub_rn(1.f, weight)));
}

extern "C" __global__ void adamw_step_f32(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                          float* __restrict__ v, int n, float shrink, float w1, float w2,
                                          float beta2, float step_size, float bc2_sqrt, float eps) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i];
    float pi = __fmul_rn(p[i], shrink);  // shrink is 1 (exact) without weight decay
    float mi = adamw_lerp(m[i], gi, w1);
    float vi = __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(__fmul_rn(w2, gi), gi));
    float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
    p[i] = __fadd_rn(pi, __fmul_rn(-step_size, __fdiv_rn(mi, denom)));
    m[i] = mi;
    v[i] = vi;
}
