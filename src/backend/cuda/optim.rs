//! [`OptimOps`] for CUDA: the launchers of cuda/optim.cu (SparseAdam on COO entries and
//! dense AdamW), each after the op's shared validator. The bias-corrected scalars come from
//! [`AdamParams`] on the host, the same f64 arithmetic as the CPU's, rounded to f32.

use super::{kargs, require_f32, Cuda, CudaBuf};
use crate::backend::ops::optim::*;
use crate::backend::{AdamParams, AdamwScalars, Coo};
use crate::error::Result;
use crate::scalar::Real;

impl OptimOps for Cuda {
    fn sparse_adam<F: Real>(
        &self,
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
        check_sparse_adam(self, coo, exp_avg, exp_avg_sq, step, hp, param.as_deref(), delta.as_deref())?;
        let (rows, cols) = coo.shape;
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
        let err = self.errors.ptr();
        // SAFETY: sparse_adam_f32(const u32* rows, const u32* cols, const float* values, u64 len,
        // u64 n_rows, u64 n_cols, float* exp_avg, float* exp_avg_sq, float step_size, float beta1,
        // float beta2, float eps, float* param, float* delta, u32* err): the COO holds len
        // entries, the state (and param, or null) rows * cols, delta (or null) len; entries
        // outside the matrix are skipped.
        unsafe {
            self.launch(
                "optim",
                "sparse_adam_f32",
                self.grid_1d(coo.len, 16),
                &mut kargs![rp, cp, vp, len, r, c, m, v, step_size, b1, b2, eps, p, d, err],
            )
        }
    }

    fn adamw<F: Real>(
        &self,
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
        check_adamw(self, [param, grad, exp_avg, exp_avg_sq], len, step, hp)?;
        if len == 0 {
            return Ok(());
        }
        let AdamwScalars { step_size, bc2_sqrt, decay } = hp.adamw_scalars::<f32>(step);
        let (b1, b2, eps) = (hp.beta1, hp.beta2, hp.eps);
        let (p, g, m, v, n) = (param.ptr_mut(), grad.ptr(), exp_avg.ptr_mut(), exp_avg_sq.ptr_mut(), len as u64);
        // SAFETY: adamw_f32(float* param, const float* grad, float* exp_avg, float* exp_avg_sq,
        // u64 n, float step_size, float bc2_sqrt, float decay, float beta1, float beta2,
        // float eps): all four buffers hold >= n elements.
        unsafe {
            self.launch(
                "optim",
                "adamw_f32",
                self.grid_1d(len, 16),
                &mut kargs![p, g, m, v, n, step_size, bc2_sqrt, decay, b1, b2, eps],
            )
        }
    }
}
