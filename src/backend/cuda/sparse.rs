//! [`SparseOps`] for CUDA: the launchers of cuda/sparse.cu (nonzero rows/columns with their
//! compaction, row and block gathers, and the COO helpers), each after the op's shared
//! validator; index checks the CPU does on the host are done by the kernels (see the module
//! docs of `cuda`).

use super::{kargs, kernel, require_f32, Cuda, CudaBuf, THREADS, TILE};
use crate::backend::ops::sparse::*;
use crate::backend::{Coo, NonzeroBlock};
use crate::error::{check_len, Error, Result};
use crate::linear::sparsegrad::update_kernel_work as work;
use crate::scalar::{Elem, Real};
use cudarc::driver::LaunchConfig;
use half::bf16;

const PER_SM: u32 = 16;

// Costs (see `kernel!`): inputs read once, outputs written once.
kernel!(
    /// [n_tiles]: the tile counts read and written in place by one block.
    SCAN_TILES = "sparse" / "scan_tiles_u64", TopkSparse, |a| (16 * a[0] + 8, a[0])
);
kernel!(
    /// [n]: the u32 flags read, one u64 per tile written.
    FLAGS_TILE_COUNT = "sparse" / "flags_tile_count", TopkSparse, |a| (4 * a[0] + 8 * a[0].div_ceil(TILE as u64), a[0])
);
kernel!(
    /// [n]: the flags read again, the tile offsets read, one u32 index per set flag written
    /// (at most n).
    FLAGS_TILE_SCATTER = "sparse" / "flags_tile_scatter", TopkSparse, |a| (8 * a[0] + 8 * a[0].div_ceil(TILE as u64), a[0])
);
kernel!(
    /// [n]: m read, one word updated.
    MAX_ABS = "sparse" / "max_abs_f32", TopkSparse, |a| (4 * a[0], a[0])
);
kernel!(
    /// [n]: m read, the entries below the threshold written.
    ZERO_BELOW = "sparse" / "zero_below_f32", TopkSparse, |a| (8 * a[0], a[0])
);
kernel!(
    /// [rows, cols]: m read, row and column flags written.
    NONZERO_FLAGS = "sparse" / "nonzero_flags_f32", TopkSparse, |a| (4 * a[0] * a[1] + 4 * (a[0] + a[1]), 2 * a[0] * a[1])
);
kernel!(
    /// [n_idx, row bytes]: the indices read, n_idx rows copied.
    GATHER_ROWS = "sparse" / ["gather_rows_f32", "gather_rows_bf16", "gather_rows_u8"], TopkSparse,
    |a| (4 * a[0] + 2 * a[0] * a[1], 0)
);
kernel!(
    /// [n_rows, n_cols]: the indices read, the block read (scattered) and written.
    GATHER_BLOCK = "sparse" / "gather_block_f32", TopkSparse, |a| (4 * (a[0] + a[1]) + 8 * a[0] * a[1], a[0] * a[1])
);
kernel!(
    /// [len]: the COO entries read, one dense entry read and written per entry.
    COO_SCATTER_ADD = "sparse" / "coo_scatter_add_f32", TopkSparse, |a| (20 * a[0], 2 * a[0])
);
kernel!(
    /// [len]: rows and cols read, one u64 per tile written.
    COO_ROWS_TILE_COUNT = "sparse" / "coo_rows_tile_count", TopkSparse, |a| (8 * a[0] + 8 * a[0].div_ceil(TILE as u64), a[0])
);
kernel!(
    /// [len, unique rows capacity]: rows and tile offsets read, slots and the unique rows
    /// written.
    COO_ROWS_SCATTER = "sparse" / "coo_rows_scatter", TopkSparse, |a| (8 * a[0] + 4 * a[1] + 8 * a[0].div_ceil(TILE as u64), a[0])
);
kernel!(
    /// [len, b_rows]: per COO entry its column of `b` read and one output column updated by
    /// an atomic add per row of `b` (read and written): the scattered update issue 18 removes.
    COO_DENSE_T = "sparse" / "coo_dense_t_f32", TopkSparse, |a| (16 * a[0] + 12 * a[0] * a[1], 2 * a[0] * a[1])
);

kernel!(
    /// [len, element bytes]: see `update_kernel_work::coo_densify` (the zeroing memset is its
    /// own ledger event).
    COO_DENSIFY = "sparse" / ["coo_densify_f32", "coo_densify_bf16"], TopkSparse, |a| work::coo_densify(a[0], a[1])
);
kernel!(
    /// [len, n_rows]: see `update_kernel_work::coo_row_starts`.
    COO_ROW_STARTS = "sparse" / "coo_row_starts", TopkSparse, |a| work::coo_row_starts(a[0], a[1])
);
kernel!(
    /// [len, n_rows, b_cols]: see `update_kernel_work::coo_mm`.
    COO_MM = "sparse" / "coo_mm_f32", TopkSparse, |a| work::coo_mm(a[0], a[1], a[2], 4)
);

/// Zeroes `dense` (`n` elements of `T`) and stores the COO entries into it with `kernel`.
fn densify<F: Real, T>(
    cuda: &Cuda,
    kernel: &'static crate::perf::KernelCost,
    coo: &Coo<Cuda, F>,
    dense: &mut CudaBuf<T>,
    n: usize,
) -> Result<()> {
    let elem = std::mem::size_of::<T>();
    cuda.memset_zero(dense.ptr_mut(), n * elem)?;
    if coo.len == 0 {
        return Ok(());
    }
    let (rp, cp, vp, len) = (coo.rows.ptr(), coo.cols.ptr(), coo.values.ptr(), coo.len as u64);
    let (r, c, d, err) = (coo.shape.0 as u64, coo.shape.1 as u64, dense.ptr_mut(), cuda.errors.ptr());
    // SAFETY: coo_densify_{f32,bf16}(const u32* rows, const u32* cols, const float* values,
    // u64 len, u64 n_rows, u64 n_cols, T* dense, u32* err): the COO buffers hold len entries
    // and dense n_rows * n_cols elements of T (checked by the validator); entries outside
    // the matrix are skipped.
    unsafe {
        cuda.launch(
            kernel,
            cuda.grid_1d(coo.len, PER_SM),
            &mut kargs![rp, cp, vp, len, r, c, d, err],
            &[len, elem as u64],
        )
    }
}

/// Exclusive scan of `n_tiles` u64 tile counts at `tiles`, in place; the sum goes to `total`.
pub(super) fn scan_tiles(cuda: &Cuda, tiles: u64, n_tiles: usize, total: u64) -> Result<()> {
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
    let n = n_tiles as u64;
    // SAFETY: scan_tiles_u64(u64* tiles, u64 n_tiles, u64* total): `tiles` holds n_tiles
    // words and `total` one (callers carve both from scratch or workspace buffers).
    unsafe { cuda.launch(&SCAN_TILES, cfg, &mut kargs![tiles, n, total], &[n]) }
}

/// Ascending indices of the nonzero u32 flags at `flags[..n]` into `out`; count to `total`.
/// `tiles` must hold `n.div_ceil(TILE)` words, `out` at least the number of set flags.
fn compact_flags(cuda: &Cuda, flags: u64, n: usize, tiles: u64, total: u64, out: u64) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let cfg = Cuda::grid_tiles(n);
    let n64 = n as u64;
    // SAFETY: flags_tile_count(const u32* flags, u64 n, u64* tiles): one block per tile,
    // reads flags[..n], writes tiles[..n_tiles].
    unsafe { cuda.launch(&FLAGS_TILE_COUNT, cfg, &mut kargs![flags, n64, tiles], &[n64]) }?;
    scan_tiles(cuda, tiles, n.div_ceil(TILE), total)?;
    // SAFETY: flags_tile_scatter(const u32* flags, u64 n, const u64* tiles, u32* out): writes
    // one index per set flag, at most n, and `out` holds n elements (callers check).
    unsafe { cuda.launch(&FLAGS_TILE_SCATTER, cfg, &mut kargs![flags, n64, tiles, out], &[n64]) }
}

impl SparseOps for Cuda {
    fn nonzero_rows_cols<F: Real>(
        &self,
        m: &CudaBuf<F>,
        rows: usize,
        cols: usize,
        threshold_rel: F,
        row_idx: &mut CudaBuf<u32>,
        col_idx: &mut CudaBuf<u32>,
    ) -> Result<NonzeroBlock<F>> {
        const OP: &str = "nonzero_rows_cols";
        require_f32::<F>(OP)?;
        let n = check_nonzero_rows_cols(self, m, rows, cols, threshold_rel, row_idx, col_idx)?;
        let rel = threshold_rel.to_f64() as f32;
        let mut scratch = self.lock_scratch();
        // status: [0] max |m| bits, [1] row count, [2] column count.
        let status = scratch.status.ptr();
        let (max_bits, n_rows_p, n_cols_p) = (status, status + 8, status + 16);
        // arena: row flags (u32), column flags (u32), row tiles (u64), column tiles (u64).
        let (rf_words, cf_words) = (rows.div_ceil(2), cols.div_ceil(2));
        let (rt_words, ct_words) = (rows.div_ceil(TILE), cols.div_ceil(TILE));
        let arena = self.arena(&mut scratch, rf_words + cf_words + rt_words + ct_words)?;
        let row_flags = arena;
        let col_flags = row_flags + 8 * rf_words as u64;
        let row_tiles = col_flags + 8 * cf_words as u64;
        let col_tiles = row_tiles + 8 * rt_words as u64;
        self.memset_zero(status, 3 * 8)?;
        self.memset_zero(arena, 8 * (rf_words + cf_words))?;
        if n > 0 {
            let n64 = n as u64;
            // SAFETY: max_abs_f32(const float* m, u64 n, u32* max_bits): m holds n elements.
            unsafe { self.launch(&MAX_ABS, self.grid_1d(n, PER_SM), &mut kargs![m.ptr(), n64, max_bits], &[n64]) }?;
            let cfg = self.grid_2d(rows, cols, THREADS, i32::MAX as u32);
            let (mp, r, c) = (m.ptr(), rows as u64, cols as u64);
            // SAFETY: nonzero_flags_f32(const float* m, u64 rows, u64 cols, const u32* max_bits,
            // float threshold_rel, u32* row_flags, u32* col_flags): grid.x * 256 >= cols (the
            // kernel does not stride columns); flags hold rows and cols words.
            unsafe {
                self.launch(&NONZERO_FLAGS, cfg, &mut kargs![mp, r, c, max_bits, rel, row_flags, col_flags], &[r, c])
            }?;
        }
        compact_flags(self, row_flags, rows, row_tiles, n_rows_p, row_idx.ptr_mut())?;
        compact_flags(self, col_flags, cols, col_tiles, n_cols_p, col_idx.ptr_mut())?;
        let mut out = [0u64; 3];
        self.read_device(status, &mut out)?;
        let max_abs = f32::from_bits(out[0] as u32);
        let t = rel * max_abs;
        Ok(NonzeroBlock { n_rows: out[1] as usize, n_cols: out[2] as usize, abs_threshold: F::from_f64(t as f64) })
    }

    fn gather_rows<T: Elem>(
        &self,
        src: &CudaBuf<T>,
        src_rows: usize,
        cols: usize,
        row_idx: &CudaBuf<u32>,
        n_idx: usize,
        dst: &mut CudaBuf<T>,
    ) -> Result<()> {
        const OP: &str = "gather_rows";
        let kernel = match (T::NAME, std::mem::size_of::<T>()) {
            ("f64", _) => return Err(Error::UnsupportedDtype { op: OP, dtype: T::NAME, backend: "cuda" }),
            (_, 4) => &GATHER_ROWS[0],
            (_, 2) => &GATHER_ROWS[1],
            (_, 1) => &GATHER_ROWS[2],
            _ => return Err(Error::UnsupportedDtype { op: OP, dtype: T::NAME, backend: "cuda" }),
        };
        check_gather_rows(self, src, src_rows, cols, row_idx, n_idx, dst)?;
        if n_idx == 0 || cols == 0 {
            return Ok(());
        }
        let cfg = self.grid_2d(n_idx, cols, THREADS, 1024);
        let (s, sr, c, ri, ni, d, err) =
            (src.ptr(), src_rows as u64, cols as u64, row_idx.ptr(), n_idx as u64, dst.ptr_mut(), self.errors.ptr());
        // SAFETY: gather_rows_*(const T* src, u64 src_rows, u64 cols, const u32* row_idx,
        // u64 n_idx, T* dst, u32* err) with T of size_of::<T>() bytes: src holds src_rows * cols,
        // dst n_idx * cols, row_idx n_idx elements; rows >= src_rows are not read (err bit set).
        let row_bytes = (cols * std::mem::size_of::<T>()) as u64;
        unsafe { self.launch(kernel, cfg, &mut kargs![s, sr, c, ri, ni, d, err], &[ni, row_bytes]) }
    }

    fn gather_block<F: Real>(
        &self,
        src: &CudaBuf<F>,
        src_rows: usize,
        src_cols: usize,
        row_idx: &CudaBuf<u32>,
        n_rows: usize,
        col_idx: &CudaBuf<u32>,
        n_cols: usize,
        abs_threshold: F,
        dst: &mut CudaBuf<F>,
    ) -> Result<()> {
        const OP: &str = "gather_block";
        require_f32::<F>(OP)?;
        check_gather_block(self, src, src_rows, src_cols, row_idx, n_rows, col_idx, n_cols, dst)?;
        if n_rows == 0 || n_cols == 0 {
            return Ok(());
        }
        let cfg = self.grid_2d(n_rows, n_cols, THREADS, 1024);
        let (s, sr, sc, ri, nr) = (src.ptr(), src_rows as u64, src_cols as u64, row_idx.ptr(), n_rows as u64);
        let (ci, nc, t, d, err) =
            (col_idx.ptr(), n_cols as u64, abs_threshold.to_f64() as f32, dst.ptr_mut(), self.errors.ptr());
        // SAFETY: gather_block_f32(const float* src, u64 src_rows, u64 src_cols, const u32*
        // row_idx, u64 n_rows, const u32* col_idx, u64 n_cols, float abs_threshold, float* dst,
        // u32* err): buffers checked above; out-of-range indices are not read (err bit set).
        unsafe { self.launch(&GATHER_BLOCK, cfg, &mut kargs![s, sr, sc, ri, nr, ci, nc, t, d, err], &[nr, nc]) }
    }

    fn coo_scatter_add<F: Real>(&self, coo: &Coo<Cuda, F>, alpha: F, dense: &mut CudaBuf<F>) -> Result<()> {
        const OP: &str = "coo_scatter_add";
        require_f32::<F>(OP)?;
        check_coo_scatter_add(self, coo, dense)?;
        let (rows, cols) = coo.shape;
        if coo.len == 0 {
            return Ok(());
        }
        let (rp, cp, vp, len) = (coo.rows.ptr(), coo.cols.ptr(), coo.values.ptr(), coo.len as u64);
        let (r, c, a, d, err) = (rows as u64, cols as u64, alpha.to_f64() as f32, dense.ptr_mut(), self.errors.ptr());
        // SAFETY: coo_scatter_add_f32(const u32* rows, const u32* cols, const float* values,
        // u64 len, u64 n_rows, u64 n_cols, float alpha, float* dense, u32* err): the COO buffers
        // hold len entries, dense rows * cols; entries outside the matrix are skipped.
        unsafe {
            self.launch(
                &COO_SCATTER_ADD,
                self.grid_1d(coo.len, PER_SM),
                &mut kargs![rp, cp, vp, len, r, c, a, d, err],
                &[len],
            )
        }
    }

    fn zero_below<F: Real>(&self, m: &mut CudaBuf<F>, len: usize, threshold_rel: F) -> Result<()> {
        const OP: &str = "zero_below";
        require_f32::<F>(OP)?;
        check_zero_below(self, m, len, threshold_rel)?;
        if len == 0 {
            return Ok(());
        }
        let scratch = self.lock_scratch();
        let max_bits = scratch.status.ptr();
        self.memset_zero(max_bits, 4)?;
        let (mp, n, rel) = (m.ptr_mut(), len as u64, threshold_rel.to_f64() as f32);
        let cfg = self.grid_1d(len, PER_SM);
        // SAFETY: max_abs_f32(const float* m, u64 n, u32* max_bits): m holds n elements,
        // max_bits one word of the status block.
        unsafe { self.launch(&MAX_ABS, cfg, &mut kargs![mp, n, max_bits], &[n]) }?;
        // SAFETY: zero_below_f32(float* m, u64 n, const u32* max_bits, float threshold_rel):
        // m holds n elements; max_bits was written above (ordered on the one stream).
        unsafe { self.launch(&ZERO_BELOW, cfg, &mut kargs![mp, n, max_bits, rel], &[n]) }
    }

    fn coo_compact_rows<F: Real>(
        &self,
        coo: &Coo<Cuda, F>,
        unique_rows: &mut CudaBuf<u32>,
        slot: &mut CudaBuf<u32>,
    ) -> Result<usize> {
        const OP: &str = "coo_compact_rows";
        require_f32::<F>(OP)?;
        check_coo_compact_rows(self, coo, slot)?;
        if coo.len == 0 {
            return Ok(0);
        }
        let mut scratch = self.lock_scratch();
        // status: [0] number of distinct rows, [1] error bits (SG_COMPACT_* in sparse.cu).
        let status = scratch.status.ptr();
        let n_tiles = coo.len.div_ceil(TILE);
        let tiles = self.arena(&mut scratch, n_tiles)?;
        self.memset_zero(status, 2 * 8)?;
        let cfg = Cuda::grid_tiles(coo.len);
        let (rp, cp, len, nr, nc) =
            (coo.rows.ptr(), coo.cols.ptr(), coo.len as u64, coo.shape.0 as u64, coo.shape.1 as u64);
        // SAFETY: coo_rows_tile_count(const u32* rows, const u32* cols, u64 len, u64 n_rows,
        // u64 n_cols, u64* tiles, u64* status): reads len entries, writes n_tiles words and
        // status[1].
        unsafe { self.launch(&COO_ROWS_TILE_COUNT, cfg, &mut kargs![rp, cp, len, nr, nc, tiles, status], &[len]) }?;
        scan_tiles(self, tiles, n_tiles, status)?;
        let (ur, cap, sp) = (unique_rows.ptr_mut(), unique_rows.len as u64, slot.ptr_mut());
        // SAFETY: coo_rows_scatter(const u32* rows, u64 len, const u64* tiles, u32* unique_rows,
        // u64 unique_cap, u32* slot, u64* status): writes slot[..len] (checked) and
        // unique_rows[..cap] only (larger positions set an error bit instead).
        unsafe { self.launch(&COO_ROWS_SCATTER, cfg, &mut kargs![rp, len, tiles, ur, cap, sp, status], &[len, cap]) }?;
        let mut out = [0u64; 2];
        self.read_device(status, &mut out)?;
        let (n, bits) = (out[0] as usize, out[1]);
        if bits & 2 != 0 {
            return Err(Error::invalid(OP, format!("a COO entry lies outside {}x{}", coo.shape.0, coo.shape.1)));
        }
        if bits & 1 != 0 {
            return Err(Error::invalid(OP, "COO rows are not sorted"));
        }
        check_len(OP, "unique_rows", unique_rows.len, n)?;
        Ok(n)
    }

    fn coo_dense_t<F: Real>(
        &self,
        coo: &Coo<Cuda, F>,
        slot: &CudaBuf<u32>,
        n_slots: usize,
        b: &CudaBuf<F>,
        b_rows: usize,
        out: &mut CudaBuf<F>,
    ) -> Result<()> {
        const OP: &str = "coo_dense_t";
        require_f32::<F>(OP)?;
        let out_len = check_coo_dense_t(self, coo, slot, n_slots, b, b_rows, out)?;
        let b_cols = coo.shape.1;
        self.memset_zero(out.ptr_mut(), out_len * std::mem::size_of::<f32>())?;
        if coo.len == 0 || b_rows == 0 {
            return Ok(());
        }
        const CHUNK: usize = super::consts::CDT_CHUNK;
        let gx = coo.len.div_ceil(CHUNK);
        let gy = (self.sm_count as usize * 8).div_ceil(gx).clamp(1, b_rows.min(65535));
        let cfg = LaunchConfig { grid_dim: (gx as u32, gy as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let (rp, cp, vp, sp, len) = (coo.rows.ptr(), coo.cols.ptr(), coo.values.ptr(), slot.ptr(), coo.len as u64);
        let (nr, bc, ns, bp, br) = (coo.shape.0 as u64, b_cols as u64, n_slots as u64, b.ptr(), b_rows as u64);
        let (op, err) = (out.ptr_mut(), self.errors.ptr());
        // SAFETY: coo_dense_t_f32(const u32* rows, const u32* cols, const float* values, const u32*
        // slot, u64 len, u64 n_rows, u64 b_cols, u64 n_slots, const float* b, u64 b_rows, float*
        // out, u32* err): COO and slot hold len entries, b b_rows * b_cols, out b_rows * n_slots;
        // entries with cols >= b_cols or slot >= n_slots are skipped. gx = ceil(len / 2048) blocks.
        unsafe {
            self.launch(&COO_DENSE_T, cfg, &mut kargs![rp, cp, vp, sp, len, nr, bc, ns, bp, br, op, err], &[len, br])
        }
    }

    fn coo_densify<F: Real>(&self, coo: &Coo<Cuda, F>, dense: &mut CudaBuf<F>) -> Result<()> {
        const OP: &str = "coo_densify";
        require_f32::<F>(OP)?;
        let n = check_coo_densify(self, OP, coo, dense)?;
        densify(self, &COO_DENSIFY[0], coo, dense, n)
    }

    fn coo_densify_bf16<F: Real>(&self, coo: &Coo<Cuda, F>, dense: &mut CudaBuf<bf16>) -> Result<()> {
        const OP: &str = "coo_densify_bf16";
        require_f32::<F>(OP)?;
        let n = check_coo_densify(self, OP, coo, dense)?;
        densify(self, &COO_DENSIFY[1], coo, dense, n)
    }

    fn coo_mm<F: Real>(
        &self,
        coo: &Coo<Cuda, F>,
        row_starts: &mut CudaBuf<u32>,
        b: &CudaBuf<F>,
        b_cols: usize,
        out: &mut CudaBuf<F>,
    ) -> Result<()> {
        const OP: &str = "coo_mm";
        require_f32::<F>(OP)?;
        check_coo_mm(self, coo, row_starts, b, b_cols, out)?;
        let (rows, cols) = coo.shape;
        let (rp, cp, vp, len) = (coo.rows.ptr(), coo.cols.ptr(), coo.values.ptr(), coo.len as u64);
        let (nr, nc, sp, err) = (rows as u64, cols as u64, row_starts.ptr_mut(), self.errors.ptr());
        // SAFETY: coo_row_starts(const u32* rows, const u32* cols, u64 len, u64 n_rows, u64
        // n_cols, u32* starts, u32* err): reads len COO entries, writes starts[..=n_rows]
        // (row_starts holds n_rows + 1, checked); every start lies in 0..=len.
        unsafe {
            self.launch(
                &COO_ROW_STARTS,
                self.grid_1d((rows + 1).max(coo.len), PER_SM),
                &mut kargs![rp, cp, len, nr, nc, sp, err],
                &[len, nr],
            )
        }?;
        if rows == 0 || b_cols == 0 {
            return Ok(());
        }
        let cfg = self.grid_2d(rows, b_cols, THREADS, 64);
        let (bp, bc, op) = (b.ptr(), b_cols as u64, out.ptr_mut());
        // SAFETY: coo_mm_f32(const u32* starts, const u32* cols, const float* values, u64
        // n_rows, u64 n_cols, const float* b, u64 b_cols, float* out): starts holds n_rows + 1
        // offsets into the len COO entries, b n_cols * b_cols and out n_rows * b_cols
        // elements (checked); columns >= n_cols are not read.
        unsafe { self.launch(&COO_MM, cfg, &mut kargs![sp, cp, vp, nr, nc, bp, bc, op], &[len, nr, bc]) }
    }
}
