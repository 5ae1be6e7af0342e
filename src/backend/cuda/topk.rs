//! Launchers of cuda/topk.cu: top-k by magnitude into a sorted COO list, identical to the
//! CPU specification (src/backend/cpu/topk.rs; the algorithm is described at the top of
//! cuda/topk.cu).
//!
//! No host round trip: the launch sequence is the same every call (the zero-fill path is
//! decided on the device), the output always holds exactly `k` entries, and non-finite
//! entries or bad index maps are reported through the device health block at the next
//! synchronisation (`Error::NonFinite` naming the matrix, or `Error::InvalidArgument` naming
//! `topk_coo`), like every deferred CUDA error (see the module docs of `cuda`).

use super::{kargs, kernel, require_f32, Cuda, CudaBuf, TILE};
use crate::backend::ops::topk::*;
use crate::backend::{Coo, IndexMaps};
use crate::error::Result;
use crate::scalar::Real;
use cudarc::driver::LaunchConfig;

/// Words of the device state block (`TOPK_STATE_WORDS`; the table is in cuda/topk.cu).
const STATE_WORDS: usize = super::consts::TOPK_STATE_WORDS;
/// Three passes of TOPK_BINS u32 bins, as u64 words.
const HIST_WORDS: usize = 3 * super::consts::TOPK_BINS / 2;

/// u64 words of the workspace [`Cuda::topk_workspace`] allocates for matrices of up to
/// `max_len` entries: state, histograms and one word per compaction tile (the memory plan,
/// [`crate::plan`], sizes it by the same function).
pub(crate) fn topk_workspace_words(max_len: usize) -> usize {
    STATE_WORDS + HIST_WORDS + max_len.div_ceil(TILE).max(1)
}
/// Blocks per multiprocessor of the histogram passes (each holds 2048 shared bins).
const HIST_PER_SM: u32 = 4;

// Costs (see `kernel!`): inputs read once, outputs written once.
kernel!(
    /// []: the state words and the 3 x 2048 bins written.
    TOPK_INIT = "topk" / "topk_init", TopkSparse, |_a| (STATE_WORDS as u64 * 8 + 3 * 2048 * 4, 0)
);
kernel!(
    /// [len]: one map read.
    TOPK_CHECK_MAP = "topk" / "topk_check_map", TopkSparse, |a| (4 * a[0], a[0])
);
kernel!(
    /// [n]: one pass over the matrix into a 2048-bin histogram (and, after pass 0, the
    /// previous pass's bins read once from DRAM; the blocks' repeated reads hit L2).
    TOPK_HIST = "topk" / "topk_hist_f32", TopkSparse, |a| (4 * a[0] + 2 * 2048 * 4, 2 * a[0] + 2048)
);
kernel!(
    /// [n]: the last pass's bins, the matrix read, one word per tile of 4096 written, then
    /// read and rewritten by the scan.
    TOPK_TILE_COUNT = "topk" / "topk_tile_count_f32", TopkSparse,
    |a| (2048 * 4 + 4 * a[0] + 3 * 8 * a[0].div_ceil(TILE as u64), a[0] + 2048 + a[0].div_ceil(TILE as u64))
);
kernel!(
    /// [n, entries written]: the matrix and the tile offsets read, the selected entries (row,
    /// column, value) written (the first scatter's last block also searches the kept
    /// entries for the fill bound: log2 reads, left out).
    TOPK_SCATTER = "topk" / "topk_scatter_f32", TopkSparse,
    |a| (4 * a[0] + 8 * a[0].div_ceil(TILE as u64) + 12 * a[1], a[0])
);
kernel!(
    /// [n, k]: the fill path's bound: the matrix and the tile offsets read, k entries written
    /// (the range below L* and the kept entries above it) and up to k values read for the
    /// range (its map searches, log2 reads each, left out). Without a fill it only counts its
    /// blocks done.
    TOPK_SCATTER_FILL = "topk" / "topk_scatter_fill_f32", TopkSparse,
    |a| (4 * a[0] + 8 * a[0].div_ceil(TILE as u64) + 16 * a[1], a[0])
);

/// Scratch of [`TopkOps::topk_coo`] on the GPU: the state block, three histograms
/// and one u64 per tile of 4096 entries, allocated once by `topk_workspace(max_len)`.
pub struct CudaTopkWorkspace {
    max_len: usize,
    buf: CudaBuf<u64>,
    /// The state and bins may not be zero: a call stopped part way (or selected nothing, so
    /// its last kernel, which clears them, did not run). The next call clears them first.
    dirty: bool,
}

impl CudaTopkWorkspace {
    /// The largest matrix (in entries) this workspace can select from.
    pub fn max_len(&self) -> usize {
        self.max_len
    }
}

impl std::fmt::Debug for CudaTopkWorkspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaTopkWorkspace(max_len = {})", self.max_len)
    }
}

const OP: &str = "topk_coo";

/// A map's device address (its order and bounds are checked on the device), or 0 for none.
fn map_ptr(map: Option<&CudaBuf<u32>>) -> u64 {
    map.map_or(0, |map| map.ptr())
}

impl TopkOps for Cuda {
    type TopkWorkspace = CudaTopkWorkspace;

    fn topk_workspace(&self, max_len: usize) -> Result<CudaTopkWorkspace> {
        check_topk_workspace(max_len)?;
        // Zeroed: the state every call starts from and leaves.
        let buf = self.alloc_buf::<u64>(topk_workspace_words(max_len), true)?;
        Ok(CudaTopkWorkspace { max_len, buf, dirty: false })
    }

    fn topk_coo<F: Real>(
        &self,
        m: &CudaBuf<F>,
        rows: usize,
        cols: usize,
        k: usize,
        maps: &IndexMaps<'_, Cuda>,
        ws: &mut CudaTopkWorkspace,
        out: &mut Coo<Cuda, F>,
    ) -> Result<()> {
        require_f32::<F>(OP)?;
        let n = check_topk_coo(self, m, rows, cols, k, maps, ws.max_len, out)?;
        let (full_rows, full_cols) = maps.full_shape;
        let (row_map, col_map) = (map_ptr(maps.row_map), map_ptr(maps.col_map));

        let state = ws.buf.ptr();
        let hist = state + 8 * STATE_WORDS as u64;
        let tiles = hist + 8 * HIST_WORDS as u64;
        let one_block =
            |threads: u32| LaunchConfig { grid_dim: (1, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        let mp = m.ptr();

        if ws.dirty {
            // SAFETY: topk_init(u64* state, u32* hist): writes the state words and the
            // 3 x 2048 bins that follow them in the workspace buffer.
            unsafe { self.launch(&TOPK_INIT, one_block(1024), &mut kargs![state, hist], &[]) }?;
        }
        // Clean again only once the last kernel of a complete sequence is queued.
        ws.dirty = true;
        let err = self.errors.ptr();
        for (map, len, full, bit) in [(row_map, rows, full_rows, 1u64), (col_map, cols, full_cols, 2u64)] {
            if map != 0 && len > 0 {
                let (l, f) = (len as u64, full as u64);
                // SAFETY: topk_check_map(const u32* map, u64 n, u64 full, u64* state, u64 bit,
                // u32* err): the map holds `len` entries (checked by check_topk_coo), `err` is
                // word 0 of the health block.
                unsafe {
                    self.launch(&TOPK_CHECK_MAP, self.grid_1d(len, 16), &mut kargs![map, l, f, state, bit, err], &[l])
                }?;
            }
        }
        out.shape = maps.full_shape;
        out.len = 0;
        if k == 0 {
            // Nothing to select, but a non-finite matrix is still an error, as on the CPU.
            return crate::backend::DenseOps::assert_finite(self, m, n, "matrix passed to top-k selection");
        }
        // From here on the sequence of launches is fixed: nothing is read back (see
        // cuda/topk.cu), so the call can be captured in a CUDA graph.
        let check = self.check_id("matrix passed to top-k selection");
        let (o_rows, o_cols, o_vals) = (out.rows.ptr_mut(), out.cols.ptr_mut(), out.values.ptr_mut());
        let compaction = Compaction {
            cuda: self,
            m: mp,
            n,
            k: k as u64,
            cols,
            state,
            hist,
            tiles,
            row_map,
            col_map,
            full_cols,
            out: (o_rows, o_cols, o_vals),
            written: k as u64,
        };
        // Each pass (and the tile count after the last) first makes the previous pass's
        // choice of bin on the device.
        for pass in 0..3u32 {
            compaction.hist_pass(pass, check)?;
        }
        compaction.count_and_scan()?;
        // The first scatter's last block also finds the fill bound.
        compaction.scatter(false)?;
        // The zero fill when k exceeds the nonzeros (its blocks only count themselves done
        // otherwise); its last block leaves the workspace zeroed for the next call.
        compaction.scatter(true)?;
        ws.dirty = false;
        out.len = k;
        Ok(())
    }
}

/// The stable compaction of one call (addresses already checked).
struct Compaction<'a> {
    cuda: &'a Cuda,
    m: u64,
    n: usize,
    k: u64,
    cols: usize,
    state: u64,
    hist: u64,
    tiles: u64,
    row_map: u64,
    col_map: u64,
    full_cols: usize,
    out: (u64, u64, u64),
    /// Entries a scatter writes (for its cost): k (the bound on the zero-fill path too).
    written: u64,
}

impl Compaction<'_> {
    fn hist_pass(&self, pass: u32, check: u64) -> Result<()> {
        let (m, n64, k, state, hist, health) =
            (self.m, self.n as u64, self.k, self.state, self.hist, self.cuda.errors.ptr());
        // SAFETY: topk_hist_f32(const float* m, u64 n, u32 pass, u64 k, u64* state,
        // u32* hist_all, u64 check_id, u64* health): reads m[..n] and the previous pass's
        // bins, adds into the pass's 2048 bins, block 0 records the previous pass's choice in
        // the state words; pass 0 also adds into state[2], writes state[9] and reports
        // non-finite entries to the health block.
        unsafe {
            self.cuda.launch(
                &TOPK_HIST,
                self.cuda.grid_1d(self.n, HIST_PER_SM),
                &mut kargs![m, n64, pass, k, state, hist, check, health],
                &[n64],
            )
        }
    }

    fn count_and_scan(&self) -> Result<()> {
        let (m, n64, k, state, hist, tiles) = (self.m, self.n as u64, self.k, self.state, self.hist, self.tiles);
        let n_tiles = self.n.div_ceil(TILE);
        let cap = (self.cuda.sm_count * HIST_PER_SM) as usize;
        let grid = LaunchConfig {
            grid_dim: (n_tiles.clamp(1, cap) as u32, 1, 1),
            block_dim: (super::THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: topk_tile_count_f32(const float* m, u64 n, u64 k, u64* state,
        // const u32* hist_all, u64* tiles): reads the last pass's bins and m[..n], block 0
        // writes state[3..6];
        // tiles strided over the blocks, one word each, then the last block scans them in
        // place and writes the total to state[7]; the workspace holds ceil(max_len / 4096) >=
        // ceil(n / 4096) tile words.
        unsafe { self.cuda.launch(&TOPK_TILE_COUNT, grid, &mut kargs![m, n64, k, state, hist, tiles], &[n64]) }
    }

    /// The regular compaction, or with `fill` the fill path's range and placement (a no-op
    /// on the device without a fill).
    fn scatter(&self, fill: bool) -> Result<()> {
        let (m, n64, c, state, tiles) = (self.m, self.n as u64, self.cols as u64, self.state, self.tiles);
        let (rm, cm, fc) = (self.row_map, self.col_map, self.full_cols as u64);
        let (o_rows, o_cols, o_vals) = self.out;
        let hist = self.hist;
        let kernel = if fill { &TOPK_SCATTER_FILL } else { &TOPK_SCATTER };
        // SAFETY: topk_scatter_f32 and topk_scatter_fill_f32 (const float* m, u64 n, u64 cols,
        // u64* state, const u64* tiles, const u32* row_map, const u32* col_map, u64 full_cols,
        // u32* out_rows, u32* out_cols, float* out_values, u32* hist_all): write at most k
        // distinct positions below k (capacity checked; the fill range ends at L* <= k - 1);
        // the maps (or null) hold rows / cols entries, searched only within them; every block
        // adds to state[16]; the first scatter's last block reads out[..nonzeros] and writes
        // state[8], the fill scatter's zeroes the state words and the 3 x 2048 bins.
        unsafe {
            self.cuda.launch(
                kernel,
                Cuda::grid_tiles(self.n),
                &mut kargs![m, n64, c, state, tiles, rm, cm, fc, o_rows, o_cols, o_vals, hist],
                &[n64, self.written],
            )
        }
    }
}
