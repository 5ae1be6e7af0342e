//! Attention ops: grouped-query scaled dot-product attention, fused, forward and backward,
//! causal (decoders) or bidirectional under a padding mask (encoders); and the validator of
//! each.
//!
//! Layouts (row-major, token-major, as the projections produce them): `q`, `out`, `dq`
//! `(batch*seq, heads*head_dim)`; `k`, `v`, `dk`, `dv` `(batch*seq, kv_heads*head_dim)`.
//! Query head `h` reads KV head `h / (heads / kv_heads)`. With `s_ij = scale q_i . k_j`,
//! `scale = 1 / sqrt(head_dim)`, and the keys a query sees (its *live* keys, see
//! [`AttentionMask`]): `p_ij = exp(s_ij - m_i) / l_i` on live keys, 0 elsewhere, with the row
//! statistics `m_i = max_j s_ij` and `l_i = sum_j exp(s_ij - m_i)` over live keys; `out_i =
//! sum_j p_ij v_j`. A row without live keys (padding length 0) has `m = -inf`, `l = 0` and
//! a zero output. No `(batch, heads, seq, seq)` tensor is kept: the forward saves the row
//! statistics and the backward recomputes the probabilities from them.

use super::{check_bufs, check_lens};
use crate::backend::{Backend, Buffers, Precision};
use crate::error::{checked_mul, Error, Result};
use crate::scalar::{Elem, Real};

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    /// Heads split evenly into KV groups, and a positive head size.
    pub fn validate(&self) -> Result<()> {
        if self.kv_heads == 0 || self.heads % self.kv_heads != 0 || self.head_dim == 0 {
            return Err(Error::invalid(
                "attention",
                format!(
                    "{} heads do not split into {} KV groups of head_dim {}",
                    self.heads, self.kv_heads, self.head_dim
                ),
            ));
        }
        Ok(())
    }
    /// Width of a `q` / `out` row, `heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    /// Width of a `k` / `v` row, `kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
    pub fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
    /// Query rows over all sequences and heads, `batch * heads * seq`: the statistics hold
    /// two values per row.
    pub fn rows(&self) -> usize {
        self.batch * self.heads * self.seq
    }
    /// Entries of the saved statistics, `2 * rows()`.
    pub fn stats_len(&self) -> usize {
        2 * self.rows()
    }
}

/// Which keys a query attends to (its live keys).
pub enum AttentionMask<'a, B: Buffers> {
    /// Keys at or before the query: query `i` sees keys `j <= i`.
    Causal,
    /// Every real key of the sequence, in both directions: sequence `b` has
    /// `n = min(lengths[b], seq)` real tokens, then padding; every query of it, padding rows
    /// included, sees keys `j < n` (the semantics of [`crate::backend::EncoderOps::softmax_masked`]).
    Padding(&'a B::Buf<u32>),
}

impl<B: Buffers> Clone for AttentionMask<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Buffers> Copy for AttentionMask<'_, B> {}

/// The gradients [`AttentionOps::attention_backward`] writes (all overwritten).
pub struct AttentionGrads<'a, B: Buffers, F: Elem> {
    pub dq: &'a mut B::Buf<F>,
    pub dk: &'a mut B::Buf<F>,
    pub dv: &'a mut B::Buf<F>,
    /// If given, `dv` rounded to bf16 (to nearest even, as
    /// [`DenseOps::cast_to_bf16`](crate::backend::DenseOps::cast_to_bf16)) as well: the V
    /// projection's backward operand in a bf16 model, written where `dv` is (no pass of its
    /// own on CUDA).
    pub dv_half: Option<&'a mut B::Buf<half::bf16>>,
}

/// Fused attention; see the module docs for the math and layouts.
///
/// `precision`: [`Precision::Full`] computes every product in `F`; [`Precision::Bf16`] rounds
/// the operands of every product to bf16 (q, k, v and dout as they enter, the probabilities
/// before `P V` and `P^T dO`, the score gradients before `dS K` and `dS^T Q`) and
/// accumulates in f32 (tensor cores on CUDA); the softmax, its statistics and every
/// elementwise step stay in `F`.
pub trait AttentionOps: Buffers {
    /// `out` as above, and `stats` `(2, batch, heads, seq)`: `stats[r] = m` and
    /// `stats[rows + r] = l` of query row `r = (b heads + h) seq + i`, for the backward.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward<F: Real>(
        &self,
        shape: &AttentionShape,
        mask: AttentionMask<'_, Self>,
        precision: Precision,
        q: &Self::Buf<F>,
        k: &Self::Buf<F>,
        v: &Self::Buf<F>,
        out: &mut Self::Buf<F>,
        stats: &mut Self::Buf<F>,
    ) -> Result<()>;
    /// Backward of [`AttentionOps::attention_forward`] (same shape, mask and precision) from
    /// `dout`, with `out` and `stats` as the forward left them: recomputes `P` from the
    /// statistics, then `dV = P^T dO`, `dP = dO V^T`, `dS = scale P (dP - D)` with
    /// `D_i = sum_j p_ij dp_ij = dO_i . out_i`, `dQ = dS K`, `dK = dS^T Q`; the heads of a
    /// group sum into their KV head's `dk`, `dv`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward<F: Real>(
        &self,
        shape: &AttentionShape,
        mask: AttentionMask<'_, Self>,
        precision: Precision,
        q: &Self::Buf<F>,
        k: &Self::Buf<F>,
        v: &Self::Buf<F>,
        out: &Self::Buf<F>,
        stats: &Self::Buf<F>,
        dout: &Self::Buf<F>,
        grads: AttentionGrads<'_, Self, F>,
    ) -> Result<()>;
}

/// Element counts of an attention call's buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AttentionSizes {
    /// `batch * seq * heads * head_dim`: q, out, dout, dq.
    pub q: usize,
    /// `batch * seq * kv_heads * head_dim`: k, v, dk, dv.
    pub kv: usize,
    /// Query rows, `batch * heads * seq`.
    pub rows: usize,
}

/// The shape, overflow-checked sizes, and the mask's lengths buffer.
fn attention_sizes<B: Backend>(
    be: &B,
    op: &'static str,
    s: &AttentionShape,
    mask: AttentionMask<'_, B>,
) -> Result<AttentionSizes> {
    s.validate().map_err(|e| match e {
        Error::InvalidArgument { msg, .. } => Error::invalid(op, msg),
        e => e,
    })?;
    let tokens = checked_mul(op, s.batch, s.seq)?;
    let q = checked_mul(op, tokens, checked_mul(op, s.heads, s.head_dim)?)?;
    let kv = checked_mul(op, tokens, checked_mul(op, s.kv_heads, s.head_dim)?)?;
    let rows = checked_mul(op, tokens, s.heads)?;
    checked_mul(op, rows, 2)?;
    if let AttentionMask::Padding(lengths) = mask {
        check_lens(op, &[("lengths", be.len(lengths), s.batch)])?;
    }
    Ok(AttentionSizes { q, kv, rows })
}

/// [`AttentionOps::attention_forward`] (`[q, k, v, out, stats]`).
pub(crate) fn check_attention_forward<B: Backend, F: Elem>(
    be: &B,
    s: &AttentionShape,
    mask: AttentionMask<'_, B>,
    bufs: [&B::Buf<F>; 5],
) -> Result<AttentionSizes> {
    const OP: &str = "attention_forward";
    let n = attention_sizes(be, OP, s, mask)?;
    check_bufs(be, OP, ["q", "k", "v", "out", "stats"], bufs, [n.q, n.kv, n.kv, n.q, 2 * n.rows])?;
    Ok(n)
}

/// [`AttentionOps::attention_backward`] (`[q, k, v, out, stats, dout, dq, dk, dv]`, and
/// `dv_half` if given).
pub(crate) fn check_attention_backward<B: Backend, F: Elem>(
    be: &B,
    s: &AttentionShape,
    mask: AttentionMask<'_, B>,
    bufs: [&B::Buf<F>; 9],
    dv_half: Option<&B::Buf<half::bf16>>,
) -> Result<AttentionSizes> {
    const OP: &str = "attention_backward";
    let n = attention_sizes(be, OP, s, mask)?;
    let names = ["q", "k", "v", "out", "stats", "dout", "dq", "dk", "dv"];
    check_bufs(be, OP, names, bufs, [n.q, n.kv, n.kv, n.q, 2 * n.rows, n.q, n.q, n.kv, n.kv])?;
    if let Some(h) = dv_half {
        check_lens(OP, &[("dv_half", be.len(h), n.kv)])?;
    }
    Ok(n)
}
