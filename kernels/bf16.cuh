// bf16 as kd's kernels store it: the raw 16 bits of crates/kd-kernels' Bf16Tensor. NVRTC from
// the pinned wheels has no CUDA headers (no cuda_bf16.h), and the two conversions are a shift
// and a rounding add, so this small type stands in for __nv_bfloat16.
#pragma once

struct __align__(2) kd_bf16 {
    unsigned short bits;
};

// Exact: a bf16 is the top half of the f32 with the same value.
__device__ __forceinline__ float kd_to_f32(kd_bf16 x) { return __uint_as_float((unsigned)x.bits << 16); }
__device__ __forceinline__ float kd_to_f32(float x) { return x; }

// Round to nearest, ties to even, bit for bit as half::bf16::from_f32 (the CPU path): a NaN
// keeps its sign and top payload bits and is made quiet; finite values past bf16's range round
// to infinity (f32::MIN becomes -inf, as in PyTorch).
__device__ __forceinline__ kd_bf16 kd_bf16_rn(float x) {
    const unsigned u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return kd_bf16{(unsigned short)((u >> 16) | 0x40u)};
    return kd_bf16{(unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

// An evict-first load (ld.global.cs) of either input type, as f32.
__device__ __forceinline__ float kd_ldcs_f32(const float* p) { return __ldcs(p); }
__device__ __forceinline__ float kd_ldcs_f32(const kd_bf16* p) { return kd_to_f32(kd_bf16{__ldcs(&p->bits)}); }
