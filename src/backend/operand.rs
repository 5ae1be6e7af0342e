//! GEMM operands held in the master precision `F` or in bf16, and the buffer helpers the
//! layers, blocks and models share: growing token-sized buffers, staging an operand in the
//! storage precision, converting host values, checking a buffer is finite.

use crate::backend::{Backend, Gemm};
use crate::error::{Error, Result};
use crate::scalar::Real;
use half::bf16;

/// Storage precision of frozen operands (inputs, saved activations, the basis, and the
/// compute copy of the weight that GEMMs read). Trainable weights, optimizer state and
/// every accumulation stay in the master precision `F`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    #[default]
    Full,
    Bf16,
}

/// A GEMM operand held either in the master precision or in bf16.
pub(crate) enum Operand<B: Backend, F: Real> {
    Full(B::Buf<F>),
    Half(B::Buf<bf16>),
}

impl<B: Backend, F: Real> Operand<B, F> {
    pub(crate) fn alloc(backend: &B, precision: Precision, len: usize) -> Result<Self> {
        Ok(match precision {
            Precision::Full => Operand::Full(backend.alloc(len)?),
            Precision::Bf16 => Operand::Half(backend.alloc(len)?),
        })
    }

    pub(crate) fn upload(backend: &B, precision: Precision, host: &[F]) -> Result<Self> {
        Ok(match precision {
            Precision::Full => Operand::Full(backend.upload(host)?),
            Precision::Bf16 => Operand::Half(backend.upload(&host.iter().map(|v| v.to_bf16()).collect::<Vec<_>>())?),
        })
    }

    /// Stores `src[..len]` (master precision) into this operand, rounding if bf16.
    pub(crate) fn store(&mut self, backend: &B, src: &B::Buf<F>, len: usize) -> Result<()> {
        match self {
            Operand::Full(dst) => backend.copy(src, dst, len),
            Operand::Half(dst) => backend.cast_to_bf16(src, dst, len),
        }
    }

    /// [`Self::store`] of a layer's input or gradient with its finiteness check (see
    /// [`stage_checked`]).
    pub(crate) fn store_checked(&mut self, backend: &B, src: &B::Buf<F>, len: usize, what: &str) -> Result<()> {
        if !backend.defers_finite_checks() {
            return self.store(backend, src, len);
        }
        match self {
            Operand::Full(dst) => backend.copy_checked(src, dst, len, what),
            Operand::Half(dst) => backend.cast_to_bf16_checked(src, dst, len, what),
        }
    }

    /// `self = op(a) op(b)`: a product kept as an operand (rounded once, in the GEMM, when
    /// this operand is bf16).
    pub(crate) fn store_product(
        &mut self,
        backend: &B,
        spec: &Gemm,
        a: OperandRef<'_, B, F>,
        b: OperandRef<'_, B, F>,
    ) -> Result<()> {
        match (self, a, b) {
            (Operand::Full(c), a, b) => mm(backend, spec, a, b, c),
            (Operand::Half(c), OperandRef::Half(a), OperandRef::Half(b)) => backend.gemm_bf16_out(spec, a, b, c),
            _ => Err(Error::invalid("gemm", "a bf16 product needs bf16 operands")),
        }
    }

    pub(crate) fn as_ref(&self) -> OperandRef<'_, B, F> {
        match self {
            Operand::Full(b) => OperandRef::Full(b),
            Operand::Half(b) => OperandRef::Half(b),
        }
    }
}

/// A borrowed GEMM operand: a buffer in the master precision or in bf16.
pub(crate) enum OperandRef<'a, B: Backend, F: Real> {
    Full(&'a B::Buf<F>),
    Half(&'a B::Buf<bf16>),
}

impl<B: Backend, F: Real> Clone for OperandRef<'_, B, F> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend, F: Real> Copy for OperandRef<'_, B, F> {}

impl<'a, B: Backend, F: Real> OperandRef<'a, B, F> {
    /// Gathers rows `row_idx[..n]` of a `(src_rows, cols)` operand into `dst`.
    pub(crate) fn gather_rows(
        self,
        backend: &B,
        src_rows: usize,
        cols: usize,
        row_idx: &B::Buf<u32>,
        n: usize,
        dst: &mut Operand<B, F>,
    ) -> Result<()> {
        match (self, dst) {
            (OperandRef::Full(s), Operand::Full(d)) => backend.gather_rows(s, src_rows, cols, row_idx, n, d),
            (OperandRef::Half(s), Operand::Half(d)) => backend.gather_rows(s, src_rows, cols, row_idx, n, d),
            _ => Err(Error::invalid("gather_rows", "operands of different precision")),
        }
    }
}

/// `C = op(A) op(B)` for two operands of the same precision, output in `F`.
pub(crate) fn mm<B: Backend, F: Real>(
    backend: &B,
    spec: &Gemm,
    a: OperandRef<'_, B, F>,
    b: OperandRef<'_, B, F>,
    c: &mut B::Buf<F>,
) -> Result<()> {
    match (a, b) {
        (OperandRef::Full(a), OperandRef::Full(b)) => backend.gemm(spec, a, b, c),
        (OperandRef::Half(a), OperandRef::Half(b)) => backend.gemm_bf16(spec, a, b, c),
        _ => Err(Error::invalid("gemm", "operands of different precision")),
    }
}

/// Reallocates `buf` (zeroed) when it holds fewer than `len` elements: token-dependent
/// buffers grow to the largest batch seen and are reused after that.
pub(crate) fn grow<B: Backend, T: crate::Elem>(be: &B, buf: &mut B::Buf<T>, len: usize) -> Result<()> {
    if be.len(buf) < len {
        *buf = be.alloc(len)?;
    }
    Ok(())
}

/// f32 host values (weights, bases) in the master precision `F`.
pub(crate) fn to_f<F: Real>(v: &[f32]) -> Vec<F> {
    v.iter().map(|&x| F::from_f64(x as f64)).collect()
}

/// Fails with [`Error::NonFinite`] if `buf[..len]` holds NaN or infinity: at once on the
/// CPU, at the next synchronisation on CUDA (see [`crate::backend::DenseOps::assert_finite`]).
pub(crate) fn check_finite<B: Backend, F: Real>(backend: &B, buf: &B::Buf<F>, len: usize, what: &str) -> Result<()> {
    backend.assert_finite(buf, len, what)
}

/// [`stage`] of a layer's input `x` or output gradient `g` with its finiteness check. On a
/// backend that defers its checks (CUDA) the check runs here, in the pass that rounds `src`
/// (or alone when nothing is rounded); elsewhere the layer's `check_forward` /
/// `check_backward` ran it before the layer changed anything.
pub(crate) fn stage_checked<'a, B: Backend, F: Real>(
    be: &B,
    src: &'a B::Buf<F>,
    half: Option<&'a mut B::Buf<bf16>>,
    len: usize,
    what: &str,
) -> Result<OperandRef<'a, B, F>> {
    if !be.defers_finite_checks() {
        return stage(be, src, half, len);
    }
    match half {
        None => {
            check_finite(be, src, len, what)?;
            Ok(OperandRef::Full(src))
        }
        Some(h) => {
            be.cast_to_bf16_checked(src, h, len, what)?;
            Ok(OperandRef::Half(h))
        }
    }
}

/// `op(a) op(b)` for a product whose only use is as an operand of the next one: with bf16
/// operands and `half` given, written straight into `half` (rounded once in the GEMM, no
/// f32 pass); otherwise into `full`, then staged into `half` if given. `spec` writes a
/// dense `(m, n)` C.
pub(crate) fn mm_operand<'a, B: Backend, F: Real>(
    be: &B,
    spec: &Gemm,
    a: OperandRef<'_, B, F>,
    b: OperandRef<'_, B, F>,
    full: &'a mut B::Buf<F>,
    half: Option<&'a mut B::Buf<bf16>>,
) -> Result<OperandRef<'a, B, F>> {
    match (a, b, half) {
        (OperandRef::Half(a), OperandRef::Half(b), Some(h)) => {
            be.gemm_bf16_out(spec, a, b, h)?;
            Ok(OperandRef::Half(h))
        }
        (a, b, half) => {
            mm(be, spec, a, b, full)?;
            stage(be, full, half, spec.m * spec.n)
        }
    }
}

/// `src` itself in full precision, else its bf16 rounding in `half`.
pub(crate) fn stage<'a, B: Backend, F: Real>(
    be: &B,
    src: &'a B::Buf<F>,
    half: Option<&'a mut B::Buf<bf16>>,
    len: usize,
) -> Result<OperandRef<'a, B, F>> {
    match half {
        None => Ok(OperandRef::Full(src)),
        Some(h) => {
            be.cast_to_bf16(src, h, len)?;
            Ok(OperandRef::Half(h))
        }
    }
}
