//! The decoder's device buffers: each layer's frozen weights and the activations its
//! forward saves for its backward, and the scratch all layers share (sized for the largest
//! batch seen).

use crate::backend::operand::{grow, Operand};
use crate::backend::Backend;
use crate::error::Result;
use crate::mlp::{LlamaMlp, LlamaMlpScratch};
use crate::model::attention::{AttentionShape, SavedAttention};
use crate::model::config::LlamaConfig;
use crate::scalar::Real;
use half::bf16;

/// Frozen weights and saved activations of one decoder layer.
pub(super) struct Layer<B: Backend, F: Real> {
    pub(super) attn_norm: B::Buf<F>,
    pub(super) ffn_norm: B::Buf<F>,
    pub(super) q: Operand<B, F>,
    pub(super) k: Operand<B, F>,
    pub(super) v: Operand<B, F>,
    pub(super) o: Operand<B, F>,
    pub(super) mlp: LlamaMlp<B, F>,
    /// Saved by the forward for the backward: only above the lowest trained block (the
    /// others write into the model's shared set, see [`super::LlamaModel::keeps`]).
    pub(super) saved: Saved<B, F>,
}

/// What a decoder layer's forward leaves for its backward (besides its MLP's own).
pub(super) struct Saved<B: Backend, F: Real> {
    pub(super) x_in: B::Buf<F>,
    pub(super) inv_rms_attn: B::Buf<F>,
    pub(super) q_act: B::Buf<F>,
    pub(super) k_act: B::Buf<F>,
    pub(super) v_act: B::Buf<F>,
    /// The attention output (the o projection's input) and its row statistics.
    pub(super) attn: SavedAttention<B, F>,
    pub(super) x_mid: B::Buf<F>,
    pub(super) inv_rms_ffn: B::Buf<F>,
    /// In bf16 models a layer that keeps its set holds `q`, `k`, `v` (after RoPE) and the
    /// attention output rounded to bf16 instead (the attention kernels round q, k and v
    /// to bf16 anyway); they are computed in, and widened back into, the shared set.
    pub(super) q_half: B::Buf<bf16>,
    pub(super) k_half: B::Buf<bf16>,
    pub(super) v_half: B::Buf<bf16>,
    pub(super) out_half: B::Buf<bf16>,
}

impl<B: Backend, F: Real> Saved<B, F> {
    pub(super) fn new(backend: &B) -> Result<Self> {
        Ok(Saved {
            x_in: backend.alloc(0)?,
            inv_rms_attn: backend.alloc(0)?,
            q_act: backend.alloc(0)?,
            k_act: backend.alloc(0)?,
            v_act: backend.alloc(0)?,
            attn: SavedAttention::new(backend)?,
            x_mid: backend.alloc(0)?,
            inv_rms_ffn: backend.alloc(0)?,
            q_half: backend.alloc(0)?,
            k_half: backend.alloc(0)?,
            v_half: backend.alloc(0)?,
            out_half: backend.alloc(0)?,
        })
    }

    /// Grows the buffers for `t` tokens; `residual`: also the residual stream copies
    /// (`x_in`, `x_mid`), which only a backward reads; `half`: `q`, `k`, `v` and the
    /// attention output in bf16 (a kept set of a bf16 model) instead of `F`.
    pub(super) fn ensure(
        &mut self,
        be: &B,
        c: &LlamaConfig,
        shape: &AttentionShape,
        t: usize,
        residual: bool,
        half: bool,
    ) -> Result<()> {
        if residual {
            grow(be, &mut self.x_in, t * c.hidden)?;
            grow(be, &mut self.x_mid, t * c.hidden)?;
        }
        grow(be, &mut self.inv_rms_attn, t)?;
        if half {
            grow(be, &mut self.q_half, t * c.q_dim())?;
            grow(be, &mut self.k_half, t * c.kv_dim())?;
            grow(be, &mut self.v_half, t * c.kv_dim())?;
            grow(be, &mut self.out_half, t * c.q_dim())?;
            grow(be, &mut self.attn.stats, shape.stats_len())?;
        } else {
            grow(be, &mut self.q_act, t * c.q_dim())?;
            grow(be, &mut self.k_act, t * c.kv_dim())?;
            grow(be, &mut self.v_act, t * c.kv_dim())?;
            self.attn.ensure(be, shape)?;
        }
        grow(be, &mut self.inv_rms_ffn, t)
    }
}

/// Buffers shared by all layers, sized for the largest batch seen.
pub(super) struct Scratch<B: Backend, F: Real> {
    pub(super) tokens: usize,
    pub(super) ids: B::Buf<u32>,
    pub(super) targets: B::Buf<u32>,
    pub(super) mask: B::Buf<F>,
    pub(super) x: B::Buf<F>,
    pub(super) normed: B::Buf<F>,
    pub(super) normed_half: Option<B::Buf<bf16>>,
    pub(super) attn_half: Option<B::Buf<bf16>>,
    pub(super) branch: B::Buf<F>,
    pub(super) logits: B::Buf<F>,
    pub(super) losses: B::Buf<F>,
    pub(super) inv_rms_final: B::Buf<F>,
    // Backward.
    pub(super) dx: B::Buf<F>,
    pub(super) dnormed: B::Buf<F>,
    pub(super) dq: B::Buf<F>,
    pub(super) dk: B::Buf<F>,
    pub(super) dv: B::Buf<F>,
    pub(super) dattn: B::Buf<F>,
    pub(super) grad_half: Option<B::Buf<bf16>>,
    /// The saved set of the layers that keep none (see [`super::LlamaModel::keeps`]).
    pub(super) saved: Saved<B, F>,
    /// The MLP scratch every layer shares.
    pub(super) mlp: LlamaMlpScratch<B, F>,
}
