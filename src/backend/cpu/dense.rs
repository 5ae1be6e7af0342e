//! CPU dense ops: GEMM through OpenBLAS, casts, bias add and bias gradient, finiteness
//! check, axpy, and the activations (GELU, SwiGLU; their scalar math is in activation.rs).

use super::activation::{gelu_grad_scalar, gelu_scalar, silu_scalar, swiglu_grads_scalar};
use super::{Cpu, CpuBuf};
use crate::backend::ops::dense::*;
use crate::backend::{GeluKind, Gemm};
use crate::error::{Error, Result};
use crate::scalar::{Real, RealSlice, RealSliceMut};
use cblas::{Layout, Part, Transpose};
use half::bf16;
use rayon::prelude::*;
use std::sync::atomic::Ordering;

fn to_blas_dim(op: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(op, format!("dimension {v} exceeds the BLAS 32-bit limit")))
}

/// [`blas_gemm`] of bf16 operands widened to `F` (exactly): the CPU twin of cuBLAS's bf16
/// GemmEx. Allocates the widened copies: the CPU backend is a reference here, not a fast path.
fn widened_gemm<F: Real>(spec: &Gemm, a: &[bf16], b: &[bf16], c: &mut [F]) -> Result<()> {
    let (na, nb, _) = spec.required_lens();
    let wa: Vec<F> = a[..na].iter().map(|&v| F::from_bf16(v)).collect();
    let wb: Vec<F> = b[..nb].iter().map(|&v| F::from_bf16(v)).collect();
    blas_gemm(spec, &wa, &wb, c)
}

/// The BLAS product of a validated `spec` (see [`check_gemm`]).
fn blas_gemm<F: Real>(spec: &Gemm, a: &[F], b: &[F], c: &mut [F]) -> Result<()> {
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

/// [`DenseOps::gram_accumulate`] on validated buffers: two BLAS `?syrk` (row-major, upper).
fn blas_gram<F: Real>(g: &[F], out: usize, inp: usize, grams: &mut [F]) -> Result<()> {
    const OP: &str = "gram_accumulate";
    if out == 0 || inp == 0 {
        return Ok(());
    }
    let (o, i) = (to_blas_dim(OP, out)?, to_blas_dim(OP, inp)?);
    let (gram_out, rest) = grams.split_at_mut(out * out);
    let gram_in = &mut rest[..inp * inp];
    match (F::real_slice(&g[..out * inp]), F::real_slice_mut(gram_out)) {
        // SAFETY: g is (out, in) row-major with lda = in, gram_out (out, out) with ldc = out
        // (lengths checked by check_gram_accumulate); dimensions fit i32.
        (RealSlice::F32(g), RealSliceMut::F32(c)) => unsafe {
            cblas::ssyrk(Layout::RowMajor, Part::Upper, Transpose::None, o, i, 1.0, g, i, 1.0, c, o)
        },
        // SAFETY: as above.
        (RealSlice::F64(g), RealSliceMut::F64(c)) => unsafe {
            cblas::dsyrk(Layout::RowMajor, Part::Upper, Transpose::None, o, i, 1.0, g, i, 1.0, c, o)
        },
        _ => return Err(Error::UnsupportedDtype { op: OP, dtype: F::NAME, backend: "cpu" }),
    }
    match (F::real_slice(&g[..out * inp]), F::real_slice_mut(gram_in)) {
        // SAFETY: g^T g: g read as (out, in) with lda = in, transposed; gram_in (in, in), ldc = in.
        (RealSlice::F32(g), RealSliceMut::F32(c)) => unsafe {
            cblas::ssyrk(Layout::RowMajor, Part::Upper, Transpose::Ordinary, i, o, 1.0, g, i, 1.0, c, i)
        },
        // SAFETY: as above.
        (RealSlice::F64(g), RealSliceMut::F64(c)) => unsafe {
            cblas::dsyrk(Layout::RowMajor, Part::Upper, Transpose::Ordinary, i, o, 1.0, g, i, 1.0, c, i)
        },
        _ => return Err(Error::UnsupportedDtype { op: OP, dtype: F::NAME, backend: "cpu" }),
    }
    Ok(())
}

impl DenseOps for Cpu {
    fn gemm<F: Real>(&self, spec: &Gemm, a: &CpuBuf<F>, b: &CpuBuf<F>, c: &mut CpuBuf<F>) -> Result<()> {
        self.counters.gemm_calls.fetch_add(1, Ordering::Relaxed);
        check_gemm(self, spec, a, b, c)?;
        blas_gemm(spec, a, b, c)
    }

    /// Two OpenBLAS `?syrk` (row-major upper triangles), as the host `GramAccumulator` does.
    fn gram_accumulate<F: Real>(&self, g: &CpuBuf<F>, out: usize, inp: usize, grams: &mut CpuBuf<F>) -> Result<()> {
        check_gram_accumulate(self, g, out, inp, grams)?;
        blas_gram(g, out, inp, grams)
    }

    /// The CPU twin of cuBLAS's bf16 GemmEx: widen the operands to `F`, then an `F` GEMM.
    fn gemm_bf16<F: Real>(&self, spec: &Gemm, a: &CpuBuf<bf16>, b: &CpuBuf<bf16>, c: &mut CpuBuf<F>) -> Result<()> {
        self.counters.gemm_calls.fetch_add(1, Ordering::Relaxed);
        check_gemm(self, spec, a, b, c)?;
        widened_gemm(spec, a, b, c)
    }

    /// The CPU twin of cuBLAS's GemmEx with a bf16 C: the f32 product (C widened when read)
    /// rounded to bf16 once.
    fn gemm_bf16_out(&self, spec: &Gemm, a: &CpuBuf<bf16>, b: &CpuBuf<bf16>, c: &mut CpuBuf<bf16>) -> Result<()> {
        check_gemm_bf16_out(self, spec, a, b, c)?;
        self.counters.gemm_calls.fetch_add(1, Ordering::Relaxed);
        let nc = spec.required_lens().2;
        let mut wc: Vec<f32> = c[..nc].iter().map(|v| v.to_f32()).collect();
        widened_gemm(spec, a, b, &mut wc)?;
        // Elements the product did not write (the gaps of a strided C) keep their bits.
        for (d, &w) in c[..nc].iter_mut().zip(&wc) {
            if w.to_bits() != d.to_f32().to_bits() {
                *d = bf16::from_f32(w);
            }
        }
        Ok(())
    }

    fn cast_to_bf16<F: Real>(&self, src: &CpuBuf<F>, dst: &mut CpuBuf<bf16>, len: usize) -> Result<()> {
        check_cast(self, "cast_to_bf16", src, dst, len)?;
        dst[..len].par_iter_mut().zip(&src[..len]).for_each(|(d, &s)| *d = s.to_bf16());
        Ok(())
    }

    fn cast_from_bf16<F: Real>(&self, src: &CpuBuf<bf16>, dst: &mut CpuBuf<F>, len: usize) -> Result<()> {
        check_cast(self, "cast_from_bf16", src, dst, len)?;
        dst[..len].par_iter_mut().zip(&src[..len]).for_each(|(d, &s)| *d = F::from_bf16(s));
        Ok(())
    }

    fn cast_to_bf16_x4<F: Real>(
        &self,
        src: [&CpuBuf<F>; 4],
        dst: [&mut CpuBuf<bf16>; 4],
        len: [usize; 4],
    ) -> Result<()> {
        check_cast_x4(self, "cast_to_bf16_x4", src, [&*dst[0], &*dst[1], &*dst[2], &*dst[3]], len)?;
        for ((s, d), n) in src.into_iter().zip(dst).zip(len) {
            self.cast_to_bf16(s, d, n)?;
        }
        Ok(())
    }

    fn cast_from_bf16_x4<F: Real>(
        &self,
        src: [&CpuBuf<bf16>; 4],
        dst: [&mut CpuBuf<F>; 4],
        len: [usize; 4],
    ) -> Result<()> {
        check_cast_x4(self, "cast_from_bf16_x4", src, [&*dst[0], &*dst[1], &*dst[2], &*dst[3]], len)?;
        for ((s, d), n) in src.into_iter().zip(dst).zip(len) {
            self.cast_from_bf16(s, d, n)?;
        }
        Ok(())
    }

    fn add_bias<F: Real>(&self, y: &mut CpuBuf<F>, bias: &CpuBuf<F>, rows: usize, cols: usize) -> Result<()> {
        check_add_bias(self, [y, bias], rows, cols)?;
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
    fn bias_grad<F: Real>(&self, g: &CpuBuf<F>, rows: usize, cols: usize, db: &mut CpuBuf<F>, beta: F) -> Result<()> {
        check_bias_grad(self, g, rows, cols, db)?;
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

    fn count_nonfinite<F: Real>(&self, x: &CpuBuf<F>, len: usize) -> Result<(usize, usize)> {
        check_count_nonfinite(self, x, len)?;
        let count = x[..len].par_iter().filter(|v| !v.is_finite()).count();
        let first = if count == 0 { 0 } else { x[..len].iter().position(|v| !v.is_finite()).unwrap_or(0) };
        Ok((count, first))
    }

    fn assert_finite<F: Real>(&self, x: &CpuBuf<F>, len: usize, what: &str) -> Result<()> {
        check_reduce(self, "assert_finite", x, len)?;
        let (count, first_index) = self.count_nonfinite(x, len)?;
        if count > 0 {
            return Err(crate::Error::NonFinite { what: what.to_string(), count, first_index });
        }
        Ok(())
    }

    fn cast_to_bf16_checked<F: Real>(
        &self,
        src: &CpuBuf<F>,
        dst: &mut CpuBuf<bf16>,
        len: usize,
        what: &str,
    ) -> Result<()> {
        check_cast(self, "cast_to_bf16_checked", src, dst, len)?;
        self.assert_finite(src, len, what)?;
        self.cast_to_bf16(src, dst, len)
    }

    fn copy_checked<F: Real>(&self, src: &CpuBuf<F>, dst: &mut CpuBuf<F>, len: usize, what: &str) -> Result<()> {
        check_cast(self, "copy_checked", src, dst, len)?;
        self.assert_finite(src, len, what)?;
        dst[..len].copy_from_slice(&src[..len]);
        Ok(())
    }

    fn sum_to_host<F: Real>(&self, x: &CpuBuf<F>, len: usize) -> Result<f64> {
        check_reduce(self, "sum_to_host", x, len)?;
        Ok(x[..len].iter().map(|v| v.to_f64()).sum())
    }

    fn axpy<F: Real>(&self, alpha: F, x: &CpuBuf<F>, y: &mut CpuBuf<F>, len: usize) -> Result<()> {
        check_axpy(self, [x, y], len)?;
        y[..len].par_iter_mut().zip(&x[..len]).for_each(|(y, &x)| *y += alpha * x);
        Ok(())
    }

    fn gelu<F: Real>(&self, x: &CpuBuf<F>, y: &mut CpuBuf<F>, len: usize, kind: GeluKind) -> Result<()> {
        check_gelu(self, [x, y], len)?;
        y[..len].par_iter_mut().zip(&x[..len]).for_each(|(y, &x)| *y = gelu_scalar(x, kind));
        Ok(())
    }

    fn gelu_backward<F: Real>(
        &self,
        x: &CpuBuf<F>,
        dy: &CpuBuf<F>,
        dx: &mut CpuBuf<F>,
        len: usize,
        kind: GeluKind,
    ) -> Result<()> {
        check_gelu_backward(self, [x, dy, dx], len)?;
        dx[..len]
            .par_iter_mut()
            .zip(x[..len].par_iter().zip(&dy[..len]))
            .for_each(|(dx, (&x, &dy))| *dx = dy * gelu_grad_scalar(x, kind));
        Ok(())
    }

    fn swiglu<F: Real>(&self, gate: &CpuBuf<F>, up: &CpuBuf<F>, h: &mut CpuBuf<F>, len: usize) -> Result<()> {
        check_swiglu(self, [gate, up, h], len)?;
        h[..len]
            .par_iter_mut()
            .zip(gate[..len].par_iter().zip(&up[..len]))
            .for_each(|(h, (&g, &u))| *h = silu_scalar(g) * u);
        Ok(())
    }

    fn swiglu_backward<F: Real>(
        &self,
        gate: &CpuBuf<F>,
        up: &CpuBuf<F>,
        dh: &CpuBuf<F>,
        d_gate: &mut CpuBuf<F>,
        d_up: &mut CpuBuf<F>,
        len: usize,
    ) -> Result<()> {
        check_swiglu_backward(self, "swiglu_backward", [gate, up, dh, d_gate, d_up], len)?;
        write_swiglu_grads(&mut d_gate[..len], &mut d_up[..len], |i| (gate[i], up[i], dh[i]));
        Ok(())
    }

    fn swiglu_backward_checked<F: Real>(
        &self,
        gate: &CpuBuf<F>,
        up: &CpuBuf<F>,
        dh: &CpuBuf<F>,
        d_gate: &mut CpuBuf<F>,
        d_up: &mut CpuBuf<F>,
        len: usize,
        what: &str,
    ) -> Result<()> {
        check_swiglu_backward(self, "swiglu_backward_checked", [gate, up, dh, d_gate, d_up], len)?;
        write_swiglu_grads(&mut d_gate[..len], &mut d_up[..len], |i| (gate[i], up[i], dh[i]));
        pair_finite(len, what, |i| (d_gate[i], d_up[i]))
    }

    fn swiglu_backward_bf16_in_place<F: Real>(
        &self,
        gate_half: &mut CpuBuf<bf16>,
        up_half: &mut CpuBuf<bf16>,
        dh: &CpuBuf<F>,
        len: usize,
        what: &str,
    ) -> Result<()> {
        check_swiglu_backward_bf16_in_place(self, [gate_half, up_half], dh, len)?;
        // Checked before anything is written: the saves stay as they were on failure.
        pair_finite(len, what, |i| swiglu_grads_scalar(F::from_bf16(gate_half[i]), F::from_bf16(up_half[i]), dh[i]))?;
        gate_half[..len].par_iter_mut().zip(up_half[..len].par_iter_mut()).zip(&dh[..len]).for_each(|((g, u), &d)| {
            let (dg, du) = swiglu_grads_scalar(F::from_bf16(*g), F::from_bf16(*u), d);
            (*g, *u) = (dg.to_bf16(), du.to_bf16());
        });
        Ok(())
    }

    fn swiglu_save_bf16<F: Real>(
        &self,
        gate: &CpuBuf<F>,
        up: &CpuBuf<F>,
        h: &mut CpuBuf<F>,
        gate_half: &mut CpuBuf<bf16>,
        up_half: &mut CpuBuf<bf16>,
        len: usize,
    ) -> Result<()> {
        check_swiglu_save_bf16(self, [gate, up, h], [gate_half, up_half], len)?;
        h[..len].par_iter_mut().zip(gate_half[..len].par_iter_mut().zip(&mut up_half[..len])).enumerate().for_each(
            |(i, (h, (gh, uh)))| {
                let (g, u) = (gate[i], up[i]);
                *h = silu_scalar(g) * u;
                *gh = g.to_bf16();
                *uh = u.to_bf16();
            },
        );
        Ok(())
    }

    fn swiglu_backward_bf16<F: Real>(
        &self,
        gate_half: &CpuBuf<bf16>,
        up_half: &CpuBuf<bf16>,
        dh: &CpuBuf<F>,
        d_gate: &mut CpuBuf<F>,
        d_up: &mut CpuBuf<F>,
        len: usize,
    ) -> Result<()> {
        check_swiglu_backward_bf16(self, [gate_half, up_half], [dh, d_gate, d_up], len)?;
        write_swiglu_grads(&mut d_gate[..len], &mut d_up[..len], |i| {
            (F::from_bf16(gate_half[i]), F::from_bf16(up_half[i]), dh[i])
        });
        Ok(())
    }
}

/// One finiteness check over the pairs `pair(0..len)`, as the fused SwiGLU backward checks
/// its two outputs: the count over both, the first index the smallest with either not
/// finite.
fn pair_finite<F: Real>(len: usize, what: &str, pair: impl Fn(usize) -> (F, F) + Sync) -> Result<()> {
    let bad = |i: usize| {
        let (a, b) = pair(i);
        usize::from(!a.is_finite()) + usize::from(!b.is_finite())
    };
    let count: usize = (0..len).into_par_iter().map(bad).sum();
    if count == 0 {
        return Ok(());
    }
    let first_index = (0..len).find(|&i| bad(i) > 0).unwrap_or(0);
    Err(crate::Error::NonFinite { what: what.to_string(), count, first_index })
}

/// `(d_gate[i], d_up[i])` of the SwiGLU backward from `inputs(i) = (gate, up, dh)`.
fn write_swiglu_grads<F: Real>(d_gate: &mut [F], d_up: &mut [F], inputs: impl Fn(usize) -> (F, F, F) + Sync) {
    d_gate.par_iter_mut().zip(d_up.par_iter_mut()).enumerate().for_each(|(i, (dg, du))| {
        let (g, u, d) = inputs(i);
        (*dg, *du) = swiglu_grads_scalar(g, u, d);
    });
}
