//! One trainable-linear type over every method the paper compares, chosen per
//! projection: frozen, full fine-tuning, SparseGrad, LoRA, MeProp, and the "collect" mode
//! of the preliminary phase (dense gradients for the Gram accumulators, nothing trains).

use crate::backend::Precision;
use crate::backend::{AdamwJob, Backend, SparseAdamJob, TopkJob};
use crate::basis::Basis;
use crate::error::{Error, Result};
use crate::linear::dense::{Bf16Staging, DenseConfig, DenseLinear, DenseMode};
use crate::linear::lora::{LoraConfig, LoraLinear};
use crate::linear::sparsegrad::{
    Formulation, MergedUpdate, Selecting, Selection, SharedScratch, SparseGradConfig, SparseGradLinear,
};
use crate::linear::state::LayerState;
use crate::linear::{GradY, Keep, LayerWeights};
use crate::optim::Optimizer;
use crate::scalar::Real;

/// How one projection is trained.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    /// No weight gradient computed at all.
    Frozen,
    /// Dense gradient; nothing trains (the preliminary phase of SparseGrad).
    Collect,
    /// Full fine-tuning.
    Full,
    /// SparseGrad in the projection's basis group.
    SparseGrad { keep: Keep, selection: Selection, formulation: Option<Formulation> },
    /// LoRA with `B = 0` at the start.
    Lora { rank: usize, alpha: f32 },
    /// Top-k of `dW` in the original space.
    MeProp { keep: Keep },
}

impl Method {
    /// SparseGrad keeping `keep` entries per step, exact selection, the formulation chosen
    /// by [`Formulation::choose`] for [`TrainOptions::expected_tokens`].
    pub fn sparsegrad(keep: Keep) -> Self {
        Method::SparseGrad { keep, selection: Selection::Exact, formulation: None }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Method::Frozen => "frozen",
            Method::Collect => "collect",
            Method::Full => "full",
            Method::SparseGrad { .. } => "sparsegrad",
            Method::Lora { .. } => "lora",
            Method::MeProp { .. } => "meprop",
        }
    }
}

/// Options shared by every projection of a model or block.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainOptions {
    pub optimizer: Optimizer,
    pub precision: Precision,
    /// Tokens per step SparseGrad's cost model assumes when a SparseGrad method leaves its
    /// formulation to the layer (`formulation: None`): on the CPU [`Formulation::choose`]
    /// takes the merged formulation when its extra flops (independent of the token count)
    /// are below the transformed one's `4 T (out^2 + in^2)`; on a GPU
    /// [`Formulation::choose_priced`] compares their predicted times at the precision's
    /// rates. Both are exact, so this decides speed and memory, never results; set
    /// `formulation` to decide yourself, and read the choice back with
    /// [`Linear::formulation`]. Default 4096.
    pub expected_tokens: usize,
    /// Seeds LoRA's `A`.
    pub seed: u64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions { optimizer: Optimizer::default(), precision: Precision::Full, expected_tokens: 4096, seed: 0 }
    }
}

/// What every trainable linear layer offers, whatever its method: run it, step it, read
/// back the dense weight, and move its trained state in and out (adapters take any
/// `&dyn TrainableLinear`). [`Linear`] and the three layer types implement it.
pub trait TrainableLinear<B: Backend, F: Real> {
    fn out_features(&self) -> usize;
    fn in_features(&self) -> usize;
    /// `y = x W^T + b` for `tokens` rows; saves what backward needs.
    fn forward(&mut self, x: &B::Buf<F>, tokens: usize, y: &mut B::Buf<F>) -> Result<()>;
    /// From `g = dL/dy`: `dx` (exact) if asked for, and the method's weight gradient.
    fn backward(&mut self, g: &B::Buf<F>, tokens: usize, dx: Option<&mut B::Buf<F>>) -> Result<()>;
    /// One optimizer step with the last backward's gradient.
    fn step(&mut self) -> Result<()>;
    fn trainable_parameters(&self) -> usize;
    /// The dense weight `(out, in)` a framework would load: `W`, `P Wt Q^T` or `W + s B A`.
    fn merged_weight(&self) -> Result<Vec<F>>;
    fn bias_host(&self) -> Result<Option<Vec<F>>>;
    /// What training changed, with the optimizer state (see [`LayerState`]).
    fn export_state(&self) -> Result<LayerState<F>>;
    /// Checks that an exported state fits this layer without changing anything.
    fn check_state(&self, state: &LayerState<F>) -> Result<()>;
    /// Restores an exported state into a layer freshly built from the same base weight.
    fn import_state(&mut self, state: &LayerState<F>) -> Result<()>;
}

/// Implements [`TrainableLinear`] by the type's own inherent methods of the same names.
macro_rules! trainable_by_inherent_methods {
    ($($layer:ident),*) => {$(
        impl<B: Backend + Clone, F: Real> TrainableLinear<B, F> for $layer<B, F> {
            fn out_features(&self) -> usize { $layer::out_features(self) }
            fn in_features(&self) -> usize { $layer::in_features(self) }
            fn forward(&mut self, x: &B::Buf<F>, tokens: usize, y: &mut B::Buf<F>) -> Result<()> {
                $layer::forward(self, x, tokens, y)
            }
            fn backward(&mut self, g: &B::Buf<F>, tokens: usize, dx: Option<&mut B::Buf<F>>) -> Result<()> {
                $layer::backward(self, g, tokens, dx)
            }
            fn step(&mut self) -> Result<()> { $layer::step(self) }
            fn trainable_parameters(&self) -> usize { $layer::trainable_parameters(self) }
            fn merged_weight(&self) -> Result<Vec<F>> { $layer::merged_weight(self) }
            fn bias_host(&self) -> Result<Option<Vec<F>>> { $layer::bias_host(self) }
            fn export_state(&self) -> Result<LayerState<F>> { $layer::export_state(self) }
            fn check_state(&self, state: &LayerState<F>) -> Result<()> { $layer::check_state(self, state) }
            fn import_state(&mut self, state: &LayerState<F>) -> Result<()> { $layer::import_state(self, state) }
        }
    )*};
}
trainable_by_inherent_methods!(DenseLinear, SparseGradLinear, LoraLinear, Linear);

/// A linear layer trained by one of the [`Method`]s.
pub enum Linear<B: Backend, F: Real = f32> {
    Dense(DenseLinear<B, F>),
    SparseGrad(SparseGradLinear<B, F>),
    Lora(LoraLinear<B, F>),
}

/// `$body` with `$l` bound to the layer inside `$linear`, whichever variant it is.
macro_rules! each {
    ($linear:expr, $l:ident => $body:expr) => {
        match $linear {
            Linear::Dense($l) => $body,
            Linear::SparseGrad($l) => $body,
            Linear::Lora($l) => $body,
        }
    };
}

/// How to build a [`Linear`]: its weight and shape, then the optional parts.
#[derive(Clone, Copy, Debug)]
pub struct LinearBuilder<'a, F> {
    weight: &'a [F],
    out: usize,
    inp: usize,
    bias: Option<&'a [F]>,
    method: Method,
    basis: Option<&'a Basis>,
    options: TrainOptions,
}

impl<'a, F: Real> LinearBuilder<'a, F> {
    /// Starts building a projection `(out, in)` from its dense `weight`:
    /// `LinearBuilder::new(&w, out, inp).method(Method::Full).build(&cpu)?`.
    pub fn new(weight: &'a [F], out: usize, inp: usize) -> Self {
        LinearBuilder {
            weight,
            out,
            inp,
            bias: None,
            method: Method::Frozen,
            basis: None,
            options: TrainOptions::default(),
        }
    }

    pub fn bias(mut self, bias: &'a [F]) -> Self {
        self.bias = Some(bias);
        self
    }
    /// How the layer trains (default [`Method::Frozen`]).
    pub fn method(mut self, method: Method) -> Self {
        self.method = method;
        self
    }
    /// The basis of the layer's group, which [`Method::SparseGrad`] needs.
    pub fn basis(mut self, basis: &'a Basis) -> Self {
        self.basis = Some(basis);
        self
    }
    /// Optimizer, precision, SparseGrad's expected token count, LoRA's seed.
    pub fn options(mut self, options: TrainOptions) -> Self {
        self.options = options;
        self
    }
    pub fn optimizer(mut self, optimizer: Optimizer) -> Self {
        self.options.optimizer = optimizer;
        self
    }
    /// Builds the layer on `backend`.
    pub fn build<B: Backend + Clone>(&self, backend: &B) -> Result<Linear<B, F>> {
        Linear::build(backend, self)
    }
}

impl<B: Backend + Clone, F: Real> Linear<B, F> {
    fn build(backend: &B, spec: &LinearBuilder<'_, F>) -> Result<Self> {
        let LinearBuilder { weight, out, inp, bias, method, basis, options: opts } = *spec;
        let weights = LayerWeights { weight, bias, out, inp };
        let dense = |mode| {
            let config = DenseConfig { mode, optimizer: opts.optimizer, precision: opts.precision };
            DenseLinear::new(backend, weights, config).map(Linear::Dense)
        };
        match method {
            Method::Frozen => dense(DenseMode::Frozen),
            Method::Collect => dense(DenseMode::Collect),
            Method::Full => dense(DenseMode::Full),
            Method::MeProp { keep } => dense(DenseMode::MeProp { keep }),
            Method::Lora { rank, alpha } => {
                let config =
                    LoraConfig { rank, alpha, seed: opts.seed, optimizer: opts.optimizer, precision: opts.precision };
                LoraLinear::new(backend, weights, config).map(Linear::Lora)
            }
            Method::SparseGrad { keep, selection, formulation } => {
                let basis = basis.ok_or_else(|| {
                    Error::invalid("LinearBuilder::build", "SparseGrad needs the basis of the projection's group")
                })?;
                if basis.shape() != (out, inp) {
                    let (bo, bi) = basis.shape();
                    return Err(Error::shape(
                        "LinearBuilder::build",
                        format!("basis `{}`", basis.group()),
                        format!("{out} x {inp}"),
                        format!("{bo} x {bi}"),
                    ));
                }
                let cfg = SparseGradConfig {
                    keep,
                    selection,
                    formulation,
                    merged_update: None,
                    expected_tokens: opts.expected_tokens,
                    optimizer: opts.optimizer,
                    precision: opts.precision,
                };
                SparseGradLinear::new(backend, weight, bias, basis, cfg).map(Linear::SparseGrad)
            }
        }
    }

    pub fn forward(&mut self, x: &B::Buf<F>, tokens: usize, y: &mut B::Buf<F>) -> Result<()> {
        each!(self, l => l.forward(x, tokens, y))
    }

    /// A SparseGrad layer borrows `scratch` from now on (see
    /// [`SparseGradLinear::share_scratch`]); other methods have no such scratch.
    pub fn share_sparsegrad_scratch(&mut self, scratch: &SharedScratch<B, F>) -> Result<()> {
        match self {
            Linear::SparseGrad(l) => l.share_scratch(scratch),
            Linear::Dense(_) | Linear::Lora(_) => Ok(()),
        }
    }

    pub fn backward(&mut self, g: &B::Buf<F>, tokens: usize, dx: Option<&mut B::Buf<F>>) -> Result<()> {
        each!(self, l => l.backward(g, tokens, dx))
    }

    /// [`Self::forward`] with a model's shared bf16 staging (dense layers use it).
    pub(crate) fn forward_staged(
        &mut self,
        x: &B::Buf<F>,
        tokens: usize,
        y: &mut B::Buf<F>,
        staging: &mut Bf16Staging<B>,
    ) -> Result<()> {
        match self {
            Linear::Dense(l) => l.forward_staged(x, tokens, y, Some(staging)),
            other => other.forward(x, tokens, y),
        }
    }

    /// [`Self::backward`] from `g` as [`GradY`] gives it, with a model's shared bf16 staging
    /// (dense layers use it). A MeProp layer leaves its top-k pending: the caller runs the
    /// pending selections of its layers in one batch ([`select_pending`]) before a step. A
    /// SparseGrad layer selects as `sel` says (see [`Selecting`]); other layers ignore it.
    pub(crate) fn backward_staged(
        &mut self,
        g: GradY<'_, B, F>,
        tokens: usize,
        dx: Option<&mut B::Buf<F>>,
        staging: &mut Bf16Staging<B>,
        sel: Selecting<'_, B, F>,
    ) -> Result<()> {
        match self {
            Linear::Dense(l) => l.backward_staged(g, tokens, dx, Some(staging), true),
            Linear::SparseGrad(l) => l.backward_grad(g, tokens, dx, sel),
            Linear::Lora(l) => l.backward_grad(g, tokens, dx),
        }
    }

    /// Whether this is a SparseGrad layer that can leave its selection to the caller
    /// ([`Selecting::Defer`]).
    pub(crate) fn defers_selection(&self) -> bool {
        matches!(self, Linear::SparseGrad(l) if l.defers_selection())
    }

    /// A SparseGrad layer's deferred selection, from `dwt`, the buffer its backward was given.
    pub(crate) fn pending_selection<'a>(&'a mut self, dwt: &'a B::Buf<F>) -> Option<TopkJob<'a, B, F>> {
        match self {
            Linear::SparseGrad(l) => l.pending_selection(dwt),
            _ => None,
        }
    }

    /// The selection this layer left pending ran (in a batch).
    pub(crate) fn selection_done(&mut self) {
        match self {
            Linear::Dense(l) => l.selection_done(),
            Linear::SparseGrad(l) => l.selection_done(),
            Linear::Lora(_) => {}
        }
    }

    /// Whether the layer's backward takes its output gradient as only a bf16 operand
    /// ([`GradY::Checked`] with no `F` values), so the pass that makes it may round it
    /// straight into the operand.
    pub(crate) fn takes_half_grad(&self) -> bool {
        match self {
            Linear::Dense(l) => l.takes_half_grad(),
            Linear::SparseGrad(l) => l.takes_half_grad(),
            Linear::Lora(_) => true,
        }
    }

    pub fn step(&mut self) -> Result<()> {
        each!(self, l => l.step())
    }

    /// Pushes this layer's step as optimizer jobs when that is all it is (full fine-tuning,
    /// MeProp, LoRA and SparseGrad's transformed form under Adam), for batches with other
    /// layers' ([`step_in_batches`]); false, pushing nothing, otherwise.
    fn optimizer_jobs<'a>(
        &'a mut self,
        adamw: &mut Vec<AdamwJob<'a, B, F>>,
        sparse: &mut Vec<SparseAdamJob<'a, B, F>>,
    ) -> Result<bool> {
        match self {
            Linear::Dense(l) => l.optimizer_jobs(adamw, sparse),
            Linear::Lora(l) => l.optimizer_jobs(adamw),
            Linear::SparseGrad(l) => l.optimizer_jobs(adamw, sparse),
        }
    }

    /// Whether [`Self::optimizer_jobs`] covers this layer's whole step.
    fn batches_its_step(&self) -> bool {
        match self {
            Linear::Dense(l) => l.batches_its_step(),
            Linear::Lora(l) => l.batches_its_step(),
            Linear::SparseGrad(l) => l.batches_its_step(),
        }
    }

    fn finish_batched_step(&mut self) {
        each!(self, l => l.finish_batched_step())
    }

    /// A replayed CUDA graph ran this layer's step on the device: counts it on the host too
    /// (the step counter that adapters save), as [`Self::step`] would have.
    pub(crate) fn count_replayed_step(&mut self) {
        each!(self, l => l.count_replayed_step())
    }

    pub fn trainable_parameters(&self) -> usize {
        each!(self, l => l.trainable_parameters())
    }

    /// The dense weight `(out, in)` a framework would load: `W`, `P Wt Q^T` or `W + s B A`.
    pub fn merged_weight(&self) -> Result<Vec<F>> {
        each!(self, l => l.merged_weight())
    }

    pub fn bias_host(&self) -> Result<Option<Vec<F>>> {
        each!(self, l => l.bias_host())
    }

    /// The dense weight gradient of the last backward, for the Gram accumulators of the
    /// preliminary phase ([`Method::Collect`]; also `Full` and `MeProp` projections).
    pub fn dense_grad_host(&self) -> Result<Vec<F>> {
        match self {
            Linear::Dense(l) => l.grad_host(),
            _ => Err(Error::invalid(
                "Linear::dense_grad_host",
                "only dense projections compute the dense weight gradient",
            )),
        }
    }

    /// [`dense_grad_host`](Self::dense_grad_host) without the copy: the backend buffer
    /// holding it (first `out * in` entries).
    pub fn dense_grad(&self) -> Result<&B::Buf<F>> {
        match self {
            Linear::Dense(l) => l.grad(),
            _ => Err(Error::invalid("Linear::dense_grad", "only dense projections compute the dense weight gradient")),
        }
    }

    /// The formulation of a SparseGrad layer (see [`TrainOptions::expected_tokens`]).
    pub fn formulation(&self) -> Option<Formulation> {
        match self {
            Linear::SparseGrad(l) => Some(l.formulation()),
            _ => None,
        }
    }

    /// How a merged SparseGrad layer applies its step (see [`MergedUpdate`]).
    pub fn merged_update(&self) -> Option<MergedUpdate> {
        match self {
            Linear::SparseGrad(l) => l.merged_update(),
            _ => None,
        }
    }

    /// What training changed, with the optimizer state (see [`LayerState`]).
    pub fn export_state(&self) -> Result<LayerState<F>> {
        each!(self, l => l.export_state())
    }

    /// Checks that an exported state fits this layer without changing anything.
    pub fn check_state(&self, state: &LayerState<F>) -> Result<()> {
        each!(self, l => l.check_state(state))
    }

    /// Restores an exported state into a layer freshly built from the same base weight.
    pub fn import_state(&mut self, state: &LayerState<F>) -> Result<()> {
        each!(self, l => l.import_state(state))
    }

    pub fn out_features(&self) -> usize {
        each!(self, l => l.out_features())
    }

    pub fn in_features(&self) -> usize {
        each!(self, l => l.in_features())
    }
}

/// Runs the top-k selections that `layers`' last [`Linear::backward_staged`] left pending,
/// as one batch ([`crate::backend::TopkOps::topk_coo_batch`]): one sequence of launches on a
/// GPU instead of one per layer.
pub(crate) fn select_pending<B: Backend + Clone, F: Real>(backend: &B, layers: [&mut Linear<B, F>; 3]) -> Result<()> {
    let mut dense: Vec<&mut DenseLinear<B, F>> = layers
        .into_iter()
        .filter_map(|l| match l {
            Linear::Dense(d) => Some(d),
            _ => None,
        })
        .collect();
    let mut jobs: Vec<_> = dense.iter_mut().filter_map(|d| d.pending_selection()).collect();
    if jobs.is_empty() {
        return Ok(());
    }
    backend.topk_coo_batch(&mut jobs)?;
    drop(jobs);
    dense.iter_mut().for_each(|d| d.selection_done());
    Ok(())
}

/// One optimizer step of `layers`: those whose step is only Adam updates (full
/// fine-tuning, MeProp, LoRA, SparseGrad's transformed form) run theirs as two batches
/// ([`crate::backend::OptimOps::adamw_batch`] and `sparse_adam_batch`: one launch each on a
/// GPU for up to 8 parameters), then the others step alone, in order. The batched layers
/// are all checked for a gradient before the batches run.
pub(crate) fn step_in_batches<B: Backend + Clone, F: Real>(backend: &B, layers: [&mut Linear<B, F>; 3]) -> Result<()> {
    let (mut batched, mut rest) = (Vec::new(), Vec::new());
    for layer in layers {
        if layer.batches_its_step() {
            batched.push(layer);
        } else {
            rest.push(layer);
        }
    }
    let (mut adamw, mut sparse) = (Vec::new(), Vec::new());
    for layer in batched.iter_mut() {
        layer.optimizer_jobs(&mut adamw, &mut sparse)?;
    }
    backend.sparse_adam_batch(&mut sparse)?;
    backend.adamw_batch(&mut adamw)?;
    drop((adamw, sparse));
    batched.into_iter().for_each(|l| l.finish_batched_step());
    rest.into_iter().try_for_each(|l| l.step())
}
