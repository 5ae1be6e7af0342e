//! [`OptimOps`] for CUDA: the launchers of cuda/optim.cu (SparseAdam on COO entries, its
//! change per entry or stored densely, and dense AdamW), each after the op's shared validator. The step and its bias-corrected
//! scalars are computed on the device from the parameter's clock, with the same f64
//! operations as the CPU's [`AdamParams`] (bit-identical), so the launch arguments never
//! change between steps.

use super::{kargs, kernel, require_f32, Cuda, CudaBuf};
use crate::backend::ops::optim::*;
use crate::backend::{AdamParams, Coo, OutBuf};
use crate::error::Result;
use crate::scalar::Real;
use half::bf16;

kernel!(
    /// [len, param given, delta given, bytes of a dense change element (0 without one),
    /// bf16 copy of the parameter given]: per entry the COO entry read (12 bytes), both
    /// moments read and written, the parameter read and written and its bf16 copy written,
    /// the change written per entry and densely when given; the clock read and advanced.
    SPARSE_ADAM = "optim" / "sparse_adam_f32", Optimizer,
        |a| ((28 + 8 * a[1] + 2 * a[4] + 4 * a[2] + a[3]) * a[0] + 16, 12 * a[0])
);
kernel!(
    /// [entries, entries with a bf16 copy, parameters]: per entry the parameter and both
    /// moments read and written, the gradient read, the bf16 copy written when given; each
    /// parameter's clock advanced.
    ADAMW = "optim" / "adamw_f32", Optimizer, |a| (28 * a[0] + 2 * a[1] + 16 * a[2], 14 * a[0])
);

impl OptimOps for Cuda {
    fn sparse_adam<F: Real>(
        &self,
        coo: &Coo<Cuda, F>,
        exp_avg: &mut CudaBuf<F>,
        exp_avg_sq: &mut CudaBuf<F>,
        clock: &mut CudaBuf<u64>,
        hp: &AdamParams,
        param: Option<&mut CudaBuf<F>>,
        param_bf16: Option<&mut CudaBuf<bf16>>,
        delta: Option<&mut CudaBuf<F>>,
    ) -> Result<()> {
        const OP: &str = "sparse_adam";
        require_f32::<F>(OP)?;
        let (p_ref, h_ref, d_ref) = (param.as_deref(), param_bf16.as_deref(), delta.as_deref());
        check_sparse_adam(self, coo, exp_avg, exp_avg_sq, clock, hp, p_ref, h_ref, d_ref)?;
        let p = param.map_or(0u64, |p| p.ptr_mut());
        let h = param_bf16.map_or(0u64, |h| h.ptr_mut());
        let d = delta.map_or(0u64, |d| d.ptr_mut());
        launch_sparse_adam(self, coo, [exp_avg, exp_avg_sq], clock, hp, [p, h, d], (0, 0))
    }

    fn sparse_adam_densify<F: Real>(
        &self,
        coo: &Coo<Cuda, F>,
        exp_avg: &mut CudaBuf<F>,
        exp_avg_sq: &mut CudaBuf<F>,
        clock: &mut CudaBuf<u64>,
        hp: &AdamParams,
        dense: OutBuf<'_, Cuda, F>,
    ) -> Result<()> {
        require_f32::<F>("sparse_adam_densify")?;
        let n = check_sparse_adam_densify(self, coo, [exp_avg, exp_avg_sq], clock, hp, &dense)?;
        // (f32 output, bf16 output) with 0 for the one not given, the output, its bytes.
        let (pair, ptr, bytes) = match dense {
            OutBuf::Full(d) => ((d.ptr_mut(), 0), d.ptr_mut(), n * 4),
            OutBuf::Half(d) => ((0, d.ptr_mut()), d.ptr_mut(), n * 2),
        };
        self.memset_zero(ptr, bytes)?;
        launch_sparse_adam(self, coo, [exp_avg, exp_avg_sq], clock, hp, [0, 0, 0], pair)
    }

    fn adamw<F: Real>(
        &self,
        param: &mut CudaBuf<F>,
        param_bf16: Option<&mut CudaBuf<bf16>>,
        grad: &CudaBuf<F>,
        exp_avg: &mut CudaBuf<F>,
        exp_avg_sq: &mut CudaBuf<F>,
        len: usize,
        clock: &mut CudaBuf<u64>,
        hp: &AdamParams,
    ) -> Result<()> {
        let job = AdamwJob { param, param_bf16, grad, exp_avg, exp_avg_sq, len, clock, hp: *hp };
        self.adamw_batch(&mut [job])
    }

    fn adamw_batch<F: Real>(&self, jobs: &mut [AdamwJob<'_, Cuda, F>]) -> Result<()> {
        const OP: &str = "adamw";
        require_f32::<F>(OP)?;
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
        let health = self.errors.ptr();
        for group in jobs.chunks_mut(ADAMW_MAX_JOBS) {
            let mut batch = AdamwJobsArg::default();
            for (slot, j) in batch.job.iter_mut().zip(group.iter_mut()) {
                *slot = AdamwJobArg {
                    param: j.param.ptr_mut(),
                    grad: j.grad.ptr(),
                    exp_avg: j.exp_avg.ptr_mut(),
                    exp_avg_sq: j.exp_avg_sq.ptr_mut(),
                    param_half: j.param_bf16.as_deref_mut().map_or(0, |h| h.ptr_mut()),
                    n: j.len as u64,
                    clock: j.clock.ptr_mut(),
                    lr: j.hp.lr,
                    weight_decay: j.hp.weight_decay,
                    beta1: j.hp.beta1,
                    beta2: j.hp.beta2,
                    eps: j.hp.eps,
                    unused: 0.0,
                };
            }
            let n: u64 = group.iter().map(|j| j.len as u64).sum();
            let halves: u64 = group.iter().filter(|j| j.param_bf16.is_some()).map(|j| j.len as u64).sum();
            let mut grid = self.grid_1d(group.iter().map(|j| j.len).max().unwrap_or(0), 16);
            grid.grid_dim.1 = group.len() as u32;
            // Launched even for len = 0: the clock advances every step.
            // SAFETY: adamw_f32(AdamwJobs jobs, const u64* health): for job y, all four
            // buffers (and param_half, or null) hold >= n elements and the clock CLOCK_LEN
            // words (check_adamw); blocks (x, y) touch only job y's.
            unsafe { self.launch(&ADAMW, grid, &mut kargs![batch, health], &[n, halves, group.len() as u64]) }?;
        }
        Ok(())
    }
}

/// Parameters per AdamW launch (`ADAMW_MAX_JOBS` of cuda/optim.cu).
const ADAMW_MAX_JOBS: usize = super::consts::ADAMW_MAX_JOBS;

/// One parameter of an AdamW launch, as cuda/optim.cu's `struct AdamwJob` lays it out.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct AdamwJobArg {
    param: u64,
    grad: u64,
    exp_avg: u64,
    exp_avg_sq: u64,
    param_half: u64,
    n: u64,
    clock: u64,
    lr: f32,
    weight_decay: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    unused: f32,
}

/// `struct AdamwJobs`: the kernel's by-value argument (unused slots stay zero).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct AdamwJobsArg {
    job: [AdamwJobArg; ADAMW_MAX_JOBS],
}

/// Launches `sparse_adam_f32` after the caller's validation: `[param, param_bf16, delta]`
/// and `dense` are device addresses or 0 for none (`dense` as (f32, bf16), at most one
/// given).
fn launch_sparse_adam<F: Real>(
    cuda: &Cuda,
    coo: &Coo<Cuda, F>,
    [exp_avg, exp_avg_sq]: [&mut CudaBuf<F>; 2],
    clock: &mut CudaBuf<u64>,
    hp: &AdamParams,
    [p, h, d]: [u64; 3],
    (dense, dense_half): (u64, u64),
) -> Result<()> {
    let (rows, cols) = coo.shape;
    // Launched even for an empty list: the clock advances every step.
    let (ck, lr) = (clock.ptr_mut(), hp.lr);
    let (rp, cp, vp, len, r, c) =
        (coo.rows.ptr(), coo.cols.ptr(), coo.values.ptr(), coo.len as u64, rows as u64, cols as u64);
    let (m, v) = (exp_avg.ptr_mut(), exp_avg_sq.ptr_mut());
    let (b1, b2, eps) = (hp.beta1, hp.beta2, hp.eps);
    let err = cuda.errors.ptr();
    let dense_bytes = if dense != 0 {
        4
    } else if dense_half != 0 {
        2
    } else {
        0
    };
    // SAFETY: sparse_adam_f32(const u32* rows, const u32* cols, const float* values, u64 len,
    // u64 n_rows, u64 n_cols, float* exp_avg, float* exp_avg_sq, u64* clock, float lr,
    // float beta1, float beta2, float eps, float* param, __nv_bfloat16* param_half,
    // float* delta, float* dense, __nv_bfloat16* dense_half, u64* health): the COO holds len
    // entries, the state (and param, param_half, dense or dense_half, or null) rows * cols,
    // delta (or null) len, the clock CLOCK_LEN words, `health` the health block (all checked
    // by the callers' validators); entries outside the matrix are skipped.
    unsafe {
        cuda.launch(
            &SPARSE_ADAM,
            cuda.grid_1d(coo.len, 16),
            &mut kargs![rp, cp, vp, len, r, c, m, v, ck, lr, b1, b2, eps, p, h, d, dense, dense_half, err],
            &[len, u64::from(p != 0), u64::from(d != 0), dense_bytes, u64::from(h != 0)],
        )
    }
}
