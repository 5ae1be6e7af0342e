// attention.cuh: what the fused attention kernels share (cuda/attention.cu: the f32 path
// and the backward's delta pre-pass; cuda/attention_wmma.cu: the bf16 tensor-core path):
// the tile sizes the launchers read (src/backend/cuda/consts.rs), the shape and index
// arithmetic of the layouts, and the mask. See attention.cu for what the kernels compute.
#pragma once

#include "common.cuh"

// Largest head dimension of every kernel (the launchers reject larger ones).
#define SG_ATT_DMAX 128
// f32 path: queries (forward, dq) or keys (dkdv) per block; key tile of the forward.
#define SG_ATT_F32_ROWS 16
#define SG_ATT_F32_FWD_KEYS 32
// bf16 path: queries per forward block, and the tile of the backward kernels.
#define SG_ATT_BF16_FWD_ROWS 64
#define SG_ATT_BF16_TILE 32

#define ATT_PAD (SG_ATT_DMAX + 1)
#define ATT_FULL 0xffffffffu

static __device__ __forceinline__ float att_neg_inf() { return __uint_as_float(0xff800000u); }
static __device__ __forceinline__ u32 att_min(u32 a, u32 b) { return a < b ? a : b; }

static __device__ __forceinline__ float att_warp_max(float v) {
#pragma unroll
    for (u32 o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(ATT_FULL, v, o));
    return v;
}

// Which block does what: tile `tile` of head `head` (a query head, or a KV head for dkdv)
// of sequence `b`; the geometry every kernel shares.
struct AttGrid {
    u32 tile, head, b;
    __device__ AttGrid(u32 tiles, u32 heads) {
        tile = blockIdx.x % tiles;
        const u32 rest = blockIdx.x / tiles;
        head = rest % heads;
        b = rest / heads;
    }
};

struct AttShape {
    u32 T, H, KVH, D, G;
    u64 q_dim, kv_dim, rows;
    __device__ AttShape(u32 batch, u32 seq, u32 heads, u32 kv_heads, u32 head_dim)
        : T(seq), H(heads), KVH(kv_heads), D(head_dim), G(heads / kv_heads) {
        q_dim = (u64)heads * head_dim;
        kv_dim = (u64)kv_heads * head_dim;
        rows = (u64)batch * heads * seq;
    }
    // Element (token i of sequence b, head h, column c) of a q-shaped / kv-shaped tensor.
    __device__ u64 qi(u32 b, u32 i, u32 h, u32 c) const { return ((u64)b * T + i) * q_dim + (u64)h * D + c; }
    __device__ u64 kvi(u32 b, u32 j, u32 g, u32 c) const { return ((u64)b * T + j) * kv_dim + (u64)g * D + c; }
    // Statistics row of query i of head h in sequence b.
    __device__ u64 row(u32 b, u32 h, u32 i) const { return ((u64)b * H + h) * T + i; }
    // Live keys of every query of sequence b under a padding mask (causal: unused).
    __device__ u32 real(const u32* lengths, u32 b, u32 causal) const { return causal ? T : att_min(lengths[b], T); }
    // lim_i: the keys j < lim_i that query i sees (0 past the sequence).
    __device__ u32 lim(u32 i, u32 causal, u32 n_b) const { return i >= T ? 0u : (causal ? i + 1 : n_b); }
};

