//! Dense ops: GEMM (in `F`, and with bf16 operands), the Gram update of the preliminary
//! phase (two symmetric rank-k updates), casts to and from bf16, bias add and bias
//! gradient, the finiteness count, axpy, and the elementwise activations (GELU, SwiGLU)
//! with their backwards; and the validator of each.

use super::{check_bufs, check_lens};
use crate::backend::{Backend, Buffers, GeluKind, Gemm};
use crate::error::{checked_mul, Result};
use crate::scalar::{Elem, Real};
use half::bf16;

/// Dense and elementwise ops. Elementwise ops read and write the first `len` entries.
pub trait DenseOps: Buffers {
    /// `C = alpha op(A) op(B) + beta C` in `F`.
    fn gemm<F: Real>(&self, spec: &Gemm, a: &Self::Buf<F>, b: &Self::Buf<F>, c: &mut Self::Buf<F>) -> Result<()>;
    /// The same with bf16 operands and an `F` output, accumulating in f32 (cuBLAS GemmEx).
    fn gemm_bf16<F: Real>(
        &self,
        spec: &Gemm,
        a: &Self::Buf<bf16>,
        b: &Self::Buf<bf16>,
        c: &mut Self::Buf<F>,
    ) -> Result<()>;
    /// The same with a bf16 output: `C = bf16(alpha op(A) op(B) + beta C)`, accumulated in
    /// f32 and rounded once (cuBLAS GemmEx with a bf16 C), for a product whose only use is
    /// as the bf16 operand of the next. `k` must be at least 1.
    fn gemm_bf16_out(
        &self,
        spec: &Gemm,
        a: &Self::Buf<bf16>,
        b: &Self::Buf<bf16>,
        c: &mut Self::Buf<bf16>,
    ) -> Result<()>;
    /// Adds the two Gram matrices of the row-major `(out, in)` matrix `g` (its first
    /// `out * in` entries) into `grams`, which stacks two row-major square matrices:
    /// `grams[..out^2] += g g^T` `(out, out)` and `grams[out^2..out^2 + in^2] += g^T g`
    /// `(in, in)`. Only the upper triangles (`row <= col`) are read and written; the lower
    /// ones are left untouched. Products and sums in `F` (BLAS `?syrk`; cuBLAS `Ssyrk`).
    fn gram_accumulate<F: Real>(
        &self,
        g: &Self::Buf<F>,
        out: usize,
        inp: usize,
        grams: &mut Self::Buf<F>,
    ) -> Result<()>;
    /// `dst[i] = bf16(src[i])`, round to nearest even.
    fn cast_to_bf16<F: Real>(&self, src: &Self::Buf<F>, dst: &mut Self::Buf<bf16>, len: usize) -> Result<()>;
    /// `dst[i] = F(src[i])`.
    fn cast_from_bf16<F: Real>(&self, src: &Self::Buf<bf16>, dst: &mut Self::Buf<F>, len: usize) -> Result<()>;
    /// [`Self::cast_to_bf16`] of four `(src, dst, len)` pairs at once (one launch on a GPU);
    /// a pair of length 0 is skipped.
    fn cast_to_bf16_x4<F: Real>(
        &self,
        src: [&Self::Buf<F>; 4],
        dst: [&mut Self::Buf<bf16>; 4],
        len: [usize; 4],
    ) -> Result<()>;
    /// [`Self::cast_from_bf16`] of four `(src, dst, len)` pairs at once.
    fn cast_from_bf16_x4<F: Real>(
        &self,
        src: [&Self::Buf<bf16>; 4],
        dst: [&mut Self::Buf<F>; 4],
        len: [usize; 4],
    ) -> Result<()>;
    /// `y[r, c] += bias[c]` for a `(rows, cols)` matrix.
    fn add_bias<F: Real>(&self, y: &mut Self::Buf<F>, bias: &Self::Buf<F>, rows: usize, cols: usize) -> Result<()>;
    /// `db[c] = beta * db[c] + sum_r g[r, c]` (column sums of a `(rows, cols)` matrix).
    fn bias_grad<F: Real>(
        &self,
        g: &Self::Buf<F>,
        rows: usize,
        cols: usize,
        db: &mut Self::Buf<F>,
        beta: F,
    ) -> Result<()>;
    /// Number of NaN/inf entries in `x[..len]` and the index of the first one.
    fn count_nonfinite<F: Real>(&self, x: &Self::Buf<F>, len: usize) -> Result<(usize, usize)>;
    /// Fails with [`crate::Error::NonFinite`] naming `what` if `x[..len]` holds NaN or
    /// infinity. The CPU checks at once. CUDA checks on the device without waiting for it:
    /// the first check of a run of queued work that fails keeps its name, count and first
    /// index in the device's health block, and the error is returned by the next
    /// `synchronize`, `download` or [`DenseOps::sum_to_host`] (so a training step reads it
    /// with its loss, in its one synchronisation).
    fn assert_finite<F: Real>(&self, x: &Self::Buf<F>, len: usize, what: &str) -> Result<()>;
    /// [`Self::cast_to_bf16`] and [`Self::assert_finite`] of `src` in one pass (one launch on
    /// a GPU). The CPU checks first and leaves `dst` untouched when `src` is not finite.
    fn cast_to_bf16_checked<F: Real>(
        &self,
        src: &Self::Buf<F>,
        dst: &mut Self::Buf<bf16>,
        len: usize,
        what: &str,
    ) -> Result<()>;
    /// `dst[..len] = src[..len]` and [`Self::assert_finite`] of `src` in one pass, as
    /// [`Self::cast_to_bf16_checked`].
    fn copy_checked<F: Real>(&self, src: &Self::Buf<F>, dst: &mut Self::Buf<F>, len: usize, what: &str) -> Result<()>;
    /// Whether [`Self::assert_finite`] only queues its check (CUDA: the error comes at the
    /// next synchronisation). A layer then folds the check of its input into the pass that
    /// stages it ([`Self::cast_to_bf16_checked`], [`Self::copy_checked`]): the error
    /// arrives at the same point and the input is read once. The CPU checks at once, before
    /// the layer changes anything.
    fn defers_finite_checks(&self) -> bool {
        false
    }
    /// `x[0] + x[1] + ... + x[len - 1]` in f64, summed in order (as `iter().sum()` on the
    /// host), brought to the host; on CUDA one blocking read that also reports any deferred
    /// device error (see [`DenseOps::assert_finite`]).
    fn sum_to_host<F: Real>(&self, x: &Self::Buf<F>, len: usize) -> Result<f64>;
    /// `y[..len] += alpha * x[..len]`.
    fn axpy<F: Real>(&self, alpha: F, x: &Self::Buf<F>, y: &mut Self::Buf<F>, len: usize) -> Result<()>;
    /// `y = gelu(x)` in the erf form (BERT) or the tanh approximation.
    fn gelu<F: Real>(&self, x: &Self::Buf<F>, y: &mut Self::Buf<F>, len: usize, kind: GeluKind) -> Result<()>;
    /// `dx = dy * gelu'(x)`.
    fn gelu_backward<F: Real>(
        &self,
        x: &Self::Buf<F>,
        dy: &Self::Buf<F>,
        dx: &mut Self::Buf<F>,
        len: usize,
        kind: GeluKind,
    ) -> Result<()>;
    /// SwiGLU: `h = silu(gate) * up`, `silu(z) = z / (1 + exp(-z))`.
    fn swiglu<F: Real>(&self, gate: &Self::Buf<F>, up: &Self::Buf<F>, h: &mut Self::Buf<F>, len: usize) -> Result<()>;
    /// `d_gate = dh * up * silu'(gate)`, `d_up = dh * silu(gate)`.
    fn swiglu_backward<F: Real>(
        &self,
        gate: &Self::Buf<F>,
        up: &Self::Buf<F>,
        dh: &Self::Buf<F>,
        d_gate: &mut Self::Buf<F>,
        d_up: &mut Self::Buf<F>,
        len: usize,
    ) -> Result<()>;
    /// [`Self::swiglu`] that also stores `gate` and `up` rounded to bf16 (as
    /// [`Self::cast_to_bf16`] rounds) into `gate_half` and `up_half`: what a bf16 model
    /// saves for its backward, in one pass.
    fn swiglu_save_bf16<F: Real>(
        &self,
        gate: &Self::Buf<F>,
        up: &Self::Buf<F>,
        h: &mut Self::Buf<F>,
        gate_half: &mut Self::Buf<bf16>,
        up_half: &mut Self::Buf<bf16>,
        len: usize,
    ) -> Result<()>;
    /// [`Self::swiglu_backward`] on `gate` and `up` saved in bf16 (widened exactly).
    fn swiglu_backward_bf16<F: Real>(
        &self,
        gate_half: &Self::Buf<bf16>,
        up_half: &Self::Buf<bf16>,
        dh: &Self::Buf<F>,
        d_gate: &mut Self::Buf<F>,
        d_up: &mut Self::Buf<F>,
        len: usize,
    ) -> Result<()>;
    /// [`Self::swiglu_backward`] that also checks `d_gate` and `d_up` for NaN and infinity
    /// as one check named `what` (the count over both, the first index the smallest element
    /// index in either), as [`Self::assert_finite`] reports: the finiteness check of the
    /// gate and up projections' output gradients, in the pass that makes them. The CPU
    /// writes both outputs, then checks them and fails at once.
    #[allow(clippy::too_many_arguments)]
    fn swiglu_backward_checked<F: Real>(
        &self,
        gate: &Self::Buf<F>,
        up: &Self::Buf<F>,
        dh: &Self::Buf<F>,
        d_gate: &mut Self::Buf<F>,
        d_up: &mut Self::Buf<F>,
        len: usize,
        what: &str,
    ) -> Result<()>;
    /// [`Self::swiglu_backward_bf16`] with `d_gate` and `d_up` rounded to bf16 (to nearest
    /// even, as [`Self::cast_to_bf16`]) and written over `gate_half` and `up_half`, whose
    /// values the backward consumes, checked as [`Self::swiglu_backward_checked`]: both
    /// projections' bf16 output-gradient operands in one pass and no buffer of their own.
    /// The CPU leaves both saves untouched when an output is not finite.
    fn swiglu_backward_bf16_in_place<F: Real>(
        &self,
        gate_half: &mut Self::Buf<bf16>,
        up_half: &mut Self::Buf<bf16>,
        dh: &Self::Buf<F>,
        len: usize,
        what: &str,
    ) -> Result<()>;
}

/// [`DenseOps::gemm`] and [`DenseOps::gemm_bf16`]: leading dimensions and buffer lengths.
pub(crate) fn check_gemm<B: Backend, A: Elem, C: Elem>(
    be: &B,
    spec: &Gemm,
    a: &B::Buf<A>,
    b: &B::Buf<A>,
    c: &B::Buf<C>,
) -> Result<()> {
    spec.validate(be.len(a), be.len(b), be.len(c))
}

/// [`DenseOps::gram_accumulate`]: `g` holds `out * in` entries, `grams` `out^2 + in^2`, and
/// every dimension fits the 32-bit BLAS interfaces of both backends.
pub(crate) fn check_gram_accumulate<B: Backend, F: Elem>(
    be: &B,
    g: &B::Buf<F>,
    out: usize,
    inp: usize,
    grams: &B::Buf<F>,
) -> Result<()> {
    const OP: &str = "gram_accumulate";
    let n = checked_mul(OP, out, inp)?;
    let total = checked_mul(OP, out, out)?
        .checked_add(checked_mul(OP, inp, inp)?)
        .ok_or_else(|| crate::error::Error::invalid(OP, format!("{out}^2 + {inp}^2 overflows")))?;
    for (what, v) in [("out", out), ("in", inp)] {
        if i32::try_from(v).is_err() {
            return Err(crate::error::Error::invalid(OP, format!("{what} = {v} exceeds the BLAS 32-bit limit")));
        }
    }
    check_lens(OP, &[("g", be.len(g), n), ("grams", be.len(grams), total)])
}

/// [`DenseOps::cast_to_bf16_x4`] and [`DenseOps::cast_from_bf16_x4`]: every pair as a single
/// cast is checked (the error names the pair).
pub(crate) fn check_cast_x4<B: Backend, S: Elem, D: Elem>(
    be: &B,
    op: &'static str,
    src: [&B::Buf<S>; 4],
    dst: [&B::Buf<D>; 4],
    len: [usize; 4],
) -> Result<()> {
    for p in 0..4 {
        check_cast(be, op, src[p], dst[p], len[p]).map_err(|e| e.context(&format!("pair {p}")))?;
    }
    Ok(())
}

/// [`DenseOps::cast_to_bf16`] and [`DenseOps::cast_from_bf16`] (`op` names which).
pub(crate) fn check_cast<B: Backend, S: Elem, D: Elem>(
    be: &B,
    op: &'static str,
    src: &B::Buf<S>,
    dst: &B::Buf<D>,
    len: usize,
) -> Result<()> {
    check_lens(op, &[("source", be.len(src), len), ("destination", be.len(dst), len)])
}

/// [`DenseOps::gemm_bf16_out`]: as [`check_gemm`], and an empty product (`k = 0`) refused.
pub(crate) fn check_gemm_bf16_out<B: Backend>(
    be: &B,
    spec: &Gemm,
    a: &B::Buf<bf16>,
    b: &B::Buf<bf16>,
    c: &B::Buf<bf16>,
) -> Result<()> {
    if spec.k == 0 {
        return Err(crate::Error::invalid("gemm_bf16_out", "k = 0: an empty product has no bf16-output form"));
    }
    check_gemm(be, spec, a, b, c)
}

/// [`DenseOps::add_bias`] (`[y, bias]`).
pub(crate) fn check_add_bias<B: Backend, F: Elem>(
    be: &B,
    bufs: [&B::Buf<F>; 2],
    rows: usize,
    cols: usize,
) -> Result<()> {
    let n = checked_mul("add_bias", rows, cols)?;
    check_bufs(be, "add_bias", ["y", "bias"], bufs, [n, cols])
}

/// [`DenseOps::bias_grad`].
pub(crate) fn check_bias_grad<B: Backend, F: Elem>(
    be: &B,
    g: &B::Buf<F>,
    rows: usize,
    cols: usize,
    db: &B::Buf<F>,
) -> Result<()> {
    let n = checked_mul("bias_grad", rows, cols)?;
    check_lens("bias_grad", &[("g", be.len(g), n), ("db", be.len(db), cols)])
}

/// [`DenseOps::count_nonfinite`].
pub(crate) fn check_count_nonfinite<B: Backend, F: Elem>(be: &B, x: &B::Buf<F>, len: usize) -> Result<()> {
    check_lens("count_nonfinite", &[("x", be.len(x), len)])
}

/// [`DenseOps::assert_finite`] and [`DenseOps::sum_to_host`]: `x` holds `len` entries.
pub(crate) fn check_reduce<B: Backend, F: Elem>(be: &B, op: &'static str, x: &B::Buf<F>, len: usize) -> Result<()> {
    check_bufs(be, op, ["x"], [x], [len])
}

/// [`DenseOps::axpy`] (`[x, y]`).
pub(crate) fn check_axpy<B: Backend, F: Elem>(be: &B, bufs: [&B::Buf<F>; 2], len: usize) -> Result<()> {
    check_bufs(be, "axpy", ["x", "y"], bufs, [len; 2])
}

/// [`DenseOps::gelu`] (`[x, y]`).
pub(crate) fn check_gelu<B: Backend, F: Elem>(be: &B, bufs: [&B::Buf<F>; 2], len: usize) -> Result<()> {
    check_bufs(be, "gelu", ["x", "y"], bufs, [len; 2])
}

/// [`DenseOps::gelu_backward`] (`[x, dy, dx]`).
pub(crate) fn check_gelu_backward<B: Backend, F: Elem>(be: &B, bufs: [&B::Buf<F>; 3], len: usize) -> Result<()> {
    check_bufs(be, "gelu_backward", ["x", "dy", "dx"], bufs, [len; 3])
}

/// [`DenseOps::swiglu`] (`[gate, up, h]`).
pub(crate) fn check_swiglu<B: Backend, F: Elem>(be: &B, bufs: [&B::Buf<F>; 3], len: usize) -> Result<()> {
    check_bufs(be, "swiglu", ["gate", "up", "h"], bufs, [len; 3])
}

/// [`DenseOps::swiglu_save_bf16`] (`[gate, up, h]`, `[gate_half, up_half]`).
pub(crate) fn check_swiglu_save_bf16<B: Backend, F: Elem>(
    be: &B,
    bufs: [&B::Buf<F>; 3],
    halves: [&B::Buf<bf16>; 2],
    len: usize,
) -> Result<()> {
    check_bufs(be, "swiglu_save_bf16", ["gate", "up", "h"], bufs, [len; 3])?;
    check_bufs(be, "swiglu_save_bf16", ["gate_half", "up_half"], halves, [len; 2])
}

/// [`DenseOps::swiglu_backward_bf16_in_place`] (`[gate_half, up_half]`, `dh`).
pub(crate) fn check_swiglu_backward_bf16_in_place<B: Backend, F: Elem>(
    be: &B,
    halves: [&B::Buf<bf16>; 2],
    dh: &B::Buf<F>,
    len: usize,
) -> Result<()> {
    const OP: &str = "swiglu_backward_bf16_in_place";
    check_bufs(be, OP, ["gate_half", "up_half"], halves, [len; 2])?;
    check_lens(OP, &[("dh", be.len(dh), len)])
}

/// [`DenseOps::swiglu_backward_bf16`] (`[gate_half, up_half]`, `[dh, d_gate, d_up]`).
pub(crate) fn check_swiglu_backward_bf16<B: Backend, F: Elem>(
    be: &B,
    halves: [&B::Buf<bf16>; 2],
    bufs: [&B::Buf<F>; 3],
    len: usize,
) -> Result<()> {
    check_bufs(be, "swiglu_backward_bf16", ["gate_half", "up_half"], halves, [len; 2])?;
    check_bufs(be, "swiglu_backward_bf16", ["dh", "d_gate", "d_up"], bufs, [len; 3])
}

/// [`DenseOps::swiglu_backward`] and [`DenseOps::swiglu_backward_checked`] (named `op`;
/// `[gate, up, dh, d_gate, d_up]`).
pub(crate) fn check_swiglu_backward<B: Backend, F: Elem>(
    be: &B,
    op: &'static str,
    bufs: [&B::Buf<F>; 5],
    len: usize,
) -> Result<()> {
    check_bufs(be, op, ["gate", "up", "dh", "d_gate", "d_up"], bufs, [len; 5])
}
