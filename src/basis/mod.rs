//! The SparseGrad basis of a layer group (the preliminary phase): the HOSVD factors `P`
//! `(out, out)` and `Q` `(in, in)` of the stacked gradients `(out, in, N)`, computed by
//! streaming the Gram matrices `sum_n G_n G_n^T` and `sum_n G_n^T G_n` and one symmetric
//! eigensolve each, plus save/load and a sparsity diagnostic.
//!
//!
//! - [`accumulate`]: the streaming [`GramAccumulator`] and its eigensolve;
//! - [`device`]: the same accumulation on the backend's device ([`DeviceGramAccumulator`],
//!   cuBLAS SYRK), one download per group, and [`GramSet`], the route a preliminary phase
//!   takes on each backend;
//! - [`report`]: the sparsity diagnostic and the direct-SVD reference;
//! - this module: [`Basis`] (validation) and [`BasisSet`]; `io`: their file format.
//!
//! The basis knows nothing about layers: a layer that keeps device copies of `P` and `Q`
//! caches them itself, keyed by [`Basis::fingerprint`].

pub mod accumulate;
pub mod device;
mod io;
mod linalg;
pub mod report;

pub use accumulate::{eigensolve_bytes, GramAccumulator, MAX_F32_DEPTH, MAX_GRAD_ABS};
pub use device::{BasisTiming, DeviceGramAccumulator, GramSet};
pub use report::{direct_svd_basis, direct_svd_bytes, mean_sparsity_report, sparsity_report, SparsityReport};

use crate::error::{ensure_finite, Error, Result};
use crate::scalar::fingerprint;
use std::collections::BTreeMap;
use std::fmt;

/// Largest `max |P^T P - I|` (and the same for Q) a basis may have. Why 1e-4: bases are
/// stored in f32, and rounding an exactly orthogonal matrix's entries to f32 leaves
/// deviations of about `sqrt(n) 2^-24` (3e-6 at n = 3072, 1e-5 at n = 30000); 1e-4 leaves
/// room for that plus upstream solver error at any realistic MLP size, while a genuinely
/// non-orthogonal matrix (a scaled, perturbed or transposed-wrong one) lands far above it.
pub const ORTHO_TOL: f32 = 1e-4;

/// The basis of one layer group: `P` `(out, out)` and `Q` `(in, in)`, row-major,
/// orthogonal, column j the j-th singular direction of the mode-1 / mode-2 unfolding
/// (descending singular value, largest-magnitude entry positive). Every constructor checks
/// it, so the fields are read through accessors only.
#[derive(Clone, PartialEq)]
pub struct Basis {
    group: String,
    out: usize,
    inp: usize,
    /// `(out, out)` row-major; columns = eigenvectors of `sum G G^T`, descending.
    p: Vec<f32>,
    /// `(in, in)` row-major; columns = eigenvectors of `sum G^T G`, descending.
    q: Vec<f32>,
    /// Singular values of the mode-1 unfolding `(out, in N)`, descending.
    sigma_out: Vec<f32>,
    /// Singular values of the mode-2 unfolding `(in, out N)`, descending.
    sigma_in: Vec<f32>,
    /// Gradients the basis was computed from (0 for an identity basis).
    n_grads: u64,
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
    /// The layer group the basis belongs to.
    pub fn group(&self) -> &str {
        &self.group
    }
    /// The same basis under another group name.
    pub fn with_group(mut self, group: &str) -> Basis {
        self.group = group.to_string();
        self
    }
    /// `(out, in)` of the weights it transforms.
    pub fn shape(&self) -> (usize, usize) {
        (self.out, self.inp)
    }
    /// `P` `(out, out)` row-major.
    pub fn p(&self) -> &[f32] {
        &self.p
    }
    /// `Q` `(in, in)` row-major.
    pub fn q(&self) -> &[f32] {
        &self.q
    }
    /// Singular values of the mode-1 unfolding `(out, in N)`, descending.
    pub fn sigma_out(&self) -> &[f32] {
        &self.sigma_out
    }
    /// Singular values of the mode-2 unfolding `(in, out N)`, descending.
    pub fn sigma_in(&self) -> &[f32] {
        &self.sigma_in
    }
    /// Gradients the basis was computed from (0 for an identity basis).
    pub fn n_grads(&self) -> u64 {
        self.n_grads
    }

    /// Assembles a basis from its parts WITHOUT any check: for tests that must hand a
    /// corrupt basis to the code that defends against one. Use [`Basis::from_parts`].
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts_unchecked(
        group: &str,
        out: usize,
        inp: usize,
        p: Vec<f32>,
        q: Vec<f32>,
        sigma_out: Vec<f32>,
        sigma_in: Vec<f32>,
        n_grads: u64,
    ) -> Basis {
        Basis { group: group.to_string(), out, inp, p, q, sigma_out, sigma_in, n_grads }
    }

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
        let b = Basis { group: group.to_string(), out, inp, p, q, sigma_out, sigma_in, n_grads };
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
        let b = Basis { group: group.to_string(), out, inp, p, q, sigma_out, sigma_in, n_grads };
        b.check_quick()?;
        Ok(b)
    }

    /// A dense orthogonal basis built in O(out^2 + in^2): `P` and `Q` are Householder
    /// reflections `I - 2 v v^T / |v|^2` of seeded vectors, unit singular values. For
    /// timing (GEMM speed does not depend on the values) and calibration, not training.
    pub fn reflection(group: &str, out: usize, inp: usize, seed: u64) -> Result<Basis> {
        let op = "Basis::reflection";
        let square = |n: usize| {
            n.checked_mul(n)
                .ok_or_else(|| Error::invalid(op, format!("a {n} x {n} factor overflows the address space")))
        };
        let (p, q) = (reflection(out, square(out)?, seed), reflection(inp, square(inp)?, seed.wrapping_add(1)));
        Self::from_parts_quick(group, out, inp, p, q, vec![1.0; out], vec![1.0; inp], 1)
    }

    /// Identifies `(P, Q)` bit for bit: adapters record it so they are never applied in
    /// another basis.
    pub fn fingerprint(&self) -> u64 {
        let (p, q) = (fingerprint(&self.p), fingerprint(&self.q));
        p ^ q.rotate_left(29) ^ ((self.out as u64) << 32 | self.inp as u64)
    }

    /// Checks shapes, finiteness, singular values (non-negative, non-increasing) and
    /// orthogonality of P and Q to [`ORTHO_TOL`]. O(out^3 + in^3).
    pub fn validate(&self) -> Result<()> {
        self.check_shapes("Basis::validate")?;
        for (name, s) in [("sigma_out", &self.sigma_out), ("sigma_in", &self.sigma_in)] {
            ensure_finite(&format!("basis `{}` {name}", self.group), s.iter().copied())?;
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
        ensure_finite(&format!("basis `{group}` {name}"), m.iter().copied())?;
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
            ensure_finite(&format!("basis `{}` {name}", self.group), m.iter().copied())?;
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

/// The prefix safetensors reserves for its header's metadata entry (`__metadata__`).
const RESERVED_PREFIX: &str = "__metadata__";

/// Checks a layer group's name, which becomes part of tensor names (`{group}.P`) and of
/// what the command line prints: not empty, no control character (a newline would split a
/// line of output or an error message in two), not starting with `__metadata__`
/// (safetensors reserves that key in the header).
pub fn check_group_name(group: &str) -> Result<()> {
    let op = "basis group";
    let shown = crate::io::fs::escape(group, 200);
    if group.is_empty() {
        return Err(Error::invalid(op, "the group name is empty"));
    }
    if group.chars().any(char::is_control) {
        return Err(Error::invalid(op, format!("group name `{shown}` holds a control character")));
    }
    if group.starts_with(RESERVED_PREFIX) {
        return Err(Error::invalid(
            op,
            format!("group name `{shown}` starts with `{RESERVED_PREFIX}`, which safetensors reserves"),
        ));
    }
    Ok(())
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

/// `I - 2 v v^T / |v|^2` `(n, n)` (`len = n * n`) for a seeded `v` with entries in
/// [-0.5, 0.5).
fn reflection(n: usize, len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f64> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f64 / (1u64 << 24) as f64 - 0.5
        })
        .collect();
    let norm2 = v.iter().map(|x| x * x).sum::<f64>().max(f64::MIN_POSITIVE);
    let mut m = vec![0.0f32; len];
    for (i, row) in m.chunks_exact_mut(n.max(1)).enumerate() {
        let s = 2.0 * v[i] / norm2;
        for (j, e) in row.iter_mut().enumerate() {
            *e = (if i == j { 1.0 } else { 0.0 } - s * v[j]) as f32;
        }
    }
    m
}
