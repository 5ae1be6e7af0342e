//! [`DenseOps`] for CUDA: GEMM through the cuBLAS launchers in gemm.rs, and the launchers of
//! cuda/dense.cu (casts, bias add and gradient, finiteness count, axpy) and
//! cuda/activation.cu (GELU, SwiGLU), each after the op's shared validator.

use super::{gemm, kargs, require_f32, Cuda, CudaBuf};
use crate::backend::ops::dense::*;
use crate::backend::{GeluKind, Gemm};
use crate::error::{checked_mul, Result};
use crate::scalar::Real;
use cudarc::driver::LaunchConfig;
use half::bf16;

/// Blocks per multiprocessor of the memory-bound grid-stride kernels.
pub(super) const PER_SM: u32 = 16;

impl DenseOps for Cuda {
    /// cuBLAS, through the row-major helper in gemm.rs.
    fn gemm<F: Real>(&self, spec: &Gemm, a: &CudaBuf<F>, b: &CudaBuf<F>, c: &mut CudaBuf<F>) -> Result<()> {
        gemm::gemm(self, spec, a, b, c)
    }

    /// cuBLAS GemmEx with bf16 operands, through the row-major helper in gemm.rs.
    fn gemm_bf16<F: Real>(&self, spec: &Gemm, a: &CudaBuf<bf16>, b: &CudaBuf<bf16>, c: &mut CudaBuf<F>) -> Result<()> {
        gemm::gemm_bf16(self, spec, a, b, c)
    }

    fn cast_to_bf16<F: Real>(&self, src: &CudaBuf<F>, dst: &mut CudaBuf<bf16>, len: usize) -> Result<()> {
        require_f32::<F>("cast_to_bf16")?;
        check_cast(self, "cast_to_bf16", src, dst, len)?;
        if len == 0 {
            return Ok(());
        }
        let (s, d, n) = (src.ptr(), dst.ptr_mut(), len as u64);
        // SAFETY: cast_f32_to_bf16(const float* src, bf16* dst, u64 n); both hold >= n elements.
        unsafe { self.launch("dense", "cast_f32_to_bf16", self.grid_1d(len, PER_SM), &mut kargs![s, d, n]) }
    }

    fn cast_from_bf16<F: Real>(&self, src: &CudaBuf<bf16>, dst: &mut CudaBuf<F>, len: usize) -> Result<()> {
        require_f32::<F>("cast_from_bf16")?;
        check_cast(self, "cast_from_bf16", src, dst, len)?;
        if len == 0 {
            return Ok(());
        }
        let (s, d, n) = (src.ptr(), dst.ptr_mut(), len as u64);
        // SAFETY: cast_bf16_to_f32(const bf16* src, float* dst, u64 n); both hold >= n elements.
        unsafe { self.launch("dense", "cast_bf16_to_f32", self.grid_1d(len, PER_SM), &mut kargs![s, d, n]) }
    }

    fn add_bias<F: Real>(&self, y: &mut CudaBuf<F>, bias: &CudaBuf<F>, rows: usize, cols: usize) -> Result<()> {
        require_f32::<F>("add_bias")?;
        check_add_bias(self, [y, bias], rows, cols)?;
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        // The kernel does not stride over columns: grid.x must cover them all.
        let cfg = self.grid_2d(rows, cols, 256, i32::MAX as u32);
        let (yp, bp, r, c) = (y.ptr_mut(), bias.ptr(), rows as u64, cols as u64);
        // SAFETY: add_bias_f32(float* y, const float* bias, u64 rows, u64 cols); y holds
        // rows * cols and bias cols elements; grid.x * 256 >= cols.
        unsafe { self.launch("dense", "add_bias_f32", cfg, &mut kargs![yp, bp, r, c]) }
    }

    fn bias_grad<F: Real>(&self, g: &CudaBuf<F>, rows: usize, cols: usize, db: &mut CudaBuf<F>, beta: F) -> Result<()> {
        require_f32::<F>("bias_grad")?;
        check_bias_grad(self, g, rows, cols, db)?;
        if cols == 0 {
            return Ok(());
        }
        let gx = cols.div_ceil(32);
        let max_chunks = rows.div_ceil(64).clamp(1, 1024);
        let wanted = (self.sm_count as usize * 8).div_ceil(gx).clamp(1, max_chunks);
        let rows_per_chunk = rows.div_ceil(wanted).max(1);
        let chunks = rows.div_ceil(rows_per_chunk).max(1);
        let beta = beta.to_f64() as f32;
        let (gp, dbp) = (g.ptr(), db.ptr_mut());
        let (r, c, rpc) = (rows as u64, cols as u64, rows_per_chunk as u64);
        let cfg = LaunchConfig { grid_dim: (gx as u32, chunks as u32, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 };
        let mut scratch = self.lock_scratch();
        let partial = if chunks == 1 { 0u64 } else { self.arena(&mut scratch, (chunks * cols).div_ceil(2))? };
        // SAFETY: bias_grad_partial_f32(const float* g, u64 rows, u64 cols, u64 rows_per_chunk,
        // float* partial, float* db, float beta): g holds rows * cols, db cols elements; with
        // more than one chunk `partial` holds chunks * cols floats (arena sized above), with one
        // chunk it is not touched. chunks <= 1024 fits grid.y.
        unsafe { self.launch("dense", "bias_grad_partial_f32", cfg, &mut kargs![gp, r, c, rpc, partial, dbp, beta]) }?;
        if chunks > 1 {
            let k = chunks as u64;
            // SAFETY: bias_grad_final_f32(const float* partial, u64 chunks, u64 cols, float* db,
            // float beta): partial holds chunks * cols floats, db cols.
            unsafe {
                self.launch(
                    "dense",
                    "bias_grad_final_f32",
                    self.grid_1d(cols, PER_SM),
                    &mut kargs![partial, k, c, dbp, beta],
                )
            }?;
        }
        Ok(())
    }

    fn count_nonfinite<F: Real>(&self, x: &CudaBuf<F>, len: usize) -> Result<(usize, usize)> {
        require_f32::<F>("count_nonfinite")?;
        check_count_nonfinite(self, x, len)?;
        if len == 0 {
            return Ok((0, 0));
        }
        let scratch = self.lock_scratch();
        let status = scratch.status.ptr();
        let (one, none) = (1u64, u64::MAX);
        let first_slot = status + 8;
        self.memset_zero(status, 8)?;
        // SAFETY: fill_u64(u64* buf, u64 n, u64 value) on status[1..2] (16 status words).
        unsafe { self.launch("dense", "fill_u64", self.grid_1d(1, 1), &mut kargs![first_slot, one, none]) }?;
        let (xp, n) = (x.ptr(), len as u64);
        // SAFETY: count_nonfinite_f32(const float* x, u64 n, u64* status): x holds n elements,
        // status two words.
        unsafe { self.launch("dense", "count_nonfinite_f32", self.grid_1d(len, PER_SM), &mut kargs![xp, n, status]) }?;
        let mut out = [0u64; 2];
        self.read_device(status, &mut out)?;
        let count = out[0] as usize;
        Ok((count, if count == 0 { 0 } else { out[1] as usize }))
    }

    fn axpy<F: Real>(&self, alpha: F, x: &CudaBuf<F>, y: &mut CudaBuf<F>, len: usize) -> Result<()> {
        require_f32::<F>("axpy")?;
        check_axpy(self, [x, y], len)?;
        if len == 0 {
            return Ok(());
        }
        let (a, xp, yp, n) = (alpha.to_f64() as f32, x.ptr(), y.ptr_mut(), len as u64);
        // SAFETY: axpy_f32(float alpha, const float* x, float* y, u64 n); x, y hold >= n.
        unsafe { self.launch("dense", "axpy_f32", self.grid_1d(len, PER_SM), &mut kargs![a, xp, yp, n]) }
    }

    fn gelu<F: Real>(&self, x: &CudaBuf<F>, y: &mut CudaBuf<F>, len: usize, kind: GeluKind) -> Result<()> {
        require_f32::<F>("gelu")?;
        check_gelu(self, [x, y], len)?;
        if len == 0 {
            return Ok(());
        }
        let name = match kind {
            GeluKind::Erf => "gelu_erf_f32",
            GeluKind::Tanh => "gelu_tanh_f32",
        };
        let (xp, yp, n) = (x.ptr(), y.ptr_mut(), len as u64);
        // SAFETY: gelu_*_f32(const float* x, float* y, u64 n); both hold >= n elements.
        unsafe { self.launch("activation", name, self.grid_1d(len, PER_SM), &mut kargs![xp, yp, n]) }
    }

    fn gelu_backward<F: Real>(
        &self,
        x: &CudaBuf<F>,
        dy: &CudaBuf<F>,
        dx: &mut CudaBuf<F>,
        len: usize,
        kind: GeluKind,
    ) -> Result<()> {
        require_f32::<F>("gelu_backward")?;
        check_gelu_backward(self, [x, dy, dx], len)?;
        if len == 0 {
            return Ok(());
        }
        let name = match kind {
            GeluKind::Erf => "gelu_erf_backward_f32",
            GeluKind::Tanh => "gelu_tanh_backward_f32",
        };
        let (xp, dyp, dxp, n) = (x.ptr(), dy.ptr(), dx.ptr_mut(), len as u64);
        // SAFETY: gelu_*_backward_f32(const float* x, const float* dy, float* dx, u64 n); all
        // three hold >= n elements.
        unsafe { self.launch("activation", name, self.grid_1d(len, PER_SM), &mut kargs![xp, dyp, dxp, n]) }
    }

    fn swiglu<F: Real>(&self, gate: &CudaBuf<F>, up: &CudaBuf<F>, h: &mut CudaBuf<F>, len: usize) -> Result<()> {
        require_f32::<F>("swiglu")?;
        check_swiglu(self, [gate, up, h], len)?;
        if len == 0 {
            return Ok(());
        }
        let (gp, up, hp, n) = (gate.ptr(), up.ptr(), h.ptr_mut(), len as u64);
        // SAFETY: swiglu_f32(const float* gate, const float* up, float* h, u64 n); all >= n.
        unsafe { self.launch("activation", "swiglu_f32", self.grid_1d(len, PER_SM), &mut kargs![gp, up, hp, n]) }
    }

    fn swiglu_backward<F: Real>(
        &self,
        gate: &CudaBuf<F>,
        up: &CudaBuf<F>,
        dh: &CudaBuf<F>,
        d_gate: &mut CudaBuf<F>,
        d_up: &mut CudaBuf<F>,
        len: usize,
    ) -> Result<()> {
        require_f32::<F>("swiglu_backward")?;
        check_swiglu_backward(self, [gate, up, dh, d_gate, d_up], len)?;
        if len == 0 {
            return Ok(());
        }
        let (gp, upp, dhp, dgp, dup, n) =
            (gate.ptr(), up.ptr(), dh.ptr(), d_gate.ptr_mut(), d_up.ptr_mut(), len as u64);
        // SAFETY: swiglu_backward_f32(const float* gate, const float* up, const float* dh,
        // float* d_gate, float* d_up, u64 n); all five hold >= n elements.
        unsafe {
            self.launch(
                "activation",
                "swiglu_backward_f32",
                self.grid_1d(len, PER_SM),
                &mut kargs![gp, upp, dhp, dgp, dup, n],
            )
        }
    }
}

/// `C = beta C` on the (batched, strided) `rows x cols` matrix at `c` (the k = 0 product).
#[allow(clippy::too_many_arguments)]
pub(super) fn scale_rows(
    cuda: &Cuda,
    c: u64,
    rows: usize,
    cols: usize,
    ld: usize,
    batch: usize,
    stride: usize,
    beta: f32,
) -> Result<()> {
    let total = checked_mul("gemm", checked_mul("gemm", rows, cols)?, batch)?;
    if total == 0 {
        return Ok(());
    }
    let (r, n, l, b, s) = (rows as u64, cols as u64, ld as u64, batch as u64, stride as u64);
    // SAFETY: scale_rows_f32(float* c, u64 rows, u64 cols, u64 ld, u64 batch, u64 stride,
    // float beta) touches c[b * stride + r * ld + col] for r < rows, col < cols, b < batch,
    // all inside C by `Gemm::validate`, which the caller ran.
    unsafe { cuda.launch("dense", "scale_rows_f32", cuda.grid_1d(total, PER_SM), &mut kargs![c, r, n, l, b, s, beta]) }
}
