// common.cuh: helpers shared by every sparsegrad kernel file.
//
// - fixed-width integer names (u32, u64) matching the Rust launchers' argument types
//   (every pointer is passed as a u64 device address, every count as u64 unless noted);
// - 64-bit grid-stride loops (sizes beyond 2^31 elements are legal everywhere);
// - warp and block scans / reductions used by the deterministic compactions;
// - the device error word: kernels that meet an out-of-range index skip it and set a bit
//   here; the host reads the word at its next synchronization point and returns an
//   `Error::InvalidArgument` naming the op (src/backend/cuda/consts.rs, `ERR_BITS`).
//
// Only device code lives here; nothing in this header launches anything.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

typedef uint32_t u32;
typedef uint64_t u64;
typedef uint16_t u16;
typedef uint8_t u8;

// Bits of the device error word. The Rust launchers read these #defines (and SG_THREADS,
// SG_TILE_ITEMS) from this file at compile time (src/backend/cuda/consts.rs): one source.
#define SG_ERR_GATHER_ROWS 1u
#define SG_ERR_GATHER_BLOCK 2u
#define SG_ERR_COO_SCATTER 4u
#define SG_ERR_COO_DENSE_T 8u
#define SG_ERR_SPARSE_ADAM 16u
#define SG_ERR_COO_COMPACT 32u
#define SG_ERR_CROSS_ENTROPY 64u
#define SG_ERR_COO_DENSIFY 128u
#define SG_ERR_COO_MM 256u
#define SG_ERR_TOPK_MAP 512u

// Words of the device health block (src/backend/cuda/mod.rs, `CudaShared::errors`): [0] the
// error bits above, [1] the id of the first failed finiteness check, [2] its count, [3] its
// first index. A kernel that finds non-finite values records them here (the first failing
// check in stream order keeps the slot); optimizer kernels do nothing while either is set, so
// a step that went bad leaves every parameter, moment and clock as it was. A kernel gated by
// sg_health_bad must not write the words it reads (its threads would see each other's
// errors mid-launch and stop at different points): it records its own errors in a word the
// gate does not read (SparseAdam: word 5, src/backend/cuda/mod.rs).
__device__ __forceinline__ void sg_health_nonfinite(u64* health, u64 id, u64 count, u64 first) {
    const u64 prev = atomicCAS((unsigned long long*)&health[1], 0ull, (unsigned long long)id);
    if (prev == 0 || prev == id) {
        atomicAdd((unsigned long long*)&health[2], (unsigned long long)count);
        atomicMin((unsigned long long*)&health[3], (unsigned long long)first);
    }
}
__device__ __forceinline__ bool sg_health_bad(const u64* health) { return health[0] != 0 || health[1] != 0; }

// Threads per block of the 1-D kernels and of the tile compactions.
#define SG_THREADS 256
// Items per thread of a compaction tile: a tile is SG_THREADS * SG_TILE_ITEMS elements.
#define SG_TILE_ITEMS 16
#define SG_TILE (SG_THREADS * SG_TILE_ITEMS)

// for (u64 i = global thread index; i < n; i += total threads)
#define SG_GRID_STRIDE(i, n)                                                         \
    for (u64 i = (u64)blockIdx.x * (u64)blockDim.x + (u64)threadIdx.x; i < (u64)(n); \
         i += (u64)gridDim.x * (u64)blockDim.x)

// True when `p` is aligned for 16-byte (float4) accesses. Buffers come from cudaMalloc
// (256-byte aligned) and the launchers pass their base addresses, so this holds in practice;
// the kernels still check and fall back to scalar accesses.
__device__ __forceinline__ bool sg_aligned(const void* p, u64 bytes) { return ((u64)p & (bytes - 1)) == 0; }

// Grid-stride loop over n elements: with `vec`, in steps of 4 (vec_body gets the index of a
// group of 4, i.e. elements 4i .. 4i+3), then scalar_body for the remaining n % 4 elements;
// without `vec`, scalar_body for all of them. Vector accesses keep 4x the bytes in flight.
template <typename V, typename S>
__device__ __forceinline__ void sg_vec4_loop(u64 n, bool vec, V vec_body, S scalar_body) {
    const u64 tid = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    u64 start = 0;
    if (vec) {
        const u64 n4 = n >> 2;
        for (u64 i = tid; i < n4; i += stride) vec_body(i);
        start = n4 << 2;
    }
    for (u64 i = start + tid; i < n; i += stride) scalar_body(i);
}

// |v| as its float bits: monotone in |v| for finite values, +inf = 0x7f800000, NaN above.
// The same key as `Real::abs_key` for f32 on the CPU.
__device__ __forceinline__ u32 sg_abs_key(float v) { return __float_as_uint(v) & 0x7fffffffu; }

// True for NaN and +-inf.
__device__ __forceinline__ bool sg_nonfinite(float v) { return sg_abs_key(v) >= 0x7f800000u; }

template <typename T>
__device__ __forceinline__ T sg_warp_inclusive_scan(T v) {
    const u32 lane = threadIdx.x & 31u;
#pragma unroll
    for (u32 o = 1; o < 32; o <<= 1) {
        T n = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += n;
    }
    return v;
}

template <typename T>
__device__ __forceinline__ T sg_warp_sum(T v) {
#pragma unroll
    for (u32 o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Exclusive scan across a 1-D block of THREADS threads (a multiple of 32, at most 1024).
// `smem` must hold THREADS / 32 + 1 values. Every thread of the block must call it (it
// contains __syncthreads). Returns this thread's exclusive prefix; `*total` gets the sum.
// Ends with a barrier, so `smem` may be reused right away.
template <typename T, int THREADS>
__device__ __forceinline__ T sg_block_exclusive_scan(T v, T* total, T* smem) {
    static_assert(THREADS % 32 == 0 && THREADS <= 1024, "block size");
    constexpr int WARPS = THREADS / 32;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    T inc = sg_warp_inclusive_scan(v);
    if (lane == 31) smem[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        T w = (lane < WARPS) ? smem[lane] : T(0);
        T winc = sg_warp_inclusive_scan(w);
        if (lane < WARPS) smem[lane] = winc - w;
        if (lane == WARPS - 1) smem[WARPS] = winc;
    }
    __syncthreads();
    T res = smem[warp] + inc - v;
    *total = smem[WARPS];
    __syncthreads();
    return res;
}

// In place over tile counts: tiles[t] = sum of tiles[0..t]; *total = sum of all. Run by one
// whole block of THREADS threads (the tiles may have been written by other blocks of the
// same launch: read past L1). `smem` holds THREADS / 32 + 1 values. Contains barriers.
template <int THREADS>
__device__ __forceinline__ void sg_block_scan_tiles(u64* tiles, u64 n_tiles, u64* total, u64* smem) {
    u64 carry = 0;
    for (u64 base = 0; base < n_tiles; base += THREADS) {
        const u64 i = base + threadIdx.x;
        const u64 v = i < n_tiles ? __ldcg(&tiles[i]) : 0;
        u64 block_total;
        const u64 ex = sg_block_exclusive_scan<u64, THREADS>(v, &block_total, smem);
        if (i < n_tiles) tiles[i] = carry + ex;
        carry += block_total;
    }
    if (threadIdx.x == 0) *total = carry;
}

// Sum across a 1-D block of THREADS threads; the result is valid in every thread.
// `smem` must hold THREADS / 32 values. Contains barriers.
template <typename T, int THREADS>
__device__ __forceinline__ T sg_block_sum(T v, T* smem) {
    constexpr int WARPS = THREADS / 32;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = sg_warp_sum(v);
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    T total = T(0);
#pragma unroll
    for (int w = 0; w < WARPS; ++w) total += smem[w];
    __syncthreads();
    return total;
}

// The smallest `v` across the warp, in every lane (all 32 lanes must call it).
__device__ __forceinline__ u64 sg_warp_min_u64(u64 v) {
#pragma unroll
    for (u32 o = 16; o > 0; o >>= 1) {
        const u64 other = __shfl_xor_sync(0xffffffffu, v, o);
        if (other < v) v = other;
    }
    return v;
}

// A finiteness check's block-level report: every thread passes its count of non-finite
// values and (per warp, after a shuffle) the smallest index seen; thread 0 records the
// block's total and first index for check `id` (sg_health_nonfinite). `red` and `firsts`
// are SG_THREADS / 32 shared words each. Contains barriers: every thread must call it.
__device__ __forceinline__ void sg_flag_block(u64 count, u64 first, u64 id, u64* health, u64* red, u64* firsts) {
    if ((threadIdx.x & 31) == 0) firsts[threadIdx.x >> 5] = first;
    count = sg_block_sum<u64, SG_THREADS>(count, red);
    if (threadIdx.x == 0 && count != 0) {
        for (int w = 0; w < SG_THREADS / 32; ++w)
            if (firsts[w] < first) first = firsts[w];
        sg_health_nonfinite(health, id, count, first);
    }
}
