//! [`TransformerOps`] for CUDA: the launchers of cuda/transformer.cu (RMSNorm, rotary
//! embedding, causal softmax and masked cross-entropy, forward and backward), each after the
//! op's shared validator. cross_entropy's target check runs on the device: a masked-in row
//! whose target is outside the vocabulary is skipped (zero loss and gradient) and reported
//! at the next synchronization point (see the module docs of `cuda`).

use super::{kargs, kernel, require_f32, Cuda, CudaBuf};
use crate::backend::ops::transformer::*;
use crate::backend::OutBuf;
use crate::error::{Error, Result};
use crate::perf::KernelCost;
use crate::scalar::Real;
use cudarc::driver::LaunchConfig;
use half::bf16;

// Costs (see `kernel!`): inputs read once, outputs written once; the three block-size
// variants of a kernel cost the same.
kernel!(
    /// [rows, cols, bytes per output element (4 for y, 2 for y_half), residual added (0 or
    /// 1), x saved (0 or 1)]: x read, y written, w read, inv_rms written; with a residual it
    /// is read and x written back (one add per element); the saved copy written.
    RMSNORM = "transformer" / ["rmsnorm_g32_f32", "rmsnorm_g256_f32", "rmsnorm_g1024_f32"], Elementwise,
    |a| ((4 + a[2] + 8 * a[3] + 4 * a[4]) * a[0] * a[1] + 4 * a[1] + 4 * a[0], (4 + a[3]) * a[0] * a[1])
);
kernel!(
    /// [rows, cols, accumulate, bytes of the bf16 copy per element (0 or 2), second gradient
    /// part given (0 or 1)]: x and dy (and dy2) read, dx written (and read when
    /// accumulating), the bf16 copy written, w and inv_rms read.
    RMSNORM_BACKWARD = "transformer"
        / ["rmsnorm_backward_g32_f32", "rmsnorm_backward_g256_f32", "rmsnorm_backward_g1024_f32"],
    Elementwise,
    |a| ((12 + 4 * a[2] + a[3] + 4 * a[4]) * a[0] * a[1] + 4 * a[1] + 4 * a[0], (8 + a[2] + a[4]) * a[0] * a[1])
);
kernel!(
    /// [tokens, (heads + heads2) * head_dim, seq_len * head_dim, bytes of the bf16 copies per
    /// element (0 or 2)]: x (and x2) read and written in place, the copies written; the cos and
    /// sin tables (seq_len x head_dim / 2 each, shared by the heads) read; 6 flops per pair.
    ROPE = "transformer" / "rope_f32", Elementwise, |a| ((8 + a[3]) * a[0] * a[1] + 4 * a[2], 3 * a[0] * a[1])
);
kernel!(
    /// [rows, t] (rows = matrices x t): every score read and written in place.
    SOFTMAX_CAUSAL = "transformer"
        / ["softmax_causal_g32_f32", "softmax_causal_g256_f32", "softmax_causal_g1024_f32"],
    Attention,
    |a| (8 * a[0] * a[1], 5 * a[0] * a[1])
);
kernel!(
    /// [rows, t]: p and dp read, ds written.
    SOFTMAX_CAUSAL_BACKWARD = "transformer"
        / ["softmax_causal_backward_g32_f32", "softmax_causal_backward_g256_f32", "softmax_causal_backward_g1024_f32"],
    Attention,
    |a| (12 * a[0] * a[1], 4 * a[0] * a[1])
);
kernel!(
    /// [rows]: the mask read by one block, one float written.
    LOSS_SCALE = "transformer" / "loss_scale_f32", Elementwise, |a| (4 * a[0] + 4, a[0])
);
kernel!(
    /// [rows, vocab]: logits read and overwritten by their gradient; targets, mask read and
    /// losses written per row.
    CROSS_ENTROPY = "transformer" / ["cross_entropy_g32_f32", "cross_entropy_g256_f32", "cross_entropy_g1024_f32"],
    Elementwise,
    |a| (8 * a[0] * a[1] + 12 * a[0], 5 * a[0] * a[1])
);

/// Grid waves of the row kernels: blocks beyond the resident ones, so short and long rows
/// (causal softmax) even out; the kernels stride over the remaining rows.
const WAVES: usize = 4;
/// Blocks of the rope kernel along the rotation pairs of a token (the kernel strides).
const ROPE_MAX_X: u32 = 1024;

/// How many threads share a row (`GROUP` in cuda/transformer.cu, the `_gG_` in kernel names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Group {
    /// One warp per row, 8 rows per block of 256 threads.
    Warp,
    /// One block of 256 threads per row.
    Block256,
    /// One block of 1024 threads per row.
    Block1024,
}

impl Group {
    /// The group for rows of `width` elements (live entries per row for softmax).
    fn for_width(width: usize) -> Group {
        if width <= 1024 {
            Group::Warp
        } else if width <= 16384 {
            Group::Block256
        } else {
            Group::Block1024
        }
    }

    /// Threads per block (`SG_ROW_BLOCK(G)`, the kernels' `__launch_bounds__`).
    fn threads(self) -> u32 {
        match self {
            Group::Warp | Group::Block256 => 256,
            Group::Block1024 => 1024,
        }
    }

    fn rows_per_block(self) -> usize {
        match self {
            Group::Warp => 8,
            Group::Block256 | Group::Block1024 => 1,
        }
    }

    /// The kernel of this group among the `_g32_`, `_g256_` and `_g1024_` variants.
    fn kernel(self, variants: &'static [KernelCost; 3]) -> &'static KernelCost {
        match self {
            Group::Warp => &variants[0],
            Group::Block256 => &variants[1],
            Group::Block1024 => &variants[2],
        }
    }

    /// One group per row, `WAVES` times the blocks the device holds at once, at most one
    /// block per `rows_per_block` rows (grid.x <= sm_count * 32 is far below 2^31).
    fn config(self, cuda: &Cuda, rows: usize) -> LaunchConfig {
        let resident = (2048 / self.threads()) as usize;
        let max_blocks = cuda.sm_count as usize * resident * WAVES;
        let blocks = rows.div_ceil(self.rows_per_block()).clamp(1, max_blocks) as u32;
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (self.threads(), 1, 1), shared_mem_bytes: 0 }
    }
}

/// `cols` as the CPU twin converts it (`F::from_usize`: usize -> f64 -> f32).
fn cols_f32(cols: usize) -> f32 {
    cols as f64 as f32
}

impl TransformerOps for Cuda {
    fn rmsnorm<F: Real>(
        &self,
        x: &CudaBuf<F>,
        w: &CudaBuf<F>,
        y: &mut CudaBuf<F>,
        inv_rms: &mut CudaBuf<F>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        const OP: &str = "rmsnorm";
        require_f32::<F>(OP)?;
        check_rmsnorm(self, [x, w, y, inv_rms], rows, cols)?;
        self.rmsnorm_launch((x.ptr(), 0, 0), w, (y.ptr_mut(), 0), inv_rms, rows, cols, eps)
    }

    fn rmsnorm_to_bf16<F: Real>(
        &self,
        x: &CudaBuf<F>,
        w: &CudaBuf<F>,
        y_half: &mut CudaBuf<bf16>,
        inv_rms: &mut CudaBuf<F>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        require_f32::<F>("rmsnorm_to_bf16")?;
        check_rmsnorm_to_bf16(self, [x, w, inv_rms], y_half, rows, cols)?;
        self.rmsnorm_launch((x.ptr(), 0, 0), w, (0, y_half.ptr_mut()), inv_rms, rows, cols, eps)
    }

    fn add_rmsnorm<F: Real>(
        &self,
        x: &mut CudaBuf<F>,
        branch: Option<&CudaBuf<F>>,
        x_save: Option<&mut CudaBuf<F>>,
        w: &CudaBuf<F>,
        out: OutBuf<'_, Self, F>,
        inv_rms: &mut CudaBuf<F>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        require_f32::<F>("add_rmsnorm")?;
        check_add_rmsnorm(self, x, [branch, x_save.as_deref()], w, &out, inv_rms, rows, cols)?;
        let ys = match out {
            OutBuf::Full(y) => (y.ptr_mut(), 0),
            OutBuf::Half(h) => (0, h.ptr_mut()),
        };
        let xs = (x.ptr_mut(), branch.map_or(0, |b| b.ptr()), x_save.map_or(0, |s| s.ptr_mut()));
        self.rmsnorm_launch(xs, w, ys, inv_rms, rows, cols, eps)
    }

    fn rmsnorm_backward<F: Real>(
        &self,
        x: &CudaBuf<F>,
        w: &CudaBuf<F>,
        inv_rms: &CudaBuf<F>,
        dy: &CudaBuf<F>,
        dx: &mut CudaBuf<F>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.rmsnorm_backward_into([x, w, inv_rms, dy], None, dx, None, rows, cols, false)
    }

    fn rmsnorm_backward_add<F: Real>(
        &self,
        x: &CudaBuf<F>,
        w: &CudaBuf<F>,
        inv_rms: &CudaBuf<F>,
        dy: &CudaBuf<F>,
        dy2: Option<&CudaBuf<F>>,
        dx: &mut CudaBuf<F>,
        dx_half: Option<&mut CudaBuf<bf16>>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.rmsnorm_backward_into([x, w, inv_rms, dy], dy2, dx, dx_half, rows, cols, true)
    }

    fn rope<F: Real>(
        &self,
        x: &mut CudaBuf<F>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        seq_len: usize,
        cos: &CudaBuf<F>,
        sin: &CudaBuf<F>,
        inverse: bool,
    ) -> Result<()> {
        let width = check_rope(self, x, tokens, heads, head_dim, seq_len, cos, sin)?;
        let tables = RopeTables { tokens, head_dim, seq_len, cos, sin, inverse };
        self.rope_launch((x, heads, width), None, None, &tables)
    }

    fn rope_qk<F: Real>(
        &self,
        q: &mut CudaBuf<F>,
        q_heads: usize,
        k: &mut CudaBuf<F>,
        k_heads: usize,
        tokens: usize,
        head_dim: usize,
        seq_len: usize,
        cos: &CudaBuf<F>,
        sin: &CudaBuf<F>,
        inverse: bool,
        halves: Option<RopeHalves<'_, Self>>,
    ) -> Result<()> {
        let q_width = check_rope(self, q, tokens, q_heads, head_dim, seq_len, cos, sin)?;
        let k_width = check_rope(self, k, tokens, k_heads, head_dim, seq_len, cos, sin)?;
        if let Some((qh, kh)) = &halves {
            check_rope_halves(self, (qh, tokens * q_width), (kh, tokens * k_width))?;
        }
        let tables = RopeTables { tokens, head_dim, seq_len, cos, sin, inverse };
        self.rope_launch((q, q_heads, q_width), Some((k, k_heads, k_width)), halves, &tables)
    }

    fn softmax_causal<F: Real>(&self, s: &mut CudaBuf<F>, mats: usize, t: usize, scale: f32) -> Result<()> {
        const OP: &str = "softmax_causal";
        require_f32::<F>(OP)?;
        let rows = check_softmax_causal(self, s, mats, t)?;
        if rows == 0 {
            return Ok(());
        }
        let g = Group::for_width(t);
        let kernel = g.kernel(&SOFTMAX_CAUSAL);
        let (sp, r, tt) = (s.ptr_mut(), rows as u64, t as u64);
        // SAFETY: softmax_causal_gG_f32(float* s, u64 rows, u64 t, float scale): s holds
        // rows * t = mats * t * t elements (checked above); block and group sizes from `g`.
        unsafe { self.launch(kernel, g.config(self, rows), &mut kargs![sp, r, tt, scale], &[r, tt]) }
    }

    fn softmax_causal_backward<F: Real>(
        &self,
        p: &CudaBuf<F>,
        dp: &CudaBuf<F>,
        ds: &mut CudaBuf<F>,
        mats: usize,
        t: usize,
        scale: f32,
    ) -> Result<()> {
        const OP: &str = "softmax_causal_backward";
        require_f32::<F>(OP)?;
        let rows = check_softmax_causal_backward(self, [p, dp, ds], mats, t)?;
        if rows == 0 {
            return Ok(());
        }
        let g = Group::for_width(t);
        let kernel = g.kernel(&SOFTMAX_CAUSAL_BACKWARD);
        let (pp, dpp, dsp, r, tt) = (p.ptr(), dp.ptr(), ds.ptr_mut(), rows as u64, t as u64);
        // SAFETY: softmax_causal_backward_gG_f32(const float* p, const float* dp, float* ds,
        // u64 rows, u64 t, float scale): all three hold rows * t elements (checked above); ds is
        // distinct from the inputs (&mut); block and group sizes from `g`.
        unsafe { self.launch(kernel, g.config(self, rows), &mut kargs![pp, dpp, dsp, r, tt, scale], &[r, tt]) }
    }

    fn cross_entropy<F: Real>(
        &self,
        logits: &mut CudaBuf<F>,
        targets: &CudaBuf<u32>,
        mask: &CudaBuf<F>,
        rows: usize,
        vocab: usize,
        grad_scale: impl Into<LossScale<F>>,
        losses: &mut CudaBuf<F>,
    ) -> Result<()> {
        const OP: &str = "cross_entropy";
        require_f32::<F>(OP)?;
        check_cross_entropy(self, logits, targets, mask, rows, vocab, losses)?;
        if rows == 0 {
            return Ok(());
        }
        let g = Group::for_width(vocab);
        let kernel = g.kernel(&CROSS_ENTROPY);
        let (lp, tp, mp, op, err) = (logits.ptr_mut(), targets.ptr(), mask.ptr(), losses.ptr_mut(), self.errors.ptr());
        let (r, v) = (rows as u64, vocab as u64);
        let scratch = self.lock_scratch();
        let (gs, scale_ptr) = match grad_scale.into() {
            LossScale::Fixed(s) => (s.to_f64() as f32, 0u64),
            LossScale::MeanOverMask => {
                // Status word 15 holds the scale until the kernel below has read it (the one
                // stream orders them); nothing else uses that word.
                let at = scratch.status.ptr() + 15 * 8;
                let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
                // SAFETY: loss_scale_f32(const float* mask, u64 rows, float* out): mask holds
                // rows elements (checked above), `out` one float of the status block.
                unsafe { self.launch(&LOSS_SCALE, cfg, &mut kargs![mp, r, at], &[r]) }?;
                (0.0, at)
            }
        };
        // SAFETY: cross_entropy_gG_f32(float* logits, const u32* targets, const float* mask,
        // u64 rows, u64 vocab, float grad_scale, const float* scale_ptr, float* losses, u32* err):
        // logits holds rows * vocab, targets, mask and losses rows elements (checked above);
        // `scale_ptr` is null or the float written above; targets >= vocab are never
        // dereferenced (the row is skipped and sets a bit of the health block's error word);
        // block and group sizes from `g`.
        unsafe {
            self.launch(kernel, g.config(self, rows), &mut kargs![lp, tp, mp, r, v, gs, scale_ptr, op, err], &[r, v])
        }
    }
}

impl Cuda {
    /// Launches `rmsnorm_gG_f32` after the caller's checks: `(x, residual, x_save)` and `y`
    /// `(f32 output, bf16 output)` as device addresses, 0 for none; exactly one output given
    /// (the kernel writes the bf16 one in place of the f32 one when given), and `x` is
    /// written only with a residual.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_launch<F: Real>(
        &self,
        (x, residual, x_save): (u64, u64, u64),
        w: &CudaBuf<F>,
        (y, y_half): (u64, u64),
        inv_rms: &mut CudaBuf<F>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let g = Group::for_width(cols);
        let kernel = g.kernel(&RMSNORM);
        let (wp, ip) = (w.ptr(), inv_rms.ptr_mut());
        let (r, c, nc) = (rows as u64, cols as u64, cols_f32(cols));
        let bytes_out = if y_half != 0 { 2 } else { 4 };
        // SAFETY: rmsnorm_gG_f32(float* x, const float* residual, float* x_save, const float*
        // w, float* y, bf16* y_half, float* inv_rms, u64 rows, u64 cols, float n_cols, float
        // eps): x, the given output and residual and x_save (or null) hold rows * cols, w cols
        // and inv_rms rows elements (checked by the callers); the outputs are distinct from
        // the inputs (&mut); a null output is not touched; block and group sizes from `g`.
        unsafe {
            self.launch(
                kernel,
                g.config(self, rows),
                &mut kargs![x, residual, x_save, wp, y, y_half, ip, r, c, nc, eps],
                &[r, c, bytes_out, u64::from(residual != 0), u64::from(x_save != 0)],
            )
        }
    }

    /// The rmsnorm input gradient, written into `dx` or (`accumulate`) added to it, from
    /// `dy` (plus `dy2` when given), and, given `dx_half`, the result's bf16 rounding there.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward_into<F: Real>(
        &self,
        [x, w, inv_rms, dy]: [&CudaBuf<F>; 4],
        dy2: Option<&CudaBuf<F>>,
        dx: &mut CudaBuf<F>,
        dx_half: Option<&mut CudaBuf<bf16>>,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) -> Result<()> {
        const OP: &str = "rmsnorm_backward";
        require_f32::<F>(OP)?;
        let n = check_rmsnorm_backward(self, [x, w, inv_rms, dy, dx], rows, cols)?;
        check_backward_add_extras(self, dy2, dx_half.as_deref(), n)?;
        if rows == 0 {
            return Ok(());
        }
        let g = Group::for_width(cols);
        let kernel = g.kernel(&RMSNORM_BACKWARD);
        let dy2p = dy2.map_or(0, |d| d.ptr());
        let (xp, wp, ip, dyp, dxp) = (x.ptr(), w.ptr(), inv_rms.ptr(), dy.ptr(), dx.ptr_mut());
        let (hp, half_bytes) = dx_half.map_or((0, 0), |h| (h.ptr_mut(), 2));
        let (r, c, nc, acc) = (rows as u64, cols as u64, cols_f32(cols), u32::from(accumulate));
        // SAFETY: rmsnorm_backward_gG_f32(const float* x, const float* w, const float* inv_rms,
        // const float* dy, const float* dy2, float* dx, bf16* dx_half, u64 rows, u64 cols,
        // float n_cols, u32 accumulate): x, dy, dy2 (or null), dx and dx_half (or null) hold
        // rows * cols, w cols and inv_rms rows elements (checked above); dx and dx_half are
        // distinct from the inputs (&mut); block and group sizes come from `g`.
        unsafe {
            self.launch(
                kernel,
                g.config(self, rows),
                &mut kargs![xp, wp, ip, dyp, dy2p, dxp, hp, r, c, nc, acc],
                &[r, c, acc.into(), half_bytes, u64::from(dy2p != 0)],
            )
        }
    }
}

/// What the tensors of one rope launch share.
struct RopeTables<'a, F: Real> {
    tokens: usize,
    head_dim: usize,
    seq_len: usize,
    cos: &'a CudaBuf<F>,
    sin: &'a CudaBuf<F>,
    inverse: bool,
}

impl Cuda {
    /// One rope_f32 launch over `x` and, if given, a second tensor `x2` of the same tokens
    /// (each `(buffer, heads, width)`, checked by `check_rope`).
    fn rope_launch<F: Real>(
        &self,
        (x, heads, width): (&mut CudaBuf<F>, usize, usize),
        x2: Option<(&mut CudaBuf<F>, usize, usize)>,
        halves: Option<RopeHalves<'_, Self>>,
        r: &RopeTables<'_, F>,
    ) -> Result<()> {
        const OP: &str = "rope";
        require_f32::<F>(OP)?;
        let (x2_ptr, heads2, width2) = match x2 {
            Some((b, h, w)) => (b.ptr_mut(), h, w),
            None => (0, 0, 0),
        };
        let half = r.head_dim / 2;
        if width + width2 == 0 || r.tokens == 0 {
            return Ok(());
        }
        // The kernel indexes pairs of a token with u32 (and heads * head_dim fits u32 with it).
        let pairs = (heads + heads2) * half;
        if pairs > i32::MAX as usize {
            return Err(Error::invalid(OP, format!("heads * head_dim / 2 = {pairs} exceeds 2^31 - 1")));
        }
        let cfg = self.grid_2d(r.tokens, pairs, 256, ROPE_MAX_X);
        let (xp, cp, sp) = (x.ptr_mut(), r.cos.ptr(), r.sin.ptr());
        let (h, h2) = (heads as u32, heads2 as u32);
        let (xh, x2h) = halves.map_or((0, 0), |(a, b)| (a.ptr_mut(), b.ptr_mut()));
        let (t, d, s, inv) = (r.tokens as u64, r.head_dim as u32, r.seq_len as u64, u32::from(r.inverse));
        // SAFETY: rope_f32(float* x, u32 heads, float* x2, u32 heads2, u64 tokens, u32 head_dim,
        // u64 seq_len, const float* cos, const float* sin, u32 inverse, bf16* x_half,
        // bf16* x2_half): x (and x_half) hold tokens * heads * head_dim and x2 (and x2_half;
        // null when heads2 = 0 or no copies) tokens * heads2 * head_dim elements, cos and sin
        // seq_len * head_dim / 2 (checked by check_rope and check_rope_halves); the buffers are
        // distinct (&mut); (heads + heads2) * head_dim / 2 < 2^31, so the u32 arguments are
        // exact; grid.y <= 65535.
        let half_bytes = if xh == 0 { 0 } else { 2 };
        unsafe {
            self.launch(
                &ROPE,
                cfg,
                &mut kargs![xp, h, x2_ptr, h2, t, d, s, cp, sp, inv, xh, x2h],
                &[t, 2 * pairs as u64, s * d as u64, half_bytes],
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Group;

    #[test]
    fn groups_cover_every_width_and_match_the_kernels_block_sizes() {
        assert_eq!(Group::for_width(1), Group::Warp);
        assert_eq!(Group::for_width(1024), Group::Warp);
        assert_eq!(Group::for_width(1025), Group::Block256);
        assert_eq!(Group::for_width(16384), Group::Block256);
        assert_eq!(Group::for_width(16385), Group::Block1024);
        assert_eq!(Group::for_width(49152), Group::Block1024);
        for g in [Group::Warp, Group::Block256, Group::Block1024] {
            let group = match g {
                Group::Warp => 32,
                Group::Block256 => 256,
                Group::Block1024 => 1024,
            };
            // SG_ROW_BLOCK(G) = max(G, 256) threads, rows_per_block = threads / G.
            assert_eq!(g.threads(), (group as u32).max(256));
            assert_eq!(g.rows_per_block(), g.threads() as usize / group);
        }
    }
}
