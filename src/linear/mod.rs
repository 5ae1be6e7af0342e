//! Trainable linear layers `y = x W^T + b` and what they share: how many gradient entries
//! to keep and the checks every layer makes before building, a forward and a backward.
//!
//! Host copies of gradients follow one naming scheme. Every layer's `grad_host()` returns
//! the weight gradient of the last backward in that layer's natural form:
//! [`dense::DenseLinear::grad_host`] the dense `dW` `(out, in)`,
//! [`sparsegrad::SparseGradLinear::grad_host`] the COO of `dWt` in the basis,
//! [`lora::LoraLinear::grad_host`] the factor gradients `(dA, dB)`. Where a type holds more
//! than one form, a prefix names the form: [`dense::DenseLinear::coo_grad_host`] is MeProp's
//! selected COO gradient, and [`trainable::Linear::dense_grad_host`] is the dense gradient of
//! whichever variant has one (the preliminary phase's input to the Gram accumulators).
//! `bias_grad_host()` is the bias gradient on every layer.

pub mod dense;
pub mod lora;
pub mod sparsegrad;
pub mod state;
pub mod trainable;

use crate::backend::operand::{check_finite, stage_checked, OperandRef};
use crate::backend::Backend;
use crate::error::{checked_mul, ensure_finite, Error, Result};
use crate::scalar::Real;
use half::bf16;

/// A layer's starting point: the dense `weight` `(out, in)` and, if the layer has one, its
/// `bias` `(out)`; what [`dense::DenseLinear`] and [`lora::LoraLinear`] are built from.
#[derive(Clone, Copy, Debug)]
pub struct LayerWeights<'a, F> {
    pub weight: &'a [F],
    pub bias: Option<&'a [F]>,
    pub out: usize,
    pub inp: usize,
}

impl<'a, F> LayerWeights<'a, F> {
    /// `weight` `(out, in)` without a bias.
    pub fn new(weight: &'a [F], out: usize, inp: usize) -> Self {
        LayerWeights { weight, bias: None, out, inp }
    }
    /// The same weight with `bias` (`None` keeps the layer bias-free).
    pub fn with_bias(mut self, bias: Option<&'a [F]>) -> Self {
        self.bias = bias;
        self
    }
}

/// How many gradient entries a sparse method keeps each step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Keep {
    /// Exactly this many entries (1 ..= out*in).
    Count(usize),
    /// This fraction of all entries, rounded up (0 < f <= 1); 0.01 is the paper's 1%.
    Fraction(f64),
}

impl Default for Keep {
    fn default() -> Self {
        Keep::Fraction(0.01)
    }
}

impl Keep {
    /// The entry count for a matrix of `total` entries.
    pub fn resolve(&self, total: usize) -> Result<usize> {
        let k = match *self {
            Keep::Count(k) => k,
            Keep::Fraction(f) => {
                if !(f > 0.0 && f <= 1.0) {
                    return Err(Error::invalid("keep", format!("fraction {f} outside (0, 1]")));
                }
                // Round up, but not past float noise: 0.07 * 100 is 7.000000000000001 in f64.
                let x = f * total as f64;
                let nearest = x.round();
                let k = if (x - nearest).abs() <= 1e-9 * x.max(1.0) { nearest } else { x.ceil() };
                (k as usize).clamp(1, total.max(1))
            }
        };
        if k == 0 || k > total {
            return Err(Error::invalid("keep", format!("k = {k} outside 1..={total} (the weight's entry count)")));
        }
        Ok(k)
    }
}

/// Fails unless `buf` holds at least `tokens * width` values.
pub(crate) fn check_activation<B: Backend, T: crate::Elem>(
    backend: &B,
    op: &'static str,
    what: &str,
    buf: &B::Buf<T>,
    tokens: usize,
    width: usize,
) -> Result<()> {
    let need = tokens * width;
    if backend.len(buf) < need {
        return Err(Error::shape(op, what, format!("{tokens} x {width} = {need} values"), backend.len(buf)));
    }
    Ok(())
}

/// A layer's constructor checks: `weight` is `(out, in)`, `bias` (if any) `(out)`, both finite.
pub(crate) fn check_weight_and_bias<F: Real>(
    op: &'static str,
    weight: &[F],
    bias: Option<&[F]>,
    out: usize,
    inp: usize,
) -> Result<()> {
    let need = out.checked_mul(inp).ok_or_else(|| Error::invalid(op, format!("{out} x {inp} overflows")))?;
    if weight.len() != need {
        return Err(Error::shape(op, "weight", format!("{out} x {inp}"), weight.len()));
    }
    if let Some(b) = bias {
        if b.len() != out {
            return Err(Error::shape(op, "bias", out, b.len()));
        }
        ensure_finite("bias", b.iter().copied())?;
    }
    ensure_finite("weight", weight.iter().copied())
}

/// What every layer checks before a forward: `x` holds `(tokens, in)` finite values and `y`
/// room for `(tokens, out)`.
pub(crate) fn check_forward<B: Backend, F: Real>(
    be: &B,
    op: &'static str,
    x: &B::Buf<F>,
    y: &B::Buf<F>,
    tokens: usize,
    (out, inp): (usize, usize),
) -> Result<()> {
    check_activation(be, op, "x", x, tokens, inp)?;
    check_activation(be, op, "y", y, tokens, out)?;
    // A deferring backend checks x where the layer stages it (`stage_checked`).
    if be.defers_finite_checks() {
        return Ok(());
    }
    check_finite(be, x, tokens * inp, INPUT_X)
}

/// The names of the finiteness checks of a layer's input and output gradient.
pub(crate) const INPUT_X: &str = "layer input x";
pub(crate) const GRAD_Y: &str = "output gradient grad_y";

/// The output gradient a layer's backward starts from.
pub(crate) enum GradY<'a, B: Backend, F: Real> {
    /// As the caller has it: the layer checks it for NaN and infinity and rounds it for its
    /// bf16 GEMMs (`stage_checked`).
    Raw(&'a B::Buf<F>),
    /// Already checked by the pass that made it, in the precision of the layer's GEMMs (a
    /// bf16 operand for a bf16 layer): the layer uses it as it is. A [`OperandRef::Half`]
    /// has no `F` values, so a layer that needs them (a bias gradient, a selection that
    /// reads `g`) refuses it; [`trainable::Linear::takes_half_grad`] says which do.
    Checked(OperandRef<'a, B, F>),
}

impl<B: Backend, F: Real> Clone for GradY<'_, B, F> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend, F: Real> Copy for GradY<'_, B, F> {}

impl<'a, B: Backend, F: Real> GradY<'a, B, F> {
    /// `g` in `F`, unless only its bf16 operand was given.
    pub(crate) fn full(&self) -> Option<&'a B::Buf<F>> {
        match *self {
            GradY::Raw(g) | GradY::Checked(OperandRef::Full(g)) => Some(g),
            GradY::Checked(OperandRef::Half(_)) => None,
        }
    }

    /// [`Self::full`], or an error naming `op` for a layer that needs the `F` values.
    pub(crate) fn require_full(&self, op: &'static str) -> Result<&'a B::Buf<F>> {
        self.full().ok_or_else(|| {
            Error::invalid(op, "this layer needs its output gradient in the master precision, not only in bf16")
        })
    }

    /// The GEMM operand: a raw `g` checked and staged into `half` (if given), a checked one
    /// as it is.
    pub(crate) fn operand<'b>(
        &self,
        be: &B,
        half: Option<&'b mut B::Buf<bf16>>,
        len: usize,
    ) -> Result<OperandRef<'b, B, F>>
    where
        'a: 'b,
    {
        match *self {
            GradY::Raw(g) => stage_checked(be, g, half, len, GRAD_Y),
            GradY::Checked(op) => Ok(op),
        }
    }
}

/// What every layer checks before a backward: the last forward saved `tokens` tokens,
/// `g` holds `(tokens, out)` finite values and `dx` (if given) room for `(tokens, in)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_backward<B: Backend, F: Real>(
    be: &B,
    op: &'static str,
    saved_tokens: Option<usize>,
    g: GradY<'_, B, F>,
    dx: Option<&B::Buf<F>>,
    tokens: usize,
    (out, inp): (usize, usize),
) -> Result<()> {
    match saved_tokens {
        Some(t) if t == tokens => {}
        Some(t) => return Err(Error::shape(op, "tokens (must match the last forward)", t, tokens)),
        None => return Err(Error::invalid(op, "no saved activations: call forward first")),
    }
    let n = checked_mul(op, tokens, out)?;
    match g {
        GradY::Raw(g) | GradY::Checked(OperandRef::Full(g)) => check_activation(be, op, "grad_y", g, tokens, out)?,
        GradY::Checked(OperandRef::Half(h)) => check_activation(be, op, "grad_y (bf16)", h, tokens, out)?,
    }
    if let Some(dx) = dx {
        check_activation(be, op, "dx", dx, tokens, inp)?;
    }
    // A deferring backend checks g where the layer stages it (`stage_checked`); a checked
    // g was checked where it was made.
    match g {
        GradY::Raw(g) if !be.defers_finite_checks() => check_finite(be, g, n, GRAD_Y),
        _ => Ok(()),
    }
}
