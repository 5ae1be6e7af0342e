//! Grouped-query attention over `batch` sequences of `seq` tokens, forward and backward, as
//! strided-batched GEMMs plus a softmax op: causal (decoders) or bidirectional with a
//! padding mask (encoders), see [`Mask`].
//!
//! Layouts (row-major, token-major as the projections produce them): `q`, `out`
//! `(batch*seq, heads*head_dim)`; `k`, `v` `(batch*seq, kv_heads*head_dim)`; `probs`
//! `(batch, heads, seq, seq)`. Query head `h` reads KV head `h / (heads / kv_heads)`, so
//! the GEMMs run per (sequence, KV head) over the group's query heads, with the K or V
//! operand's batch stride 0.

use crate::backend::{Backend, Gemm};
use crate::error::{Error, Result};
use crate::scalar::Real;

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
    fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
    pub fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
    /// Offsets of the first query head of KV group `g` in sequence `b`: in `q`/`out`, in
    /// `k`/`v`, and in `probs`.
    fn offsets(&self, b: usize, g: usize) -> (usize, usize, usize) {
        let h0 = g * self.group();
        (
            b * self.seq * self.q_dim() + h0 * self.head_dim,
            b * self.seq * self.kv_dim() + g * self.head_dim,
            (b * self.heads + h0) * self.seq * self.seq,
        )
    }
}

/// Which keys a query attends to.
pub enum Mask<'a, B: Backend> {
    /// Keys at or before the query ([`crate::backend::TransformerOps::softmax_causal`]).
    Causal,
    /// Every real key of the sequence: sequence `b` has `lengths[b]` real tokens, then
    /// padding ([`crate::backend::EncoderOps::softmax_masked`]).
    Padding(&'a B::Buf<u32>),
}

impl<B: Backend> Mask<'_, B> {
    fn softmax<F: Real>(&self, be: &B, s: &AttentionShape, probs: &mut B::Buf<F>) -> Result<()> {
        match self {
            Mask::Causal => be.softmax_causal(probs, s.batch * s.heads, s.seq, s.scale()),
            Mask::Padding(lengths) => be.softmax_masked(probs, lengths, s.batch * s.heads, s.heads, s.seq, s.scale()),
        }
    }

    fn softmax_backward<F: Real>(
        &self,
        be: &B,
        s: &AttentionShape,
        probs: &B::Buf<F>,
        dprobs: &B::Buf<F>,
        dscores: &mut B::Buf<F>,
    ) -> Result<()> {
        let (mats, t, scale) = (s.batch * s.heads, s.seq, s.scale());
        match self {
            Mask::Causal => be.softmax_causal_backward(probs, dprobs, dscores, mats, t, scale),
            Mask::Padding(lengths) => {
                be.softmax_masked_backward(probs, dprobs, dscores, lengths, mats, s.heads, t, scale)
            }
        }
    }
}

/// `probs = softmax_causal(scale Q K^T)`, `out = probs V`.
pub fn forward<B: Backend, F: Real>(
    be: &B,
    s: &AttentionShape,
    q: &B::Buf<F>,
    k: &B::Buf<F>,
    v: &B::Buf<F>,
    probs: &mut B::Buf<F>,
    out: &mut B::Buf<F>,
) -> Result<()> {
    forward_masked(be, s, &Mask::Causal, q, k, v, probs, out)
}

/// `probs = softmax(scale Q K^T)` under `mask`, `out = probs V`.
#[allow(clippy::too_many_arguments)]
pub fn forward_masked<B: Backend, F: Real>(
    be: &B,
    s: &AttentionShape,
    mask: &Mask<'_, B>,
    q: &B::Buf<F>,
    k: &B::Buf<F>,
    v: &B::Buf<F>,
    probs: &mut B::Buf<F>,
    out: &mut B::Buf<F>,
) -> Result<()> {
    s.validate()?;
    let _attention = crate::perf::scope::attention();
    let (t, d, group) = (s.seq, s.head_dim, s.group());
    for b in 0..s.batch {
        for g in 0..s.kv_heads {
            let (oq, okv, op) = s.offsets(b, g);
            // S_h = Q_h K_g^T for the group's query heads.
            let mut spec = Gemm::nt(t, t, d);
            (spec.lda, spec.ldb, spec.ldc) = (s.q_dim(), s.kv_dim(), t);
            (spec.offset_a, spec.offset_b, spec.offset_c) = (oq, okv, op);
            (spec.batch, spec.stride_a, spec.stride_b, spec.stride_c) = (group, d, 0, t * t);
            be.gemm(&spec, q, k, probs)?;
        }
    }
    mask.softmax(be, s, probs)?;
    for b in 0..s.batch {
        for g in 0..s.kv_heads {
            let (oq, okv, op) = s.offsets(b, g);
            // O_h = P_h V_g
            let mut spec = Gemm::nn(t, d, t);
            (spec.lda, spec.ldb, spec.ldc) = (t, s.kv_dim(), s.q_dim());
            (spec.offset_a, spec.offset_b, spec.offset_c) = (op, okv, oq);
            (spec.batch, spec.stride_a, spec.stride_b, spec.stride_c) = (group, t * t, 0, d);
            be.gemm(&spec, probs, v, out)?;
        }
    }
    Ok(())
}

/// Scratch of the backward: `dprobs` and `dscores`, each `probs_len`.
pub struct AttentionGrads<'a, B: Backend, F: Real> {
    pub dq: &'a mut B::Buf<F>,
    pub dk: &'a mut B::Buf<F>,
    pub dv: &'a mut B::Buf<F>,
    pub dprobs: &'a mut B::Buf<F>,
    pub dscores: &'a mut B::Buf<F>,
}

/// From `dout`, the gradients of `q`, `k`, `v` (all overwritten).
#[allow(clippy::too_many_arguments)]
pub fn backward<B: Backend, F: Real>(
    be: &B,
    s: &AttentionShape,
    q: &B::Buf<F>,
    k: &B::Buf<F>,
    v: &B::Buf<F>,
    probs: &B::Buf<F>,
    dout: &B::Buf<F>,
    grads: AttentionGrads<'_, B, F>,
) -> Result<()> {
    backward_masked(be, s, &Mask::Causal, q, k, v, probs, dout, grads)
}

/// [`backward`] of [`forward_masked`] under the same `mask`.
#[allow(clippy::too_many_arguments)]
pub fn backward_masked<B: Backend, F: Real>(
    be: &B,
    s: &AttentionShape,
    mask: &Mask<'_, B>,
    q: &B::Buf<F>,
    k: &B::Buf<F>,
    v: &B::Buf<F>,
    probs: &B::Buf<F>,
    dout: &B::Buf<F>,
    grads: AttentionGrads<'_, B, F>,
) -> Result<()> {
    s.validate()?;
    let _attention = crate::perf::scope::attention();
    let (t, d, group) = (s.seq, s.head_dim, s.group());
    let AttentionGrads { dq, dk, dv, dprobs, dscores } = grads;
    for b in 0..s.batch {
        for g in 0..s.kv_heads {
            let (oq, okv, op) = s.offsets(b, g);
            // dP_h = dO_h V_g^T
            let mut spec = Gemm::nt(t, t, d);
            (spec.lda, spec.ldb, spec.ldc) = (s.q_dim(), s.kv_dim(), t);
            (spec.offset_a, spec.offset_b, spec.offset_c) = (oq, okv, op);
            (spec.batch, spec.stride_a, spec.stride_b, spec.stride_c) = (group, d, 0, t * t);
            be.gemm(&spec, dout, v, dprobs)?;
            // dV_g = sum_h P_h^T dO_h: the heads of a group share V, so accumulate.
            for j in 0..group {
                let mut spec = Gemm::tn(t, d, t).beta(if j == 0 { 0.0 } else { 1.0 });
                (spec.lda, spec.ldb, spec.ldc) = (t, s.q_dim(), s.kv_dim());
                (spec.offset_a, spec.offset_b, spec.offset_c) = (op + j * t * t, oq + j * d, okv);
                be.gemm(&spec, probs, dout, dv)?;
            }
        }
    }
    mask.softmax_backward(be, s, probs, dprobs, dscores)?;
    for b in 0..s.batch {
        for g in 0..s.kv_heads {
            let (oq, okv, op) = s.offsets(b, g);
            // dQ_h = dS_h K_g
            let mut spec = Gemm::nn(t, d, t);
            (spec.lda, spec.ldb, spec.ldc) = (t, s.kv_dim(), s.q_dim());
            (spec.offset_a, spec.offset_b, spec.offset_c) = (op, okv, oq);
            (spec.batch, spec.stride_a, spec.stride_b, spec.stride_c) = (group, t * t, 0, d);
            be.gemm(&spec, dscores, k, dq)?;
            // dK_g = sum_h dS_h^T Q_h
            for j in 0..group {
                let mut spec = Gemm::tn(t, d, t).beta(if j == 0 { 0.0 } else { 1.0 });
                (spec.lda, spec.ldb, spec.ldc) = (t, s.q_dim(), s.kv_dim());
                (spec.offset_a, spec.offset_b, spec.offset_c) = (op + j * t * t, oq + j * d, okv);
                be.gemm(&spec, dscores, q, dk)?;
            }
        }
    }
    Ok(())
}
