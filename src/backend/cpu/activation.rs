//! CPU activations: GELU (erf and tanh forms) and SwiGLU, forward and backward.

use crate::backend::GeluKind;
use crate::error::{check_len, Result};
use crate::scalar::Real;
use rayon::prelude::*;

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_TANH_C: f64 = 0.044_715;
const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// `gelu(x)` for one value.
pub fn gelu_scalar<F: Real>(x: F, kind: GeluKind) -> F {
    let half = F::from_f64(0.5);
    match kind {
        GeluKind::Erf => half * x * (F::ONE + (x * F::from_f64(FRAC_1_SQRT_2)).erf()),
        GeluKind::Tanh => {
            let inner = F::from_f64(SQRT_2_OVER_PI) * (x + F::from_f64(GELU_TANH_C) * x * x * x);
            half * x * (F::ONE + inner.tanh())
        }
    }
}

/// `gelu'(x)` for one value.
pub fn gelu_grad_scalar<F: Real>(x: F, kind: GeluKind) -> F {
    let half = F::from_f64(0.5);
    match kind {
        GeluKind::Erf => {
            let cdf = half * (F::ONE + (x * F::from_f64(FRAC_1_SQRT_2)).erf());
            let pdf = F::from_f64(FRAC_1_SQRT_2PI) * (-(half * x * x)).exp();
            cdf + x * pdf
        }
        GeluKind::Tanh => {
            let c = F::from_f64(SQRT_2_OVER_PI);
            let a = F::from_f64(GELU_TANH_C);
            let th = (c * (x + a * x * x * x)).tanh();
            let d_inner = c * (F::ONE + F::from_f64(3.0) * a * x * x);
            half * (F::ONE + th) + half * x * (F::ONE - th * th) * d_inner
        }
    }
}

/// `silu(z) = z * sigmoid(z)`.
pub fn silu_scalar<F: Real>(z: F) -> F {
    z / (F::ONE + (-z).exp())
}

/// `silu'(z) = s (1 + z (1 - s))`, `s = sigmoid(z)`.
pub fn silu_grad_scalar<F: Real>(z: F) -> F {
    let s = F::ONE / (F::ONE + (-z).exp());
    s * (F::ONE + z * (F::ONE - s))
}

pub(super) fn gelu<F: Real>(x: &[F], y: &mut [F], len: usize, kind: GeluKind) -> Result<()> {
    check_len("gelu", "x", x.len(), len)?;
    check_len("gelu", "y", y.len(), len)?;
    y[..len].par_iter_mut().zip(&x[..len]).for_each(|(y, &x)| *y = gelu_scalar(x, kind));
    Ok(())
}

pub(super) fn gelu_backward<F: Real>(x: &[F], dy: &[F], dx: &mut [F], len: usize, kind: GeluKind) -> Result<()> {
    check_len("gelu_backward", "x", x.len(), len)?;
    check_len("gelu_backward", "dy", dy.len(), len)?;
    check_len("gelu_backward", "dx", dx.len(), len)?;
    dx[..len]
        .par_iter_mut()
        .zip(x[..len].par_iter().zip(&dy[..len]))
        .for_each(|(dx, (&x, &dy))| *dx = dy * gelu_grad_scalar(x, kind));
    Ok(())
}

pub(super) fn swiglu<F: Real>(gate: &[F], up: &[F], h: &mut [F], len: usize) -> Result<()> {
    check_len("swiglu", "gate", gate.len(), len)?;
    check_len("swiglu", "up", up.len(), len)?;
    check_len("swiglu", "h", h.len(), len)?;
    h[..len]
        .par_iter_mut()
        .zip(gate[..len].par_iter().zip(&up[..len]))
        .for_each(|(h, (&g, &u))| *h = silu_scalar(g) * u);
    Ok(())
}

pub(super) fn swiglu_backward<F: Real>(
    gate: &[F],
    up: &[F],
    dh: &[F],
    d_gate: &mut [F],
    d_up: &mut [F],
    len: usize,
) -> Result<()> {
    for (what, l) in
        [("gate", gate.len()), ("up", up.len()), ("dh", dh.len()), ("d_gate", d_gate.len()), ("d_up", d_up.len())]
    {
        check_len("swiglu_backward", what, l, len)?;
    }
    d_gate[..len].par_iter_mut().zip(d_up[..len].par_iter_mut()).enumerate().for_each(|(i, (dg, du))| {
        let (g, u, d) = (gate[i], up[i], dh[i]);
        *dg = d * u * silu_grad_scalar(g);
        *du = d * silu_scalar(g);
    });
    Ok(())
}
