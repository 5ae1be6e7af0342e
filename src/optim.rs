//! Optimizers as the layers use them: Adam (SparseAdam on COO gradients, AdamW on dense
//! ones, PyTorch semantics; the ops themselves live in the backends) or plain SGD, with
//! the moment buffers each needs.

use crate::backend::{AdamParams, AdamwJob, Backend, Coo, SparseAdamJob};
use crate::error::{checked_mul, Error, Result};
use crate::scalar::Real;
use half::bf16;

/// The update rule of a trainable parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    /// SparseAdam for sparse gradients, AdamW for dense ones.
    Adam(AdamParams),
    /// `p -= lr * g`: basis-invariant, so SparseGrad at keep = 100% follows full
    /// fine-tuning exactly (Adam is not: its per-entry scaling depends on the basis).
    Sgd { lr: f32 },
}

impl Default for Optimizer {
    fn default() -> Self {
        Optimizer::Adam(AdamParams::default())
    }
}

impl Optimizer {
    /// Adam (SparseAdam for sparse gradients) at learning rate `lr`, PyTorch's other defaults.
    pub fn adam(lr: f32) -> Self {
        Optimizer::Adam(AdamParams { lr, ..AdamParams::default() })
    }

    /// Plain SGD at learning rate `lr`.
    pub fn sgd(lr: f32) -> Self {
        Optimizer::Sgd { lr }
    }

    pub fn validate(&self) -> Result<()> {
        match self {
            Optimizer::Adam(hp) => hp.validate(),
            Optimizer::Sgd { lr } if lr.is_finite() && *lr >= 0.0 => Ok(()),
            Optimizer::Sgd { lr } => Err(Error::invalid("sgd", format!("learning rate {lr} must be finite and >= 0"))),
        }
    }
}

/// Adam's state of one parameter (`None` under SGD): first and second moments and the
/// step clock on the device (see [`crate::backend::OptimOps`]).
pub(crate) struct Moments<B: Backend, F: Real> {
    pub exp_avg: B::Buf<F>,
    pub exp_avg_sq: B::Buf<F>,
    pub clock: B::Buf<u64>,
}

impl<B: Backend, F: Real> Moments<B, F> {
    /// Zeroed moments for `len` entries (and a clock at step 0) when `opt` needs them.
    pub(crate) fn for_optimizer(backend: &B, opt: &Optimizer, len: usize) -> Result<Option<Self>> {
        match opt {
            Optimizer::Adam(_) => Ok(Some(Moments {
                exp_avg: backend.alloc(len)?,
                exp_avg_sq: backend.alloc(len)?,
                clock: backend.alloc(crate::backend::CLOCK_LEN)?,
            })),
            Optimizer::Sgd { .. } => Ok(None),
        }
    }

    /// Sets the clock to `steps` taken (restoring a saved state).
    pub(crate) fn set_steps(&mut self, backend: &B, steps: u64) -> Result<()> {
        backend.upload_into(&[steps, 0], &mut self.clock)
    }

    /// Host copies `(exp_avg, exp_avg_sq)` of the first `len` entries.
    pub(crate) fn to_host(&self, backend: &B, len: usize) -> Result<(Vec<F>, Vec<F>)> {
        Ok((backend.download(&self.exp_avg, len)?, backend.download(&self.exp_avg_sq, len)?))
    }

    pub(crate) fn set_from_host(&mut self, backend: &B, exp_avg: &[F], exp_avg_sq: &[F]) -> Result<()> {
        backend.upload_into(exp_avg, &mut self.exp_avg)?;
        backend.upload_into(exp_avg_sq, &mut self.exp_avg_sq)
    }
}

pub(crate) fn missing_moments() -> Error {
    Error::invalid("optimizer", "Adam needs moment buffers that were not allocated")
}

/// One dense step of `len` entries (Adam's step count is the moments' clock); `half`, the
/// parameter's bf16 compute copy, is rounded from the new parameter.
pub(crate) fn dense_step<B: Backend, F: Real>(
    backend: &B,
    opt: &Optimizer,
    param: &mut B::Buf<F>,
    half: Option<&mut B::Buf<bf16>>,
    grad: &B::Buf<F>,
    moments: Option<&mut Moments<B, F>>,
    len: usize,
) -> Result<()> {
    match opt {
        Optimizer::Adam(hp) => {
            let m = moments.ok_or_else(missing_moments)?;
            backend.adamw(param, half, grad, &mut m.exp_avg, &mut m.exp_avg_sq, len, &mut m.clock, hp)
        }
        Optimizer::Sgd { lr } => {
            backend.axpy(F::from_f64(-(*lr as f64)), grad, param, len)?;
            half.map_or(Ok(()), |h| backend.cast_to_bf16(param, h, len))
        }
    }
}

/// [`dense_step`] as one job of a batch ([`crate::backend::OptimOps::adamw_batch`]), when
/// the step is Adam's (`None` under SGD, which the caller steps alone).
pub(crate) fn adamw_job<'a, B: Backend, F: Real>(
    opt: &Optimizer,
    param: &'a mut B::Buf<F>,
    half: Option<&'a mut B::Buf<bf16>>,
    grad: &'a B::Buf<F>,
    moments: Option<&'a mut Moments<B, F>>,
    len: usize,
) -> Result<Option<AdamwJob<'a, B, F>>> {
    match opt {
        Optimizer::Adam(hp) => {
            let m = moments.ok_or_else(missing_moments)?;
            Ok(Some(AdamwJob {
                param,
                param_bf16: half,
                grad,
                exp_avg: &mut m.exp_avg,
                exp_avg_sq: &mut m.exp_avg_sq,
                len,
                clock: &mut m.clock,
                hp: *hp,
            }))
        }
        Optimizer::Sgd { .. } => Ok(None),
    }
}

/// [`sparse_step`] updating `param` (and its bf16 copy) as one job of a batch
/// ([`crate::backend::OptimOps::sparse_adam_batch`]), when the step is Adam's (`None` under
/// SGD, which the caller steps alone).
pub(crate) fn sparse_adam_job<'a, B: Backend, F: Real>(
    opt: &Optimizer,
    coo: &'a Coo<B, F>,
    param: &'a mut B::Buf<F>,
    half: Option<&'a mut B::Buf<bf16>>,
    moments: Option<&'a mut Moments<B, F>>,
) -> Result<Option<SparseAdamJob<'a, B, F>>> {
    match opt {
        Optimizer::Adam(hp) => {
            let m = moments.ok_or_else(missing_moments)?;
            Ok(Some(SparseAdamJob {
                coo,
                exp_avg: &mut m.exp_avg,
                exp_avg_sq: &mut m.exp_avg_sq,
                clock: &mut m.clock,
                hp: *hp,
                param: Some(param),
                param_bf16: half,
                delta: None,
            }))
        }
        Optimizer::Sgd { .. } => Ok(None),
    }
}

/// One sparse step on the entries of `coo`: updates `param` in place if given (and `half`,
/// its bf16 compute copy, if given: the listed entries under Adam, the whole copy under
/// SGD), and writes each entry's change into `delta` if given (Adam's step count is the
/// moments' clock).
pub(crate) fn sparse_step<B: Backend, F: Real>(
    backend: &B,
    opt: &Optimizer,
    coo: &Coo<B, F>,
    param: Option<&mut B::Buf<F>>,
    half: Option<&mut B::Buf<bf16>>,
    delta: Option<&mut B::Buf<F>>,
    moments: Option<&mut Moments<B, F>>,
) -> Result<()> {
    match opt {
        Optimizer::Adam(hp) => {
            let m = moments.ok_or_else(missing_moments)?;
            backend.sparse_adam(coo, &mut m.exp_avg, &mut m.exp_avg_sq, &mut m.clock, hp, param, half, delta)
        }
        Optimizer::Sgd { lr } => {
            if half.is_some() && param.is_none() {
                return Err(Error::invalid("sparse_step", "a bf16 copy of the parameter given without the parameter"));
            }
            let neg_lr = F::from_f64(-(*lr as f64));
            if let Some(d) = delta {
                backend.fill(d, coo.len, F::ZERO)?;
                backend.axpy(neg_lr, &coo.values, d, coo.len)?;
            }
            if let Some(p) = param {
                backend.coo_scatter_add(coo, neg_lr, p)?;
                if let Some(h) = half {
                    backend.cast_to_bf16(p, h, checked_mul("sparse_step", coo.shape.0, coo.shape.1)?)?;
                }
            }
            Ok(())
        }
    }
}
