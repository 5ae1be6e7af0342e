//! CPU transformer ops: RMSNorm, rotary embedding, causal softmax and masked
//! cross-entropy, forward and backward (the specification of the CUDA kernels).

use crate::error::{check_len, Error, Result};
use crate::scalar::Real;
use rayon::prelude::*;

#[allow(clippy::too_many_arguments)]
pub(super) fn rmsnorm<F: Real>(
    x: &[F],
    w: &[F],
    y: &mut [F],
    inv_rms: &mut [F],
    rows: usize,
    cols: usize,
    eps: f32,
) -> Result<()> {
    for (what, len, need) in [
        ("x", x.len(), rows * cols),
        ("w", w.len(), cols),
        ("y", y.len(), rows * cols),
        ("inv_rms", inv_rms.len(), rows),
    ] {
        check_len("rmsnorm", what, len, need)?;
    }
    if cols == 0 {
        return Err(Error::invalid("rmsnorm", "rows of width 0"));
    }
    let eps = F::from_f64(eps as f64);
    y[..rows * cols].par_chunks_mut(cols).zip(inv_rms[..rows].par_iter_mut()).enumerate().for_each(|(r, (y, ir))| {
        let xr = &x[r * cols..(r + 1) * cols];
        // Sums in f64: the specification should not carry f32 summation error.
        let ms = F::from_f64(xr.iter().map(|&v| v.to_f64() * v.to_f64()).sum::<f64>() / cols as f64);
        let inv = F::ONE / (ms + eps).sqrt();
        *ir = inv;
        y.iter_mut().zip(xr).zip(&w[..cols]).for_each(|((y, &x), &w)| *y = x * inv * w);
    });
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn rmsnorm_backward<F: Real>(
    x: &[F],
    w: &[F],
    inv_rms: &[F],
    dy: &[F],
    dx: &mut [F],
    rows: usize,
    cols: usize,
) -> Result<()> {
    for (what, len, need) in [
        ("x", x.len(), rows * cols),
        ("w", w.len(), cols),
        ("inv_rms", inv_rms.len(), rows),
        ("dy", dy.len(), rows * cols),
        ("dx", dx.len(), rows * cols),
    ] {
        check_len("rmsnorm_backward", what, len, need)?;
    }
    if cols == 0 {
        return Err(Error::invalid("rmsnorm_backward", "rows of width 0"));
    }
    dx[..rows * cols].par_chunks_mut(cols).enumerate().for_each(|(r, dx)| {
        let (xr, dyr, inv) = (&x[r * cols..(r + 1) * cols], &dy[r * cols..(r + 1) * cols], inv_rms[r]);
        let dot = F::from_f64(
            xr.iter().zip(dyr).zip(&w[..cols]).map(|((&x, &dy), &w)| (w * dy * x).to_f64()).sum::<f64>() / cols as f64,
        );
        let k = inv * inv * dot;
        dx.iter_mut().zip(xr).zip(dyr).zip(&w[..cols]).for_each(|(((dx, &x), &dy), &w)| *dx = inv * (w * dy - x * k));
    });
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn rope<F: Real>(
    x: &mut [F],
    tokens: usize,
    heads: usize,
    head_dim: usize,
    seq_len: usize,
    cos: &[F],
    sin: &[F],
    inverse: bool,
) -> Result<()> {
    if head_dim % 2 != 0 || seq_len == 0 {
        return Err(Error::invalid("rope", format!("head_dim {head_dim} must be even and seq_len {seq_len} positive")));
    }
    let half = head_dim / 2;
    let width = heads * head_dim;
    check_len("rope", "x", x.len(), tokens * width)?;
    check_len("rope", "cos", cos.len(), seq_len * half)?;
    check_len("rope", "sin", sin.len(), seq_len * half)?;
    if width == 0 {
        return Ok(());
    }
    x[..tokens * width].par_chunks_mut(width).enumerate().for_each(|(t, row)| {
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
    Ok(())
}

pub(super) fn softmax_causal<F: Real>(s: &mut [F], mats: usize, t: usize, scale: f32) -> Result<()> {
    check_len("softmax_causal", "s", s.len(), mats * t * t)?;
    if t == 0 {
        return Ok(());
    }
    let scale = F::from_f64(scale as f64);
    s[..mats * t * t].par_chunks_mut(t).enumerate().for_each(|(row, p)| {
        let i = row % t;
        let max = p[..=i].iter().fold(F::from_f64(f64::NEG_INFINITY), |m, &v| m.max(scale * v));
        let mut sum = 0.0f64;
        for v in &mut p[..=i] {
            *v = (scale * *v - max).exp();
            sum += v.to_f64();
        }
        let sum = F::from_f64(sum);
        p[..=i].iter_mut().for_each(|v| *v = *v / sum);
        p[i + 1..].fill(F::ZERO);
    });
    Ok(())
}

pub(super) fn softmax_causal_backward<F: Real>(
    p: &[F],
    dp: &[F],
    ds: &mut [F],
    mats: usize,
    t: usize,
    scale: f32,
) -> Result<()> {
    for (what, len) in [("p", p.len()), ("dp", dp.len()), ("ds", ds.len())] {
        check_len("softmax_causal_backward", what, len, mats * t * t)?;
    }
    if t == 0 {
        return Ok(());
    }
    let scale = F::from_f64(scale as f64);
    ds[..mats * t * t].par_chunks_mut(t).enumerate().for_each(|(row, ds)| {
        let i = row % t;
        let (p, dp) = (&p[row * t..row * t + t], &dp[row * t..row * t + t]);
        let dot = F::from_f64(p[..=i].iter().zip(&dp[..=i]).map(|(&a, &b)| (a * b).to_f64()).sum::<f64>());
        for j in 0..=i {
            ds[j] = scale * p[j] * (dp[j] - dot);
        }
        ds[i + 1..].fill(F::ZERO);
    });
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn cross_entropy<F: Real>(
    logits: &mut [F],
    targets: &[u32],
    mask: &[F],
    rows: usize,
    vocab: usize,
    grad_scale: F,
    losses: &mut [F],
) -> Result<()> {
    for (what, len, need) in [
        ("logits", logits.len(), rows * vocab),
        ("targets", targets.len(), rows),
        ("mask", mask.len(), rows),
        ("losses", losses.len(), rows),
    ] {
        check_len("cross_entropy", what, len, need)?;
    }
    if vocab == 0 {
        return Err(Error::invalid("cross_entropy", "vocabulary of size 0"));
    }
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
