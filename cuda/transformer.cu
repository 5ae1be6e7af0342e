// transformer.cu: the frozen transformer ops that gradients flow through, forward and
// backward: RMSNorm, rotary position embedding, causal softmax and masked cross-entropy.
//
// Computes (CPU twins in src/backend/cpu/transformer.rs, launchers in
// src/backend/cuda/transformer.rs), f32 in and out, accumulating in f32:
//   rmsnorm_gG_f32                  inv_rms[r] = 1 / sqrt(sum_c x[r,c]^2 / cols + eps),
//                                   y[r,c] = x[r,c] * inv_rms[r] * w[c] (or, given y_half, only
//                                   its bf16 rounding, for a norm whose output only feeds GEMMs);
//                                   given `residual`, first x[r,c] += residual[r,c] in place (one
//                                   rounded add, as axpy_f32 with alpha 1: the residual stream
//                                   into the next norm), and given x_save, x's new row there too
//   rmsnorm_backward_gG_f32         dx[r,c] = inv (w[c] dy[r,c] - x[r,c] (inv^2 dot)),
//                                   dot = sum_c w[c] dy[r,c] x[r,c] / cols, inv = inv_rms[r];
//                                   with `accumulate`, dx[r,c] += that (one rounded add, as
//                                   axpy_f32 with alpha 1: the residual stream's gradient);
//                                   given dy2, dy + dy2 in place of dy (one rounded add, as
//                                   axpy_f32: a gradient that arrives in two parts);
//                                   given dx_half, the result's bf16 rounding there too
//   rope_f32                        rotate-half RoPE in place on (tokens, heads * head_dim)
//                                   (and a second such tensor, the keys, in the same launch):
//                                   token t at position p = t % seq_len, pair (i, i + h),
//                                   h = head_dim / 2: (a, b) <- (a c - b s, a s + b c) with
//                                   c = cos[p, i], s = sin[p, i] (s negated for `inverse`)
//   softmax_causal_gG_f32           in place on rows of (t, t) matrices: row i holds
//                                   exp(scale s_j - max) / sum for j <= i and exact 0 above
//   softmax_causal_backward_gG_f32  ds_j = (scale p_j)(dp_j - sum_{j' <= i} p_j' dp_j'), 0 above
//   cross_entropy_gG_f32            per row with mask m != 0: lse = max + log(sum exp(l - max)),
//                                   losses[r] = m (lse - l[target]), l[j] <- g exp(l[j] - lse)
//                                   - g [j == target], g = grad_scale m; a row with m == 0 gets
//                                   zero loss and zero gradient whatever its target. grad_scale
//                                   is read from `scale_ptr` when that is not null
//   loss_scale_f32                  one block: out = f32(1 / max(1, #{r : mask[r] != 0})) in
//                                   f64, the mean-over-mask scale (LossScale::MeanOverMask)
//
// Launch shapes. The row kernels (every one but rope) give each row to a group of GROUP
// threads, G in the name: G = 32 is one warp per row, 8 rows per block of 256 threads
// (rows up to 1024 wide); G = 256 and G = 1024 are one block of G threads per row (the
// launcher picks 256 up to 16384 columns, 1024 beyond, e.g. a 49152-token vocabulary).
// grid.x = ceil(rows / rows per block), capped by the launcher; the kernels stride over rows
// (64-bit row indices and offsets). Within a row, lane k of the group takes elements
// k, k + G, ... (or float4 groups k, k + G, ... when the row width is a multiple of 4 and
// the buffers are 16-byte aligned), the same mapping in every pass, so a thread only ever
// overwrites elements it read itself (softmax and cross_entropy work in place).
// Reductions: warp butterflies (every lane ends with the bitwise same value), then for
// G > 32 one value per warp through shared memory, summed in warp order: deterministic.
// Passes: rmsnorm 2 (sum of squares, write), rmsnorm_backward 2, softmax 3 over j <= i (max,
// sum, write) plus the zero fill above the diagonal, its backward 2, cross_entropy 3 (max,
// sum, write); passes after the first re-read the row, mostly from L2.
// rope_f32: block 256 over the heads * head_dim / 2 rotation pairs of a token (grid.x =
// ceil(pairs / 256), capped, striding), grid.y (<= 65535) strides over tokens; one thread
// per pair, so both elements of a pair are read before either is written.
//
// Rounding. Every product, difference and quotient that has a CPU twin is an explicitly
// rounded intrinsic (__fmul_rn, __fsub_rn, __fadd_rn, __fdiv_rn, __fsqrt_rn), so nvcc cannot
// contract it into an FMA and each element is computed exactly like the CPU's f32, except
// for (a) the order of the row sums (tree here, sequential on the CPU) and (b) expf / logf
// (CUDA's accurate versions, no fast math: <= 2 ulp, vs the host libm). rope has neither,
// so it is bit-identical to the CPU; the others agree to ~1e-6 relative (tolerances and
// their reasoning in tests/cuda_transformer.rs).
//
// Errors. cross_entropy: a row with mask != 0 and target >= vocab is skipped (zero loss,
// zero gradient) and sets SG_ERR_CROSS_ENTROPY in the device error word, which the host
// reports at its next synchronization point (the CPU twin fails before writing anything).
//
// Tested by tests/cuda_transformer.rs (every kernel against the CPU backend on ragged
// shapes, every group size, outputs poisoned first); the CPU specification itself by
// tests/cpu_transformer_ops.rs (finite differences, HF rotate-half reference); benchmarked
// (GB/s vs a device memcpy) by benches/cuda_kernels.rs.
#include "common.cuh"

// SG_ERR_CROSS_ENTROPY (common.cuh) flags a masked-in row whose target is outside the
// vocabulary; `ERR_BITS` in src/backend/cuda/mod.rs names it on the host.
static_assert(SG_ERR_CROSS_ENTROPY == 64u, "SG_ERR_CROSS_ENTROPY must stay 64 (see the launcher)");

// Threads per block of a row kernel with groups of G threads.
#define SG_ROW_BLOCK(G) ((G) < 256 ? 256 : (G))

#define SG_F4 reinterpret_cast<const float4*>
#define SG_F4_MUT reinterpret_cast<float4*>

__device__ __forceinline__ float sg_neg_inf() { return __uint_as_float(0xff800000u); }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (u32 o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the GROUP threads of a row; every thread of the group gets the result.
// `smem` holds 32 floats. For GROUP > 32 the group is the whole block: every thread of the
// block must call it (barriers), and it ends with a barrier, so `smem` may be reused.
template <int GROUP>
__device__ __forceinline__ float group_sum(float v, float* smem) {
    static_assert(GROUP == 32 || GROUP == 256 || GROUP == 1024, "group size");
    if constexpr (GROUP == 32) {
        (void)smem;
        return sg_warp_sum(v);
    } else {
        return sg_block_sum<float, GROUP>(v, smem);
    }
}

// Maximum over the GROUP threads of a row (NaN ignored, like fmaxf and Rust's f32::max).
template <int GROUP>
__device__ __forceinline__ float group_max(float v, float* smem) {
    static_assert(GROUP == 32 || GROUP == 256 || GROUP == 1024, "group size");
    v = warp_max(v);
    if constexpr (GROUP == 32) {
        (void)smem;
        return v;
    } else {
        constexpr int WARPS = GROUP / 32;
        const int lane = threadIdx.x & 31;
        const int warp = threadIdx.x >> 5;
        if (lane == 0) smem[warp] = v;
        __syncthreads();
        float m = smem[0];
#pragma unroll
        for (int w = 1; w < WARPS; ++w) m = fmaxf(m, smem[w]);
        __syncthreads();
        return m;
    }
}

// Orders the memory accesses of the group's threads (a warp or the whole block).
template <int GROUP>
__device__ __forceinline__ void group_sync() {
    if constexpr (GROUP == 32) {
        __syncwarp();
    } else {
        __syncthreads();
    }
}

// The rows of a group kernel: thread `lane` of the group handles rows first, first + stride, ...
template <int GROUP>
struct RowGroup {
    u32 lane;
    u64 first;
    u64 stride;
    __device__ __forceinline__ RowGroup() {
        const u64 per_block = blockDim.x / GROUP;
        lane = threadIdx.x % GROUP;
        first = (u64)blockIdx.x * per_block + threadIdx.x / GROUP;
        stride = (u64)gridDim.x * per_block;
    }
};

// Visits the part of a row of n elements owned by `lane`: with `vec` (which requires
// n % 4 == 0 and 16-byte aligned row starts) float4 group k (elements 4k .. 4k+3) for
// k = lane, lane + GROUP, ...; otherwise element j for j = lane, lane + GROUP, ...
template <int GROUP, typename V, typename S>
__device__ __forceinline__ void row_for(u64 n, bool vec, u32 lane, V vec_body, S scalar_body) {
    if (vec) {
        const u64 n4 = n >> 2;
#pragma unroll 4
        for (u64 k = lane; k < n4; k += GROUP) vec_body(k);
    } else {
#pragma unroll 4
        for (u64 j = lane; j < n; j += GROUP) scalar_body(j);
    }
}

// ---- RMSNorm ----------------------------------------------------------------------------
// n_cols is `cols` as the CPU converts it (usize -> f64 -> f32), passed by the launcher.

template <int GROUP>
__device__ __forceinline__ void rmsnorm_impl(float* __restrict__ x, const float* __restrict__ residual,
                                             float* __restrict__ x_save, const float* __restrict__ w,
                                             float* __restrict__ y, __nv_bfloat16* __restrict__ y_half,
                                             float* __restrict__ inv_rms, u64 rows, u64 cols, float n_cols, float eps) {
    __shared__ float smem[32];
    const RowGroup<GROUP> g;
    const bool vec = (cols & 3) == 0 && sg_aligned(x, 16) && sg_aligned(w, 16) && sg_aligned(y, 16) &&
                     sg_aligned(residual, 16) && sg_aligned(x_save, 16);
    for (u64 r = g.first; r < rows; r += g.stride) {
        float* xr = x + r * cols;
        const float* br = residual ? residual + r * cols : nullptr;
        float* sr = x_save ? x_save + r * cols : nullptr;
        float* yr = y_half ? nullptr : y + r * cols;
        __nv_bfloat16* hr = y_half ? y_half + r * cols : nullptr;
        float ss = 0.0f;
        // Pass 1: the residual add (written back to x, and to x_save), the sum of squares.
        row_for<GROUP>(
            cols, vec, g.lane,
            [&](u64 k) {
                float4 v = SG_F4(xr)[k];
                if (br) {
                    const float4 b = SG_F4(br)[k];
                    v = make_float4(__fadd_rn(v.x, b.x), __fadd_rn(v.y, b.y), __fadd_rn(v.z, b.z), __fadd_rn(v.w, b.w));
                    SG_F4_MUT(xr)[k] = v;
                }
                if (sr) SG_F4_MUT(sr)[k] = v;
                ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
            },
            [&](u64 j) {
                float v = xr[j];
                if (br) {
                    v = __fadd_rn(v, br[j]);
                    xr[j] = v;
                }
                if (sr) sr[j] = v;
                ss += v * v;
            });
        ss = group_sum<GROUP>(ss, smem);
        const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, n_cols), eps)));
        if (g.lane == 0) inv_rms[r] = inv;
        // Pass 2 re-reads x: each thread only the elements it wrote itself in pass 1.
        row_for<GROUP>(
            cols, vec, g.lane,
            [&](u64 k) {
                const float4 v = SG_F4(xr)[k];
                const float4 s = SG_F4(w)[k];
                const float4 o = make_float4(__fmul_rn(__fmul_rn(v.x, inv), s.x), __fmul_rn(__fmul_rn(v.y, inv), s.y),
                                             __fmul_rn(__fmul_rn(v.z, inv), s.z), __fmul_rn(__fmul_rn(v.w, inv), s.w));
                if (hr) {
                    hr[4 * k] = __float2bfloat16_rn(o.x);
                    hr[4 * k + 1] = __float2bfloat16_rn(o.y);
                    hr[4 * k + 2] = __float2bfloat16_rn(o.z);
                    hr[4 * k + 3] = __float2bfloat16_rn(o.w);
                } else {
                    SG_F4_MUT(yr)[k] = o;
                }
            },
            [&](u64 j) {
                const float o = __fmul_rn(__fmul_rn(xr[j], inv), w[j]);
                if (hr) {
                    hr[j] = __float2bfloat16_rn(o);
                } else {
                    yr[j] = o;
                }
            });
    }
}

__device__ __forceinline__ float rmsnorm_dx(float x, float w, float dy, float inv, float k) {
    return __fmul_rn(inv, __fsub_rn(__fmul_rn(w, dy), __fmul_rn(x, k)));
}

template <int GROUP>
__device__ __forceinline__ void rmsnorm_backward_impl(const float* __restrict__ x, const float* __restrict__ w,
                                                      const float* __restrict__ inv_rms, const float* __restrict__ dy,
                                                      const float* __restrict__ dy2, float* __restrict__ dx,
                                                      __nv_bfloat16* __restrict__ dx_half, u64 rows, u64 cols,
                                                      float n_cols, u32 accumulate) {
    __shared__ float smem[32];
    const RowGroup<GROUP> g;
    const bool vec = (cols & 3) == 0 && sg_aligned(x, 16) && sg_aligned(w, 16) && sg_aligned(dy, 16) &&
                     sg_aligned(dy2, 16) && sg_aligned(dx, 16);
    // Uniform across the grid; the add is __fadd_rn so it is never contracted into an FMA.
    const auto put = [accumulate](float old, float v) { return accumulate ? __fadd_rn(old, v) : v; };
    for (u64 r = g.first; r < rows; r += g.stride) {
        const float* xr = x + r * cols;
        const float* dyr = dy + r * cols;
        const float* d2r = dy2 ? dy2 + r * cols : nullptr;
        float* dxr = dx + r * cols;
        __nv_bfloat16* hr = dx_half ? dx_half + r * cols : nullptr;
        // The output gradient: dy, or the sum of its two parts (one rounded add, as axpy_f32).
        const auto grad4 = [&](u64 k) {
            const float4 d = SG_F4(dyr)[k];
            if (!d2r) return d;
            const float4 e = SG_F4(d2r)[k];
            return make_float4(__fadd_rn(d.x, e.x), __fadd_rn(d.y, e.y), __fadd_rn(d.z, e.z), __fadd_rn(d.w, e.w));
        };
        const auto grad = [&](u64 j) { return d2r ? __fadd_rn(dyr[j], d2r[j]) : dyr[j]; };
        float dot = 0.0f;
        row_for<GROUP>(
            cols, vec, g.lane,
            [&](u64 k) {
                const float4 a = SG_F4(xr)[k];
                const float4 s = SG_F4(w)[k];
                const float4 d = grad4(k);
                dot += s.x * d.x * a.x + s.y * d.y * a.y + s.z * d.z * a.z + s.w * d.w * a.w;
            },
            [&](u64 j) { dot += w[j] * grad(j) * xr[j]; });
        dot = __fdiv_rn(group_sum<GROUP>(dot, smem), n_cols);
        const float inv = inv_rms[r];
        const float k2 = __fmul_rn(__fmul_rn(inv, inv), dot);
        row_for<GROUP>(
            cols, vec, g.lane,
            [&](u64 k) {
                const float4 a = SG_F4(xr)[k];
                const float4 s = SG_F4(w)[k];
                const float4 d = grad4(k);
                const float4 o = accumulate ? SG_F4(dxr)[k] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                const float4 n = make_float4(
                    put(o.x, rmsnorm_dx(a.x, s.x, d.x, inv, k2)), put(o.y, rmsnorm_dx(a.y, s.y, d.y, inv, k2)),
                    put(o.z, rmsnorm_dx(a.z, s.z, d.z, inv, k2)), put(o.w, rmsnorm_dx(a.w, s.w, d.w, inv, k2)));
                SG_F4_MUT(dxr)[k] = n;
                if (hr) {
                    hr[4 * k] = __float2bfloat16_rn(n.x);
                    hr[4 * k + 1] = __float2bfloat16_rn(n.y);
                    hr[4 * k + 2] = __float2bfloat16_rn(n.z);
                    hr[4 * k + 3] = __float2bfloat16_rn(n.w);
                }
            },
            [&](u64 j) {
                const float n = put(accumulate ? dxr[j] : 0.0f, rmsnorm_dx(xr[j], w[j], grad(j), inv, k2));
                dxr[j] = n;
                if (hr) hr[j] = __float2bfloat16_rn(n);
            });
    }
}

// ---- causal softmax ----------------------------------------------------------------------
// `rows` = mats * t rows of t elements; row r is row i = r % t of its matrix, whose first
// i + 1 entries are live. Rows start at r * t, aligned only when t % 4 == 0: scalar accesses.

template <int GROUP>
__device__ __forceinline__ void softmax_causal_impl(float* __restrict__ s, u64 rows, u64 t, float scale) {
    __shared__ float smem[32];
    const RowGroup<GROUP> g;
    for (u64 r = g.first; r < rows; r += g.stride) {
        float* row = s + r * t;
        const u64 n = r % t + 1;
        float mx = sg_neg_inf();
#pragma unroll 4
        for (u64 j = g.lane; j < n; j += GROUP) mx = fmaxf(mx, __fmul_rn(scale, row[j]));
        mx = group_max<GROUP>(mx, smem);
        float sum = 0.0f;
#pragma unroll 4
        for (u64 j = g.lane; j < n; j += GROUP) sum += expf(__fsub_rn(__fmul_rn(scale, row[j]), mx));
        sum = group_sum<GROUP>(sum, smem);
        // Same inputs, same expf: the numerators are bitwise those just summed.
#pragma unroll 4
        for (u64 j = g.lane; j < n; j += GROUP) row[j] = __fdiv_rn(expf(__fsub_rn(__fmul_rn(scale, row[j]), mx)), sum);
#pragma unroll 4
        for (u64 j = n + g.lane; j < t; j += GROUP) row[j] = 0.0f;
    }
}

template <int GROUP>
__device__ __forceinline__ void softmax_causal_backward_impl(const float* __restrict__ p, const float* __restrict__ dp,
                                                             float* __restrict__ ds, u64 rows, u64 t, float scale) {
    __shared__ float smem[32];
    const RowGroup<GROUP> g;
    for (u64 r = g.first; r < rows; r += g.stride) {
        const u64 off = r * t;
        const float* pr = p + off;
        const float* dpr = dp + off;
        float* dsr = ds + off;
        const u64 n = r % t + 1;
        float dot = 0.0f;
#pragma unroll 4
        for (u64 j = g.lane; j < n; j += GROUP) dot += pr[j] * dpr[j];
        dot = group_sum<GROUP>(dot, smem);
#pragma unroll 4
        for (u64 j = g.lane; j < n; j += GROUP) dsr[j] = __fmul_rn(__fmul_rn(scale, pr[j]), __fsub_rn(dpr[j], dot));
#pragma unroll 4
        for (u64 j = n + g.lane; j < t; j += GROUP) dsr[j] = 0.0f;
    }
}

// ---- masked cross-entropy ------------------------------------------------------------------

__device__ __forceinline__ float ce_grad(float v, float lse, float g) { return __fmul_rn(g, expf(__fsub_rn(v, lse))); }

template <int GROUP>
__device__ __forceinline__ void cross_entropy_impl(float* __restrict__ logits, const u32* __restrict__ targets,
                                                   const float* __restrict__ mask, u64 rows, u64 vocab, float grad_scale,
                                                   const float* scale_ptr, float* __restrict__ losses, u32* err) {
    __shared__ float smem[32];
    if (scale_ptr != nullptr) grad_scale = *scale_ptr;
    const RowGroup<GROUP> g;
    const bool vec = (vocab & 3) == 0 && sg_aligned(logits, 16);
    for (u64 r = g.first; r < rows; r += g.stride) {
        float* l = logits + r * vocab;
        const float m = mask[r];
        const u64 tgt = targets[r];
        // Uniform over the group (one row), so the barriers below stay uniform too.
        if (m == 0.0f || tgt >= vocab) {
            if (m != 0.0f && g.lane == 0) atomicOr(err, SG_ERR_CROSS_ENTROPY);
            row_for<GROUP>(
                vocab, vec, g.lane, [&](u64 k) { SG_F4_MUT(l)[k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f); },
                [&](u64 j) { l[j] = 0.0f; });
            if (g.lane == 0) losses[r] = 0.0f;
            continue;
        }
        // The target's logit, read before the group_sync below orders it before any write.
        const float lt = g.lane == 0 ? l[tgt] : 0.0f;
        float mx = sg_neg_inf();
        row_for<GROUP>(
            vocab, vec, g.lane,
            [&](u64 k) {
                const float4 v = SG_F4(l)[k];
                mx = fmaxf(mx, fmaxf(fmaxf(v.x, v.y), fmaxf(v.z, v.w)));
            },
            [&](u64 j) { mx = fmaxf(mx, l[j]); });
        mx = group_max<GROUP>(mx, smem);
        float sum = 0.0f;
        row_for<GROUP>(
            vocab, vec, g.lane,
            [&](u64 k) {
                const float4 v = SG_F4(l)[k];
                sum += expf(__fsub_rn(v.x, mx)) + expf(__fsub_rn(v.y, mx)) + expf(__fsub_rn(v.z, mx)) +
                       expf(__fsub_rn(v.w, mx));
            },
            [&](u64 j) { sum += expf(__fsub_rn(l[j], mx)); });
        sum = group_sum<GROUP>(sum, smem);
        const float lse = __fadd_rn(mx, logf(sum));
        const float gs = __fmul_rn(grad_scale, m);
        group_sync<GROUP>();
        const u64 tk = tgt >> 2;
        row_for<GROUP>(
            vocab, vec, g.lane,
            [&](u64 k) {
                const float4 v = SG_F4(l)[k];
                float4 o = make_float4(ce_grad(v.x, lse, gs), ce_grad(v.y, lse, gs), ce_grad(v.z, lse, gs),
                                       ce_grad(v.w, lse, gs));
                if (k == tk) {
                    switch (tgt & 3) {
                        case 0: o.x = __fsub_rn(o.x, gs); break;
                        case 1: o.y = __fsub_rn(o.y, gs); break;
                        case 2: o.z = __fsub_rn(o.z, gs); break;
                        default: o.w = __fsub_rn(o.w, gs); break;
                    }
                }
                SG_F4_MUT(l)[k] = o;
            },
            [&](u64 j) {
                const float o = ce_grad(l[j], lse, gs);
                l[j] = j == tgt ? __fsub_rn(o, gs) : o;
            });
        if (g.lane == 0) losses[r] = __fmul_rn(m, __fsub_rn(lse, lt));
    }
}

// ---- entry points: each row kernel for G = 32, 256, 1024 -------------------------------------

#define SG_ROW_KERNELS(G)                                                                                            \
    extern "C" __global__ void __launch_bounds__(SG_ROW_BLOCK(G))                                                    \
        rmsnorm_g##G##_f32(float* x, const float* residual, float* x_save, const float* w, float* y,               \
                           __nv_bfloat16* y_half, float* inv_rms, u64 rows, u64 cols, float n_cols, float eps) {     \
        rmsnorm_impl<G>(x, residual, x_save, w, y, y_half, inv_rms, rows, cols, n_cols, eps);                        \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(SG_ROW_BLOCK(G))                                                    \
        rmsnorm_backward_g##G##_f32(const float* x, const float* w, const float* inv_rms, const float* dy,          \
                                    const float* dy2, float* dx, __nv_bfloat16* dx_half, u64 rows, u64 cols,         \
                                    float n_cols, u32 accumulate) {                                                  \
        rmsnorm_backward_impl<G>(x, w, inv_rms, dy, dy2, dx, dx_half, rows, cols, n_cols, accumulate);               \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(SG_ROW_BLOCK(G))                                                    \
        softmax_causal_g##G##_f32(float* s, u64 rows, u64 t, float scale) {                                          \
        softmax_causal_impl<G>(s, rows, t, scale);                                                                   \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(SG_ROW_BLOCK(G))                                                    \
        softmax_causal_backward_g##G##_f32(const float* p, const float* dp, float* ds, u64 rows, u64 t,              \
                                           float scale) {                                                            \
        softmax_causal_backward_impl<G>(p, dp, ds, rows, t, scale);                                                  \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(SG_ROW_BLOCK(G))                                                    \
        cross_entropy_g##G##_f32(float* logits, const u32* targets, const float* mask, u64 rows, u64 vocab,          \
                                 float grad_scale, const float* scale_ptr, float* losses, u32* err) {                \
        cross_entropy_impl<G>(logits, targets, mask, rows, vocab, grad_scale, scale_ptr, losses, err);               \
    }

extern "C" __global__ void loss_scale_f32(const float* mask, u64 rows, float* out) {
    __shared__ u64 red[SG_THREADS / 32];
    if (blockIdx.x != 0) return;
    u64 n = 0;
    for (u64 r = threadIdx.x; r < rows; r += blockDim.x) n += mask[r] != 0.0f ? 1 : 0;
    n = sg_block_sum<u64, SG_THREADS>(n, red);
    if (threadIdx.x == 0) *out = (float)__ddiv_rn(1.0, (double)(n > 0 ? n : 1));
}

SG_ROW_KERNELS(32)
SG_ROW_KERNELS(256)
SG_ROW_KERNELS(1024)

// ---- rotary embedding ------------------------------------------------------------------------
// x: (tokens, heads * head_dim), and x2: (tokens, heads2 * head_dim) (queries and keys in one
// launch; heads2 = 0 for one tensor); cos, sin: (seq_len, head_dim / 2). (heads + heads2) *
// head_dim / 2 = `pairs` < 2^31 (checked by the launcher), so the pair index and its stride
// fit in u32. Pairs below heads * head_dim / 2 are x's, the rest x2's. Given x_half / x2_half,
// the rotated values are also rounded to bf16 there (the operands of the GEMMs that follow).
extern "C" __global__ void rope_f32(float* __restrict__ x, u32 heads, float* __restrict__ x2, u32 heads2, u64 tokens,
                                    u32 head_dim, u64 seq_len, const float* __restrict__ cos,
                                    const float* __restrict__ sin, u32 inverse, __nv_bfloat16* __restrict__ x_half,
                                    __nv_bfloat16* __restrict__ x2_half) {
    const u32 half = head_dim >> 1;
    const u32 pairs1 = heads * half;
    const u32 pairs = pairs1 + heads2 * half;
    const u64 width = (u64)heads * head_dim;
    const u64 width2 = (u64)heads2 * head_dim;
    const u32 stride = gridDim.x * blockDim.x;
    for (u64 t = blockIdx.y; t < tokens; t += gridDim.y) {
        const u64 p = t % seq_len;
        const float* c = cos + p * half;
        const float* s = sin + p * half;
        for (u32 j = blockIdx.x * blockDim.x + threadIdx.x; j < pairs; j += stride) {
            const bool second = j >= pairs1;
            const u32 jj = second ? j - pairs1 : j;
            const u32 h = jj / half;
            const u32 i = jj - h * half;
            const u64 at = (second ? t * width2 : t * width) + (u64)h * head_dim;
            float* hp = (second ? x2 : x) + at;
            const float a = hp[i];
            const float b = hp[i + half];
            const float cc = c[i];
            const float ss = inverse ? -s[i] : s[i];
            const float ra = __fsub_rn(__fmul_rn(a, cc), __fmul_rn(b, ss));
            const float rb = __fadd_rn(__fmul_rn(a, ss), __fmul_rn(b, cc));
            hp[i] = ra;
            hp[i + half] = rb;
            __nv_bfloat16* hh = second ? x2_half : x_half;  // the bf16 copy, when asked for
            if (hh) {
                hh[at + i] = __float2bfloat16_rn(ra);
                hh[at + i + half] = __float2bfloat16_rn(rb);
            }
        }
    }
}
