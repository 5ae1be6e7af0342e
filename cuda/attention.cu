// attention.cu: fused grouped-query attention, forward and backward, flash-attention style:
// the scores of one tile of queries and one tile of keys are made, used and dropped in
// shared memory; nothing of size (batch, heads, seq, seq) is ever written.
//
// This file holds the f32 kernels and the backward's delta pre-pass; the bf16 tensor-core
// kernels (_bf16_dDP) are in attention_wmma.cu, what both share in attention.cuh.
//
// Computes (the op contract and its CPU twin: src/backend/ops/attention.rs and
// src/backend/cpu/attention.rs; launchers in src/backend/cuda/attention.rs). Layouts as the
// projections produce them: q, out, dout, dq (batch*seq, heads*D), k, v, dk, dv
// (batch*seq, kv_heads*D), row-major; query head h reads KV head h / (heads / kv_heads).
// s_ij = scale q_i . k_j; query i of sequence b sees the keys j < lim_i: lim_i = i + 1
// (causal) or n_b = min(lengths[b], seq) (padding mask, every query row, padding rows
// included, as softmax_masked). m_i = max s_ij, l_i = sum exp(s_ij - m_i) over those keys,
// p_ij = exp(s_ij - m_i) / l_i; a row with lim_i = 0 gets m = -inf, l = 0, out = 0.
//   attention_forward_f32 / _bf16_dDP      out_i = sum_j p_ij v_j by an online softmax over
//                                          key tiles (running max, rescaled running sum and
//                                          output); writes stats[r] = m, stats[R + r] = l for
//                                          row r = (b heads + h) seq + i, R = batch heads seq
//   attention_backward_dot_f32             delta[r] = sum_d dout[i, h, d] out[i, h, d]
//   attention_backward_dkdv_f32 / _bf16    per (sequence, KV head, key tile), looping over the
//                                          group's query heads and the query tiles: p from
//                                          the saved m, l; dp_ij = dout_i . v_j,
//                                          ds_ij = scale p_ij (dp_ij - delta_i);
//                                          dv_j = sum_i p_ij dout_i, dk_j = sum_i ds_ij q_i. The
//                                          heads of a group accumulate in the block's own
//                                          registers: no atomics, deterministic. With dv_half
//                                          (else null), dv is also written rounded to bf16
//                                          (nearest even): the V projection's backward operand
//   attention_backward_dq_f32 / _bf16      per query tile, looping over key tiles:
//                                          dq_i = sum_j ds_ij k_j
// A forward is 1 launch and a backward 3, whatever the batch and the heads.
//
// Two precisions. f32: plain FP32 (SIMT) arithmetic, any head_dim <= 128. bf16 (tensor
// cores through nvcuda::wmma, 16x16x16 bf16 fragments, f32 accumulators, sm_80+): q, k, v
// and dout stay f32 in memory and are rounded to bf16 when a tile is staged in shared
// memory (padded with zeros to D_P, the head dim rounded up to 32, 64, 96 or 128: the _dDP
// in the names), the probabilities and score gradients are rounded to bf16 before they
// multiply; softmax, statistics and every elementwise step stay f32. The forward's p is the
// running exp(s - m_running) (normalised at the end), the backward's the final
// exp(s - m) / l, as in FlashAttention-2.
//
// Launch shapes. f32: blocks of 128 threads (4 warps). Forward: 16 queries per block (4 rows
// per warp), key tiles of 32 (lane = key for the scores, lane = output column for P V);
// dkdv: 16 keys per block, query tiles of 16; dq: 16 queries per block, key tiles of 16; the
// (query, key) entries of a tile are spread 2 per thread. Rows of K, V, Q, dO are padded to
// 129 floats in shared memory so lanes reading different rows hit different banks.
// bf16: forward 4 warps x 16 queries per block, key tiles of 32; dkdv 2 warps x 16 keys per
// block, query tiles of 32; dq 2 warps x 16 queries, key tiles of 32. Each warp keeps its
// accumulators (the output rows in registers with a known lane layout, or dk, dv, dq as
// accumulator fragments); scores go through per-warp shared scratch (store_matrix_sync),
// where the softmax reads them with a known layout. grid.x = tiles * heads (or kv_heads) *
// batch, the tile index fastest. Causal launches skip key tiles after a block's last query
// (and a warp skips tiles that end before its first row's key range starts); padding
// launches skip keys >= n_b. Static shared memory stays under 48 KiB in every kernel.
//
// Rounding. expf is CUDA's accurate one; dot products may be contracted into FMAs. Against
// the CPU twin (which computes the unfused products with BLAS) the f32 path differs by the
// summation order only (~1e-6 relative); the bf16 path by bf16 rounding of the products'
// operands (~2^-8 relative): tests/cuda_attention.rs states both tolerances.
//
// Tested by tests/cuda_attention.rs (both precisions against the CPU twin, which
// tests/cpu_attention.rs checks against an f64 reference: ragged T = 1, 17, 128, 300, head
// dims 64 and 128, GQA groups 1 and 4, lengths 0, 1, T-1, T, outputs poisoned first);
// the emulator's WMMA by cuda/emu/tests/selftest.cpp. Benchmarked by benches/cuda_kernels.rs
// (attention forward + backward, f32 and bf16).
#include "attention.cuh"

static_assert(SG_ATT_F32_ROWS == 16 && SG_ATT_F32_FWD_KEYS == 32 && SG_ATT_DMAX == 128,
              "the f32 kernels' thread mapping: 4 warps x 4 rows of 16, a lane per key of 32, 4 columns per lane");

// ---- f32 ------------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(128)
    attention_forward_f32(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                          float* __restrict__ out, float* __restrict__ stats, const u32* __restrict__ lengths,
                          u32 batch, u32 seq, u32 heads, u32 kv_heads, u32 head_dim, float scale, u32 causal) {
    __shared__ float qs[SG_ATT_F32_ROWS][SG_ATT_DMAX];
    __shared__ float ks[SG_ATT_F32_FWD_KEYS][ATT_PAD];
    __shared__ float vs[SG_ATT_F32_FWD_KEYS][SG_ATT_DMAX];
    __shared__ float ps[4][4][SG_ATT_F32_FWD_KEYS];
    const AttShape s(batch, seq, heads, kv_heads, head_dim);
    const AttGrid at((s.T + 15) / 16, s.H);
    const u32 h = at.head, b = at.b, g = h / s.G, q0 = at.tile * 16, D = s.D;
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const u32 n_b = s.real(lengths, b, causal);
    for (u32 e = tid; e < 16 * D; e += 128) {
        const u32 r = e / D, c = e % D;
        qs[r][c] = q0 + r < s.T ? q[s.qi(b, q0 + r, h, c)] : 0.0f;
    }
    u32 lim[4];
    float m[4], l[4], o[4][4];
#pragma unroll
    for (int rr = 0; rr < 4; ++rr) {
        lim[rr] = s.lim(q0 + warp * 4 + rr, causal, n_b);
        m[rr] = att_neg_inf();
        l[rr] = 0.0f;
#pragma unroll
        for (int u = 0; u < 4; ++u) o[rr][u] = 0.0f;
    }
    const u32 kend = causal ? att_min(q0 + 16, s.T) : n_b;
    for (u32 k0 = 0; k0 < kend; k0 += 32) {
        __syncthreads();  // the previous tile's reads are done (and Q is staged)
        const u32 nk = att_min(32, kend - k0);
        for (u32 e = tid; e < 32 * D; e += 128) {
            const u32 j = e / D, c = e % D;
            ks[j][c] = j < nk ? k[s.kvi(b, k0 + j, g, c)] : 0.0f;
            vs[j][c] = j < nk ? v[s.kvi(b, k0 + j, g, c)] : 0.0f;
        }
        __syncthreads();
        float sc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (u32 c = 0; c < D; ++c) {
            const float kc = ks[lane][c];
#pragma unroll
            for (int rr = 0; rr < 4; ++rr) sc[rr] += qs[warp * 4 + rr][c] * kc;
        }
        float alpha[4];
#pragma unroll
        for (int rr = 0; rr < 4; ++rr) {
            const float x = k0 + lane < lim[rr] ? sc[rr] * scale : att_neg_inf();
            const float mn = fmaxf(m[rr], att_warp_max(x));
            const float base = mn == att_neg_inf() ? 0.0f : mn;
            const float p = expf(x - base);
            alpha[rr] = expf(m[rr] - base);
            l[rr] = l[rr] * alpha[rr] + p;
            m[rr] = mn;
            ps[warp][rr][lane] = p;
        }
        __syncwarp();
#pragma unroll
        for (int rr = 0; rr < 4; ++rr)
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const u32 c = lane + 32 * u;
                if (c >= D) continue;
                float acc = 0.0f;
                for (u32 j = 0; j < nk; ++j) acc += ps[warp][rr][j] * vs[j][c];
                o[rr][u] = o[rr][u] * alpha[rr] + acc;
            }
    }
#pragma unroll
    for (int rr = 0; rr < 4; ++rr) {
        const float lt = sg_warp_sum(l[rr]);
        const u32 i = q0 + warp * 4 + rr;
        if (i >= s.T) continue;
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const u32 c = lane + 32 * u;
            if (c < D) out[s.qi(b, i, h, c)] = lt > 0.0f ? o[rr][u] / lt : 0.0f;
        }
        if (lane == 0) {
            stats[s.row(b, h, i)] = m[rr];
            stats[s.rows + s.row(b, h, i)] = lt;
        }
    }
}

// delta[r] = dout_r . out_r, one warp per row r = (b heads + h) seq + i.
extern "C" __global__ void __launch_bounds__(256)
    attention_backward_dot_f32(const float* __restrict__ out, const float* __restrict__ dout,
                               float* __restrict__ delta, u32 batch, u32 seq, u32 heads, u32 head_dim) {
    const u64 rows = (u64)batch * heads * seq, q_dim = (u64)heads * head_dim;
    const u32 lane = threadIdx.x & 31;
    for (u64 r = ((u64)blockIdx.x * blockDim.x + threadIdx.x) / 32; r < rows; r += (u64)gridDim.x * blockDim.x / 32) {
        const u64 i = r % seq, bh = r / seq, h = bh % heads, b = bh / heads;
        const u64 base = (b * seq + i) * q_dim + h * head_dim;
        float acc = 0.0f;
        for (u32 c = lane; c < head_dim; c += 32) acc += dout[base + c] * out[base + c];
        acc = sg_warp_sum(acc);
        if (lane == 0) delta[r] = acc;
    }
}

// Stages rows r0 .. r0 + 15 of a q- or kv-shaped tensor (head `head`) as 16 x D floats with
// row stride ATT_PAD; rows past the sequence become 0. Called by all 128 threads.
template <bool KV>
static __device__ __forceinline__ void att_stage16(float (*dst)[ATT_PAD], const float* __restrict__ src,
                                                   const AttShape& s, u32 b, u32 r0, u32 head) {
    for (u32 e = threadIdx.x; e < 16 * s.D; e += 128) {
        const u32 r = e / s.D, c = e % s.D;
        dst[r][c] = r0 + r < s.T ? src[KV ? s.kvi(b, r0 + r, head, c) : s.qi(b, r0 + r, head, c)] : 0.0f;
    }
}

// Dot product of two staged rows.
static __device__ __forceinline__ float att_dot(const float* a, const float* b, u32 D) {
    float acc = 0.0f;
    for (u32 c = 0; c < D; ++c) acc += a[c] * b[c];
    return acc;
}

extern "C" __global__ void __launch_bounds__(128)
    attention_backward_dkdv_f32(const float* __restrict__ q, const float* __restrict__ k,
                                const float* __restrict__ v, const float* __restrict__ stats,
                                const float* __restrict__ delta, const float* __restrict__ dout,
                                float* __restrict__ dk, float* __restrict__ dv, __nv_bfloat16* __restrict__ dv_half,
                                const u32* __restrict__ lengths, u32 batch, u32 seq, u32 heads, u32 kv_heads,
                                u32 head_dim, float scale, u32 causal) {
    __shared__ float ks[16][ATT_PAD], vs[16][ATT_PAD], qs[16][ATT_PAD], dos[16][ATT_PAD];
    __shared__ float ps[16][17], dss[16][17];  // [key][query]
    __shared__ float sm[16], sl[16], sd[16];
    __shared__ u32 slim[16];
    const AttShape s(batch, seq, heads, kv_heads, head_dim);
    const u32 n_t = (s.T + 15) / 16;
    const AttGrid at(n_t, s.KVH);
    const u32 g = at.head, b = at.b, k0 = at.tile * 16, D = s.D;
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const u32 n_b = s.real(lengths, b, causal);
    att_stage16<true>(ks, k, s, b, k0, g);
    att_stage16<true>(vs, v, s, b, k0, g);
    float ak[4][4], av[4][4];
#pragma unroll
    for (int jj = 0; jj < 4; ++jj)
#pragma unroll
        for (int u = 0; u < 4; ++u) ak[jj][u] = av[jj][u] = 0.0f;
    // Keys at or past n_b are padding: every p of theirs is 0, so are dk and dv.
    const bool any = causal || k0 < n_b;
    const u32 ej = tid >> 3;  // this thread's key in the (key, query) entries
    for (u32 hh = 0; any && hh < s.G; ++hh) {
        const u32 h = g * s.G + hh;
        for (u32 qt = causal ? at.tile : 0; qt < n_t; ++qt) {
            const u32 q0 = qt * 16;
            __syncthreads();  // the previous step's reads are done (and K, V are staged)
            att_stage16<false>(qs, q, s, b, q0, h);
            att_stage16<false>(dos, dout, s, b, q0, h);
            if (tid < 16) {
                const u32 i = q0 + tid;
                const bool in = i < s.T;
                sm[tid] = in ? stats[s.row(b, h, i)] : 0.0f;
                sl[tid] = in ? stats[s.rows + s.row(b, h, i)] : 1.0f;
                sd[tid] = in ? delta[s.row(b, h, i)] : 0.0f;
                slim[tid] = s.lim(i, causal, n_b);
            }
            __syncthreads();
#pragma unroll
            for (u32 e = 0; e < 2; ++e) {
                const u32 i = (tid & 7) + 8 * e;
                const float sc = att_dot(qs[i], ks[ej], D), dp = att_dot(dos[i], vs[ej], D);
                const float p = k0 + ej < slim[i] ? expf(sc * scale - sm[i]) / sl[i] : 0.0f;
                ps[ej][i] = p;
                dss[ej][i] = scale * p * (dp - sd[i]);
            }
            __syncthreads();
#pragma unroll
            for (int jj = 0; jj < 4; ++jj) {
                const u32 j = warp * 4 + jj;
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    const u32 c = lane + 32 * u;
                    if (c >= D) continue;
                    for (u32 i = 0; i < 16; ++i) {
                        av[jj][u] += ps[j][i] * dos[i][c];
                        ak[jj][u] += dss[j][i] * qs[i][c];
                    }
                }
            }
        }
    }
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
        const u32 j = k0 + warp * 4 + jj;
        if (j >= s.T) continue;
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const u32 c = lane + 32 * u;
            if (c >= D) continue;
            dk[s.kvi(b, j, g, c)] = ak[jj][u];
            dv[s.kvi(b, j, g, c)] = av[jj][u];
            if (dv_half != nullptr) dv_half[s.kvi(b, j, g, c)] = __float2bfloat16_rn(av[jj][u]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(128)
    attention_backward_dq_f32(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                              const float* __restrict__ stats, const float* __restrict__ delta,
                              const float* __restrict__ dout, float* __restrict__ dq, const u32* __restrict__ lengths,
                              u32 batch, u32 seq, u32 heads, u32 kv_heads, u32 head_dim, float scale, u32 causal) {
    __shared__ float qs[16][ATT_PAD], dos[16][ATT_PAD], ks[16][ATT_PAD], vs[16][ATT_PAD];
    __shared__ float dss[16][17];  // [query][key]
    const AttShape s(batch, seq, heads, kv_heads, head_dim);
    const AttGrid at((s.T + 15) / 16, s.H);
    const u32 h = at.head, b = at.b, g = h / s.G, q0 = at.tile * 16, D = s.D;
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const u32 n_b = s.real(lengths, b, causal);
    att_stage16<false>(qs, q, s, b, q0, h);
    att_stage16<false>(dos, dout, s, b, q0, h);
    // This thread's query in the (query, key) entries, and its statistics.
    const u32 ei = tid >> 3, i = q0 + ei;
    const bool in = i < s.T;
    const float mi = in ? stats[s.row(b, h, i)] : 0.0f, li = in ? stats[s.rows + s.row(b, h, i)] : 1.0f;
    const float di = in ? delta[s.row(b, h, i)] : 0.0f;
    const u32 limi = s.lim(i, causal, n_b);
    float aq[4][4];
#pragma unroll
    for (int ii = 0; ii < 4; ++ii)
#pragma unroll
        for (int u = 0; u < 4; ++u) aq[ii][u] = 0.0f;
    const u32 kend = causal ? att_min(q0 + 16, s.T) : n_b;
    for (u32 k0 = 0; k0 < kend; k0 += 16) {
        __syncthreads();
        att_stage16<true>(ks, k, s, b, k0, g);
        att_stage16<true>(vs, v, s, b, k0, g);
        __syncthreads();
#pragma unroll
        for (u32 e = 0; e < 2; ++e) {
            const u32 j = (tid & 7) + 8 * e;
            const float sc = att_dot(qs[ei], ks[j], D), dp = att_dot(dos[ei], vs[j], D);
            const float p = k0 + j < limi ? expf(sc * scale - mi) / li : 0.0f;
            dss[ei][j] = scale * p * (dp - di);
        }
        __syncthreads();
#pragma unroll
        for (int ii = 0; ii < 4; ++ii)
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const u32 c = lane + 32 * u;
                if (c >= D) continue;
                for (u32 j = 0; j < 16; ++j) aq[ii][u] += dss[warp * 4 + ii][j] * ks[j][c];
            }
    }
#pragma unroll
    for (int ii = 0; ii < 4; ++ii) {
        const u32 r = q0 + warp * 4 + ii;
        if (r >= s.T) continue;
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const u32 c = lane + 32 * u;
            if (c < D) dq[s.qi(b, r, h, c)] = aq[ii][u];
        }
    }
}

