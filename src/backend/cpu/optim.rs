//! CPU optimizers: PyTorch's SparseAdam on COO entries and dense AdamW, with PyTorch's
//! exact order of operations so both backends and PyTorch agree to rounding.

use crate::backend::cpu::{Cpu, CpuBuf};
use crate::backend::{AdamParams, Coo};
use crate::error::{check_len, Error, Result};
use crate::scalar::Real;
use rayon::prelude::*;

pub(super) fn sparse_adam<F: Real>(
    coo: &Coo<Cpu, F>,
    exp_avg: &mut CpuBuf<F>,
    exp_avg_sq: &mut CpuBuf<F>,
    step: u64,
    hp: &AdamParams,
    mut param: Option<&mut CpuBuf<F>>,
    mut delta: Option<&mut CpuBuf<F>>,
) -> Result<()> {
    hp.validate()?;
    if step == 0 {
        return Err(Error::invalid("sparse_adam", "step counts from 1"));
    }
    let (rows, cols) = coo.shape;
    let n = rows * cols;
    check_len("sparse_adam", "exp_avg", exp_avg.len(), n)?;
    check_len("sparse_adam", "exp_avg_sq", exp_avg_sq.len(), n)?;
    if let Some(p) = param.as_deref() {
        check_len("sparse_adam", "param", p.len(), n)?;
    }
    if let Some(d) = delta.as_deref() {
        check_len("sparse_adam", "delta", d.len(), coo.len)?;
    }
    for e in 0..coo.len {
        if coo.rows[e] as usize >= rows || coo.cols[e] as usize >= cols {
            return Err(Error::invalid("sparse_adam", format!("entry {e} outside {rows}x{cols}")));
        }
    }
    let step_size = F::from_f64(hp.step_size(step));
    let (b1, b2, eps) = (F::from_f64(hp.beta1 as f64), F::from_f64(hp.beta2 as f64), F::from_f64(hp.eps as f64));
    for e in 0..coo.len {
        let i = coo.rows[e] as usize * cols + coo.cols[e] as usize;
        let g = coo.values[e];
        // torch.optim.SparseAdam: m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2)
        let m = exp_avg[i] + (g - exp_avg[i]) * (F::ONE - b1);
        let v = exp_avg_sq[i] + (g * g - exp_avg_sq[i]) * (F::ONE - b2);
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        let change = -(step_size * (m / (v.sqrt() + eps)));
        if let Some(p) = param.as_deref_mut() {
            p[i] += change;
        }
        if let Some(d) = delta.as_deref_mut() {
            d[e] = change;
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn adamw<F: Real>(
    param: &mut CpuBuf<F>,
    grad: &CpuBuf<F>,
    exp_avg: &mut CpuBuf<F>,
    exp_avg_sq: &mut CpuBuf<F>,
    len: usize,
    step: u64,
    hp: &AdamParams,
) -> Result<()> {
    hp.validate()?;
    if step == 0 {
        return Err(Error::invalid("adamw", "step counts from 1"));
    }
    for (what, l) in
        [("param", param.len()), ("grad", grad.len()), ("exp_avg", exp_avg.len()), ("exp_avg_sq", exp_avg_sq.len())]
    {
        check_len("adamw", what, l, len)?;
    }
    let t = step.min(i32::MAX as u64) as i32;
    let bc1 = 1.0 - (hp.beta1 as f64).powi(t);
    let bc2_sqrt = (1.0 - (hp.beta2 as f64).powi(t)).sqrt();
    let step_size = F::from_f64(hp.lr as f64 / bc1);
    let bc2_sqrt = F::from_f64(bc2_sqrt);
    let decay = F::ONE - F::from_f64(hp.lr as f64 * hp.weight_decay as f64);
    let (b1, b2, eps) = (F::from_f64(hp.beta1 as f64), F::from_f64(hp.beta2 as f64), F::from_f64(hp.eps as f64));
    param[..len]
        .par_iter_mut()
        .zip(&grad[..len])
        .zip(exp_avg[..len].par_iter_mut().zip(exp_avg_sq[..len].par_iter_mut()))
        .for_each(|((p, &g), (m, v))| {
            // torch.optim.AdamW (single-tensor path): decay, lerp, addcmul, then the step.
            *p *= decay;
            *m += (g - *m) * (F::ONE - b1);
            *v = *v * b2 + (F::ONE - b2) * g * g;
            let denom = v.sqrt() / bc2_sqrt + eps;
            *p -= step_size * (*m / denom);
        });
    Ok(())
}
