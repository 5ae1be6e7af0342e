//! Encoder ops (BERT): LayerNorm (forward, input gradient, affine parameter gradients), the
//! padding-masked bidirectional softmax and its backward, and pooling of each sequence's
//! token rows and its backward; and the validator of each.
//!
//! Padding is a length per sequence: sequence `b` has `n = min(lengths[b], t)` real tokens,
//! then padding (right-padded batches, as a BERT tokenizer produces); a length of 0 is
//! allowed (all padding). Lengths are clamped, never out of range.

use super::transformer::check_row_width;
use super::{check_bufs, check_lens};
use crate::backend::{Backend, Buffers, PoolKind};
use crate::error::{checked_mul, Error, Result};
use crate::scalar::{Elem, Real};

/// Encoder ops over row-major activations.
pub trait EncoderOps: Buffers {
    /// LayerNorm over the rows of `x` `(rows, cols)`: `mean[r]`, `rstd[r] = 1 / sqrt(var[r] + eps)`
    /// (population variance; both written for the backward), `y = (x - mean) rstd w + b`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm<F: Real>(
        &self,
        x: &Self::Buf<F>,
        w: &Self::Buf<F>,
        b: &Self::Buf<F>,
        y: &mut Self::Buf<F>,
        mean: &mut Self::Buf<F>,
        rstd: &mut Self::Buf<F>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()>;
    /// Input gradient of [`EncoderOps::layernorm`]: with `xh = (x - mean) rstd`, `g = w dy`,
    /// `dx = rstd (g - mean_c(g) - xh mean_c(g xh))`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward<F: Real>(
        &self,
        x: &Self::Buf<F>,
        w: &Self::Buf<F>,
        mean: &Self::Buf<F>,
        rstd: &Self::Buf<F>,
        dy: &Self::Buf<F>,
        dx: &mut Self::Buf<F>,
        rows: usize,
        cols: usize,
    ) -> Result<()>;
    /// Affine parameter gradients of [`EncoderOps::layernorm`]:
    /// `dw[c] = beta dw[c] + sum_r dy[r, c] xh[r, c]`, `db[c] = beta db[c] + sum_r dy[r, c]`
    /// (`beta = 0` overwrites).
    #[allow(clippy::too_many_arguments)]
    fn layernorm_param_grads<F: Real>(
        &self,
        x: &Self::Buf<F>,
        mean: &Self::Buf<F>,
        rstd: &Self::Buf<F>,
        dy: &Self::Buf<F>,
        dw: &mut Self::Buf<F>,
        db: &mut Self::Buf<F>,
        rows: usize,
        cols: usize,
        beta: F,
    ) -> Result<()>;
    /// Bidirectional softmax in place over `mats = batch * heads` row-major `(t, t)` score
    /// matrices, matrix `m` belonging to sequence `m / heads`: in every row,
    /// `p_j = exp(scale s_j - max) / sum` over the real keys `j < n`, and `p_j = 0` for the
    /// padding keys `j >= n` (a row of zeros when `n = 0`).
    fn softmax_masked<F: Real>(
        &self,
        s: &mut Self::Buf<F>,
        lengths: &Self::Buf<u32>,
        mats: usize,
        heads: usize,
        t: usize,
        scale: f32,
    ) -> Result<()>;
    /// Backward of [`EncoderOps::softmax_masked`] with respect to the unscaled scores:
    /// `ds_j = scale p_j (dp_j - sum_{j' < n} p_j' dp_j')`, 0 for padding keys.
    #[allow(clippy::too_many_arguments)]
    fn softmax_masked_backward<F: Real>(
        &self,
        p: &Self::Buf<F>,
        dp: &Self::Buf<F>,
        ds: &mut Self::Buf<F>,
        lengths: &Self::Buf<u32>,
        mats: usize,
        heads: usize,
        t: usize,
        scale: f32,
    ) -> Result<()>;
    /// Pools each sequence of `x` `(batch * t, cols)` into a row of `out` `(batch, cols)`:
    /// the mean of its `n` real token rows ([`PoolKind::Mean`], summed row by row in `F`) or
    /// its first row ([`PoolKind::Cls`]); a zero row when `n = 0`.
    #[allow(clippy::too_many_arguments)]
    fn pool_rows<F: Real>(
        &self,
        x: &Self::Buf<F>,
        lengths: &Self::Buf<u32>,
        out: &mut Self::Buf<F>,
        batch: usize,
        t: usize,
        cols: usize,
        kind: PoolKind,
    ) -> Result<()>;
    /// Backward of [`EncoderOps::pool_rows`]: `dx` `(batch * t, cols)` gets `dout[b] / n` on the
    /// real rows (mean) or `dout[b]` on row 0 (CLS), zero elsewhere (overwritten).
    #[allow(clippy::too_many_arguments)]
    fn pool_rows_backward<F: Real>(
        &self,
        dout: &Self::Buf<F>,
        lengths: &Self::Buf<u32>,
        dx: &mut Self::Buf<F>,
        batch: usize,
        t: usize,
        cols: usize,
        kind: PoolKind,
    ) -> Result<()>;
}

/// [`EncoderOps::layernorm`] (`[x, w, b, y, mean, rstd]`). Returns `rows * cols`.
pub(crate) fn check_layernorm<B: Backend, F: Elem>(
    be: &B,
    bufs: [&B::Buf<F>; 6],
    rows: usize,
    cols: usize,
) -> Result<usize> {
    const OP: &str = "layernorm";
    let n = checked_mul(OP, rows, cols)?;
    check_bufs(be, OP, ["x", "w", "b", "y", "mean", "rstd"], bufs, [n, cols, cols, n, rows, rows])?;
    check_row_width(OP, cols)?;
    Ok(n)
}

/// [`EncoderOps::layernorm_backward`] (`[x, w, mean, rstd, dy, dx]`). Returns `rows * cols`.
pub(crate) fn check_layernorm_backward<B: Backend, F: Elem>(
    be: &B,
    bufs: [&B::Buf<F>; 6],
    rows: usize,
    cols: usize,
) -> Result<usize> {
    const OP: &str = "layernorm_backward";
    let n = checked_mul(OP, rows, cols)?;
    check_bufs(be, OP, ["x", "w", "mean", "rstd", "dy", "dx"], bufs, [n, cols, rows, rows, n, n])?;
    check_row_width(OP, cols)?;
    Ok(n)
}

/// [`EncoderOps::layernorm_param_grads`] (`[x, mean, rstd, dy, dw, db]`; rows of width 0
/// are allowed: nothing to sum).
pub(crate) fn check_layernorm_param_grads<B: Backend, F: Elem>(
    be: &B,
    bufs: [&B::Buf<F>; 6],
    rows: usize,
    cols: usize,
) -> Result<()> {
    const OP: &str = "layernorm_param_grads";
    let n = checked_mul(OP, rows, cols)?;
    check_bufs(be, OP, ["x", "mean", "rstd", "dy", "dw", "db"], bufs, [n, rows, rows, n, cols, cols])
}

/// The sequences of a masked softmax: `mats` splits into sequences of `heads` matrices,
/// one length each. Returns the rows `mats * t` and the entries `mats * t * t`.
fn masked_score_rows<B: Backend>(
    be: &B,
    op: &'static str,
    lengths: &B::Buf<u32>,
    mats: usize,
    heads: usize,
    t: usize,
) -> Result<(usize, usize)> {
    if heads == 0 || mats % heads != 0 {
        return Err(Error::invalid(op, format!("{mats} matrices do not split into sequences of {heads} heads")));
    }
    check_lens(op, &[("lengths", be.len(lengths), mats / heads)])?;
    let rows = checked_mul(op, mats, t)?;
    Ok((rows, checked_mul(op, rows, t)?))
}

/// [`EncoderOps::softmax_masked`]. Returns the number of rows, `mats * t`.
pub(crate) fn check_softmax_masked<B: Backend, F: Elem>(
    be: &B,
    s: &B::Buf<F>,
    lengths: &B::Buf<u32>,
    mats: usize,
    heads: usize,
    t: usize,
) -> Result<usize> {
    const OP: &str = "softmax_masked";
    let (rows, n) = masked_score_rows(be, OP, lengths, mats, heads, t)?;
    check_lens(OP, &[("s", be.len(s), n)])?;
    Ok(rows)
}

/// [`EncoderOps::softmax_masked_backward`] (`[p, dp, ds]`). Returns the number of rows,
/// `mats * t`.
pub(crate) fn check_softmax_masked_backward<B: Backend, F: Elem>(
    be: &B,
    bufs: [&B::Buf<F>; 3],
    lengths: &B::Buf<u32>,
    mats: usize,
    heads: usize,
    t: usize,
) -> Result<usize> {
    const OP: &str = "softmax_masked_backward";
    let (rows, n) = masked_score_rows(be, OP, lengths, mats, heads, t)?;
    check_bufs(be, OP, ["p", "dp", "ds"], bufs, [n; 3])?;
    Ok(rows)
}

/// The sizes of a pooling: one length per sequence; returns `(batch * cols, batch * t * cols)`.
fn pooled_sizes<B: Backend>(
    be: &B,
    op: &'static str,
    lengths: &B::Buf<u32>,
    batch: usize,
    t: usize,
    cols: usize,
) -> Result<(usize, usize)> {
    check_lens(op, &[("lengths", be.len(lengths), batch)])?;
    let overflow = || Error::invalid(op, format!("size {batch} x {t} x {cols} overflows"));
    let pooled = batch.checked_mul(cols).ok_or_else(overflow)?;
    Ok((pooled, pooled.checked_mul(t).ok_or_else(overflow)?))
}

/// [`EncoderOps::pool_rows`]. Returns `(batch * cols, batch * t * cols)`.
pub(crate) fn check_pool_rows<B: Backend, F: Elem>(
    be: &B,
    x: &B::Buf<F>,
    lengths: &B::Buf<u32>,
    out: &B::Buf<F>,
    batch: usize,
    t: usize,
    cols: usize,
) -> Result<(usize, usize)> {
    const OP: &str = "pool_rows";
    let (pooled, full) = pooled_sizes(be, OP, lengths, batch, t, cols)?;
    check_lens(OP, &[("x", be.len(x), full), ("out", be.len(out), pooled)])?;
    Ok((pooled, full))
}

/// [`EncoderOps::pool_rows_backward`]. Returns `(batch * cols, batch * t * cols)`.
pub(crate) fn check_pool_rows_backward<B: Backend, F: Elem>(
    be: &B,
    dout: &B::Buf<F>,
    lengths: &B::Buf<u32>,
    dx: &B::Buf<F>,
    batch: usize,
    t: usize,
    cols: usize,
) -> Result<(usize, usize)> {
    const OP: &str = "pool_rows_backward";
    let (pooled, full) = pooled_sizes(be, OP, lengths, batch, t, cols)?;
    check_lens(OP, &[("dout", be.len(dout), pooled), ("dx", be.len(dx), full)])?;
    Ok((pooled, full))
}
