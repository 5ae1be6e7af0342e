//! The SparseGrad basis of a layer group (the preliminary phase): the HOSVD factors `P`
//! `(out, out)` and `Q` `(in, in)` of the stacked gradients `(out, in, N)`, computed by
//! streaming the Gram matrices `sum_n G_n G_n^T` and `sum_n G_n^T G_n` and one symmetric
//! eigensolve each, plus save/load and a sparsity diagnostic.
//!
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
//! n = 3072, above [`ORTHO_TOL`]) while rounded f64 vectors deviate by ~`sqrt(n) 2^-24`;
//! and with OpenBLAS at n = 3072 `ssyevd` measured no faster (4.8 s vs 4.0 s, 2 cores).
//! Columns come out by descending eigenvalue, singular values are
//! `sqrt(max(eigenvalue, 0))`, and each column is signed so its largest-magnitude entry
//! (the first on ties) is positive.
//!
//! Like every Gram route, directions with singular value below ~`1e-3 sigma_max` are
//! determined only to f32 noise (their eigenvalues sit at the product rounding level); they
//! are still orthonormal.
//!
//! [`direct_svd_basis`] computes the same factors the official way (`sgesdd` of both
//! unfoldings); tests and the benchmark use it as the reference.

mod io;
mod linalg;

pub use linalg::{gesdd_workspace, syevd_workspace};

use crate::error::{Error, Result};
use cblas::{Layout, Part, Transpose};
use linalg::{blas_dim, try_vec};
use std::any::{Any, TypeId};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, Weak};

/// Largest `max |P^T P - I|` (and the same for Q) a basis may have. Why 1e-4: bases are
/// stored in f32, and rounding an exactly orthogonal matrix's entries to f32 leaves
/// deviations of about `sqrt(n) 2^-24` (3e-6 at n = 3072, 1e-5 at n = 30000); 1e-4 leaves
/// room for that plus upstream solver error at any realistic MLP size, while a genuinely
/// non-orthogonal matrix (a scaled, perturbed or transposed-wrong one) lands far above it.
pub const ORTHO_TOL: f32 = 1e-4;

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
    /// no gradient was added. Does not consume the accumulator: more gradients may follow.
    pub fn basis(&self, group: &str) -> Result<Basis> {
        let op = "GramAccumulator::basis";
        self.check_dims(op)?;
        if self.count == 0 {
            return Err(Error::invalid(op, format!("no gradients were added for group `{group}`")));
        }
        let (p, sigma_out) = linalg::sym_eig_desc(self.upper_sum(Side::Out)?, self.out)?;
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
            device: DeviceCache::default(),
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

    fn ensure_alloc(&mut self, op: &'static str) -> Result<()> {
        if !self.gram_out.is_empty() {
            return Ok(());
        }
        let oo = self.out.checked_mul(self.out).ok_or_else(|| Error::invalid(op, "out^2 overflows"))?;
        let ii = self.inp.checked_mul(self.inp).ok_or_else(|| Error::invalid(op, "in^2 overflows"))?;
        // Build all four first so a failed allocation leaves `self` untouched.
        let bufs = (try_vec(op, "Gram (out, out)", oo, 0.0f64)?, try_vec(op, "Gram (in, in)", ii, 0.0f64)?);
        let parts = (try_vec(op, "scratch (out, out)", oo, 0.0f32)?, try_vec(op, "scratch (in, in)", ii, 0.0f32)?);
        (self.gram_out, self.gram_in) = bufs;
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
    if let Some(first_index) = g.iter().position(|v| !v.is_finite()) {
        let count = g.iter().filter(|v| !v.is_finite()).count();
        return Err(Error::NonFinite { what: "gradient".into(), count, first_index });
    }
    if let Some(i) = g.iter().position(|v| v.abs() > MAX_GRAD_ABS) {
        return Err(Error::invalid(
            op,
            format!("gradient entry {i} = {:e} exceeds {MAX_GRAD_ABS:e} in magnitude", g[i]),
        ));
    }
    Ok(())
}

/// The basis of one layer group. `p` is `(out, out)` and `q` `(in, in)`, row-major,
/// orthogonal, column j the j-th singular direction of the mode-1 / mode-2 unfolding
/// (descending singular value, largest-magnitude entry positive).
#[derive(Clone, PartialEq)]
pub struct Basis {
    pub group: String,
    pub out: usize,
    pub inp: usize,
    /// `(out, out)` row-major; columns = eigenvectors of `sum G G^T`, descending.
    pub p: Vec<f32>,
    /// `(in, in)` row-major; columns = eigenvectors of `sum G^T G`, descending.
    pub q: Vec<f32>,
    /// Singular values of the mode-1 unfolding `(out, in N)`, descending.
    pub sigma_out: Vec<f32>,
    /// Singular values of the mode-2 unfolding `(in, out N)`, descending.
    pub sigma_in: Vec<f32>,
    /// Gradients the basis was computed from (0 for an identity basis).
    pub n_grads: u64,
    /// Device copies of `P` and `Q` the layers made, shared by every layer built from this
    /// basis (or a clone) on the same backend.
    pub(crate) device: DeviceCache,
}

impl fmt::Debug for Basis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lead = |s: &[f32]| s.iter().take(4).copied().collect::<Vec<_>>();
        f.debug_struct("Basis")
            .field("group", &self.group)
            .field("out", &self.out)
            .field("inp", &self.inp)
            .field("n_grads", &self.n_grads)
            .field("sigma_out[..4]", &lead(&self.sigma_out))
            .field("sigma_in[..4]", &lead(&self.sigma_in))
            .finish_non_exhaustive()
    }
}

impl Basis {
    /// `P = I`, `Q = I`, zero singular values: what "no basis" means.
    pub fn identity(group: &str, out: usize, inp: usize) -> Basis {
        let eye = |n: usize| {
            let mut m = vec![0.0f32; n * n];
            m.iter_mut().step_by(n + 1).for_each(|v| *v = 1.0);
            m
        };
        Basis {
            group: group.to_string(),
            out,
            inp,
            p: eye(out),
            q: eye(inp),
            sigma_out: vec![0.0; out],
            sigma_in: vec![0.0; inp],
            n_grads: 0,
            device: DeviceCache::default(),
        }
    }

    /// Assembles a basis from its parts and [`validate`](Self::validate)s it.
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        group: &str,
        out: usize,
        inp: usize,
        p: Vec<f32>,
        q: Vec<f32>,
        sigma_out: Vec<f32>,
        sigma_in: Vec<f32>,
        n_grads: u64,
    ) -> Result<Basis> {
        let b = Basis {
            group: group.to_string(),
            out,
            inp,
            p,
            q,
            sigma_out,
            sigma_in,
            n_grads,
            device: DeviceCache::default(),
        };
        b.validate()?;
        Ok(b)
    }

    /// [`from_parts`](Self::from_parts) checked by [`check_quick`](Self::check_quick) only:
    /// for bases orthogonal by construction (Householder reflections, say) at sizes where
    /// the O(n^3) validation takes minutes.
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts_quick(
        group: &str,
        out: usize,
        inp: usize,
        p: Vec<f32>,
        q: Vec<f32>,
        sigma_out: Vec<f32>,
        sigma_in: Vec<f32>,
        n_grads: u64,
    ) -> Result<Basis> {
        let b = Basis {
            group: group.to_string(),
            out,
            inp,
            p,
            q,
            sigma_out,
            sigma_in,
            n_grads,
            device: DeviceCache::default(),
        };
        b.check_quick()?;
        Ok(b)
    }

    /// Identifies `(P, Q)` bit for bit: adapters record it so they are never applied in
    /// another basis.
    pub fn fingerprint(&self) -> u64 {
        let (p, q) = (crate::linear::state::fingerprint(&self.p), crate::linear::state::fingerprint(&self.q));
        p ^ q.rotate_left(29) ^ ((self.out as u64) << 32 | self.inp as u64)
    }

    /// Checks shapes, finiteness, singular values (non-negative, non-increasing) and
    /// orthogonality of P and Q to [`ORTHO_TOL`]. O(out^3 + in^3).
    pub fn validate(&self) -> Result<()> {
        self.check_shapes("Basis::validate")?;
        for (name, s) in [("sigma_out", &self.sigma_out), ("sigma_in", &self.sigma_in)] {
            if let Some(first_index) = s.iter().position(|v| !v.is_finite()) {
                let count = s.iter().filter(|v| !v.is_finite()).count();
                return Err(Error::NonFinite { what: format!("basis `{}` {name}", self.group), count, first_index });
            }
            if let Some(i) = s.iter().position(|&v| v < 0.0) {
                return Err(self.invalid(format!("{name}[{i}] = {} is negative", s[i])));
            }
            if let Some(i) = s.windows(2).position(|w| w[1] > w[0]) {
                return Err(self.invalid(format!(
                    "{name} is not descending: [{i}] = {} < [{}] = {}",
                    s[i],
                    i + 1,
                    s[i + 1]
                )));
            }
        }
        Basis::check_orthogonal(&self.group, "P", &self.p, self.out, ORTHO_TOL)?;
        Basis::check_orthogonal(&self.group, "Q", &self.q, self.inp, ORTHO_TOL)
    }

    /// Checks that the row-major `(n, n)` matrix `m` (named `name` of `group` in errors) is
    /// finite and orthogonal: `max |m^T m - I| <= tol`, measured in f64. Wrong length gives
    /// [`Error::Shape`], NaN/inf [`Error::NonFinite`], a larger deviation
    /// [`Error::InvalidBasis`] with the worst entry. O(n^3) flops, n^2 f64 extra memory.
    pub fn check_orthogonal(group: &str, name: &str, m: &[f32], n: usize, tol: f32) -> Result<()> {
        let op = "Basis::check_orthogonal";
        let len = n.checked_mul(n).ok_or_else(|| Error::invalid(op, format!("order {n} overflows")))?;
        if m.len() != len {
            return Err(Error::shape(op, format!("basis `{group}` {name}"), format!("{n} x {n} = {len}"), m.len()));
        }
        if !(tol.is_finite() && tol >= 0.0) {
            return Err(Error::invalid(op, format!("tolerance {tol} must be finite and >= 0")));
        }
        if let Some(first_index) = m.iter().position(|v| !v.is_finite()) {
            let count = m.iter().filter(|v| !v.is_finite()).count();
            return Err(Error::NonFinite { what: format!("basis `{group}` {name}"), count, first_index });
        }
        let (dev, i, j) = linalg::max_orthogonality_deviation(m, n)?;
        if dev > tol as f64 {
            return Err(Error::InvalidBasis {
                group: group.to_string(),
                msg: format!(
                    "{name} is not orthogonal: max |{name}^T {name} - I| = {dev:.3e} at ({i}, {j}) exceeds {tol:.1e}"
                ),
            });
        }
        Ok(())
    }

    /// What building a layer from this basis checks, in O(out^2 + in^2) rather than
    /// [`Basis::validate`]'s O(out^3 + in^3) (minutes at LLaMA-7B sizes, once per layer):
    /// shapes, finiteness, and `|M^T (M v) - v| <= tol |v|` for `M = P, Q` and two fixed
    /// pseudo-random probes `v`, which catches a non-orthogonal matrix unless its defect
    /// happens to be orthogonal to both probes. Bases built by [`GramAccumulator::basis`],
    /// [`Basis::from_parts`] or [`BasisSet::load`] are fully validated already.
    pub fn check_quick(&self) -> Result<()> {
        self.check_shapes("Basis::check_quick")?;
        for (name, m, n) in [("P", &self.p, self.out), ("Q", &self.q, self.inp)] {
            if let Some(first_index) = m.iter().position(|v| !v.is_finite()) {
                let count = m.iter().filter(|v| !v.is_finite()).count();
                return Err(Error::NonFinite { what: format!("basis `{}` {name}", self.group), count, first_index });
            }
            for seed in [0x9E37_79B9_7F4A_7C15u64, 0xD1B5_4A32_D192_ED03] {
                let mut state = seed;
                let v: Vec<f64> = (0..n)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
                    })
                    .collect();
                let mv: Vec<f64> = (0..n).map(|r| (0..n).map(|c| m[r * n + c] as f64 * v[c]).sum()).collect();
                let mut back = vec![0.0f64; n];
                for (r, &w) in mv.iter().enumerate() {
                    back.iter_mut().zip(&m[r * n..(r + 1) * n]).for_each(|(b, &x)| *b += x as f64 * w);
                }
                let worst = back.iter().zip(&v).fold(0.0f64, |a, (b, x)| a.max((b - x).abs()));
                let scale = v.iter().fold(0.0f64, |a, x| a.max(x.abs()));
                if worst > (ORTHO_TOL as f64) * scale.max(1e-30) * (n as f64).sqrt() {
                    return Err(
                        self.invalid(format!("{name} is not orthogonal: a probe vector comes back off by {worst:.3e}"))
                    );
                }
            }
        }
        Ok(())
    }

    /// Buffer lengths agree with `(out, in)`.
    pub(crate) fn check_shapes(&self, op: &'static str) -> Result<()> {
        let sq = |n: usize| n.checked_mul(n).ok_or_else(|| Error::invalid(op, format!("order {n} overflows")));
        let checks = [
            ("P", self.p.len(), sq(self.out)?),
            ("Q", self.q.len(), sq(self.inp)?),
            ("sigma_out", self.sigma_out.len(), self.out),
            ("sigma_in", self.sigma_in.len(), self.inp),
        ];
        for (name, got, want) in checks {
            if got != want {
                return Err(Error::shape(
                    op,
                    format!("basis `{}` {name} ({}, {})", self.group, self.out, self.inp),
                    want,
                    got,
                ));
            }
        }
        Ok(())
    }

    fn invalid(&self, msg: String) -> Error {
        Error::InvalidBasis { group: self.group.clone(), msg }
    }
}

/// Bases of several layer groups, by group name. Saved as one safetensors file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BasisSet {
    pub bases: BTreeMap<String, Basis>,
}

impl BasisSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `b` under its group name, replacing any basis of that group.
    pub fn insert(&mut self, b: Basis) {
        self.bases.insert(b.group.clone(), b);
    }

    /// The basis of `group`, or [`Error::MissingTensor`] naming it and the groups present.
    pub fn get(&self, group: &str) -> Result<&Basis> {
        self.bases.get(group).ok_or_else(|| Error::MissingTensor {
            name: group.to_string(),
            context: Some(format!("basis set (groups: {})", self.bases.keys().cloned().collect::<Vec<_>>().join(", "))),
        })
    }
}

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
    if let Some(first_index) = grads.iter().position(|v| !v.is_finite()) {
        let count = grads.iter().filter(|v| !v.is_finite()).count();
        return Err(Error::NonFinite { what: "gradient".into(), count, first_index });
    }
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
/// ordering and sign convention as [`GramAccumulator::basis`]. Holds one f32 copy of the
/// whole tensor at a time plus LAPACK workspace; the unfolding must have < 2^31 entries.
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
    if let Some(first_index) = grads.iter().position(|v| !v.is_finite()) {
        let count = grads.iter().filter(|v| !v.is_finite()).count();
        return Err(Error::NonFinite { what: "gradient".into(), count, first_index });
    }
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
    Ok(Basis {
        group: group.to_string(),
        out,
        inp,
        p,
        q,
        sigma_out,
        sigma_in,
        n_grads: n as u64,
        device: DeviceCache::default(),
    })
}

/// Which device copy of a basis: the backend instance, the element type, the layout a
/// layer wants, and the basis content (a basis whose public fields were edited gets new
/// copies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DeviceKey {
    pub backend: usize,
    pub elem: TypeId,
    pub layout: u8,
    pub fingerprint: u64,
}

/// Device copies of a basis, held weakly: made by the first layer that needs one, shared by
/// the later ones, freed with the last layer using it. Equality ignores it.
#[derive(Clone, Default)]
pub(crate) struct DeviceCache(Arc<Mutex<Vec<DeviceEntry>>>);

type DeviceEntry = (DeviceKey, Weak<dyn Any + Send + Sync>);

impl DeviceCache {
    /// The live copy under `key`, or a new one from `make`.
    pub(crate) fn get_or_make<T: Any + Send + Sync>(
        &self,
        key: DeviceKey,
        make: impl FnOnce() -> Result<T>,
    ) -> Result<Arc<T>> {
        // A poisoned lock only means another thread panicked mid-insert; the list is still valid.
        let mut entries = self.0.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|(_, w)| w.strong_count() > 0);
        if let Some(found) = entries.iter().filter(|(k, _)| *k == key).find_map(|(_, w)| w.upgrade()) {
            if let Ok(t) = found.downcast::<T>() {
                return Ok(t);
            }
        }
        let made = Arc::new(make()?);
        let erased: Arc<dyn Any + Send + Sync> = made.clone();
        entries.push((key, Arc::downgrade(&erased)));
        Ok(made)
    }
}

impl PartialEq for DeviceCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl fmt::Debug for DeviceCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let live = self.0.lock().map(|e| e.iter().filter(|(_, w)| w.strong_count() > 0).count()).unwrap_or(0);
        write!(f, "DeviceCache({live} live)")
    }
}
