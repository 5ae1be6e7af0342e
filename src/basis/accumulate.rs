//! # Streaming and precision
//!
//! [`GramAccumulator`] holds the two Grams in **f64** and never the gradients, so memory is
//! `12 (out^2 + in^2)` bytes whatever N is (f64 sums plus an f32 scratch), and the
//! eigensolve needs about `24 n^2` bytes more for the larger order n.
//!
//! Each gradient's products `G G^T` and `G^T G` are formed in **f32** by OpenBLAS `ssyrk`
//! (upper triangle only, half the flops of a GEMM; SIMD units do twice as many f32 as f64
//! FMAs) into an f32 scratch that holds at most [`MAX_F32_DEPTH`] products per entry (a few
//! gradients; `add_batch` turns them into one `ssyrk` for `G^T G`: the stacked
//! `[G_1; G_2; ...]` is the contiguous batch), then the scratch is added into the f64 sums.
//!
//! Error argument: an f32 dot product of depth k has error at most `k u |g_i| |g_j|`
//! (u = 2^-24), typically `sqrt(k) u`, and the inputs themselves carry relative error u, so
//! the product error is within ~100x of the data's own and does not grow with N: the f64
//! sum over N chunks adds only `N 2^-53`. An f32 running sum would instead grow its error
//! with N (and cancel small updates once the sum is large). The cost of the f64 route is
//! one read-add-write of the triangles per chunk, a few percent of the `ssyrk` time at
//! 768 x 3072.
//!
//! # Eigensolve
//!
//! LAPACK `dsyevd` (jobz = 'V') on the f64 Grams; vectors are rounded to f32 afterwards.
//! f64 because `ssyevd`'s vectors are only guaranteed orthogonal to ~`n 2^-24` (2e-4 at
//! n = 3072, above [`ORTHO_TOL`](super::ORTHO_TOL)) while rounded f64 vectors deviate by ~`sqrt(n) 2^-24`;
//! and with OpenBLAS at n = 3072 `ssyevd` measured no faster (4.8 s vs 4.0 s, 2 cores).
//! Columns come out by descending eigenvalue, singular values are
//! `sqrt(max(eigenvalue, 0))`, and each column is signed so its largest-magnitude entry
//! (the first on ties) is positive.
//!
//! Like every Gram route, directions with singular value below ~`1e-3 sigma_max` are
//! determined only to f32 noise (their eigenvalues sit at the product rounding level); they
//! are still orthonormal.
//!

use super::linalg::{self, blas_dim, try_vec};
use super::Basis;
use crate::error::{ensure_finite, Error, Result};
use cblas::{Layout, Part, Transpose};
use std::fmt;

/// Most products summed in f32 per Gram entry before the partial sum moves into f64
/// (the chunk depth in the module docs).
pub const MAX_F32_DEPTH: usize = 16_384;

/// At most this many gradients share one f32 scratch, whatever the shape.
const MAX_PENDING: usize = 64;

/// Gradient entries beyond this magnitude are rejected: their f32 products could overflow
/// (1e15^2 x 16384 is still below f32::MAX), and no real gradient is that large.
pub const MAX_GRAD_ABS: f32 = 1e15;

/// Streaming accumulator of `sum_n G_n G_n^T` `(out, out)` and `sum_n G_n^T G_n` `(in, in)`
/// for one layer group. Memory is allocated on the first gradient, so `new` cannot fail.
#[derive(Clone)]
pub struct GramAccumulator {
    out: usize,
    inp: usize,
    count: u64,
    /// Row-major upper triangles of the f64 sums; empty until the first gradient.
    gram_out: Vec<f64>,
    gram_in: Vec<f64>,
    /// f32 sums of the last `pending` gradients, not yet in the f64 sums (upper triangles).
    part_out: Vec<f32>,
    part_in: Vec<f32>,
    pending: usize,
}

impl fmt::Debug for GramAccumulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GramAccumulator")
            .field("out", &self.out)
            .field("inp", &self.inp)
            .field("count", &self.count)
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy)]
enum Side {
    Out,
    In,
}

impl GramAccumulator {
    /// An empty accumulator for `(out, in)` gradients. Allocates nothing yet.
    pub fn new(out: usize, inp: usize) -> Self {
        Self {
            out,
            inp,
            count: 0,
            gram_out: Vec::new(),
            gram_in: Vec::new(),
            part_out: Vec::new(),
            part_in: Vec::new(),
            pending: 0,
        }
    }

    /// An accumulator holding sums computed elsewhere (on a device, by
    /// [`DeviceGramAccumulator`](super::DeviceGramAccumulator)) from `count` gradients:
    /// `gram_out` `(out, out)` and `gram_in` `(in, in)` row-major, of which only the upper
    /// triangles (`row <= col`) are read. Wrong lengths give [`Error::Shape`], a NaN/inf in
    /// an upper triangle [`Error::NonFinite`]. With `count = 0` the sums are dropped (an
    /// empty accumulator). More gradients may be added afterwards.
    pub fn from_sums(
        out: usize,
        inp: usize,
        count: u64,
        mut gram_out: Vec<f64>,
        mut gram_in: Vec<f64>,
    ) -> Result<Self> {
        let op = "GramAccumulator::from_sums";
        let mut acc = GramAccumulator::new(out, inp);
        acc.check_dims(op)?;
        for (what, m, n) in [("Gram (out, out)", &mut gram_out, out), ("Gram (in, in)", &mut gram_in, inp)] {
            let len = n.checked_mul(n).ok_or_else(|| Error::invalid(op, format!("{what} size overflows")))?;
            if m.len() != len {
                return Err(Error::shape(op, what, format!("{n} x {n} = {len}"), m.len()));
            }
            ensure_finite(what, m.chunks_exact(n).enumerate().flat_map(|(r, row)| row[r..].iter().copied()))?;
            // The lower triangle is never read; zero it so `grams` shows no stale values.
            for (r, row) in m.chunks_exact_mut(n).enumerate() {
                row[..r].iter_mut().for_each(|v| *v = 0.0);
            }
        }
        if count > 0 {
            (acc.gram_out, acc.gram_in, acc.count) = (gram_out, gram_in, count);
        }
        Ok(acc)
    }

    /// `(out, in)` of the gradients this accumulator takes.
    pub fn shape(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    /// Gradients added so far (including those merged in).
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Bytes of the buffers held (f64 sums and f32 scratch), for memory accounting.
    pub fn memory_bytes(&self) -> usize {
        (self.gram_out.capacity() + self.gram_in.capacity()) * 8
            + (self.part_out.capacity() + self.part_in.capacity()) * 4
    }

    /// Adds one row-major `(out, in)` gradient. Wrong length gives [`Error::Shape`],
    /// NaN/inf [`Error::NonFinite`]; on any error the accumulator is unchanged.
    pub fn add(&mut self, grad: &[f32]) -> Result<()> {
        self.add_batch(grad, 1)
    }

    /// Adds `n` gradients stacked as `[n, out, in]` (row-major). Equivalent to `n` calls
    /// of [`add`](Self::add) up to rounding, faster: one `ssyrk` per chunk for `G^T G`.
    /// All input is checked before anything changes.
    pub fn add_batch(&mut self, grads: &[f32], n: usize) -> Result<()> {
        let op = "GramAccumulator::add";
        let per = self.check_dims(op)?;
        let expected =
            per.checked_mul(n).ok_or_else(|| Error::invalid(op, format!("{n} gradients of {per} entries overflow")))?;
        if grads.len() != expected {
            return Err(Error::shape(
                op,
                "gradient batch",
                format!("{n} x {} x {} = {expected}", self.out, self.inp),
                grads.len(),
            ));
        }
        if n == 0 {
            return Ok(());
        }
        scan_gradients(op, grads)?;
        self.ensure_alloc(op)?;
        let chunk = self.chunk();
        let mut done = 0;
        while done < n {
            let b = (chunk - self.pending).min(n - done);
            self.accumulate(&grads[done * per..(done + b) * per], b);
            done += b;
        }
        Ok(())
    }

    /// Adds another accumulator of the same shape into this one (e.g. from another worker).
    pub fn merge(&mut self, other: &GramAccumulator) -> Result<()> {
        let op = "GramAccumulator::merge";
        if self.shape() != other.shape() {
            return Err(Error::shape(
                op,
                "accumulator shape (out, in)",
                format!("{:?}", self.shape()),
                format!("{:?}", other.shape()),
            ));
        }
        if other.count == 0 {
            return Ok(());
        }
        self.ensure_alloc(op)?;
        self.gram_out.iter_mut().zip(&other.gram_out).for_each(|(d, s)| *d += s);
        self.gram_in.iter_mut().zip(&other.gram_in).for_each(|(d, s)| *d += s);
        if other.pending > 0 {
            add_upper(&mut self.gram_out, &other.part_out, self.out);
            add_upper(&mut self.gram_in, &other.part_in, self.inp);
        }
        self.count = self.count.saturating_add(other.count);
        Ok(())
    }

    /// The two Grams as full symmetric row-major f64 matrices `(out, out)` and `(in, in)`,
    /// including gradients still in the f32 scratch. For inspection and tests.
    pub fn grams(&self) -> Result<(Vec<f64>, Vec<f64>)> {
        let mut a = self.upper_sum(Side::Out)?;
        let mut b = self.upper_sum(Side::In)?;
        symmetrize(&mut a, self.out);
        symmetrize(&mut b, self.inp);
        Ok((a, b))
    }

    /// Eigensolves both Grams into the basis of `group` (see the module docs). Errors if
    /// the group's name is unusable ([`super::check_group_name`]), if no gradient was added,
    /// or if every gradient added is zero: the Grams are then zero and every orthogonal
    /// matrix is an eigenbasis, so there is no basis to find. Does not consume the
    /// accumulator: more gradients may follow.
    pub fn basis(&self, group: &str) -> Result<Basis> {
        let op = "GramAccumulator::basis";
        super::check_group_name(group)?;
        self.check_dims(op)?;
        if self.count == 0 {
            return Err(Error::invalid(op, format!("no gradients were added for group `{group}`")));
        }
        let gram_out = self.upper_sum(Side::Out)?;
        // The diagonal of sum G G^T holds each row's sum of squares over all gradients.
        if (0..self.out).all(|i| gram_out[i * self.out + i] == 0.0) {
            return Err(Error::InvalidBasis {
                group: group.to_string(),
                msg: format!(
                    "all {} gradients added are zero, so any orthogonal matrix would do: there is no basis to \
                     compute (were they collected from a frozen layer, or with a zero loss?)",
                    self.count
                ),
            });
        }
        let (p, sigma_out) = linalg::sym_eig_desc(gram_out, self.out)?;
        let (q, sigma_in) = linalg::sym_eig_desc(self.upper_sum(Side::In)?, self.inp)?;
        // Not re-validated: dsyevd's vectors are orthogonal to ~n 2^-53 and the rounding to
        // f32 stays far inside ORTHO_TOL (tests check it); the O(n^3) check is left to load.
        Ok(Basis {
            group: group.to_string(),
            out: self.out,
            inp: self.inp,
            p,
            q,
            sigma_out,
            sigma_in,
            n_grads: self.count,
        })
    }

    /// Entries per gradient, after checking the shape is usable with 32-bit BLAS.
    fn check_dims(&self, op: &'static str) -> Result<usize> {
        if self.out == 0 || self.inp == 0 {
            return Err(Error::invalid(op, format!("gradient shape ({}, {}) has no entries", self.out, self.inp)));
        }
        blas_dim(op, "out", self.out)?;
        blas_dim(op, "in", self.inp)?;
        let chunk = self.chunk();
        blas_dim(op, "chunk depth", chunk.saturating_mul(self.out.max(self.inp)))?;
        self.out.checked_mul(self.inp).ok_or_else(|| Error::invalid(op, "out * in overflows"))
    }

    /// Gradients per f32 chunk: as many as keep each entry's f32 depth <= MAX_F32_DEPTH.
    fn chunk(&self) -> usize {
        (MAX_F32_DEPTH / self.out.max(self.inp).max(1)).clamp(1, MAX_PENDING)
    }

    /// Allocates whatever is missing: the f64 sums (absent until the first gradient) and
    /// the f32 scratch (also absent in an accumulator made by [`from_sums`](Self::from_sums)).
    fn ensure_alloc(&mut self, op: &'static str) -> Result<()> {
        if !self.gram_out.is_empty() && !self.part_out.is_empty() {
            return Ok(());
        }
        let oo = self.out.checked_mul(self.out).ok_or_else(|| Error::invalid(op, "out^2 overflows"))?;
        let ii = self.inp.checked_mul(self.inp).ok_or_else(|| Error::invalid(op, "in^2 overflows"))?;
        // Build all that is missing first so a failed allocation leaves `self` untouched.
        let bufs = if self.gram_out.is_empty() {
            Some((try_vec(op, "Gram (out, out)", oo, 0.0f64)?, try_vec(op, "Gram (in, in)", ii, 0.0f64)?))
        } else {
            None
        };
        let parts = (try_vec(op, "scratch (out, out)", oo, 0.0f32)?, try_vec(op, "scratch (in, in)", ii, 0.0f32)?);
        if let Some(bufs) = bufs {
            (self.gram_out, self.gram_in) = bufs;
        }
        (self.part_out, self.part_in) = parts;
        Ok(())
    }

    /// Adds `b` checked gradients (`b <= chunk - pending`) into the f32 scratch, flushing
    /// into f64 when the chunk is full.
    fn accumulate(&mut self, g: &[f32], b: usize) {
        let (o, i) = (self.out as i32, self.inp as i32);
        let beta0 = if self.pending == 0 { 0.0 } else { 1.0 };
        for (j, gj) in g.chunks_exact(self.out * self.inp).enumerate() {
            let beta = if j == 0 { beta0 } else { 1.0 };
            // SAFETY: gj is (out, in) row-major with lda = in; part_out is out*out with
            // ldc = out (allocated by ensure_alloc); dims fit i32 (check_dims).
            unsafe {
                cblas::ssyrk(
                    Layout::RowMajor,
                    Part::Upper,
                    Transpose::None,
                    o,
                    i,
                    1.0,
                    gj,
                    i,
                    beta,
                    &mut self.part_out,
                    o,
                )
            };
        }
        // The batch [G_1; ...; G_b] is one (b*out, in) matrix: sum G^T G = A^T A.
        let depth = (b * self.out) as i32;
        // SAFETY: g is (b*out, in) row-major with lda = in; part_in is in*in with ldc = in;
        // b*out <= chunk*out fits i32 (check_dims).
        unsafe {
            cblas::ssyrk(
                Layout::RowMajor,
                Part::Upper,
                Transpose::Ordinary,
                i,
                depth,
                1.0,
                g,
                i,
                beta0,
                &mut self.part_in,
                i,
            )
        };
        self.pending += b;
        self.count = self.count.saturating_add(b as u64);
        if self.pending >= self.chunk() {
            add_upper(&mut self.gram_out, &self.part_out, self.out);
            add_upper(&mut self.gram_in, &self.part_in, self.inp);
            self.pending = 0;
        }
    }

    /// A fresh f64 copy of one Gram's upper triangle including the pending f32 scratch.
    fn upper_sum(&self, side: Side) -> Result<Vec<f64>> {
        let (n, gram, part) = match side {
            Side::Out => (self.out, &self.gram_out, &self.part_out),
            Side::In => (self.inp, &self.gram_in, &self.part_in),
        };
        let len = n.checked_mul(n).ok_or_else(|| Error::invalid("GramAccumulator", "Gram size overflows"))?;
        if gram.is_empty() {
            return try_vec("GramAccumulator", "Gram copy", len, 0.0f64);
        }
        let mut sum = Vec::new();
        sum.try_reserve_exact(len)
            .map_err(|_| Error::invalid("GramAccumulator", format!("cannot allocate a {n} x {n} Gram copy")))?;
        sum.extend_from_slice(gram);
        if self.pending > 0 {
            add_upper(&mut sum, part, n);
        }
        Ok(sum)
    }
}

/// `dst += src` on the upper triangle (row-major, `(n, n)`).
fn add_upper(dst: &mut [f64], src: &[f32], n: usize) {
    for (r, (d, s)) in dst.chunks_exact_mut(n).zip(src.chunks_exact(n)).enumerate() {
        d[r..].iter_mut().zip(&s[r..]).for_each(|(d, &s)| *d += s as f64);
    }
}

/// Copies the upper triangle onto the lower one.
fn symmetrize(a: &mut [f64], n: usize) {
    for r in 0..n {
        for c in 0..r {
            a[r * n + c] = a[c * n + r];
        }
    }
}

/// Rejects NaN/inf and entries whose f32 products could overflow.
fn scan_gradients(op: &'static str, g: &[f32]) -> Result<()> {
    ensure_finite("gradient", g.iter().copied())?;
    if let Some(i) = g.iter().position(|v| v.abs() > MAX_GRAD_ABS) {
        return Err(Error::invalid(
            op,
            format!("gradient entry {i} = {:e} exceeds {MAX_GRAD_ABS:e} in magnitude", g[i]),
        ));
    }
    Ok(())
}

/// Bytes the eigensolve of an order-`n` Gram holds at its peak: the f64 matrix, the
/// eigenvalues and LAPACK `dsyevd`'s workspaces (`work`, `iwork`).
pub fn eigensolve_bytes(n: usize) -> Result<usize> {
    let (lwork, liwork) = linalg::syevd_workspace(n)?;
    Ok(n * n * 8 + n * 8 + lwork * 8 + liwork * 4)
}
