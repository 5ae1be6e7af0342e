//! Buffers a `SparseGradLinear` reuses every step, in two parts:
//!
//! - [`Workspace`]: what a layer keeps between calls (the input saved for backward, the
//!   top-k state, the update's COO lists and index buffers), its own;
//! - [`SparseGradScratch`]: the large scratch that lives only inside one forward, backward
//!   or step (the `(out, in)` products, the token-sized rotated inputs and gradients, their
//!   bf16 stagings, SparseByDense's gathered blocks). One scratch can serve every layer of a
//!   model ([`SharedScratch`]): a call borrows it for its duration, grown to what that layer
//!   needs ([`ScratchLengths`]), so a model holds one set sized for its largest layer
//!   instead of one per projection (12 GB of LLaMA-2-7B's paper setting).
//!
//! Every buffer is grown when a call needs more than it holds and never shrunk, so the
//! first step allocates and the later ones do not.

use super::{Formulation, MergedUpdate, Selection};
use crate::backend::operand::{grow, Operand};
use crate::backend::Precision;
use crate::backend::{Backend, Coo};
use crate::error::{Error, Result};
use crate::scalar::Real;
use half::bf16;
use std::sync::{Arc, Mutex, PoisonError};

/// Elements of each scratch buffer one layer's call needs (0: not used by this layer).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScratchLengths {
    /// bf16 stagings: of the input (or `(tokens, in)` intermediates), of `g`, of
    /// `(tokens, out)` intermediates.
    pub in_half: usize,
    pub g_half: usize,
    pub out_half: usize,
    /// `(tokens, in)` and `(tokens, out)` scratch in `F`.
    pub tmp_in: usize,
    pub tmp_out: usize,
    /// SparseByDense: nonzero token rows (u32), the gathered `gt` block in `F`, and the
    /// gathered block and rows in the operand precision.
    pub row_idx: usize,
    pub block: usize,
    pub block_op: usize,
    pub rows_op: usize,
    /// `(out, in)` products in `F` (`big_b` merged only) and their bf16 staging.
    pub big_a: usize,
    pub big_b: usize,
    pub big_half: usize,
    /// bf16 merged layers: `P^T dW` beside `dW` in `big_half` (the backward by `dW` first),
    /// and `E = D Q^T` beside `D` (the dense merged update).
    pub big_half_b: usize,
    /// [`MergedUpdate::SparseRows`]: `Q D^T` over the touched rows and the gathered `P^T` rows.
    pub et: usize,
    pub pt_rows: usize,
}

fn mul(a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| Error::invalid("SparseGrad workspace", format!("{a} x {b} elements overflow")))
}

impl ScratchLengths {
    /// What a layer of shape `(out, in)` needs for a call on `tokens` rows (0 for a step,
    /// which uses only the `(out, in)` part).
    #[allow(clippy::too_many_arguments)]
    pub fn of(
        formulation: Formulation,
        update: Option<MergedUpdate>,
        selection: Selection,
        precision: Precision,
        out: usize,
        inp: usize,
        k: usize,
        tokens: usize,
    ) -> Result<Self> {
        let merged = formulation == Formulation::Merged;
        let transformed = !merged;
        let half = precision == Precision::Bf16;
        let sd = matches!(selection, Selection::SparseByDense { .. });
        let by_rows = update == Some(MergedUpdate::SparseRows);
        // The merged backward in token order rotates g and x first (see `backward_merged`).
        let rotated = transformed
            || (tokens > 0 && selection == Selection::Exact && Formulation::merged_token_order(out, inp, tokens));
        // The merged backward by `dW = g^T x` first (not in token order).
        let dw_first = merged && tokens > 0 && !rotated;
        let dense_update = merged && update == Some(MergedUpdate::Dense);
        let (t_in, t_out, o_i) = (mul(tokens, inp)?, mul(tokens, out)?, mul(out, inp)?);
        let when = |c: bool, n: usize| if c { n } else { 0 };
        let touched = k.min(out);
        Ok(ScratchLengths {
            in_half: when(half && rotated, t_in),
            g_half: when(half, t_out),
            out_half: when(half && rotated, t_out),
            tmp_in: when(rotated, t_in),
            tmp_out: when(rotated, t_out),
            row_idx: when(sd, tokens),
            block: when(sd && transformed, t_out),
            block_op: when(sd, t_out),
            rows_op: when(sd, t_in),
            big_a: o_i,
            big_b: when(merged, o_i),
            big_half: when(merged && half, o_i),
            big_half_b: when((dw_first || dense_update) && half, o_i),
            et: when(by_rows, mul(inp, touched)?),
            pt_rows: when(by_rows, mul(touched, out)?),
        })
    }

    /// Each length the larger of the two: what a scratch serving both layers holds.
    pub fn max(self, o: Self) -> Self {
        ScratchLengths {
            in_half: self.in_half.max(o.in_half),
            g_half: self.g_half.max(o.g_half),
            out_half: self.out_half.max(o.out_half),
            tmp_in: self.tmp_in.max(o.tmp_in),
            tmp_out: self.tmp_out.max(o.tmp_out),
            row_idx: self.row_idx.max(o.row_idx),
            block: self.block.max(o.block),
            block_op: self.block_op.max(o.block_op),
            rows_op: self.rows_op.max(o.rows_op),
            big_a: self.big_a.max(o.big_a),
            big_b: self.big_b.max(o.big_b),
            big_half: self.big_half.max(o.big_half),
            big_half_b: self.big_half_b.max(o.big_half_b),
            et: self.et.max(o.et),
            pt_rows: self.pt_rows.max(o.pt_rows),
        }
    }

    /// Bytes of a scratch holding these lengths: `(f32-sized, bf16, u32, operand)` element
    /// counts, by element size (`F` and u32 at 4 bytes, bf16 at 2, operands at `operand`).
    pub fn bytes(&self, f_bytes: usize, operand_bytes: usize) -> u128 {
        let f = (self.tmp_in + self.tmp_out + self.block + self.big_a + self.big_b + self.et + self.pt_rows) as u128;
        let h = (self.in_half + self.g_half + self.out_half + self.big_half + self.big_half_b) as u128;
        let o = (self.block_op + self.rows_op) as u128;
        f * f_bytes as u128 + h * 2 + self.row_idx as u128 * 4 + o * operand_bytes as u128
    }
}

/// The large scratch of SparseGrad layers; see the module docs. Made empty, grown by the
/// calls that borrow it.
pub struct SparseGradScratch<B: Backend, F: Real> {
    precision: Precision,
    in_half: B::Buf<bf16>,
    g_half: B::Buf<bf16>,
    out_half: B::Buf<bf16>,
    tmp_in: B::Buf<F>,
    tmp_out: B::Buf<F>,
    row_idx: B::Buf<u32>,
    block: B::Buf<F>,
    block_op: Operand<B, F>,
    rows_op: Operand<B, F>,
    big_a: B::Buf<F>,
    big_b: B::Buf<F>,
    big_half: B::Buf<bf16>,
    big_half_b: B::Buf<bf16>,
    et: B::Buf<F>,
    pt_rows: B::Buf<F>,
}

/// One [`SparseGradScratch`] several layers borrow in turn (see
/// `SparseGradLinear::share_scratch`); layers of one precision only.
pub type SharedScratch<B, F> = Arc<Mutex<SparseGradScratch<B, F>>>;

impl<B: Backend, F: Real> SparseGradScratch<B, F> {
    /// An empty scratch for layers computing in `precision` (allocates nothing).
    pub fn shared(backend: &B, precision: Precision) -> Result<SharedScratch<B, F>> {
        Ok(Arc::new(Mutex::new(SparseGradScratch {
            precision,
            in_half: backend.alloc(0)?,
            g_half: backend.alloc(0)?,
            out_half: backend.alloc(0)?,
            tmp_in: backend.alloc(0)?,
            tmp_out: backend.alloc(0)?,
            row_idx: backend.alloc(0)?,
            block: backend.alloc(0)?,
            block_op: Operand::alloc(backend, precision, 0)?,
            rows_op: Operand::alloc(backend, precision, 0)?,
            big_a: backend.alloc(0)?,
            big_b: backend.alloc(0)?,
            big_half: backend.alloc(0)?,
            big_half_b: backend.alloc(0)?,
            et: backend.alloc(0)?,
            pt_rows: backend.alloc(0)?,
        })))
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }
}

fn grow_operand<B: Backend, F: Real>(be: &B, op: &mut Operand<B, F>, len: usize) -> Result<()> {
    match op {
        Operand::Full(b) => grow(be, b, len),
        Operand::Half(b) => grow(be, b, len),
    }
}

fn opt<T>(cond: bool, f: impl FnOnce() -> Result<T>) -> Result<Option<T>> {
    if cond {
        f().map(Some)
    } else {
        Ok(None)
    }
}

/// Swaps a layer's slot with the scratch's buffer when the layer uses that buffer.
fn swap_opt<T>(slot: &mut Option<T>, shared: &mut T) {
    if let Some(b) = slot {
        std::mem::swap(b, shared);
    }
}

/// A layer's buffers. The scratch fields are empty except while a call has borrowed the
/// scratch (`lend` .. `give_back`); the `Option`s say which of them this layer uses.
pub(super) struct Workspace<B: Backend, F: Real> {
    formulation: Formulation,
    update: Option<MergedUpdate>,
    selection: Selection,
    precision: Precision,
    out: usize,
    inp: usize,
    k: usize,
    /// Tokens `saved` holds.
    pub(super) tokens: usize,
    /// The scratch this layer borrows (its own unless a model shares one).
    pub(super) shared: SharedScratch<B, F>,
    // ---- the layer's own ----
    /// Saved for backward: `xt` (transformed) or `x` (merged), in the operand precision.
    pub(super) saved: Operand<B, F>,
    pub(super) col_idx: B::Buf<u32>,
    pub(super) topk: B::TopkWorkspace,
    /// [`MergedUpdate::Dense`] and [`MergedUpdate::Runs`]: the step's change of each kept
    /// entry (`k` values; swapped into the gradient's COO for the update).
    pub(super) delta: Option<B::Buf<F>>,
    /// [`MergedUpdate::Runs`]: where each row's run of entries starts (`out + 1`).
    pub(super) row_starts: Option<B::Buf<u32>>,
    /// [`MergedUpdate::SparseRows`]: the change `D` of `Wt` as COO and its row compaction;
    /// [`MergedUpdate::SparseColumns`]: `D^T` as COO, `(in, out)`.
    pub(super) change: Option<Coo<B, F>>,
    pub(super) change_t: Option<Coo<B, F>>,
    pub(super) unique_rows: Option<B::Buf<u32>>,
    pub(super) slot: Option<B::Buf<u32>>,
    // ---- borrowed from the scratch during a call ----
    pub(super) in_half: Option<B::Buf<bf16>>,
    pub(super) g_half: Option<B::Buf<bf16>>,
    pub(super) out_half: Option<B::Buf<bf16>>,
    pub(super) tmp_in: B::Buf<F>,
    pub(super) tmp_out: B::Buf<F>,
    pub(super) row_idx: B::Buf<u32>,
    pub(super) block: B::Buf<F>,
    pub(super) block_op: Operand<B, F>,
    pub(super) rows_op: Operand<B, F>,
    /// `(out, in)` products: `dWt` and, in the merged form, `dW`, `P^T dW`, and in the update
    /// `P D` (by columns), the dense `D` (Dense, f32) or `E = D Q^T` (Dense, Runs).
    pub(super) big_a: B::Buf<F>,
    pub(super) big_b: Option<B::Buf<F>>,
    /// Merged bf16: an `(out, in)` bf16 staging buffer (`dW`, `P^T dW`, `D`, `E` in turn).
    pub(super) big_half: Option<B::Buf<bf16>>,
    pub(super) big_half_b: Option<B::Buf<bf16>>,
    pub(super) et: Option<B::Buf<F>>,
    pub(super) pt_rows: Option<B::Buf<F>>,
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
        Ok(Workspace {
            formulation,
            update,
            selection,
            precision,
            out,
            inp,
            k,
            tokens: 0,
            shared: SparseGradScratch::shared(be, precision)?,
            saved: Operand::alloc(be, precision, 0)?,
            col_idx: be.alloc(out)?,
            topk: be.topk_workspace(mul(out, inp)?)?,
            delta: opt(dense_or_runs, || be.alloc(k))?,
            row_starts: opt(update == Some(MergedUpdate::Runs), || be.alloc(out + 1))?,
            change: opt(by_rows, || Coo::with_capacity(be, k, (out, inp)))?,
            change_t: opt(by_columns, || Coo::with_capacity(be, k, (inp, out)))?,
            unique_rows: opt(by_rows, || be.alloc(touched_rows))?,
            slot: opt(by_rows, || be.alloc(k))?,
            in_half: opt(half, || be.alloc(0))?,
            g_half: opt(half, || be.alloc(0))?,
            out_half: opt(half, || be.alloc(0))?,
            tmp_in: be.alloc(0)?,
            tmp_out: be.alloc(0)?,
            row_idx: be.alloc(0)?,
            block: be.alloc(0)?,
            block_op: Operand::alloc(be, precision, 0)?,
            rows_op: Operand::alloc(be, precision, 0)?,
            big_a: be.alloc(0)?,
            big_b: opt(merged, || be.alloc(0))?,
            big_half: opt(merged && half, || be.alloc(0))?,
            big_half_b: opt(merged && half, || be.alloc(0))?,
            et: opt(by_rows, || be.alloc(0))?,
            pt_rows: opt(by_rows, || be.alloc(0))?,
        })
    }

    /// Borrows `shared` instead of the current scratch (which is dropped: a layer's scratch
    /// is empty between calls). Fails on a scratch of another precision.
    pub(super) fn share(&mut self, shared: &SharedScratch<B, F>) -> Result<()> {
        let p = shared.lock().unwrap_or_else(PoisonError::into_inner).precision;
        if p != self.precision {
            return Err(Error::invalid(
                "SparseGradLinear::share_scratch",
                format!("the scratch is for {p:?} layers, this layer computes in {:?}", self.precision),
            ));
        }
        self.shared = Arc::clone(shared);
        Ok(())
    }

    /// What this layer needs of the scratch for a call on `tokens` rows.
    pub(super) fn needs(&self, tokens: usize) -> Result<ScratchLengths> {
        ScratchLengths::of(
            self.formulation,
            self.update,
            self.selection,
            self.precision,
            self.out,
            self.inp,
            self.k,
            tokens,
        )
    }

    /// Exchanges the borrowed fields with `s` (lending and giving back are the same swap).
    pub(super) fn swap(&mut self, s: &mut SparseGradScratch<B, F>) {
        use std::mem::swap;
        swap_opt(&mut self.in_half, &mut s.in_half);
        swap_opt(&mut self.g_half, &mut s.g_half);
        swap_opt(&mut self.out_half, &mut s.out_half);
        swap(&mut self.tmp_in, &mut s.tmp_in);
        swap(&mut self.tmp_out, &mut s.tmp_out);
        swap(&mut self.row_idx, &mut s.row_idx);
        swap(&mut self.block, &mut s.block);
        swap(&mut self.block_op, &mut s.block_op);
        swap(&mut self.rows_op, &mut s.rows_op);
        swap(&mut self.big_a, &mut s.big_a);
        swap_opt(&mut self.big_b, &mut s.big_b);
        swap_opt(&mut self.big_half, &mut s.big_half);
        swap_opt(&mut self.big_half_b, &mut s.big_half_b);
        swap_opt(&mut self.et, &mut s.et);
        swap_opt(&mut self.pt_rows, &mut s.pt_rows);
    }

    /// Grows the borrowed buffers to what a call on `tokens` rows needs.
    pub(super) fn grow_borrowed(&mut self, be: &B, tokens: usize) -> Result<()> {
        let n = self.needs(tokens)?;
        let grow_some = |b: &mut Option<B::Buf<bf16>>, len| b.as_mut().map_or(Ok(()), |b| grow(be, b, len));
        grow_some(&mut self.in_half, n.in_half)?;
        grow_some(&mut self.g_half, n.g_half)?;
        grow_some(&mut self.out_half, n.out_half)?;
        grow_some(&mut self.big_half, n.big_half)?;
        grow_some(&mut self.big_half_b, n.big_half_b)?;
        grow(be, &mut self.tmp_in, n.tmp_in)?;
        grow(be, &mut self.tmp_out, n.tmp_out)?;
        grow(be, &mut self.row_idx, n.row_idx)?;
        grow(be, &mut self.block, n.block)?;
        grow_operand(be, &mut self.block_op, n.block_op)?;
        grow_operand(be, &mut self.rows_op, n.rows_op)?;
        grow(be, &mut self.big_a, n.big_a)?;
        for (b, len) in [(&mut self.big_b, n.big_b), (&mut self.et, n.et), (&mut self.pt_rows, n.pt_rows)] {
            if let Some(b) = b {
                grow(be, b, len)?;
            }
        }
        Ok(())
    }

    /// Grows the saved input to hold `tokens` rows.
    pub(super) fn ensure_tokens(&mut self, be: &B, tokens: usize) -> Result<()> {
        if tokens <= self.tokens {
            return Ok(());
        }
        self.saved = Operand::alloc(be, self.precision, mul(tokens, self.inp)?)?;
        self.tokens = tokens;
        Ok(())
    }
}
