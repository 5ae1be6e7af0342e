//! Top-k by magnitude into a sorted COO list (the selection step of SparseGrad), and its
//! validators.

use super::check_lens;
use super::sparse::check_u32_dim;
use crate::backend::{Backend, Buffers, Coo, IndexMaps};
use crate::error::{checked_mul, Error, Result};
use crate::scalar::{Elem, Real};

/// Top-k selection with a reusable workspace.
pub trait TopkOps: Buffers {
    /// Scratch space for [`TopkOps::topk_coo`], sized once by [`TopkOps::topk_workspace`].
    type TopkWorkspace: Send + Sync + 'static;

    /// Scratch for selecting from matrices of up to `max_len` entries.
    fn topk_workspace(&self, max_len: usize) -> Result<Self::TopkWorkspace>;
    /// Keeps the `k` entries of largest magnitude of the full matrix described by `maps`
    /// (the `(rows, cols)` block `m`, placed through the maps; entries outside the block
    /// are zero), ties to the lower full linear index, written to `out` sorted by linear
    /// index. Fails with [`Error::NonFinite`] if `m` holds NaN or infinity.
    #[allow(clippy::too_many_arguments)]
    fn topk_coo<F: Real>(
        &self,
        m: &Self::Buf<F>,
        rows: usize,
        cols: usize,
        k: usize,
        maps: &IndexMaps<'_, Self>,
        ws: &mut Self::TopkWorkspace,
        out: &mut Coo<Self, F>,
    ) -> Result<()>;
    /// [`Self::topk_coo`] of each job, each output exactly what that call alone would
    /// write. Every job's arguments are checked before any runs. A GPU selects for several
    /// matrices in one sequence of launches (the count of one selection, independent of the
    /// number of jobs up to 4). With several jobs, a non-finite matrix is reported as
    /// "matrix i of n passed to top-k selection" (`i` from 0); which of several bad
    /// matrices is reported is not specified.
    fn topk_coo_batch<F: Real>(&self, jobs: &mut [TopkJob<'_, Self, F>]) -> Result<()>;
}

/// One selection of [`TopkOps::topk_coo_batch`]: the arguments of one
/// [`TopkOps::topk_coo`]. Workspaces and outputs are borrowed mutably, so no two jobs share
/// either.
pub struct TopkJob<'a, B: TopkOps, F: Elem> {
    pub m: &'a B::Buf<F>,
    pub rows: usize,
    pub cols: usize,
    pub k: usize,
    pub maps: IndexMaps<'a, B>,
    pub ws: &'a mut B::TopkWorkspace,
    pub out: &'a mut Coo<B, F>,
}

impl<B: TopkOps, F: Elem> TopkJob<'_, B, F> {
    /// The same job, borrowed for a shorter time (to batch it with jobs that live less).
    pub fn reborrow(&mut self) -> TopkJob<'_, B, F> {
        TopkJob {
            m: self.m,
            rows: self.rows,
            cols: self.cols,
            k: self.k,
            maps: IndexMaps {
                row_map: self.maps.row_map,
                col_map: self.maps.col_map,
                full_shape: self.maps.full_shape,
            },
            ws: &mut *self.ws,
            out: &mut *self.out,
        }
    }
}

/// The name of job `i` of `count` in a finiteness error: the single selection's own name
/// when alone.
pub(crate) fn topk_matrix_name(i: usize, count: usize) -> String {
    if count == 1 {
        "matrix passed to top-k selection".to_string()
    } else {
        format!("matrix {i} of {count} passed to top-k selection")
    }
}

/// [`TopkOps::topk_workspace`]: entries are indexed with `u32`.
pub(crate) fn check_topk_workspace(max_len: usize) -> Result<()> {
    check_u32_dim("topk_workspace", "max_len", max_len)
}

/// One index map of [`TopkOps::topk_coo`]: `n` entries, or no map when the block spans the
/// full extent (its order and bounds are data, checked by the backend).
fn check_map<B: Backend>(be: &B, what: &str, map: Option<&B::Buf<u32>>, n: usize, full: usize) -> Result<()> {
    const OP: &str = "topk_coo";
    match map {
        Some(map) => check_lens(OP, &[(what, be.len(map), n)]),
        None if n != full => Err(Error::shape(OP, format!("{what} (no map given)"), full, n)),
        None => Ok(()),
    }
}

/// [`TopkOps::topk_coo`], with the workspace's capacity `ws_max_len`. Returns `rows * cols`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_topk_coo<B: Backend, F: Elem>(
    be: &B,
    m: &B::Buf<F>,
    rows: usize,
    cols: usize,
    k: usize,
    maps: &IndexMaps<'_, B>,
    ws_max_len: usize,
    out: &Coo<B, F>,
) -> Result<usize> {
    const OP: &str = "topk_coo";
    let n = checked_mul(OP, rows, cols)?;
    check_lens(OP, &[("m", be.len(m), n)])?;
    let (full_rows, full_cols) = maps.full_shape;
    check_map(be, "row_map", maps.row_map, rows, full_rows)?;
    check_map(be, "col_map", maps.col_map, cols, full_cols)?;
    let full_len = checked_mul(OP, full_rows, full_cols)?;
    if k > full_len {
        return Err(Error::invalid(
            OP,
            format!("k = {k} exceeds the {full_len} entries of a {full_rows}x{full_cols} matrix"),
        ));
    }
    if n > ws_max_len {
        return Err(Error::invalid(OP, format!("{n} entries exceed the workspace size {ws_max_len}")));
    }
    let capacity = out.capacity.min(be.len(&out.values)).min(be.len(&out.rows)).min(be.len(&out.cols));
    check_lens(OP, &[("out (capacity)", capacity, k)])?;
    if full_rows > u32::MAX as usize || full_cols > u32::MAX as usize {
        return Err(Error::invalid(OP, format!("a {full_rows}x{full_cols} matrix exceeds the u32 index range")));
    }
    Ok(n)
}
