// Activations, one thread per element: the GPU side of crates/kd-kernels/src/ops/gelu.rs,
// which is the reference (n < 2^31, checked on the host).
//
// The CPU evaluates exact GELU in f64 as x * 0.5 * erfc(-x / sqrt 2); here normcdff is that
// same Phi(x) in f32 (erfc-based, so it keeps its relative precision in the left tail where
// 0.5 * (1 + erff(x / sqrt 2)) would cancel), within a few ulp of the CPU's rounded result.
#include "common.cuh"

// 1 / sqrt(2 pi): Phi'(x) = exp(-x^2 / 2) / sqrt(2 pi).
#define KD_INV_SQRT_2PI 0.398942280401432677940f

struct Gelu {
    __device__ __forceinline__ float forward(float x) const { return x * normcdff(x); }
    __device__ __forceinline__ float grad(float x) const {
        return normcdff(x) + x * expf(-0.5f * x * x) * KD_INV_SQRT_2PI;
    }
};

// tanh; its backward takes the forward's output y: d tanh = 1 - y^2.
struct Tanh {
    __device__ __forceinline__ float forward(float x) const { return tanhf(x); }
    __device__ __forceinline__ float grad(float y) const { return 1.f - y * y; }
};

// ReLU (DistilBERT's classifier head); its backward takes the forward's output y: y > 0 exactly
// where x > 0, so the gradient passes where the output is positive, 0 at x = 0 as in PyTorch.
struct Relu {
    __device__ __forceinline__ float forward(float x) const { return fmaxf(x, 0.f); }
    __device__ __forceinline__ float grad(float y) const { return y > 0.f ? 1.f : 0.f; }
};

template <class Act>
__device__ __forceinline__ void act_forward(float* out, const float* x, int n) {
    long long i = kd_element_index();
    if (i < n) out[i] = Act().forward(x[i]);
}

// dx += dout * grad(saved), `saved` being what the forward kept (its input or its output).
template <class Act>
__device__ __forceinline__ void act_backward(float* dx, const float* dout, const float* saved, int n) {
    long long i = kd_element_index();
    if (i < n) dx[i] += dout[i] * Act().grad(saved[i]);
}

extern "C" __global__ void gelu_forward_f32(float* __restrict__ out, const float* __restrict__ x, int n) {
    act_forward<Gelu>(out, x, n);
}

extern "C" __global__ void gelu_backward_f32(float* __restrict__ dx, const float* __restrict__ dout,
                                             const float* __restrict__ x, int n) {
    act_backward<Gelu>(dx, dout, x, n);
}

extern "C" __global__ void tanh_forward_f32(float* __restrict__ out, const float* __restrict__ x, int n) {
    act_forward<Tanh>(out, x, n);
}

extern "C" __global__ void tanh_backward_f32(float* __restrict__ dx, const float* __restrict__ dout,
                                             const float* __restrict__ y, int n) {
    act_backward<Tanh>(dx, dout, y, n);
}

extern "C" __global__ void relu_forward_f32(float* __restrict__ out, const float* __restrict__ x, int n) {
    act_forward<Relu>(out, x, n);
}

extern "C" __global__ void relu_backward_f32(float* __restrict__ dx, const float* __restrict__ dout,
                                             const float* __restrict__ y, int n) {
    act_backward<Relu>(dx, dout, y, n);
}
