//! The dense linear algebra behind the basis: the symmetric eigensolve of a Gram matrix
//! (`dsyevd`), the SVD of an unfolding (`sgesdd`, the reference route), the orthogonality
//! measure `max |M^T M - I|`, and the layout helpers that turn LAPACK's column-major
//! output into our row-major matrices with descending columns and the sign convention.

use crate::error::{ensure_finite, Error, Result};
use cblas::{Layout, Transpose};

/// Converts a dimension to LAPACK/BLAS's 32-bit integer, or says which limit it broke.
pub(super) fn blas_dim(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(op, format!("{what} = {v} exceeds the 32-bit BLAS/LAPACK limit")))
}

/// `Vec` of `len` copies of `v`, reporting an allocation failure instead of aborting.
pub(super) fn try_vec<T: Clone>(op: &'static str, what: &str, len: usize, v: T) -> Result<Vec<T>> {
    let mut out = Vec::new();
    out.try_reserve_exact(len).map_err(|_| Error::invalid(op, format!("cannot allocate {len} elements for {what}")))?;
    out.resize(len, v);
    Ok(out)
}

/// Row-major `dst (cols, rows)` = transpose of row-major `src (rows, cols)`, in tiles so
/// both sides stay in cache (the matrices here reach 3072^2 and beyond).
pub(super) fn transpose_into<S: Copy, D>(src: &[S], rows: usize, cols: usize, dst: &mut [D], conv: impl Fn(S) -> D) {
    const TILE: usize = 64;
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    dst[c * rows + r] = conv(src[r * cols + c]);
                }
            }
        }
    }
}

/// Flips columns of the row-major `(n, n)` matrix `p` so that in each column the entry
/// of largest magnitude (the first one on ties) is positive. Decided on the stored f32
/// values, so the convention holds exactly for what callers see; negation is exact.
pub(super) fn apply_sign_convention(p: &mut [f32], n: usize) {
    // One row-major pass tracking every column's running maximum (strict `>` keeps the
    // first of equal magnitudes), instead of n strided column walks.
    let mut best = vec![0.0f32; n];
    let mut negative = vec![false; n];
    for row in p.chunks_exact(n) {
        for (j, &v) in row.iter().enumerate() {
            if v.abs() > best[j] {
                best[j] = v.abs();
                negative[j] = v < 0.0;
            }
        }
    }
    for row in p.chunks_exact_mut(n) {
        for (v, &neg) in row.iter_mut().zip(&negative) {
            if neg {
                *v = -*v;
            }
        }
    }
}

/// Workspace sizes `dsyevd` is given for order `n` (f64 words, i32 words): the larger of
/// its own query and the documented minimum `1 + 6n + 2n^2` / `3 + 5n`, because
/// OpenBLAS's query has been seen to under-report.
pub(super) fn syevd_workspace(n: usize) -> Result<(usize, usize)> {
    let op = "dsyevd";
    let ni = blas_dim(op, "matrix order", n)?;
    let min_work = n
        .checked_mul(n)
        .and_then(|n2| n2.checked_mul(2))
        .and_then(|v| v.checked_add(1 + 6 * n))
        .ok_or_else(|| Error::invalid(op, format!("workspace for order {n} overflows")))?;
    blas_dim(op, "workspace (1 + 6n + 2n^2)", min_work)?;
    let min_iwork = 3 + 5 * n;
    let (mut work, mut iwork, mut info) = ([0.0f64; 1], [0i32; 1], 0i32);
    let mut a = [0.0f64; 1];
    let mut w = [0.0f64; 1];
    // SAFETY: lwork = liwork = -1 is a workspace query: LAPACK writes only work[0] and
    // iwork[0] and reads no matrix entries.
    unsafe { lapack::dsyevd(b'V', b'L', ni, &mut a, ni.max(1), &mut w, &mut work, -1, &mut iwork, -1, &mut info) };
    if info != 0 {
        return Err(Error::Lapack { routine: "dsyevd (workspace query)", info });
    }
    let queried = if work[0].is_finite() && work[0] > 0.0 { work[0].ceil() as usize } else { 0 };
    let lwork = min_work.max(queried);
    let liwork = min_iwork.max(usize::try_from(iwork[0]).unwrap_or(0));
    blas_dim(op, "workspace", lwork)?;
    blas_dim(op, "integer workspace", liwork)?;
    Ok((lwork, liwork))
}

/// Eigen-decomposition of the symmetric `(n, n)` matrix whose row-major UPPER triangle is
/// in `upper` (the strictly lower part is ignored). Returns the row-major orthogonal
/// matrix with eigenvector `j` in column `j`, ordered by descending eigenvalue, with the
/// sign convention applied, and `sqrt(max(eigenvalue, 0))` in the same order.
///
/// Solved in f64 and rounded to f32 afterwards: `ssyevd`'s eigenvectors are orthogonal
/// only to about `n * 2^-24` (2e-4 at n = 3072, past the [`super::ORTHO_TOL`] check),
/// while f64 vectors rounded to f32 deviate by about `sqrt(n) * 2^-24`.
pub(super) fn sym_eig_desc(mut upper: Vec<f64>, n: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let op = "dsyevd";
    if upper.len() != n * n {
        return Err(Error::shape(op, "symmetric matrix", n * n, upper.len()));
    }
    if n == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    let ni = blas_dim(op, "matrix order", n)?;
    let (lwork, liwork) = syevd_workspace(n)?;
    let mut work = try_vec(op, "workspace", lwork, 0.0f64)?;
    let mut iwork = try_vec(op, "integer workspace", liwork, 0i32)?;
    let mut w = vec![0.0f64; n];
    let mut info = 0i32;
    // A row-major upper triangle is the column-major lower triangle of the same memory,
    // hence uplo = 'L'.
    // SAFETY: `upper` holds n*n entries with lda = n, `w` n entries, and the workspaces
    // are at least the documented minimum for order n (checked to fit i32 above).
    unsafe {
        lapack::dsyevd(
            b'V',
            b'L',
            ni,
            &mut upper,
            ni,
            &mut w,
            &mut work,
            lwork as i32,
            &mut iwork,
            liwork as i32,
            &mut info,
        )
    };
    drop(work);
    drop(iwork);
    if info != 0 {
        return Err(Error::Lapack { routine: "dsyevd", info });
    }
    ensure_finite("Gram eigenvalues", w.iter().copied())?;
    // `upper` now holds eigenvectors as columns of a column-major matrix, ascending:
    // memory row c is eigenvector c. Row-major P with eigenvector j in column j is its
    // transpose; descending order reverses the columns.
    let mut p = try_vec(op, "eigenvectors", n * n, 0.0f32)?;
    transpose_into(&upper, n, n, &mut p, |v| v as f32);
    drop(upper);
    for row in p.chunks_exact_mut(n) {
        row.reverse();
    }
    apply_sign_convention(&mut p, n);
    let sigma = w.iter().rev().map(|&e| e.max(0.0).sqrt() as f32).collect();
    Ok((p, sigma))
}

/// Workspace (f32 words) and integer workspace `sgesdd` is given for an `(m, n)` matrix
/// and `jobz`: the larger of its own query (rounded up, as an f32 may round it down) and
/// the documented minimum.
pub(super) fn gesdd_workspace(m: usize, n: usize, jobz: u8) -> Result<(usize, usize)> {
    let op = "sgesdd";
    let (mi, ni) = (blas_dim(op, "rows", m)?, blas_dim(op, "columns", n)?);
    let (mn, mx) = (m.min(n), m.max(n));
    let min_work = if jobz == b'O' { 3 * mn + mx.max(5 * mn * mn + 4 * mn) } else { 4 * mn * mn + 6 * mn + mx };
    let (ldu, ldvt) = (mi.max(1), if jobz == b'O' { 1 } else { ni.max(1) });
    let (mut a, mut s, mut u, mut vt, mut work) = ([0.0f32; 1], [0.0f32; 1], [0.0f32; 1], [0.0f32; 1], [0.0f32; 1]);
    let (mut iwork, mut info) = ([0i32; 1], 0i32);
    // SAFETY: lwork = -1 is a workspace query: only work[0] is written, no array is read.
    unsafe {
        lapack::sgesdd(
            jobz,
            mi,
            ni,
            &mut a,
            mi.max(1),
            &mut s,
            &mut u,
            ldu,
            &mut vt,
            ldvt,
            &mut work,
            -1,
            &mut iwork,
            &mut info,
        )
    };
    if info != 0 {
        return Err(Error::Lapack { routine: "sgesdd (workspace query)", info });
    }
    let queried =
        if work[0].is_finite() && work[0] > 0.0 { (work[0] as f64 * (1.0 + 1e-6)).ceil() as usize } else { 0 };
    let lwork = min_work.max(queried);
    blas_dim(op, "workspace", lwork)?;
    Ok((lwork, 8 * mn))
}

/// Left singular vectors and singular values of the column-major `(m, n)` matrix `a`
/// (destroyed). Returns the full row-major `(m, m)` U (columns by descending singular
/// value, sign convention applied) and `m` singular values, zero-padded past min(m, n).
pub(super) fn svd_left(mut a: Vec<f32>, m: usize, n: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let op = "sgesdd";
    if a.len() != m * n {
        return Err(Error::shape(op, "unfolding", m * n, a.len()));
    }
    if m == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    // LP64 LAPACK indexes the matrix with 32-bit integers.
    blas_dim(op, "unfolding entries", m * n)?;
    let (mi, ni) = (blas_dim(op, "rows", m)?, blas_dim(op, "columns", n)?);
    // Wide: 'O' returns all of U and overwrites `a` with V^T, so no second m*n buffer.
    // Tall or square: 'O' would put only n columns of U into `a`; 'A' gives all m (V^T
    // is then n*n, small).
    let jobz = if m < n { b'O' } else { b'A' };
    let (lwork, liwork) = gesdd_workspace(m, n, jobz)?;
    let mut work = try_vec(op, "workspace", lwork, 0.0f32)?;
    let mut iwork = try_vec(op, "integer workspace", liwork, 0i32)?;
    let mut u = try_vec(op, "left singular vectors", m * m, 0.0f32)?;
    let mut s = vec![0.0f32; m.min(n)];
    let vt_len = if jobz == b'O' { 1 } else { n * n };
    let mut vt = try_vec(op, "right singular vectors", vt_len, 0.0f32)?;
    let ldvt = if jobz == b'O' { 1 } else { ni.max(1) };
    let mut info = 0i32;
    // SAFETY: a is m*n with lda = m, u is m*m with ldu = m, vt is n*n (or unreferenced for
    // 'O' with m < n), s has min(m, n) entries, and the workspaces are at least the
    // documented minimum for this jobz.
    unsafe {
        lapack::sgesdd(
            jobz,
            mi,
            ni,
            &mut a,
            mi,
            &mut s,
            &mut u,
            mi,
            &mut vt,
            ldvt,
            &mut work,
            lwork as i32,
            &mut iwork,
            &mut info,
        )
    };
    if info != 0 {
        return Err(Error::Lapack { routine: "sgesdd", info });
    }
    drop((a, work, iwork, vt));
    // Column-major U (vector j in memory row j) -> row-major with vector j in column j;
    // gesdd already orders singular values descending.
    let mut p = try_vec(op, "left singular vectors", m * m, 0.0f32)?;
    transpose_into(&u, m, m, &mut p, |v| v);
    apply_sign_convention(&mut p, m);
    s.resize(m, 0.0);
    Ok((p, s))
}

/// `max |M^T M - I|` over all entries of the row-major `(n, n)` matrix `m` and where it
/// occurs. Computed in f64 from exact f64 copies of the f32 entries (each product is exact
/// in f64), so the measure itself is accurate to ~n * 2^-53, far below any tolerance.
/// Column panels of `M^T M` keep the extra memory at n^2 f64 + n * panel.
pub(super) fn max_orthogonality_deviation(m: &[f32], n: usize) -> Result<(f64, usize, usize)> {
    let op = "check_orthogonal";
    if n == 0 {
        return Ok((0.0, 0, 0));
    }
    let ni = blas_dim(op, "matrix order", n)?;
    let mut m64 = try_vec(op, "f64 copy", n * n, 0.0f64)?;
    m64.iter_mut().zip(m).for_each(|(d, &s)| *d = s as f64);
    const PANEL: usize = 256;
    let mut c = try_vec(op, "panel", n * PANEL.min(n), 0.0f64)?;
    let mut worst = (0.0f64, 0usize, 0usize);
    for j0 in (0..n).step_by(PANEL) {
        let jb = PANEL.min(n - j0);
        // Symmetry: rows 0..j0+jb of the panel cover every i <= j.
        let rows = j0 + jb;
        // SAFETY: A = M[:, 0..rows] (lda = n) lies within n*n; B = M[:, j0..j0+jb]
        // starts at offset j0 with ldb = n and ends within n*n; C is rows*jb <= n*PANEL.
        unsafe {
            cblas::dgemm(
                Layout::RowMajor,
                Transpose::Ordinary,
                Transpose::None,
                rows as i32,
                jb as i32,
                ni,
                1.0,
                &m64,
                ni,
                &m64[j0..],
                ni,
                0.0,
                &mut c,
                jb as i32,
            )
        };
        for i in 0..rows {
            for jj in 0..jb {
                let j = j0 + jj;
                if i > j {
                    continue;
                }
                let target = if i == j { 1.0 } else { 0.0 };
                let dev = (c[i * jb + jj] - target).abs();
                // NaN counts as the worst (inputs are checked finite, but stay safe).
                if dev.is_nan() || dev > worst.0 {
                    worst = (dev, i, j);
                }
            }
        }
    }
    Ok(worst)
}
