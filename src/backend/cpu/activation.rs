//! The scalar math of the CPU activations: GELU (erf and tanh forms) and SiLU with their
//! derivatives, applied elementwise by the activation ops in dense.rs.

use crate::backend::GeluKind;
use crate::scalar::Real;

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

/// One element of the SwiGLU backward, `(d_gate, d_up) = (dh up silu'(gate), dh silu(gate))`:
/// the CPU specification every SwiGLU backward (f32, bf16 saves, checked, in place) shares.
pub fn swiglu_grads_scalar<F: Real>(gate: F, up: F, dh: F) -> (F, F) {
    (dh * up * silu_grad_scalar(gate), dh * silu_scalar(gate))
}
