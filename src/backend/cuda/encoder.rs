//! [`EncoderOps`] for CUDA: the launchers of cuda/encoder.cu (LayerNorm forward, input
//! gradient and affine parameter gradients, the padding-masked bidirectional softmax and its
//! backward, row pooling (mean or [CLS]) and its backward), each after the op's shared
//! validator. Lengths are read on the device and clamped to `t` there, as on the CPU, so
//! no length is out of range.

use super::{kargs, kernel, require_f32, Cuda, CudaBuf};
use crate::backend::ops::encoder::*;
use crate::backend::PoolKind;
use crate::error::Result;
use crate::scalar::Real;
use cudarc::driver::LaunchConfig;

// Costs (see `kernel!`): inputs read once, outputs written once.
kernel!(
    /// [rows, cols]: x read, y written, w and b read, mean and rstd written.
    LAYERNORM = "encoder" / "layernorm_f32", Elementwise, |a| (8 * a[0] * a[1] + 8 * a[1] + 8 * a[0], 8 * a[0] * a[1])
);
kernel!(
    /// [rows, cols]: x and dy read, dx written, w read, mean and rstd read.
    LAYERNORM_BACKWARD = "encoder" / "layernorm_backward_f32", Elementwise,
    |a| (12 * a[0] * a[1] + 4 * a[1] + 8 * a[0], 10 * a[0] * a[1])
);
kernel!(
    /// [rows, cols]: x and dy read, mean and rstd read, dw and db read and written.
    LAYERNORM_PARAM_GRADS = "encoder" / "layernorm_param_grads_f32", Elementwise,
    |a| (8 * a[0] * a[1] + 8 * a[0] + 16 * a[1], 5 * a[0] * a[1])
);
kernel!(
    /// [rows, t]: the score rows read and written in place.
    SOFTMAX_MASKED = "encoder" / "softmax_masked_f32", Attention, |a| (8 * a[0] * a[1], 5 * a[0] * a[1])
);
kernel!(
    /// [rows, t]: p and dp read, ds written.
    SOFTMAX_MASKED_BACKWARD = "encoder" / "softmax_masked_backward_f32", Attention,
    |a| (12 * a[0] * a[1], 4 * a[0] * a[1])
);
kernel!(
    /// [batch, t, cols, mean (1) or cls (0)]: the pooled rows read (all t at most), out written.
    POOL = "encoder" / "pool_f32", Elementwise,
    |a| { let rows = if a[3] == 1 { a[1] } else { 1 }; (4 * a[0] * (rows + 1) * a[2], a[0] * rows * a[2]) }
);
kernel!(
    /// [batch, t, cols]: dout read, dx written.
    POOL_BACKWARD = "encoder" / "pool_backward_f32", Elementwise, |a| (4 * a[0] * (a[1] + 1) * a[2], a[0] * a[1] * a[2])
);

/// Rows per block of the warp-per-row kernels (`SG_ENC_ROWS` in cuda/encoder.cu).
const ROWS_PER_BLOCK: usize = 8;
/// Grid waves of the row kernels: blocks beyond the resident ones (the kernels stride).
const WAVES: usize = 4;

/// One warp per row, 8 rows per 256-thread block, at most `WAVES` times the resident blocks.
fn row_config(cuda: &Cuda, rows: usize) -> LaunchConfig {
    let max_blocks = cuda.sm_count as usize * 8 * WAVES;
    let blocks = rows.div_ceil(ROWS_PER_BLOCK).clamp(1, max_blocks) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// `cols` as the CPU twin converts it (usize -> f64 -> f32).
fn cols_f32(cols: usize) -> f32 {
    cols as f64 as f32
}

impl EncoderOps for Cuda {
    fn layernorm<F: Real>(
        &self,
        x: &CudaBuf<F>,
        w: &CudaBuf<F>,
        b: &CudaBuf<F>,
        y: &mut CudaBuf<F>,
        mean: &mut CudaBuf<F>,
        rstd: &mut CudaBuf<F>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        const OP: &str = "layernorm";
        require_f32::<F>(OP)?;
        check_layernorm(self, [x, w, b, y, mean, rstd], rows, cols)?;
        if rows == 0 {
            return Ok(());
        }
        let (xp, wp, bp, yp, mp, rp) = (x.ptr(), w.ptr(), b.ptr(), y.ptr_mut(), mean.ptr_mut(), rstd.ptr_mut());
        let (r, c, nc) = (rows as u64, cols as u64, cols_f32(cols));
        // SAFETY: layernorm_f32(const float* x, const float* w, const float* b, float* y,
        // float* mean, float* rstd, u64 rows, u64 cols, float n_cols, float eps): x and y hold
        // rows * cols, w and b cols, mean and rstd rows elements (checked above); 256 threads per
        // block as the kernel's launch bounds.
        unsafe {
            self.launch(&LAYERNORM, row_config(self, rows), &mut kargs![xp, wp, bp, yp, mp, rp, r, c, nc, eps], &[r, c])
        }
    }

    fn layernorm_backward<F: Real>(
        &self,
        x: &CudaBuf<F>,
        w: &CudaBuf<F>,
        mean: &CudaBuf<F>,
        rstd: &CudaBuf<F>,
        dy: &CudaBuf<F>,
        dx: &mut CudaBuf<F>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        const OP: &str = "layernorm_backward";
        require_f32::<F>(OP)?;
        check_layernorm_backward(self, [x, w, mean, rstd, dy, dx], rows, cols)?;
        if rows == 0 {
            return Ok(());
        }
        let (xp, wp, mp, rp, dyp, dxp) = (x.ptr(), w.ptr(), mean.ptr(), rstd.ptr(), dy.ptr(), dx.ptr_mut());
        let (r, c, nc) = (rows as u64, cols as u64, cols_f32(cols));
        // SAFETY: layernorm_backward_f32(const float* x, const float* w, const float* mean,
        // const float* rstd, const float* dy, float* dx, u64 rows, u64 cols, float n_cols): x, dy
        // and dx hold rows * cols, w cols, mean and rstd rows elements (checked above); dx is
        // distinct from the inputs (&mut); 256 threads per block.
        unsafe {
            self.launch(
                &LAYERNORM_BACKWARD,
                row_config(self, rows),
                &mut kargs![xp, wp, mp, rp, dyp, dxp, r, c, nc],
                &[r, c],
            )
        }
    }

    fn layernorm_param_grads<F: Real>(
        &self,
        x: &CudaBuf<F>,
        mean: &CudaBuf<F>,
        rstd: &CudaBuf<F>,
        dy: &CudaBuf<F>,
        dw: &mut CudaBuf<F>,
        db: &mut CudaBuf<F>,
        rows: usize,
        cols: usize,
        beta: F,
    ) -> Result<()> {
        const OP: &str = "layernorm_param_grads";
        require_f32::<F>(OP)?;
        check_layernorm_param_grads(self, [x, mean, rstd, dy, dw, db], rows, cols)?;
        if cols == 0 {
            return Ok(());
        }
        let (xp, mp, rp, dyp, dwp, dbp) = (x.ptr(), mean.ptr(), rstd.ptr(), dy.ptr(), dw.ptr_mut(), db.ptr_mut());
        let (r, c, bt) = (rows as u64, cols as u64, beta.to_f64() as f32);
        // SAFETY: layernorm_param_grads_f32(const float* x, const float* mean, const float* rstd,
        // const float* dy, float* dw, float* db, u64 rows, u64 cols, float beta): x and dy hold
        // rows * cols, mean and rstd rows, dw and db cols elements (checked above); dw and db are
        // distinct (&mut); a grid-stride loop over cols.
        unsafe {
            self.launch(
                &LAYERNORM_PARAM_GRADS,
                self.grid_1d(cols, 8),
                &mut kargs![xp, mp, rp, dyp, dwp, dbp, r, c, bt],
                &[r, c],
            )
        }
    }

    fn softmax_masked<F: Real>(
        &self,
        s: &mut CudaBuf<F>,
        lengths: &CudaBuf<u32>,
        mats: usize,
        heads: usize,
        t: usize,
        scale: f32,
    ) -> Result<()> {
        const OP: &str = "softmax_masked";
        require_f32::<F>(OP)?;
        let rows = check_softmax_masked(self, s, lengths, mats, heads, t)?;
        if rows == 0 {
            return Ok(());
        }
        let (sp, lp, r, tt, h) = (s.ptr_mut(), lengths.ptr(), rows as u64, t as u64, heads as u64);
        // SAFETY: softmax_masked_f32(float* s, const u32* lengths, u64 rows, u64 t, u64 heads,
        // float scale): s holds rows * t elements and lengths rows / t / heads = mats / heads
        // (checked above); lengths are clamped to t by the kernel; 256 threads per block.
        unsafe { self.launch(&SOFTMAX_MASKED, row_config(self, rows), &mut kargs![sp, lp, r, tt, h, scale], &[r, tt]) }
    }

    fn softmax_masked_backward<F: Real>(
        &self,
        p: &CudaBuf<F>,
        dp: &CudaBuf<F>,
        ds: &mut CudaBuf<F>,
        lengths: &CudaBuf<u32>,
        mats: usize,
        heads: usize,
        t: usize,
        scale: f32,
    ) -> Result<()> {
        const OP: &str = "softmax_masked_backward";
        require_f32::<F>(OP)?;
        let rows = check_softmax_masked_backward(self, [p, dp, ds], lengths, mats, heads, t)?;
        if rows == 0 {
            return Ok(());
        }
        let (pp, dpp, dsp, lp) = (p.ptr(), dp.ptr(), ds.ptr_mut(), lengths.ptr());
        let (r, tt, h) = (rows as u64, t as u64, heads as u64);
        // SAFETY: softmax_masked_backward_f32(const float* p, const float* dp, float* ds,
        // const u32* lengths, u64 rows, u64 t, u64 heads, float scale): p, dp and ds hold
        // rows * t elements, lengths mats / heads (checked above); ds is distinct (&mut).
        unsafe {
            self.launch(
                &SOFTMAX_MASKED_BACKWARD,
                row_config(self, rows),
                &mut kargs![pp, dpp, dsp, lp, r, tt, h, scale],
                &[r, tt],
            )
        }
    }

    fn pool_rows<F: Real>(
        &self,
        x: &CudaBuf<F>,
        lengths: &CudaBuf<u32>,
        out: &mut CudaBuf<F>,
        batch: usize,
        t: usize,
        cols: usize,
        kind: PoolKind,
    ) -> Result<()> {
        const OP: &str = "pool_rows";
        require_f32::<F>(OP)?;
        let (pooled, _) = check_pool_rows(self, x, lengths, out, batch, t, cols)?;
        if pooled == 0 {
            return Ok(());
        }
        let (xp, lp, op, k) = (x.ptr(), lengths.ptr(), out.ptr_mut(), kind_code(kind));
        let (b, tt, c) = (batch as u64, t as u64, cols as u64);
        // SAFETY: pool_f32(const float* x, const u32* lengths, float* out, u64 batch, u64 t,
        // u64 cols, u32 kind): x holds batch * t * cols, out batch * cols, lengths batch elements
        // (checked above); rows read are below min(lengths[b], t) <= t; grid-stride over out.
        unsafe {
            self.launch(
                &POOL,
                self.grid_1d(pooled, 8),
                &mut kargs![xp, lp, op, b, tt, c, k],
                &[b, tt, c, u64::from(k == 0)],
            )
        }
    }

    fn pool_rows_backward<F: Real>(
        &self,
        dout: &CudaBuf<F>,
        lengths: &CudaBuf<u32>,
        dx: &mut CudaBuf<F>,
        batch: usize,
        t: usize,
        cols: usize,
        kind: PoolKind,
    ) -> Result<()> {
        const OP: &str = "pool_rows_backward";
        require_f32::<F>(OP)?;
        let (_, full) = check_pool_rows_backward(self, dout, lengths, dx, batch, t, cols)?;
        if full == 0 {
            return Ok(());
        }
        let (dp, lp, xp, k) = (dout.ptr(), lengths.ptr(), dx.ptr_mut(), kind_code(kind));
        let (b, tt, c) = (batch as u64, t as u64, cols as u64);
        // SAFETY: pool_backward_f32(const float* dout, const u32* lengths, float* dx, u64 batch,
        // u64 t, u64 cols, u32 kind): dout holds batch * cols, dx batch * t * cols, lengths batch
        // elements (checked above); grid-stride over dx.
        unsafe { self.launch(&POOL_BACKWARD, self.grid_1d(full, 8), &mut kargs![dp, lp, xp, b, tt, c, k], &[b, tt, c]) }
    }
}

fn kind_code(kind: PoolKind) -> u32 {
    match kind {
        PoolKind::Mean => 0,
        PoolKind::Cls => 1,
    }
}
