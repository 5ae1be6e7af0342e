//! Attention of the models: the fused grouped-query attention ops
//! ([`crate::backend::AttentionOps`]: causal for the decoder, bidirectional under a padding
//! mask for the encoder) with what a layer keeps for its backward.
//!
//! A layer keeps the attention output and its row statistics (`SavedAttention`): the
//! backward recomputes the probabilities from them, so no `(batch, heads, seq, seq)` buffer
//! outlives a call. Layouts (row-major, token-major as the projections produce them): `q`,
//! `out` `(batch*seq, heads*head_dim)`; `k`, `v` `(batch*seq, kv_heads*head_dim)`.

use crate::backend::operand::grow;
pub use crate::backend::{AttentionGrads, AttentionMask as Mask, AttentionShape};
use crate::backend::{Backend, Precision};
use crate::error::Result;
use crate::scalar::Real;

/// What one layer's attention saves for its backward: its output `(batch*seq, heads*head_dim)`
/// (the next projection's input, and the backward's `D = dO . out`) and the row statistics.
pub(crate) struct SavedAttention<B: Backend, F: Real> {
    pub(crate) out: B::Buf<F>,
    pub(crate) stats: B::Buf<F>,
}

impl<B: Backend, F: Real> SavedAttention<B, F> {
    pub(crate) fn new(be: &B) -> Result<Self> {
        Ok(SavedAttention { out: be.alloc(0)?, stats: be.alloc(0)? })
    }

    /// Grows the buffers for `s` (sizes already overflow-checked by the model).
    pub(crate) fn ensure(&mut self, be: &B, s: &AttentionShape) -> Result<()> {
        grow(be, &mut self.out, s.batch * s.seq * s.q_dim())?;
        grow(be, &mut self.stats, s.stats_len())
    }

    /// `out = softmax(scale Q K^T) V` under `mask`, saving the statistics.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &mut self,
        be: &B,
        s: &AttentionShape,
        mask: Mask<'_, B>,
        precision: Precision,
        q: &B::Buf<F>,
        k: &B::Buf<F>,
        v: &B::Buf<F>,
    ) -> Result<()> {
        let _attention = crate::perf::scope::attention();
        be.attention_forward(s, mask, precision, q, k, v, &mut self.out, &mut self.stats)
    }

    /// The gradients of `q`, `k`, `v` (overwritten) from `dout`, for the inputs of the last
    /// [`Self::forward`] (same shape, mask and precision).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward(
        &self,
        be: &B,
        s: &AttentionShape,
        mask: Mask<'_, B>,
        precision: Precision,
        q: &B::Buf<F>,
        k: &B::Buf<F>,
        v: &B::Buf<F>,
        dout: &B::Buf<F>,
        grads: AttentionGrads<'_, B, F>,
    ) -> Result<()> {
        let _attention = crate::perf::scope::attention();
        be.attention_backward(s, mask, precision, q, k, v, &self.out, &self.stats, dout, grads)
    }
}
