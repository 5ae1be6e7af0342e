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
    /// [entries, entries with their parameter, entries with a per-entry change, bytes of
    /// the dense change (entries x 4 or 2), entries with a bf16 copy, parameters]: per entry
    /// the COO entry read (12 bytes), both moments read and written, the parameter read and
    /// written and its bf16 copy written, the change written per entry and densely when
    /// given; each parameter's clock read and advanced.
    SPARSE_ADAM = "optim" / "sparse_adam_f32", Optimizer,
        |a| (28 * a[0] + 8 * a[1] + 4 * a[2] + a[3] + 2 * a[4] + 16 * a[5], 12 * a[0])
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
        let job = SparseAdamJob { coo, exp_avg, exp_avg_sq, clock, hp: *hp, param, param_bf16, delta };
        self.sparse_adam_batch(&mut [job])
    }

    fn sparse_adam_batch<F: Real>(&self, jobs: &mut [SparseAdamJob<'_, Cuda, F>]) -> Result<()> {
        require_f32::<F>("sparse_adam")?;
        for j in jobs.iter() {
            j.check(self)?;
        }
        for group in jobs.chunks_mut(SPARSE_ADAM_MAX_JOBS) {
            let args: Vec<SparseAdamJobArg> = group
                .iter_mut()
                .map(|j| {
                    let mut arg = SparseAdamJobArg::new(j.coo, [&mut *j.exp_avg, &mut *j.exp_avg_sq], j.clock, &j.hp);
                    arg.param = j.param.as_deref_mut().map_or(0, |p| p.ptr_mut());
                    arg.param_half = j.param_bf16.as_deref_mut().map_or(0, |h| h.ptr_mut());
                    arg.delta = j.delta.as_deref_mut().map_or(0, |d| d.ptr_mut());
                    arg
                })
                .collect();
            launch_sparse_adam(self, &args)?;
        }
        Ok(())
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
        let mut arg = SparseAdamJobArg::new(coo, [exp_avg, exp_avg_sq], clock, hp);
        // The output (f32 or bf16, the other left 0) and its byte count.
        let (ptr, bytes) = match dense {
            OutBuf::Full(d) => {
                arg.dense = d.ptr_mut();
                (arg.dense, n * 4)
            }
            OutBuf::Half(d) => {
                arg.dense_half = d.ptr_mut();
                (arg.dense_half, n * 2)
            }
        };
        self.memset_zero(ptr, bytes)?;
        launch_sparse_adam(self, &[arg])
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

/// Parameters per SparseAdam launch (`SPARSE_ADAM_MAX_JOBS` of cuda/optim.cu).
const SPARSE_ADAM_MAX_JOBS: usize = super::consts::SPARSE_ADAM_MAX_JOBS;

/// One parameter of a SparseAdam launch, as cuda/optim.cu's `struct SparseAdamJob` lays it
/// out (0 for an output not given).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SparseAdamJobArg {
    rows: u64,
    cols: u64,
    values: u64,
    len: u64,
    n_rows: u64,
    n_cols: u64,
    exp_avg: u64,
    exp_avg_sq: u64,
    clock: u64,
    param: u64,
    param_half: u64,
    delta: u64,
    dense: u64,
    dense_half: u64,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
}

impl SparseAdamJobArg {
    /// The entries, state and hyperparameters of one step, no output yet.
    fn new<F: Real>(
        coo: &Coo<Cuda, F>,
        [m, v]: [&mut CudaBuf<F>; 2],
        clock: &mut CudaBuf<u64>,
        hp: &AdamParams,
    ) -> Self {
        SparseAdamJobArg {
            rows: coo.rows.ptr(),
            cols: coo.cols.ptr(),
            values: coo.values.ptr(),
            len: coo.len as u64,
            n_rows: coo.shape.0 as u64,
            n_cols: coo.shape.1 as u64,
            exp_avg: m.ptr_mut(),
            exp_avg_sq: v.ptr_mut(),
            clock: clock.ptr_mut(),
            lr: hp.lr,
            beta1: hp.beta1,
            beta2: hp.beta2,
            eps: hp.eps,
            ..Default::default()
        }
    }
}

/// `struct SparseAdamJobs`: the kernel's by-value argument (unused slots stay zero).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SparseAdamJobsArg {
    job: [SparseAdamJobArg; SPARSE_ADAM_MAX_JOBS],
}

/// Launches `sparse_adam_f32` for up to SPARSE_ADAM_MAX_JOBS validated jobs.
fn launch_sparse_adam(cuda: &Cuda, args: &[SparseAdamJobArg]) -> Result<()> {
    let mut batch = SparseAdamJobsArg::default();
    batch.job[..args.len()].copy_from_slice(args);
    let per = |f: &dyn Fn(&SparseAdamJobArg) -> u64| args.iter().map(f).sum::<u64>();
    let sizes = [
        per(&|a| a.len),
        per(&|a| if a.param != 0 { a.len } else { 0 }),
        per(&|a| if a.delta != 0 { a.len } else { 0 }),
        per(&|a| {
            a.len
                * if a.dense != 0 {
                    4
                } else if a.dense_half != 0 {
                    2
                } else {
                    0
                }
        }),
        per(&|a| if a.param_half != 0 { a.len } else { 0 }),
        args.len() as u64,
    ];
    let mut grid = cuda.grid_1d(args.iter().map(|a| a.len as usize).max().unwrap_or(0), 16);
    grid.grid_dim.1 = args.len() as u32;
    let health = cuda.errors.ptr();
    // Launched even for an empty list: the clock advances every step.
    // SAFETY: sparse_adam_f32(SparseAdamJobs jobs, u64* health): for job y the COO holds
    // len entries, the state (and param, param_half, dense or dense_half, or null) rows *
    // cols, delta (or null) len, the clock CLOCK_LEN words (all checked by the callers'
    // validators); entries outside the matrix are skipped; blocks (x, y) touch only job y's.
    unsafe { cuda.launch(&SPARSE_ADAM, grid, &mut kargs![batch, health], &sizes) }
}
