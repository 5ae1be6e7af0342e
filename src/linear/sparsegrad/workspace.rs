//! Buffers a `SparseGradLinear` reuses every step. Token-dependent buffers are sized for
//! the largest token count seen so far and reallocated only when a larger batch arrives;
//! everything else is allocated once at construction.

use super::{Formulation, MergedUpdate, Selection};
use crate::backend::operand::Operand;
use crate::backend::Precision;
use crate::backend::{Backend, Coo};
use crate::error::Result;
use crate::scalar::Real;
use half::bf16;

pub(super) struct Workspace<B: Backend, F: Real> {
    formulation: Formulation,
    sparse_by_dense: bool,
    precision: Precision,
    out: usize,
    inp: usize,
    pub(super) tokens: usize,
    // ---- token-dependent ----
    /// Saved for backward: `xt` (transformed) or `x` (merged), in the operand precision.
    pub(super) saved: Operand<B, F>,
    /// bf16 copies of an input (x or g) and of `(tokens, in)` / `(tokens, out)` intermediates.
    pub(super) in_half: Option<B::Buf<bf16>>,
    pub(super) g_half: Option<B::Buf<bf16>>,
    pub(super) out_half: Option<B::Buf<bf16>>,
    /// `(tokens, in)` and `(tokens, out)` scratch in `F`.
    pub(super) tmp_in: B::Buf<F>,
    pub(super) tmp_out: B::Buf<F>,
    /// SparseByDense: nonzero token rows, the gathered `g`/`gt` block and `x`/`xt` rows.
    pub(super) row_idx: B::Buf<u32>,
    pub(super) block: B::Buf<F>,
    pub(super) block_op: Operand<B, F>,
    pub(super) rows_op: Operand<B, F>,
    // ---- fixed ----
    pub(super) col_idx: B::Buf<u32>,
    /// `(out, in)` products: `dWt` and, in the merged form, `dW`, `P^T dW`, and in the update
    /// `P D` (by columns), the dense `D` (Dense, f32) or `E = D Q^T` (Dense, Runs): backward
    /// is done with them by then.
    pub(super) big_a: B::Buf<F>,
    pub(super) big_b: Option<B::Buf<F>>,
    /// Merged bf16: an `(out, in)` bf16 staging buffer (`dW`, `P^T dW`, `D`, `E` in turn).
    pub(super) big_half: Option<B::Buf<bf16>>,
    pub(super) topk: B::TopkWorkspace,
    /// [`MergedUpdate::Dense`] and [`MergedUpdate::Runs`]: the step's change of each kept
    /// entry (`k` values; swapped into the gradient's COO for the update).
    pub(super) delta: Option<B::Buf<F>>,
    /// [`MergedUpdate::Runs`]: where each row's run of entries starts (`out + 1`).
    pub(super) row_starts: Option<B::Buf<u32>>,
    /// [`MergedUpdate::SparseRows`]: the change `D` of `Wt` as COO, its row compaction,
    /// `Q D^T` and the gathered `P^T` rows; [`MergedUpdate::SparseColumns`]: `D^T` as COO,
    /// `(in, out)`.
    pub(super) change: Option<Coo<B, F>>,
    pub(super) change_t: Option<Coo<B, F>>,
    pub(super) unique_rows: Option<B::Buf<u32>>,
    pub(super) slot: Option<B::Buf<u32>>,
    pub(super) et: Option<B::Buf<F>>,
    pub(super) pt_rows: Option<B::Buf<F>>,
}

fn opt<T>(cond: bool, f: impl FnOnce() -> Result<T>) -> Result<Option<T>> {
    if cond {
        f().map(Some)
    } else {
        Ok(None)
    }
}

impl<B: Backend, F: Real> Workspace<B, F> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        be: &B,
        formulation: Formulation,
        update: Option<MergedUpdate>,
        selection: Selection,
        precision: Precision,
        out: usize,
        inp: usize,
        k: usize,
    ) -> Result<Self> {
        let merged = formulation == Formulation::Merged;
        let by_rows = update == Some(MergedUpdate::SparseRows);
        let by_columns = update == Some(MergedUpdate::SparseColumns);
        let dense_or_runs = matches!(update, Some(MergedUpdate::Dense | MergedUpdate::Runs));
        let touched_rows = k.min(out);
        let half = precision == Precision::Bf16;
        let sparse_by_dense = matches!(selection, Selection::SparseByDense { .. });
        Ok(Workspace {
            formulation,
            sparse_by_dense,
            precision,
            out,
            inp,
            tokens: 0,
            saved: Operand::alloc(be, precision, 0)?,
            in_half: opt(half, || be.alloc(0))?,
            g_half: opt(half, || be.alloc(0))?,
            out_half: opt(half, || be.alloc(0))?,
            tmp_in: be.alloc(0)?,
            tmp_out: be.alloc(0)?,
            row_idx: be.alloc(0)?,
            block: be.alloc(0)?,
            block_op: Operand::alloc(be, precision, 0)?,
            rows_op: Operand::alloc(be, precision, 0)?,
            col_idx: be.alloc(out)?,
            big_a: be.alloc(out * inp)?,
            big_b: opt(merged, || be.alloc(out * inp))?,
            big_half: opt(merged && half, || be.alloc(out * inp))?,
            topk: be.topk_workspace(out * inp)?,
            delta: opt(dense_or_runs, || be.alloc(k))?,
            row_starts: opt(update == Some(MergedUpdate::Runs), || be.alloc(out + 1))?,
            change: opt(by_rows, || Coo::with_capacity(be, k, (out, inp)))?,
            change_t: opt(by_columns, || Coo::with_capacity(be, k, (inp, out)))?,
            unique_rows: opt(by_rows, || be.alloc(touched_rows))?,
            slot: opt(by_rows, || be.alloc(k))?,
            et: opt(by_rows, || be.alloc(inp * touched_rows))?,
            pt_rows: opt(by_rows, || be.alloc(touched_rows * out))?,
        })
    }

    /// Grows the token-dependent buffers to hold `tokens` rows.
    pub(super) fn ensure_tokens(&mut self, be: &B, tokens: usize) -> Result<()> {
        if tokens <= self.tokens {
            return Ok(());
        }
        let (out, inp, p) = (self.out, self.inp, self.precision);
        let half = p == Precision::Bf16;
        let transformed = self.formulation == Formulation::Transformed;
        self.saved = Operand::alloc(be, p, tokens * inp)?;
        // The merged form needs `in_half` and `out_half` only in its token order (grown there).
        self.in_half = opt(half, || be.alloc(if transformed { tokens * inp } else { 0 }))?;
        self.g_half = opt(half, || be.alloc(tokens * out))?;
        self.out_half = opt(half, || be.alloc(if transformed { tokens * out } else { 0 }))?;
        self.tmp_in = be.alloc(if transformed { tokens * inp } else { 0 })?;
        self.tmp_out = be.alloc(if transformed { tokens * out } else { 0 })?;
        let sd = self.sparse_by_dense;
        self.row_idx = be.alloc(if sd { tokens } else { 0 })?;
        self.block = be.alloc(if sd && transformed { tokens * out } else { 0 })?;
        self.block_op = Operand::alloc(be, p, if sd { tokens * out } else { 0 })?;
        self.rows_op = Operand::alloc(be, p, if sd { tokens * inp } else { 0 })?;
        self.tokens = tokens;
        Ok(())
    }
}
