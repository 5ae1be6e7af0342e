//! How sparse gradients are in a basis, and the reference basis computed the official way.
//!
//! [`direct_svd_basis`] computes the same factors the official way (`sgesdd` of both
//! unfoldings); tests and the benchmark use it as the reference.

use super::linalg::{self, blas_dim, try_vec};
use super::Basis;
use crate::error::{ensure_finite, Error, Result};
use cblas::{Layout, Transpose};

/// How much of each gradient's energy its top-k entries hold, before and after the basis.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SparsityReport {
    pub k: usize,
    /// Entries per gradient (`out * in`).
    pub total: usize,
    /// Mean over gradients of `sum of top-k g^2 / ||G||_F^2` in the original space.
    pub original_fraction: f64,
    /// The same for `P^T G Q`.
    pub transformed_fraction: f64,
}

/// For each gradient G `(out, in)` of the `[n, out, in]` batch: the fraction of
/// `||G||_F^2` held by its top-k entries by magnitude, in the original space and in the
/// transformed space `P^T G Q`; averaged over the gradients. All-zero gradients carry no
/// energy to split and are left out of the average (an error if every one is zero).
pub fn sparsity_report(grads: &[f32], n: usize, basis: &Basis, k: usize) -> Result<SparsityReport> {
    let op = "sparsity_report";
    basis.check_shapes(op)?;
    let (out, inp) = (basis.out, basis.inp);
    let total = out.checked_mul(inp).ok_or_else(|| Error::invalid(op, "out * in overflows"))?;
    let expected = total.checked_mul(n).ok_or_else(|| Error::invalid(op, "n * out * in overflows"))?;
    if grads.len() != expected || n == 0 {
        return Err(Error::shape(
            op,
            "gradient batch",
            format!("n >= 1 gradients of {out} x {inp}"),
            format!("{} values, n = {n}", grads.len()),
        ));
    }
    if k == 0 || k > total {
        return Err(Error::invalid(op, format!("k = {k} must be in 1..={total}")));
    }
    ensure_finite("gradient", grads.iter().copied())?;
    let (o, i) = (blas_dim(op, "out", out)?, blas_dim(op, "in", inp)?);
    let mut tmp = try_vec(op, "P^T G", total, 0.0f32)?;
    let mut gt = try_vec(op, "P^T G Q", total, 0.0f32)?;
    let mut scratch = Vec::with_capacity(total);
    let (mut sum_orig, mut sum_tr, mut used) = (0.0f64, 0.0f64, 0usize);
    for g in grads.chunks_exact(total) {
        // SAFETY: P is out*out (check_shapes), G and tmp are out*in, Q is in*in, all
        // row-major with the leading dimensions given; dims fit i32.
        unsafe {
            cblas::sgemm(
                Layout::RowMajor,
                Transpose::Ordinary,
                Transpose::None,
                o,
                i,
                o,
                1.0,
                &basis.p,
                o,
                g,
                i,
                0.0,
                &mut tmp,
                i,
            );
            cblas::sgemm(
                Layout::RowMajor,
                Transpose::None,
                Transpose::None,
                o,
                i,
                i,
                1.0,
                &tmp,
                i,
                &basis.q,
                i,
                0.0,
                &mut gt,
                i,
            );
        }
        let Some(f_orig) = topk_energy(g, k, &mut scratch) else { continue };
        // An orthogonal transform keeps the norm, so a nonzero G has a nonzero P^T G Q.
        let f_tr = topk_energy(&gt, k, &mut scratch).unwrap_or(0.0);
        sum_orig += f_orig;
        sum_tr += f_tr;
        used += 1;
    }
    if used == 0 {
        return Err(Error::invalid(op, "every gradient is all zeros: no energy to measure"));
    }
    Ok(SparsityReport {
        k,
        total,
        original_fraction: sum_orig / used as f64,
        transformed_fraction: sum_tr / used as f64,
    })
}

/// [`sparsity_report`] of several gradient sets, each in its own basis (the layers of a
/// model, say: each `grads` holds whole `(out, in)` gradients of one layer, concatenated),
/// averaged with equal weight per set; empty sets are skipped. `None` when every set is
/// empty. The premise the recipes and examples print.
pub fn mean_sparsity_report<'a>(
    sets: impl IntoIterator<Item = (&'a [f32], &'a Basis)>,
    k: usize,
) -> Result<Option<SparsityReport>> {
    let (mut orig, mut tr, mut used, mut last) = (0.0f64, 0.0f64, 0usize, None);
    for (grads, basis) in sets {
        let total = basis.out.checked_mul(basis.inp).filter(|&t| t > 0);
        let n = total.map_or(0, |t| grads.len() / t);
        if grads.is_empty() {
            continue;
        }
        let r = sparsity_report(grads, n, basis, k)?;
        orig += r.original_fraction;
        tr += r.transformed_fraction;
        used += 1;
        last = Some(r);
    }
    Ok(last.map(|r| SparsityReport {
        original_fraction: orig / used as f64,
        transformed_fraction: tr / used as f64,
        ..r
    }))
}

/// Fraction of `sum v^2` in the k largest `v^2`; `None` when the sum is zero.
fn topk_energy(v: &[f32], k: usize, scratch: &mut Vec<f64>) -> Option<f64> {
    scratch.clear();
    scratch.extend(v.iter().map(|&x| (x as f64) * (x as f64)));
    let total: f64 = scratch.iter().sum();
    if total <= 0.0 {
        return None;
    }
    if k < scratch.len() {
        scratch.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    }
    Some(scratch[..k].iter().sum::<f64>() / total)
}

/// The reference route, as the official code does it: `sgesdd` of the mode-1 unfolding
/// `(out, in N)` for P and of the mode-2 unfolding `(in, out N)` for Q, with the same
/// ordering and sign convention as
/// [`GramAccumulator::basis`](crate::basis::GramAccumulator::basis). Holds one f32 copy of
/// the whole tensor at a time plus LAPACK workspace; the unfolding must have < 2^31 entries.
pub fn direct_svd_basis(grads: &[f32], n: usize, out: usize, inp: usize, group: &str) -> Result<Basis> {
    let op = "direct_svd_basis";
    if n == 0 || out == 0 || inp == 0 {
        return Err(Error::invalid(
            op,
            format!("need n >= 1 gradients of a non-empty shape, got n = {n}, ({out}, {inp})"),
        ));
    }
    let per = out.checked_mul(inp).ok_or_else(|| Error::invalid(op, "out * in overflows"))?;
    let len = per.checked_mul(n).ok_or_else(|| Error::invalid(op, "n * out * in overflows"))?;
    if grads.len() != len {
        return Err(Error::shape(op, "gradient batch", format!("{n} x {out} x {inp} = {len}"), grads.len()));
    }
    ensure_finite("gradient", grads.iter().copied())?;
    // Mode 1: column-major (out, in N) has each G_n transposed into place. Column order
    // does not change left singular vectors, so (n, in) column blocks are fine.
    let mut m1 = try_vec(op, "mode-1 unfolding", len, 0.0f32)?;
    for (src, dst) in grads.chunks_exact(per).zip(m1.chunks_exact_mut(per)) {
        linalg::transpose_into(src, out, inp, dst, |v| v);
    }
    let (p, sigma_out) = linalg::svd_left(m1, out, inp * n)?;
    // Mode 2: the row-major [n, out, in] buffer already is the column-major (in, out N)
    // unfolding; gesdd destroys its input, hence the copy.
    let mut m2 = try_vec(op, "mode-2 unfolding", 0, 0.0f32)?;
    m2.try_reserve_exact(len).map_err(|_| Error::invalid(op, "cannot allocate the mode-2 unfolding"))?;
    m2.extend_from_slice(grads);
    let (q, sigma_in) = linalg::svd_left(m2, inp, out * n)?;
    Ok(Basis { group: group.to_string(), out, inp, p, q, sigma_out, sigma_in, n_grads: n as u64 })
}

/// Bytes LAPACK `sgesdd` holds for an `(m, cols)` unfolding in [`direct_svd_basis`], besides
/// the unfolding itself: U, the singular values, V^T (only in the tall case) and workspaces.
pub fn direct_svd_bytes(m: usize, cols: usize) -> Result<usize> {
    let jobz = if m < cols { b'O' } else { b'A' };
    let (lwork, liwork) = linalg::gesdd_workspace(m, cols, jobz)?;
    let vt = if jobz == b'O' { 0 } else { cols * cols * 4 };
    Ok(m * m * 4 + m.min(cols) * 4 + vt + lwork * 4 + liwork * 4)
}
