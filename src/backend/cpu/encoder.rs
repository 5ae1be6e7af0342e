//! CPU encoder ops: LayerNorm (forward, input gradient, affine parameter gradients), the
//! bidirectional softmax with a padding mask and its backward, and pooling of a sequence's
//! token rows (mean over the real tokens or the [CLS] token) and its backward: the
//! specification of cuda/encoder.cu.
//!
//! Padding is given per sequence as a length: sequence `b` has `n = min(lengths[b], t)`
//! real tokens followed by padding (the right-padded batches a BERT tokenizer produces).

use super::{Cpu, CpuBuf};
use crate::backend::ops::encoder::*;
use crate::backend::PoolKind;
use crate::error::Result;
use crate::scalar::Real;
use rayon::prelude::*;

/// Real tokens of sequence `b`.
fn live(lengths: &[u32], b: usize, t: usize) -> usize {
    (lengths[b] as usize).min(t)
}

impl EncoderOps for Cpu {
    fn layernorm<F: Real>(
        &self,
        x: &CpuBuf<F>,
        w: &CpuBuf<F>,
        b: &CpuBuf<F>,
        y: &mut CpuBuf<F>,
        mean: &mut CpuBuf<F>,
        rstd: &mut CpuBuf<F>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        let n = check_layernorm(self, [x, w, b, y, mean, rstd], rows, cols)?;
        let eps = eps as f64;
        y[..n]
            .par_chunks_mut(cols)
            .zip(mean[..rows].par_iter_mut().zip(rstd[..rows].par_iter_mut()))
            .enumerate()
            .for_each(|(r, (y, (m, rs)))| {
                let xr = &x[r * cols..(r + 1) * cols];
                // Two passes in f64: the specification carries no summation error worth naming.
                let mu = xr.iter().map(|v| v.to_f64()).sum::<f64>() / cols as f64;
                let var = xr.iter().map(|v| (v.to_f64() - mu).powi(2)).sum::<f64>() / cols as f64;
                let (mu, inv) = (F::from_f64(mu), F::from_f64(1.0 / (var + eps).sqrt()));
                *m = mu;
                *rs = inv;
                for (c, out) in y.iter_mut().enumerate() {
                    *out = (xr[c] - mu) * inv * w[c] + b[c];
                }
            });
        Ok(())
    }

    fn layernorm_backward<F: Real>(
        &self,
        x: &CpuBuf<F>,
        w: &CpuBuf<F>,
        mean: &CpuBuf<F>,
        rstd: &CpuBuf<F>,
        dy: &CpuBuf<F>,
        dx: &mut CpuBuf<F>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let n = check_layernorm_backward(self, [x, w, mean, rstd, dy, dx], rows, cols)?;
        dx[..n].par_chunks_mut(cols).enumerate().for_each(|(r, dx)| {
            let (xr, dyr, mu, rs) = (&x[r * cols..(r + 1) * cols], &dy[r * cols..(r + 1) * cols], mean[r], rstd[r]);
            let (mut sg, mut sgx) = (0.0f64, 0.0f64);
            for c in 0..cols {
                let g = w[c] * dyr[c];
                sg += g.to_f64();
                sgx += (g * ((xr[c] - mu) * rs)).to_f64();
            }
            let (mg, mgx) = (F::from_f64(sg / cols as f64), F::from_f64(sgx / cols as f64));
            for c in 0..cols {
                let xh = (xr[c] - mu) * rs;
                dx[c] = rs * ((w[c] * dyr[c] - mg) - xh * mgx);
            }
        });
        Ok(())
    }

    fn layernorm_param_grads<F: Real>(
        &self,
        x: &CpuBuf<F>,
        mean: &CpuBuf<F>,
        rstd: &CpuBuf<F>,
        dy: &CpuBuf<F>,
        dw: &mut CpuBuf<F>,
        db: &mut CpuBuf<F>,
        rows: usize,
        cols: usize,
        beta: F,
    ) -> Result<()> {
        check_layernorm_param_grads(self, [x, mean, rstd, dy, dw, db], rows, cols)?;
        // Sequential sums over rows in F, column by column: the order the kernel uses.
        dw[..cols].par_iter_mut().zip(db[..cols].par_iter_mut()).enumerate().for_each(|(c, (dw, db))| {
            let (mut sw, mut sb) = (F::ZERO, F::ZERO);
            for r in 0..rows {
                let d = dy[r * cols + c];
                sw += d * ((x[r * cols + c] - mean[r]) * rstd[r]);
                sb += d;
            }
            // beta = 0 overwrites (the old value may be NaN).
            *dw = if beta == F::ZERO { sw } else { beta * *dw + sw };
            *db = if beta == F::ZERO { sb } else { beta * *db + sb };
        });
        Ok(())
    }

    fn softmax_masked<F: Real>(
        &self,
        s: &mut CpuBuf<F>,
        lengths: &CpuBuf<u32>,
        mats: usize,
        heads: usize,
        t: usize,
        scale: f32,
    ) -> Result<()> {
        let rows = check_softmax_masked(self, s, lengths, mats, heads, t)?;
        if t == 0 {
            return Ok(());
        }
        let scale = F::from_f64(scale as f64);
        s[..rows * t].par_chunks_mut(t).enumerate().for_each(|(row, p)| {
            let n = live(lengths, row / t / heads, t);
            let max = p[..n].iter().fold(F::from_f64(f64::NEG_INFINITY), |m, &v| m.max(scale * v));
            let mut sum = 0.0f64;
            for v in &mut p[..n] {
                *v = (scale * *v - max).exp();
                sum += v.to_f64();
            }
            let sum = F::from_f64(sum);
            p[..n].iter_mut().for_each(|v| *v = *v / sum);
            p[n..].fill(F::ZERO);
        });
        Ok(())
    }

    fn softmax_masked_backward<F: Real>(
        &self,
        p: &CpuBuf<F>,
        dp: &CpuBuf<F>,
        ds: &mut CpuBuf<F>,
        lengths: &CpuBuf<u32>,
        mats: usize,
        heads: usize,
        t: usize,
        scale: f32,
    ) -> Result<()> {
        let rows = check_softmax_masked_backward(self, [p, dp, ds], lengths, mats, heads, t)?;
        if t == 0 {
            return Ok(());
        }
        let scale = F::from_f64(scale as f64);
        ds[..rows * t].par_chunks_mut(t).enumerate().for_each(|(row, ds)| {
            let n = live(lengths, row / t / heads, t);
            let (p, dp) = (&p[row * t..row * t + t], &dp[row * t..row * t + t]);
            let dot = F::from_f64(p[..n].iter().zip(&dp[..n]).map(|(&a, &b)| (a * b).to_f64()).sum::<f64>());
            for j in 0..n {
                ds[j] = scale * p[j] * (dp[j] - dot);
            }
            ds[n..].fill(F::ZERO);
        });
        Ok(())
    }

    fn pool_rows<F: Real>(
        &self,
        x: &CpuBuf<F>,
        lengths: &CpuBuf<u32>,
        out: &mut CpuBuf<F>,
        batch: usize,
        t: usize,
        cols: usize,
        kind: PoolKind,
    ) -> Result<()> {
        let (pooled, _) = check_pool_rows(self, x, lengths, out, batch, t, cols)?;
        if cols == 0 {
            return Ok(());
        }
        out[..pooled].par_chunks_mut(cols).enumerate().for_each(|(b, o)| {
            let n = live(lengths, b, t);
            let xb = &x[b * t * cols..];
            for (c, o) in o.iter_mut().enumerate() {
                *o = match (n, kind) {
                    (0, _) => F::ZERO,
                    (_, PoolKind::Cls) => xb[c],
                    (_, PoolKind::Mean) => {
                        // In F, row by row: the kernel's order and rounding.
                        let mut s = F::ZERO;
                        for j in 0..n {
                            s += xb[j * cols + c];
                        }
                        s / F::from_f64(n as f64)
                    }
                };
            }
        });
        Ok(())
    }

    fn pool_rows_backward<F: Real>(
        &self,
        dout: &CpuBuf<F>,
        lengths: &CpuBuf<u32>,
        dx: &mut CpuBuf<F>,
        batch: usize,
        t: usize,
        cols: usize,
        kind: PoolKind,
    ) -> Result<()> {
        let (_, full) = check_pool_rows_backward(self, dout, lengths, dx, batch, t, cols)?;
        if cols == 0 || t == 0 {
            return Ok(());
        }
        dx[..full].par_chunks_mut(cols).enumerate().for_each(|(row, dxr)| {
            let (b, j) = (row / t, row % t);
            let n = live(lengths, b, t);
            let d = &dout[b * cols..(b + 1) * cols];
            match kind {
                PoolKind::Cls if j == 0 && n > 0 => dxr.copy_from_slice(d),
                PoolKind::Mean if j < n => {
                    let nf = F::from_f64(n as f64);
                    dxr.iter_mut().zip(d).for_each(|(o, &v)| *o = v / nf);
                }
                _ => dxr.fill(F::ZERO),
            }
        });
        Ok(())
    }
}
