//! [`DenseOps`] for CUDA: GEMM through the cuBLAS launchers in gemm.rs, and the launchers of
//! cuda/dense.cu (casts, bias add and gradient, finiteness count, axpy) and
//! cuda/activation.cu (GELU, SwiGLU), each after the op's shared validator.

use super::{gemm, kargs, kernel, require_f32, Cuda, CudaBuf};
use crate::backend::ops::dense::*;
use crate::backend::{GeluKind, Gemm};
use crate::error::{checked_mul, Result};
use crate::scalar::Real;
use cudarc::driver::LaunchConfig;
use half::bf16;

/// Blocks per multiprocessor of the memory-bound grid-stride kernels.
pub(super) const PER_SM: u32 = 16;

// Costs (see `kernel!`): every input read once, every output written once, in bytes; flops
// are the arithmetic per element the kernel does (transcendentals counted as one).
kernel!(
    /// [n]: reads n f32, writes n bf16.
    CAST_TO_BF16 = "dense" / "cast_f32_to_bf16", Elementwise, |a| (6 * a[0], a[0])
);
kernel!(
    /// [n]: reads n bf16, writes n f32.
    CAST_FROM_BF16 = "dense" / "cast_bf16_to_f32", Elementwise, |a| (6 * a[0], a[0])
);
kernel!(
    /// [n0 + n1 + n2 + n3]: reads f32, writes bf16.
    CAST_TO_BF16_X4 = "dense" / "cast_f32_to_bf16_x4", Elementwise, |a| (6 * a[0], a[0])
);
kernel!(
    /// [n0 + n1 + n2 + n3]: reads bf16, writes f32.
    CAST_FROM_BF16_X4 = "dense" / "cast_bf16_to_f32_x4", Elementwise, |a| (6 * a[0], a[0])
);
kernel!(
    /// [rows, cols]: y read and written, bias read.
    ADD_BIAS = "dense" / "add_bias_f32", Elementwise, |a| (8 * a[0] * a[1] + 4 * a[1], a[0] * a[1])
);
kernel!(
    /// [rows, cols, chunks]: g read; one partial row per chunk written (db read and written
    /// when there is one chunk).
    BIAS_GRAD_PARTIAL = "dense" / "bias_grad_partial_f32", Elementwise,
    |a| (4 * a[0] * a[1] + if a[2] == 1 { 8 * a[1] } else { 4 * a[2] * a[1] }, a[0] * a[1])
);
kernel!(
    /// [chunks, cols]: the partials read, db read and written.
    BIAS_GRAD_FINAL = "dense" / "bias_grad_final_f32", Elementwise, |a| (4 * a[0] * a[1] + 8 * a[1], a[0] * a[1])
);
kernel!(
    /// [n]: x read, two status words updated.
    COUNT_NONFINITE = "dense" / "count_nonfinite_f32", Elementwise, |a| (4 * a[0] + 16, a[0])
);
kernel!(
    /// [n]: x read, the health block's three words updated.
    FLAG_NONFINITE = "dense" / "flag_nonfinite_f32", Elementwise, |a| (4 * a[0] + 24, a[0])
);
kernel!(
    /// [n]: reads n f32, writes n bf16, the health block's three words updated.
    CAST_TO_BF16_CHECKED = "dense" / "cast_f32_to_bf16_checked", Elementwise, |a| (6 * a[0] + 24, a[0])
);
kernel!(
    /// [n]: reads and writes n f32, the health block's three words updated.
    COPY_CHECKED = "dense" / "copy_f32_checked", Elementwise, |a| (8 * a[0] + 24, a[0])
);
kernel!(
    /// [n]: x read by one thread, one f64 written.
    SUM_TO_F64 = "dense" / "sum_f32_to_f64", Elementwise, |a| (4 * a[0] + 8, a[0])
);
kernel!(
    /// [n]: x read, y read and written.
    AXPY = "dense" / "axpy_f32", Elementwise, |a| (12 * a[0], 2 * a[0])
);
kernel!(
    /// [elements, beta != 0]: C written (and read first when beta != 0).
    SCALE_ROWS = "dense" / "scale_rows_f32", Elementwise, |a| ((4 + 4 * a[1]) * a[0], a[0])
);
kernel!(
    /// [n]: n elements of 1, 2, 4 or 8 bytes written.
    FILL = "dense" / ["fill_u8", "fill_u16", "fill_u32", "fill_u64"], Elementwise, |a| (a[0] * a[1], 0)
);
kernel!(
    /// [n]: x read, y written; erf or tanh and ~8 operations per element.
    GELU = "activation" / ["gelu_erf_f32", "gelu_tanh_f32"], Elementwise, |a| (8 * a[0], 10 * a[0])
);
kernel!(
    /// [n]: x and dy read, dx written.
    GELU_BACKWARD = "activation" / ["gelu_erf_backward_f32", "gelu_tanh_backward_f32"], Elementwise,
    |a| (12 * a[0], 16 * a[0])
);
kernel!(
    /// [n]: gate and up read, h written; an exp and a division per element.
    SWIGLU = "activation" / "swiglu_f32", Elementwise, |a| (12 * a[0], 6 * a[0])
);
kernel!(
    /// [n]: gate, up and dh read, d_gate and d_up written.
    SWIGLU_BACKWARD = "activation" / "swiglu_backward_f32", Elementwise, |a| (20 * a[0], 12 * a[0])
);
kernel!(
    /// [n]: gate and up read, h written, gate and up written in bf16.
    SWIGLU_SAVE_BF16 = "activation" / "swiglu_save_bf16_f32", Elementwise, |a| (16 * a[0], 6 * a[0])
);
kernel!(
    /// [n]: gate and up read in bf16, dh read, d_gate and d_up written.
    SWIGLU_BACKWARD_BF16 = "activation" / "swiglu_backward_bf16_f32", Elementwise, |a| (16 * a[0], 12 * a[0])
);
kernel!(
    /// [n]: gate, up and dh read, d_gate and d_up written, the health block's three words
    /// updated.
    SWIGLU_BACKWARD_CHECKED = "activation" / "swiglu_backward_checked_f32", Elementwise,
        |a| (20 * a[0] + 24, 12 * a[0])
);
kernel!(
    /// [n]: gate and up read in bf16 and written over in bf16, dh read, the health block's
    /// three words updated.
    SWIGLU_BACKWARD_BF16_CHECKED = "activation" / "swiglu_backward_bf16_checked", Elementwise,
        |a| (12 * a[0] + 24, 12 * a[0])
);

/// The fill kernel for elements of `size` bytes.
pub(super) fn fill_kernel(size: usize) -> Option<&'static crate::perf::KernelCost> {
    match size {
        1 => Some(&FILL[0]),
        2 => Some(&FILL[1]),
        4 => Some(&FILL[2]),
        8 => Some(&FILL[3]),
        _ => None,
    }
}

impl DenseOps for Cuda {
    /// cuBLAS, through the row-major helper in gemm.rs.
    fn gemm<F: Real>(&self, spec: &Gemm, a: &CudaBuf<F>, b: &CudaBuf<F>, c: &mut CudaBuf<F>) -> Result<()> {
        gemm::gemm(self, spec, a, b, c)
    }

    /// cuBLAS GemmEx with bf16 operands, through the row-major helper in gemm.rs.
    fn gemm_bf16<F: Real>(&self, spec: &Gemm, a: &CudaBuf<bf16>, b: &CudaBuf<bf16>, c: &mut CudaBuf<F>) -> Result<()> {
        gemm::gemm_bf16(self, spec, a, b, c)
    }

    /// cuBLAS GemmEx with bf16 operands and a bf16 C, through gemm.rs.
    fn gemm_bf16_out(&self, spec: &Gemm, a: &CudaBuf<bf16>, b: &CudaBuf<bf16>, c: &mut CudaBuf<bf16>) -> Result<()> {
        gemm::gemm_bf16_out(self, spec, a, b, c)
    }

    /// cuBLAS SSYRK twice, through gemm.rs.
    fn gram_accumulate<F: Real>(&self, g: &CudaBuf<F>, out: usize, inp: usize, grams: &mut CudaBuf<F>) -> Result<()> {
        gemm::gram_accumulate(self, g, out, inp, grams)
    }

    fn cast_to_bf16<F: Real>(&self, src: &CudaBuf<F>, dst: &mut CudaBuf<bf16>, len: usize) -> Result<()> {
        require_f32::<F>("cast_to_bf16")?;
        check_cast(self, "cast_to_bf16", src, dst, len)?;
        if len == 0 {
            return Ok(());
        }
        let (s, d, n) = (src.ptr(), dst.ptr_mut(), len as u64);
        // SAFETY: cast_f32_to_bf16(const float* src, bf16* dst, u64 n); both hold >= n elements.
        unsafe { self.launch(&CAST_TO_BF16, self.grid_1d(len, PER_SM), &mut kargs![s, d, n], &[n]) }
    }

    fn cast_from_bf16<F: Real>(&self, src: &CudaBuf<bf16>, dst: &mut CudaBuf<F>, len: usize) -> Result<()> {
        require_f32::<F>("cast_from_bf16")?;
        check_cast(self, "cast_from_bf16", src, dst, len)?;
        if len == 0 {
            return Ok(());
        }
        let (s, d, n) = (src.ptr(), dst.ptr_mut(), len as u64);
        // SAFETY: cast_bf16_to_f32(const bf16* src, float* dst, u64 n); both hold >= n elements.
        unsafe { self.launch(&CAST_FROM_BF16, self.grid_1d(len, PER_SM), &mut kargs![s, d, n], &[n]) }
    }

    fn cast_to_bf16_x4<F: Real>(
        &self,
        src: [&CudaBuf<F>; 4],
        dst: [&mut CudaBuf<bf16>; 4],
        len: [usize; 4],
    ) -> Result<()> {
        require_f32::<F>("cast_to_bf16_x4")?;
        check_cast_x4(self, "cast_to_bf16_x4", src, [&*dst[0], &*dst[1], &*dst[2], &*dst[3]], len)?;
        // SAFETY: cast_f32_to_bf16_x4 takes four (const float* src, bf16* dst, u64 n)
        // triples; each src and dst holds >= its n elements (checked above).
        unsafe { self.launch_cast_x4(&CAST_TO_BF16_X4, src.map(|b| b.ptr()), dst.map(|b| b.ptr_mut()), len) }
    }

    fn cast_from_bf16_x4<F: Real>(
        &self,
        src: [&CudaBuf<bf16>; 4],
        dst: [&mut CudaBuf<F>; 4],
        len: [usize; 4],
    ) -> Result<()> {
        require_f32::<F>("cast_from_bf16_x4")?;
        check_cast_x4(self, "cast_from_bf16_x4", src, [&*dst[0], &*dst[1], &*dst[2], &*dst[3]], len)?;
        // SAFETY: cast_bf16_to_f32_x4 takes four (const bf16* src, float* dst, u64 n)
        // triples; each src and dst holds >= its n elements (checked above).
        unsafe { self.launch_cast_x4(&CAST_FROM_BF16_X4, src.map(|b| b.ptr()), dst.map(|b| b.ptr_mut()), len) }
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
        unsafe { self.launch(&ADD_BIAS, cfg, &mut kargs![yp, bp, r, c], &[r, c]) }
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
        unsafe {
            self.launch(&BIAS_GRAD_PARTIAL, cfg, &mut kargs![gp, r, c, rpc, partial, dbp, beta], &[r, c, chunks as u64])
        }?;
        if chunks > 1 {
            let k = chunks as u64;
            // SAFETY: bias_grad_final_f32(const float* partial, u64 chunks, u64 cols, float* db,
            // float beta): partial holds chunks * cols floats, db cols.
            unsafe {
                self.launch(
                    &BIAS_GRAD_FINAL,
                    self.grid_1d(cols, PER_SM),
                    &mut kargs![partial, k, c, dbp, beta],
                    &[k, c],
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
        unsafe { self.launch(&FILL[3], self.grid_1d(1, 1), &mut kargs![first_slot, one, none], &[1, 8]) }?;
        let (xp, n) = (x.ptr(), len as u64);
        // SAFETY: count_nonfinite_f32(const float* x, u64 n, u64* status): x holds n elements,
        // status two words.
        unsafe { self.launch(&COUNT_NONFINITE, self.grid_1d(len, PER_SM), &mut kargs![xp, n, status], &[n]) }?;
        let mut out = [0u64; 2];
        self.read_device(status, &mut out)?;
        let count = out[0] as usize;
        Ok((count, if count == 0 { 0 } else { out[1] as usize }))
    }

    fn assert_finite<F: Real>(&self, x: &CudaBuf<F>, len: usize, what: &str) -> Result<()> {
        require_f32::<F>("assert_finite")?;
        check_reduce(self, "assert_finite", x, len)?;
        if len == 0 {
            return Ok(());
        }
        let (xp, n, id, health) = (x.ptr(), len as u64, self.check_id(what), self.errors.ptr());
        // SAFETY: flag_nonfinite_f32(const float* x, u64 n, u64 id, u64* health): x holds n
        // elements, the health block HEALTH_WORDS (>= 4) words.
        unsafe { self.launch(&FLAG_NONFINITE, self.grid_1d(len, PER_SM), &mut kargs![xp, n, id, health], &[n]) }
    }

    fn cast_to_bf16_checked<F: Real>(
        &self,
        src: &CudaBuf<F>,
        dst: &mut CudaBuf<bf16>,
        len: usize,
        what: &str,
    ) -> Result<()> {
        require_f32::<F>("cast_to_bf16_checked")?;
        check_cast(self, "cast_to_bf16_checked", src, dst, len)?;
        // SAFETY: cast_f32_to_bf16_checked(const float* src, bf16* dst, u64 n, u64 id, u64*
        // health); both buffers hold >= len elements (checked above).
        unsafe { self.launch_checked(&CAST_TO_BF16_CHECKED, src.ptr(), dst.ptr_mut(), len, what) }
    }

    fn copy_checked<F: Real>(&self, src: &CudaBuf<F>, dst: &mut CudaBuf<F>, len: usize, what: &str) -> Result<()> {
        require_f32::<F>("copy_checked")?;
        check_cast(self, "copy_checked", src, dst, len)?;
        // SAFETY: copy_f32_checked(const float* src, float* dst, u64 n, u64 id, u64* health);
        // both buffers hold >= len elements (checked above).
        unsafe { self.launch_checked(&COPY_CHECKED, src.ptr(), dst.ptr_mut(), len, what) }
    }

    fn defers_finite_checks(&self) -> bool {
        true
    }

    fn sum_to_host<F: Real>(&self, x: &CudaBuf<F>, len: usize) -> Result<f64> {
        require_f32::<F>("sum_to_host")?;
        check_reduce(self, "sum_to_host", x, len)?;
        let (xp, n, out) = (x.ptr(), len as u64, self.errors.ptr() + 4 * 8);
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: sum_f32_to_f64(const float* x, u64 n, double* out): x holds n elements, `out`
        // is word 4 of the health block (HEALTH_WORDS = 8).
        unsafe { self.launch(&SUM_TO_F64, cfg, &mut kargs![xp, n, out], &[n]) }?;
        let words = self.check_device_errors()?;
        Ok(f64::from_bits(words[4]))
    }

    fn axpy<F: Real>(&self, alpha: F, x: &CudaBuf<F>, y: &mut CudaBuf<F>, len: usize) -> Result<()> {
        require_f32::<F>("axpy")?;
        check_axpy(self, [x, y], len)?;
        if len == 0 {
            return Ok(());
        }
        let (a, xp, yp, n) = (alpha.to_f64() as f32, x.ptr(), y.ptr_mut(), len as u64);
        // SAFETY: axpy_f32(float alpha, const float* x, float* y, u64 n); x, y hold >= n.
        unsafe { self.launch(&AXPY, self.grid_1d(len, PER_SM), &mut kargs![a, xp, yp, n], &[n]) }
    }

    fn gelu<F: Real>(&self, x: &CudaBuf<F>, y: &mut CudaBuf<F>, len: usize, kind: GeluKind) -> Result<()> {
        require_f32::<F>("gelu")?;
        check_gelu(self, [x, y], len)?;
        if len == 0 {
            return Ok(());
        }
        let kernel = match kind {
            GeluKind::Erf => &GELU[0],
            GeluKind::Tanh => &GELU[1],
        };
        let (xp, yp, n) = (x.ptr(), y.ptr_mut(), len as u64);
        // SAFETY: gelu_*_f32(const float* x, float* y, u64 n); both hold >= n elements.
        unsafe { self.launch(kernel, self.grid_1d(len, PER_SM), &mut kargs![xp, yp, n], &[n]) }
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
        let kernel = match kind {
            GeluKind::Erf => &GELU_BACKWARD[0],
            GeluKind::Tanh => &GELU_BACKWARD[1],
        };
        let (xp, dyp, dxp, n) = (x.ptr(), dy.ptr(), dx.ptr_mut(), len as u64);
        // SAFETY: gelu_*_backward_f32(const float* x, const float* dy, float* dx, u64 n); all
        // three hold >= n elements.
        unsafe { self.launch(kernel, self.grid_1d(len, PER_SM), &mut kargs![xp, dyp, dxp, n], &[n]) }
    }

    fn swiglu<F: Real>(&self, gate: &CudaBuf<F>, up: &CudaBuf<F>, h: &mut CudaBuf<F>, len: usize) -> Result<()> {
        require_f32::<F>("swiglu")?;
        check_swiglu(self, [gate, up, h], len)?;
        if len == 0 {
            return Ok(());
        }
        let (gp, up, hp, n) = (gate.ptr(), up.ptr(), h.ptr_mut(), len as u64);
        // SAFETY: swiglu_f32(const float* gate, const float* up, float* h, u64 n); all >= n.
        unsafe { self.launch(&SWIGLU, self.grid_1d(len, PER_SM), &mut kargs![gp, up, hp, n], &[n]) }
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
        check_swiglu_backward(self, "swiglu_backward", [gate, up, dh, d_gate, d_up], len)?;
        if len == 0 {
            return Ok(());
        }
        let (gp, upp, dhp, dgp, dup, n) =
            (gate.ptr(), up.ptr(), dh.ptr(), d_gate.ptr_mut(), d_up.ptr_mut(), len as u64);
        // SAFETY: swiglu_backward_f32(const float* gate, const float* up, const float* dh,
        // float* d_gate, float* d_up, u64 n); all five hold >= n elements.
        unsafe {
            self.launch(&SWIGLU_BACKWARD, self.grid_1d(len, PER_SM), &mut kargs![gp, upp, dhp, dgp, dup, n], &[n])
        }
    }

    fn swiglu_save_bf16<F: Real>(
        &self,
        gate: &CudaBuf<F>,
        up: &CudaBuf<F>,
        h: &mut CudaBuf<F>,
        gate_half: &mut CudaBuf<bf16>,
        up_half: &mut CudaBuf<bf16>,
        len: usize,
    ) -> Result<()> {
        require_f32::<F>("swiglu_save_bf16")?;
        check_swiglu_save_bf16(self, [gate, up, h], [gate_half, up_half], len)?;
        if len == 0 {
            return Ok(());
        }
        let (gp, upp, hp, ghp, uhp, n) =
            (gate.ptr(), up.ptr(), h.ptr_mut(), gate_half.ptr_mut(), up_half.ptr_mut(), len as u64);
        // SAFETY: swiglu_save_bf16_f32(const float* gate, const float* up, float* h,
        // bf16* gate_half, bf16* up_half, u64 n); all five hold >= n elements.
        unsafe {
            self.launch(&SWIGLU_SAVE_BF16, self.grid_1d(len, PER_SM), &mut kargs![gp, upp, hp, ghp, uhp, n], &[n])
        }
    }

    fn swiglu_backward_bf16<F: Real>(
        &self,
        gate_half: &CudaBuf<bf16>,
        up_half: &CudaBuf<bf16>,
        dh: &CudaBuf<F>,
        d_gate: &mut CudaBuf<F>,
        d_up: &mut CudaBuf<F>,
        len: usize,
    ) -> Result<()> {
        require_f32::<F>("swiglu_backward_bf16")?;
        check_swiglu_backward_bf16(self, [gate_half, up_half], [dh, d_gate, d_up], len)?;
        if len == 0 {
            return Ok(());
        }
        let (gp, upp, dhp, dgp, dup, n) =
            (gate_half.ptr(), up_half.ptr(), dh.ptr(), d_gate.ptr_mut(), d_up.ptr_mut(), len as u64);
        // SAFETY: swiglu_backward_bf16_f32(const bf16* gate_half, const bf16* up_half,
        // const float* dh, float* d_gate, float* d_up, u64 n); all five hold >= n elements.
        unsafe {
            self.launch(&SWIGLU_BACKWARD_BF16, self.grid_1d(len, PER_SM), &mut kargs![gp, upp, dhp, dgp, dup, n], &[n])
        }
    }

    fn swiglu_backward_checked<F: Real>(
        &self,
        gate: &CudaBuf<F>,
        up: &CudaBuf<F>,
        dh: &CudaBuf<F>,
        d_gate: &mut CudaBuf<F>,
        d_up: &mut CudaBuf<F>,
        len: usize,
        what: &str,
    ) -> Result<()> {
        require_f32::<F>("swiglu_backward_checked")?;
        check_swiglu_backward(self, "swiglu_backward_checked", [gate, up, dh, d_gate, d_up], len)?;
        if len == 0 {
            return Ok(());
        }
        let (gp, upp, dhp, dgp, dup) = (gate.ptr(), up.ptr(), dh.ptr(), d_gate.ptr_mut(), d_up.ptr_mut());
        let (n, id, health) = (len as u64, self.check_id(what), self.errors.ptr());
        // SAFETY: swiglu_backward_checked_f32(const float* gate, const float* up,
        // const float* dh, float* d_gate, float* d_up, u64 n, u64 id, u64* health); all five
        // hold >= n elements, the health block HEALTH_WORDS words.
        unsafe {
            self.launch(
                &SWIGLU_BACKWARD_CHECKED,
                self.grid_1d(len, PER_SM),
                &mut kargs![gp, upp, dhp, dgp, dup, n, id, health],
                &[n],
            )
        }
    }

    fn swiglu_backward_bf16_in_place<F: Real>(
        &self,
        gate_half: &mut CudaBuf<bf16>,
        up_half: &mut CudaBuf<bf16>,
        dh: &CudaBuf<F>,
        len: usize,
        what: &str,
    ) -> Result<()> {
        require_f32::<F>("swiglu_backward_bf16_in_place")?;
        check_swiglu_backward_bf16_in_place(self, [gate_half, up_half], dh, len)?;
        if len == 0 {
            return Ok(());
        }
        let (gp, upp, dhp) = (gate_half.ptr_mut(), up_half.ptr_mut(), dh.ptr());
        let (n, id, health) = (len as u64, self.check_id(what), self.errors.ptr());
        // SAFETY: swiglu_backward_bf16_checked(bf16* gate_half, bf16* up_half,
        // const float* dh, u64 n, u64 id, u64* health); all three hold >= n elements (each
        // element of the saves is read and then written by one thread), the health block
        // HEALTH_WORDS words.
        unsafe {
            self.launch(
                &SWIGLU_BACKWARD_BF16_CHECKED,
                self.grid_1d(len, PER_SM),
                &mut kargs![gp, upp, dhp, n, id, health],
                &[n],
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
    unsafe {
        cuda.launch(
            &SCALE_ROWS,
            cuda.grid_1d(total, PER_SM),
            &mut kargs![c, r, n, l, b, s, beta],
            &[total as u64, u64::from(beta != 0.0)],
        )
    }
}

impl Cuda {
    /// Launches one of the four-way casts (`cast_f32_to_bf16_x4`, `cast_bf16_to_f32_x4`),
    /// whose arguments are four `(src, dst, n)` triples, over `len`'s total elements.
    ///
    /// # Safety
    /// `kernel` takes four `(const S* src, D* dst, u64 n)` triples and each `src[i]` and
    /// `dst[i]` holds at least `len[i]` elements of its type.
    unsafe fn launch_cast_x4(
        &self,
        kernel: &'static crate::perf::KernelCost,
        src: [u64; 4],
        dst: [u64; 4],
        len: [usize; 4],
    ) -> Result<()> {
        let total: usize = len.iter().sum();
        if total == 0 {
            return Ok(());
        }
        let ([s0, s1, s2, s3], [d0, d1, d2, d3]) = (src, dst);
        let [n0, n1, n2, n3] = len.map(|n| n as u64);
        let args = &mut kargs![s0, d0, n0, s1, d1, n1, s2, d2, n2, s3, d3, n3];
        // SAFETY: the caller's contract.
        unsafe { self.launch(kernel, self.grid_1d(total, PER_SM), args, &[total as u64]) }
    }

    /// Launches a checked pass over `len` elements (`cast_f32_to_bf16_checked`,
    /// `copy_f32_checked`), flagging a non-finite source as the deferred check named `what`.
    ///
    /// # Safety
    /// `kernel` takes `(const float* src, D* dst, u64 n, u64 id, u64* health)` and `src` and
    /// `dst` hold at least `len` elements of their types.
    unsafe fn launch_checked(
        &self,
        kernel: &'static crate::perf::KernelCost,
        src: u64,
        dst: u64,
        len: usize,
        what: &str,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (n, id, health) = (len as u64, self.check_id(what), self.errors.ptr());
        // SAFETY: the caller's contract; the health block holds HEALTH_WORDS (>= 4) words.
        unsafe { self.launch(kernel, self.grid_1d(len, PER_SM), &mut kargs![src, dst, n, id, health], &[n]) }
    }
}
