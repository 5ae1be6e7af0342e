//! One trainable-linear type over every method the paper compares, chosen per
//! projection: frozen, full fine-tuning, SparseGrad, LoRA, MeProp, and the "collect" mode
//! of the preliminary phase (dense gradients for the Gram accumulators, nothing trains).

use crate::backend::Backend;
use crate::backend::Precision;
use crate::basis::Basis;
use crate::error::{Error, Result};
use crate::linear::dense::{DenseLinear, DenseMode};
use crate::linear::lora::LoraLinear;
use crate::linear::sparsegrad::{Formulation, Selection, SparseGradConfig, SparseGradLinear};
use crate::linear::state::LayerState;
use crate::linear::Keep;
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
    /// Tokens per step SparseGrad's cost model assumes.
    pub expected_tokens: usize,
    /// Seeds LoRA's `A`.
    pub seed: u64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions { optimizer: Optimizer::default(), precision: Precision::Full, expected_tokens: 4096, seed: 0 }
    }
}

/// A linear layer trained by one of the [`Method`]s.
pub enum Linear<B: Backend, F: Real = f32> {
    Dense(DenseLinear<B, F>),
    SparseGrad(SparseGradLinear<B, F>),
    Lora(LoraLinear<B, F>),
}

impl<B: Backend + Clone, F: Real> Linear<B, F> {
    /// Builds a projection `(out, in)` from its dense weight. SparseGrad needs the basis of
    /// its group; the other methods ignore `basis`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        backend: &B,
        weight: &[F],
        bias: Option<&[F]>,
        out: usize,
        inp: usize,
        method: Method,
        basis: Option<&Basis>,
        opts: &TrainOptions,
    ) -> Result<Self> {
        let dense = |mode| {
            DenseLinear::new(backend, weight, bias, out, inp, mode, opts.optimizer, opts.precision).map(Linear::Dense)
        };
        match method {
            Method::Frozen => dense(DenseMode::Frozen),
            Method::Collect => dense(DenseMode::Collect),
            Method::Full => dense(DenseMode::Full),
            Method::MeProp { keep } => dense(DenseMode::MeProp { keep }),
            Method::Lora { rank, alpha } => {
                LoraLinear::new(backend, weight, bias, out, inp, rank, alpha, opts.seed, opts.optimizer, opts.precision)
                    .map(Linear::Lora)
            }
            Method::SparseGrad { keep, selection, formulation } => {
                let basis = basis.ok_or_else(|| {
                    Error::invalid("Linear::new", "SparseGrad needs the basis of the projection's group")
                })?;
                if (basis.out, basis.inp) != (out, inp) {
                    return Err(Error::shape(
                        "Linear::new",
                        format!("basis `{}`", basis.group),
                        format!("{out} x {inp}"),
                        format!("{} x {}", basis.out, basis.inp),
                    ));
                }
                let cfg = SparseGradConfig {
                    keep,
                    selection,
                    formulation,
                    expected_tokens: opts.expected_tokens,
                    optimizer: opts.optimizer,
                    precision: opts.precision,
                };
                SparseGradLinear::new(backend, weight, bias, basis, cfg).map(Linear::SparseGrad)
            }
        }
    }

    pub fn forward(&mut self, x: &B::Buf<F>, tokens: usize, y: &mut B::Buf<F>) -> Result<()> {
        match self {
            Linear::Dense(l) => l.forward(x, tokens, y),
            Linear::SparseGrad(l) => l.forward(x, tokens, y),
            Linear::Lora(l) => l.forward(x, tokens, y),
        }
    }

    pub fn backward(&mut self, g: &B::Buf<F>, tokens: usize, dx: Option<&mut B::Buf<F>>) -> Result<()> {
        match self {
            Linear::Dense(l) => l.backward(g, tokens, dx),
            Linear::SparseGrad(l) => l.backward(g, tokens, dx),
            Linear::Lora(l) => l.backward(g, tokens, dx),
        }
    }

    pub fn step(&mut self) -> Result<()> {
        match self {
            Linear::Dense(l) => l.step(),
            Linear::SparseGrad(l) => l.step(),
            Linear::Lora(l) => l.step(),
        }
    }

    pub fn trainable_parameters(&self) -> usize {
        match self {
            Linear::Dense(l) => l.trainable_parameters(),
            Linear::SparseGrad(l) => l.trainable_parameters(),
            Linear::Lora(l) => l.trainable_parameters(),
        }
    }

    /// The dense weight `(out, in)` a framework would load: `W`, `P Wt Q^T` or `W + s B A`.
    pub fn merged_weight(&self) -> Result<Vec<F>> {
        match self {
            Linear::Dense(l) => l.weight_host(),
            Linear::SparseGrad(l) => l.merged_weight(),
            Linear::Lora(l) => l.merged_weight(),
        }
    }

    pub fn bias_host(&self) -> Result<Option<Vec<F>>> {
        match self {
            Linear::Dense(l) => l.bias_host(),
            Linear::SparseGrad(l) => l.bias_host(),
            Linear::Lora(l) => l.bias_host(),
        }
    }

    /// The dense weight gradient of the last backward, for the Gram accumulators
    /// (`Collect` and `Full` projections).
    pub fn dense_grad_host(&self) -> Result<Vec<F>> {
        match self {
            Linear::Dense(l) => l.grad_host(),
            _ => Err(Error::invalid(
                "Linear::dense_grad_host",
                "only dense projections compute the dense weight gradient",
            )),
        }
    }

    /// What training changed, with the optimizer state (see [`LayerState`]).
    pub fn export_state(&self) -> Result<LayerState<F>> {
        match self {
            Linear::Dense(l) => l.export_state(),
            Linear::SparseGrad(l) => l.export_state(),
            Linear::Lora(l) => l.export_state(),
        }
    }

    /// Checks that an exported state fits this layer without changing anything.
    pub fn check_state(&self, state: &LayerState<F>) -> Result<()> {
        match self {
            Linear::Dense(l) => l.check_state(state),
            Linear::SparseGrad(l) => l.check_state(state),
            Linear::Lora(l) => l.check_state(state),
        }
    }

    /// Restores an exported state into a layer freshly built from the same base weight.
    pub fn import_state(&mut self, state: &LayerState<F>) -> Result<()> {
        match self {
            Linear::Dense(l) => l.import_state(state),
            Linear::SparseGrad(l) => l.import_state(state),
            Linear::Lora(l) => l.import_state(state),
        }
    }

    pub fn out_features(&self) -> usize {
        match self {
            Linear::Dense(l) => l.out_features(),
            Linear::SparseGrad(l) => l.out_features(),
            Linear::Lora(l) => l.out_features(),
        }
    }

    pub fn in_features(&self) -> usize {
        match self {
            Linear::Dense(l) => l.in_features(),
            Linear::SparseGrad(l) => l.in_features(),
            Linear::Lora(l) => l.in_features(),
        }
    }
}
