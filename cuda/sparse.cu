// sparse.cu: the sparse-by-dense kernels (nonzero rows/columns, gathers) and the COO
// helpers (scatter-add, row compaction, sparse-times-dense, densification, sparse-by-rows
// times dense).
//
// Computes (CPU twins in src/backend/cpu/sparse.rs, launchers in src/backend/cuda/sparse.rs):
//   max_abs_f32            max |m| over non-NaN entries as float bits (atomicMax on u32:
//                          for non-negative floats the bit order is the value order), so
//                          the threshold t = threshold_rel * max matches the CPU bit for bit
//   nonzero_flags_f32      row_flags[r] / col_flags[c] = 1 where some |v| >= t and v != 0
//   zero_below_f32         m[i] = 0 where |m[i]| < t (t from max_abs_f32's bits), in place
//   flags_tile_count       } deterministic compaction of 0/1 flags into ascending index
//   scan_tiles_u64         } lists: per-tile counts, one-block exclusive scan of the tile
//   flags_tile_scatter     } counts (common.cuh's sg_block_scan_tiles), per-tile scatter
//   gather_rows_{u8,bf16,f32}   dst[i, :] = src[row_idx[i], :] (bit copies; the f32 kernel
//                          also serves u32/i32)
//   gather_block_f32       dst[i, j] = v if |v| >= t else 0, v = src[row_idx[i], col_idx[j]]
//   coo_scatter_add_f32    dense[r, c] += alpha * v (atomicAdd: exact for distinct entries)
//   coo_rows_tile_count, coo_rows_scatter
//                          distinct rows of a sorted COO and each entry's slot (compaction
//                          of "row differs from the previous entry's row" heads)
//   coo_dense_t_f32        out[i, slot[e]] += values[e] * b[i, cols[e]] (out zeroed by the
//                          launcher; runs of equal slots are summed in registers, one
//                          atomicAdd per run, so the summation order is not fixed; the
//                          CPU's merged update, no longer on the CUDA step)
//   coo_densify_{f32,bf16} dense[r, c] = v for each entry of a distinct, sorted COO list
//                          (dense zeroed by the launcher): one plain store per entry, no
//                          atomics; an entry out of range or not after its predecessor in
//                          linear order is skipped and reported
//   coo_row_starts         starts[r] = first entry with row >= r (binary search), r = 0..n_rows,
//                          and the range and order check of every entry
//   coo_mm_f32             out[r, j] = sum over the run starts[r]..starts[r+1] of
//                          values[e] * b[cols[e], j], in list order from zero (__fmul_rn /
//                          __fadd_rn: the CPU twin's sum bit for bit); each output element
//                          written once, no atomics
//
// Launch shapes:
//   1-D kernels: SG_THREADS threads, 64-bit grid-stride loops, grid capped by the launcher.
//   Tile kernels (*_tile_count, *_scatter): one block of SG_THREADS per tile of SG_TILE =
//   4096 consecutive elements, grid.x = number of tiles (< 2^31 for any u32-indexed input);
//   each thread takes elements base + r * SG_THREADS + threadIdx.x (coalesced).
//   scan_tiles_u64: exactly one block of 1024 threads, looping over the tile counts.
//   nonzero_flags_f32: block 256 along columns, grid.x = ceil(cols / 256), grid.y <= 65535
//   row groups (grid-stride over rows); warp votes set the row flags.
//   gather_rows_* / gather_block_f32: block 256 along columns, grid.y <= 65535 strides rows.
//   coo_dense_t_f32: block 256 with 8 consecutive entries per thread (a chunk of 2048
//   entries staged in shared memory), grid.x = chunks, grid.y <= 65535 strides over rows of b.
//   coo_densify_*, coo_row_starts: 1-D grid-stride.
//   coo_mm_f32: block 256 along the columns of b (grid.x covers them, capped; the kernel
//   strides), grid.y <= 65535 strides over rows; a row's entries are read warp-uniformly.
//
// Out-of-range indices never touch memory: the entry is skipped (gathers write 0) and a bit
// is set in the device error word, which the host turns into an error at its next sync.
//
// Tested by tests/cuda_sparse.rs (against the CPU backend, outputs poisoned, exact index
// equality); benchmarked by benches/cuda_kernels.rs.
#include "common.cuh"

extern "C" __global__ void max_abs_f32(const float* __restrict__ m, u64 n, u32* max_bits) {
    u32 best = 0;
    // NaN (key above +inf) is ignored, as f32::max ignores it on the CPU.
    auto see = [&](float v) {
        const u32 key = sg_abs_key(v);
        if (key <= 0x7f800000u && key > best) best = key;
    };
    sg_vec4_loop(
        n, sg_aligned(m, 16),
        [&](u64 i) {
            const float4 v = reinterpret_cast<const float4*>(m)[i];
            see(v.x);
            see(v.y);
            see(v.z);
            see(v.w);
        },
        [&](u64 i) { see(m[i]); });
    best = __reduce_max_sync(0xffffffffu, best);
    if ((threadIdx.x & 31) == 0 && best != 0) atomicMax(max_bits, best);
}

extern "C" __global__ void zero_below_f32(float* __restrict__ m, u64 n, const u32* max_bits, float threshold_rel) {
    const float t = __fmul_rn(threshold_rel, __uint_as_float(*max_bits));
    SG_GRID_STRIDE(i, n) {
        if (fabsf(m[i]) < t) m[i] = 0.0f;
    }
}

extern "C" __global__ void nonzero_flags_f32(const float* __restrict__ m, u64 rows, u64 cols, const u32* max_bits,
                                             float threshold_rel, u32* __restrict__ row_flags,
                                             u32* __restrict__ col_flags) {
    const u64 c = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u32 lane = threadIdx.x & 31;
    const float t = __fmul_rn(threshold_rel, __uint_as_float(*max_bits));
    bool col_any = false;
    // Every thread runs the same row iterations (no early exit), so the warp vote is safe.
#pragma unroll 4
    for (u64 r = blockIdx.y; r < rows; r += gridDim.y) {
        bool kept = false;
        if (c < cols) {
            const float v = m[r * cols + c];
            kept = (v != 0.0f) && (fabsf(v) >= t);
        }
        col_any |= kept;
        const bool any = __any_sync(0xffffffffu, kept);
        if (any && lane == 0) row_flags[r] = 1u;
    }
    if (col_any) col_flags[c] = 1u;
}

extern "C" __global__ void flags_tile_count(const u32* flags, u64 n, u64* tiles) {
    __shared__ u64 red[SG_THREADS / 32];
    const u64 base = (u64)blockIdx.x * SG_TILE;
    u64 count = 0;
#pragma unroll
    for (int r = 0; r < SG_TILE_ITEMS; ++r) {
        const u64 i = base + (u64)r * SG_THREADS + threadIdx.x;
        if (i < n && flags[i] != 0) ++count;
    }
    count = sg_block_sum<u64, SG_THREADS>(count, red);
    if (threadIdx.x == 0) tiles[blockIdx.x] = count;
}

// In place: tiles[t] = sum of tiles[0..t]; *total = sum of all. One block of 1024 threads.
extern "C" __global__ void scan_tiles_u64(u64* tiles, u64 n_tiles, u64* total) {
    __shared__ u64 smem[1024 / 32 + 1];
    sg_block_scan_tiles<1024>(tiles, n_tiles, total, smem);
}

extern "C" __global__ void flags_tile_scatter(const u32* flags, u64 n, const u64* tiles, u32* out) {
    __shared__ u32 smem[SG_THREADS / 32 + 1];
    const u64 base = (u64)blockIdx.x * SG_TILE;
    u64 offset = tiles[blockIdx.x];
    for (int r = 0; r < SG_TILE_ITEMS; ++r) {
        const u64 i = base + (u64)r * SG_THREADS + threadIdx.x;
        const u32 f = (i < n && flags[i] != 0) ? 1u : 0u;
        u32 total;
        const u32 ex = sg_block_exclusive_scan<u32, SG_THREADS>(f, &total, smem);
        if (f) out[offset + ex] = (u32)i;
        offset += total;
    }
}

template <typename T>
__device__ __forceinline__ void gather_rows_impl(const T* src, u64 src_rows, u64 cols, const u32* row_idx, u64 n_idx,
                                                 T* dst, u32* err) {
    for (u64 i = blockIdx.y; i < n_idx; i += gridDim.y) {
        const u64 r = row_idx[i];
        const bool ok = r < src_rows;
        if (!ok && blockIdx.x == 0 && threadIdx.x == 0) atomicOr(err, SG_ERR_GATHER_ROWS);
        for (u64 c = (u64)blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += (u64)gridDim.x * blockDim.x) {
            dst[i * cols + c] = ok ? src[r * cols + c] : T(0);
        }
    }
}

#define SG_GATHER_ROWS(name, T)                                                                            \
    extern "C" __global__ void name(const T* src, u64 src_rows, u64 cols, const u32* row_idx, u64 n_idx, \
                                    T* dst, u32* err) {                                                   \
        gather_rows_impl<T>(src, src_rows, cols, row_idx, n_idx, dst, err);                               \
    }
SG_GATHER_ROWS(gather_rows_u8, u8)
SG_GATHER_ROWS(gather_rows_bf16, u16)
SG_GATHER_ROWS(gather_rows_f32, u32)

extern "C" __global__ void gather_block_f32(const float* src, u64 src_rows, u64 src_cols, const u32* row_idx,
                                            u64 n_rows, const u32* col_idx, u64 n_cols, float abs_threshold,
                                            float* dst, u32* err) {
    for (u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x; j < n_cols; j += (u64)gridDim.x * blockDim.x) {
        const u64 cj = col_idx[j];
        const bool col_ok = cj < src_cols;
        if (!col_ok) atomicOr(err, SG_ERR_GATHER_BLOCK);
        for (u64 i = blockIdx.y; i < n_rows; i += gridDim.y) {
            const u64 ri = row_idx[i];
            const bool ok = col_ok && ri < src_rows;
            if (ri >= src_rows) atomicOr(err, SG_ERR_GATHER_BLOCK);
            const float v = ok ? src[ri * src_cols + cj] : 0.0f;
            dst[i * n_cols + j] = (fabsf(v) >= abs_threshold) ? v : 0.0f;
        }
    }
}

extern "C" __global__ void coo_scatter_add_f32(const u32* rows, const u32* cols, const float* values, u64 len,
                                               u64 n_rows, u64 n_cols, float alpha, float* dense, u32* err) {
    SG_GRID_STRIDE(e, len) {
        const u64 r = rows[e];
        const u64 c = cols[e];
        if (r >= n_rows || c >= n_cols) {
            atomicOr(err, SG_ERR_COO_SCATTER);
            continue;
        }
        atomicAdd(&dense[r * n_cols + c], __fmul_rn(alpha, values[e]));
    }
}

// Status bits of coo_compact_rows (status[1]).
#define SG_COMPACT_UNSORTED 1ull
#define SG_COMPACT_OUT_OF_RANGE 2ull
#define SG_COMPACT_CAPACITY 4ull

// Head flags (entry starts a new row) per tile; also validates order and bounds into status[1].
extern "C" __global__ void coo_rows_tile_count(const u32* rows, const u32* cols, u64 len, u64 n_rows, u64 n_cols,
                                               u64* tiles, u64* status) {
    __shared__ u64 red[SG_THREADS / 32];
    const u64 base = (u64)blockIdx.x * SG_TILE;
    u64 count = 0;
    u64 bad = 0;
#pragma unroll 4
    for (int r = 0; r < SG_TILE_ITEMS; ++r) {
        const u64 e = base + (u64)r * SG_THREADS + threadIdx.x;
        if (e < len) {
            const u32 row = rows[e];
            if (row >= n_rows || cols[e] >= n_cols) bad |= SG_COMPACT_OUT_OF_RANGE;
            if (e == 0) {
                ++count;
            } else {
                const u32 prev = rows[e - 1];
                if (row != prev) ++count;
                if (row < prev) bad |= SG_COMPACT_UNSORTED;
            }
        }
    }
    count = sg_block_sum<u64, SG_THREADS>(count, red);
    if (threadIdx.x == 0) tiles[blockIdx.x] = count;
    if (bad) atomicOr((unsigned long long*)&status[1], (unsigned long long)bad);
}

extern "C" __global__ void coo_rows_scatter(const u32* rows, u64 len, const u64* tiles, u32* unique_rows,
                                            u64 unique_cap, u32* slot, u64* status) {
    __shared__ u32 smem[SG_THREADS / 32 + 1];
    const u64 base = (u64)blockIdx.x * SG_TILE;
    u64 offset = tiles[blockIdx.x];
    for (int r = 0; r < SG_TILE_ITEMS; ++r) {
        const u64 e = base + (u64)r * SG_THREADS + threadIdx.x;
        u32 head = 0;
        u32 row = 0;
        if (e < len) {
            row = rows[e];
            head = (e == 0 || rows[e - 1] != row) ? 1u : 0u;
        }
        u32 total;
        const u32 ex = sg_block_exclusive_scan<u32, SG_THREADS>(head, &total, smem);
        if (e < len) {
            const u64 pos = offset + ex;  // heads strictly before e
            if (head) {
                if (pos < unique_cap) {
                    unique_rows[pos] = row;
                } else {
                    atomicOr((unsigned long long*)&status[1], SG_COMPACT_CAPACITY);
                }
            }
            slot[e] = (u32)(pos + head - 1);  // e = 0 is a head, so this never wraps
        }
        offset += total;
    }
}

#define SG_CDT_PER_THREAD 8
#define SG_CDT_CHUNK (SG_THREADS * SG_CDT_PER_THREAD)
#define SG_CDT_SKIP 0xffffffffu

extern "C" __global__ void coo_dense_t_f32(const u32* rows, const u32* cols, const float* values, const u32* slot,
                                           u64 len, u64 n_rows, u64 b_cols, u64 n_slots, const float* b, u64 b_rows,
                                           float* out, u32* err) {
    __shared__ u32 s_col[SG_CDT_CHUNK];
    __shared__ u32 s_slot[SG_CDT_CHUNK];
    __shared__ float s_val[SG_CDT_CHUNK];
    const u64 e0 = (u64)blockIdx.x * SG_CDT_CHUNK;
    const u32 count = (u32)((len - e0) < (u64)SG_CDT_CHUNK ? (len - e0) : (u64)SG_CDT_CHUNK);
    for (u32 q = threadIdx.x; q < count; q += SG_THREADS) {
        const u64 e = e0 + q;
        const u32 c = cols[e];
        const u32 s = slot[e];
        const bool ok = rows[e] < n_rows && c < b_cols && s < n_slots;
        if (!ok && blockIdx.y == 0) atomicOr(err, SG_ERR_COO_DENSE_T);
        s_col[q] = c;
        s_slot[q] = ok ? s : SG_CDT_SKIP;
        s_val[q] = values[e];
    }
    __syncthreads();
    const u32 q0 = threadIdx.x * SG_CDT_PER_THREAD;
    const u32 q1 = (q0 + SG_CDT_PER_THREAD) < count ? (q0 + SG_CDT_PER_THREAD) : count;
    if (q0 >= q1) return;  // no barrier below
    for (u64 i = blockIdx.y; i < b_rows; i += gridDim.y) {
        const float* b_row = b + i * b_cols;
        float* out_row = out + i * n_slots;
        u32 cur = SG_CDT_SKIP;
        float acc = 0.0f;
        for (u32 q = q0; q < q1; ++q) {
            const u32 s = s_slot[q];
            if (s == SG_CDT_SKIP) continue;
            const float p = __fmul_rn(s_val[q], b_row[s_col[q]]);
            if (s != cur) {
                if (cur != SG_CDT_SKIP) atomicAdd(&out_row[cur], acc);
                cur = s;
                acc = p;
            } else {
                acc = __fadd_rn(acc, p);
            }
        }
        if (cur != SG_CDT_SKIP) atomicAdd(&out_row[cur], acc);
    }
}

template <typename T, typename C>
__device__ __forceinline__ void coo_densify_impl(const u32* rows, const u32* cols, const float* values, u64 len,
                                                 u64 n_rows, u64 n_cols, T* dense, u32* err, C convert) {
    SG_GRID_STRIDE(e, len) {
        const u64 r = rows[e];
        const u64 c = cols[e];
        bool ok = r < n_rows && c < n_cols;
        if (ok && e > 0 && (u64)rows[e - 1] * n_cols + cols[e - 1] >= r * n_cols + c) ok = false;
        if (!ok) {
            atomicOr(err, SG_ERR_COO_DENSIFY);
            continue;
        }
        dense[r * n_cols + c] = convert(values[e]);
    }
}

extern "C" __global__ void coo_densify_f32(const u32* rows, const u32* cols, const float* values, u64 len, u64 n_rows,
                                           u64 n_cols, float* dense, u32* err) {
    coo_densify_impl(rows, cols, values, len, n_rows, n_cols, dense, err, [](float v) { return v; });
}

extern "C" __global__ void coo_densify_bf16(const u32* rows, const u32* cols, const float* values, u64 len,
                                            u64 n_rows, u64 n_cols, __nv_bfloat16* dense, u32* err) {
    coo_densify_impl(rows, cols, values, len, n_rows, n_cols, dense, err,
                     [](float v) { return __float2bfloat16_rn(v); });
}

extern "C" __global__ void coo_row_starts(const u32* rows, const u32* cols, u64 len, u64 n_rows, u64 n_cols,
                                          u32* starts, u32* err) {
    const u64 n = (n_rows + 1) > len ? (n_rows + 1) : len;
    SG_GRID_STRIDE(i, n) {
        if (i <= n_rows) {
            u64 lo = 0, hi = len;
            while (lo < hi) {
                const u64 mid = lo + (hi - lo) / 2;
                if ((u64)rows[mid] < i) {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            starts[i] = (u32)lo;
        }
        if (i < len) {
            const u64 r = rows[i];
            const u64 c = cols[i];
            bool bad = r >= n_rows || c >= n_cols;
            if (i > 0 && (u64)rows[i - 1] * n_cols + cols[i - 1] >= r * n_cols + c) bad = true;
            if (bad) atomicOr(err, SG_ERR_COO_MM);
        }
    }
}

// Entries out of range were reported by coo_row_starts; a column out of range is skipped
// here, and unsorted rows only make runs wrong (starts stay within 0..len), never unsafe.
extern "C" __global__ void coo_mm_f32(const u32* starts, const u32* cols, const float* values, u64 n_rows, u64 n_cols,
                                      const float* b, u64 b_cols, float* out) {
    for (u64 r = blockIdx.y; r < n_rows; r += gridDim.y) {
        const u64 s = starts[r];
        const u64 t = starts[r + 1];
        for (u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x; j < b_cols; j += (u64)gridDim.x * blockDim.x) {
            float acc = 0.0f;
            for (u64 e = s; e < t; ++e) {
                const u64 c = cols[e];
                if (c < n_cols) acc = __fadd_rn(acc, __fmul_rn(values[e], b[c * b_cols + j]));
            }
            out[r * b_cols + j] = acc;
        }
    }
}
