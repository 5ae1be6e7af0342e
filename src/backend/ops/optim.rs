//! Optimizer ops: PyTorch's SparseAdam on the entries of a COO list and dense AdamW, and
//! their validators. The step `t` comes from the parameter's clock, a two-entry device
//! buffer (`[steps taken, scratch]`, zeroed for a fresh parameter) that the op advances:
//! nothing that changes between steps is passed from the host, so a captured CUDA graph
//! replays the step. The bias-corrected scalars are [`AdamParams::step_size`] and
//! [`AdamParams::adamw_scalars`] at that `t`, bit-identical on both backends.

use super::{check_bufs, check_coo, check_lens, OutBuf};
use crate::backend::{AdamParams, Backend, Buffers, Coo};
use crate::error::{Error, Result};
use crate::scalar::{Elem, Real};
use half::bf16;

/// Adam-family optimizer steps (PyTorch semantics and order of operations).
pub trait OptimOps: Buffers {
    /// PyTorch SparseAdam on the listed entries of a `coo.shape` parameter at step
    /// `t = clock[0] + 1`, then `clock[0] = t`: updates `exp_avg`, `exp_avg_sq` and, if
    /// given, `param`; if `delta` is given, writes each entry's change of the parameter into
    /// it (length `coo.len`). Entries not listed are untouched. `param_bf16`, the
    /// parameter's bf16 compute copy (needs `param`), gets each listed entry's new value
    /// rounded to nearest even, so a copy that was `param` rounded still is, without a
    /// cast of the whole parameter.
    #[allow(clippy::too_many_arguments)]
    fn sparse_adam<F: Real>(
        &self,
        coo: &Coo<Self, F>,
        exp_avg: &mut Self::Buf<F>,
        exp_avg_sq: &mut Self::Buf<F>,
        clock: &mut Self::Buf<u64>,
        hp: &AdamParams,
        param: Option<&mut Self::Buf<F>>,
        param_bf16: Option<&mut Self::Buf<bf16>>,
        delta: Option<&mut Self::Buf<F>>,
    ) -> Result<()>;
    /// [`Self::sparse_adam`] with the step's change stored densely: `dense` (`coo.shape`) is
    /// zeroed and each listed entry's change written at its place, what `sparse_adam` with a
    /// `delta` followed by [`SparseOps::coo_densify`](crate::backend::SparseOps::coo_densify)
    /// (or its bf16 form) of the changes gives, in one pass over the entries. The parameter
    /// itself is not touched (the caller applies the dense change). The entries must be
    /// sorted and distinct, as `coo_densify` requires. `dense` is in the parameter's
    /// precision, or in bf16 (each change rounded to nearest even) for a bf16 product.
    #[allow(clippy::too_many_arguments)]
    fn sparse_adam_densify<F: Real>(
        &self,
        coo: &Coo<Self, F>,
        exp_avg: &mut Self::Buf<F>,
        exp_avg_sq: &mut Self::Buf<F>,
        clock: &mut Self::Buf<u64>,
        hp: &AdamParams,
        dense: OutBuf<'_, Self, F>,
    ) -> Result<()>;
    /// Dense AdamW (PyTorch semantics, decoupled weight decay) on `len` entries at step
    /// `t = clock[0] + 1`, then `clock[0] = t`. Given `param_bf16`, also writes the new
    /// parameter rounded to bf16 (nearest even) into it, in the same pass: what
    /// [`DenseOps::cast_to_bf16`](crate::backend::DenseOps::cast_to_bf16)
    /// afterwards would give.
    #[allow(clippy::too_many_arguments)]
    fn adamw<F: Real>(
        &self,
        param: &mut Self::Buf<F>,
        param_bf16: Option<&mut Self::Buf<bf16>>,
        grad: &Self::Buf<F>,
        exp_avg: &mut Self::Buf<F>,
        exp_avg_sq: &mut Self::Buf<F>,
        len: usize,
        clock: &mut Self::Buf<u64>,
        hp: &AdamParams,
    ) -> Result<()>;
    /// [`Self::adamw`] of each job, each exactly as that call alone (its own clock and
    /// hyperparameters). Every job is checked before any runs. A GPU steps up to 8
    /// parameters in one launch (PyTorch's multi-tensor AdamW).
    fn adamw_batch<F: Real>(&self, jobs: &mut [AdamwJob<'_, Self, F>]) -> Result<()>;
    /// [`Self::sparse_adam`] of each job, each exactly as that call alone. Every job is
    /// checked before any runs. A GPU steps up to 8 parameters in one launch.
    fn sparse_adam_batch<F: Real>(&self, jobs: &mut [SparseAdamJob<'_, Self, F>]) -> Result<()>;
}

/// One parameter of [`OptimOps::sparse_adam_batch`]: the arguments of one
/// [`OptimOps::sparse_adam`].
pub struct SparseAdamJob<'a, B: Buffers, F: Elem> {
    pub coo: &'a Coo<B, F>,
    pub exp_avg: &'a mut B::Buf<F>,
    pub exp_avg_sq: &'a mut B::Buf<F>,
    pub clock: &'a mut B::Buf<u64>,
    pub hp: AdamParams,
    pub param: Option<&'a mut B::Buf<F>>,
    pub param_bf16: Option<&'a mut B::Buf<bf16>>,
    pub delta: Option<&'a mut B::Buf<F>>,
}

impl<B: Backend, F: Elem> SparseAdamJob<'_, B, F> {
    /// [`check_sparse_adam`] of this job.
    pub(crate) fn check(&self, be: &B) -> Result<()> {
        let (p, h, d) = (self.param.as_deref(), self.param_bf16.as_deref(), self.delta.as_deref());
        check_sparse_adam(be, self.coo, self.exp_avg, self.exp_avg_sq, self.clock, &self.hp, p, h, d)
    }
}

/// One parameter of [`OptimOps::adamw_batch`]: the arguments of one [`OptimOps::adamw`].
pub struct AdamwJob<'a, B: Buffers, F: Elem> {
    pub param: &'a mut B::Buf<F>,
    pub param_bf16: Option<&'a mut B::Buf<bf16>>,
    pub grad: &'a B::Buf<F>,
    pub exp_avg: &'a mut B::Buf<F>,
    pub exp_avg_sq: &'a mut B::Buf<F>,
    pub len: usize,
    pub clock: &'a mut B::Buf<u64>,
    pub hp: AdamParams,
}

/// Entries of an optimizer clock (see the module docs).
pub const CLOCK_LEN: usize = 2;

/// Hyperparameters in range and a clock of [`CLOCK_LEN`] entries.
fn check_step<B: Backend>(be: &B, op: &'static str, clock: &B::Buf<u64>, hp: &AdamParams) -> Result<()> {
    hp.validate()?;
    check_lens(op, &[("clock", be.len(clock), CLOCK_LEN)])
}

/// [`OptimOps::sparse_adam`] (entry bounds are data, checked by the backend).
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_sparse_adam<B: Backend, F: Elem>(
    be: &B,
    coo: &Coo<B, F>,
    exp_avg: &B::Buf<F>,
    exp_avg_sq: &B::Buf<F>,
    clock: &B::Buf<u64>,
    hp: &AdamParams,
    param: Option<&B::Buf<F>>,
    param_bf16: Option<&B::Buf<bf16>>,
    delta: Option<&B::Buf<F>>,
) -> Result<()> {
    const OP: &str = "sparse_adam";
    check_step(be, OP, clock, hp)?;
    let n = check_coo(be, OP, coo)?;
    check_lens(OP, &[("exp_avg", be.len(exp_avg), n), ("exp_avg_sq", be.len(exp_avg_sq), n)])?;
    if let Some(p) = param {
        check_lens(OP, &[("param", be.len(p), n)])?;
    }
    if let Some(h) = param_bf16 {
        if param.is_none() {
            return Err(Error::invalid(OP, "param_bf16 (the bf16 copy of param) given without param"));
        }
        check_lens(OP, &[("param_bf16", be.len(h), n)])?;
    }
    if let Some(d) = delta {
        check_lens(OP, &[("delta", be.len(d), coo.len)])?;
    }
    Ok(())
}

/// [`OptimOps::sparse_adam_densify`] (entry bounds and order are data, checked by the
/// backend); returns the dense matrix's element count.
pub(crate) fn check_sparse_adam_densify<B: Backend, F: Elem>(
    be: &B,
    coo: &Coo<B, F>,
    moments: [&B::Buf<F>; 2],
    clock: &B::Buf<u64>,
    hp: &AdamParams,
    dense: &OutBuf<'_, B, F>,
) -> Result<usize> {
    const OP: &str = "sparse_adam_densify";
    check_step(be, OP, clock, hp)?;
    let n = check_coo(be, OP, coo)?;
    check_lens(
        OP,
        &[("exp_avg", be.len(moments[0]), n), ("exp_avg_sq", be.len(moments[1]), n), ("dense", dense.len(be), n)],
    )?;
    Ok(n)
}

/// [`OptimOps::adamw`] (`[param, grad, exp_avg, exp_avg_sq]`, and the bf16 copy if given).
pub(crate) fn check_adamw<B: Backend, F: Elem>(
    be: &B,
    bufs: [&B::Buf<F>; 4],
    param_bf16: Option<&B::Buf<bf16>>,
    len: usize,
    clock: &B::Buf<u64>,
    hp: &AdamParams,
) -> Result<()> {
    const OP: &str = "adamw";
    check_step(be, OP, clock, hp)?;
    check_bufs(be, OP, ["param", "grad", "exp_avg", "exp_avg_sq"], bufs, [len; 4])?;
    if let Some(h) = param_bf16 {
        check_lens(OP, &[("param_bf16", be.len(h), len)])?;
    }
    Ok(())
}
