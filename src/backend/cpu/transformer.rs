//! CPU transformer ops: RMSNorm, rotary embedding, causal softmax and masked
//! cross-entropy, forward and backward (the specification of the CUDA kernels).

use super::softmax::{softmax_backward_row, softmax_row};
use super::{Cpu, CpuBuf};
use crate::backend::ops::transformer::*;
use crate::backend::DenseOps;
use crate::backend::OutBuf;
use crate::error::{Error, Result};
use crate::scalar::Real;
use half::bf16;
use rayon::prelude::*;

impl TransformerOps for Cpu {
    fn rmsnorm<F: Real>(
        &self,
        x: &CpuBuf<F>,
        w: &CpuBuf<F>,
        y: &mut CpuBuf<F>,
        inv_rms: &mut CpuBuf<F>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        check_rmsnorm(self, [x, w, y, inv_rms], rows, cols)?;
        rmsnorm_rows(x, w, &mut y[..rows * cols], inv_rms, cols, eps, |v| v);
        Ok(())
    }

    fn rmsnorm_to_bf16<F: Real>(
        &self,
        x: &CpuBuf<F>,
        w: &CpuBuf<F>,
        y_half: &mut CpuBuf<bf16>,
        inv_rms: &mut CpuBuf<F>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        check_rmsnorm_to_bf16(self, [x, w, inv_rms], y_half, rows, cols)?;
        rmsnorm_rows(x, w, &mut y_half[..rows * cols], inv_rms, cols, eps, |v| v.to_bf16());
        Ok(())
    }

    fn add_rmsnorm<F: Real>(
        &self,
        x: &mut CpuBuf<F>,
        branch: Option<&CpuBuf<F>>,
        x_save: Option<&mut CpuBuf<F>>,
        w: &CpuBuf<F>,
        out: OutBuf<'_, Self, F>,
        inv_rms: &mut CpuBuf<F>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        let n = check_add_rmsnorm(self, x, [branch, x_save.as_deref()], w, &out, inv_rms, rows, cols)?;
        if let Some(b) = branch {
            // The sum `axpy` with alpha 1 computes (1 * b is exact).
            x[..n].par_iter_mut().zip(&b[..n]).for_each(|(x, &b)| *x += b);
        }
        if let Some(s) = x_save {
            s[..n].copy_from_slice(&x[..n]);
        }
        match out {
            OutBuf::Full(y) => rmsnorm_rows(x, w, &mut y[..n], inv_rms, cols, eps, |v| v),
            OutBuf::Half(h) => rmsnorm_rows(x, w, &mut h[..n], inv_rms, cols, eps, |v| v.to_bf16()),
        }
        Ok(())
    }

    fn rmsnorm_backward<F: Real>(
        &self,
        x: &CpuBuf<F>,
        w: &CpuBuf<F>,
        inv_rms: &CpuBuf<F>,
        dy: &CpuBuf<F>,
        dx: &mut CpuBuf<F>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        check_rmsnorm_backward(self, [x, w, inv_rms, dy, dx], rows, cols)?;
        rmsnorm_backward_into([x, w, inv_rms, dy], None, dx, rows, cols, false);
        Ok(())
    }

    fn rmsnorm_backward_add<F: Real>(
        &self,
        x: &CpuBuf<F>,
        w: &CpuBuf<F>,
        inv_rms: &CpuBuf<F>,
        dy: &CpuBuf<F>,
        dy2: Option<&CpuBuf<F>>,
        dx: &mut CpuBuf<F>,
        dx_half: Option<&mut CpuBuf<bf16>>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let n = check_rmsnorm_backward(self, [x, w, inv_rms, dy, dx], rows, cols)?;
        check_backward_add_extras(self, dy2, dx_half.as_deref(), n)?;
        rmsnorm_backward_into([x, w, inv_rms, dy], dy2, dx, rows, cols, true);
        match dx_half {
            Some(h) => self.cast_to_bf16(dx, h, n),
            None => Ok(()),
        }
    }

    fn rope<F: Real>(
        &self,
        x: &mut CpuBuf<F>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        seq_len: usize,
        cos: &CpuBuf<F>,
        sin: &CpuBuf<F>,
        inverse: bool,
    ) -> Result<()> {
        let width = check_rope(self, x, tokens, heads, head_dim, seq_len, cos, sin)?;
        rope_rows(&mut x[..tokens * width], width, head_dim, seq_len, (cos, sin), inverse);
        Ok(())
    }

    fn rope_qk<F: Real>(
        &self,
        q: &mut CpuBuf<F>,
        q_heads: usize,
        k: &mut CpuBuf<F>,
        k_heads: usize,
        tokens: usize,
        head_dim: usize,
        seq_len: usize,
        cos: &CpuBuf<F>,
        sin: &CpuBuf<F>,
        inverse: bool,
        halves: Option<RopeHalves<'_, Self>>,
    ) -> Result<()> {
        // Everything checked before anything changes.
        let q_width = check_rope(self, q, tokens, q_heads, head_dim, seq_len, cos, sin)?;
        let k_width = check_rope(self, k, tokens, k_heads, head_dim, seq_len, cos, sin)?;
        let (q_len, k_len) = (tokens * q_width, tokens * k_width);
        if let Some((qh, kh)) = &halves {
            check_rope_halves(self, (qh, q_len), (kh, k_len))?;
        }
        rope_rows(&mut q[..q_len], q_width, head_dim, seq_len, (cos, sin), inverse);
        rope_rows(&mut k[..k_len], k_width, head_dim, seq_len, (cos, sin), inverse);
        if let Some((qh, kh)) = halves {
            self.cast_to_bf16(q, qh, q_len)?;
            self.cast_to_bf16(k, kh, k_len)?;
        }
        Ok(())
    }

    fn softmax_causal<F: Real>(&self, s: &mut CpuBuf<F>, mats: usize, t: usize, scale: f32) -> Result<()> {
        check_softmax_causal(self, s, mats, t)?;
        if t == 0 {
            return Ok(());
        }
        let scale = F::from_f64(scale as f64);
        s[..mats * t * t].par_chunks_mut(t).enumerate().for_each(|(row, p)| {
            softmax_row(p, row % t + 1, scale);
        });
        Ok(())
    }

    fn softmax_causal_backward<F: Real>(
        &self,
        p: &CpuBuf<F>,
        dp: &CpuBuf<F>,
        ds: &mut CpuBuf<F>,
        mats: usize,
        t: usize,
        scale: f32,
    ) -> Result<()> {
        check_softmax_causal_backward(self, [p, dp, ds], mats, t)?;
        if t == 0 {
            return Ok(());
        }
        let scale = F::from_f64(scale as f64);
        ds[..mats * t * t].par_chunks_mut(t).enumerate().for_each(|(row, ds)| {
            softmax_backward_row(&p[row * t..row * t + t], &dp[row * t..row * t + t], ds, row % t + 1, scale);
        });
        Ok(())
    }

    fn cross_entropy<F: Real>(
        &self,
        logits: &mut CpuBuf<F>,
        targets: &CpuBuf<u32>,
        mask: &CpuBuf<F>,
        rows: usize,
        vocab: usize,
        grad_scale: impl Into<LossScale<F>>,
        losses: &mut CpuBuf<F>,
    ) -> Result<()> {
        check_cross_entropy(self, logits, targets, mask, rows, vocab, losses)?;
        let grad_scale = grad_scale.into().resolve(mask[..rows].iter().filter(|&&m| m != F::ZERO).count());
        // The targets are data: the host reads them here (the CUDA kernel checks on the device).
        if let Some(r) = (0..rows).find(|&r| mask[r] != F::ZERO && targets[r] as usize >= vocab) {
            return Err(Error::invalid(
                "cross_entropy",
                format!("target {} of row {r} is outside the vocabulary of {vocab}", targets[r]),
            ));
        }
        logits[..rows * vocab].par_chunks_mut(vocab).zip(losses[..rows].par_iter_mut()).enumerate().for_each(
            |(r, (l, loss))| {
                let m = mask[r];
                if m == F::ZERO {
                    l.fill(F::ZERO);
                    *loss = F::ZERO;
                    return;
                }
                let max = l.iter().fold(F::from_f64(f64::NEG_INFINITY), |a, &b| a.max(b));
                let sum = F::from_f64(l.iter().map(|&v| (v - max).exp().to_f64()).sum::<f64>());
                let lse = max + sum.ln();
                let target = targets[r] as usize;
                *loss = m * (lse - l[target]);
                let g = grad_scale * m;
                l.iter_mut().for_each(|v| *v = g * (*v - lse).exp());
                l[target] -= g;
            },
        );
        Ok(())
    }
}

/// The rmsnorm input gradient from `dy` (plus `dy2` when given), written into `dx` or
/// (`accumulate`) added to it, after the caller's checks.
fn rmsnorm_backward_into<F: Real>(
    [x, w, inv_rms, dy]: [&CpuBuf<F>; 4],
    dy2: Option<&CpuBuf<F>>,
    dx: &mut CpuBuf<F>,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    dx[..rows * cols].par_chunks_mut(cols).enumerate().for_each(|(r, dx)| {
        let row = r * cols..(r + 1) * cols;
        let (xr, dyr, w, inv) = (&x[row.clone()], &dy[row.clone()], &w[..cols], inv_rms[r]);
        let dy2r = dy2.map(|d| &d[row]);
        // The output gradient: dy, or the sum of its two parts (the add `axpy` makes).
        let g = |j: usize| dy2r.map_or(dyr[j], |d2| dyr[j] + d2[j]);
        let dot = F::from_f64((0..cols).map(|j| (w[j] * g(j) * xr[j]).to_f64()).sum::<f64>() / cols as f64);
        let k = inv * inv * dot;
        for (j, dx) in dx.iter_mut().enumerate() {
            let v = inv * (w[j] * g(j) - xr[j] * k);
            *dx = if accumulate { *dx + v } else { v };
        }
    });
}

/// Rotary embedding in place on whole `width`-wide token rows of `x` (position = token
/// index mod `seq_len`), after the caller's checks; `inverse` rotates by minus the angle.
fn rope_rows<F: Real>(
    x: &mut [F],
    width: usize,
    head_dim: usize,
    seq_len: usize,
    (cos, sin): (&[F], &[F]),
    inverse: bool,
) {
    if width == 0 {
        return;
    }
    let half = head_dim / 2;
    x.par_chunks_mut(width).enumerate().for_each(|(t, row)| {
        let p = t % seq_len;
        let (c, s) = (&cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half]);
        for head in row.chunks_mut(head_dim) {
            for i in 0..half {
                let (a, b) = (head[i], head[i + half]);
                let s = if inverse { -s[i] } else { s[i] };
                head[i] = a * c[i] - b * s;
                head[i + half] = a * s + b * c[i];
            }
        }
    });
}

/// The RMSNorm of each `cols`-wide row of `x` into `y` (each element through `out`: itself,
/// or its bf16 rounding) and the row's `inv_rms`; `y` holds whole rows.
fn rmsnorm_rows<F: Real, T: Send>(
    x: &[F],
    w: &[F],
    y: &mut [T],
    inv_rms: &mut [F],
    cols: usize,
    eps: f32,
    out: impl Fn(F) -> T + Sync,
) {
    let eps = F::from_f64(eps as f64);
    let rows = y.len() / cols;
    y.par_chunks_mut(cols).zip(inv_rms[..rows].par_iter_mut()).enumerate().for_each(|(r, (y, ir))| {
        let xr = &x[r * cols..(r + 1) * cols];
        // Sums in f64: the specification should not carry f32 summation error.
        let ms = F::from_f64(xr.iter().map(|&v| v.to_f64() * v.to_f64()).sum::<f64>() / cols as f64);
        let inv = F::ONE / (ms + eps).sqrt();
        *ir = inv;
        y.iter_mut().zip(xr).zip(&w[..cols]).for_each(|((y, &x), &w)| *y = out(x * inv * w));
    });
}
