//! Launchers of cuda/optim.cu: SparseAdam on COO entries and dense AdamW, with the CPU
//! twin's checks (src/backend/cpu/optim.rs). The bias corrections are computed here, on the
//! host, in f64 exactly as the CPU does, and passed to the kernels rounded to f32.

use super::sparse::check_coo_lens;
use super::{checked_mul, kargs, require_f32, Cuda, CudaBuf};
use crate::backend::{AdamParams, Coo};
use crate::error::{check_len, Error, Result};
use crate::scalar::Real;

#[allow(clippy::too_many_arguments)]
pub(super) fn sparse_adam<F: Real>(
    cuda: &Cuda,
    coo: &Coo<Cuda, F>,
    exp_avg: &mut CudaBuf<F>,
    exp_avg_sq: &mut CudaBuf<F>,
    step: u64,
    hp: &AdamParams,
    param: Option<&mut CudaBuf<F>>,
    delta: Option<&mut CudaBuf<F>>,
) -> Result<()> {
    const OP: &str = "sparse_adam";
    require_f32::<F>(OP)?;
    hp.validate()?;
    if step == 0 {
        return Err(Error::invalid(OP, "step counts from 1"));
    }
    check_coo_lens(OP, coo)?;
    let (rows, cols) = coo.shape;
    let n = checked_mul(OP, rows, cols)?;
    check_len(OP, "exp_avg", exp_avg.len, n)?;
    check_len(OP, "exp_avg_sq", exp_avg_sq.len, n)?;
    if let Some(p) = param.as_deref() {
        check_len(OP, "param", p.len, n)?;
    }
    if let Some(d) = delta.as_deref() {
        check_len(OP, "delta", d.len, coo.len)?;
    }
    if coo.len == 0 {
        return Ok(());
    }
    let step_size = hp.step_size(step) as f32;
    let (rp, cp, vp, len, r, c) =
        (coo.rows.ptr(), coo.cols.ptr(), coo.values.ptr(), coo.len as u64, rows as u64, cols as u64);
    let (m, v) = (exp_avg.ptr_mut(), exp_avg_sq.ptr_mut());
    let (b1, b2, eps) = (hp.beta1, hp.beta2, hp.eps);
    let p = param.map_or(0u64, |p| p.ptr_mut());
    let d = delta.map_or(0u64, |d| d.ptr_mut());
    let err = cuda.errors.ptr();
    // SAFETY: sparse_adam_f32(const u32* rows, const u32* cols, const float* values, u64 len,
    // u64 n_rows, u64 n_cols, float* exp_avg, float* exp_avg_sq, float step_size, float beta1,
    // float beta2, float eps, float* param, float* delta, u32* err): the COO holds len
    // entries, the state (and param, or null) rows * cols, delta (or null) len; entries
    // outside the matrix are skipped.
    unsafe {
        cuda.launch(
            "optim",
            "sparse_adam_f32",
            cuda.grid_1d(coo.len, 16),
            &mut kargs![rp, cp, vp, len, r, c, m, v, step_size, b1, b2, eps, p, d, err],
        )
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn adamw<F: Real>(
    cuda: &Cuda,
    param: &mut CudaBuf<F>,
    grad: &CudaBuf<F>,
    exp_avg: &mut CudaBuf<F>,
    exp_avg_sq: &mut CudaBuf<F>,
    len: usize,
    step: u64,
    hp: &AdamParams,
) -> Result<()> {
    const OP: &str = "adamw";
    require_f32::<F>(OP)?;
    hp.validate()?;
    if step == 0 {
        return Err(Error::invalid(OP, "step counts from 1"));
    }
    for (what, l) in
        [("param", param.len), ("grad", grad.len), ("exp_avg", exp_avg.len), ("exp_avg_sq", exp_avg_sq.len)]
    {
        check_len(OP, what, l, len)?;
    }
    if len == 0 {
        return Ok(());
    }
    // Exactly the CPU's host-side arithmetic (f64, then rounded to f32).
    let t = step.min(i32::MAX as u64) as i32;
    let bc1 = 1.0 - (hp.beta1 as f64).powi(t);
    let bc2_sqrt = (1.0 - (hp.beta2 as f64).powi(t)).sqrt() as f32;
    let step_size = (hp.lr as f64 / bc1) as f32;
    let decay = 1.0f32 - (hp.lr as f64 * hp.weight_decay as f64) as f32;
    let (b1, b2, eps) = (hp.beta1, hp.beta2, hp.eps);
    let (p, g, m, v, n) = (param.ptr_mut(), grad.ptr(), exp_avg.ptr_mut(), exp_avg_sq.ptr_mut(), len as u64);
    // SAFETY: adamw_f32(float* param, const float* grad, float* exp_avg, float* exp_avg_sq,
    // u64 n, float step_size, float bc2_sqrt, float decay, float beta1, float beta2,
    // float eps): all four buffers hold >= n elements.
    unsafe {
        cuda.launch(
            "optim",
            "adamw_f32",
            cuda.grid_1d(len, 16),
            &mut kargs![p, g, m, v, n, step_size, bc2_sqrt, decay, b1, b2, eps],
        )
    }
}
