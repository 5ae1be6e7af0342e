//! CPU optimizers: PyTorch's SparseAdam on COO entries (its change per entry or stored
//! densely) and dense AdamW, with PyTorch's exact order of operations so both backends and
//! PyTorch agree to rounding.

use super::sparse::check_coo_sorted;
use super::{Cpu, CpuBuf};
use crate::backend::ops::optim::*;
use crate::backend::{AdamParams, AdamwScalars, Coo, OutBuf};
use crate::error::{Error, Result};
use crate::scalar::Real;
use half::bf16;
use rayon::prelude::*;

impl OptimOps for Cpu {
    fn sparse_adam<F: Real>(
        &self,
        coo: &Coo<Cpu, F>,
        exp_avg: &mut CpuBuf<F>,
        exp_avg_sq: &mut CpuBuf<F>,
        clock: &mut CpuBuf<u64>,
        hp: &AdamParams,
        mut param: Option<&mut CpuBuf<F>>,
        mut param_bf16: Option<&mut CpuBuf<bf16>>,
        mut delta: Option<&mut CpuBuf<F>>,
    ) -> Result<()> {
        let (p_ref, h_ref, d_ref) = (param.as_deref(), param_bf16.as_deref(), delta.as_deref());
        check_sparse_adam(self, coo, exp_avg, exp_avg_sq, clock, hp, p_ref, h_ref, d_ref)?;
        let (rows, cols) = coo.shape;
        // The entries are data: the host reads them here (the CUDA kernel skips and reports).
        for e in 0..coo.len {
            if coo.rows[e] as usize >= rows || coo.cols[e] as usize >= cols {
                return Err(Error::invalid("sparse_adam", format!("entry {e} outside {rows}x{cols}")));
            }
        }
        adam_entries(coo, exp_avg, exp_avg_sq, clock, hp, |e, i, change| {
            if let Some(p) = param.as_deref_mut() {
                p[i] += change;
                if let Some(h) = param_bf16.as_deref_mut() {
                    h[i] = p[i].to_bf16();
                }
            }
            if let Some(d) = delta.as_deref_mut() {
                d[e] = change;
            }
        });
        Ok(())
    }

    fn sparse_adam_densify<F: Real>(
        &self,
        coo: &Coo<Cpu, F>,
        exp_avg: &mut CpuBuf<F>,
        exp_avg_sq: &mut CpuBuf<F>,
        clock: &mut CpuBuf<u64>,
        hp: &AdamParams,
        dense: OutBuf<'_, Cpu, F>,
    ) -> Result<()> {
        let n = check_sparse_adam_densify(self, coo, [exp_avg, exp_avg_sq], clock, hp, &dense)?;
        check_coo_sorted("sparse_adam_densify", coo)?;
        match dense {
            OutBuf::Full(d) => {
                d[..n].fill(F::ZERO);
                adam_entries(coo, exp_avg, exp_avg_sq, clock, hp, |_, i, change| d[i] = change);
            }
            OutBuf::Half(d) => {
                d[..n].fill(bf16::ZERO);
                adam_entries(coo, exp_avg, exp_avg_sq, clock, hp, |_, i, change| d[i] = change.to_bf16());
            }
        }
        Ok(())
    }

    fn adamw<F: Real>(
        &self,
        param: &mut CpuBuf<F>,
        param_bf16: Option<&mut CpuBuf<bf16>>,
        grad: &CpuBuf<F>,
        exp_avg: &mut CpuBuf<F>,
        exp_avg_sq: &mut CpuBuf<F>,
        len: usize,
        clock: &mut CpuBuf<u64>,
        hp: &AdamParams,
    ) -> Result<()> {
        check_adamw(self, [param, grad, exp_avg, exp_avg_sq], param_bf16.as_deref(), len, clock, hp)?;
        let step = clock[0].saturating_add(1);
        let AdamwScalars { step_size, bc2_sqrt, decay } = hp.adamw_scalars::<F>(step);
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
        if let Some(h) = param_bf16 {
            h[..len].par_iter_mut().zip(&param[..len]).for_each(|(h, p)| *h = p.to_bf16());
        }
        clock[0] = step;
        Ok(())
    }

    fn sparse_adam_batch<F: Real>(&self, jobs: &mut [SparseAdamJob<'_, Cpu, F>]) -> Result<()> {
        for j in jobs.iter() {
            j.check(self)?;
        }
        for j in jobs.iter_mut() {
            let (hp, p, h, d) = (j.hp, j.param.as_deref_mut(), j.param_bf16.as_deref_mut(), j.delta.as_deref_mut());
            self.sparse_adam(j.coo, j.exp_avg, j.exp_avg_sq, j.clock, &hp, p, h, d)?;
        }
        Ok(())
    }

    fn adamw_batch<F: Real>(&self, jobs: &mut [AdamwJob<'_, Cpu, F>]) -> Result<()> {
        for j in jobs.iter() {
            check_adamw(
                self,
                [j.param, j.grad, j.exp_avg, j.exp_avg_sq],
                j.param_bf16.as_deref(),
                j.len,
                j.clock,
                &j.hp,
            )?;
        }
        for j in jobs.iter_mut() {
            let hp = j.hp;
            self.adamw(j.param, j.param_bf16.as_deref_mut(), j.grad, j.exp_avg, j.exp_avg_sq, j.len, j.clock, &hp)?;
        }
        Ok(())
    }
}

/// SparseAdam's moments at step `clock[0] + 1` for every entry of `coo` (in bounds, checked
/// by the caller), handing each entry's index `e`, linear place `i` and change to `apply`;
/// then advances the clock.
fn adam_entries<F: Real>(
    coo: &Coo<Cpu, F>,
    exp_avg: &mut [F],
    exp_avg_sq: &mut [F],
    clock: &mut [u64],
    hp: &AdamParams,
    mut apply: impl FnMut(usize, usize, F),
) {
    let cols = coo.shape.1;
    let step = clock[0].saturating_add(1);
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
        apply(e, i, -(step_size * (m / (v.sqrt() + eps))));
    }
    clock[0] = step;
}
