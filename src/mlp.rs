//! Transformer MLP blocks with a hand-rolled backward pass, on any backend:
//! - [`BertMlp`]: `dense_out(gelu(dense_in(x)))` with biases (BERT/RoBERTa 768->3072->768,
//!   GELU in the erf form BERT uses, tanh form selectable);
//! - [`LlamaMlp`]: `down(silu(gate(x)) * up(x))`, no biases (LLaMA 4096->11008->4096);
//!   all three projections can train (the official code leaves `gate` frozen).
//!
//! Each projection is a [`Linear`] trained by its own [`Method`]. The block saves only what
//! its own backward needs (the pre-activations); each projection saves its own input only
//! if it computes a weight gradient. `dx` is always exact. In the preliminary phase
//! (projections in [`Method::Collect`]) [`BertMlp::collect`] / [`LlamaMlp::collect`] hand each
//! step's dense weight gradients to the Gram accumulator of the projection's group (on the
//! host), [`BertMlp::collect_grams`] / [`LlamaMlp::collect_grams`] to a [`GramSet`] (on the
//! device for a device backend).

use crate::backend::operand::{grow, OperandRef};
use crate::backend::Precision;
use crate::backend::{Backend, GeluKind};
use crate::basis::{Basis, GramAccumulator, GramSet};
use crate::error::{Error, Result};
use crate::linear::dense::Bf16Staging;
use crate::linear::sparsegrad::Selecting;
use crate::linear::trainable::{select_pending, step_in_batches, Linear, LinearBuilder, Method, TrainOptions};
use crate::linear::{GradY, GRAD_Y};
use crate::scalar::Real;
use half::bf16;
use std::collections::BTreeMap;

/// How to build one projection of a block.
#[derive(Clone, Copy, Debug)]
pub struct ProjectionSpec<'a, F> {
    /// Dense weight `(out, in)`.
    pub weight: &'a [F],
    pub bias: Option<&'a [F]>,
    pub method: Method,
    /// Basis group this projection belongs to (e.g. `up`, or `layers.3.up` for per-layer bases).
    pub group: &'a str,
    /// The group's basis, required by [`Method::SparseGrad`].
    pub basis: Option<&'a Basis>,
}

/// An MLP block's widths: the model's `hidden` size and the inner `ffn` size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MlpShape {
    pub hidden: usize,
    pub ffn: usize,
}

/// Construction options of a [`BertMlp`] besides its shape and projections (default: exact
/// erf GELU, default [`TrainOptions`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BertMlpConfig {
    pub gelu: GeluKind,
    /// How every trainable projection of the block trains.
    pub options: TrainOptions,
}

/// A block's projection with its group name.
pub struct Projection<B: Backend, F: Real> {
    pub name: &'static str,
    pub group: String,
    pub method: Method,
    pub linear: Linear<B, F>,
}

impl<B: Backend + Clone, F: Real> Projection<B, F> {
    fn new(
        backend: &B,
        name: &'static str,
        spec: &ProjectionSpec<'_, F>,
        out: usize,
        inp: usize,
        opts: &TrainOptions,
    ) -> Result<Self> {
        let mut builder = LinearBuilder::new(spec.weight, out, inp).method(spec.method).options(*opts);
        if let Some(b) = spec.bias {
            builder = builder.bias(b);
        }
        if let Some(b) = spec.basis {
            builder = builder.basis(b);
        }
        let linear = builder.build(backend).map_err(|e| e.context(name))?;
        Ok(Projection { name, group: spec.group.to_string(), method: spec.method, linear })
    }

    /// Adds this step's dense weight gradient to the accumulator of its group.
    fn collect(&self, accs: &mut BTreeMap<String, GramAccumulator>) -> Result<()> {
        if self.method != Method::Collect {
            return Ok(());
        }
        let g: Vec<f32> = self.linear.dense_grad_host()?.into_iter().map(|v| v.to_f64() as f32).collect();
        let (out, inp) = (self.linear.out_features(), self.linear.in_features());
        accs.entry(self.group.clone()).or_insert_with(|| GramAccumulator::new(out, inp)).add(&g)
    }

    /// Adds this step's dense weight gradient to its group in `set`, where the set keeps
    /// its Grams (on the device: no copy of the gradient).
    fn collect_grams(&self, set: &mut GramSet<B, F>) -> Result<()> {
        if self.method != Method::Collect {
            return Ok(());
        }
        let (out, inp) = (self.linear.out_features(), self.linear.in_features());
        set.add(&self.group, self.linear.dense_grad()?, out, inp)
    }
}

/// BERT/RoBERTa MLP: `dense_out(gelu(dense_in(x)))`.
pub struct BertMlp<B: Backend, F: Real = f32> {
    backend: B,
    hidden: usize,
    ffn: usize,
    gelu: GeluKind,
    pub dense_in: Projection<B, F>,
    pub dense_out: Projection<B, F>,
    /// `pre = dense_in(x)` (saved), `act = gelu(pre)`, and the backward's `d_act`, `d_pre`.
    pre: B::Buf<F>,
    act: B::Buf<F>,
    d_act: B::Buf<F>,
    d_pre: B::Buf<F>,
    saved_tokens: Option<usize>,
}

impl<B: Backend + Clone, F: Real> BertMlp<B, F> {
    /// Its SparseGrad projections borrow `scratch` (see [`SparseGradLinear::share_scratch`]).
    ///
    /// [`SparseGradLinear::share_scratch`]: crate::linear::sparsegrad::SparseGradLinear::share_scratch
    pub fn share_sparsegrad_scratch(&mut self, scratch: &crate::linear::sparsegrad::SharedScratch<B, F>) -> Result<()> {
        for p in [&mut self.dense_in, &mut self.dense_out] {
            p.linear.share_sparsegrad_scratch(scratch)?;
        }
        Ok(())
    }

    /// `dense_in` is `(ffn, hidden)`, `dense_out` `(hidden, ffn)`, both with biases.
    pub fn new(
        backend: &B,
        shape: MlpShape,
        [dense_in, dense_out]: [ProjectionSpec<'_, F>; 2],
        config: BertMlpConfig,
    ) -> Result<Self> {
        let MlpShape { hidden, ffn } = shape;
        let BertMlpConfig { gelu, options } = config;
        let opts = &options;
        Ok(BertMlp {
            backend: backend.clone(),
            hidden,
            ffn,
            gelu,
            dense_in: Projection::new(backend, "dense_in", &dense_in, ffn, hidden, opts)?,
            dense_out: Projection::new(backend, "dense_out", &dense_out, hidden, ffn, opts)?,
            pre: backend.alloc(0)?,
            act: backend.alloc(0)?,
            d_act: backend.alloc(0)?,
            d_pre: backend.alloc(0)?,
            saved_tokens: None,
        })
    }

    pub fn projections(&self) -> [&Projection<B, F>; 2] {
        [&self.dense_in, &self.dense_out]
    }
    pub fn projections_mut(&mut self) -> [&mut Projection<B, F>; 2] {
        [&mut self.dense_in, &mut self.dense_out]
    }

    pub fn forward(&mut self, x: &B::Buf<F>, tokens: usize, y: &mut B::Buf<F>) -> Result<()> {
        let (be, n) = (&self.backend, tokens * self.ffn);
        self.saved_tokens = None;
        for buf in [&mut self.pre, &mut self.act, &mut self.d_act, &mut self.d_pre] {
            grow(be, buf, n)?;
        }
        self.dense_in.linear.forward(x, tokens, &mut self.pre)?;
        be.gelu(&self.pre, &mut self.act, n, self.gelu)?;
        self.dense_out.linear.forward(&self.act, tokens, y)?;
        self.saved_tokens = Some(tokens);
        Ok(())
    }

    pub fn backward(&mut self, g: &B::Buf<F>, tokens: usize, dx: Option<&mut B::Buf<F>>) -> Result<()> {
        if self.saved_tokens != Some(tokens) {
            return Err(Error::invalid(
                "BertMlp::backward",
                format!("no forward of {tokens} tokens to go back through"),
            ));
        }
        let n = tokens * self.ffn;
        self.dense_out.linear.backward(g, tokens, Some(&mut self.d_act))?;
        self.backend.gelu_backward(&self.pre, &self.d_act, &mut self.d_pre, n, self.gelu)?;
        self.dense_in.linear.backward(&self.d_pre, tokens, dx)
    }

    pub fn step(&mut self) -> Result<()> {
        self.dense_in.linear.step()?;
        self.dense_out.linear.step()
    }

    pub fn trainable_parameters(&self) -> usize {
        self.projections().iter().map(|p| p.linear.trainable_parameters()).sum()
    }

    /// Preliminary phase: adds the dense weight gradients of `Collect` projections.
    pub fn collect(&self, accs: &mut BTreeMap<String, GramAccumulator>) -> Result<()> {
        self.projections().iter().try_for_each(|p| p.collect(accs))
    }

    /// Preliminary phase: adds the dense weight gradients of `Collect` projections to
    /// `set` (on the device for a device backend, see [`GramSet`]).
    pub fn collect_grams(&self, set: &mut GramSet<B, F>) -> Result<()> {
        self.projections().iter().try_for_each(|p| p.collect_grams(set))
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }
    pub fn ffn(&self) -> usize {
        self.ffn
    }
}

/// The buffers a [`LlamaMlp`] needs only while it runs: `h = silu(a) * b` (the `down`
/// projection saves its own input when it trains) and the backward's `dh`, `da`, `db` and
/// `dx_up`; and `a`, `b` of blocks that save nothing (below the lowest trained block). A
/// model shares one set among all its layers, sized for the largest (see
/// [`LlamaMlp::forward_shared`]); a block used alone keeps its own.
pub(crate) struct LlamaMlpScratch<B: Backend, F: Real> {
    a: B::Buf<F>,
    b: B::Buf<F>,
    h: B::Buf<F>,
    dh: B::Buf<F>,
    da: B::Buf<F>,
    db: B::Buf<F>,
    dx_up: B::Buf<F>,
    /// The bf16 stagings of the dense projections (frozen ones included), in bf16 models.
    staging: Bf16Staging<B>,
    /// `dWt` of the SparseGrad projections that leave their selection to the block's last
    /// one (on a GPU: one batch of selections instead of one per projection).
    selections: Vec<B::Buf<F>>,
}

impl<B: Backend, F: Real> LlamaMlpScratch<B, F> {
    /// The up projection's part of the input gradient after [`LlamaMlp::backward_split`].
    pub(crate) fn dx_up(&self) -> &B::Buf<F> {
        &self.dx_up
    }

    pub(crate) fn new(backend: &B) -> Result<Self> {
        Ok(LlamaMlpScratch {
            a: backend.alloc(0)?,
            b: backend.alloc(0)?,
            h: backend.alloc(0)?,
            dh: backend.alloc(0)?,
            da: backend.alloc(0)?,
            db: backend.alloc(0)?,
            dx_up: backend.alloc(0)?,
            staging: Bf16Staging::new(backend)?,
            selections: Vec::new(),
        })
    }

    /// Holds `count` selection buffers of `hidden * ffn` entries (see
    /// [`LlamaMlp::selection_buffers`]); grows only.
    pub(crate) fn ensure_selections(&mut self, be: &B, count: usize, shape: MlpShape) -> Result<()> {
        let len = crate::error::checked_mul("LlamaMlp selection buffers", shape.hidden, shape.ffn)?;
        while self.selections.len() < count {
            self.selections.push(be.alloc(0)?);
        }
        for buf in self.selections.iter_mut().take(count) {
            grow(be, buf, len)?;
        }
        Ok(())
    }

    /// Grows the buffers for `tokens` rows of an `(hidden, ffn)` block; `a` and `b` only
    /// when `pre_activations` (some block that saves nothing uses them, or the blocks are
    /// bf16 and save theirs in bf16), the bf16 stagings only when `half`.
    pub(crate) fn ensure(
        &mut self,
        be: &B,
        tokens: usize,
        shape: MlpShape,
        pre_activations: bool,
        half: bool,
    ) -> Result<()> {
        if half {
            self.staging.ensure(be, tokens * shape.ffn.max(shape.hidden))?;
        }
        let n = tokens * shape.ffn;
        for buf in [&mut self.h, &mut self.dh, &mut self.da, &mut self.db] {
            grow(be, buf, n)?;
        }
        if pre_activations {
            grow(be, &mut self.a, n)?;
            grow(be, &mut self.b, n)?;
        }
        grow(be, &mut self.dx_up, tokens * shape.hidden)
    }
}

/// How a projection's backward selects its SparseGrad gradient ([`Selecting`]).
#[derive(Clone, Copy, Debug)]
enum SelectionRole {
    Now,
    /// Into this selection buffer of the scratch, selected later.
    Defer(usize),
    /// At once, with the deferred ones.
    Last,
}

/// LLaMA MLP: `down(silu(gate(x)) * up(x))`, no biases.
pub struct LlamaMlp<B: Backend, F: Real = f32> {
    backend: B,
    hidden: usize,
    ffn: usize,
    pub gate: Projection<B, F>,
    pub up: Projection<B, F>,
    pub down: Projection<B, F>,
    /// `a = gate(x)`, `b = up(x)`, saved for the backward: in `F`, or in bf16 models in
    /// bf16 (`a_half`, `b_half`; as autocast saves them), rounded by the SwiGLU forward and
    /// read by its backward.
    a: B::Buf<F>,
    b: B::Buf<F>,
    a_half: B::Buf<bf16>,
    b_half: B::Buf<bf16>,
    /// The scratch of a block used alone (a model passes its shared one instead).
    own: Option<LlamaMlpScratch<B, F>>,
    precision: Precision,
    saved_tokens: Option<usize>,
}

impl<B: Backend + Clone, F: Real> LlamaMlp<B, F> {
    /// Its SparseGrad projections borrow `scratch` (see [`SparseGradLinear::share_scratch`]).
    ///
    /// [`SparseGradLinear::share_scratch`]: crate::linear::sparsegrad::SparseGradLinear::share_scratch
    pub fn share_sparsegrad_scratch(&mut self, scratch: &crate::linear::sparsegrad::SharedScratch<B, F>) -> Result<()> {
        for p in [&mut self.gate, &mut self.up, &mut self.down] {
            p.linear.share_sparsegrad_scratch(scratch)?;
        }
        Ok(())
    }

    /// `gate`, `up` are `(ffn, hidden)`, `down` `(hidden, ffn)`; biases must be `None`.
    pub fn new(
        backend: &B,
        shape: MlpShape,
        [gate, up, down]: [ProjectionSpec<'_, F>; 3],
        opts: &TrainOptions,
    ) -> Result<Self> {
        let MlpShape { hidden, ffn } = shape;
        if gate.bias.is_some() || up.bias.is_some() || down.bias.is_some() {
            return Err(Error::invalid("LlamaMlp::new", "LLaMA MLP projections have no biases"));
        }
        Ok(LlamaMlp {
            backend: backend.clone(),
            hidden,
            ffn,
            gate: Projection::new(backend, "gate", &gate, ffn, hidden, opts)?,
            up: Projection::new(backend, "up", &up, ffn, hidden, opts)?,
            down: Projection::new(backend, "down", &down, hidden, ffn, opts)?,
            a: backend.alloc(0)?,
            b: backend.alloc(0)?,
            a_half: backend.alloc(0)?,
            b_half: backend.alloc(0)?,
            own: None,
            precision: opts.precision,
            saved_tokens: None,
        })
    }

    pub fn projections(&self) -> [&Projection<B, F>; 3] {
        [&self.gate, &self.up, &self.down]
    }
    pub fn projections_mut(&mut self) -> [&mut Projection<B, F>; 3] {
        [&mut self.gate, &mut self.up, &mut self.down]
    }

    /// The block's own scratch, made on first use.
    fn take_own(&mut self) -> Result<LlamaMlpScratch<B, F>> {
        match self.own.take() {
            Some(s) => Ok(s),
            None => LlamaMlpScratch::new(&self.backend),
        }
    }

    pub fn forward(&mut self, x: &B::Buf<F>, tokens: usize, y: &mut B::Buf<F>) -> Result<()> {
        let mut own = self.take_own()?;
        let shape = MlpShape { hidden: self.hidden, ffn: self.ffn };
        let half = self.precision == Precision::Bf16;
        let selections = self.selection_buffers();
        let r = own
            .ensure(&self.backend, tokens, shape, half, half)
            .and_then(|_| own.ensure_selections(&self.backend, selections, shape))
            .and_then(|_| self.forward_shared(x, tokens, y, &mut own, true));
        self.own = Some(own);
        r
    }

    /// [`Self::forward`] with a model's shared `scratch` (grown by the caller for `tokens`
    /// rows). `save`: keep `a` and `b` for a backward; else they go to the scratch too and
    /// [`Self::backward`] of this forward fails.
    pub(crate) fn forward_shared(
        &mut self,
        x: &B::Buf<F>,
        tokens: usize,
        y: &mut B::Buf<F>,
        scratch: &mut LlamaMlpScratch<B, F>,
        save: bool,
    ) -> Result<()> {
        let (be, n) = (&self.backend, tokens * self.ffn);
        self.saved_tokens = None;
        // bf16 models keep `a` and `b` in bf16: computed in the scratch, then rounded.
        let half = self.precision == Precision::Bf16;
        let in_f = save && !half;
        if in_f {
            grow(be, &mut self.a, n)?;
            grow(be, &mut self.b, n)?;
        } else if save {
            grow(be, &mut self.a_half, n)?;
            grow(be, &mut self.b_half, n)?;
        }
        let (a, b) = if in_f { (&mut self.a, &mut self.b) } else { (&mut scratch.a, &mut scratch.b) };
        let st = &mut scratch.staging;
        self.gate.linear.forward_staged(x, tokens, a, st)?;
        self.up.linear.forward_staged(x, tokens, b, st)?;
        if save && half {
            be.swiglu_save_bf16(a, b, &mut scratch.h, &mut self.a_half, &mut self.b_half, n)?;
        } else {
            be.swiglu(a, b, &mut scratch.h, n)?;
        }
        self.down.linear.forward_staged(&scratch.h, tokens, y, st)?;
        if save {
            self.saved_tokens = Some(tokens);
        }
        Ok(())
    }

    /// From `g = dL/dy` of the last forward: `dx` if given, and each trained projection's
    /// gradient. A bf16 block spends its saved pre-activations here (the gate and up
    /// projections' output gradients are written over them), so a second backward needs a
    /// new forward; an f32 block keeps them, as does a bf16 block whose gate or up
    /// projection needs its gradient in `F` (SparseGrad's SparseByDense selection).
    pub fn backward(&mut self, g: &B::Buf<F>, tokens: usize, dx: Option<&mut B::Buf<F>>) -> Result<()> {
        let mut own = self.take_own()?;
        let r = self.backward_shared(g, tokens, dx, &mut own);
        self.own = Some(own);
        r
    }

    /// [`Self::backward`] with a model's shared `scratch` (as grown for the forward).
    pub(crate) fn backward_shared(
        &mut self,
        g: &B::Buf<F>,
        tokens: usize,
        dx: Option<&mut B::Buf<F>>,
        s: &mut LlamaMlpScratch<B, F>,
    ) -> Result<()> {
        self.backward_parts(g, tokens, dx, s, true)
    }

    /// [`Self::backward_shared`] that leaves the input gradient in its two parts: the gate's
    /// in `dx`, the up projection's in `s.dx_up` ([`LlamaMlpScratch::dx_up`]), for a caller
    /// whose next pass adds them (the model's norm backward).
    pub(crate) fn backward_split(
        &mut self,
        g: &B::Buf<F>,
        tokens: usize,
        dx: &mut B::Buf<F>,
        s: &mut LlamaMlpScratch<B, F>,
    ) -> Result<()> {
        self.backward_parts(g, tokens, Some(dx), s, false)
    }

    /// The backward; with `dx` and `sum`, the up projection's part is added into it.
    fn backward_parts(
        &mut self,
        g: &B::Buf<F>,
        tokens: usize,
        dx: Option<&mut B::Buf<F>>,
        s: &mut LlamaMlpScratch<B, F>,
        sum: bool,
    ) -> Result<()> {
        if self.saved_tokens != Some(tokens) {
            return Err(Error::invalid(
                "LlamaMlp::backward",
                format!("no forward of {tokens} tokens to go back through"),
            ));
        }
        let be = &self.backend;
        let n = tokens * self.ffn;
        let roles = self.selection_roles();
        let deferring = roles.iter().filter(|r| matches!(r, SelectionRole::Defer(_))).count();
        if s.selections.len() < deferring {
            return Err(Error::invalid("LlamaMlp::backward", "the scratch holds no selection buffers (not ensured)"));
        }
        let st = &mut s.staging;
        let sel = match roles[0] {
            SelectionRole::Defer(i) => Selecting::Defer(&mut s.selections[i]),
            _ => Selecting::Now,
        };
        self.down.linear.backward_staged(GradY::Raw(g), tokens, Some(&mut s.dh), st, sel)?;
        // The gate and up projections' output gradients leave the SwiGLU backward checked
        // for NaN and infinity (one check over both, named as each layer's own would be);
        // in bf16, rounded straight into their GEMM operands over the saved pre-activations,
        // which this backward consumes (so a second backward of the forward is refused).
        let in_place = self.gate.linear.takes_half_grad() && self.up.linear.takes_half_grad();
        let (g_gate, g_up) = if self.precision == Precision::Bf16 && in_place {
            be.swiglu_backward_bf16_in_place(&mut self.a_half, &mut self.b_half, &s.dh, n, GRAD_Y)?;
            self.saved_tokens = None;
            (GradY::Checked(OperandRef::Half(&self.a_half)), GradY::Checked(OperandRef::Half(&self.b_half)))
        } else if self.precision == Precision::Bf16 {
            be.swiglu_backward_bf16(&self.a_half, &self.b_half, &s.dh, &mut s.da, &mut s.db, n)?;
            (GradY::Raw(&s.da), GradY::Raw(&s.db))
        } else {
            be.swiglu_backward_checked(&self.a, &self.b, &s.dh, &mut s.da, &mut s.db, n, GRAD_Y)?;
            (GradY::Checked(OperandRef::Full(&s.da)), GradY::Checked(OperandRef::Full(&s.db)))
        };
        let (selections, dx_up) = (&mut s.selections, &mut s.dx_up);
        // The gate: it defers into its selection buffer, or selects last with the down
        // projection's pending selection.
        let sel = match roles[1] {
            SelectionRole::Defer(i) => Selecting::Defer(&mut selections[i]),
            SelectionRole::Last => {
                Selecting::With(self.down.linear.pending_selection(&selections[0]).into_iter().collect())
            }
            SelectionRole::Now => Selecting::Now,
        };
        let sum_dx = sum && dx.is_some();
        let (dx_gate, dx_up) = match dx {
            Some(dx) => (Some(dx), Some(dx_up)),
            None => (None, None),
        };
        let dx_gate = match dx_gate {
            Some(dx) => {
                self.gate.linear.backward_staged(g_gate, tokens, Some(&mut *dx), st, sel)?;
                Some(dx)
            }
            None => {
                self.gate.linear.backward_staged(g_gate, tokens, None, st, sel)?;
                None
            }
        };
        // The up projection selects last, with every pending selection before it.
        let sel = match roles[2] {
            SelectionRole::Last => {
                let mut pending = Vec::with_capacity(2);
                for (layer, role) in [(&mut self.down.linear, roles[0]), (&mut self.gate.linear, roles[1])] {
                    if let SelectionRole::Defer(i) = role {
                        pending.extend(layer.pending_selection(&selections[i]));
                    }
                }
                Selecting::With(pending)
            }
            _ => Selecting::Now,
        };
        match dx_up {
            Some(dx_up) => self.up.linear.backward_staged(g_up, tokens, Some(&mut *dx_up), st, sel)?,
            None => self.up.linear.backward_staged(g_up, tokens, None, st, sel)?,
        }
        if let (true, Some(dx)) = (sum_dx, dx_gate) {
            be.axpy(F::ONE, &s.dx_up, dx, tokens * self.hidden)?;
        }
        // SparseGrad projections whose selection ran in the last one's batch.
        if matches!(roles[0], SelectionRole::Defer(_)) {
            self.down.linear.selection_done();
        }
        if matches!(roles[1], SelectionRole::Defer(_)) {
            self.gate.linear.selection_done();
        }
        // MeProp projections left their top-k pending: the three run as one batch.
        select_pending(be, [&mut self.gate.linear, &mut self.up.linear, &mut self.down.linear])
    }

    /// How each projection's backward selects (in backward order: down, gate, up): on a
    /// GPU, the SparseGrad projections select in one batch, every one but the last leaving
    /// its `dWt` in a selection buffer of the scratch ([`LlamaMlpScratch::ensure_selections`]).
    fn selection_roles(&self) -> [SelectionRole; 3] {
        let defers = [&self.down, &self.gate, &self.up].map(|p| p.linear.defers_selection());
        let mut roles = [SelectionRole::Now; 3];
        if defers.iter().filter(|&&d| d).count() >= 2 {
            let last = defers.iter().rposition(|&d| d).unwrap_or(0);
            let mut slot = 0;
            for (i, role) in roles.iter_mut().enumerate() {
                if defers[i] {
                    *role = if i == last { SelectionRole::Last } else { SelectionRole::Defer(slot) };
                    slot += usize::from(i != last);
                }
            }
        }
        roles
    }

    /// The selection buffers ([`LlamaMlpScratch::ensure`]) this block's backward uses.
    pub(crate) fn selection_buffers(&self) -> usize {
        self.selection_roles().iter().filter(|r| matches!(r, SelectionRole::Defer(_))).count()
    }

    /// One optimizer step of the three projections; AdamW updates (full fine-tuning, LoRA)
    /// run as one batch.
    pub fn step(&mut self) -> Result<()> {
        step_in_batches(&self.backend, [&mut self.gate.linear, &mut self.up.linear, &mut self.down.linear])
    }

    /// See [`crate::Linear::count_replayed_step`].
    pub(crate) fn count_replayed_step(&mut self) {
        self.gate.linear.count_replayed_step();
        self.up.linear.count_replayed_step();
        self.down.linear.count_replayed_step();
    }

    pub fn trainable_parameters(&self) -> usize {
        self.projections().iter().map(|p| p.linear.trainable_parameters()).sum()
    }

    /// Preliminary phase: adds the dense weight gradients of `Collect` projections.
    pub fn collect(&self, accs: &mut BTreeMap<String, GramAccumulator>) -> Result<()> {
        self.projections().iter().try_for_each(|p| p.collect(accs))
    }

    /// Preliminary phase: adds the dense weight gradients of `Collect` projections to
    /// `set` (on the device for a device backend, see [`GramSet`]).
    pub fn collect_grams(&self, set: &mut GramSet<B, F>) -> Result<()> {
        self.projections().iter().try_for_each(|p| p.collect_grams(set))
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }
    pub fn ffn(&self) -> usize {
        self.ffn
    }
}
