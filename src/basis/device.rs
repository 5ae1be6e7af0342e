//! The preliminary phase's Gram accumulation on the backend that computed the gradients.
//!
//! [`DeviceGramAccumulator`] keeps a layer group's two Grams in one backend buffer, `(out,
//! out)` then `(in, in)` (row-major upper triangles), and adds each gradient where it lies
//! with [`DenseOps::gram_accumulate`](crate::backend::DenseOps::gram_accumulate) (cuBLAS
//! `Ssyrk` on CUDA): no gradient ever crosses to the host. At the end, one download per
//! group hands the sums to the host [`GramAccumulator`] (through
//! [`GramAccumulator::from_sums`]), whose LAPACK eigensolve computes the basis, exactly as
//! the host path does.
//!
//! # Precision
//!
//! The device sums are f32: each gradient's products are f32 dot products of depth `in` or
//! `out`, and the running sum over N gradients adds one f32 rounding per gradient, an error
//! of at most `~N 2^-24` of the sum (typically `sqrt(N) 2^-24`) on top of the products' own
//! `~sqrt(depth) 2^-24`; the host path sums chunks in f64 instead. tests/gram_device.rs
//! measures the difference against an f64 reference on gradients `g^T x` with power-law
//! spectra (256 x 96, 320 and 1280 gradients): the f32 sums are 4-16x noisier than the host
//! path's, growing with N, yet what the basis is used for does not move. Eigenvalues above
//! `1e-4 lambda_max` stay within 2e-5 (relative), the off-diagonal share of the reference
//! Grams in the device basis is below 6e-7, leading subspaces agree to 1e-3 (steep spectrum,
//! near-degenerate neighbours) or 1e-5 (mild), and the top-1% share of held-out gradients in
//! the basis (what SparseGrad relies on) is the reference's to 1e-6. Only eigenvalues near
//! the f32 noise floor (below ~`1e-5 lambda_max`, carrying no gradient energy) differ by
//! ~2e-3 relative, which neither route resolves well. So f32, as cuBLAS SYRK computes it,
//! at a third of the memory of f64 sums with an f32 scratch.
//!
//! NaN/inf in a gradient, or entries whose squares overflow f32, show up as non-finite Gram
//! entries (the diagonal holds every row's sum of squares) and fail the download with
//! [`Error::NonFinite`]: the device is not asked to scan each gradient (a host sync).
//!
//! [`GramSet`] is what the preliminary phases use: device accumulators on a backend whose
//! buffers live on a device, and on the CPU backend the host [`GramAccumulator`]s fed with
//! copies, as before (its results unchanged).

use super::accumulate::GramAccumulator;
use super::Basis;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::scalar::Real;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Instant;

/// Streaming accumulator of `sum_n G_n G_n^T` `(out, out)` and `sum_n G_n^T G_n` `(in, in)`
/// for one layer group, on the backend's device (see the module docs). Memory is allocated
/// on the first gradient, so `new` cannot fail.
pub struct DeviceGramAccumulator<B: Backend, F: Real = f32> {
    backend: B,
    out: usize,
    inp: usize,
    count: u64,
    /// `out^2 + in^2` entries: the `(out, out)` Gram, then the `(in, in)` one.
    grams: Option<B::Buf<F>>,
}

impl<B: Backend, F: Real> fmt::Debug for DeviceGramAccumulator<B, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceGramAccumulator")
            .field("backend", &self.backend.name())
            .field("out", &self.out)
            .field("inp", &self.inp)
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl<B: Backend + Clone, F: Real> DeviceGramAccumulator<B, F> {
    /// An empty accumulator for `(out, in)` gradients on `backend`. Allocates nothing yet.
    pub fn new(backend: &B, out: usize, inp: usize) -> Self {
        DeviceGramAccumulator { backend: backend.clone(), out, inp, count: 0, grams: None }
    }

    /// `(out, in)` of the gradients this accumulator takes.
    pub fn shape(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    /// Gradients added so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Backend bytes of the Grams an accumulator of this shape holds once it has a
    /// gradient: `(out^2 + in^2) * size_of::<F>()`.
    pub fn bytes_for(out: usize, inp: usize) -> Result<usize> {
        let entries = out.checked_mul(out).zip(inp.checked_mul(inp)).and_then(|(a, b)| a.checked_add(b));
        entries.and_then(|e| e.checked_mul(std::mem::size_of::<F>())).ok_or_else(|| {
            Error::invalid("DeviceGramAccumulator", format!("Grams of a ({out}, {inp}) gradient overflow"))
        })
    }

    /// Backend bytes held now (0 before the first gradient).
    pub fn memory_bytes(&self) -> usize {
        self.grams.as_ref().map_or(0, |g| self.backend.len(g) * std::mem::size_of::<F>())
    }

    /// Adds one row-major `(out, in)` gradient held in the first `out * in` entries of
    /// `grad` (a buffer of the same backend). A short buffer gives [`Error::Shape`]; on any
    /// error the sums are unchanged. Queues the work without waiting for it.
    pub fn add(&mut self, grad: &B::Buf<F>) -> Result<()> {
        let op = "DeviceGramAccumulator::add";
        if self.out == 0 || self.inp == 0 {
            return Err(Error::invalid(op, format!("gradient shape ({}, {}) has no entries", self.out, self.inp)));
        }
        if self.grams.is_none() {
            let entries = Self::bytes_for(self.out, self.inp)? / std::mem::size_of::<F>();
            self.grams = Some(self.backend.alloc(entries)?);
        }
        let grams = self.grams.as_mut().expect("allocated above");
        self.backend.gram_accumulate(grad, self.out, self.inp, grams)?;
        self.count = self.count.saturating_add(1);
        Ok(())
    }

    /// The sums on the host, in a [`GramAccumulator`] (one download of both Grams). A
    /// non-finite entry (a NaN/inf gradient, or f32 overflow) is [`Error::NonFinite`].
    pub fn to_host(&self) -> Result<GramAccumulator> {
        let op = "DeviceGramAccumulator::to_host";
        let Some(grams) = &self.grams else {
            return Ok(GramAccumulator::new(self.out, self.inp));
        };
        let oo = self.out * self.out;
        let total = oo + self.inp * self.inp;
        let host = self.backend.download(grams, total)?;
        let widen = |s: &[F]| -> Result<Vec<f64>> {
            let mut v = Vec::new();
            v.try_reserve_exact(s.len()).map_err(|_| Error::OutOfMemory {
                what: format!("a host copy of a {} x {} Gram", self.out, self.inp),
                bytes: s.len() as u128 * 8,
            })?;
            v.extend(s.iter().map(|x| x.to_f64()));
            Ok(v)
        };
        let (gram_out, gram_in) = (widen(&host[..oo])?, widen(&host[oo..])?);
        drop(host);
        GramAccumulator::from_sums(self.out, self.inp, self.count, gram_out, gram_in).map_err(|e| match e {
            Error::NonFinite { what, count, first_index } => Error::NonFinite {
                what: format!(
                    "{what} accumulated by {op} (a gradient held NaN/inf, or entries too large to square in {})",
                    F::NAME
                ),
                count,
                first_index,
            },
            e => e,
        })
    }

    /// Downloads the sums and eigensolves them into the basis of `group` (see
    /// [`GramAccumulator::basis`]). Errors if no gradient was added.
    pub fn basis(&self, group: &str) -> Result<Basis> {
        self.to_host()?.basis(group)
    }
}

/// Seconds one group's basis took after the accumulation: the download of its Grams
/// (zero on the host route) and the eigensolve.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BasisTiming {
    pub download_seconds: f64,
    pub eigensolve_seconds: f64,
}

/// The Gram accumulators of a preliminary phase, one per group, on the route that suits
/// the backend: device accumulators ([`DeviceGramAccumulator`]) when its buffers live on
/// a device, host [`GramAccumulator`]s fed with downloaded copies on the CPU backend.
pub struct GramSet<B: Backend, F: Real = f32> {
    backend: B,
    host: BTreeMap<String, GramAccumulator>,
    device: Option<BTreeMap<String, DeviceGramAccumulator<B, F>>>,
}

impl<B: Backend + Clone, F: Real> GramSet<B, F> {
    /// The route for `backend`: on the device unless its buffers are host memory
    /// ([`Backend::HOST_MEMORY`], the CPU backend, which keeps the host path).
    pub fn new(backend: &B) -> Self {
        Self::with_route(backend, !B::HOST_MEMORY)
    }

    /// A chosen route: `on_device` accumulates with the backend's op (any backend, the CPU
    /// included, for tests), otherwise on the host.
    pub fn with_route(backend: &B, on_device: bool) -> Self {
        GramSet { backend: backend.clone(), host: BTreeMap::new(), device: on_device.then(BTreeMap::new) }
    }

    /// Whether the Grams accumulate on the backend's device.
    pub fn on_device(&self) -> bool {
        self.device.is_some()
    }

    /// Adds one row-major `(out, in)` gradient held in `grad` (first `out * in` entries) to
    /// the accumulator of `group`, made on first use. A group seen before with another shape
    /// is [`Error::Shape`].
    pub fn add(&mut self, group: &str, grad: &B::Buf<F>, out: usize, inp: usize) -> Result<()> {
        let op = "GramSet::add";
        let check = |have: (usize, usize)| -> Result<()> {
            if have != (out, inp) {
                return Err(Error::shape(
                    op,
                    format!("gradient of group `{group}`"),
                    format!("{have:?}"),
                    format!("{:?}", (out, inp)),
                ));
            }
            Ok(())
        };
        match &mut self.device {
            Some(device) => {
                let acc = device
                    .entry(group.to_string())
                    .or_insert_with(|| DeviceGramAccumulator::new(&self.backend, out, inp));
                check(acc.shape())?;
                acc.add(grad)
            }
            None => {
                let n = out.checked_mul(inp).ok_or_else(|| Error::invalid(op, "out * in overflows"))?;
                let acc = self.host.entry(group.to_string()).or_insert_with(|| GramAccumulator::new(out, inp));
                check(acc.shape())?;
                let g: Vec<f32> = self.backend.download(grad, n)?.into_iter().map(|v| v.to_f64() as f32).collect();
                acc.add(&g)
            }
        }
    }

    /// The groups that received gradients, sorted.
    pub fn groups(&self) -> Vec<String> {
        match &self.device {
            Some(d) => d.keys().cloned().collect(),
            None => self.host.keys().cloned().collect(),
        }
    }

    /// Gradients added to `group` (0 for a group never seen).
    pub fn count(&self, group: &str) -> u64 {
        match &self.device {
            Some(d) => d.get(group).map_or(0, |a| a.count()),
            None => self.host.get(group).map_or(0, |a| a.count()),
        }
    }

    /// The basis of `group` (one download on the device route, then the eigensolve on the
    /// CPU) and where its time went. A group that received no gradient is an error naming it.
    pub fn basis(&self, group: &str) -> Result<(Basis, BasisTiming)> {
        let none = || Error::invalid("GramSet::basis", format!("no gradients were collected for group `{group}`"));
        let (downloaded, download_seconds);
        let acc = match &self.device {
            Some(d) => {
                let t0 = Instant::now();
                downloaded = d.get(group).ok_or_else(none)?.to_host()?;
                download_seconds = t0.elapsed().as_secs_f64();
                &downloaded
            }
            None => {
                download_seconds = 0.0;
                self.host.get(group).ok_or_else(none)?
            }
        };
        let t1 = Instant::now();
        let basis = acc.basis(group)?;
        let timing = BasisTiming { download_seconds, eigensolve_seconds: t1.elapsed().as_secs_f64() };
        Ok((basis, timing))
    }
}
