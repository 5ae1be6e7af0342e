//! CPU sparse-by-dense ops: nonzero row/column detection, row and block gathers, and the
//! COO helpers (scatter-add, row compaction, sparse-times-dense, densification, the
//! by-rows sparse-by-dense product).

use super::{Cpu, CpuBuf};
use crate::backend::ops::sparse::*;
use crate::backend::{Coo, NonzeroBlock};
use crate::error::{check_len, Error, Result};
use crate::scalar::{Elem, Real};
use half::bf16;
use rayon::prelude::*;

impl SparseOps for Cpu {
    fn nonzero_rows_cols<F: Real>(
        &self,
        m: &CpuBuf<F>,
        rows: usize,
        cols: usize,
        threshold_rel: F,
        row_idx: &mut CpuBuf<u32>,
        col_idx: &mut CpuBuf<u32>,
    ) -> Result<NonzeroBlock<F>> {
        let n = check_nonzero_rows_cols(self, m, rows, cols, threshold_rel, row_idx, col_idx)?;
        let m = &m[..n];
        let max_abs = m.par_iter().map(|v| v.abs()).reduce(|| F::ZERO, |a, b| a.max(b));
        let t = threshold_rel * max_abs;
        let kept = |v: F| v != F::ZERO && v.abs() >= t;
        let row_flags: Vec<bool> = if cols == 0 {
            vec![false; rows]
        } else {
            m.par_chunks(cols).map(|r| r.iter().any(|&v| kept(v))).collect()
        };
        let col_flags = if cols == 0 {
            Vec::new()
        } else {
            m.par_chunks(cols)
                .fold(
                    || vec![false; cols],
                    |mut acc, row| {
                        acc.iter_mut().zip(row).for_each(|(a, &v)| *a |= kept(v));
                        acc
                    },
                )
                .reduce(|| vec![false; cols], |a, b| a.iter().zip(&b).map(|(x, y)| *x | *y).collect())
        };
        let n_rows = compact(&row_flags, row_idx);
        let n_cols = compact(&col_flags, col_idx);
        Ok(NonzeroBlock { n_rows, n_cols, abs_threshold: t })
    }

    fn gather_rows<T: Elem>(
        &self,
        src: &CpuBuf<T>,
        src_rows: usize,
        cols: usize,
        row_idx: &CpuBuf<u32>,
        n_idx: usize,
        dst: &mut CpuBuf<T>,
    ) -> Result<()> {
        check_gather_rows(self, src, src_rows, cols, row_idx, n_idx, dst)?;
        check_indices("gather_rows", "row_idx", &row_idx[..n_idx], src_rows)?;
        if cols == 0 {
            return Ok(());
        }
        dst[..n_idx * cols].par_chunks_mut(cols).zip(&row_idx[..n_idx]).for_each(|(out, &r)| {
            out.copy_from_slice(&src[r as usize * cols..(r as usize + 1) * cols]);
        });
        Ok(())
    }

    fn gather_block<F: Real>(
        &self,
        src: &CpuBuf<F>,
        src_rows: usize,
        src_cols: usize,
        row_idx: &CpuBuf<u32>,
        n_rows: usize,
        col_idx: &CpuBuf<u32>,
        n_cols: usize,
        abs_threshold: F,
        dst: &mut CpuBuf<F>,
    ) -> Result<()> {
        check_gather_block(self, src, src_rows, src_cols, row_idx, n_rows, col_idx, n_cols, dst)?;
        check_indices("gather_block", "row_idx", &row_idx[..n_rows], src_rows)?;
        check_indices("gather_block", "col_idx", &col_idx[..n_cols], src_cols)?;
        if n_cols == 0 {
            return Ok(());
        }
        dst[..n_rows * n_cols].par_chunks_mut(n_cols).zip(&row_idx[..n_rows]).for_each(|(out, &r)| {
            let row = &src[r as usize * src_cols..(r as usize + 1) * src_cols];
            for (o, &c) in out.iter_mut().zip(&col_idx[..n_cols]) {
                let v = row[c as usize];
                *o = if v.abs() >= abs_threshold { v } else { F::ZERO };
            }
        });
        Ok(())
    }

    fn coo_scatter_add<F: Real>(&self, coo: &Coo<Cpu, F>, alpha: F, dense: &mut CpuBuf<F>) -> Result<()> {
        check_coo_scatter_add(self, coo, dense)?;
        check_coo_indices("coo_scatter_add", coo)?;
        let (_, cols) = coo.shape;
        for e in 0..coo.len {
            dense[coo.rows[e] as usize * cols + coo.cols[e] as usize] += alpha * coo.values[e];
        }
        Ok(())
    }

    fn zero_below<F: Real>(&self, m: &mut CpuBuf<F>, len: usize, threshold_rel: F) -> Result<()> {
        check_zero_below(self, m, len, threshold_rel)?;
        let m = &mut m[..len];
        // The same maximum and threshold as nonzero_rows_cols (NaN ignored by `max`).
        let t = threshold_rel * m.par_iter().map(|v| v.abs()).reduce(|| F::ZERO, |a, b| a.max(b));
        m.par_iter_mut().filter(|v| v.abs() < t).for_each(|v| *v = F::ZERO);
        Ok(())
    }

    fn coo_compact_rows<F: Real>(
        &self,
        coo: &Coo<Cpu, F>,
        unique_rows: &mut CpuBuf<u32>,
        slot: &mut CpuBuf<u32>,
    ) -> Result<usize> {
        check_coo_compact_rows(self, coo, slot)?;
        check_coo_indices("coo_compact_rows", coo)?;
        let mut n = 0usize;
        for (e, &r) in coo.rows[..coo.len].iter().enumerate() {
            if n == 0 || unique_rows[n - 1] != r {
                if n > 0 && unique_rows[n - 1] > r {
                    return Err(Error::invalid("coo_compact_rows", "COO rows are not sorted"));
                }
                check_len("coo_compact_rows", "unique_rows", unique_rows.len(), n + 1)?;
                unique_rows[n] = r;
                n += 1;
            }
            slot[e] = (n - 1) as u32;
        }
        Ok(n)
    }

    fn coo_dense_t<F: Real>(
        &self,
        coo: &Coo<Cpu, F>,
        slot: &CpuBuf<u32>,
        n_slots: usize,
        b: &CpuBuf<F>,
        b_rows: usize,
        out: &mut CpuBuf<F>,
    ) -> Result<()> {
        check_coo_dense_t(self, coo, slot, n_slots, b, b_rows, out)?;
        check_coo_indices("coo_dense_t", coo)?;
        check_indices("coo_dense_t", "slot", &slot[..coo.len], n_slots)?;
        let b_cols = coo.shape.1;
        if n_slots == 0 {
            return Ok(());
        }
        let (cols, values, slot) = (&coo.cols[..coo.len], &coo.values[..coo.len], &slot[..coo.len]);
        // Each task takes COO_DENSE_T_ROWS rows of `b`: every entry then feeds that many
        // independent sums (one row at a time, consecutive entries of a slot would each wait
        // for the previous add). Every output element sums its entries in list order from
        // zero, as the row-at-a-time loop does, so the result is the same bit for bit.
        let block = COO_DENSE_T_ROWS * n_slots;
        let slot_sorted = slot.windows(2).all(|w| w[0] <= w[1]);
        out[..b_rows * n_slots].par_chunks_mut(block).enumerate().for_each(|(blk, out_blk)| {
            let rows = out_blk.len() / n_slots;
            let b_blk = &b[blk * COO_DENSE_T_ROWS * b_cols..][..rows * b_cols];
            if rows == COO_DENSE_T_ROWS {
                if slot_sorted {
                    coo_dense_t_block(slot, cols, values, b_blk, b_cols, out_blk, n_slots);
                } else {
                    coo_dense_t_block_any(slot, cols, values, b_blk, b_cols, out_blk, n_slots);
                }
                return;
            }
            out_blk.fill(F::ZERO);
            for ((&s, &c), &v) in slot.iter().zip(cols).zip(values) {
                let (s, c) = (s as usize, c as usize);
                for j in 0..rows {
                    out_blk[j * n_slots + s] += v * b_blk[j * b_cols + c];
                }
            }
        });
        Ok(())
    }

    fn coo_densify<F: Real>(&self, coo: &Coo<Cpu, F>, dense: &mut CpuBuf<F>) -> Result<()> {
        densify(self, "coo_densify", coo, dense, |v| v)
    }

    fn coo_densify_bf16<F: Real>(&self, coo: &Coo<Cpu, F>, dense: &mut CpuBuf<bf16>) -> Result<()> {
        densify(self, "coo_densify_bf16", coo, dense, |v| v.to_bf16())
    }

    fn coo_mm<F: Real>(
        &self,
        coo: &Coo<Cpu, F>,
        row_starts: &mut CpuBuf<u32>,
        b: &CpuBuf<F>,
        b_cols: usize,
        out: &mut CpuBuf<F>,
    ) -> Result<()> {
        const OP: &str = "coo_mm";
        check_coo_mm(self, coo, row_starts, b, b_cols, out)?;
        check_coo_sorted(OP, coo)?;
        let (rows, len) = (coo.shape.0, coo.len);
        // row_starts[r]: the first entry of row r or later (a lower bound, as the kernel's).
        let mut e = 0;
        for (r, start) in row_starts[..=rows].iter_mut().enumerate() {
            while e < len && (coo.rows[e] as usize) < r {
                e += 1;
            }
            *start = e as u32;
        }
        if b_cols == 0 {
            return Ok(());
        }
        let (starts, cols, values) = (&row_starts[..=rows], &coo.cols[..len], &coo.values[..len]);
        out[..rows * b_cols].par_chunks_mut(b_cols).enumerate().for_each(|(r, out_row)| {
            out_row.fill(F::ZERO);
            for e in starts[r] as usize..starts[r + 1] as usize {
                let (v, b_row) = (values[e], &b[cols[e] as usize * b_cols..][..b_cols]);
                for (o, &q) in out_row.iter_mut().zip(b_row) {
                    *o += v * q;
                }
            }
        });
        Ok(())
    }
}

fn compact(flags: &[bool], out: &mut [u32]) -> usize {
    let mut n = 0;
    for (i, _) in flags.iter().enumerate().filter(|(_, &f)| f) {
        out[n] = i as u32;
        n += 1;
    }
    n
}

fn check_indices(op: &'static str, what: &str, idx: &[u32], bound: usize) -> Result<()> {
    if let Some((i, &v)) = idx.iter().enumerate().find(|(_, &v)| v as usize >= bound) {
        return Err(Error::invalid(op, format!("{what}[{i}] = {v} out of range 0..{bound}")));
    }
    Ok(())
}

/// Zeroes `dense` (the COO's matrix) and stores each entry's `convert(value)`.
fn densify<F: Real, T: Elem>(
    cpu: &Cpu,
    op: &'static str,
    coo: &Coo<Cpu, F>,
    dense: &mut CpuBuf<T>,
    convert: impl Fn(F) -> T,
) -> Result<()> {
    let n = check_coo_densify(cpu, op, coo, dense)?;
    check_coo_sorted(op, coo)?;
    dense[..n].fill(T::default());
    let cols = coo.shape.1;
    for e in 0..coo.len {
        dense[coo.rows[e] as usize * cols + coo.cols[e] as usize] = convert(coo.values[e]);
    }
    Ok(())
}

/// The entries lie inside the matrix and are strictly ascending by linear index.
pub(super) fn check_coo_sorted<F: Real>(op: &'static str, coo: &Coo<Cpu, F>) -> Result<()> {
    check_coo_indices(op, coo)?;
    let cols = coo.shape.1 as u64;
    let lin = |e: usize| coo.rows[e] as u64 * cols + coo.cols[e] as u64;
    if let Some(e) = (1..coo.len).find(|&e| lin(e - 1) >= lin(e)) {
        return Err(Error::invalid(op, format!("COO entry {e} is not after entry {} in linear order", e - 1)));
    }
    Ok(())
}

/// The entries of a COO list lie inside its matrix (the host reads them).
fn check_coo_indices<F: Real>(op: &'static str, coo: &Coo<Cpu, F>) -> Result<()> {
    check_indices(op, "coo.rows", &coo.rows[..coo.len], coo.shape.0)?;
    check_indices(op, "coo.cols", &coo.cols[..coo.len], coo.shape.1)
}

/// One full block of [`SparseOps::coo_dense_t`] for slots in ascending order (what
/// `coo_compact_rows` gives): each slot's entries are one run, summed in registers for
/// all the block's rows at once and stored once. The block's rows of `b` are first copied
/// column-major into this thread's scratch, so an entry reads its `R` values as one
/// contiguous vector rather than `R` loads a row apart (a 3072-wide `Q` made those
/// gathers most of the merged step's non-GEMM time).
fn coo_dense_t_block<F: Real>(
    slot: &[u32],
    cols: &[u32],
    values: &[F],
    b_blk: &[F],
    b_cols: usize,
    out_blk: &mut [F],
    n_slots: usize,
) {
    const R: usize = COO_DENSE_T_ROWS;
    F::with_thread_scratch(R * b_cols, |tile| {
        transpose_rows(b_blk, b_cols, tile);
        out_blk.fill(F::ZERO);
        let mut e = 0;
        while e < slot.len() {
            let s = slot[e];
            let mut acc = [F::ZERO; R];
            while e < slot.len() && slot[e] == s {
                let (c, v) = (cols[e] as usize, values[e]);
                for (a, &q) in acc.iter_mut().zip(&tile[c * R..(c + 1) * R]) {
                    *a += v * q;
                }
                e += 1;
            }
            for (j, a) in acc.into_iter().enumerate() {
                out_blk[j * n_slots + s as usize] = a;
            }
        }
    })
}

/// One full block of [`SparseOps::coo_dense_t`] for slots in any order (the merged update by columns
/// passes `D^T`, whose slots are the columns of `D`): the block's rows of `b` and its
/// output are both held column-major in this thread's scratch, so every entry is one
/// contiguous `R`-vector multiply-add, summed in list order from zero as the row loop does.
fn coo_dense_t_block_any<F: Real>(
    slot: &[u32],
    cols: &[u32],
    values: &[F],
    b_blk: &[F],
    b_cols: usize,
    out_blk: &mut [F],
    n_slots: usize,
) {
    const R: usize = COO_DENSE_T_ROWS;
    F::with_thread_scratch(R * (b_cols + n_slots), |scratch| {
        let (tile, acc) = scratch.split_at_mut(R * b_cols);
        transpose_rows(b_blk, b_cols, tile);
        acc.fill(F::ZERO);
        for ((&s, &c), &v) in slot.iter().zip(cols).zip(values) {
            let (s, c) = (s as usize, c as usize);
            for (a, &q) in acc[s * R..(s + 1) * R].iter_mut().zip(&tile[c * R..(c + 1) * R]) {
                *a += v * q;
            }
        }
        for (j, out_row) in out_blk.chunks_exact_mut(n_slots).enumerate() {
            for (s, o) in out_row.iter_mut().enumerate() {
                *o = acc[s * R + j];
            }
        }
    })
}

/// A block's `R` rows of `b` (`R x b_cols`), column-major into `tile`: column `c` becomes
/// the contiguous `tile[c * R..(c + 1) * R]`.
fn transpose_rows<F: Real>(b_blk: &[F], b_cols: usize, tile: &mut [F]) {
    const R: usize = COO_DENSE_T_ROWS;
    for (j, row) in b_blk.chunks_exact(b_cols).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            tile[c * R + j] = v;
        }
    }
}

/// Rows of `b` per task of [`SparseOps::coo_dense_t`]: enough independent sums per entry to hide the
/// add latency, few enough that the block's rows of `b` stay in L1/L2 (16 x 768 columns =
/// 48 KiB).
const COO_DENSE_T_ROWS: usize = 16;
