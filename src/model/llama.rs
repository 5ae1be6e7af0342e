//! A LLaMA-architecture decoder on any backend, forward and hand-rolled backward:
//! embedding, per layer `x + attn(rmsnorm(x))` then `x + mlp(rmsnorm(x))` (causal GQA
//! attention with RoPE, SwiGLU MLP), final RMSNorm, tied or separate LM head, masked
//! cross-entropy. Everything but the chosen MLP projections is frozen; gradients still
//! flow through all of it down to the lowest layer that trains (nothing below needs them).

use super::attention::{AttentionGrads, AttentionShape, Mask};
use super::config::LlamaConfig;
use super::step_graph::StepGraphs;
use super::weights::{checked_tensor, Field, LlamaSource, Tensor};

mod buffers;
mod checkpoint;
use super::TrainingSetup;
use crate::backend::operand::{grow, mm, stage, to_f, Operand, OperandRef};
use crate::backend::Precision;
use crate::backend::{Backend, Gemm};
use crate::backend::{LossScale, OutBuf};
use crate::error::{Error, Result};
use crate::linear::sparsegrad::SparseGradScratch;
use crate::linear::trainable::{Method, TrainOptions};
use crate::mlp::{LlamaMlp, LlamaMlpScratch, MlpShape, ProjectionSpec};
use crate::perf::{scope, Phase};
use crate::scalar::Real;
use buffers::{Layer, Saved, Scratch};
pub use checkpoint::MergedLlama;
use half::bf16;

/// Which MLP projections train, and how.
#[derive(Clone, Debug, PartialEq)]
pub struct MlpPlan {
    /// Layers whose MLP trains (others are frozen).
    pub layers: Vec<usize>,
    /// Method of `gate`, `up` and `down` in those layers.
    pub methods: [Method; 3],
}

/// Nothing trains ([`MlpPlan::frozen`]).
impl Default for MlpPlan {
    fn default() -> Self {
        MlpPlan::frozen()
    }
}

impl MlpPlan {
    /// Nothing trains: evaluation only.
    pub fn frozen() -> Self {
        MlpPlan { layers: Vec::new(), methods: [Method::Frozen; 3] }
    }
    /// Every `stride`-th layer starting at `stride - 1` (the paper trains every third
    /// block), all three projections with `method`.
    pub fn every(config: &LlamaConfig, stride: usize, method: Method) -> Self {
        let stride = stride.max(1);
        MlpPlan { layers: (stride - 1..config.layers).step_by(stride).collect(), methods: [method; 3] }
    }
}

/// Basis group of each MLP projection kind: one basis per kind, shared by all layers.
pub const GROUPS: [&str; 3] = ["gate", "up", "down"];

/// Masked cross-entropy summed over a batch, and the number of tokens it covers.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossSum {
    pub sum: f64,
    pub tokens: usize,
}

impl LossSum {
    pub fn mean(&self) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            self.sum / self.tokens as f64
        }
    }
}

/// One batch of next-token prediction: `batch` rows of `seq` token ids, row-major, the
/// target id of every position, and a mask (1 where the target counts in the loss, 0 on
/// padding).
#[derive(Clone, Copy, Debug)]
pub struct TokenBatch<'a> {
    pub ids: &'a [u32],
    pub targets: &'a [u32],
    pub mask: &'a [f32],
    pub batch: usize,
    pub seq: usize,
}

/// A LLaMA model on backend `B`; see the module docs.
pub struct LlamaModel<B: Backend, F: Real = f32> {
    backend: B,
    config: LlamaConfig,
    precision: Precision,
    embed: B::Buf<F>,
    /// The output projection as a GEMM operand: the embedding again when tied.
    head: Operand<B, F>,
    final_norm: B::Buf<F>,
    layers: Vec<Layer<B, F>>,
    rope_cos: B::Buf<F>,
    rope_sin: B::Buf<F>,
    rope_positions: usize,
    plan: MlpPlan,
    s: Scratch<B, F>,
    /// Shape of the last forward, whose activations are saved.
    last: Option<(usize, usize)>,
    /// The training step as a CUDA graph per (batch, seq) (see [`super::step_graph`]).
    graphs: StepGraphs<(usize, usize)>,
}

impl<B: Backend, F: Real> Drop for LlamaModel<B, F> {
    fn drop(&mut self) {
        self.graphs.clear(&self.backend);
    }
}

impl<B: Backend + Clone, F: Real> LlamaModel<B, F> {
    /// Uploads `weights` and builds every layer's MLP by `setup.plan`; SparseGrad
    /// projections take their basis from `setup.bases` (groups `gate`, `up`, `down`).
    /// `max_positions` sizes the RoPE tables (sequences may not be longer).
    ///
    /// The weights are read one tensor at a time: from a [`super::weights::LlamaCheckpoint`]
    /// the host holds one tensor's f32 copy at a time, never the whole model.
    pub fn new(
        backend: &B,
        weights: &(impl LlamaSource + ?Sized),
        setup: &TrainingSetup<'_, MlpPlan>,
        max_positions: usize,
    ) -> Result<Self> {
        let (plan, bases, opts) = (&setup.plan, setup.bases, &setup.options);
        let c = weights.config().clone();
        c.validate()?;
        if let Some(&l) = plan.layers.iter().find(|&&l| l >= c.layers) {
            return Err(Error::invalid(
                "LlamaModel::new",
                format!("layer {l} does not exist (the model has {})", c.layers),
            ));
        }
        // Sorted and unique: each planned layer steps once, in a fixed order.
        let mut sorted_layers = plan.layers.clone();
        sorted_layers.sort_unstable();
        sorted_layers.dedup();
        let p = opts.precision;
        let read = |t: Tensor| checked_tensor(weights, t);
        let up = |t: Tensor| backend.upload(&to_f::<F>(&read(t)?));
        let op = |t: Tensor| Operand::upload(backend, p, &to_f::<F>(&read(t)?));
        let mut layers = Vec::with_capacity(c.layers);
        // One SparseGrad scratch for every layer: each borrows it only inside a call.
        let sparsegrad_scratch = SparseGradScratch::shared(backend, p)?;
        for i in 0..c.layers {
            let trains = plan.layers.contains(&i);
            let mlp_weight = |f: Field| read(Tensor::Layer(i, f)).map(|w| to_f::<F>(&w));
            let (gate, upw, down) = (mlp_weight(Field::Gate)?, mlp_weight(Field::Up)?, mlp_weight(Field::Down)?);
            let mut specs = Vec::with_capacity(3);
            for (j, w) in [&gate, &upw, &down].into_iter().enumerate() {
                let method = if trains { plan.methods[j] } else { Method::Frozen };
                let basis = match (method, bases) {
                    (Method::SparseGrad { .. }, Some(b)) => Some(b.get(GROUPS[j])?),
                    (Method::SparseGrad { .. }, None) => {
                        return Err(Error::invalid("LlamaModel::new", "SparseGrad needs bases for gate, up and down"))
                    }
                    _ => None,
                };
                specs.push(ProjectionSpec { weight: w.as_slice(), bias: None, method, group: GROUPS[j], basis });
            }
            let layer_opts = TrainOptions { seed: opts.seed.wrapping_add(1000 * i as u64), ..*opts };
            let mut mlp = LlamaMlp::new(
                backend,
                MlpShape { hidden: c.hidden, ffn: c.ffn },
                [specs[0], specs[1], specs[2]],
                &layer_opts,
            )
            .map_err(|e| e.context(&format!("layer {i} MLP")))?;
            mlp.share_sparsegrad_scratch(&sparsegrad_scratch)?;
            // The MLP's copies go before the attention weights are read.
            drop(specs);
            drop((gate, upw, down));
            let t = |f: Field| Tensor::Layer(i, f);
            layers.push(Layer {
                attn_norm: up(t(Field::AttnNorm))?,
                ffn_norm: up(t(Field::FfnNorm))?,
                q: op(t(Field::Q))?,
                k: op(t(Field::K))?,
                v: op(t(Field::V))?,
                o: op(t(Field::O))?,
                mlp,
                saved: Saved::new(backend)?,
            });
        }
        let (cos, sin) =
            super::rope::rope_tables::<F>(max_positions.max(1), c.head_dim, c.rope_theta, c.rope_scaling.as_ref());
        let half = p == Precision::Bf16;
        let opt_half = |len: usize| -> Result<Option<B::Buf<bf16>>> {
            if half {
                Ok(Some(backend.alloc(len)?))
            } else {
                Ok(None)
            }
        };
        Ok(LlamaModel {
            backend: backend.clone(),
            precision: p,
            embed: up(Tensor::Embed)?,
            head: op(Tensor::Output)?,
            final_norm: up(Tensor::FinalNorm)?,
            layers,
            rope_cos: backend.upload(&cos)?,
            rope_sin: backend.upload(&sin)?,
            rope_positions: max_positions.max(1),
            plan: MlpPlan { layers: sorted_layers, methods: plan.methods },
            s: Scratch {
                tokens: 0,
                ids: backend.alloc(0)?,
                targets: backend.alloc(0)?,
                mask: backend.alloc(0)?,
                x: backend.alloc(0)?,
                normed: backend.alloc(0)?,
                normed_half: opt_half(0)?,
                attn_half: opt_half(0)?,
                branch: backend.alloc(0)?,
                logits: backend.alloc(0)?,
                losses: backend.alloc(0)?,
                inv_rms_final: backend.alloc(0)?,
                dx: backend.alloc(0)?,
                dnormed: backend.alloc(0)?,
                dq: backend.alloc(0)?,
                dk: backend.alloc(0)?,
                dv: backend.alloc(0)?,
                dattn: backend.alloc(0)?,
                grad_half: opt_half(0)?,
                saved: Saved::new(backend)?,
                mlp: LlamaMlpScratch::new(backend)?,
            },
            config: c,
            last: None,
            graphs: StepGraphs::new(true),
        })
    }

    /// Whether [`Self::train_step`] captures its step as a CUDA graph per batch shape and
    /// replays it (on by default; the CPU backend always runs eagerly). Results are
    /// bit-identical either way.
    pub fn cuda_graphs(&self) -> bool {
        self.graphs.enabled()
    }

    /// Turns CUDA graphs of the training step on or off.
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.graphs.set_enabled(&self.backend, on);
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }
    pub fn plan(&self) -> &MlpPlan {
        &self.plan
    }
    pub fn backend(&self) -> &B {
        &self.backend
    }
    /// The MLP of layer `i`.
    pub fn mlp(&self, i: usize) -> Option<&LlamaMlp<B, F>> {
        self.layers.get(i).map(|l| &l.mlp)
    }
    pub fn mlp_mut(&mut self, i: usize) -> Option<&mut LlamaMlp<B, F>> {
        self.layers.get_mut(i).map(|l| &mut l.mlp)
    }
    /// Parameters that train (the MLP projections of the planned layers).
    pub fn trainable_parameters(&self) -> usize {
        self.layers.iter().map(|l| l.mlp.trainable_parameters()).sum()
    }

    /// Whether layer `i` keeps its own saved set: only above the lowest trained block
    /// (`lowest`), the layers a backward goes through.
    fn keeps(lowest: Option<usize>, i: usize) -> bool {
        lowest.is_some_and(|lo| i > lo)
    }

    fn ensure(&mut self, batch: usize, seq: usize) -> Result<()> {
        if seq > self.rope_positions {
            return Err(Error::invalid(
                "LlamaModel",
                format!("sequence length {seq} exceeds the {} positions the model was built for", self.rope_positions),
            ));
        }
        let c = &self.config;
        // Every buffer size below is a product of these; checked once so none wraps.
        let widest = c.vocab.max(c.hidden).max(c.q_dim()).max(c.ffn);
        // (The attention statistics, 2 t heads, are below t * q_dim * 2 <= t * widest * 2.)
        let sizes = batch.checked_mul(seq).and_then(|t| Some((t, t.checked_mul(widest)?.checked_mul(2)?)));
        let Some((t, _)) = sizes else {
            return Err(Error::invalid(
                "LlamaModel",
                format!("batch {batch} x sequence length {seq} overflows the activation sizes"),
            ));
        };
        let be = &self.backend;
        let shape = AttentionShape { batch, seq, heads: c.heads, kv_heads: c.kv_heads, head_dim: c.head_dim };
        let lowest = self.plan.layers.first().copied();
        let half = self.precision == Precision::Bf16;
        for (i, l) in self.layers.iter_mut().enumerate() {
            if Self::keeps(lowest, i) {
                l.saved.ensure(be, c, &shape, t, true, half)?;
            }
        }
        let s = &mut self.s;
        // The shared set: for the layers that keep none, and in bf16 where the kept sets'
        // q, k, v and attention output are computed before they are rounded.
        let keeping = (0..c.layers).filter(|&i| Self::keeps(lowest, i)).count();
        if keeping < c.layers || (half && keeping > 0) {
            s.saved.ensure(be, c, &shape, t, false, false)?;
        }
        let below = lowest.is_none_or(|lo| lo > 0);
        // bf16 MLPs compute `a` and `b` in the scratch and save them rounded.
        let mlp_shape = MlpShape { hidden: c.hidden, ffn: c.ffn };
        s.mlp.ensure(be, t, mlp_shape, below || half, half)?;
        // The SparseGrad blocks' batched selections (the most any block needs).
        let selections = self.layers.iter().map(|l| l.mlp.selection_buffers()).max().unwrap_or(0);
        s.mlp.ensure_selections(be, selections, mlp_shape)?;
        if t <= s.tokens {
            return Ok(());
        }
        let width = c.hidden.max(c.q_dim());
        grow(be, &mut s.ids, t)?;
        grow(be, &mut s.targets, t)?;
        grow(be, &mut s.mask, t)?;
        for buf in [&mut s.x, &mut s.normed, &mut s.branch, &mut s.dx, &mut s.dnormed] {
            grow(be, buf, t * c.hidden)?;
        }
        for buf in [&mut s.dq, &mut s.dattn] {
            grow(be, buf, t * c.q_dim())?;
        }
        for buf in [&mut s.dk, &mut s.dv] {
            grow(be, buf, t * c.kv_dim())?;
        }
        grow(be, &mut s.logits, t * c.vocab)?;
        grow(be, &mut s.losses, t)?;
        grow(be, &mut s.inv_rms_final, t)?;
        for h in [&mut s.normed_half, &mut s.attn_half].into_iter().flatten() {
            grow(be, h, t * width)?;
        }
        if let Some(h) = s.grad_half.as_mut() {
            grow(be, h, t * c.vocab.max(c.q_dim()).max(c.kv_dim()).max(c.hidden))?;
        }
        s.tokens = t;
        Ok(())
    }

    /// Checks `ids` (`batch` rows of `seq` tokens), grows the buffers for the shape and
    /// uploads them: everything of a forward that is not queued device work.
    fn prepare_ids(&mut self, ids: &[u32], batch: usize, seq: usize) -> Result<()> {
        let t = batch * seq;
        if ids.len() != t {
            return Err(Error::shape("LlamaModel::forward", "ids", format!("{batch} x {seq} = {t}"), ids.len()));
        }
        let vocab = self.config.vocab;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(Error::invalid(
                "LlamaModel::forward",
                format!("token id {bad} is outside the vocabulary of {vocab}"),
            ));
        }
        self.last = None;
        self.ensure(batch, seq)?;
        self.backend.upload_into(ids, &mut self.s.ids)
    }

    /// Runs the decoder on `batch` rows of `seq` token ids up to the final norm, whose
    /// output is left in the scratch `normed`.
    fn forward_hidden(&mut self, ids: &[u32], batch: usize, seq: usize) -> Result<()> {
        self.prepare_ids(ids, batch, seq)?;
        self.hidden_queued(batch, seq)
    }

    /// [`Self::forward_hidden`] on the ids already uploaded (queued device work only).
    fn hidden_queued(&mut self, batch: usize, seq: usize) -> Result<()> {
        let t = batch * seq;
        let vocab = self.config.vocab;
        let be = self.backend.clone();
        let c = self.config.clone();
        let shape = AttentionShape { batch, seq, heads: c.heads, kv_heads: c.kv_heads, head_dim: c.head_dim };
        let half = self.precision == Precision::Bf16;
        let s = &mut self.s;
        be.gather_rows(&self.embed, vocab, c.hidden, &s.ids, t, &mut s.x)?;
        let lowest = self.plan.layers.first().copied();
        // Each residual add is folded into the norm that reads its sum: `branch` holds the
        // last MLP's output, still to be added into `x`, when this is set.
        let mut mlp_pending = false;
        for (i, l) in self.layers.iter_mut().enumerate() {
            let _layer = scope::layer(i);
            let keeps = Self::keeps(lowest, i);
            // Below the lowest trained block (and in it, whose backward stops at its MLP)
            // nothing is read back: the shared set takes the outputs.
            // A bf16 layer that keeps its set computes q, k, v and the attention output in
            // the shared set and keeps them rounded (its statistics land in its own set).
            let rounds = keeps && half;
            let inv_rms = if keeps { &mut l.saved.inv_rms_attn } else { &mut s.saved.inv_rms_attn };
            let x_in = if keeps { Some(&mut l.saved.x_in) } else { None };
            let mlp_out = mlp_pending.then_some(&s.branch);
            // The norm's output only feeds the q, k, v GEMMs: in bf16 it is written in bf16.
            let (x, w, eps) = (&mut s.x, &l.attn_norm, c.rms_eps);
            let a = match s.normed_half.as_mut() {
                Some(h) => {
                    be.add_rmsnorm(x, mlp_out, x_in, w, OutBuf::Half(h), inv_rms, t, c.hidden, eps)?;
                    OperandRef::Half(&*h)
                }
                None => {
                    be.add_rmsnorm(x, mlp_out, x_in, w, OutBuf::Full(&mut s.normed), inv_rms, t, c.hidden, eps)?;
                    OperandRef::Full(&s.normed)
                }
            };
            if rounds {
                std::mem::swap(&mut l.saved.attn.stats, &mut s.saved.attn.stats);
            }
            let sv = if keeps && !half { &mut l.saved } else { &mut s.saved };
            mm(&be, &Gemm::nt(t, c.q_dim(), c.hidden), a, l.q.as_ref(), &mut sv.q_act)?;
            mm(&be, &Gemm::nt(t, c.kv_dim(), c.hidden), a, l.k.as_ref(), &mut sv.k_act)?;
            mm(&be, &Gemm::nt(t, c.kv_dim(), c.hidden), a, l.v.as_ref(), &mut sv.v_act)?;
            let (q, k) = (&mut sv.q_act, &mut sv.k_act);
            let (cos, sin) = (&self.rope_cos, &self.rope_sin);
            be.rope_qk(q, c.heads, k, c.kv_heads, t, c.head_dim, seq, cos, sin, false, None)?;
            let attended = sv.attn.forward(&be, &shape, Mask::Causal, self.precision, &sv.q_act, &sv.k_act, &sv.v_act);
            if rounds {
                std::mem::swap(&mut l.saved.attn.stats, &mut s.saved.attn.stats);
            }
            attended?;
            if rounds {
                let (sh, ls) = (&s.saved, &mut l.saved);
                be.cast_to_bf16_x4(
                    [&sh.q_act, &sh.k_act, &sh.v_act, &sh.attn.out],
                    [&mut ls.q_half, &mut ls.k_half, &mut ls.v_half, &mut ls.out_half],
                    [t * c.q_dim(), t * c.kv_dim(), t * c.kv_dim(), t * c.q_dim()],
                )?;
            }
            // A layer that keeps a bf16 set has just rounded the attention output into it: the
            // same bits the staging cast would write.
            let o_in = if rounds {
                OperandRef::Half(&l.saved.out_half)
            } else {
                let sv = if keeps && !half { &l.saved } else { &s.saved };
                stage(&be, &sv.attn.out, s.attn_half.as_mut(), t * c.q_dim())?
            };
            mm(&be, &Gemm::nt(t, c.hidden, c.q_dim()), o_in, l.o.as_ref(), &mut s.branch)?;
            let inv_rms = if keeps { &mut l.saved.inv_rms_ffn } else { &mut s.saved.inv_rms_ffn };
            let x_mid = if keeps { Some(&mut l.saved.x_mid) } else { None };
            let (x, y) = (&mut s.x, OutBuf::Full(&mut s.normed));
            be.add_rmsnorm(x, Some(&s.branch), x_mid, &l.ffn_norm, y, inv_rms, t, c.hidden, c.rms_eps)?;
            let mlp_saves = lowest.is_some_and(|lo| i >= lo);
            l.mlp.forward_shared(&s.normed, t, &mut s.branch, &mut s.mlp, mlp_saves)?;
            mlp_pending = true;
        }
        // The final norm's input stays in `x` for the backward.
        let (x, y, mlp_out) = (&mut s.x, OutBuf::Full(&mut s.normed), mlp_pending.then_some(&s.branch));
        be.add_rmsnorm(x, mlp_out, None, &self.final_norm, y, &mut s.inv_rms_final, t, c.hidden, c.rms_eps)
    }

    /// `logits = normed head^T` for `t` tokens.
    fn head_logits(&mut self, t: usize) -> Result<()> {
        let (be, c, s) = (&self.backend, &self.config, &mut self.s);
        let h = stage(be, &s.normed, s.normed_half.as_mut(), t * c.hidden)?;
        mm(be, &Gemm::nt(t, c.vocab, c.hidden), h, self.head.as_ref(), &mut s.logits)
    }

    /// Forward of a batch to the masked cross-entropy; leaves the loss gradient of the
    /// logits (scaled by `grad_scale`) ready for [`Self::backward`]. Reads the loss back
    /// (one synchronisation on a GPU); [`Self::train_step`] reads it once, after its step.
    pub fn forward(&mut self, tokens: &TokenBatch<'_>, grad_scale: f64) -> Result<LossSum> {
        let counted = self.prepare_batch(tokens)?;
        let (batch, seq) = (tokens.batch, tokens.seq);
        self.forward_queued(batch, seq, LossScale::Fixed(F::from_f64(grad_scale)))?;
        Ok(LossSum { sum: self.backend.sum_to_host(&self.s.losses, batch * seq)?, tokens: counted })
    }

    /// Checks a batch, grows the buffers for its shape and uploads ids, targets and mask.
    /// Returns the number of tokens whose loss counts.
    fn prepare_batch(&mut self, tokens: &TokenBatch<'_>) -> Result<usize> {
        let TokenBatch { ids, targets, mask, batch, seq } = *tokens;
        let t = batch * seq;
        for (what, len) in [("targets", targets.len()), ("mask", mask.len())] {
            if len != t {
                return Err(Error::shape("LlamaModel::forward", what, format!("{batch} x {seq} = {t}"), len));
            }
        }
        self.prepare_ids(ids, batch, seq)?;
        let (be, s) = (&self.backend, &mut self.s);
        be.upload_into(targets, &mut s.targets)?;
        be.upload_into(&mask.iter().map(|&m| F::from_f64(m as f64)).collect::<Vec<F>>(), &mut s.mask)?;
        Ok(mask.iter().filter(|&&m| m != 0.0).count())
    }

    /// The forward of the batch [`Self::prepare_batch`] uploaded, queued: the per-token
    /// losses stay in the scratch `losses`.
    fn forward_queued(&mut self, batch: usize, seq: usize, scale: LossScale<F>) -> Result<()> {
        let _phase = scope::phase(Phase::Forward);
        let t = batch * seq;
        self.hidden_queued(batch, seq)?;
        self.head_logits(t)?;
        let (be, vocab, s) = (&self.backend, self.config.vocab, &mut self.s);
        be.cross_entropy(&mut s.logits, &s.targets, &s.mask, t, vocab, scale, &mut s.losses)?;
        self.last = Some((batch, seq));
        Ok(())
    }

    /// Backward of the last forward down to the lowest training layer; trained
    /// projections hold their gradients afterwards (call [`Self::step`]).
    pub fn backward(&mut self) -> Result<()> {
        let (batch, seq) =
            self.last.ok_or_else(|| Error::invalid("LlamaModel::backward", "no forward to go back through"))?;
        let Some(&lowest) = self.plan.layers.iter().min() else { return Ok(()) };
        let _phase = scope::phase(Phase::Backward);
        let (be, c) = (self.backend.clone(), self.config.clone());
        let t = batch * seq;
        let shape = AttentionShape { batch, seq, heads: c.heads, kv_heads: c.kv_heads, head_dim: c.head_dim };
        let half = self.precision == Precision::Bf16;
        let s = &mut self.s;
        // Through the LM head and the final norm: dx = rmsnorm'(x_L) (dlogits E).
        let dlogits = stage(&be, &s.logits, s.grad_half.as_mut(), t * c.vocab)?;
        mm(&be, &Gemm::nn(t, c.hidden, c.vocab), dlogits, self.head.as_ref(), &mut s.dnormed)?;
        be.rmsnorm_backward(&s.x, &self.final_norm, &s.inv_rms_final, &s.dnormed, &mut s.dx, t, c.hidden)?;
        for (i, l) in self.layers.iter_mut().enumerate().rev() {
            if i < lowest {
                break;
            }
            let _layer = scope::layer(i);
            // MLP branch: x_out = x_mid + mlp(rmsnorm(x_mid)).
            if i == lowest {
                // Nothing below trains: the input gradient is not needed.
                l.mlp.backward_shared(&s.dx, t, None, &mut s.mlp)?;
                break;
            }
            // The MLP's input gradient stays in two parts (gate's, up's); the norm's backward adds them.
            l.mlp.backward_split(&s.dx, t, &mut s.dnormed, &mut s.mlp)?;
            let sv = &l.saved;
            // The new dx feeds the attention branch's first GEMM: in bf16 the same pass rounds it.
            let (x_mid, inv, up_part) = (&sv.x_mid, &sv.inv_rms_ffn, Some(s.mlp.dx_up()));
            let dx_half = s.grad_half.as_mut();
            be.rmsnorm_backward_add(x_mid, &l.ffn_norm, inv, &s.dnormed, up_part, &mut s.dx, dx_half, t, c.hidden)?;
            // Attention branch: x_mid = x_in + o(attn(rmsnorm(x_in))).
            let dx_op = match s.grad_half.as_ref() {
                Some(h) => OperandRef::Half(h),
                None => OperandRef::Full(&s.dx),
            };
            mm(&be, &Gemm::nn(t, c.q_dim(), c.hidden), dx_op, l.o.as_ref(), &mut s.dattn)?;
            if half {
                // The kept bf16 set, widened into the shared one (with this layer's statistics).
                let sh = &mut s.saved;
                be.cast_from_bf16_x4(
                    [&sv.q_half, &sv.k_half, &sv.v_half, &sv.out_half],
                    [&mut sh.q_act, &mut sh.k_act, &mut sh.v_act, &mut sh.attn.out],
                    [t * c.q_dim(), t * c.kv_dim(), t * c.kv_dim(), t * c.q_dim()],
                )?;
                std::mem::swap(&mut l.saved.attn.stats, &mut sh.attn.stats);
                // The kept bf16 v is spent: dv's bf16 operand for the V GEMM goes there.
                let dv_half = Some(&mut l.saved.v_half);
                let grads = AttentionGrads { dq: &mut s.dq, dk: &mut s.dk, dv: &mut s.dv, dv_half };
                let (q, k, v) = (&sh.q_act, &sh.k_act, &sh.v_act);
                let r = sh.attn.backward(&be, &shape, Mask::Causal, self.precision, q, k, v, &s.dattn, grads);
                std::mem::swap(&mut l.saved.attn.stats, &mut sh.attn.stats);
                r?;
            } else {
                let grads = AttentionGrads { dq: &mut s.dq, dk: &mut s.dk, dv: &mut s.dv, dv_half: None };
                let (q, k, v) = (&sv.q_act, &sv.k_act, &sv.v_act);
                sv.attn.backward(&be, &shape, Mask::Causal, self.precision, q, k, v, &s.dattn, grads)?;
            }
            let sv = &l.saved;
            // dq and dk feed the q and k GEMMs next: in bf16 the rotation rounds them too (dk
            // into the attention staging buffer, free in the backward).
            let halves = s.grad_half.as_mut().zip(s.attn_half.as_mut());
            let (cos, sin) = (&self.rope_cos, &self.rope_sin);
            be.rope_qk(&mut s.dq, c.heads, &mut s.dk, c.kv_heads, t, c.head_dim, seq, cos, sin, true, halves)?;
            let (dq, dk) = match (s.grad_half.as_ref(), s.attn_half.as_ref()) {
                (Some(qh), Some(kh)) => (OperandRef::Half(qh), OperandRef::Half(kh)),
                _ => (OperandRef::Full(&s.dq), OperandRef::Full(&s.dk)),
            };
            mm(&be, &Gemm::nn(t, c.hidden, c.q_dim()), dq, l.q.as_ref(), &mut s.dnormed)?;
            mm(&be, &Gemm::nn(t, c.hidden, c.kv_dim()).beta(1.0), dk, l.k.as_ref(), &mut s.dnormed)?;
            let dv = if half { OperandRef::Half(&sv.v_half) } else { OperandRef::Full(&s.dv) };
            mm(&be, &Gemm::nn(t, c.hidden, c.kv_dim()).beta(1.0), dv, l.v.as_ref(), &mut s.dnormed)?;
            be.rmsnorm_backward_add(
                &sv.x_in,
                &l.attn_norm,
                &sv.inv_rms_attn,
                &s.dnormed,
                None,
                &mut s.dx,
                None,
                t,
                c.hidden,
            )?;
        }
        Ok(())
    }

    /// One optimizer step of every training projection.
    pub fn step(&mut self) -> Result<()> {
        let _phase = scope::phase(Phase::Optimizer);
        for &i in &self.plan.layers {
            let _layer = scope::layer(i);
            self.layers[i].mlp.step()?;
        }
        Ok(())
    }

    /// Forward, backward and step on one batch; returns its loss (mean over its tokens).
    /// The batch is uploaded, the step queued (on CUDA, from the second step of a shape on,
    /// as one replay of a captured graph, see [`Self::set_cuda_graphs`]) and the loss read
    /// back once, after the step, with any deferred device error: on a GPU the step's one
    /// synchronisation.
    pub fn train_step(&mut self, tokens: &TokenBatch<'_>) -> Result<LossSum> {
        let counted = self.prepare_batch(tokens)?;
        let (batch, seq) = (tokens.batch, tokens.seq);
        let mut graphs = std::mem::replace(&mut self.graphs, StepGraphs::new(false));
        let be = self.backend.clone();
        let ran = graphs.run(&be, (batch, seq), || {
            self.forward_queued(batch, seq, LossScale::MeanOverMask)?;
            self.backward()?;
            self.step()
        });
        self.graphs = graphs;
        if ran? {
            // The replay ran the step on the device; the host side counts it as `step` would.
            self.last = Some((batch, seq));
            for &i in &self.plan.layers {
                self.layers[i].mlp.count_replayed_step();
            }
        }
        Ok(LossSum { sum: self.backend.sum_to_host(&self.s.losses, batch * seq)?, tokens: counted })
    }

    /// Logits `(seq, vocab)` of one sequence (no loss): for generation and checks.
    pub fn logits(&mut self, ids: &[u32]) -> Result<Vec<F>> {
        let n = ids.len();
        self.forward_hidden(ids, 1, n)?;
        self.head_logits(n)?;
        self.backend.download(&self.s.logits, n * self.config.vocab)
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }
}
