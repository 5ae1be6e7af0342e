// optim.cu: optimizer steps with PyTorch semantics, in the CPU twin's exact order of
// operations (src/backend/cpu/optim.rs). Every product, sum, quotient and square root is an
// explicitly rounded intrinsic (__fmul_rn, __fadd_rn, __fdiv_rn, __fsqrt_rn), so nvcc cannot
// contract them into FMAs and the results are bit-identical to the CPU's f32 arithmetic.
//
//   sparse_adam_f32   torch.optim.SparseAdam on COO entries (up to SPARSE_ADAM_MAX_JOBS
//                     parameters per launch, one per blockIdx.y): for entry e at (r, c),
//                     m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2);
//                     change = -(step_size * (m / (sqrt(v) + eps)));
//                     param[r, c] += change (optional; with param_half, that entry of the
//                     parameter's bf16 copy is rounded from the new value, so a copy that
//                     matched param still matches), delta[e] = change (optional),
//                     dense[r, c] = change (optional; f32, or bf16 rounded to nearest even;
//                     the launcher zeroes dense first, so with it the list must be sorted).
//                     step_size = lr * sqrt(1 - b2^t) / (1 - b1^t) in f64, rounded to f32.
//   adamw_f32         torch.optim.AdamW (single-tensor path, up to ADAMW_MAX_JOBS
//                     parameters per launch, one per blockIdx.y): p *= 1 - lr * wd;
//                     m += (g - m)(1 - b1); v = v b2 + (1 - b2) g g;
//                     p -= step_size * (m / (sqrt(v) / bc2_sqrt + eps)), with step_size =
//                     lr / (1 - b1^t) and bc2_sqrt = sqrt(1 - b2^t) (f64 -> f32), decay =
//                     1 - f32(lr * wd). With param_half, also writes each new p rounded to
//                     bf16 (nearest even): the weight's compute copy, in the same pass.
//
// The step t comes from the parameter's clock on the device ([0] steps taken, [1] blocks
// done in this launch): every thread computes t = clock[0] + 1 and the scalars from it in
// f64, with the same operations as the host's AdamParams (b^t by the binary powering of
// compiler-rt's __powidf2, which Rust's f64::powi calls), so they are bit-identical to the
// CPU's; the last block to finish stores t back. So the step needs no host value that
// changes between steps, and a captured CUDA graph replays it.
//
// Both kernels do nothing while the device health block (common.cuh) reports an error of
// the queued work (a non-finite input, gradient or top-k matrix, a bad index): a step that
// went bad leaves every parameter, moment and clock as it was (SparseAdam writes zeros to
// `delta`, so an update applied from it changes nothing), and the error is returned with
// the step's loss.
//
// Launch shape: SG_THREADS threads, 64-bit grid-stride loop over the entries along x
// (AdamW: float4 steps when the buffers are 16-byte aligned, then a scalar tail); grid
// capped by the launcher; y is the parameter of the batch (each its own gridDim.x blocks,
// which its clock counts). Entries of a sorted COO list are distinct, so no two threads touch
// the same state. An entry outside the matrix is skipped and sets SG_ERR_SPARSE_ADAM (in word 5
// of the health block, reported with word 0's bits).
//
// Tested by tests/cuda_optim.rs (bit-level comparison with the CPU over several steps);
// benchmarked by benches/cuda_kernels.rs.
#include "common.cuh"

// b^t as compiler-rt's __powidf2 computes it (Rust's f64::powi): the same products in the
// same order, each rounded (no contraction).
__device__ __forceinline__ double sg_powi(double a, int b) {
    const int recip = b < 0;
    double r = 1.0;
    while (1) {
        if (b & 1) r = __dmul_rn(r, a);
        b /= 2;
        if (b == 0) break;
        a = __dmul_rn(a, a);
    }
    return recip ? __ddiv_rn(1.0, r) : r;
}

// The step this launch runs: the clock's count plus one, saturated as AdamParams does.
__device__ __forceinline__ int sg_clock_t(const u64* clock) {
    const u64 t = clock[0] + 1;
    return t > 0x7fffffffull ? 0x7fffffff : (int)t;
}

// Called by every thread of every block of a job (the gridDim.x blocks of one blockIdx.y)
// after its work: the last block to arrive stores the step taken and resets the arrival
// count.
__device__ __forceinline__ void sg_clock_advance(u64* clock) {
    __shared__ u32 last;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        const u64 blocks = (u64)gridDim.x;
        const u64 ticket = atomicAdd((unsigned long long*)&clock[1], 1ull);
        last = ticket + 1 == blocks;
    }
    __syncthreads();
    if (last && threadIdx.x == 0) {
        clock[0] = clock[0] + 1;
        clock[1] = 0;
    }
}

// One parameter of a SparseAdam launch (blockIdx.y picks it; mirrored by
// `SparseAdamJobArg` in src/backend/cuda/optim.rs): a batch steps in one launch, each
// parameter exactly as alone, with its own COO list, clock and hyperparameters.
#define SPARSE_ADAM_MAX_JOBS 8
struct SparseAdamJob {
    const u32* rows;
    const u32* cols;
    const float* values;
    u64 len;
    u64 n_rows;
    u64 n_cols;
    float* exp_avg;
    float* exp_avg_sq;
    u64* clock;
    float* param;
    __nv_bfloat16* param_half;
    float* delta;
    float* dense;
    __nv_bfloat16* dense_half;
    float lr;
    float beta1;
    float beta2;
    float eps;
};
struct SparseAdamJobs {
    SparseAdamJob job[SPARSE_ADAM_MAX_JOBS];
};

extern "C" __global__ void sparse_adam_f32(const SparseAdamJobs jobs, u64* health) {
    const SparseAdamJob& job = jobs.job[blockIdx.y];
    const u32* rows = job.rows;
    const u32* cols = job.cols;
    const float* values = job.values;
    const u64 len = job.len;
    const u64 n_rows = job.n_rows;
    const u64 n_cols = job.n_cols;
    float* exp_avg = job.exp_avg;
    float* exp_avg_sq = job.exp_avg_sq;
    u64* clock = job.clock;
    const float lr = job.lr;
    const float beta1 = job.beta1;
    const float beta2 = job.beta2;
    const float eps = job.eps;
    float* param = job.param;
    __nv_bfloat16* param_half = job.param_half;
    float* delta = job.delta;
    float* dense = job.dense;
    __nv_bfloat16* dense_half = job.dense_half;
    // This launch's own index errors go to word 5, which the gate below does not read: the
    // gate's words do not change while the launch runs, so every thread of every block takes
    // the same branch (and reaches sg_clock_advance's barriers together).
    u32* err = reinterpret_cast<u32*>(health + 5);
    if (sg_health_bad(health)) {  // uniform across the grid
        if (delta != nullptr) SG_GRID_STRIDE(e, len) delta[e] = 0.0f;
        return;
    }
    const int t = sg_clock_t(clock);
    const double bc1 = __dadd_rn(1.0, -sg_powi((double)beta1, t));
    const double bc2 = __dadd_rn(1.0, -sg_powi((double)beta2, t));
    const float step_size = (float)__ddiv_rn(__dmul_rn((double)lr, __dsqrt_rn(bc2)), bc1);
    const float one_minus_b1 = __fsub_rn(1.0f, beta1);
    const float one_minus_b2 = __fsub_rn(1.0f, beta2);
    SG_GRID_STRIDE(e, len) {
        const u64 r = rows[e];
        const u64 c = cols[e];
        const u64 i = r * n_cols + c;
        // A dense change is a COO densify: its entries must be strictly ascending (distinct),
        // as coo_densify_* checks; one out of order is skipped and reported.
        const bool sorted = (dense == nullptr && dense_half == nullptr) || e == 0 ||
                            (u64)rows[e - 1] * n_cols + cols[e - 1] < i;
        if (r >= n_rows || c >= n_cols || !sorted) {
            atomicOr(err, SG_ERR_SPARSE_ADAM);
            continue;
        }
        const float g = values[e];
        const float m0 = exp_avg[i];
        const float v0 = exp_avg_sq[i];
        const float m = __fadd_rn(m0, __fmul_rn(__fsub_rn(g, m0), one_minus_b1));
        const float v = __fadd_rn(v0, __fmul_rn(__fsub_rn(__fmul_rn(g, g), v0), one_minus_b2));
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        const float change = -__fmul_rn(step_size, __fdiv_rn(m, __fadd_rn(__fsqrt_rn(v), eps)));
        if (param != nullptr) {
            const float p = __fadd_rn(param[i], change);
            param[i] = p;
            if (param_half != nullptr) param_half[i] = __float2bfloat16_rn(p);
        }
        if (delta != nullptr) delta[e] = change;
        if (dense != nullptr) dense[i] = change;
        if (dense_half != nullptr) dense_half[i] = __float2bfloat16_rn(change);
    }
    sg_clock_advance(clock);
}

__device__ __forceinline__ void adamw_one(float& p, float g, float& m, float& v, float step_size, float bc2_sqrt,
                                          float decay, float beta2, float eps, float one_minus_b1, float one_minus_b2) {
    p = __fmul_rn(p, decay);
    m = __fadd_rn(m, __fmul_rn(__fsub_rn(g, m), one_minus_b1));
    v = __fadd_rn(__fmul_rn(v, beta2), __fmul_rn(__fmul_rn(one_minus_b2, g), g));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), bc2_sqrt), eps);
    p = __fsub_rn(p, __fmul_rn(step_size, __fdiv_rn(m, denom)));
}

// One parameter of an AdamW launch (blockIdx.y picks it; mirrored by `AdamwJobArg` in
// src/backend/cuda/optim.rs): a batch of parameters steps in one launch, each exactly as
// alone, with its own clock and hyperparameters.
#define ADAMW_MAX_JOBS 8
struct AdamwJob {
    float* param;
    const float* grad;
    float* exp_avg;
    float* exp_avg_sq;
    __nv_bfloat16* param_half;
    u64 n;
    u64* clock;
    float lr;
    float weight_decay;
    float beta1;
    float beta2;
    float eps;
    float unused;
};
struct AdamwJobs {
    AdamwJob job[ADAMW_MAX_JOBS];
};

extern "C" __global__ void adamw_f32(const AdamwJobs jobs, const u64* health) {
    const AdamwJob& job = jobs.job[blockIdx.y];
    float* __restrict__ param = job.param;
    const float* __restrict__ grad = job.grad;
    float* __restrict__ exp_avg = job.exp_avg;
    float* __restrict__ exp_avg_sq = job.exp_avg_sq;
    __nv_bfloat16* __restrict__ param_half = job.param_half;
    const u64 n = job.n;
    u64* clock = job.clock;
    const float lr = job.lr;
    const float weight_decay = job.weight_decay;
    const float beta1 = job.beta1;
    const float beta2 = job.beta2;
    const float eps = job.eps;
    if (sg_health_bad(health)) return;  // uniform across the grid
    const int t = sg_clock_t(clock);
    const double bc1 = __dadd_rn(1.0, -sg_powi((double)beta1, t));
    const double bc2 = __dadd_rn(1.0, -sg_powi((double)beta2, t));
    const float step_size = (float)__ddiv_rn((double)lr, bc1);
    const float bc2_sqrt = (float)__dsqrt_rn(bc2);
    const float decay = __fsub_rn(1.0f, (float)__dmul_rn((double)lr, (double)weight_decay));
    const float omb1 = __fsub_rn(1.0f, beta1);
    const float omb2 = __fsub_rn(1.0f, beta2);
    const bool vec = sg_aligned(param, 16) && sg_aligned(grad, 16) && sg_aligned(exp_avg, 16) && sg_aligned(exp_avg_sq, 16);
    sg_vec4_loop(
        n, vec,
        [&](u64 i) {
            float4 p = reinterpret_cast<float4*>(param)[i];
            const float4 g = reinterpret_cast<const float4*>(grad)[i];
            float4 m = reinterpret_cast<float4*>(exp_avg)[i];
            float4 v = reinterpret_cast<float4*>(exp_avg_sq)[i];
            adamw_one(p.x, g.x, m.x, v.x, step_size, bc2_sqrt, decay, beta2, eps, omb1, omb2);
            adamw_one(p.y, g.y, m.y, v.y, step_size, bc2_sqrt, decay, beta2, eps, omb1, omb2);
            adamw_one(p.z, g.z, m.z, v.z, step_size, bc2_sqrt, decay, beta2, eps, omb1, omb2);
            adamw_one(p.w, g.w, m.w, v.w, step_size, bc2_sqrt, decay, beta2, eps, omb1, omb2);
            reinterpret_cast<float4*>(param)[i] = p;
            reinterpret_cast<float4*>(exp_avg)[i] = m;
            reinterpret_cast<float4*>(exp_avg_sq)[i] = v;
            if (param_half != nullptr) {
                param_half[4 * i] = __float2bfloat16_rn(p.x);
                param_half[4 * i + 1] = __float2bfloat16_rn(p.y);
                param_half[4 * i + 2] = __float2bfloat16_rn(p.z);
                param_half[4 * i + 3] = __float2bfloat16_rn(p.w);
            }
        },
        [&](u64 i) {
            float p = param[i];
            float m = exp_avg[i];
            float v = exp_avg_sq[i];
            adamw_one(p, grad[i], m, v, step_size, bc2_sqrt, decay, beta2, eps, omb1, omb2);
            param[i] = p;
            exp_avg[i] = m;
            exp_avg_sq[i] = v;
            if (param_half != nullptr) param_half[i] = __float2bfloat16_rn(p);
        });
    sg_clock_advance(clock);
}
