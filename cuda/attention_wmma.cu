// attention_wmma.cu: the bf16 tensor-core path of the fused attention (nvcuda::wmma,
// 16x16x16 bf16 fragments with f32 accumulators, sm_80 and later), one kernel per padded
// head dim DP = 32, 64, 96, 128 (head_dim rounded up; the padding columns are zeros):
//   attention_forward_bf16_dDP        the forward of attention_forward_f32
//   attention_backward_dkdv_bf16_dDP  dk, dv (and dv's bf16 rounding) of attention_backward_dkdv_f32
//   attention_backward_dq_bf16_dDP    dq of attention_backward_dq_f32
// (the backward's delta comes from attention_backward_dot_f32). What they compute, the
// layouts, masks, statistics and launch shapes: cuda/attention.cu. Here: q, k, v and dout
// stay f32 in memory and are rounded to bf16 when a tile is staged in shared memory; the
// probabilities and score gradients are rounded to bf16 before they multiply (the forward
// rounds the running exp(s - m_running), normalising the output at the end; the backward
// rounds exp(s - m) / l); softmax, statistics and every elementwise step stay f32.
//
// Fragments are only touched through load/store/fill/mma (the element layout of a fragment
// is unspecified): scores go from accumulators to a warp's shared scratch, where lanes read
// them with a known layout; output rows accumulate in registers (forward) or stay in
// accumulator fragments (dk, dv, dq need no per-row rescaling) and leave through the same
// scratch, so rows past the sequence and columns past head_dim are never written.
//
// Tested by tests/cuda_attention.rs against the CPU twin's bf16 mode (same roundings of the
// operands, BLAS order) with tolerances derived from bf16 rounding; the emulator's WMMA
// (cuda/emu/include/mma.h) by cuda/emu/tests/selftest.cpp. Benchmarked by
// benches/cuda_kernels.rs.
#include <mma.h>

#include "attention.cuh"

static_assert(SG_ATT_BF16_FWD_ROWS == 64 && SG_ATT_BF16_TILE == 32 && SG_ATT_DMAX == 128,
              "the bf16 kernels' warp mapping: 4 warps x 16 rows (forward), 2 warps x 16 (backward), tiles of 32");

// ---- bf16 on tensor cores -------------------------------------------------------------------

namespace wmma = nvcuda::wmma;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> AttFragA;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> AttFragBRow;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> AttFragBCol;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> AttAcc;

// Stages `rows` rows from r0 of a q- or kv-shaped tensor (head `head`) as bf16, rows x DP,
// zero past the sequence and past column D. Called by all `threads` threads of the block.
template <bool KV, int DP>
static __device__ __forceinline__ void att_stage_bf16(__nv_bfloat16* dst, const float* __restrict__ src,
                                                      const AttShape& s, u32 b, u32 r0, u32 head, u32 rows,
                                                      u32 threads) {
    for (u32 e = threadIdx.x; e < rows * DP; e += threads) {
        const u32 r = e / DP, c = e % DP;
        const bool in = r0 + r < s.T && c < s.D;
        dst[e] = __float2bfloat16_rn(in ? src[KV ? s.kvi(b, r0 + r, head, c) : s.qi(b, r0 + r, head, c)] : 0.0f);
    }
}

// acc = A B^T for a 16 x DP row block A (fragments `a`) and the 16 x DP rows at `bt` of a
// staged tile (ldm DP), read as the column-major 16 x 16 blocks of B^T.
template <int NC>
static __device__ __forceinline__ void att_mm_nt(AttAcc& acc, const AttFragA* a, const __nv_bfloat16* bt) {
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int n = 0; n < NC; ++n) {
        AttFragBCol f;
        wmma::load_matrix_sync(f, bt + 16 * n, NC * 16);
        wmma::mma_sync(acc, a[n], f, acc);
    }
}

template <int NC>
static __device__ __forceinline__ void attention_forward_bf16(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, float* __restrict__ out,
    float* __restrict__ stats, const u32* __restrict__ lengths, u32 batch, u32 seq, u32 heads, u32 kv_heads,
    u32 head_dim, float scale, u32 causal, __nv_bfloat16* qs, __nv_bfloat16* ks, __nv_bfloat16* vs, float* ss,
    __nv_bfloat16* pss) {
    constexpr int DP = NC * 16;
    const AttShape s(batch, seq, heads, kv_heads, head_dim);
    const AttGrid at((s.T + 63) / 64, s.H);
    const u32 h = at.head, b = at.b, g = h / s.G, q0 = at.tile * 64;
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const u32 n_b = s.real(lengths, b, causal);
    att_stage_bf16<false, DP>(qs, q, s, b, q0, h, 64, 128);
    // Lane (r, half): row r of the warp's 16, key columns half*16.. of a tile in the softmax,
    // output columns half*8.. of each 16-column chunk.
    const u32 r = lane >> 1, half = lane & 1, w0 = q0 + warp * 16, i = w0 + r;
    const u32 lim = s.lim(i, causal, n_b);
    float* sw = ss + warp * 16 * 32;
    __nv_bfloat16* pw = pss + warp * 16 * 32;
    float m = att_neg_inf(), l = 0.0f, o[NC][8];
#pragma unroll
    for (int n = 0; n < NC; ++n)
#pragma unroll
        for (int t = 0; t < 8; ++t) o[n][t] = 0.0f;
    __syncthreads();
    AttFragA aq[NC];
#pragma unroll
    for (int n = 0; n < NC; ++n) wmma::load_matrix_sync(aq[n], qs + warp * 16 * DP + 16 * n, DP);
    const u32 kend = causal ? att_min(q0 + 64, s.T) : n_b;
    for (u32 k0 = 0; k0 < kend; k0 += 32) {
        __syncthreads();
        att_stage_bf16<true, DP>(ks, k, s, b, k0, g, 32, 128);
        att_stage_bf16<true, DP>(vs, v, s, b, k0, g, 32, 128);
        __syncthreads();
        // Warp-uniform: rows all past the sequence, or (causal) all before the tile.
        if (w0 >= s.T || (causal && k0 > w0 + 15)) continue;
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
            AttAcc acc;
            att_mm_nt<NC>(acc, aq, ks + kk * 16 * DP);
            wmma::store_matrix_sync(sw + 16 * kk, acc, 32, wmma::mem_row_major);
        }
        __syncwarp();
        float x[16], mt = att_neg_inf();
#pragma unroll
        for (int jj = 0; jj < 16; ++jj) {
            const u32 j = half * 16 + jj;
            x[jj] = k0 + j < lim ? sw[r * 32 + j] * scale : att_neg_inf();
            mt = fmaxf(mt, x[jj]);
        }
        mt = fmaxf(mt, __shfl_xor_sync(ATT_FULL, mt, 1));
        const float mn = fmaxf(m, mt), base = mn == att_neg_inf() ? 0.0f : mn;
        const float alpha = expf(m - base);
        float ls = 0.0f;
#pragma unroll
        for (int jj = 0; jj < 16; ++jj) {
            const float p = expf(x[jj] - base);
            ls += p;
            pw[r * 32 + half * 16 + jj] = __float2bfloat16_rn(p);
        }
        l = l * alpha + ls;
        m = mn;
        __syncwarp();
        AttFragA ap[2];
        wmma::load_matrix_sync(ap[0], pw, 32);
        wmma::load_matrix_sync(ap[1], pw + 16, 32);
#pragma unroll
        for (int n = 0; n < NC; n += 2) {
#pragma unroll
            for (int nn = 0; nn < 2; ++nn) {
                AttAcc acc;
                wmma::fill_fragment(acc, 0.0f);
#pragma unroll
                for (int kk = 0; kk < 2; ++kk) {
                    AttFragBRow f;
                    wmma::load_matrix_sync(f, vs + kk * 16 * DP + 16 * (n + nn), DP);
                    wmma::mma_sync(acc, ap[kk], f, acc);
                }
                wmma::store_matrix_sync(sw + 16 * nn, acc, 32, wmma::mem_row_major);
            }
            __syncwarp();
#pragma unroll
            for (int nn = 0; nn < 2; ++nn)
#pragma unroll
                for (int t = 0; t < 8; ++t) o[n + nn][t] = o[n + nn][t] * alpha + sw[r * 32 + 16 * nn + half * 8 + t];
            __syncwarp();
        }
    }
    const float lt = l + __shfl_xor_sync(ATT_FULL, l, 1);
    if (i >= s.T) return;
#pragma unroll
    for (int n = 0; n < NC; ++n)
#pragma unroll
        for (int t = 0; t < 8; ++t) {
            const u32 c = 16 * n + half * 8 + t;
            if (c < s.D) out[s.qi(b, i, h, c)] = lt > 0.0f ? o[n][t] / lt : 0.0f;
        }
    if (half == 0) {
        stats[s.row(b, h, i)] = m;
        stats[s.rows + s.row(b, h, i)] = lt;
    }
}

// Row statistics of a tile's queries for the bf16 backward: m, l, delta and lim per query.
struct AttRowStats {
    float m, l, d;
    u32 lim;
    __device__ void load(const AttShape& s, const float* __restrict__ stats, const float* __restrict__ delta, u32 b,
                         u32 h, u32 i, u32 causal, u32 n_b) {
        const bool in = i < s.T;
        m = in ? stats[s.row(b, h, i)] : 0.0f;
        l = in ? stats[s.rows + s.row(b, h, i)] : 1.0f;
        d = in ? delta[s.row(b, h, i)] : 0.0f;
        lim = s.lim(i, causal, n_b);
    }
    // p (0 off the live keys) and ds = scale p (dp - delta) of key j with score sc.
    __device__ float p(u32 j, float sc, float scale) const { return j < lim ? expf(sc * scale - m) / l : 0.0f; }
};

// Writes a warp's 16 x DP f32 accumulators (fragments `acc`, a 16-row block at row r0 of
// head `head`) to a q- or kv-shaped tensor through the warp's 16 x 32 scratch `sw`:
// rows past the sequence and columns past D are not written.
template <bool KV, int NC>
static __device__ __forceinline__ void att_write_rows(float* __restrict__ dst, __nv_bfloat16* __restrict__ dst_half,
                                                      const AttAcc* acc, float* sw, const AttShape& s, u32 b, u32 r0,
                                                      u32 head) {
    const u32 lane = threadIdx.x & 31, r = lane >> 1, half = lane & 1;
#pragma unroll
    for (int n = 0; n < NC; n += 2) {
        wmma::store_matrix_sync(sw, acc[n], 32, wmma::mem_row_major);
        wmma::store_matrix_sync(sw + 16, acc[n + 1], 32, wmma::mem_row_major);
        __syncwarp();
        if (r0 + r < s.T) {
#pragma unroll
            for (int t = 0; t < 16; ++t) {
                const u32 cc = half * 16 + t, c = 16 * n + cc;
                if (c >= s.D) continue;
                const u64 i = KV ? s.kvi(b, r0 + r, head, c) : s.qi(b, r0 + r, head, c);
                dst[i] = sw[r * 32 + cc];
                if (dst_half != nullptr) dst_half[i] = __float2bfloat16_rn(sw[r * 32 + cc]);
            }
        }
        __syncwarp();
    }
}

template <int NC>
static __device__ __forceinline__ void attention_backward_dkdv_bf16(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    const float* __restrict__ stats, const float* __restrict__ delta, const float* __restrict__ dout,
    float* __restrict__ dk, float* __restrict__ dv, __nv_bfloat16* __restrict__ dv_half, const u32* __restrict__ lengths,
    u32 batch, u32 seq, u32 heads, u32 kv_heads, u32 head_dim, float scale, u32 causal, __nv_bfloat16* ks,
    __nv_bfloat16* vs, __nv_bfloat16* qs,
    __nv_bfloat16* dos, float* sts, float* dps, __nv_bfloat16* pts, __nv_bfloat16* dsts, AttRowStats* rs) {
    constexpr int DP = NC * 16;
    const AttShape s(batch, seq, heads, kv_heads, head_dim);
    const u32 n_t = (s.T + 31) / 32;
    const AttGrid at(n_t, s.KVH);
    const u32 g = at.head, b = at.b, k0 = at.tile * 32;
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, kw = k0 + warp * 16;
    const u32 n_b = s.real(lengths, b, causal);
    att_stage_bf16<true, DP>(ks, k, s, b, k0, g, 32, 64);
    att_stage_bf16<true, DP>(vs, v, s, b, k0, g, 32, 64);
    // This warp's 16 keys: S^T = K Q^T and dP^T = V dO^T tiles (16 keys x 32 queries) go
    // through the warp's scratch; P^T and dS^T come back as bf16 matrix_a tiles.
    float *st = sts + warp * 16 * 32, *dpt = dps + warp * 16 * 32;
    __nv_bfloat16 *pt = pts + warp * 16 * 32, *dst = dsts + warp * 16 * 32;
    AttAcc adk[NC], adv[NC];
#pragma unroll
    for (int n = 0; n < NC; ++n) {
        wmma::fill_fragment(adk[n], 0.0f);
        wmma::fill_fragment(adv[n], 0.0f);
    }
    const bool any = causal || k0 < n_b;  // keys at or past n_b: p = 0, dk = dv = 0
    for (u32 hh = 0; any && hh < s.G; ++hh) {
        const u32 h = g * s.G + hh;
        for (u32 qt = causal ? at.tile : 0; qt < n_t; ++qt) {
            const u32 q0 = qt * 32;
            __syncthreads();  // the previous step's reads are done (and K, V are staged)
            att_stage_bf16<false, DP>(qs, q, s, b, q0, h, 32, 64);
            att_stage_bf16<false, DP>(dos, dout, s, b, q0, h, 32, 64);
            if (tid < 32) rs[tid].load(s, stats, delta, b, h, q0 + tid, causal, n_b);
            __syncthreads();
            // Warp-uniform: keys past the sequence.
            if (kw >= s.T) continue;
            AttFragA a[NC];
#pragma unroll
            for (int n = 0; n < NC; ++n) wmma::load_matrix_sync(a[n], ks + warp * 16 * DP + 16 * n, DP);
#pragma unroll
            for (int qq = 0; qq < 2; ++qq) {
                AttAcc acc;
                att_mm_nt<NC>(acc, a, qs + qq * 16 * DP);
                wmma::store_matrix_sync(st + 16 * qq, acc, 32, wmma::mem_row_major);
            }
#pragma unroll
            for (int n = 0; n < NC; ++n) wmma::load_matrix_sync(a[n], vs + warp * 16 * DP + 16 * n, DP);
#pragma unroll
            for (int qq = 0; qq < 2; ++qq) {
                AttAcc acc;
                att_mm_nt<NC>(acc, a, dos + qq * 16 * DP);
                wmma::store_matrix_sync(dpt + 16 * qq, acc, 32, wmma::mem_row_major);
            }
            __syncwarp();
            // Lane = query column of the tile, over the warp's 16 keys.
            const AttRowStats st_i = rs[lane];
#pragma unroll 4
            for (int jj = 0; jj < 16; ++jj) {
                const float p = st_i.p(kw + jj, st[jj * 32 + lane], scale);
                pt[jj * 32 + lane] = __float2bfloat16_rn(p);
                dst[jj * 32 + lane] = __float2bfloat16_rn(scale * p * (dpt[jj * 32 + lane] - st_i.d));
            }
            __syncwarp();
#pragma unroll
            for (int qq = 0; qq < 2; ++qq) {
                AttFragA ap, ads;
                wmma::load_matrix_sync(ap, pt + 16 * qq, 32);
                wmma::load_matrix_sync(ads, dst + 16 * qq, 32);
#pragma unroll
                for (int n = 0; n < NC; ++n) {
                    AttFragBRow f;
                    wmma::load_matrix_sync(f, dos + qq * 16 * DP + 16 * n, DP);
                    wmma::mma_sync(adv[n], ap, f, adv[n]);
                    wmma::load_matrix_sync(f, qs + qq * 16 * DP + 16 * n, DP);
                    wmma::mma_sync(adk[n], ads, f, adk[n]);
                }
            }
        }
    }
    att_write_rows<true, NC>(dk, nullptr, adk, st, s, b, kw, g);
    att_write_rows<true, NC>(dv, dv_half, adv, st, s, b, kw, g);
}

template <int NC>
static __device__ __forceinline__ void attention_backward_dq_bf16(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    const float* __restrict__ stats, const float* __restrict__ delta, const float* __restrict__ dout,
    float* __restrict__ dq, const u32* __restrict__ lengths, u32 batch, u32 seq, u32 heads, u32 kv_heads,
    u32 head_dim, float scale, u32 causal, __nv_bfloat16* qs, __nv_bfloat16* dos, __nv_bfloat16* ks,
    __nv_bfloat16* vs, float* ss, float* dps, __nv_bfloat16* dss) {
    constexpr int DP = NC * 16;
    const AttShape s(batch, seq, heads, kv_heads, head_dim);
    const AttGrid at((s.T + 31) / 32, s.H);
    const u32 h = at.head, b = at.b, g = h / s.G, q0 = at.tile * 32;
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, w0 = q0 + warp * 16;
    const u32 r = lane >> 1, half = lane & 1;
    const u32 n_b = s.real(lengths, b, causal);
    att_stage_bf16<false, DP>(qs, q, s, b, q0, h, 32, 64);
    att_stage_bf16<false, DP>(dos, dout, s, b, q0, h, 32, 64);
    AttRowStats st;
    st.load(s, stats, delta, b, h, w0 + r, causal, n_b);
    float* sw = ss + warp * 16 * 32;
    float* dpw = dps + warp * 16 * 32;
    __nv_bfloat16* dsw = dss + warp * 16 * 32;
    __syncthreads();
    AttFragA aq[NC], ado[NC];
    AttAcc adq[NC];
#pragma unroll
    for (int n = 0; n < NC; ++n) {
        wmma::load_matrix_sync(aq[n], qs + warp * 16 * DP + 16 * n, DP);
        wmma::load_matrix_sync(ado[n], dos + warp * 16 * DP + 16 * n, DP);
        wmma::fill_fragment(adq[n], 0.0f);
    }
    const u32 kend = causal ? att_min(q0 + 32, s.T) : n_b;
    for (u32 k0 = 0; k0 < kend; k0 += 32) {
        __syncthreads();
        att_stage_bf16<true, DP>(ks, k, s, b, k0, g, 32, 64);
        att_stage_bf16<true, DP>(vs, v, s, b, k0, g, 32, 64);
        __syncthreads();
        if (w0 >= s.T || (causal && k0 > w0 + 15)) continue;  // warp-uniform, as in the forward
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
            AttAcc acc;
            att_mm_nt<NC>(acc, aq, ks + kk * 16 * DP);
            wmma::store_matrix_sync(sw + 16 * kk, acc, 32, wmma::mem_row_major);
            att_mm_nt<NC>(acc, ado, vs + kk * 16 * DP);
            wmma::store_matrix_sync(dpw + 16 * kk, acc, 32, wmma::mem_row_major);
        }
        __syncwarp();
#pragma unroll 4
        for (int jj = 0; jj < 16; ++jj) {
            const u32 j = half * 16 + jj;
            const float p = st.p(k0 + j, sw[r * 32 + j], scale);
            dsw[r * 32 + j] = __float2bfloat16_rn(scale * p * (dpw[r * 32 + j] - st.d));
        }
        __syncwarp();
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
            AttFragA ads;
            wmma::load_matrix_sync(ads, dsw + 16 * kk, 32);
#pragma unroll
            for (int n = 0; n < NC; ++n) {
                AttFragBRow f;
                wmma::load_matrix_sync(f, ks + kk * 16 * DP + 16 * n, DP);
                wmma::mma_sync(adq[n], ads, f, adq[n]);
            }
        }
    }
    att_write_rows<false, NC>(dq, nullptr, adq, sw, s, b, w0, h);
}

// The bf16 kernels, one per padded head dim DP, with their static shared memory.
#define SG_ATT_BF16_KERNELS(DP)                                                                                     \
    extern "C" __global__ void __launch_bounds__(128) attention_forward_bf16_d##DP(                                 \
        const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,                      \
        float* __restrict__ out, float* __restrict__ stats, const u32* __restrict__ lengths, u32 batch, u32 seq,   \
        u32 heads, u32 kv_heads, u32 head_dim, float scale, u32 causal) {                                           \
        __shared__ __align__(32) __nv_bfloat16 qs[64 * DP], ks[32 * DP], vs[32 * DP], ps[4 * 16 * 32];             \
        __shared__ __align__(32) float ss[4 * 16 * 32];                                                              \
        attention_forward_bf16<DP / 16>(q, k, v, out, stats, lengths, batch, seq, heads, kv_heads, head_dim, scale, \
                                        causal, qs, ks, vs, ss, ps);                                                \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(64) attention_backward_dkdv_bf16_d##DP(                            \
        const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,                      \
        const float* __restrict__ stats, const float* __restrict__ delta, const float* __restrict__ dout,           \
        float* __restrict__ dk, float* __restrict__ dv, __nv_bfloat16* __restrict__ dv_half,                        \
        const u32* __restrict__ lengths, u32 batch, u32 seq, u32 heads, u32 kv_heads, u32 head_dim, float scale,    \
        u32 causal) {                                                                                               \
        __shared__ __align__(32) __nv_bfloat16 ks[32 * DP], vs[32 * DP], qs[32 * DP], dos[32 * DP];                 \
        __shared__ __align__(32) __nv_bfloat16 pts[2 * 16 * 32], dsts[2 * 16 * 32];                                 \
        __shared__ __align__(32) float sts[2 * 16 * 32], dps[2 * 16 * 32];                                          \
        __shared__ AttRowStats rs[32];                                                                              \
        attention_backward_dkdv_bf16<DP / 16>(q, k, v, stats, delta, dout, dk, dv, dv_half, lengths, batch, seq,    \
                                              heads, kv_heads, head_dim, scale, causal, ks, vs, qs, dos, sts, dps,  \
                                              pts, dsts, rs);                                                       \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(64) attention_backward_dq_bf16_d##DP(                              \
        const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,                      \
        const float* __restrict__ stats, const float* __restrict__ delta, const float* __restrict__ dout,           \
        float* __restrict__ dq, const u32* __restrict__ lengths, u32 batch, u32 seq, u32 heads, u32 kv_heads,      \
        u32 head_dim, float scale, u32 causal) {                                                                    \
        __shared__ __align__(32) __nv_bfloat16 qs[32 * DP], dos[32 * DP], ks[32 * DP], vs[32 * DP];                 \
        __shared__ __align__(32) __nv_bfloat16 dss[2 * 16 * 32];                                                    \
        __shared__ __align__(32) float ss[2 * 16 * 32], dps[2 * 16 * 32];                                           \
        attention_backward_dq_bf16<DP / 16>(q, k, v, stats, delta, dout, dq, lengths, batch, seq, heads, kv_heads,  \
                                            head_dim, scale, causal, qs, dos, ks, vs, ss, dps, dss);                \
    }

SG_ATT_BF16_KERNELS(32)
SG_ATT_BF16_KERNELS(64)
SG_ATT_BF16_KERNELS(96)
SG_ATT_BF16_KERNELS(128)
