//! CPU dense ops: GEMM through OpenBLAS, casts, bias add and bias gradient, finiteness
//! check, axpy.

use crate::backend::Gemm;
use crate::error::{check_len, Error, Result};
use crate::scalar::{Real, RealSlice, RealSliceMut};
use cblas::{Layout, Transpose};
use half::bf16;
use rayon::prelude::*;

fn to_blas_dim(op: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(op, format!("dimension {v} exceeds the BLAS 32-bit limit")))
}

pub(super) fn gemm<F: Real>(spec: &Gemm, a: &[F], b: &[F], c: &mut [F]) -> Result<()> {
    spec.validate(a.len(), b.len(), c.len())?;
    if spec.m == 0 || spec.n == 0 || spec.batch == 0 {
        return Ok(());
    }
    let (m, n, k) = (to_blas_dim("gemm", spec.m)?, to_blas_dim("gemm", spec.n)?, to_blas_dim("gemm", spec.k)?);
    let (lda, ldb, ldc) =
        (to_blas_dim("gemm", spec.lda)?, to_blas_dim("gemm", spec.ldb)?, to_blas_dim("gemm", spec.ldc)?);
    let ta = if spec.trans_a { Transpose::Ordinary } else { Transpose::None };
    let tb = if spec.trans_b { Transpose::Ordinary } else { Transpose::None };
    for batch in 0..spec.batch {
        let oa = spec.offset_a + batch * spec.stride_a;
        let ob = spec.offset_b + batch * spec.stride_b;
        let oc = spec.offset_c + batch * spec.stride_c;
        if spec.k == 0 {
            // BLAS leaves C untouched when k = 0 only if beta = 1; make it explicit.
            for r in 0..spec.m {
                let row = &mut c[oc + r * spec.ldc..oc + r * spec.ldc + spec.n];
                let beta = F::from_f64(spec.beta as f64);
                row.iter_mut().for_each(|v| *v = if spec.beta == 0.0 { F::ZERO } else { beta * *v });
            }
            continue;
        }
        match (F::real_slice(&a[oa..]), F::real_slice(&b[ob..]), F::real_slice_mut(&mut c[oc..])) {
            // SAFETY: `spec.validate` checked every index the product touches lies in bounds.
            (RealSlice::F32(a), RealSlice::F32(b), RealSliceMut::F32(c)) => unsafe {
                cblas::sgemm(Layout::RowMajor, ta, tb, m, n, k, spec.alpha, a, lda, b, ldb, spec.beta, c, ldc)
            },
            // SAFETY: as above.
            (RealSlice::F64(a), RealSlice::F64(b), RealSliceMut::F64(c)) => unsafe {
                cblas::dgemm(
                    Layout::RowMajor,
                    ta,
                    tb,
                    m,
                    n,
                    k,
                    spec.alpha as f64,
                    a,
                    lda,
                    b,
                    ldb,
                    spec.beta as f64,
                    c,
                    ldc,
                )
            },
            _ => return Err(Error::UnsupportedDtype { op: "gemm", dtype: F::NAME, backend: "cpu" }),
        }
    }
    Ok(())
}

/// The CPU twin of cuBLAS's bf16 GemmEx: widen the operands to `F`, then an `F` GEMM.
/// Allocates the widened copies: the CPU backend is a reference here, not a fast path.
pub(super) fn gemm_bf16<F: Real>(spec: &Gemm, a: &[bf16], b: &[bf16], c: &mut [F]) -> Result<()> {
    spec.validate(a.len(), b.len(), c.len())?;
    let (na, nb, _) = spec.required_lens();
    let wa: Vec<F> = a[..na].iter().map(|&v| F::from_bf16(v)).collect();
    let wb: Vec<F> = b[..nb].iter().map(|&v| F::from_bf16(v)).collect();
    gemm(spec, &wa, &wb, c)
}

pub(super) fn cast_to_bf16<F: Real>(src: &[F], dst: &mut [bf16], len: usize) -> Result<()> {
    check_len("cast_to_bf16", "source", src.len(), len)?;
    check_len("cast_to_bf16", "destination", dst.len(), len)?;
    dst[..len].par_iter_mut().zip(&src[..len]).for_each(|(d, &s)| *d = s.to_bf16());
    Ok(())
}

pub(super) fn cast_from_bf16<F: Real>(src: &[bf16], dst: &mut [F], len: usize) -> Result<()> {
    check_len("cast_from_bf16", "source", src.len(), len)?;
    check_len("cast_from_bf16", "destination", dst.len(), len)?;
    dst[..len].par_iter_mut().zip(&src[..len]).for_each(|(d, &s)| *d = F::from_bf16(s));
    Ok(())
}

pub(super) fn add_bias<F: Real>(y: &mut [F], bias: &[F], rows: usize, cols: usize) -> Result<()> {
    check_len("add_bias", "y", y.len(), rows * cols)?;
    check_len("add_bias", "bias", bias.len(), cols)?;
    if cols == 0 {
        return Ok(());
    }
    y[..rows * cols].par_chunks_mut(cols).for_each(|row| {
        row.iter_mut().zip(&bias[..cols]).for_each(|(v, &b)| *v += b);
    });
    Ok(())
}

/// Column sums, each column summed over rows in order (the GPU sums in a different
/// order; tests compare with a tolerance).
pub(super) fn bias_grad<F: Real>(g: &[F], rows: usize, cols: usize, db: &mut [F], beta: F) -> Result<()> {
    check_len("bias_grad", "g", g.len(), rows * cols)?;
    check_len("bias_grad", "db", db.len(), cols)?;
    const CHUNK: usize = 64;
    db[..cols].par_chunks_mut(CHUNK).enumerate().for_each(|(chunk, out)| {
        let c0 = chunk * CHUNK;
        let mut acc = vec![F::ZERO; out.len()];
        for r in 0..rows {
            let row = &g[r * cols + c0..r * cols + c0 + out.len()];
            acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v);
        }
        out.iter_mut().zip(acc).for_each(|(o, a)| *o = if beta == F::ZERO { a } else { beta * *o + a });
    });
    Ok(())
}

pub(super) fn count_nonfinite<F: Real>(x: &[F], len: usize) -> Result<(usize, usize)> {
    check_len("count_nonfinite", "x", x.len(), len)?;
    let count = x[..len].par_iter().filter(|v| !v.is_finite()).count();
    let first = if count == 0 { 0 } else { x[..len].iter().position(|v| !v.is_finite()).unwrap_or(0) };
    Ok((count, first))
}

pub(super) fn axpy<F: Real>(alpha: F, x: &[F], y: &mut [F], len: usize) -> Result<()> {
    check_len("axpy", "x", x.len(), len)?;
    check_len("axpy", "y", y.len(), len)?;
    y[..len].par_iter_mut().zip(&x[..len]).for_each(|(y, &x)| *y += alpha * x);
    Ok(())
}
