//! Transformer ops, the frozen rest of a decoder model that gradients flow through:
//! RMSNorm, rotary position embedding, causal softmax and masked cross-entropy, forward and
//! backward; and the validator of each.

use super::{check_bufs, check_lens, OutBuf};
use crate::backend::{Backend, Buffers};
use crate::error::{checked_mul, Error, Result};
use crate::scalar::{Elem, Real};

/// Transformer ops over row-major activations.
pub trait TransformerOps: Buffers {
    /// RMSNorm over the rows of `x` `(rows, cols)`: `inv_rms[r] = 1 / sqrt(mean(x[r, :]^2) + eps)`
    /// (written, for the backward), `y[r, c] = x[r, c] * inv_rms[r] * w[c]`.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm<F: Real>(
        &self,
        x: &Self::Buf<F>,
        w: &Self::Buf<F>,
        y: &mut Self::Buf<F>,
        inv_rms: &mut Self::Buf<F>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()>;
    /// [`TransformerOps::rmsnorm`] with only the bf16 rounding of `y` written (into `y_half`):
    /// for a norm whose output only feeds bf16 GEMMs, bit-identical to the norm followed by
    /// `cast_to_bf16`, in one pass.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_to_bf16<F: Real>(
        &self,
        x: &Self::Buf<F>,
        w: &Self::Buf<F>,
        y_half: &mut Self::Buf<half::bf16>,
        inv_rms: &mut Self::Buf<F>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()>;
    /// The residual stream into a norm in one pass: `x += branch` if given (one rounded add
    /// per element, bit-identical to `axpy` with alpha 1), `x_save = x` if given (a copy for
    /// the backward), then [`TransformerOps::rmsnorm`] of the new `x` into `out` (with
    /// [`OutBuf::Half`] only its bf16 rounding, as [`TransformerOps::rmsnorm_to_bf16`]) and
    /// `inv_rms`.
    #[allow(clippy::too_many_arguments)]
    fn add_rmsnorm<F: Real>(
        &self,
        x: &mut Self::Buf<F>,
        branch: Option<&Self::Buf<F>>,
        x_save: Option<&mut Self::Buf<F>>,
        w: &Self::Buf<F>,
        out: OutBuf<'_, Self, F>,
        inv_rms: &mut Self::Buf<F>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()>;
    /// Input gradient of [`TransformerOps::rmsnorm`] (`w` is frozen: no weight gradient):
    /// `dx[r, c] = inv_rms[r] * (w[c] dy[r, c] - x[r, c] inv_rms[r]^2 mean_c'(w dy x)[r])`.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward<F: Real>(
        &self,
        x: &Self::Buf<F>,
        w: &Self::Buf<F>,
        inv_rms: &Self::Buf<F>,
        dy: &Self::Buf<F>,
        dx: &mut Self::Buf<F>,
        rows: usize,
        cols: usize,
    ) -> Result<()>;
    /// [`TransformerOps::rmsnorm_backward`] added into `dx` (one rounded f32 add per element,
    /// bit-identical to the backward into a scratch buffer followed by `axpy` with alpha 1):
    /// a residual block's input gradient in one pass instead of two. Given `dy2`, the norm's
    /// output gradient is `dy + dy2` (one rounded add per element, bit-identical to `axpy`
    /// of `dy2` into `dy` first), for a branch whose gradient arrives in two parts (the
    /// gate's and the up projection's). Given `dx_half`, the new `dx` is also rounded into it
    /// (bit-identical to a following `cast_to_bf16`), for the GEMM that reads it next.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward_add<F: Real>(
        &self,
        x: &Self::Buf<F>,
        w: &Self::Buf<F>,
        inv_rms: &Self::Buf<F>,
        dy: &Self::Buf<F>,
        dy2: Option<&Self::Buf<F>>,
        dx: &mut Self::Buf<F>,
        dx_half: Option<&mut Self::Buf<half::bf16>>,
        rows: usize,
        cols: usize,
    ) -> Result<()>;
    /// Rotary position embedding in the rotate-half layout, in place on `x`
    /// `(tokens, heads * head_dim)`. Token `t` sits at position `p = t % seq_len`; for
    /// `i < head_dim / 2`, with `c = cos[p, i]`, `s = sin[p, i]` (tables `(seq_len, head_dim/2)`):
    /// `(x_i, x_{i+h}) <- (x_i c - x_{i+h} s, x_i s + x_{i+h} c)`, `h = head_dim / 2`.
    /// `inverse` rotates by the opposite angle: the backward of the forward rotation.
    #[allow(clippy::too_many_arguments)]
    fn rope<F: Real>(
        &self,
        x: &mut Self::Buf<F>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        seq_len: usize,
        cos: &Self::Buf<F>,
        sin: &Self::Buf<F>,
        inverse: bool,
    ) -> Result<()>;
    /// [`TransformerOps::rope`] of the queries `q` (`q_heads` heads) and the keys `k`
    /// (`k_heads` heads) of the same tokens, in one pass: bit-identical to the two calls.
    /// Given `halves`, the rotated `q` and `k` are also rounded to bf16 into them
    /// (bit-identical to a following `cast_to_bf16` of each).
    #[allow(clippy::too_many_arguments)]
    fn rope_qk<F: Real>(
        &self,
        q: &mut Self::Buf<F>,
        q_heads: usize,
        k: &mut Self::Buf<F>,
        k_heads: usize,
        tokens: usize,
        head_dim: usize,
        seq_len: usize,
        cos: &Self::Buf<F>,
        sin: &Self::Buf<F>,
        inverse: bool,
        halves: Option<RopeHalves<'_, Self>>,
    ) -> Result<()>;
    /// Causal softmax in place over `mats` row-major `(t, t)` matrices: in row `i`,
    /// `p_j = exp(scale s_ij - max) / sum` over `j <= i`, and `p_j = 0` for `j > i`.
    fn softmax_causal<F: Real>(&self, s: &mut Self::Buf<F>, mats: usize, t: usize, scale: f32) -> Result<()>;
    /// Backward of [`TransformerOps::softmax_causal`] with respect to the unscaled scores:
    /// `ds_ij = scale * p_ij (dp_ij - sum_j' p_ij' dp_ij')` (0 above the diagonal).
    fn softmax_causal_backward<F: Real>(
        &self,
        p: &Self::Buf<F>,
        dp: &Self::Buf<F>,
        ds: &mut Self::Buf<F>,
        mats: usize,
        t: usize,
        scale: f32,
    ) -> Result<()>;
    /// Masked cross-entropy of `logits` `(rows, vocab)`:
    /// `losses[r] = mask[r] (logsumexp(logits[r]) - logits[r, targets[r]])`, and `logits` is
    /// replaced by its gradient `grad_scale mask[r] (softmax(logits[r]) - onehot(targets[r]))`.
    /// Rows with `mask[r] = 0` get zero loss and gradient whatever their target; a masked-in
    /// target outside the vocabulary is an [`Error::InvalidArgument`].
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy<F: Real>(
        &self,
        logits: &mut Self::Buf<F>,
        targets: &Self::Buf<u32>,
        mask: &Self::Buf<F>,
        rows: usize,
        vocab: usize,
        grad_scale: impl Into<LossScale<F>>,
        losses: &mut Self::Buf<F>,
    ) -> Result<()>;
}

/// The `grad_scale` of [`TransformerOps::cross_entropy`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LossScale<F> {
    /// This value.
    Fixed(F),
    /// `1 / max(1, #{r : mask[r] != 0})` (rounded from f64): the mean over the rows that
    /// count. The backend counts them itself (on the device on CUDA), so a captured step
    /// replays the right scale whatever the next batch's mask.
    MeanOverMask,
}

impl<F> From<F> for LossScale<F> {
    fn from(v: F) -> Self {
        LossScale::Fixed(v)
    }
}

impl<F: Real> LossScale<F> {
    /// The scale of a batch whose mask has `counted` rows that count.
    pub(crate) fn resolve(self, counted: usize) -> F {
        match self {
            LossScale::Fixed(v) => v,
            LossScale::MeanOverMask => F::from_f64(1.0 / counted.max(1) as f64),
        }
    }
}

/// [`TransformerOps::rmsnorm`] (`[x, w, y, inv_rms]`). Returns `rows * cols`.
pub(crate) fn check_rmsnorm<B: Backend, F: Elem>(
    be: &B,
    bufs: [&B::Buf<F>; 4],
    rows: usize,
    cols: usize,
) -> Result<usize> {
    const OP: &str = "rmsnorm";
    let n = checked_mul(OP, rows, cols)?;
    check_bufs(be, OP, ["x", "w", "y", "inv_rms"], bufs, [n, cols, n, rows])?;
    check_row_width(OP, cols)?;
    Ok(n)
}

/// [`TransformerOps::rmsnorm_to_bf16`] (`[x, w, inv_rms]` and `y_half`). Returns `rows * cols`.
pub(crate) fn check_rmsnorm_to_bf16<B: Backend, F: Elem>(
    be: &B,
    bufs: [&B::Buf<F>; 3],
    y_half: &B::Buf<half::bf16>,
    rows: usize,
    cols: usize,
) -> Result<usize> {
    const OP: &str = "rmsnorm_to_bf16";
    let n = checked_mul(OP, rows, cols)?;
    check_bufs(be, OP, ["x", "w", "inv_rms"], bufs, [n, cols, rows])?;
    check_lens(OP, &[("y_half", be.len(y_half), n)])?;
    check_row_width(OP, cols)?;
    Ok(n)
}

/// [`TransformerOps::add_rmsnorm`]: `x`, `branch`, `x_save` and `out` hold `rows * cols`,
/// `w` `cols` and `inv_rms` `rows` values. Returns `rows * cols`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_add_rmsnorm<B: Backend, F: Elem>(
    be: &B,
    x: &B::Buf<F>,
    [branch, x_save]: [Option<&B::Buf<F>>; 2],
    w: &B::Buf<F>,
    out: &OutBuf<'_, B, F>,
    inv_rms: &B::Buf<F>,
    rows: usize,
    cols: usize,
) -> Result<usize> {
    const OP: &str = "add_rmsnorm";
    let n = checked_mul(OP, rows, cols)?;
    check_bufs(be, OP, ["x", "w", "inv_rms"], [x, w, inv_rms], [n, cols, rows])?;
    let opt_len = |b: Option<&B::Buf<F>>| b.map_or(n, |b| be.len(b));
    check_lens(OP, &[("branch", opt_len(branch), n), ("x_save", opt_len(x_save), n), ("out", out.len(be), n)])?;
    check_row_width(OP, cols)?;
    Ok(n)
}

/// The optional second gradient part and bf16 copy of
/// [`TransformerOps::rmsnorm_backward_add`]: `rows * cols` long each.
pub(crate) fn check_backward_add_extras<B: Backend, F: Elem>(
    be: &B,
    dy2: Option<&B::Buf<F>>,
    dx_half: Option<&B::Buf<half::bf16>>,
    n: usize,
) -> Result<()> {
    let dy2_len = dy2.map_or(n, |d| be.len(d));
    let half_len = dx_half.map_or(n, |h| be.len(h));
    check_lens("rmsnorm_backward_add", &[("dy2", dy2_len, n), ("dx_half", half_len, n)])
}

/// [`TransformerOps::rmsnorm_backward`] (`[x, w, inv_rms, dy, dx]`). Returns `rows * cols`.
pub(crate) fn check_rmsnorm_backward<B: Backend, F: Elem>(
    be: &B,
    bufs: [&B::Buf<F>; 5],
    rows: usize,
    cols: usize,
) -> Result<usize> {
    const OP: &str = "rmsnorm_backward";
    let n = checked_mul(OP, rows, cols)?;
    check_bufs(be, OP, ["x", "w", "inv_rms", "dy", "dx"], bufs, [n, cols, rows, n, n])?;
    check_row_width(OP, cols)?;
    Ok(n)
}

/// Row-wise normalizations reject rows of width 0 (their mean is undefined).
pub(crate) fn check_row_width(op: &'static str, cols: usize) -> Result<()> {
    if cols == 0 {
        return Err(Error::invalid(op, "rows of width 0"));
    }
    Ok(())
}

/// [`TransformerOps::rope`]: an even head size, a positive sequence length, and the tables
/// and `x` long enough. Returns the row width `heads * head_dim`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_rope<B: Backend, F: Elem>(
    be: &B,
    x: &B::Buf<F>,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    seq_len: usize,
    cos: &B::Buf<F>,
    sin: &B::Buf<F>,
) -> Result<usize> {
    const OP: &str = "rope";
    if head_dim % 2 != 0 || seq_len == 0 {
        return Err(Error::invalid(OP, format!("head_dim {head_dim} must be even and seq_len {seq_len} positive")));
    }
    let width = checked_mul(OP, heads, head_dim)?;
    let table = checked_mul(OP, seq_len, head_dim / 2)?;
    check_lens(
        OP,
        &[("x", be.len(x), checked_mul(OP, tokens, width)?), ("cos", be.len(cos), table), ("sin", be.len(sin), table)],
    )?;
    Ok(width)
}

/// The bf16 copies [`TransformerOps::rope_qk`] can write: (queries, keys).
pub type RopeHalves<'a, B> = (&'a mut <B as Buffers>::Buf<half::bf16>, &'a mut <B as Buffers>::Buf<half::bf16>);

/// The bf16 copies of [`TransformerOps::rope_qk`]: each `(buffer, length it must hold)`.
pub(crate) fn check_rope_halves<B: Backend>(
    be: &B,
    (q_half, q_len): (&B::Buf<half::bf16>, usize),
    (k_half, k_len): (&B::Buf<half::bf16>, usize),
) -> Result<()> {
    check_lens("rope", &[("q_half", be.len(q_half), q_len), ("k_half", be.len(k_half), k_len)])
}

/// `mats * t` rows of `t` scores, `mats * t * t` entries in all, or an overflow error.
fn score_rows(op: &'static str, mats: usize, t: usize) -> Result<(usize, usize)> {
    let rows = checked_mul(op, mats, t)?;
    Ok((rows, checked_mul(op, rows, t)?))
}

/// [`TransformerOps::softmax_causal`]. Returns the number of rows, `mats * t`.
pub(crate) fn check_softmax_causal<B: Backend, F: Elem>(be: &B, s: &B::Buf<F>, mats: usize, t: usize) -> Result<usize> {
    const OP: &str = "softmax_causal";
    let (rows, n) = score_rows(OP, mats, t)?;
    check_lens(OP, &[("s", be.len(s), n)])?;
    Ok(rows)
}

/// [`TransformerOps::softmax_causal_backward`] (`[p, dp, ds]`). Returns the number of rows,
/// `mats * t`.
pub(crate) fn check_softmax_causal_backward<B: Backend, F: Elem>(
    be: &B,
    bufs: [&B::Buf<F>; 3],
    mats: usize,
    t: usize,
) -> Result<usize> {
    const OP: &str = "softmax_causal_backward";
    let (rows, n) = score_rows(OP, mats, t)?;
    check_bufs(be, OP, ["p", "dp", "ds"], bufs, [n; 3])?;
    Ok(rows)
}

/// [`TransformerOps::cross_entropy`]: buffer lengths and a nonempty vocabulary (the targets
/// are data, checked by the backend that reads them). Returns `rows * vocab`.
pub(crate) fn check_cross_entropy<B: Backend, F: Elem>(
    be: &B,
    logits: &B::Buf<F>,
    targets: &B::Buf<u32>,
    mask: &B::Buf<F>,
    rows: usize,
    vocab: usize,
    losses: &B::Buf<F>,
) -> Result<usize> {
    const OP: &str = "cross_entropy";
    let n = checked_mul(OP, rows, vocab)?;
    check_lens(
        OP,
        &[
            ("logits", be.len(logits), n),
            ("targets", be.len(targets), rows),
            ("mask", be.len(mask), rows),
            ("losses", be.len(losses), rows),
        ],
    )?;
    if vocab == 0 {
        return Err(Error::invalid(OP, "vocabulary of size 0"));
    }
    Ok(n)
}
