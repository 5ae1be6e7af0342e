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
    /// [n, jobs]: one pass over each job's matrix (n entries in all) into its 2048-bin
    /// histogram (and, after pass 0, its previous pass's bins read once from DRAM; the
    /// blocks' repeated reads hit L2).
    TOPK_HIST = "topk" / "topk_hist_f32", TopkSparse,
    |a| (4 * a[0] + 2 * 2048 * 4 * a[1], 2 * a[0] + 2048 * a[1])
);
kernel!(
    /// [n, jobs, tiles]: each job's last pass's bins and its matrix read, one word per tile
    /// of 4096 written, then read and rewritten by the scan.
    TOPK_TILE_COUNT = "topk" / "topk_tile_count_f32", TopkSparse,
    |a| (2048 * 4 * a[1] + 4 * a[0] + 3 * 8 * a[2], a[0] + 2048 * a[1] + a[2])
);
kernel!(
    /// [n, entries written, tiles]: the matrices and the tile offsets read, the selected
    /// entries (row, column, value) written (the first scatter's last block of each job
    /// also searches the kept entries for the fill bound: log2 reads, left out).
    TOPK_SCATTER = "topk" / "topk_scatter_f32", TopkSparse, |a| (4 * a[0] + 8 * a[2] + 12 * a[1], a[0])
);
kernel!(
    /// [n, k, tiles]: the fill path's bound: the matrices and the tile offsets read, k
    /// entries written (the range below L* and the kept entries above it) and up to k values
    /// read for the range (its map searches, log2 reads each, left out). Without a fill it
    /// only counts its blocks done.
    TOPK_SCATTER_FILL = "topk" / "topk_scatter_fill_f32", TopkSparse, |a| (4 * a[0] + 8 * a[2] + 16 * a[1], a[0])
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

/// Selections per launch (`TOPK_MAX_JOBS` of cuda/topk.cu): a larger batch runs in groups.
const MAX_JOBS: usize = super::consts::TOPK_MAX_JOBS;

/// One job of a launch, as cuda/topk.cu's `struct TopkJob` lays it out (device addresses
/// and sizes, all 64-bit).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct TopkJobArg {
    m: u64,
    n: u64,
    rows: u64,
    cols: u64,
    k: u64,
    state: u64,
    hist: u64,
    tiles: u64,
    row_map: u64,
    col_map: u64,
    full_cols: u64,
    out_rows: u64,
    out_cols: u64,
    out_values: u64,
    check_id: u64,
}

/// `struct TopkJobs`: the kernels' one by-value argument (unused slots stay zero).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct TopkJobsArg {
    job: [TopkJobArg; MAX_JOBS],
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
        let maps = IndexMaps { row_map: maps.row_map, col_map: maps.col_map, full_shape: maps.full_shape };
        self.topk_coo_batch(&mut [TopkJob { m, rows, cols, k, maps, ws, out }])
    }

    fn topk_coo_batch<F: Real>(&self, jobs: &mut [TopkJob<'_, Cuda, F>]) -> Result<()> {
        require_f32::<F>(OP)?;
        // Every job is checked before anything is queued.
        let lens = jobs
            .iter()
            .map(|j| check_topk_coo(self, j.m, j.rows, j.cols, j.k, &j.maps, j.ws.max_len, j.out))
            .collect::<Result<Vec<usize>>>()?;
        let count = jobs.len();
        let mut args = Vec::with_capacity(count);
        for (i, (job, &n)) in jobs.iter_mut().zip(&lens).enumerate() {
            if let Some(arg) = self.prepare_job(i, count, job, n)? {
                args.push((arg, &mut *job.ws));
            }
        }
        for group in args.chunks_mut(MAX_JOBS) {
            let mut batch = TopkJobsArg::default();
            for (slot, (arg, _)) in batch.job.iter_mut().zip(group.iter()) {
                *slot = *arg;
            }
            // From here on the sequence of launches is fixed: nothing is read back (see
            // cuda/topk.cu), so the call can be captured in a CUDA graph.
            let launches = Launches { cuda: self, batch, jobs: group.len() };
            // Each pass (and the tile count after the last) first makes the previous pass's
            // choice of bin on the device.
            for pass in 0..3u32 {
                launches.hist_pass(pass)?;
            }
            launches.count_and_scan()?;
            // The first scatter's last block also finds the fill bound.
            launches.scatter(false)?;
            // The zero fill when k exceeds the nonzeros (its blocks only count themselves
            // done otherwise); its last block leaves the workspace zeroed for the next call.
            launches.scatter(true)?;
            for (_, ws) in group.iter_mut() {
                ws.dirty = false;
            }
        }
        for job in jobs.iter_mut() {
            job.out.len = job.k;
        }
        Ok(())
    }
}

impl Cuda {
    /// Job `i` of `count` up to its selection: a dirty workspace cleared, the maps checked,
    /// the output emptied. Returns its launch arguments, or `None` for `k = 0` (nothing to
    /// select, but a non-finite matrix is still an error, as on the CPU).
    fn prepare_job<F: Real>(
        &self,
        i: usize,
        count: usize,
        job: &mut TopkJob<'_, Cuda, F>,
        n: usize,
    ) -> Result<Option<TopkJobArg>> {
        let (full_rows, full_cols) = job.maps.full_shape;
        let (row_map, col_map) = (map_ptr(job.maps.row_map), map_ptr(job.maps.col_map));
        let state = job.ws.buf.ptr();
        let hist = state + 8 * STATE_WORDS as u64;
        let tiles = hist + 8 * HIST_WORDS as u64;
        if job.ws.dirty {
            let one_block = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: topk_init(u64* state, u32* hist): writes the state words and the
            // 3 x 2048 bins that follow them in the workspace buffer.
            unsafe { self.launch(&TOPK_INIT, one_block, &mut kargs![state, hist], &[]) }?;
        }
        // Clean again only once the last kernel of a complete sequence is queued.
        job.ws.dirty = true;
        let err = self.errors.ptr();
        for (map, len, full, bit) in [(row_map, job.rows, full_rows, 1u64), (col_map, job.cols, full_cols, 2u64)] {
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
        job.out.shape = job.maps.full_shape;
        job.out.len = 0;
        let what = topk_matrix_name(i, count);
        if job.k == 0 {
            crate::backend::DenseOps::assert_finite(self, job.m, n, &what)?;
            job.ws.dirty = false;
            return Ok(None);
        }
        Ok(Some(TopkJobArg {
            m: job.m.ptr(),
            n: n as u64,
            rows: job.rows as u64,
            cols: job.cols as u64,
            k: job.k as u64,
            state,
            hist,
            tiles,
            row_map,
            col_map,
            full_cols: full_cols as u64,
            out_rows: job.out.rows.ptr_mut(),
            out_cols: job.out.cols.ptr_mut(),
            out_values: job.out.values.ptr_mut(),
            check_id: self.check_id(&what),
        }))
    }
}

/// The launches of one group of jobs (addresses already checked).
struct Launches<'a> {
    cuda: &'a Cuda,
    batch: TopkJobsArg,
    jobs: usize,
}

impl Launches<'_> {
    fn active(&self) -> &[TopkJobArg] {
        &self.batch.job[..self.jobs]
    }
    /// Entries over the group's jobs (the cost functions' size).
    fn total_n(&self) -> u64 {
        self.active().iter().map(|j| j.n).sum()
    }
    /// Compaction tiles over the group's jobs.
    fn total_tiles(&self) -> u64 {
        self.active().iter().map(|j| j.n.div_ceil(TILE as u64)).sum()
    }
    /// The largest job's entries (the grid's x extent follows it).
    fn max_n(&self) -> usize {
        self.active().iter().map(|j| j.n).max().unwrap_or(0) as usize
    }
    fn grid(&self, mut cfg: LaunchConfig) -> LaunchConfig {
        cfg.grid_dim.1 = self.jobs as u32;
        cfg
    }

    fn hist_pass(&self, pass: u32) -> Result<()> {
        let (n, jobs) = (self.total_n(), self.jobs as u64);
        let (batch, health) = (self.batch, self.cuda.errors.ptr());
        // SAFETY: topk_hist_f32(TopkJobs jobs, u32 pass, u64* health): block (x, j) reads
        // job j's m[..n] and previous pass's bins, adds into its pass's 2048 bins, block
        // (0, j) records the previous pass's choice in j's state words; pass 0 also adds into
        // state[2], writes state[9] and reports non-finite entries to the health block.
        unsafe {
            self.cuda.launch(
                &TOPK_HIST,
                self.grid(self.cuda.grid_1d(self.max_n(), HIST_PER_SM)),
                &mut kargs![batch, pass, health],
                &[n, jobs],
            )
        }
    }

    fn count_and_scan(&self) -> Result<()> {
        let (n, jobs, tiles) = (self.total_n(), self.jobs as u64, self.total_tiles());
        let cap = (self.cuda.sm_count * HIST_PER_SM) as usize;
        let grid = LaunchConfig {
            grid_dim: (self.max_n().div_ceil(TILE).clamp(1, cap) as u32, 1, 1),
            block_dim: (super::THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let batch = self.batch;
        // SAFETY: topk_tile_count_f32(TopkJobs jobs): block (x, j) reads job j's last pass's
        // bins and m[..n], block (0, j) writes its state[3..6]; its tiles strided over the
        // blocks, one word each, then its last block scans them in place and writes the
        // total to state[7]; each workspace holds ceil(max_len / 4096) >= ceil(n / 4096)
        // tile words.
        unsafe { self.cuda.launch(&TOPK_TILE_COUNT, self.grid(grid), &mut kargs![batch], &[n, jobs, tiles]) }
    }

    /// The regular compaction, or with `fill` the fill path's range and placement (a no-op
    /// on the device without a fill).
    fn scatter(&self, fill: bool) -> Result<()> {
        let (n, tiles) = (self.total_n(), self.total_tiles());
        let written: u64 = self.active().iter().map(|j| j.k).sum();
        let kernel = if fill { &TOPK_SCATTER_FILL } else { &TOPK_SCATTER };
        let batch = self.batch;
        // SAFETY: topk_scatter_f32 and topk_scatter_fill_f32 (TopkJobs jobs): block (x, j)
        // writes at most k_j distinct positions below k_j of job j's output (capacity
        // checked; the fill range ends at L* <= k_j - 1), reading tile x only if job j has it;
        // the maps (or null) hold rows / cols entries, searched only within them; every
        // block adds to its job's state[16]; the first scatter's last block of a job reads
        // out[..nonzeros] and writes state[8], the fill scatter's zeroes the state words and
        // the 3 x 2048 bins.
        unsafe {
            self.cuda.launch(
                kernel,
                self.grid(Cuda::grid_tiles(self.max_n())),
                &mut kargs![batch],
                &[n, written, tiles],
            )
        }
    }
}
