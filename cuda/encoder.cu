// encoder.cu: the ops a BERT-style encoder adds to the transformer set, forward and
// backward: LayerNorm (with its affine parameter gradients), the bidirectional softmax with
// a padding mask, and pooling of a sequence's token rows (mean over non-padding tokens, or
// the [CLS] token).
//
// Computes (CPU twins in src/backend/cpu/encoder.rs, launchers in
// src/backend/cuda/encoder.rs), f32 in and out, accumulating in f32:
//   layernorm_f32                 mean[r] = sum_c x[r,c] / cols, var = sum_c (x - mean)^2 / cols,
//                                 rstd[r] = 1 / sqrt(var + eps),
//                                 y[r,c] = (x[r,c] - mean[r]) rstd[r] w[c] + b[c]
//   layernorm_backward_f32        xh = (x - mean) rstd, g = w dy:
//                                 dx = rstd (g - sum_c g / cols - xh sum_c (g xh) / cols)
//   layernorm_param_grads_f32     dw[c] = beta dw[c] + sum_r dy[r,c] xh[r,c],
//                                 db[c] = beta db[c] + sum_r dy[r,c]
//   softmax_masked_f32            in place on rows of (t, t) matrices, mats = batch * heads,
//                                 matrix m belongs to sequence b = m / heads with
//                                 n = min(lengths[b], t) real tokens: row entries j < n hold
//                                 exp(scale s_j - max) / sum over j' < n, entries j >= n
//                                 (padding keys) exact 0; n = 0 gives a row of zeros
//   softmax_masked_backward_f32   ds_j = (scale p_j)(dp_j - sum_{j' < n} p_j' dp_j'), 0 for j >= n
//   pool_f32                      out[b,c] = sum_{j < n} x[b t + j, c] / n (kind 0, mean) or
//                                 x[b t, c] (kind 1, [CLS]); 0 when n = 0
//   pool_backward_f32             dx[b t + j, c] = dout[b,c] / n for j < n (mean), dout[b,c]
//                                 for j = 0 ([CLS]), 0 elsewhere (padding rows included)
//
// Launch shapes. The row kernels (layernorm, its backward, the softmaxes) give each row to
// one warp, 8 rows per block of 256 threads, grid.x capped by the launcher, striding over
// rows with 64-bit indices. BERT rows are short (hidden <= 1024, t <= 512), so one warp per
// row keeps every lane busy; wider rows stay correct (the lanes stride), only slower. Lane k
// takes elements k, k + 32, ... in every pass, so softmax_masked, working in place, only
// overwrites elements its own lane read. Reductions: warp butterflies, so every lane holds
// the bitwise same sum (deterministic). layernorm_param_grads_f32 and pool_f32 run one
// thread per output column (grid-stride), summing rows sequentially in row order;
// pool_backward_f32 one thread per element of dx.
//
// Rounding. Products, differences and quotients that have a CPU twin are explicitly rounded
// intrinsics (__fmul_rn, __fsub_rn, __fadd_rn, __fdiv_rn, __fsqrt_rn), so nvcc cannot contract
// them into FMAs. The row sums (warp trees here, f64 on the CPU), and expf vs libm, differ by
// a few ulp; pooling sums rows in the CPU's order with the CPU's f32 rounding and matches it
// bit for bit.
//
// Tested by tests/cuda_encoder.rs (every kernel against the CPU backend on ragged shapes,
// outputs poisoned first, tails checked untouched); the CPU specification by finite
// differences in the same file.
#include "common.cuh"

// Rows per block of the warp-per-row kernels (the launcher's ROWS_PER_BLOCK).
#define SG_ENC_ROWS 8

__device__ __forceinline__ float enc_neg_inf() { return __uint_as_float(0xff800000u); }

__device__ __forceinline__ float enc_warp_max(float v) {
#pragma unroll
    for (u32 o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// The rows of a warp-per-row kernel: lane `lane` of warp `first` handles rows first,
// first + stride, ...
struct WarpRows {
    u32 lane;
    u64 first;
    u64 stride;
    __device__ __forceinline__ WarpRows() {
        const u64 per_block = blockDim.x / 32;
        lane = threadIdx.x & 31u;
        first = (u64)blockIdx.x * per_block + threadIdx.x / 32;
        stride = (u64)gridDim.x * per_block;
    }
};

// ---- LayerNorm ---------------------------------------------------------------------------
// n_cols is `cols` as the CPU converts it (usize -> f64 -> f32), passed by the launcher.

extern "C" __global__ void __launch_bounds__(256)
    layernorm_f32(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                  float* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd, u64 rows, u64 cols,
                  float n_cols, float eps) {
    const WarpRows g;
    for (u64 r = g.first; r < rows; r += g.stride) {
        const float* xr = x + r * cols;
        float* yr = y + r * cols;
        float s = 0.0f;
        for (u64 j = g.lane; j < cols; j += 32) s = __fadd_rn(s, xr[j]);
        const float mu = __fdiv_rn(sg_warp_sum(s), n_cols);
        // Two passes (sum of squared deviations), as the CPU twin: no cancellation.
        float ss = 0.0f;
        for (u64 j = g.lane; j < cols; j += 32) {
            const float d = __fsub_rn(xr[j], mu);
            ss = __fadd_rn(ss, __fmul_rn(d, d));
        }
        const float var = __fdiv_rn(sg_warp_sum(ss), n_cols);
        const float rs = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(var, eps)));
        if (g.lane == 0) {
            mean[r] = mu;
            rstd[r] = rs;
        }
        for (u64 j = g.lane; j < cols; j += 32) {
            yr[j] = __fadd_rn(__fmul_rn(__fmul_rn(__fsub_rn(xr[j], mu), rs), w[j]), b[j]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
    layernorm_backward_f32(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ mean,
                           const float* __restrict__ rstd, const float* __restrict__ dy, float* __restrict__ dx,
                           u64 rows, u64 cols, float n_cols) {
    const WarpRows g;
    for (u64 r = g.first; r < rows; r += g.stride) {
        const float* xr = x + r * cols;
        const float* dyr = dy + r * cols;
        float* dxr = dx + r * cols;
        const float mu = mean[r];
        const float rs = rstd[r];
        float sg = 0.0f;
        float sgx = 0.0f;
        for (u64 j = g.lane; j < cols; j += 32) {
            const float gj = __fmul_rn(w[j], dyr[j]);
            const float xh = __fmul_rn(__fsub_rn(xr[j], mu), rs);
            sg = __fadd_rn(sg, gj);
            sgx = __fadd_rn(sgx, __fmul_rn(gj, xh));
        }
        const float mg = __fdiv_rn(sg_warp_sum(sg), n_cols);
        const float mgx = __fdiv_rn(sg_warp_sum(sgx), n_cols);
        for (u64 j = g.lane; j < cols; j += 32) {
            const float gj = __fmul_rn(w[j], dyr[j]);
            const float xh = __fmul_rn(__fsub_rn(xr[j], mu), rs);
            dxr[j] = __fmul_rn(rs, __fsub_rn(__fsub_rn(gj, mg), __fmul_rn(xh, mgx)));
        }
    }
}

extern "C" __global__ void layernorm_param_grads_f32(const float* __restrict__ x, const float* __restrict__ mean,
                                                     const float* __restrict__ rstd, const float* __restrict__ dy,
                                                     float* __restrict__ dw, float* __restrict__ db, u64 rows,
                                                     u64 cols, float beta) {
    SG_GRID_STRIDE(c, cols) {
        float sw = 0.0f;
        float sb = 0.0f;
        for (u64 r = 0; r < rows; ++r) {
            const float d = dy[r * cols + c];
            const float xh = __fmul_rn(__fsub_rn(x[r * cols + c], mean[r]), rstd[r]);
            sw = __fadd_rn(sw, __fmul_rn(d, xh));
            sb = __fadd_rn(sb, d);
        }
        // beta = 0 overwrites (the old value may be NaN), as the CPU twin.
        dw[c] = beta == 0.0f ? sw : __fadd_rn(__fmul_rn(beta, dw[c]), sw);
        db[c] = beta == 0.0f ? sb : __fadd_rn(__fmul_rn(beta, db[c]), sb);
    }
}

// ---- masked bidirectional softmax ----------------------------------------------------------
// `rows` = mats * t rows of t elements; row r belongs to matrix m = r / t, sequence
// m / heads. Rows start at r * t, aligned only when t % 4 == 0: scalar accesses.

__device__ __forceinline__ u64 enc_live(const u32* lengths, u64 seq, u64 t) {
    const u64 n = lengths[seq];
    return n < t ? n : t;
}

extern "C" __global__ void __launch_bounds__(256)
    softmax_masked_f32(float* __restrict__ s, const u32* __restrict__ lengths, u64 rows, u64 t, u64 heads,
                       float scale) {
    const WarpRows g;
    for (u64 r = g.first; r < rows; r += g.stride) {
        float* row = s + r * t;
        const u64 n = enc_live(lengths, r / t / heads, t);
        float mx = enc_neg_inf();
        for (u64 j = g.lane; j < n; j += 32) mx = fmaxf(mx, __fmul_rn(scale, row[j]));
        mx = enc_warp_max(mx);
        float sum = 0.0f;
        for (u64 j = g.lane; j < n; j += 32) sum += expf(__fsub_rn(__fmul_rn(scale, row[j]), mx));
        sum = sg_warp_sum(sum);
        // Same inputs, same expf: the numerators are bitwise those just summed.
        for (u64 j = g.lane; j < n; j += 32) row[j] = __fdiv_rn(expf(__fsub_rn(__fmul_rn(scale, row[j]), mx)), sum);
        for (u64 j = n + g.lane; j < t; j += 32) row[j] = 0.0f;
    }
}

extern "C" __global__ void __launch_bounds__(256)
    softmax_masked_backward_f32(const float* __restrict__ p, const float* __restrict__ dp, float* __restrict__ ds,
                                const u32* __restrict__ lengths, u64 rows, u64 t, u64 heads, float scale) {
    const WarpRows g;
    for (u64 r = g.first; r < rows; r += g.stride) {
        const u64 off = r * t;
        const float* pr = p + off;
        const float* dpr = dp + off;
        float* dsr = ds + off;
        const u64 n = enc_live(lengths, r / t / heads, t);
        float dot = 0.0f;
        for (u64 j = g.lane; j < n; j += 32) dot += pr[j] * dpr[j];
        dot = sg_warp_sum(dot);
        for (u64 j = g.lane; j < n; j += 32) dsr[j] = __fmul_rn(__fmul_rn(scale, pr[j]), __fsub_rn(dpr[j], dot));
        for (u64 j = n + g.lane; j < t; j += 32) dsr[j] = 0.0f;
    }
}

// ---- pooling -------------------------------------------------------------------------------
// x, dx: (batch * t, cols); out, dout: (batch, cols); kind 0 = mean, 1 = [CLS].

extern "C" __global__ void pool_f32(const float* __restrict__ x, const u32* __restrict__ lengths,
                                    float* __restrict__ out, u64 batch, u64 t, u64 cols, u32 kind) {
    SG_GRID_STRIDE(i, batch * cols) {
        const u64 b = i / cols;
        const u64 c = i - b * cols;
        const u64 n = enc_live(lengths, b, t);
        const float* xb = x + b * t * cols + c;
        float v = 0.0f;
        if (n > 0) {
            if (kind == 1u) {
                v = xb[0];
            } else {
                for (u64 j = 0; j < n; ++j) v = __fadd_rn(v, xb[j * cols]);
                v = __fdiv_rn(v, (float)(double)n);
            }
        }
        out[i] = v;
    }
}

extern "C" __global__ void pool_backward_f32(const float* __restrict__ dout, const u32* __restrict__ lengths,
                                             float* __restrict__ dx, u64 batch, u64 t, u64 cols, u32 kind) {
    SG_GRID_STRIDE(i, batch * t * cols) {
        const u64 row = i / cols;
        const u64 c = i - row * cols;
        const u64 b = row / t;
        const u64 j = row - b * t;
        const u64 n = enc_live(lengths, b, t);
        const float d = dout[b * cols + c];
        float v = 0.0f;
        if (kind == 1u) {
            if (j == 0 && n > 0) v = d;
        } else if (j < n) {
            v = __fdiv_rn(d, (float)(double)n);
        }
        dx[i] = v;
    }
}
