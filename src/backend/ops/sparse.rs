//! Sparse-by-dense ops (paper section 3.3): the rows and columns of a thresholded matrix
//! that hold a nonzero, row and block gathers; and the COO helpers the merged update uses
//! (scatter-add, row compaction, sparse-times-dense, densification, sparse-by-rows times
//! dense); with the validator of each.

use super::{check_coo, check_lens};
use crate::backend::{Backend, Buffers, Coo, NonzeroBlock};
use crate::error::{checked_mul, Error, Result};
use crate::scalar::{Elem, Real};
use half::bf16;

/// Sparse-by-dense and COO ops. Index buffers are `u32`; an index out of range is an
/// [`Error::InvalidArgument`] (on CUDA reported at the next synchronization point).
pub trait SparseOps: Buffers {
    /// For a `(rows, cols)` matrix `m`, with `t = threshold_rel * max|m|`: writes the
    /// ascending indices of rows (into `row_idx`) and columns (into `col_idx`) holding an
    /// entry with `|v| >= t` and `v != 0`. Returns the counts and `t`.
    fn nonzero_rows_cols<F: Real>(
        &self,
        m: &Self::Buf<F>,
        rows: usize,
        cols: usize,
        threshold_rel: F,
        row_idx: &mut Self::Buf<u32>,
        col_idx: &mut Self::Buf<u32>,
    ) -> Result<NonzeroBlock<F>>;
    /// `dst[i, :] = src[row_idx[i], :]` for `i < n_idx`, rows of length `cols`.
    fn gather_rows<T: Elem>(
        &self,
        src: &Self::Buf<T>,
        src_rows: usize,
        cols: usize,
        row_idx: &Self::Buf<u32>,
        n_idx: usize,
        dst: &mut Self::Buf<T>,
    ) -> Result<()>;
    /// `dst[i, j] = v` where `v = src[row_idx[i], col_idx[j]]` if `|v| >= abs_threshold`,
    /// else 0; `dst` is `(n_rows, n_cols)`.
    #[allow(clippy::too_many_arguments)]
    fn gather_block<F: Real>(
        &self,
        src: &Self::Buf<F>,
        src_rows: usize,
        src_cols: usize,
        row_idx: &Self::Buf<u32>,
        n_rows: usize,
        col_idx: &Self::Buf<u32>,
        n_cols: usize,
        abs_threshold: F,
        dst: &mut Self::Buf<F>,
    ) -> Result<()>;
    /// `dense[r, c] += alpha * v` for every entry; `dense` has `coo.shape`.
    fn coo_scatter_add<F: Real>(&self, coo: &Coo<Self, F>, alpha: F, dense: &mut Self::Buf<F>) -> Result<()>;
    /// In place, `m[i] = 0` where `|m[i]| < t`, `t = threshold_rel * max|m[..len]|`: the
    /// entries [`SparseOps::nonzero_rows_cols`] and [`SparseOps::gather_block`] leave out,
    /// zeroed instead of compacted away, so the shapes after it do not depend on the data
    /// (the sparse-by-dense product of a captured CUDA step).
    fn zero_below<F: Real>(&self, m: &mut Self::Buf<F>, len: usize, threshold_rel: F) -> Result<()>;
    /// Distinct rows of a sorted COO list into `unique_rows` (ascending) and, per entry,
    /// the position of its row in that list into `slot`. Returns the number of rows.
    fn coo_compact_rows<F: Real>(
        &self,
        coo: &Coo<Self, F>,
        unique_rows: &mut Self::Buf<u32>,
        slot: &mut Self::Buf<u32>,
    ) -> Result<usize>;
    /// `out[i, s] = sum over entries e with slot[e] = s of values[e] * b[i, cols[e]]`, i.e.
    /// `out = B D^T` for the row-compacted sparse `D`. `b` is `(b_rows, coo.shape.1)`, `out` is
    /// `(b_rows, n_slots)`, overwritten.
    fn coo_dense_t<F: Real>(
        &self,
        coo: &Coo<Self, F>,
        slot: &Self::Buf<u32>,
        n_slots: usize,
        b: &Self::Buf<F>,
        b_rows: usize,
        out: &mut Self::Buf<F>,
    ) -> Result<()>;
    /// The COO list as a dense `coo.shape` matrix: `dense` is zeroed, then `dense[r, c] = v`
    /// for every entry. The entries must be distinct and sorted by linear index (as every
    /// COO list is), so each element is stored once: plain stores, no atomics, and the
    /// result does not depend on the order of the stores.
    fn coo_densify<F: Real>(&self, coo: &Coo<Self, F>, dense: &mut Self::Buf<F>) -> Result<()>;
    /// [`SparseOps::coo_densify`] into bf16 (each value rounded to nearest even).
    fn coo_densify_bf16<F: Real>(&self, coo: &Coo<Self, F>, dense: &mut Self::Buf<bf16>) -> Result<()>;
    /// `out = D B` for the sparse `D` (`coo.shape`, entries sorted by linear index) and `b`
    /// `(coo.shape.1, b_cols)`: `out[r, j] = sum of values[e] * b[cols[e], j]` over the run of
    /// entries of row `r`, in list order from zero (rows without entries are zero); `out`
    /// `(coo.shape.0, b_cols)` is overwritten. `row_starts` (at least `coo.shape.0 + 1`
    /// entries) receives where each row's run starts (`row_starts[shape.0] = len`).
    fn coo_mm<F: Real>(
        &self,
        coo: &Coo<Self, F>,
        row_starts: &mut Self::Buf<u32>,
        b: &Self::Buf<F>,
        b_cols: usize,
        out: &mut Self::Buf<F>,
    ) -> Result<()>;
}

/// Indices are `u32`: a dimension beyond that range cannot be indexed.
pub(crate) fn check_u32_dim(op: &'static str, what: &str, v: usize) -> Result<()> {
    if v > u32::MAX as usize {
        return Err(Error::invalid(op, format!("{what} = {v} exceeds the u32 index range")));
    }
    Ok(())
}

/// [`SparseOps::nonzero_rows_cols`]. Returns `rows * cols`.
pub(crate) fn check_nonzero_rows_cols<B: Backend, F: Real>(
    be: &B,
    m: &B::Buf<F>,
    rows: usize,
    cols: usize,
    threshold_rel: F,
    row_idx: &B::Buf<u32>,
    col_idx: &B::Buf<u32>,
) -> Result<usize> {
    const OP: &str = "nonzero_rows_cols";
    let n = checked_mul(OP, rows, cols)?;
    check_lens(OP, &[("m", be.len(m), n), ("row_idx", be.len(row_idx), rows), ("col_idx", be.len(col_idx), cols)])?;
    if !(threshold_rel >= F::ZERO && threshold_rel <= F::ONE) {
        return Err(Error::invalid(OP, format!("threshold {threshold_rel:?} outside [0, 1]")));
    }
    check_u32_dim(OP, "rows", rows)?;
    check_u32_dim(OP, "cols", cols)?;
    Ok(n)
}

/// [`SparseOps::zero_below`].
pub(crate) fn check_zero_below<B: Backend, F: Real>(be: &B, m: &B::Buf<F>, len: usize, threshold_rel: F) -> Result<()> {
    const OP: &str = "zero_below";
    check_lens(OP, &[("m", be.len(m), len)])?;
    if !(threshold_rel >= F::ZERO && threshold_rel <= F::ONE) {
        return Err(Error::invalid(OP, format!("threshold {threshold_rel:?} outside [0, 1]")));
    }
    Ok(())
}

/// [`SparseOps::gather_rows`] (the indices are data, checked by the backend).
pub(crate) fn check_gather_rows<B: Backend, T: Elem>(
    be: &B,
    src: &B::Buf<T>,
    src_rows: usize,
    cols: usize,
    row_idx: &B::Buf<u32>,
    n_idx: usize,
    dst: &B::Buf<T>,
) -> Result<()> {
    const OP: &str = "gather_rows";
    let (src_len, dst_len) = (checked_mul(OP, src_rows, cols)?, checked_mul(OP, n_idx, cols)?);
    check_lens(OP, &[("src", be.len(src), src_len), ("row_idx", be.len(row_idx), n_idx), ("dst", be.len(dst), dst_len)])
}

/// [`SparseOps::gather_block`] (the indices are data, checked by the backend).
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_gather_block<B: Backend, F: Elem>(
    be: &B,
    src: &B::Buf<F>,
    src_rows: usize,
    src_cols: usize,
    row_idx: &B::Buf<u32>,
    n_rows: usize,
    col_idx: &B::Buf<u32>,
    n_cols: usize,
    dst: &B::Buf<F>,
) -> Result<()> {
    const OP: &str = "gather_block";
    let (src_len, dst_len) = (checked_mul(OP, src_rows, src_cols)?, checked_mul(OP, n_rows, n_cols)?);
    check_lens(
        OP,
        &[
            ("src", be.len(src), src_len),
            ("row_idx", be.len(row_idx), n_rows),
            ("col_idx", be.len(col_idx), n_cols),
            ("dst", be.len(dst), dst_len),
        ],
    )
}

/// [`SparseOps::coo_scatter_add`] (entry bounds are data, checked by the backend).
pub(crate) fn check_coo_scatter_add<B: Backend, F: Elem>(be: &B, coo: &Coo<B, F>, dense: &B::Buf<F>) -> Result<()> {
    const OP: &str = "coo_scatter_add";
    let n = check_coo(be, OP, coo)?;
    check_lens(OP, &[("dense", be.len(dense), n)])
}

/// [`SparseOps::coo_compact_rows`]; `unique_rows` is checked once the count is known.
pub(crate) fn check_coo_compact_rows<B: Backend, F: Elem>(be: &B, coo: &Coo<B, F>, slot: &B::Buf<u32>) -> Result<()> {
    const OP: &str = "coo_compact_rows";
    check_coo(be, OP, coo)?;
    check_lens(OP, &[("slot", be.len(slot), coo.len)])
}

/// [`SparseOps::coo_dense_t`]: with no slots, any entry's slot is out of range. Returns the
/// output size `b_rows * n_slots`.
pub(crate) fn check_coo_dense_t<B: Backend, F: Elem>(
    be: &B,
    coo: &Coo<B, F>,
    slot: &B::Buf<u32>,
    n_slots: usize,
    b: &B::Buf<F>,
    b_rows: usize,
    out: &B::Buf<F>,
) -> Result<usize> {
    const OP: &str = "coo_dense_t";
    check_coo(be, OP, coo)?;
    check_lens(OP, &[("slot", be.len(slot), coo.len)])?;
    if n_slots == 0 && coo.len > 0 {
        return Err(Error::invalid(OP, "slot[0] out of range 0..0"));
    }
    let (b_len, out_len) = (checked_mul(OP, b_rows, coo.shape.1)?, checked_mul(OP, b_rows, n_slots)?);
    check_lens(OP, &[("b", be.len(b), b_len), ("out", be.len(out), out_len)])?;
    Ok(out_len)
}

/// [`SparseOps::coo_densify`] and [`SparseOps::coo_densify_bf16`] (entry bounds and order are
/// data, checked by the backend). Returns the matrix size.
pub(crate) fn check_coo_densify<B: Backend, F: Elem, T: Elem>(
    be: &B,
    op: &'static str,
    coo: &Coo<B, F>,
    dense: &B::Buf<T>,
) -> Result<usize> {
    let n = check_coo(be, op, coo)?;
    check_lens(op, &[("dense", be.len(dense), n)])?;
    Ok(n)
}

/// [`SparseOps::coo_mm`] (entry bounds and order are data, checked by the backend). Row
/// starts are u32, so the list must hold at most `u32::MAX` entries.
pub(crate) fn check_coo_mm<B: Backend, F: Elem>(
    be: &B,
    coo: &Coo<B, F>,
    row_starts: &B::Buf<u32>,
    b: &B::Buf<F>,
    b_cols: usize,
    out: &B::Buf<F>,
) -> Result<()> {
    const OP: &str = "coo_mm";
    check_coo(be, OP, coo)?;
    check_u32_dim(OP, "coo.len", coo.len)?;
    let (rows, cols) = coo.shape;
    let starts = rows.checked_add(1).ok_or_else(|| Error::invalid(OP, "shape.0 + 1 overflows"))?;
    let (b_len, out_len) = (checked_mul(OP, cols, b_cols)?, checked_mul(OP, rows, b_cols)?);
    check_lens(
        OP,
        &[("row_starts", be.len(row_starts), starts), ("b", be.len(b), b_len), ("out", be.len(out), out_len)],
    )
}
