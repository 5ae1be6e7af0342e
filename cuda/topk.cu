// topk.cu: top-k by magnitude of a dense f32 matrix into a sorted COO list, identical to
// the CPU specification (src/backend/cpu/topk.rs):
//
//   1. radix select of the k-th largest key (key = |v| as float bits), three histogram
//      passes over digits [31:21], [20:10], [9:0] (11, 11, 10 bits; no sort). Each pass
//      builds a per-block shared-memory histogram of the entries whose key matches the
//      prefix chosen so far (lanes of a warp with the same bin combined by
//      __match_any_sync, one shared atomic per group) and adds it to global bins. The next
//      kernel (the next pass, or the tile count after the last) picks the bin holding the
//      k-th key from the top with a block scan over the previous pass's bins: every block
//      makes the same choice (2048 bins from L2, a few microseconds in all), block 0
//      records it, so the passes need neither a host round trip nor a launch of their own.
//      Pass 0 also counts nonzero entries and reports non-finite entries (keys >= the +inf
//      key: with an 11-bit top digit they are exactly the bins >= 0x3fc) with the first
//      such index to the health block.
//   2. stable compaction (linear order): every entry with key > thr, then the first
//      `take_eq` entries with key == thr (ties to the lower index), written with block and
//      full indices restored through the row/col maps. Per-tile (gt, eq) counts packed into
//      one u64 (gt << 32 | eq), one exclusive scan (by the last block of the count to
//      finish, sg_block_scan_tiles), then each tile scatters: position = gt_before +
//      min(eq_before, take_eq).
//   3. when k exceeds the nonzero count (rare; decided on the device, the kernels of this
//      path do nothing otherwise): all nonzeros are kept and the output is
//      completed with the lowest missing full linear indices as zeros. With S the sorted
//      kept indices, the j-th missing index is j + #{i : S[i] - i <= j}; if L* is the last
//      one (j = need - 1, found by binary search by the last block of the first scatter to
//      finish: a __threadfence and a counter, no launch of its own), the output is every
//      index 0..=L* followed by the kept entries above L*. One more launch,
//      topk_scatter_fill_f32, writes both parts: positions 0..=L* grid-strided (the entry's
//      value when kept, found through the maps by binary search, else zero), and kept entry
//      i (full index L > L*) at need + i.
//
// The call never reads anything back: the launch sequence is fixed (map checks, three
// histogram passes, count and scan, scatter, fill scatter: 6 launches without maps; the
// workspace starts and ends each call zeroed, so no initialising launch, except after a call
// that stopped part way: then topk_init first). Non-finite entries and bad maps
// are reported through the device health block (common.cuh) at the next synchronisation,
// and with k <= nonzeros the fill scatter only counts itself done.
//
// Device state (TOPK_STATE_WORDS u64 words):
//   [0], [1] unused       [2] nonzero count
//   [3] thr (key prefix after the last pass)  [4] key mask  [5] take_eq (remaining)
//   [6] map error bits    [7] scan total              [8] L* (fill path; TOPK_NO_FILL if none)
//   [9] k                 [10..13) (prefix, mask, remaining) after pass 0
//   [13..16) the same after pass 1                    [16] blocks of both scatters done
//   [17] blocks of the tile count done
// followed by 3 x 2048 u32 histogram bins, then one u64 per tile. A pass's choice goes to
// its own words because the blocks of the kernel that records it are still reading the
// choice before it.
//
// Batches: the histogram, tile count and scatter kernels take up to TOPK_MAX_JOBS
// selections (TopkJobs), one per blockIdx.y, each from its own matrix into its own
// workspace and output with its own k; a block's work and its job's state depend only on
// its job, so a batch of jobs makes exactly the outputs of each selected alone, in 6
// launches instead of 6 per matrix (the map checks and a dirty workspace's topk_init stay
// per job).
//
// Launch shapes: topk_init one block of 1024 threads; topk_hist_f32 (4 x 256 entries per
// block iteration), topk_tile_count_f32 (tiles strided over the blocks) and topk_check_map
// 1-D grid-stride with SG_THREADS threads and a capped grid (so the repeated choice costs a
// bounded number of bin reads); topk_scatter_f32 and topk_scatter_fill_f32 one block of
// SG_THREADS per tile of SG_TILE elements (the fill range grid-strided over them).
//
// Tested by tests/cuda_topk.rs (exact equality of COO indices and values with the CPU on
// ragged shapes, ties, k = 1, k = all, k > nonzeros, maps, NaN/inf); benchmarked by
// benches/cuda_kernels.rs (one 11008 x 4096 matrix and small ones).
#include "common.cuh"

#define TOPK_BINS 2048
#define TOPK_STATE_WORDS 20
#define TOPK_NO_FILL 0xffffffffffffffffull
#define TOPK_SEL0 10
#define TOPK_SEL1 13
#define TOPK_DONE 16
#define TOPK_COUNTED 17

// One selection of a launch: the kernels below select for up to TOPK_MAX_JOBS matrices at
// once, one per blockIdx.y, each with its own workspace (state, bins, tiles) and output;
// every job gets the grid's gridDim.x blocks, so the per-job "last block" counters count to
// gridDim.x as for one matrix. Mirrored by `TopkJobArgs` in src/backend/cuda/topk.rs.
#define TOPK_MAX_JOBS 4
struct TopkJob {
    const float* m;
    u64 n;
    u64 rows;
    u64 cols;
    u64 k;
    u64* state;
    u32* hist;
    u64* tiles;
    const u32* row_map;
    const u32* col_map;
    u64 full_cols;
    u32* out_rows;
    u32* out_cols;
    float* out_values;
    u64 check_id;
};
struct TopkJobs {
    TopkJob job[TOPK_MAX_JOBS];
};

__device__ __forceinline__ u32 topk_shift(u32 pass) { return pass == 0 ? 21u : (pass == 1 ? 10u : 0u); }
__device__ __forceinline__ u32 topk_digit_mask(u32 pass) { return pass == 2 ? 0x3ffu : 0x7ffu; }

// The workspace as allocated: zero state and bins. Each call leaves it so (the last block of
// its second scatter clears it); the launcher runs this only after a call that did not run
// to its end.
extern "C" __global__ void topk_init(u64* state, u32* hist) {
    if (threadIdx.x < TOPK_STATE_WORDS) state[threadIdx.x] = 0;
    for (u32 b = threadIdx.x; b < 3 * TOPK_BINS; b += blockDim.x) hist[b] = 0;
}

// A radix pass's choice: the key bits fixed so far and how many entries with that prefix are
// still to be taken from the top.
struct TopkSel {
    u64 prefix;
    u64 mask;
    u64 remaining;
};

__device__ __forceinline__ TopkSel topk_sel_load(const u64* state, u32 word) {
    return TopkSel{state[word], state[word + 1], state[word + 2]};
}

// The choice after pass `pass`, made from that pass's bins and the choice before it; every
// thread of the block returns the same value. Thread t owns the PER bins below
// 2047 - t * PER (descending), so an exclusive scan gives the number of matching entries
// above each bin; exactly one bin b has above(b) < remaining <= above(b) + hist[b]: it
// holds the remaining-th largest key. `scan` holds THREADS / 32 + 1 values, `pick` 3.
// Contains barriers: call it from every thread of the block.
template <int THREADS>
__device__ __forceinline__ TopkSel topk_block_select(const u32* hist_all, u32 pass, TopkSel in, u64* scan,
                                                     u64* pick) {
    static_assert(TOPK_BINS % THREADS == 0, "bins per thread");
    constexpr int PER = TOPK_BINS / THREADS;
    const u32* hist = hist_all + (u64)pass * TOPK_BINS;
    const u32 shift = topk_shift(pass);
    const u32 dmask = topk_digit_mask(pass);
    const u32 top = TOPK_BINS - 1 - threadIdx.x * PER;
    u64 h[PER];
    u64 mine = 0;
#pragma unroll
    for (int r = 0; r < PER; ++r) {
        h[r] = hist[top - r];
        mine += h[r];
    }
    if (threadIdx.x == 0) {  // no bin qualifies only if the bins are short of `remaining`
        pick[0] = in.prefix;
        pick[1] = in.mask;
        pick[2] = in.remaining;
    }
    u64 total;
    u64 above = sg_block_exclusive_scan<u64, THREADS>(mine, &total, scan);  // barriers
#pragma unroll
    for (int r = 0; r < PER; ++r) {
        if (above < in.remaining && above + h[r] >= in.remaining) {
            pick[0] = in.prefix | ((u64)(top - r) << shift);
            pick[1] = in.mask | ((u64)dmask << shift);
            pick[2] = in.remaining - above;
        }
        above += h[r];
    }
    __syncthreads();
    const TopkSel out{pick[0], pick[1], pick[2]};
    __syncthreads();  // the picks are read before `pick` can be reused
    return out;
}

// Block 0 records a choice for the kernels after this one.
__device__ __forceinline__ void topk_sel_store(u64* state, u32 word, TopkSel sel) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        state[word] = sel.prefix;
        state[word + 1] = sel.mask;
        state[word + 2] = sel.remaining;
    }
}

// The choice made by the passes before `pass` (0..=3, 3 meaning after the last; none before
// pass 0: every key, k of them). Block 0 records it: in words TOPK_SEL0 / TOPK_SEL1 after
// passes 0 and 1, in words 3..6 (thr, mask, take_eq) after the last.
__device__ __forceinline__ TopkSel topk_choice_before(u64* state, const u32* hist_all, u32 pass, u64 k, u64* scan,
                                                      u64* pick) {
    TopkSel sel{0, 0, k};
    if (pass == 0) return sel;  // uniform across the grid
    if (pass >= 2) sel = topk_sel_load(state, pass == 2 ? TOPK_SEL0 : TOPK_SEL1);
    sel = topk_block_select<SG_THREADS>(hist_all, pass - 1, sel, scan, pick);
    topk_sel_store(state, pass == 1 ? TOPK_SEL0 : (pass == 2 ? TOPK_SEL1 : 3), sel);
    return sel;
}

// Sets `bit` in state[6] (and SG_ERR_TOPK_MAP in the health block) if the map is not
// strictly increasing or reaches `full`.
extern "C" __global__ void topk_check_map(const u32* map, u64 n, u64 full, u64* state, u64 bit, u32* err) {
    SG_GRID_STRIDE(i, n) {
        const u32 v = map[i];
        if ((u64)v >= full || (i > 0 && map[i - 1] >= v)) {
            atomicOr((unsigned long long*)&state[6], (unsigned long long)bit);
            atomicOr(err, SG_ERR_TOPK_MAP);
        }
    }
}

// Each iteration of a block covers TOPK_UNROLL * blockDim.x consecutive entries (loads first,
// so several are in flight). The loop bounds depend on blockIdx only, so whole warps iterate
// together: lanes that fall into the same bin are combined with __match_any_sync and one of
// them adds the count (values of similar magnitude share few top-digit bins).
#define TOPK_UNROLL 4
#define TOPK_NO_BIN 0xffffffffu
// Pass 0 also counts nonzeros and non-finite entries; those go to the health block as
// finiteness check `check_id`. Passes 1 and 2 first make the previous pass's choice.
extern "C" __global__ void topk_hist_f32(const TopkJobs jobs, u32 pass, u64* health) {
    const TopkJob& job = jobs.job[blockIdx.y];
    const float* __restrict__ m = job.m;
    const u64 n = job.n;
    const u64 k = job.k;
    u64* state = job.state;
    u32* hist_all = job.hist;
    const u64 check_id = job.check_id;
    __shared__ u32 bins[TOPK_BINS];
    __shared__ u64 red[SG_THREADS / 32 + 1];
    __shared__ u64 pick[3];
    for (u32 b = threadIdx.x; b < TOPK_BINS; b += blockDim.x) bins[b] = 0;
    __syncthreads();  // every bin zeroed before any is added to (pass 0 makes no choice first)
    const TopkSel sel = topk_choice_before(state, hist_all, pass, k, red, pick);
    if (pass == 0 && blockIdx.x == 0 && threadIdx.x == 0) state[9] = k;  // for the kernels after
    const u32 shift = topk_shift(pass);
    const u32 dmask = topk_digit_mask(pass);
    const u32 prefix = (u32)sel.prefix;
    const u32 mask = (u32)sel.mask;
    const u32 lane = threadIdx.x & 31;
    u64 nnz = 0;
    u64 bad = 0;
    u64 first = ~0ull;
    const u64 span = (u64)blockDim.x * TOPK_UNROLL;
    for (u64 base = (u64)blockIdx.x * span; base < n; base += (u64)gridDim.x * span) {
        float v[TOPK_UNROLL];
#pragma unroll
        for (int r = 0; r < TOPK_UNROLL; ++r) {
            const u64 i = base + (u64)r * blockDim.x + threadIdx.x;
            v[r] = i < n ? m[i] : 0.0f;
        }
#pragma unroll
        for (int r = 0; r < TOPK_UNROLL; ++r) {
            const u64 i = base + (u64)r * blockDim.x + threadIdx.x;
            u32 bin = TOPK_NO_BIN;
            if (i < n) {
                const u32 key = sg_abs_key(v[r]);
                if ((key & mask) == prefix) bin = (key >> shift) & dmask;
                if (pass == 0) {
                    nnz += (key != 0) ? 1 : 0;
                    if (key >= 0x7f800000u) {
                        ++bad;
                        if (i < first) first = i;
                    }
                }
            }
            const u32 peers = __match_any_sync(0xffffffffu, bin);
            if (bin != TOPK_NO_BIN && lane == (u32)(__ffs(peers) - 1)) atomicAdd(&bins[bin], (u32)__popc(peers));
        }
    }
    __syncthreads();
    u32* hist = hist_all + (u64)pass * TOPK_BINS;
    for (u32 b = threadIdx.x; b < TOPK_BINS; b += blockDim.x) {
        const u32 c = bins[b];
        if (c != 0) atomicAdd(&hist[b], c);
    }
    if (pass == 0) {  // uniform across the block: the barriers below are safe
        nnz = sg_block_sum<u64, SG_THREADS>(nnz, red);
        bad = sg_block_sum<u64, SG_THREADS>(bad, red);
#pragma unroll
        for (u32 o = 16; o > 0; o >>= 1) {
            const u64 other = __shfl_xor_sync(0xffffffffu, first, o);
            if (other < first) first = other;
        }
        __shared__ u64 firsts[SG_THREADS / 32];
        if ((threadIdx.x & 31) == 0) firsts[threadIdx.x >> 5] = first;
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int w = 0; w < SG_THREADS / 32; ++w)
                if (firsts[w] < first) first = firsts[w];
            if (nnz != 0) atomicAdd((unsigned long long*)&state[2], (unsigned long long)nnz);
            if (bad != 0) sg_health_nonfinite(health, check_id, bad, first);
        }
    }
}

// The last pass's choice (thr, take_eq), then the (gt, eq) counts of each tile, the tiles
// strided over a capped grid; the last block to finish turns them into exclusive offsets.
extern "C" __global__ void topk_tile_count_f32(const TopkJobs jobs) {
    const TopkJob& job = jobs.job[blockIdx.y];
    const float* m = job.m;
    const u64 n = job.n;
    u64* state = job.state;
    const u32* hist_all = job.hist;
    u64* tiles = job.tiles;
    __shared__ u64 red[SG_THREADS / 32 + 1];
    __shared__ u64 pick[3];
    const u32 thr = (u32)topk_choice_before(state, hist_all, 3, job.k, red, pick).prefix;  // barriers
    const bool eligible = thr > 0;
    const u64 n_tiles = (n + SG_TILE - 1) / SG_TILE;
    for (u64 tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {  // uniform across the block
        const u64 base = tile * SG_TILE;
        u64 gt = 0;
        u64 eq = 0;
#pragma unroll 4
        for (int r = 0; r < SG_TILE_ITEMS; ++r) {
            const u64 i = base + (u64)r * SG_THREADS + threadIdx.x;
            if (i < n) {
                const u32 key = sg_abs_key(m[i]);
                gt += key > thr ? 1 : 0;
                eq += (eligible && key == thr) ? 1 : 0;
            }
        }
        gt = sg_block_sum<u64, SG_THREADS>(gt, red);
        eq = sg_block_sum<u64, SG_THREADS>(eq, red);
        if (threadIdx.x == 0) tiles[tile] = (gt << 32) | eq;
    }
    // The last block to finish scans every tile's counts (no launch of its own).
    __shared__ u32 last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        const u64 done = atomicAdd((unsigned long long*)&state[TOPK_COUNTED], 1ull);
        last = done + 1 == gridDim.x ? 1u : 0u;
    }
    __syncthreads();
    if (last) {  // uniform across the block
        __threadfence();
        sg_block_scan_tiles<SG_THREADS>(tiles, n_tiles, &state[7], red);
    }
}

// With k <= nonzeros there is no fill: state[8] = TOPK_NO_FILL. Otherwise
// out[0..nnz) holds the kept entries in linear order; g(i) = S[i] - i is non-decreasing, so
// #{i : g(i) <= need - 1} is a binary search. L* = need - 1 + that count.
__device__ __forceinline__ void topk_fill_bound(const u32* out_rows, const u32* out_cols, u64 full_cols, u64* state) {
    const u64 nnz = state[2];
    const u64 k = state[9];
    if (k <= nnz) {
        state[8] = TOPK_NO_FILL;
        return;
    }
    const u64 need = k - nnz;
    u64 lo = 0;
    u64 hi = nnz;
    while (lo < hi) {
        const u64 mid = lo + (hi - lo) / 2;
        // Written by other blocks of this launch: read past L1 (__ldcg).
        const u64 s = (u64)__ldcg(&out_rows[mid]) * full_cols + __ldcg(&out_cols[mid]);
        if (s - mid <= need - 1) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    state[8] = need - 1 + lo;
}

// Where full index `full` (row `fr`, column `fc`) sits in the matrix, or ~0 when a map leaves
// it out: the maps are strictly increasing (topk_check_map), so a binary search finds it.
__device__ __forceinline__ u64 topk_map_find(const u32* map, u64 len, u32 v) {
    u64 lo = 0;
    u64 hi = len;
    while (lo < hi) {
        const u64 mid = lo + (hi - lo) / 2;
        if (map[mid] < v) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo < len && map[lo] == v ? lo : ~0ull;
}

// The scatters of one tile. fill_pass == 0: the regular compaction (position = gt_before +
// min(eq_before, take_eq)); the last block to finish then finds L* (topk_fill_bound) from
// what every block wrote. fill_pass == 1 (fill path, thr = 0; nothing to do unless state[8]
// holds L*): the output's positions 0..=L* are full indices 0..=L*, each written with its
// value when kept (every nonzero is, on the fill path) and zero otherwise, grid-strided over
// the blocks; a kept entry i above L* goes to need + i, need = k - nonzeros. The two parts
// write disjoint positions, so one launch does both.
__device__ __forceinline__ void topk_scatter_tile(const TopkJob& job, u32 fill_pass) {
    const float* m = job.m;
    const u64 n = job.n;
    const u64 cols = job.cols;
    u64* state = job.state;
    const u32* row_map = job.row_map;
    const u32* col_map = job.col_map;
    const u64 full_cols = job.full_cols;
    u32* out_rows = job.out_rows;
    u32* out_cols = job.out_cols;
    float* out_values = job.out_values;
    __shared__ u32 smem[SG_THREADS / 32 + 1];
    __shared__ u32 last;
    if (!fill_pass || state[8] != TOPK_NO_FILL) {  // uniform across the grid
        const u64 need = fill_pass ? state[9] - state[2] : 0;
        const u32 thr = (u32)state[3];
        const bool eligible = thr > 0;
        const u64 take_eq = state[5];
        const u64 lstar = state[8];
        if (fill_pass) {
            const u64 rows = job.rows;
            const u64 stride = (u64)gridDim.x * blockDim.x;
            for (u64 q = (u64)blockIdx.x * blockDim.x + threadIdx.x; q <= lstar; q += stride) {
                const u32 fr = (u32)(q / full_cols);
                const u32 fc = (u32)(q % full_cols);
                const u64 bi = row_map ? topk_map_find(row_map, rows, fr) : fr;
                const u64 bj = col_map ? topk_map_find(col_map, cols, fc) : fc;
                float v = 0.0f;
                if (bi < rows && bj < cols) {
                    const float mv = m[bi * cols + bj];
                    if (sg_abs_key(mv) != 0) v = mv;  // -0 is not kept: it fills as +0
                }
                out_rows[q] = fr;
                out_cols[q] = fc;
                out_values[q] = v;
            }
        }
        // The grid has the largest job's tiles: a block past this job's has none.
        if ((u64)blockIdx.x * SG_TILE < n) {  // uniform across the block
            const u64 off = job.tiles[blockIdx.x];
            u64 gt_before = off >> 32;
            u64 eq_before = off & 0xffffffffull;
            const u64 base = (u64)blockIdx.x * SG_TILE;
            float vals[SG_TILE_ITEMS];  // all loads first, so they are in flight together
        #pragma unroll
            for (int r = 0; r < SG_TILE_ITEMS; ++r) {
                const u64 i = base + (u64)r * SG_THREADS + threadIdx.x;
                vals[r] = i < n ? m[i] : 0.0f;
            }
        #pragma unroll
            for (int r = 0; r < SG_TILE_ITEMS; ++r) {
                const u64 i = base + (u64)r * SG_THREADS + threadIdx.x;
                const float v = vals[r];
                bool gt = false;
                bool eq = false;
                if (i < n) {
                    const u32 key = sg_abs_key(v);
                    gt = key > thr;
                    eq = eligible && key == thr;
                }
                // At most SG_THREADS of each per round: 16 bits each suffice.
                const u32 flag = (gt ? 0x10000u : 0u) | (eq ? 1u : 0u);
                u32 total;
                const u32 ex = sg_block_exclusive_scan<u32, SG_THREADS>(flag, &total, smem);
                const u64 my_gt = gt_before + (ex >> 16);
                const u64 my_eq = eq_before + (ex & 0xffffu);
                if (gt || (eq && my_eq < take_eq)) {
                    const u64 bi = i / cols;
                    const u64 bj = i - bi * cols;
                    const u32 fr = row_map ? row_map[bi] : (u32)bi;
                    const u32 fc = col_map ? col_map[bj] : (u32)bj;
                    const u64 lin = (u64)fr * full_cols + fc;
                    // On the fill path the range part above wrote the entries at or below L*.
                    if (!fill_pass || lin > lstar) {
                        const u64 pos = fill_pass ? need + my_gt : my_gt + (my_eq < take_eq ? my_eq : take_eq);
                        out_rows[pos] = fr;
                        out_cols[pos] = fc;
                        out_values[pos] = v;
                    }
                }
                gt_before += total >> 16;
                eq_before += total & 0xffffu;
            }
        }
    }
    // Every block of both scatters counts itself done (after its reads of the state and its
    // writes): the last of the first finds the fill bound, the last of the second leaves the
    // workspace as allocated (zero bins and state) for the next call, which then needs no
    // initialising launch.
    __threadfence();  // this thread's entries are visible before the block counts itself done
    __syncthreads();
    if (threadIdx.x == 0) {
        const u64 done = atomicAdd((unsigned long long*)&state[TOPK_DONE], 1ull);
        last = done + 1 == (u64)gridDim.x * (fill_pass + 1) ? 1u : 0u;
    }
    __syncthreads();
    if (!last) return;  // uniform across the block
    __threadfence();
    if (!fill_pass) {
        if (threadIdx.x == 0) topk_fill_bound(out_rows, out_cols, full_cols, state);
        return;
    }
    for (u32 b = threadIdx.x; b < 3 * TOPK_BINS; b += blockDim.x) job.hist[b] = 0;
    if (threadIdx.x < TOPK_STATE_WORDS) state[threadIdx.x] = 0;
}

extern "C" __global__ void topk_scatter_f32(const TopkJobs jobs) { topk_scatter_tile(jobs.job[blockIdx.y], 0); }

extern "C" __global__ void topk_scatter_fill_f32(const TopkJobs jobs) { topk_scatter_tile(jobs.job[blockIdx.y], 1); }
