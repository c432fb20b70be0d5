// LayerNorm over the last axis: the GPU side of crates/kd-kernels/src/ops/layernorm.rs, which
// states the maths and is the reference.
//
// Forward and dx take a team of threads per row, like softmax_kl.cu: `group` lanes of a warp
// (*_warp, rows up to 1,024, BERT's 384 and 768) or a block (*_block, longer rows). A row's
// sums are reduced in a fixed tree, so every launch is reproducible bit for bit.
// dgamma and dbeta are column sums over the rows: partials per chunk of rows, then a finalize
// kernel adding the chunks in order (kd_sum_chunks in common.cuh), accumulating into the
// gradients.
#include "common.cuh"

// The forward of one row: mean and biased variance in two passes over the row (the second
// from L1), as the CPU does, then out = (x - mean) * rstd * gamma + beta.
template <class Team>
__device__ __forceinline__ void ln_forward_row(const Team& team, int row, float* out, float* mean, float* rstd,
                                               const float* x, const float* gamma, const float* beta, int d,
                                               float eps) {
    const size_t base = (size_t)row * d;
    const float* xr = x + base;
    float sum = 0.f;
    for (int i = team.lane; i < d; i += team.size) sum += xr[i];
    const float m = team.reduce(sum, KdSum{}) / (float)d;
    float sq = 0.f;
    for (int i = team.lane; i < d; i += team.size) {
        float c = xr[i] - m;
        sq += c * c;
    }
    const float var = team.reduce(sq, KdSum{}) / (float)d;
    // IEEE sqrt and division (not rsqrtf), as the CPU's 1 / sqrt(var + eps).
    const float s = 1.f / sqrtf(var + eps);
    for (int i = team.lane; i < d; i += team.size) out[base + i] = (xr[i] - m) * s * gamma[i] + beta[i];
    if (team.lane == 0) {
        mean[row] = m;
        rstd[row] = s;
    }
}

#define LN_FORWARD_PARAMS                                                                               \
    float *__restrict__ out, float *__restrict__ mean, float *__restrict__ rstd, const float *__restrict__ x, \
        const float *__restrict__ gamma, const float *__restrict__ beta, int rows, int d, float eps
#define LN_FORWARD_ARGS out, mean, rstd, x, gamma, beta, d, eps

extern "C" __global__ void layernorm_forward_f32_warp(LN_FORWARD_PARAMS, int group) {
    GroupTeam team;
    int row = kd_group_row(group, rows, &team);
    if (row < 0) return;
    ln_forward_row(team, row, LN_FORWARD_ARGS);
}

extern "C" __global__ void layernorm_forward_f32_block(LN_FORWARD_PARAMS) {
    if ((int)blockIdx.x >= rows) return;
    BlockTeam team{(int)threadIdx.x, (int)blockDim.x};
    ln_forward_row(team, blockIdx.x, LN_FORWARD_ARGS);
}

// The row sums of g = dout * gamma and of g * xhat.
struct GradSums {
    float g;
    float gx;
};

struct GradSumsAdd {
    __device__ __forceinline__ GradSums operator()(const GradSums& a, const GradSums& b) const {
        return GradSums{a.g + b.g, a.gx + b.gx};
    }
};

// dx += rstd * (g - mean(g) - xhat * mean(g * xhat)) for one row. g is rounded alike (__fmul_rn,
// never fused into an FMA) where it is summed and where mean(g) is taken off it, as on the CPU:
// otherwise a row of D = 1 (g - mean(g) exactly 0 on the CPU) gets rstd = 1 / sqrt(eps) times
// the rounding error of g.
template <class Team>
__device__ __forceinline__ void ln_dx_row(const Team& team, int row, float* dx, const float* dout, const float* x,
                                          const float* mean, const float* rstd, const float* gamma, int d) {
    const size_t base = (size_t)row * d;
    const float* dy = dout + base;
    const float* xr = x + base;
    const float m = mean[row], s = rstd[row];
    GradSums acc{0.f, 0.f};
    for (int i = team.lane; i < d; i += team.size) {
        float g = __fmul_rn(dy[i], gamma[i]);
        acc.g += g;
        acc.gx += g * (xr[i] - m) * s;
    }
    acc = team.reduce(acc, GradSumsAdd{});
    const float g_mean = acc.g / (float)d, gx_mean = acc.gx / (float)d;
    for (int i = team.lane; i < d; i += team.size) {
        dx[base + i] += s * (__fmul_rn(dy[i], gamma[i]) - g_mean - (xr[i] - m) * s * gx_mean);
    }
}

#define LN_DX_PARAMS                                                                                    \
    float *__restrict__ dx, const float *__restrict__ dout, const float *__restrict__ x,                \
        const float *__restrict__ mean, const float *__restrict__ rstd, const float *__restrict__ gamma, \
        int rows, int d
#define LN_DX_ARGS dx, dout, x, mean, rstd, gamma, d

extern "C" __global__ void layernorm_dx_f32_warp(LN_DX_PARAMS, int group) {
    GroupTeam team;
    int row = kd_group_row(group, rows, &team);
    if (row < 0) return;
    ln_dx_row(team, row, LN_DX_ARGS);
}

extern "C" __global__ void layernorm_dx_f32_block(LN_DX_PARAMS) {
    if ((int)blockIdx.x >= rows) return;
    BlockTeam team{(int)threadIdx.x, (int)blockDim.x};
    ln_dx_row(team, blockIdx.x, LN_DX_ARGS);
}

// Chunk y's column sums, one thread per column: partials[y * d + col] of dout * xhat (dgamma)
// and partials[(chunks + y) * d + col] of dout (dbeta), chunks = gridDim.y.
extern "C" __global__ void layernorm_dparams_partials_f32(const float* __restrict__ dout, const float* __restrict__ x,
                                                          const float* __restrict__ mean,
                                                          const float* __restrict__ rstd, int rows, int d,
                                                          int rows_per_chunk, float* __restrict__ partials) {
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= d) return;
    int begin = blockIdx.y * rows_per_chunk;
    int end = min(begin + rows_per_chunk, rows);
    float g_acc = 0.f, b_acc = 0.f;
    for (int r = begin; r < end; ++r) {
        size_t at = (size_t)r * d + col;
        float dy = dout[at];
        g_acc += dy * (x[at] - mean[r]) * rstd[r];
        b_acc += dy;
    }
    partials[(size_t)blockIdx.y * d + col] = g_acc;
    partials[((size_t)gridDim.y + blockIdx.y) * d + col] = b_acc;
}

// dgamma[col] += and dbeta[col] += the sums of their chunks' partials.
extern "C" __global__ void layernorm_dparams_finalize_f32(const float* __restrict__ partials, int chunks, int d,
                                                          float* __restrict__ dgamma, float* __restrict__ dbeta) {
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= d) return;
    dgamma[col] += kd_sum_chunks(partials, chunks, d, col);
    dbeta[col] += kd_sum_chunks(partials + (size_t)chunks * d, chunks, d, col);
}
