// Fused softmax-KL with temperature, forward and backward in one launch: the GPU side of
// crates/kd-kernels/src/ops/softmax_kl.rs, which states the maths and is the reference.
//
// Each thread scans its share of a row with the same online update as the CPU's RowScan
// (running maxima of the raw logits, sums rescaled when the maximum moves), the partial scans
// are merged exactly (a merge is the online update applied to a whole partial state), and a
// gradient pass over the same values writes the gradients. Three launch shapes:
//   softmax_kl_*_warp:       `group` lanes of a warp (a power of two <= 32) per row, several
//                            rows per warp when rows are short, for rows up to 1,024 classes
//                            (labels, attention keys); the gradient pass rereads the row from L1;
//   softmax_kl_*_resident:   one 1,024-thread block per row of 8,193 to 30,720 classes (BERT's
//                            30,522), the teacher row and half the student row in shared memory
//                            and the rest in registers, so the row comes from DRAM once: 16 bytes
//                            per class with a student gradient (read both rows, read and write
//                            dstudent) instead of 24 when the gradient pass rereads rows that no
//                            longer fit in L2;
//   softmax_kl_*_block:      one block per row, the gradient pass rereading the row, for the
//                            other wide rows: up to 8,192 classes the rows in flight fit in L2,
//                            and wider than 30,720 they do not fit on chip.
// Masked entries (f32::MIN or -inf in both rows) get zero teacher probability and so add 0 to
// the loss and to both gradients; a row of only f32::MIN is uniform, as on the CPU.
//
// Each shape is one template over the logits' type, with an extern "C" kernel per type:
// softmax_kl_f32_* reads f32 logits and softmax_kl_bf16_* bf16 ones (kd_bf16), converting each
// value to f32 as it is read; the statistics, the loss and the gradients are f32 either way,
// and the resident kernel's shared memory holds the rows as f32 for both.
#include "common.cuh"
#include "bf16.cuh"

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

// In: the logits' type, float or kd_bf16.
template <class In>
struct KlArgs {
    float* loss;          // [R], overwritten
    float* ds;            // [R, C] or null, accumulated
    float* dt;            // [R, C] or null, accumulated
    const In* zs;         // [R, C]
    const In* zt;         // [R, C]
    const float* w;       // [R] or null (all 1)
    int c;
    float t;
    float inv_t;          // 1 / t, computed on the host as the CPU reference does
    int form;             // 0: KL, 1: cross-entropy form
    float grad_scale;
};

// RowScan::log_norm_gap, RowScan::divergence and the per-row constants of RowScan::gradients.
struct KlRow {
    float max_t, max_s, inv_t;
    float inv_sum_t, inv_sum_s, log_sum_s;
    float gap;    // log Z_s - log Z_t
    float div;    // the divergence before w T^2
    float scale;  // grad_scale * w * T
    int form;
};

template <class In>
__device__ __forceinline__ KlRow kl_finish(const KlStats& st, const KlArgs<In>& a, float w) {
    KlRow r;
    r.max_t = st.max_t;
    r.max_s = st.max_s;
    r.inv_t = a.inv_t;
    r.gap = (st.max_s - st.max_t) * a.inv_t + logf(st.sum_s) - logf(st.sum_t);
    r.div = st.cross / st.sum_t + r.gap;
    if (a.form == 1) r.div = r.div + logf(st.sum_t) - st.ent_t / st.sum_t;
    r.scale = a.grad_scale * w * a.t;
    r.inv_sum_t = 1.f / st.sum_t;
    r.inv_sum_s = 1.f / st.sum_s;
    r.log_sum_s = logf(st.sum_s);
    r.form = a.form;
    return r;
}

struct KlGrad {
    float ds, dt;
};

// RowScan::gradients for one class: what it adds to dstudent and to dteacher.
__device__ __forceinline__ KlGrad kl_grad(const KlRow& r, float s, float t) {
    float pt = expf((t - r.max_t) * r.inv_t) * r.inv_sum_t;
    float rel_s = (s - r.max_s) * r.inv_t;
    KlGrad g;
    g.ds = r.scale * (expf(rel_s) * r.inv_sum_s - pt);
    g.dt = 0.f;
    // p_t = 0 has no gradient; d there may be -inf - -inf.
    if (pt > 0.f) {
        float d = r.form == 0 ? (t - s) * r.inv_t + r.gap : r.log_sum_s - rel_s;
        g.dt = r.scale * pt * (d - r.div);
    }
    return g;
}

template <class Team, class In>
__device__ __forceinline__ void kl_row(const Team& team, int row, const KlArgs<In>& a) {
    float w = a.w ? a.w[row] : 1.f;
    if (w == 0.f) {
        if (team.lane == 0) a.loss[row] = 0.f;
        return;
    }
    const size_t base = (size_t)row * a.c;
    const In* zs = a.zs + base;
    const In* zt = a.zt + base;
    KlStats st = kl_empty();
    for (int i = team.lane; i < a.c; i += team.size) kl_push(st, kd_to_f32(zs[i]), kd_to_f32(zt[i]), a.inv_t);
    st = team.reduce(st, KlMerge{a.inv_t});
    const KlRow r = kl_finish(st, a, w);
    if (team.lane == 0) a.loss[row] = w * a.t * a.t * r.div;
    if (!a.ds && !a.dt) return;
    for (int i = team.lane; i < a.c; i += team.size) {
        const KlGrad g = kl_grad(r, kd_to_f32(zs[i]), kd_to_f32(zt[i]));
        if (a.ds) a.ds[base + i] += g.ds;
        if (a.dt) a.dt[base + i] += g.dt;
    }
}

// Flat parameter lists (not KlArgs by value) so that the host passes each buffer through
// cudarc's launch builder, which orders it against other streams.
#define KL_PARAMS(In)                                                                                \
    float *__restrict__ loss, float *__restrict__ ds, float *__restrict__ dt,                        \
        const In *__restrict__ zs, const In *__restrict__ zt, const float *__restrict__ w,           \
        int rows, int c, float t, float inv_t, int form, float grad_scale
#define KL_ARGS(In) KlArgs<In>{loss, ds, dt, zs, zt, w, c, t, inv_t, form, grad_scale}

template <class In>
__device__ __forceinline__ void kl_warp(const KlArgs<In>& a, int rows, int group) {
    GroupTeam team;
    int row = kd_group_row(group, rows, &team);
    if (row < 0) return;
    kl_row(team, row, a);
}

template <class In>
__device__ __forceinline__ void kl_block(const KlArgs<In>& a, int rows) {
    if ((int)blockIdx.x >= rows) return;
    BlockTeam team{(int)threadIdx.x, (int)blockDim.x};
    kl_row(team, blockIdx.x, a);
}

extern "C" __global__ void softmax_kl_f32_warp(KL_PARAMS(float), int group) { kl_warp(KL_ARGS(float), rows, group); }
extern "C" __global__ void softmax_kl_bf16_warp(KL_PARAMS(kd_bf16), int group) {
    kl_warp(KL_ARGS(kd_bf16), rows, group);
}
extern "C" __global__ void softmax_kl_f32_block(KL_PARAMS(float)) { kl_block(KL_ARGS(float), rows); }
extern "C" __global__ void softmax_kl_bf16_block(KL_PARAMS(kd_bf16)) { kl_block(KL_ARGS(kd_bf16), rows); }

// softmax_kl_*_resident's shape (RESIDENT_* in ops/softmax_kl.rs): 1,024 threads, each
// holding 30 slots of the row (class lane + k * 1,024 in slot k, so every access is coalesced
// and conflict-free). The teacher row and the student's first KD_KL_SHARED_SLOTS slots are in
// shared memory, (KD_KL_SHARED_SLOTS + 30) * 4 KiB of it; the student's other slots are in
// registers: more of them spill at the 64 registers a thread that a 1,024-thread block allows.
// The gradient pass loads KD_KL_GRAD_BATCH old gradients per thread before it stores any, so
// that several are in flight at once.
#define KD_KL_RESIDENT_THREADS 1024
#define KD_KL_RESIDENT_SLOTS 30
#define KD_KL_SHARED_SLOTS 16
#define KD_KL_GRAD_BATCH 6

// Copies one float from global memory to the shared memory at byte address `shared_dst`
// without a register (cp.async, sm_80+): the teacher row goes straight to shared memory while
// the student row fills the registers.
__device__ __forceinline__ void kd_cp_async_f32(unsigned shared_dst, const float* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(shared_dst), "l"(src) : "memory");
}

__device__ __forceinline__ void kd_cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// Puts one logit into the f32 shared memory at byte address `shared_dst`. A bf16 cannot take
// cp.async (it copies 4, 8 or 16 bytes, and the slot is f32), so it is loaded, widened and
// stored; kd_cp_async_wait_all then has nothing to wait for.
__device__ __forceinline__ void kl_stage(unsigned shared_dst, const float* src) { kd_cp_async_f32(shared_dst, src); }
__device__ __forceinline__ void kl_stage(unsigned shared_dst, const kd_bf16* src) {
    asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(shared_dst), "f"(kd_ldcs_f32(src)) : "memory");
}

// Asks L2 for the 32-byte sector holding p; a hint, nothing is loaded into registers.
__device__ __forceinline__ void kd_prefetch_l2(const float* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

template <class In>
__device__ __forceinline__ void kl_resident(const KlArgs<In>& a, int rows) {
    // The student's shared slots, then all 30 slots of the teacher.
    extern __shared__ float rows_sh[];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const float wr = a.w ? a.w[row] : 1.f;
    if (wr == 0.f) {
        if (threadIdx.x == 0) a.loss[row] = 0.f;
        return;
    }
    const int lane = threadIdx.x;
    // This thread's classes are lane + k * 1,024 for the slots k < `slots`; every pointer below
    // is at class `lane`, so a slot is a constant offset from it.
    const int slots = (a.c - lane + KD_KL_RESIDENT_THREADS - 1) / KD_KL_RESIDENT_THREADS;
    const size_t first = (size_t)row * a.c + lane;
    const In* zs_at = a.zs + first;
    const In* zt_at = a.zt + first;
    const float* zs_sh = rows_sh + lane;
    const float* zt_sh = rows_sh + KD_KL_SHARED_SLOTS * KD_KL_RESIDENT_THREADS + lane;
    const unsigned zs_sh_addr = (unsigned)__cvta_generic_to_shared(zs_sh);
    const unsigned zt_sh_addr = (unsigned)__cvta_generic_to_shared(zt_sh);
#define KD_KL_AT(k) ((k) * KD_KL_RESIDENT_THREADS)
#define KD_KL_STUDENT(k) ((k) < KD_KL_SHARED_SLOTS ? zs_sh[KD_KL_AT(k)] : s[k])
    // Both rows are read once, so the register loads go through L2 as evict-first (ld.cs).
    // Each thread reads back only the shared memory it wrote, so no barrier guards it.
    float s[KD_KL_RESIDENT_SLOTS];  // only the slots from KD_KL_SHARED_SLOTS on are used
    // A slot past the row loads the thread's last class again (c >= 1,024 gives every thread
    // one), so the loads need no branches; the scan and the gradients skip it. The register
    // loads go first: the wait for the copies to shared memory would hold back any after it.
#pragma unroll
    for (int k = KD_KL_SHARED_SLOTS; k < KD_KL_RESIDENT_SLOTS; ++k) s[k] = kd_ldcs_f32(zs_at + KD_KL_AT(min(k, slots - 1)));
#pragma unroll
    for (int k = 0; k < KD_KL_RESIDENT_SLOTS; ++k) {
        const int at = KD_KL_AT(min(k, slots - 1));
        kl_stage(zt_sh_addr + 4 * KD_KL_AT(k), zt_at + at);
        if (k < KD_KL_SHARED_SLOTS) kl_stage(zs_sh_addr + 4 * KD_KL_AT(k), zs_at + at);
    }
    kd_cp_async_wait_all();
    float* ds_at = a.ds ? a.ds + first : nullptr;
    float* dt_at = a.dt ? a.dt + first : nullptr;
    // The old gradients come from DRAM while this block scans and reduces, when it has no
    // other DRAM traffic; the gradient pass then finds them in L2. One prefetch per 32-byte
    // sector: every 8th class.
    for (int k = 0; k * KD_KL_RESIDENT_THREADS * 8 + lane * 8 < a.c; ++k) {
        if (ds_at) kd_prefetch_l2(ds_at + 7 * lane + KD_KL_AT(8 * k));
        if (dt_at) kd_prefetch_l2(dt_at + 7 * lane + KD_KL_AT(8 * k));
    }
    KlStats st = kl_empty();
#pragma unroll
    for (int k = 0; k < KD_KL_RESIDENT_SLOTS; ++k) {
        if (k < slots) kl_push(st, KD_KL_STUDENT(k), zt_sh[KD_KL_AT(k)], a.inv_t);
    }
    BlockTeam team{lane, KD_KL_RESIDENT_THREADS};
    st = team.reduce(st, KlMerge{a.inv_t});
    const KlRow r = kl_finish(st, a, wr);
    if (lane == 0) a.loss[row] = wr * a.t * a.t * r.div;
    if (!ds_at && !dt_at) return;
#pragma unroll
    for (int k0 = 0; k0 < KD_KL_RESIDENT_SLOTS; k0 += KD_KL_GRAD_BATCH) {
        float old_ds[KD_KL_GRAD_BATCH], old_dt[KD_KL_GRAD_BATCH];
#pragma unroll
        for (int j = 0; j < KD_KL_GRAD_BATCH; ++j) {
            const int k = k0 + j;
            old_ds[j] = ds_at && k < slots ? ds_at[KD_KL_AT(k)] : 0.f;
            old_dt[j] = dt_at && k < slots ? dt_at[KD_KL_AT(k)] : 0.f;
        }
#pragma unroll
        for (int j = 0; j < KD_KL_GRAD_BATCH; ++j) {
            const int k = k0 + j;
            if (k < slots) {
                const KlGrad g = kl_grad(r, KD_KL_STUDENT(k), zt_sh[KD_KL_AT(k)]);
                if (ds_at) ds_at[KD_KL_AT(k)] = old_ds[j] + g.ds;
                if (dt_at) dt_at[KD_KL_AT(k)] = old_dt[j] + g.dt;
            }
        }
    }
#undef KD_KL_STUDENT
#undef KD_KL_AT
}

extern "C" __global__ void __launch_bounds__(KD_KL_RESIDENT_THREADS, 1) softmax_kl_f32_resident(KL_PARAMS(float)) {
    kl_resident(KL_ARGS(float), rows);
}
extern "C" __global__ void __launch_bounds__(KD_KL_RESIDENT_THREADS, 1) softmax_kl_bf16_resident(KL_PARAMS(kd_bf16)) {
    kl_resident(KL_ARGS(kd_bf16), rows);
}
