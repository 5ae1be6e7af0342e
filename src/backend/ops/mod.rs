//! The op set, one trait per family: dense (GEMM, casts, bias, activations), transformer
//! (RMSNorm, rotary embedding, causal softmax, cross-entropy), encoder (LayerNorm, masked
//! softmax, pooling), attention (fused, forward and backward), sparse (sparse-by-dense gathers and COO helpers), top-k and optimizer
//! ops. [`crate::backend::Backend`] is all of them together with the memory ops.
//!
//! Each op has one contract here: its signature and documentation (a trait method) and its
//! argument checks (a `check_*` validator beside the trait). Both backends call the validator
//! before any work, so a bad length, shape or range is the same error on every backend.
//! Checks that read the data itself (indices, targets) stay with the backend that can read
//! it: the CPU on the host, the CUDA kernels on the device (see `backend::cuda`).

pub(super) mod attention;
pub(super) mod dense;
pub(super) mod encoder;
pub(super) mod optim;
pub(super) mod sparse;
pub(super) mod topk;
pub(super) mod transformer;

use super::{Backend, Buffers, Coo};
use crate::error::{check_len, checked_mul, Result};
use crate::scalar::Elem;

/// An op's output in the master precision `F`, or only its bf16 rounding (to nearest even)
/// where the output's one use is as a bf16 GEMM operand.
pub enum OutBuf<'a, B: Buffers, F: Elem> {
    Full(&'a mut B::Buf<F>),
    Half(&'a mut B::Buf<half::bf16>),
}

impl<B: Backend, F: Elem> OutBuf<'_, B, F> {
    /// Entries the buffer holds, whichever precision it is in.
    pub fn len(&self, be: &B) -> usize {
        match self {
            OutBuf::Full(b) => be.len(b),
            OutBuf::Half(b) => be.len(b),
        }
    }
}

/// Checks that each buffer `(what, len, needed)` holds at least `needed` entries, in order.
pub(crate) fn check_lens(op: &'static str, lens: &[(&str, usize, usize)]) -> Result<()> {
    lens.iter().try_for_each(|&(what, len, needed)| check_len(op, what, len, needed))
}

/// The same for an op's run of same-typed buffers, passed in its argument order: `bufs[i]`
/// holds at least `needed[i]` entries and is called `names[i]` in the error.
pub(crate) fn check_bufs<B: Backend, T: Elem, const N: usize>(
    be: &B,
    op: &'static str,
    names: [&str; N],
    bufs: [&B::Buf<T>; N],
    needed: [usize; N],
) -> Result<()> {
    names.into_iter().zip(bufs).zip(needed).try_for_each(|((what, buf), need)| check_len(op, what, be.len(buf), need))
}

/// Checks a COO list's buffers hold its `len` entries; returns the size of its matrix.
pub(crate) fn check_coo<B: Backend, F: Elem>(be: &B, op: &'static str, coo: &Coo<B, F>) -> Result<usize> {
    check_len(op, "coo.rows", be.len(&coo.rows), coo.len)?;
    check_len(op, "coo.cols", be.len(&coo.cols), coo.len)?;
    check_len(op, "coo.values", be.len(&coo.values), coo.len)?;
    checked_mul(op, coo.shape.0, coo.shape.1)
}
