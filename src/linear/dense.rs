//! `DenseLinear`: `y = x W^T + b` in the original space, in one of three modes:
//! - `Frozen`: no weight gradient is ever computed (the `dW` GEMM is skipped), nothing trains;
//! - `Collect`: the dense `dW` is computed for SparseGrad's preliminary phase, nothing trains;
//! - `Full`: full fine-tuning, dense gradient, AdamW (or SGD) on weight and bias;
//! - `MeProp { keep }`: the paper's MeProp baseline as in the official benchmark code: the
//!   top-k entries of `dW` by magnitude in the original space, applied with SparseAdam
//!   (or SGD); the bias trains densely as in SparseGrad.

use crate::backend::operand::{mm, stage_checked, Operand, OperandRef};
use crate::backend::Precision;
use crate::backend::{AdamwJob, Backend, Coo, Gemm, HostCoo, IndexMaps, SparseAdamJob, TopkJob};
use crate::error::{Error, Result};
use crate::linear::state::{mismatch, touched_indices, DenseParam, LayerState, SparseParam};
use crate::linear::{check_backward, check_forward, check_weight_and_bias, GradY, Keep, LayerWeights, INPUT_X};
use crate::optim::{adamw_job, dense_step, sparse_adam_job, sparse_step, Moments, Optimizer};
use crate::scalar::Real;
use half::bf16;

/// What a [`DenseLinear`] trains.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DenseMode {
    Frozen,
    Collect,
    Full,
    MeProp { keep: Keep },
}

/// Construction options of a [`DenseLinear`] (default: frozen, AdamW defaults, f32).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DenseConfig {
    pub mode: DenseMode,
    pub optimizer: Optimizer,
    pub precision: Precision,
}

impl Default for DenseConfig {
    fn default() -> Self {
        DenseConfig { mode: DenseMode::Frozen, optimizer: Optimizer::default(), precision: Precision::Full }
    }
}

/// bf16 stagings of a dense layer's input `x` and output gradient `g`: each is written and
/// read inside one forward or backward, so a model shares one pair among all its layers,
/// sized for the largest ([`DenseLinear::forward_staged`]); a layer used alone keeps its own.
pub(crate) struct Bf16Staging<B: Backend> {
    pub(crate) x: B::Buf<bf16>,
    pub(crate) g: B::Buf<bf16>,
}

impl<B: Backend> Bf16Staging<B> {
    pub(crate) fn new(be: &B) -> Result<Self> {
        Ok(Bf16Staging { x: be.alloc(0)?, g: be.alloc(0)? })
    }
    /// Grows both to `len` values.
    pub(crate) fn ensure(&mut self, be: &B, len: usize) -> Result<()> {
        crate::backend::operand::grow(be, &mut self.x, len)?;
        crate::backend::operand::grow(be, &mut self.g, len)
    }
}

/// The MeProp selection state.
struct TopK<B: Backend, F: Real> {
    k: usize,
    coo: Coo<B, F>,
    ws: B::TopkWorkspace,
}

/// A dense linear layer; see the module docs.
pub struct DenseLinear<B: Backend, F: Real = f32> {
    backend: B,
    out: usize,
    inp: usize,
    mode: DenseMode,
    opt: Optimizer,
    precision: Precision,
    /// `W` in `F`; `None` in a bf16 layer that never changes it (frozen, collecting), which
    /// holds only the bf16 copy it computes with.
    w: Option<B::Buf<F>>,
    w_half: Option<B::Buf<bf16>>,
    bias: Option<B::Buf<F>>,
    /// Dense `dW` (Full, MeProp), its selection (MeProp) and the weight's moments.
    grad_w: Option<B::Buf<F>>,
    topk: Option<TopK<B, F>>,
    moments: Option<Moments<B, F>>,
    bias_grad: Option<B::Buf<F>>,
    bias_moments: Option<Moments<B, F>>,
    saved: Operand<B, F>,
    x_half: Option<B::Buf<bf16>>,
    g_half: Option<B::Buf<bf16>>,
    capacity: usize,
    saved_tokens: Option<usize>,
    grad_ready: bool,
    /// MeProp: the last backward left its selection to the caller (see
    /// [`Self::pending_selection`]).
    selection_pending: bool,
    step: u64,
    /// MeProp under SGD: marks the entries that moved (see SparseGradLinear's twin).
    sgd_mask: Option<(B::Buf<F>, Coo<B, F>)>,
}

impl<B: Backend + Clone, F: Real> DenseLinear<B, F> {
    pub fn new(backend: &B, weights: LayerWeights<'_, F>, config: DenseConfig) -> Result<Self> {
        let LayerWeights { weight, bias, out, inp } = weights;
        let DenseConfig { mode, optimizer: opt, precision } = config;
        check_weight_and_bias("DenseLinear::new", weight, bias, out, inp)?;
        opt.validate()?;
        let computes_grad = mode != DenseMode::Frozen;
        let trains = matches!(mode, DenseMode::Full | DenseMode::MeProp { .. });
        let topk = match mode {
            DenseMode::MeProp { keep } => {
                let k = keep.resolve(out * inp)?;
                Some(TopK {
                    k,
                    coo: Coo::with_capacity(backend, k, (out, inp))?,
                    ws: backend.topk_workspace(out * inp)?,
                })
            }
            _ => None,
        };
        let half = precision == Precision::Bf16;
        let (w, w_half) = if half && !trains {
            // Rounded on the host as `cast_to_bf16` rounds on the device (to nearest even).
            let rounded: Vec<bf16> = weight.iter().map(|v| v.to_bf16()).collect();
            (None, Some(backend.upload(&rounded)?))
        } else {
            let w = backend.upload(weight)?;
            let mut w_half = if half { Some(backend.alloc(out * inp)?) } else { None };
            if let Some(h) = w_half.as_mut() {
                backend.cast_to_bf16(&w, h, out * inp)?;
            }
            (Some(w), w_half)
        };
        let has_bias = bias.is_some() && trains;
        let sgd_mask = match (&topk, opt) {
            (Some(t), Optimizer::Sgd { .. }) => {
                let mut ones = Coo::with_capacity(backend, t.k, (out, inp))?;
                backend.fill(&mut ones.values, t.k, F::ONE)?;
                Some((backend.alloc(out * inp)?, ones))
            }
            _ => None,
        };
        Ok(DenseLinear {
            backend: backend.clone(),
            out,
            inp,
            mode,
            opt,
            precision,
            w,
            w_half,
            bias: bias.map(|b| backend.upload(b)).transpose()?,
            grad_w: if computes_grad { Some(backend.alloc(out * inp)?) } else { None },
            topk,
            moments: if trains { Moments::for_optimizer(backend, &opt, out * inp)? } else { None },
            bias_grad: if has_bias { Some(backend.alloc(out)?) } else { None },
            bias_moments: if has_bias { Moments::for_optimizer(backend, &opt, out)? } else { None },
            saved: Operand::alloc(backend, precision, 0)?,
            x_half: None,
            g_half: None,
            capacity: 0,
            saved_tokens: None,
            grad_ready: false,
            selection_pending: false,
            step: 0,
            sgd_mask,
        })
    }

    pub fn mode(&self) -> DenseMode {
        self.mode
    }
    pub fn out_features(&self) -> usize {
        self.out
    }
    pub fn in_features(&self) -> usize {
        self.inp
    }
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// Entries updated per step: all of W (Full), k (MeProp), none (Frozen); plus the bias.
    pub fn trainable_parameters(&self) -> usize {
        let bias = if self.bias_grad.is_some() { self.out } else { 0 };
        match (&self.mode, &self.topk) {
            (DenseMode::Frozen | DenseMode::Collect, _) => 0,
            (DenseMode::Full, _) => self.out * self.inp + bias,
            (DenseMode::MeProp { .. }, Some(t)) => t.k + bias,
            (DenseMode::MeProp { .. }, None) => bias,
        }
    }

    /// Grows the saved input and, without a shared staging (`own_stagings`), the layer's
    /// own bf16 stagings.
    fn ensure_tokens(&mut self, tokens: usize, own_stagings: bool) -> Result<()> {
        let trains = self.grad_w.is_some();
        let half = self.precision == Precision::Bf16;
        if tokens > self.capacity {
            // Only a trained weight needs x for backward (dW = g^T x); dx = g W does not.
            self.saved = Operand::alloc(&self.backend, self.precision, if trains { tokens * self.inp } else { 0 })?;
            self.capacity = tokens;
        }
        if own_stagings && half {
            let be = &self.backend;
            let own = |buf: &mut Option<B::Buf<bf16>>, len: usize| -> Result<()> {
                match buf {
                    Some(b) => crate::backend::operand::grow(be, b, len),
                    None => {
                        *buf = Some(be.alloc(len)?);
                        Ok(())
                    }
                }
            };
            if !trains {
                own(&mut self.x_half, tokens * self.inp)?;
            }
            own(&mut self.g_half, tokens * self.out)?;
        }
        Ok(())
    }

    pub fn forward(&mut self, x: &B::Buf<F>, tokens: usize, y: &mut B::Buf<F>) -> Result<()> {
        self.forward_staged(x, tokens, y, None)
    }

    /// [`Self::forward`] staging `x` in bf16 in the shared `staging` (grown by the caller to
    /// `tokens * in`) instead of the layer's own.
    pub(crate) fn forward_staged(
        &mut self,
        x: &B::Buf<F>,
        tokens: usize,
        y: &mut B::Buf<F>,
        staging: Option<&mut Bf16Staging<B>>,
    ) -> Result<()> {
        let (out, inp) = (self.out, self.inp);
        check_forward(&self.backend, "DenseLinear::forward", x, y, tokens, (out, inp))?;
        self.saved_tokens = None;
        self.ensure_tokens(tokens, staging.is_none())?;
        let half = self.precision == Precision::Bf16;
        let be = &self.backend;
        let w_op = match (&self.w_half, &self.w) {
            (Some(h), _) => OperandRef::Half(h),
            (None, Some(w)) => OperandRef::Full(w),
            (None, None) => return Err(Error::invalid("DenseLinear::forward", "the layer holds no weight")),
        };
        let x_op = if self.grad_w.is_some() {
            self.saved.store_checked(be, x, tokens * inp, INPUT_X)?;
            self.saved.as_ref()
        } else {
            let x_half = match staging {
                Some(st) => half.then_some(&mut st.x),
                None => self.x_half.as_mut(),
            };
            stage_checked(be, x, x_half, tokens * inp, INPUT_X)?
        };
        mm(be, &Gemm::nt(tokens, out, inp), x_op, w_op, y)?;
        if let Some(b) = &self.bias {
            be.add_bias(y, b, tokens, out)?;
        }
        self.saved_tokens = Some(tokens);
        Ok(())
    }

    /// `dx = g W` into `dx` if given; `dW = g^T x` (and its top-k under MeProp) and `db`
    /// only when the layer trains.
    pub fn backward(&mut self, g: &B::Buf<F>, tokens: usize, dx: Option<&mut B::Buf<F>>) -> Result<()> {
        self.backward_staged(GradY::Raw(g), tokens, dx, None, false)
    }

    /// Whether [`Self::backward_staged`] takes `g` as only a bf16 operand: it needs `g` in
    /// `F` for a bias gradient.
    pub(crate) fn takes_half_grad(&self) -> bool {
        self.bias_grad.is_none()
    }

    /// [`Self::backward`] from `g` as [`GradY`] gives it, staging a raw `g` in bf16 in the
    /// shared `staging` (grown by the caller to `tokens * out`) instead of the layer's own.
    /// With `defer_selection`, a MeProp layer leaves its top-k to the caller, who runs it
    /// with other layers' in one batch ([`Self::pending_selection`]).
    pub(crate) fn backward_staged(
        &mut self,
        g: GradY<'_, B, F>,
        tokens: usize,
        dx: Option<&mut B::Buf<F>>,
        staging: Option<&mut Bf16Staging<B>>,
        defer_selection: bool,
    ) -> Result<()> {
        let (out, inp) = (self.out, self.inp);
        let half = self.precision == Precision::Bf16;
        check_backward(
            &self.backend,
            "DenseLinear::backward",
            self.saved_tokens,
            g,
            dx.as_deref(),
            tokens,
            (out, inp),
        )?;
        self.grad_ready = false;
        self.selection_pending = false;
        let be = &self.backend;
        let g_half = match staging {
            Some(st) => half.then_some(&mut st.g),
            None => self.g_half.as_mut(),
        };
        // A bias gradient sums g in F: refused before anything runs when only bf16 was given.
        let g_full = if self.bias_grad.is_some() { Some(g.require_full("DenseLinear::backward")?) } else { None };
        let g_op = g.operand(be, g_half, tokens * out)?;
        if let Some(dx) = dx {
            let w_op = match (&self.w_half, &self.w) {
                (Some(h), _) => OperandRef::Half(h),
                (None, Some(w)) => OperandRef::Full(w),
                (None, None) => return Err(Error::invalid("DenseLinear::backward", "the layer holds no weight")),
            };
            mm(be, &Gemm::nn(tokens, inp, out), g_op, w_op, dx)?;
        }
        let Some(grad_w) = self.grad_w.as_mut() else { return Ok(()) };
        mm(be, &Gemm::tn(out, inp, tokens), g_op, self.saved.as_ref(), grad_w)?;
        let defer = defer_selection && self.topk.is_some();
        if let (Some(t), false) = (self.topk.as_mut(), defer) {
            let full = IndexMaps { row_map: None, col_map: None, full_shape: (out, inp) };
            be.topk_coo(grad_w, out, inp, t.k, &full, &mut t.ws, &mut t.coo)?;
        }
        if let (Some(db), Some(g)) = (self.bias_grad.as_mut(), g_full) {
            be.bias_grad(g, tokens, out, db, F::ZERO)?;
        }
        self.selection_pending = defer;
        self.grad_ready = !defer;
        Ok(())
    }

    /// The top-k of a backward that deferred it: select from `dW` into the layer's COO
    /// gradient, then call [`Self::selection_done`]. `None` when nothing is pending.
    pub(crate) fn pending_selection(&mut self) -> Option<TopkJob<'_, B, F>> {
        let (out, inp) = (self.out, self.inp);
        match (self.selection_pending, self.topk.as_mut(), self.grad_w.as_ref()) {
            (true, Some(t), Some(grad_w)) => Some(TopkJob {
                m: grad_w,
                rows: out,
                cols: inp,
                k: t.k,
                maps: IndexMaps { row_map: None, col_map: None, full_shape: (out, inp) },
                ws: &mut t.ws,
                out: &mut t.coo,
            }),
            _ => None,
        }
    }

    /// The pending selection ran: the gradient is ready for [`Self::step`].
    pub(crate) fn selection_done(&mut self) {
        if self.selection_pending {
            self.selection_pending = false;
            self.grad_ready = true;
        }
    }

    /// See [`crate::Linear::count_replayed_step`].
    pub(crate) fn count_replayed_step(&mut self) {
        if !matches!(self.mode, DenseMode::Frozen | DenseMode::Collect) {
            self.step += 1;
        }
    }

    /// Pushes the step's optimizer jobs (the weight's AdamW, or MeProp's SparseAdam, and the
    /// bias's AdamW if it trains) for a caller that runs them in batches with other layers',
    /// then calls [`Self::finish_batched_step`]. Returns false, pushing nothing, for any
    /// other step (frozen, collecting, SGD); fails, pushing nothing, before a backward.
    pub(crate) fn optimizer_jobs<'a>(
        &'a mut self,
        adamw: &mut Vec<AdamwJob<'a, B, F>>,
        sparse: &mut Vec<SparseAdamJob<'a, B, F>>,
    ) -> Result<bool> {
        if !self.batches_its_step() {
            return Ok(false);
        }
        if !self.grad_ready {
            return Err(Error::invalid("DenseLinear::step", "no gradient: call backward first"));
        }
        let n = self.out * self.inp;
        let w = self.w.as_mut().ok_or_else(|| Error::invalid("DenseLinear::step", "the layer holds no f32 weight"))?;
        let half = self.w_half.as_mut();
        match (&self.topk, &self.grad_w) {
            (Some(t), _) => sparse.extend(sparse_adam_job(&self.opt, &t.coo, w, half, self.moments.as_mut())?),
            (None, Some(gw)) => adamw.extend(adamw_job(&self.opt, w, half, gw, self.moments.as_mut(), n)?),
            (None, None) => return Err(Error::invalid("DenseLinear::step", "no weight gradient buffer")),
        }
        if let (Some(b), Some(db)) = (self.bias.as_mut(), self.bias_grad.as_ref()) {
            adamw.extend(adamw_job(&self.opt, b, None, db, self.bias_moments.as_mut(), self.out)?);
        }
        Ok(true)
    }

    /// Whether [`Self::optimizer_jobs`] covers the step: full fine-tuning and MeProp under
    /// Adam.
    pub(crate) fn batches_its_step(&self) -> bool {
        matches!(self.mode, DenseMode::Full | DenseMode::MeProp { .. }) && matches!(self.opt, Optimizer::Adam(_))
    }

    /// The batches of [`Self::optimizer_jobs`] ran: counts the step.
    pub(crate) fn finish_batched_step(&mut self) {
        self.step += 1;
        self.grad_ready = false;
    }

    /// One optimizer step. Frozen and collecting layers have nothing to step and return Ok.
    pub fn step(&mut self) -> Result<()> {
        if matches!(self.mode, DenseMode::Frozen | DenseMode::Collect) {
            return Ok(());
        }
        if !self.grad_ready {
            return Err(Error::invalid("DenseLinear::step", "no gradient: call backward first"));
        }
        let be = &self.backend;
        let step = self.step + 1;
        let w = self.w.as_mut().ok_or_else(|| Error::invalid("DenseLinear::step", "the layer holds no f32 weight"))?;
        // The optimizer keeps the bf16 compute copy in step (no cast of the whole weight).
        let half = self.w_half.as_mut();
        match (&self.topk, &self.grad_w) {
            (Some(t), _) => sparse_step(be, &self.opt, &t.coo, Some(&mut *w), half, None, self.moments.as_mut())?,
            (None, Some(gw)) => dense_step(be, &self.opt, w, half, gw, self.moments.as_mut(), self.out * self.inp)?,
            (None, None) => return Err(Error::invalid("DenseLinear::step", "no weight gradient buffer")),
        }
        if let (Some(b), Some(db)) = (self.bias.as_mut(), self.bias_grad.as_ref()) {
            dense_step(be, &self.opt, b, None, db, self.bias_moments.as_mut(), self.out)?;
        }
        if let (Some((mask, ones)), Some(t)) = (self.sgd_mask.as_mut(), &self.topk) {
            be.copy(&t.coo.rows, &mut ones.rows, t.coo.len)?;
            be.copy(&t.coo.cols, &mut ones.cols, t.coo.len)?;
            ones.len = t.coo.len;
            be.coo_scatter_add(ones, F::ONE, mask)?;
        }
        self.step = step;
        self.grad_ready = false;
        Ok(())
    }

    /// The dense weight `W` (`(out, in)`): what a framework loads. A frozen (or collecting)
    /// bf16 layer holds only `W` rounded to bf16, which this returns widened: take the
    /// base weight itself where it matters (as the models' `merged_weights` do).
    pub fn merged_weight(&self) -> Result<Vec<F>> {
        let n = self.out * self.inp;
        match (&self.w, &self.w_half) {
            (Some(w), _) => self.backend.download(w, n),
            (None, Some(h)) => Ok(self.backend.download(h, n)?.into_iter().map(|v| F::from_f64(v.to_f64())).collect()),
            (None, None) => Err(Error::invalid("DenseLinear::merged_weight", "the layer holds no weight")),
        }
    }

    /// `W` in `F`, which a trained layer always holds.
    fn master(&self) -> Result<&B::Buf<F>> {
        self.w.as_ref().ok_or_else(|| Error::invalid("DenseLinear", "a frozen bf16 layer holds no f32 weight"))
    }
    pub fn bias_host(&self) -> Result<Option<Vec<F>>> {
        self.bias.as_ref().map(|b| self.backend.download(b, self.out)).transpose()
    }
    /// The dense weight gradient of the last backward (Full and MeProp).
    pub fn grad_host(&self) -> Result<Vec<F>> {
        match (&self.grad_w, self.grad_ready) {
            (Some(g), true) => self.backend.download(g, self.out * self.inp),
            _ => Err(Error::invalid("DenseLinear::grad_host", "no weight gradient (frozen layer, or no backward yet)")),
        }
    }
    /// The dense weight gradient of the last backward where it lives (first `out * in`
    /// entries, row-major), for consumers on the same backend (the device Gram accumulator).
    pub fn grad(&self) -> Result<&B::Buf<F>> {
        match (&self.grad_w, self.grad_ready) {
            (Some(g), true) => Ok(g),
            _ => Err(Error::invalid("DenseLinear::grad", "no weight gradient (frozen layer, or no backward yet)")),
        }
    }
    /// The bias gradient of the last backward.
    pub fn bias_grad_host(&self) -> Result<Option<Vec<F>>> {
        if !self.grad_ready {
            return Err(Error::invalid("DenseLinear::bias_grad_host", "no gradient: call backward first"));
        }
        self.bias_grad.as_ref().map(|b| self.backend.download(b, self.out)).transpose()
    }
    /// MeProp's selected COO gradient of the last backward.
    pub fn coo_grad_host(&self) -> Result<HostCoo<F>> {
        match (&self.topk, self.grad_ready) {
            (Some(t), true) => t.coo.to_host(&self.backend),
            _ => Err(Error::invalid("DenseLinear::coo_grad_host", "not a MeProp layer, or no backward yet")),
        }
    }

    fn bias_state(&self) -> Result<Option<DenseParam<F>>> {
        match (&self.bias, &self.bias_grad) {
            (Some(b), Some(_)) => {
                DenseParam::download(&self.backend, b, self.bias_moments.as_ref(), self.out).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// Full: the whole weight and its moments; MeProp: the changed entries of `W`;
    /// Frozen and Collect: nothing.
    pub fn export_state(&self) -> Result<LayerState<F>> {
        let (be, n) = (&self.backend, self.out * self.inp);
        match self.mode {
            DenseMode::Frozen | DenseMode::Collect => Ok(LayerState::Frozen),
            DenseMode::Full => {
                let weight = DenseParam::download(be, self.master()?, self.moments.as_ref(), n)?;
                Ok(LayerState::Full { weight, bias: self.bias_state()?, step: self.step })
            }
            DenseMode::MeProp { .. } => {
                let moments = self.moments.as_ref().map(|m| m.to_host(be, n)).transpose()?;
                let mask = self.sgd_mask.as_ref().map(|(m, _)| be.download(m, n)).transpose()?;
                let indices = touched_indices(moments.as_ref().map(|(_, v)| v.as_slice()), mask.as_deref());
                let weight = SparseParam::gather((self.out, self.inp), indices, &self.merged_weight()?, moments);
                Ok(LayerState::MeProp { weight, bias: self.bias_state()?, step: self.step })
            }
        }
    }

    /// Checks that `state` fits this layer (method, shape, optimizer, bias).
    pub fn check_state(&self, state: &LayerState<F>) -> Result<()> {
        let (out, n) = (self.out, self.out * self.inp);
        let bias = match (self.mode, state) {
            (DenseMode::Frozen | DenseMode::Collect, LayerState::Frozen) => return Ok(()),
            (DenseMode::Full, LayerState::Full { weight, bias, .. }) => {
                if weight.values.len() != n || self.moments.is_some() != weight.exp_avg.is_some() {
                    return Err(mismatch("adapter", "full weight shape or optimizer state does not match the layer"));
                }
                bias
            }
            (DenseMode::MeProp { .. }, LayerState::MeProp { weight, bias, .. }) => {
                if weight.shape != (self.out, self.inp) || self.moments.is_some() != weight.exp_avg.is_some() {
                    return Err(mismatch("adapter", "MeProp weight shape or optimizer state does not match the layer"));
                }
                weight.validate()?;
                bias
            }
            (mode, other) => {
                return Err(mismatch(
                    "adapter",
                    format!("a {} state cannot be loaded into a {mode:?} layer", other.method()),
                ))
            }
        };
        match (bias, &self.bias_grad) {
            (Some(b), Some(_)) if b.values.len() == out && b.exp_avg.is_some() == self.bias_moments.is_some() => {}
            (None, None) => {}
            _ => return Err(mismatch("adapter", "bias or its optimizer state does not match the layer")),
        }
        Ok(())
    }

    /// Applies an exported state to a layer freshly built from the same base weight.
    /// Fails, leaving the layer unchanged, on another method, shape or optimizer.
    pub fn import_state(&mut self, state: &LayerState<F>) -> Result<()> {
        self.check_state(state)?;
        let n = self.out * self.inp;
        let (bias, step) = match state {
            LayerState::Frozen => return Ok(()),
            LayerState::Full { bias, step, .. } | LayerState::MeProp { bias, step, .. } => (bias, *step),
            _ => return Err(mismatch("adapter", "not a dense state")),
        };
        let be = self.backend.clone();
        let w = self
            .w
            .as_mut()
            .ok_or_else(|| Error::invalid("DenseLinear::import_state", "the layer holds no f32 weight"))?;
        match state {
            LayerState::Full { weight, .. } => weight.upload(&be, w, self.moments.as_mut())?,
            LayerState::MeProp { weight, .. } => {
                let mut host = be.download(w, n)?;
                for (e, &i) in weight.indices.iter().enumerate() {
                    host[i as usize] = weight.values[e];
                }
                be.upload_into(&host, w)?;
                if let (Some(m), Some((dm, dv))) = (self.moments.as_mut(), weight.scatter_moments()) {
                    m.set_from_host(&be, &dm, &dv)?;
                }
                if let Some((mask, _)) = self.sgd_mask.as_mut() {
                    let mut host = vec![F::ZERO; n];
                    weight.indices.iter().for_each(|&i| host[i as usize] = F::ONE);
                    be.upload_into(&host, mask)?;
                }
            }
            _ => {}
        }
        if let (Some(b), Some(dst)) = (bias, self.bias.as_mut()) {
            b.upload(&be, dst, self.bias_moments.as_mut())?;
        }
        if let Some(h) = self.w_half.as_mut() {
            be.cast_to_bf16(w, h, n)?;
        }
        for m in [self.moments.as_mut(), self.bias_moments.as_mut()].into_iter().flatten() {
            m.set_steps(&be, step)?;
        }
        self.step = step;
        self.grad_ready = false;
        Ok(())
    }
}
