//! A BERT-family encoder for sentence classification on any backend, forward and
//! hand-rolled backward: word + position + token-type embeddings and LayerNorm; per layer
//! (post-LN) `a = x + o(attn(x))`, `m = LN1(a)`, `x' = LN2(m + mlp(m))` with bidirectional
//! multi-head attention under a padding mask and the GELU [`BertMlp`]; pooling (mean over
//! the real tokens, or \[CLS\]) and a dense classification head with cross-entropy.
//!
//! Everything but the planned MLP projections and the head is frozen (the paper fine-tunes
//! the MLP blocks, and the head densely with AdamW, for every method); gradients flow
//! through attention and the LayerNorms down to the lowest layer that trains.

mod adapter;
pub mod tokenizer;
pub mod weights;

use super::attention::{AttentionGrads, AttentionShape, Mask, SavedAttention};
use super::TrainingSetup;
use crate::backend::operand::{grow, to_f};
use crate::backend::Precision;
use crate::backend::{Backend, Gemm, PoolKind};
use crate::error::{Error, Result};
use crate::linear::trainable::{Linear, LinearBuilder, Method, TrainOptions};
use crate::mlp::{BertMlp, BertMlpConfig, MlpShape, ProjectionSpec};
use crate::model::weights::SplitMix64;
use crate::optim::Optimizer;
use crate::scalar::Real;
pub use weights::{BertConfig, BertLayerWeights, BertWeights};

/// Basis groups of the two MLP projections (HF: `intermediate.dense`, `output.dense`).
pub const GROUPS: [&str; 2] = ["intermediate", "output"];

/// Which MLP projections train, and how.
#[derive(Clone, Debug, PartialEq)]
pub struct BertPlan {
    /// Layers whose MLP trains (the others are frozen).
    pub layers: Vec<usize>,
    /// Method of `dense_in` (intermediate) and `dense_out` (output) in those layers.
    pub methods: [Method; 2],
    /// One basis per layer and projection (`layer.{i}.intermediate`) instead of one per
    /// projection type shared by all layers (the paper's choice).
    pub per_layer_basis: bool,
}

/// Nothing trains ([`BertPlan::frozen`]).
impl Default for BertPlan {
    fn default() -> Self {
        BertPlan::frozen()
    }
}

impl BertPlan {
    /// Only the head trains.
    pub fn frozen() -> Self {
        BertPlan { layers: Vec::new(), methods: [Method::Frozen; 2], per_layer_basis: false }
    }
    /// Every layer's MLP with `method`.
    pub fn all(config: &BertConfig, method: Method) -> Self {
        BertPlan { layers: (0..config.layers).collect(), methods: [method; 2], per_layer_basis: false }
    }
    /// Basis group of projection `j` (0 = intermediate, 1 = output) of `layer`.
    pub fn group(&self, layer: usize, j: usize) -> String {
        if self.per_layer_basis {
            format!("layer.{layer}.{}", GROUPS[j])
        } else {
            GROUPS[j].to_string()
        }
    }
}

/// The classification head: pooling, then a dense `(classes, hidden)` layer with bias.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeadConfig {
    pub classes: usize,
    pub pooling: PoolKind,
    /// The head's own optimizer (AdamW, typically with a larger learning rate than the MLPs).
    pub optimizer: Optimizer,
    /// Seeds the head's initial weight (uniform in `±0.02`; bias 0).
    pub seed: u64,
}

/// A classifier loss over a batch: summed cross-entropy and the number of sentences.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BatchLoss {
    pub sum: f64,
    pub sentences: usize,
}

impl BatchLoss {
    pub fn mean(&self) -> f64 {
        if self.sentences == 0 {
            0.0
        } else {
            self.sum / self.sentences as f64
        }
    }
}

/// Frozen weights and saved activations of one encoder layer.
struct Layer<B: Backend, F: Real> {
    q: B::Buf<F>,
    q_bias: B::Buf<F>,
    k: B::Buf<F>,
    k_bias: B::Buf<F>,
    v: B::Buf<F>,
    v_bias: B::Buf<F>,
    o: B::Buf<F>,
    o_bias: B::Buf<F>,
    ln1_w: B::Buf<F>,
    ln1_b: B::Buf<F>,
    ln2_w: B::Buf<F>,
    ln2_b: B::Buf<F>,
    mlp: BertMlp<B, F>,
    // Saved by the forward: attention inputs, output and statistics, and each LayerNorm's
    // input and statistics.
    q_act: B::Buf<F>,
    k_act: B::Buf<F>,
    v_act: B::Buf<F>,
    attn: SavedAttention<B, F>,
    ln1_in: B::Buf<F>,
    ln1_mean: B::Buf<F>,
    ln1_rstd: B::Buf<F>,
    ln2_in: B::Buf<F>,
    ln2_mean: B::Buf<F>,
    ln2_rstd: B::Buf<F>,
}

/// Buffers shared by all layers, sized for the largest batch seen.
struct Scratch<B: Backend, F: Real> {
    ids: B::Buf<u32>,
    pos_ids: B::Buf<u32>,
    type_ids: B::Buf<u32>,
    lengths: B::Buf<u32>,
    targets: B::Buf<u32>,
    ones: B::Buf<F>,
    x: B::Buf<F>,
    mid: B::Buf<F>,
    branch: B::Buf<F>,
    emb_mean: B::Buf<F>,
    emb_rstd: B::Buf<F>,
    pooled: B::Buf<F>,
    logits: B::Buf<F>,
    losses: B::Buf<F>,
    dx: B::Buf<F>,
    dtmp: B::Buf<F>,
    dnormed: B::Buf<F>,
    dq: B::Buf<F>,
    dk: B::Buf<F>,
    dv: B::Buf<F>,
    dctx: B::Buf<F>,
    dpooled: B::Buf<F>,
    /// The `(batch, seq)` the position ids were written for.
    pos_shape: (usize, usize),
}

/// A BERT classifier on backend `B`; see the module docs.
pub struct BertModel<B: Backend, F: Real = f32> {
    backend: B,
    config: BertConfig,
    /// The MLPs' operand precision; bf16 also runs attention on tensor cores.
    precision: Precision,
    word_emb: B::Buf<F>,
    pos_emb: B::Buf<F>,
    type_emb: B::Buf<F>,
    emb_ln_w: B::Buf<F>,
    emb_ln_b: B::Buf<F>,
    layers: Vec<Layer<B, F>>,
    head: Linear<B, F>,
    head_cfg: HeadConfig,
    plan: BertPlan,
    s: Scratch<B, F>,
    /// Shape of the last forward, whose activations are saved.
    last: Option<(usize, usize)>,
}

impl<B: Backend + Clone, F: Real> BertModel<B, F> {
    /// Uploads `weights`, builds every layer's MLP by `setup.plan` (SparseGrad projections
    /// take their basis from `setup.bases`, groups as [`BertPlan::group`]) and a fresh head.
    pub fn new(
        backend: &B,
        weights: &BertWeights,
        setup: &TrainingSetup<'_, BertPlan>,
        head: &HeadConfig,
    ) -> Result<Self> {
        let (plan, bases, opts) = (&setup.plan, setup.bases, &setup.options);
        weights.validate()?;
        let c = weights.config.clone();
        if let Some(&l) = plan.layers.iter().find(|&&l| l >= c.layers) {
            return Err(Error::invalid(
                "BertModel::new",
                format!("layer {l} does not exist (the model has {})", c.layers),
            ));
        }
        if head.classes < 2 {
            return Err(Error::invalid(
                "BertModel::new",
                format!("a classifier needs 2 or more classes, not {}", head.classes),
            ));
        }
        head.optimizer.validate()?;
        let mut sorted = plan.layers.clone();
        sorted.sort_unstable();
        sorted.dedup();
        let up = |v: &[f32]| backend.upload(&to_f::<F>(v));
        let mut layers = Vec::with_capacity(c.layers);
        // One SparseGrad scratch for every layer: each borrows it only inside a call.
        let sparsegrad_scratch = crate::linear::sparsegrad::SparseGradScratch::shared(backend, opts.precision)?;
        for (i, lw) in weights.layers.iter().enumerate() {
            let trains = sorted.contains(&i);
            let host = [to_f::<F>(&lw.inter), to_f::<F>(&lw.inter_bias), to_f::<F>(&lw.out), to_f::<F>(&lw.out_bias)];
            let groups = [plan.group(i, 0), plan.group(i, 1)];
            let mut specs = Vec::with_capacity(2);
            for j in 0..2 {
                let method = if trains { plan.methods[j] } else { Method::Frozen };
                let basis = match (method, bases) {
                    (Method::SparseGrad { .. }, Some(b)) => Some(b.get(&groups[j])?),
                    (Method::SparseGrad { .. }, None) => {
                        return Err(Error::invalid("BertModel::new", "SparseGrad needs the bases of the MLP groups"))
                    }
                    _ => None,
                };
                let (w, b) = (&host[2 * j], &host[2 * j + 1]);
                specs.push(ProjectionSpec { weight: w, bias: Some(b), method, group: &groups[j], basis });
            }
            let layer_opts = TrainOptions { seed: opts.seed.wrapping_add(1000 * i as u64), ..*opts };
            let mut mlp = BertMlp::new(
                backend,
                MlpShape { hidden: c.hidden, ffn: c.ffn },
                [specs[0], specs[1]],
                BertMlpConfig { gelu: c.gelu, options: layer_opts },
            )
            .map_err(|e| Error::invalid("BertModel::new", format!("layer {i} MLP: {e}")))?;
            mlp.share_sparsegrad_scratch(&sparsegrad_scratch)?;
            layers.push(Layer {
                q: up(&lw.q)?,
                q_bias: up(&lw.q_bias)?,
                k: up(&lw.k)?,
                k_bias: up(&lw.k_bias)?,
                v: up(&lw.v)?,
                v_bias: up(&lw.v_bias)?,
                o: up(&lw.o)?,
                o_bias: up(&lw.o_bias)?,
                ln1_w: up(&lw.attn_ln_w)?,
                ln1_b: up(&lw.attn_ln_b)?,
                ln2_w: up(&lw.out_ln_w)?,
                ln2_b: up(&lw.out_ln_b)?,
                mlp,
                q_act: backend.alloc(0)?,
                k_act: backend.alloc(0)?,
                v_act: backend.alloc(0)?,
                attn: SavedAttention::new(backend)?,
                ln1_in: backend.alloc(0)?,
                ln1_mean: backend.alloc(0)?,
                ln1_rstd: backend.alloc(0)?,
                ln2_in: backend.alloc(0)?,
                ln2_mean: backend.alloc(0)?,
                ln2_rstd: backend.alloc(0)?,
            });
        }
        let mut rng = SplitMix64::new(head.seed);
        let hw: Vec<F> =
            (0..head.classes * c.hidden).map(|_| F::from_f64(0.02 * (2.0 * rng.next_f32() as f64 - 1.0))).collect();
        let hb = vec![F::ZERO; head.classes];
        let head_opts = TrainOptions { optimizer: head.optimizer, precision: Precision::Full, ..*opts };
        let head_linear = LinearBuilder::new(&hw, head.classes, c.hidden)
            .bias(&hb)
            .method(Method::Full)
            .options(head_opts)
            .build(backend)?;
        let a = || backend.alloc::<F>(0);
        let u = || backend.alloc::<u32>(0);
        Ok(BertModel {
            backend: backend.clone(),
            precision: opts.precision,
            word_emb: up(&weights.word_emb)?,
            pos_emb: up(&weights.pos_emb)?,
            type_emb: up(&weights.type_emb)?,
            emb_ln_w: up(&weights.emb_ln_w)?,
            emb_ln_b: up(&weights.emb_ln_b)?,
            layers,
            head: head_linear,
            head_cfg: *head,
            plan: BertPlan { layers: sorted, ..plan.clone() },
            s: Scratch {
                ids: u()?,
                pos_ids: u()?,
                type_ids: u()?,
                lengths: u()?,
                targets: u()?,
                ones: a()?,
                x: a()?,
                mid: a()?,
                branch: a()?,
                emb_mean: a()?,
                emb_rstd: a()?,
                pooled: a()?,
                logits: a()?,
                losses: a()?,
                dx: a()?,
                dtmp: a()?,
                dnormed: a()?,
                dq: a()?,
                dk: a()?,
                dv: a()?,
                dctx: a()?,
                dpooled: a()?,
                pos_shape: (0, 0),
            },
            config: c,
            last: None,
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.config
    }
    pub fn plan(&self) -> &BertPlan {
        &self.plan
    }
    pub fn head_config(&self) -> &HeadConfig {
        &self.head_cfg
    }
    pub fn backend(&self) -> &B {
        &self.backend
    }
    pub fn mlp(&self, i: usize) -> Option<&BertMlp<B, F>> {
        self.layers.get(i).map(|l| &l.mlp)
    }
    pub fn mlp_mut(&mut self, i: usize) -> Option<&mut BertMlp<B, F>> {
        self.layers.get_mut(i).map(|l| &mut l.mlp)
    }
    pub fn head(&self) -> &Linear<B, F> {
        &self.head
    }
    /// Parameters that train in the MLPs (the budget the methods are compared at).
    pub fn mlp_trainable_parameters(&self) -> usize {
        self.layers.iter().map(|l| l.mlp.trainable_parameters()).sum()
    }
    /// All trained parameters: the MLPs' and the head's.
    pub fn trainable_parameters(&self) -> usize {
        self.mlp_trainable_parameters() + self.head.trainable_parameters()
    }

    fn ensure(&mut self, batch: usize, seq: usize) -> Result<()> {
        let (c, be) = (&self.config, &self.backend);
        let (t, h) = (batch * seq, c.hidden);
        let shape = AttentionShape { batch, seq, heads: c.heads, kv_heads: c.heads, head_dim: c.head_dim() };
        for l in &mut self.layers {
            for buf in [&mut l.q_act, &mut l.k_act, &mut l.v_act, &mut l.ln1_in, &mut l.ln2_in] {
                grow(be, buf, t * h)?;
            }
            for buf in [&mut l.ln1_mean, &mut l.ln1_rstd, &mut l.ln2_mean, &mut l.ln2_rstd] {
                grow(be, buf, t)?;
            }
            l.attn.ensure(be, &shape)?;
        }
        let s = &mut self.s;
        for buf in [&mut s.ids, &mut s.pos_ids, &mut s.type_ids] {
            grow(be, buf, t)?;
        }
        grow(be, &mut s.lengths, batch)?;
        grow(be, &mut s.targets, batch)?;
        for buf in [
            &mut s.x,
            &mut s.mid,
            &mut s.branch,
            &mut s.dx,
            &mut s.dtmp,
            &mut s.dnormed,
            &mut s.dq,
            &mut s.dk,
            &mut s.dv,
            &mut s.dctx,
        ] {
            grow(be, buf, t * h)?;
        }
        grow(be, &mut s.emb_mean, t)?;
        grow(be, &mut s.emb_rstd, t)?;
        grow(be, &mut s.pooled, batch * h)?;
        grow(be, &mut s.dpooled, batch * h)?;
        grow(be, &mut s.logits, batch * self.head_cfg.classes)?;
        grow(be, &mut s.losses, batch)?;
        if be.len(&s.ones) < batch {
            s.ones = be.upload(&vec![F::ONE; batch])?;
        }
        if s.pos_shape != (batch, seq) {
            let pos: Vec<u32> = (0..t).map(|i| (i % seq) as u32).collect();
            be.upload_into(&pos, &mut s.pos_ids)?;
            s.pos_shape = (batch, seq);
        }
        Ok(())
    }

    /// Checks a batch: `ids` `(batch, seq)`, `lengths` in `1..=seq`, ids in the vocabulary,
    /// token types (if given) in range.
    fn check_batch(&self, ids: &[u32], types: Option<&[u32]>, lengths: &[u32], batch: usize, seq: usize) -> Result<()> {
        const OP: &str = "BertModel::forward";
        let c = &self.config;
        let t = batch.checked_mul(seq).ok_or_else(|| Error::invalid(OP, "batch x seq overflows"))?;
        if ids.len() != t {
            return Err(Error::shape(OP, "ids", format!("{batch} x {seq} = {t}"), ids.len()));
        }
        if lengths.len() != batch {
            return Err(Error::shape(OP, "lengths", batch, lengths.len()));
        }
        if seq == 0 || seq > c.max_positions {
            return Err(Error::invalid(OP, format!("sequence length {seq} outside 1..={}", c.max_positions)));
        }
        if let Some((b, &n)) = lengths.iter().enumerate().find(|(_, &n)| n == 0 || n as usize > seq) {
            return Err(Error::invalid(OP, format!("sequence {b} has length {n}, outside 1..={seq}")));
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= c.vocab) {
            return Err(Error::invalid(OP, format!("token id {bad} is outside the vocabulary of {}", c.vocab)));
        }
        if let Some(types) = types {
            if types.len() != t {
                return Err(Error::shape(OP, "token types", t, types.len()));
            }
            if let Some(&bad) = types.iter().find(|&&i| i as usize >= c.type_vocab) {
                return Err(Error::invalid(OP, format!("token type {bad} outside 0..{}", c.type_vocab)));
            }
        }
        Ok(())
    }

    /// Runs the encoder and the pooling on a batch of right-padded sequences: `ids`
    /// `(batch, seq)`, `lengths[b]` real tokens each, token types all 0 unless given.
    /// Leaves the pooled `(batch, hidden)` vectors in the scratch.
    pub fn forward_pooled(
        &mut self,
        ids: &[u32],
        types: Option<&[u32]>,
        lengths: &[u32],
        batch: usize,
        seq: usize,
    ) -> Result<()> {
        self.check_batch(ids, types, lengths, batch, seq)?;
        self.last = None;
        self.ensure(batch, seq)?;
        let be = self.backend.clone();
        let c = self.config.clone();
        let (t, h) = (batch * seq, c.hidden);
        let shape = AttentionShape { batch, seq, heads: c.heads, kv_heads: c.heads, head_dim: c.head_dim() };
        let s = &mut self.s;
        be.upload_into(ids, &mut s.ids)?;
        be.upload_into(lengths, &mut s.lengths)?;
        match types {
            Some(ty) => be.upload_into(ty, &mut s.type_ids)?,
            None => be.fill(&mut s.type_ids, t, 0)?,
        }
        // Embeddings: word + position + token type, then LayerNorm (into `x`).
        be.gather_rows(&self.word_emb, c.vocab, h, &s.ids, t, &mut s.mid)?;
        be.gather_rows(&self.pos_emb, c.max_positions, h, &s.pos_ids, t, &mut s.branch)?;
        be.axpy(F::ONE, &s.branch, &mut s.mid, t * h)?;
        be.gather_rows(&self.type_emb, c.type_vocab, h, &s.type_ids, t, &mut s.branch)?;
        be.axpy(F::ONE, &s.branch, &mut s.mid, t * h)?;
        be.layernorm(
            &s.mid,
            &self.emb_ln_w,
            &self.emb_ln_b,
            &mut s.x,
            &mut s.emb_mean,
            &mut s.emb_rstd,
            t,
            h,
            c.ln_eps,
        )?;
        let mask = Mask::Padding(&s.lengths);
        for (i, l) in self.layers.iter_mut().enumerate() {
            let _layer = crate::perf::scope::layer(i);
            for (w, b, out) in
                [(&l.q, &l.q_bias, &mut l.q_act), (&l.k, &l.k_bias, &mut l.k_act), (&l.v, &l.v_bias, &mut l.v_act)]
            {
                be.gemm(&Gemm::nt(t, h, h), &s.x, w, out)?;
                be.add_bias(out, b, t, h)?;
            }
            l.attn.forward(&be, &shape, mask, self.precision, &l.q_act, &l.k_act, &l.v_act)?;
            // a = x + o(ctx) is LN1's input.
            be.copy(&s.x, &mut l.ln1_in, t * h)?;
            be.gemm(&Gemm::nt(t, h, h).beta(1.0), &l.attn.out, &l.o, &mut l.ln1_in)?;
            be.add_bias(&mut l.ln1_in, &l.o_bias, t, h)?;
            be.layernorm(&l.ln1_in, &l.ln1_w, &l.ln1_b, &mut s.mid, &mut l.ln1_mean, &mut l.ln1_rstd, t, h, c.ln_eps)?;
            l.mlp.forward(&s.mid, t, &mut s.branch)?;
            be.copy(&s.mid, &mut l.ln2_in, t * h)?;
            be.axpy(F::ONE, &s.branch, &mut l.ln2_in, t * h)?;
            be.layernorm(&l.ln2_in, &l.ln2_w, &l.ln2_b, &mut s.x, &mut l.ln2_mean, &mut l.ln2_rstd, t, h, c.ln_eps)?;
        }
        let pool = self.head_cfg.pooling;
        be.pool_rows(&s.x, &s.lengths, &mut s.pooled, batch, seq, h, pool)
    }

    /// The pooled vectors `(batch, hidden)` of a batch (sentence embeddings; no head).
    pub fn embed(&mut self, ids: &[u32], lengths: &[u32], batch: usize, seq: usize) -> Result<Vec<F>> {
        self.forward_pooled(ids, None, lengths, batch, seq)?;
        self.backend.download(&self.s.pooled, batch * self.config.hidden)
    }

    /// The head's logits `(batch, classes)` of a batch (evaluation; nothing is saved).
    pub fn logits(&mut self, ids: &[u32], lengths: &[u32], batch: usize, seq: usize) -> Result<Vec<F>> {
        self.forward_pooled(ids, None, lengths, batch, seq)?;
        let s = &mut self.s;
        self.head.forward(&s.pooled, batch, &mut s.logits)?;
        self.backend.download(&s.logits, batch * self.head_cfg.classes)
    }

    /// Forward to the cross-entropy of `labels`; leaves the loss gradient (mean over the
    /// batch, times `grad_scale`) ready for [`Self::backward`]. Reads the loss back (one
    /// synchronisation on a GPU); [`Self::train_step`] reads it once, after its step.
    pub fn forward(
        &mut self,
        ids: &[u32],
        lengths: &[u32],
        labels: &[u32],
        batch: usize,
        seq: usize,
        grad_scale: f64,
    ) -> Result<BatchLoss> {
        self.forward_queued(ids, lengths, labels, batch, seq, grad_scale)?;
        Ok(BatchLoss { sum: self.backend.sum_to_host(&self.s.losses, batch)?, sentences: batch })
    }

    /// [`Self::forward`] without reading the loss (it stays in the scratch `losses`).
    fn forward_queued(
        &mut self,
        ids: &[u32],
        lengths: &[u32],
        labels: &[u32],
        batch: usize,
        seq: usize,
        grad_scale: f64,
    ) -> Result<()> {
        let k = self.head_cfg.classes;
        if labels.len() != batch {
            return Err(Error::shape("BertModel::forward", "labels", batch, labels.len()));
        }
        if let Some(&bad) = labels.iter().find(|&&l| l as usize >= k) {
            return Err(Error::invalid("BertModel::forward", format!("label {bad} outside the {k} classes")));
        }
        let _phase = crate::perf::scope::phase(crate::perf::Phase::Forward);
        self.forward_pooled(ids, None, lengths, batch, seq)?;
        let (be, s) = (&self.backend, &mut self.s);
        self.head.forward(&s.pooled, batch, &mut s.logits)?;
        be.upload_into(labels, &mut s.targets)?;
        let gs = F::from_f64(grad_scale / batch as f64);
        be.cross_entropy(&mut s.logits, &s.targets, &s.ones, batch, k, gs, &mut s.losses)?;
        self.last = Some((batch, seq));
        Ok(())
    }

    /// Backward of the last [`Self::forward`]: the head's gradient, then down to the lowest
    /// training layer; trained projections hold their gradients afterwards.
    pub fn backward(&mut self) -> Result<()> {
        let (batch, seq) =
            self.last.ok_or_else(|| Error::invalid("BertModel::backward", "no forward to go back through"))?;
        let _phase = crate::perf::scope::phase(crate::perf::Phase::Backward);
        let (be, c) = (self.backend.clone(), self.config.clone());
        let (t, h) = (batch * seq, c.hidden);
        let shape = AttentionShape { batch, seq, heads: c.heads, kv_heads: c.heads, head_dim: c.head_dim() };
        let s = &mut self.s;
        let Some(&lowest) = self.plan.layers.first() else {
            return self.head.backward(&s.logits, batch, None);
        };
        self.head.backward(&s.logits, batch, Some(&mut s.dpooled))?;
        be.pool_rows_backward(&s.dpooled, &s.lengths, &mut s.dx, batch, seq, h, self.head_cfg.pooling)?;
        let mask = Mask::Padding(&s.lengths);
        for (i, l) in self.layers.iter_mut().enumerate().rev() {
            let _layer = crate::perf::scope::layer(i);
            // x' = LN2(m + mlp(m)): dtmp = d(m + mlp(m)).
            be.layernorm_backward(&l.ln2_in, &l.ln2_w, &l.ln2_mean, &l.ln2_rstd, &s.dx, &mut s.dtmp, t, h)?;
            if i == lowest {
                // Nothing below trains: the MLP's input gradient is not needed.
                return l.mlp.backward(&s.dtmp, t, None);
            }
            l.mlp.backward(&s.dtmp, t, Some(&mut s.dnormed))?;
            be.axpy(F::ONE, &s.dtmp, &mut s.dnormed, t * h)?;
            // m = LN1(a): dx = da, the residual's share of the layer input's gradient.
            be.layernorm_backward(&l.ln1_in, &l.ln1_w, &l.ln1_mean, &l.ln1_rstd, &s.dnormed, &mut s.dx, t, h)?;
            be.gemm(&Gemm::nn(t, h, h), &s.dx, &l.o, &mut s.dctx)?;
            let grads = AttentionGrads { dq: &mut s.dq, dk: &mut s.dk, dv: &mut s.dv, dv_half: None };
            let (q, k, v) = (&l.q_act, &l.k_act, &l.v_act);
            l.attn.backward(&be, &shape, mask, self.precision, q, k, v, &s.dctx, grads)?;
            be.gemm(&Gemm::nn(t, h, h).beta(1.0), &s.dq, &l.q, &mut s.dx)?;
            be.gemm(&Gemm::nn(t, h, h).beta(1.0), &s.dk, &l.k, &mut s.dx)?;
            be.gemm(&Gemm::nn(t, h, h).beta(1.0), &s.dv, &l.v, &mut s.dx)?;
        }
        Ok(())
    }

    /// One optimizer step of the head and every training projection.
    pub fn step(&mut self) -> Result<()> {
        let _phase = crate::perf::scope::phase(crate::perf::Phase::Optimizer);
        self.head.step()?;
        for &i in &self.plan.layers {
            let _layer = crate::perf::scope::layer(i);
            self.layers[i].mlp.step()?;
        }
        Ok(())
    }

    /// Forward, backward and step on one batch; returns its loss, read once after the
    /// step (on a GPU, the step's one synchronisation).
    pub fn train_step(
        &mut self,
        ids: &[u32],
        lengths: &[u32],
        labels: &[u32],
        batch: usize,
        seq: usize,
    ) -> Result<BatchLoss> {
        self.forward_queued(ids, lengths, labels, batch, seq, 1.0)?;
        self.backward()?;
        self.step()?;
        Ok(BatchLoss { sum: self.backend.sum_to_host(&self.s.losses, batch)?, sentences: batch })
    }
}
