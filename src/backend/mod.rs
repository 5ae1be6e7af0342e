//! The op set every backend implements. Layer, block and model math is written once
//! against [`Backend`]; [`cpu::Cpu`] is the readable specification and
//! [`cuda::Cuda`] runs the same ops through hand-written kernels and cuBLAS.
//!
//! [`Backend`] is the memory ops plus one trait per op family ([`DenseOps`],
//! [`TransformerOps`], [`EncoderOps`], [`AttentionOps`], [`SparseOps`], [`TopkOps`], [`OptimOps`]), all over
//! the buffer type of [`Buffers`]. Code generic over `B: Backend` calls every op directly;
//! code that calls ops on a concrete backend imports the family traits it uses.
//!
//! Conventions shared by all ops:
//! - matrices are row-major and contiguous unless a [`Gemm`] says otherwise;
//! - every op writes into caller-owned outputs (no allocation inside ops on hot paths);
//! - buffers may be longer than the logical size an op is given (workspaces sized for
//!   the largest batch); ops check `len >= needed` and return
//!   [`Error::Shape`](crate::Error::Shape) otherwise, through one validator per op that both
//!   backends call;
//! - index buffers are `u32`.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod gemm;
pub(crate) mod operand;
mod ops;

pub use gemm::Gemm;
pub use operand::Precision;
pub use ops::attention::{AttentionGrads, AttentionMask, AttentionOps, AttentionShape};
pub use ops::dense::DenseOps;
pub use ops::encoder::EncoderOps;
pub use ops::optim::{AdamwJob, OptimOps, SparseAdamJob, CLOCK_LEN};
pub use ops::sparse::SparseOps;
pub use ops::topk::{TopkJob, TopkOps};
pub use ops::transformer::{LossScale, RopeHalves, TransformerOps};
pub use ops::OutBuf;

use crate::error::Result;
use crate::scalar::{Elem, Real};

/// Adam hyperparameters. `weight_decay` is decoupled (AdamW); SparseAdam ignores it,
/// as PyTorch's does not have one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamParams {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamParams {
    fn default() -> Self {
        AdamParams { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

impl AdamParams {
    pub fn validate(&self) -> Result<()> {
        use crate::error::Error;
        let ok = self.lr.is_finite()
            && self.lr >= 0.0
            && (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2)
            && self.eps.is_finite()
            && self.eps > 0.0
            && self.weight_decay.is_finite()
            && self.weight_decay >= 0.0;
        if !ok {
            return Err(Error::invalid("adam", format!("hyperparameters out of range: {self:?}")));
        }
        Ok(())
    }
    /// Bias-corrected step size `lr * sqrt(1 - b2^t) / (1 - b1^t)` at step `t` (1-based),
    /// computed in f64 so both backends agree to the last bit.
    pub fn step_size(&self, step: u64) -> f64 {
        let (bc1, bc2) = self.bias_corrections(step);
        self.lr as f64 * bc2.sqrt() / bc1
    }
    /// AdamW's per-step scalars at step `t` (1-based), from the same f64 bias corrections
    /// as [`AdamParams::step_size`], rounded to `F` once here so both backends use the
    /// same values: `step_size = lr / (1 - b1^t)`, `bc2_sqrt = sqrt(1 - b2^t)`,
    /// `decay = 1 - lr * weight_decay` (the product rounded to `F`, the difference taken in `F`).
    pub(crate) fn adamw_scalars<F: Real>(&self, step: u64) -> AdamwScalars<F> {
        let (bc1, bc2) = self.bias_corrections(step);
        AdamwScalars {
            step_size: F::from_f64(self.lr as f64 / bc1),
            bc2_sqrt: F::from_f64(bc2.sqrt()),
            decay: F::ONE - F::from_f64(self.lr as f64 * self.weight_decay as f64),
        }
    }
    /// `(1 - b1^t, 1 - b2^t)` in f64 (`t` saturates at `i32::MAX`).
    fn bias_corrections(&self, step: u64) -> (f64, f64) {
        let t = step.min(i32::MAX as u64) as i32;
        (1.0 - (self.beta1 as f64).powi(t), 1.0 - (self.beta2 as f64).powi(t))
    }
}

/// See [`AdamParams::adamw_scalars`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct AdamwScalars<F> {
    pub step_size: F,
    pub bc2_sqrt: F,
    pub decay: F,
}

/// A COO list of `len` entries of a `(shape.0, shape.1)` matrix, sorted by linear index.
/// Buffers hold `capacity` entries; only the first `len` are meaningful.
pub struct Coo<B: Buffers, F: Elem> {
    pub rows: B::Buf<u32>,
    pub cols: B::Buf<u32>,
    pub values: B::Buf<F>,
    pub len: usize,
    pub capacity: usize,
    pub shape: (usize, usize),
}

impl<B: Backend, F: Real> Coo<B, F> {
    /// An empty list with room for `capacity` entries of a `shape` matrix.
    pub fn with_capacity(backend: &B, capacity: usize, shape: (usize, usize)) -> Result<Self> {
        Ok(Coo {
            rows: backend.alloc(capacity)?,
            cols: backend.alloc(capacity)?,
            values: backend.alloc(capacity)?,
            len: 0,
            capacity,
            shape,
        })
    }
    /// Copies the entries to the host as `(rows, cols, values)`.
    pub fn to_host(&self, backend: &B) -> Result<HostCoo<F>> {
        Ok(HostCoo {
            rows: backend.download(&self.rows, self.len)?,
            cols: backend.download(&self.cols, self.len)?,
            values: backend.download(&self.values, self.len)?,
            shape: self.shape,
        })
    }
    /// Replaces the entries with a host list (must be sorted by linear index).
    pub fn set_from_host(&mut self, backend: &B, host: &HostCoo<F>) -> Result<()> {
        host.validate()?;
        if host.len() > self.capacity {
            return Err(crate::error::Error::invalid(
                "coo",
                format!("{} entries exceed capacity {}", host.len(), self.capacity),
            ));
        }
        backend.upload_into(&host.rows, &mut self.rows)?;
        backend.upload_into(&host.cols, &mut self.cols)?;
        backend.upload_into(&host.values, &mut self.values)?;
        self.len = host.len();
        self.shape = host.shape;
        Ok(())
    }
}

/// A COO list on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostCoo<F> {
    pub rows: Vec<u32>,
    pub cols: Vec<u32>,
    pub values: Vec<F>,
    pub shape: (usize, usize),
}

impl<F: Real> HostCoo<F> {
    pub fn len(&self) -> usize {
        self.values.len()
    }
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
    /// Linear indices `row * cols + col`.
    pub fn linear_indices(&self) -> Vec<u64> {
        self.rows.iter().zip(&self.cols).map(|(&r, &c)| r as u64 * self.shape.1 as u64 + c as u64).collect()
    }
    /// Checks lengths, bounds and strict ascending linear order.
    pub fn validate(&self) -> Result<()> {
        use crate::error::Error;
        if self.rows.len() != self.values.len() || self.cols.len() != self.values.len() {
            return Err(Error::shape(
                "coo",
                "rows/cols/values lengths",
                self.values.len(),
                format!("{}/{}", self.rows.len(), self.cols.len()),
            ));
        }
        let mut prev: Option<u64> = None;
        for (i, (&r, &c)) in self.rows.iter().zip(&self.cols).enumerate() {
            if r as usize >= self.shape.0 || c as usize >= self.shape.1 {
                return Err(Error::invalid("coo", format!("entry {i} at ({r}, {c}) outside {:?}", self.shape)));
            }
            let lin = r as u64 * self.shape.1 as u64 + c as u64;
            if prev.is_some_and(|p| p >= lin) {
                return Err(Error::invalid("coo", format!("entry {i} at ({r}, {c}) is not in ascending linear order")));
            }
            prev = Some(lin);
        }
        Ok(())
    }
}

/// Result of [`SparseOps::nonzero_rows_cols`]: counts of the compacted index lists and the
/// absolute threshold `threshold_rel * max|m|` that was applied.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NonzeroBlock<F> {
    pub n_rows: usize,
    pub n_cols: usize,
    pub abs_threshold: F,
}

/// Optional maps restoring block indices to full-matrix indices in [`TopkOps::topk_coo`].
/// Both maps must be strictly increasing, so block order equals full linear order.
pub struct IndexMaps<'a, B: Buffers> {
    pub row_map: Option<&'a B::Buf<u32>>,
    pub col_map: Option<&'a B::Buf<u32>>,
    /// Shape of the full matrix the restored indices refer to.
    pub full_shape: (usize, usize),
}

/// Which GELU: the exact erf form (BERT, RoBERTa) or the tanh approximation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GeluKind {
    #[default]
    Erf,
    Tanh,
}

/// How [`EncoderOps::pool_rows`] turns a sequence's token rows into one vector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PoolKind {
    /// The mean over the real (non-padding) tokens, as sentence-transformers does.
    #[default]
    Mean,
    /// The first token (\[CLS\]).
    Cls,
}

/// The byte counters behind [`MemoryStats`], shared by a backend and its buffers (each
/// buffer adds its size when made and subtracts it when dropped).
#[derive(Default, Debug)]
pub(crate) struct MemoryCounters {
    current: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
    allocations: std::sync::atomic::AtomicU64,
}

impl MemoryCounters {
    pub(crate) fn add(&self, bytes: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.current.fetch_add(bytes, Relaxed) + bytes;
        self.peak.fetch_max(now, Relaxed);
        self.allocations.fetch_add(1, Relaxed);
    }
    pub(crate) fn sub(&self, bytes: usize) {
        self.current.fetch_sub(bytes, std::sync::atomic::Ordering::Relaxed);
    }
    pub(crate) fn stats(&self) -> MemoryStats {
        use std::sync::atomic::Ordering::Relaxed;
        MemoryStats {
            current_bytes: self.current.load(Relaxed),
            peak_bytes: self.peak.load(Relaxed),
            allocations: self.allocations.load(Relaxed),
        }
    }
}

/// Counters the backend keeps of its own device memory: current and peak bytes, and
/// the number of allocations (tests use it to show hot paths allocate nothing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    pub current_bytes: usize,
    pub peak_bytes: usize,
    pub allocations: u64,
}

/// The buffer type of a backend: the one thing every op family refers to.
pub trait Buffers: Send + Sync + Sized + 'static {
    /// A device buffer of `T`.
    type Buf<T: Elem>: Send + Sync + 'static;
}

/// A backend: the memory ops here and every op family. Every op has a CPU twin and a CUDA
/// launcher with the same argument names. All `F: Real` ops run in f32 on CUDA (f64 is
/// CPU-only and returns [`crate::Error::UnsupportedDtype`] there).
pub trait Backend:
    Buffers + DenseOps + TransformerOps + EncoderOps + AttentionOps + SparseOps + TopkOps + OptimOps
{
    /// Whether buffers are host memory (the CPU backend): work that a device backend keeps
    /// on its device (e.g. the Gram accumulation of [`crate::basis::GramSet`]) may take its
    /// host path instead.
    const HOST_MEMORY: bool = false;

    fn name(&self) -> &'static str;
    /// Identifies the backend instance (clones share it): buffers of backends with the
    /// same id are interchangeable, so layers may share them (see [`crate::Basis`]).
    fn instance_id(&self) -> usize;

    fn len<T: Elem>(&self, buf: &Self::Buf<T>) -> usize;
    /// A zero-filled buffer.
    fn alloc<T: Elem>(&self, len: usize) -> Result<Self::Buf<T>>;
    fn upload<T: Elem>(&self, host: &[T]) -> Result<Self::Buf<T>>;
    /// Copies `host` into the first `host.len()` elements of `dst`.
    fn upload_into<T: Elem>(&self, host: &[T], dst: &mut Self::Buf<T>) -> Result<()>;
    /// Copies the first `len` elements to the host.
    fn download<T: Elem>(&self, buf: &Self::Buf<T>, len: usize) -> Result<Vec<T>>;
    /// `dst[..len] = src[..len]`.
    fn copy<T: Elem>(&self, src: &Self::Buf<T>, dst: &mut Self::Buf<T>, len: usize) -> Result<()>;
    /// `buf[..len] = value`.
    fn fill<T: Elem>(&self, buf: &mut Self::Buf<T>, len: usize, value: T) -> Result<()>;
    /// Waits for queued work (a no-op on the CPU).
    fn synchronize(&self) -> Result<()>;
    fn memory_stats(&self) -> MemoryStats;
    /// The roofline model layers price their choices with on this backend (SparseGrad's
    /// formulation and merged update, `linear::sparsegrad::pricing`), or `None` where they
    /// count flops instead (the CPU, whose choices are its own tuned paths).
    fn device_model(&self) -> Option<crate::perf::roofline::DeviceModel> {
        None
    }
    /// Whether f32 GEMMs run on TF32 tensor cores (`CUBLAS_COMPUTE_32F_FAST_TF32`; CUDA with
    /// [`crate::Cuda::set_tf32`]). Never on the CPU, whose f32 GEMMs are exact f32.
    fn tf32(&self) -> bool {
        false
    }

    /// Whether this backend can record queued work as a replayable graph (CUDA graphs). The
    /// CPU runs every op at once and has nothing to record.
    fn supports_capture(&self) -> bool {
        false
    }
    /// From now until [`Backend::end_capture`], ops are recorded instead of run. A captured
    /// op may not read anything back, synchronise, allocate or free, or copy from host
    /// memory: the capture then fails at `end_capture`.
    fn begin_capture(&self) -> Result<()> {
        Err(crate::error::Error::invalid("begin_capture", format!("the {} backend does not capture", self.name())))
    }
    /// Ends the capture and instantiates it: the graph to [`Backend::replay`].
    fn end_capture(&self) -> Result<GraphId> {
        Err(crate::error::Error::invalid("end_capture", format!("the {} backend does not capture", self.name())))
    }
    /// Queues every op of a captured graph again, with the same arguments and buffers (one
    /// host call on a GPU).
    fn replay(&self, graph: GraphId) -> Result<()> {
        Err(crate::error::Error::invalid("replay", format!("the {} backend has no graph {}", self.name(), graph.0)))
    }
    /// Frees a captured graph (nothing if there is none by that id).
    fn drop_graph(&self, _graph: GraphId) {}
}

/// A graph captured by [`Backend::end_capture`], owned by its backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GraphId(pub(crate) usize);

/// [`Backend::upload_into`]: `dst` holds the host slice.
pub(crate) fn check_upload_into<B: Backend, T: Elem>(be: &B, host: &[T], dst: &B::Buf<T>) -> Result<()> {
    crate::error::check_len("upload_into", "destination", be.len(dst), host.len())
}

/// [`Backend::download`]: `buf` holds `len` elements.
pub(crate) fn check_download<B: Backend, T: Elem>(be: &B, buf: &B::Buf<T>, len: usize) -> Result<()> {
    crate::error::check_len("download", "source", be.len(buf), len)
}

/// [`Backend::copy`]: both buffers hold `len` elements.
pub(crate) fn check_copy<B: Backend, T: Elem>(be: &B, src: &B::Buf<T>, dst: &B::Buf<T>, len: usize) -> Result<()> {
    crate::error::check_len("copy", "source", be.len(src), len)?;
    crate::error::check_len("copy", "destination", be.len(dst), len)
}

/// [`Backend::fill`]: `buf` holds `len` elements.
pub(crate) fn check_fill<B: Backend, T: Elem>(be: &B, buf: &B::Buf<T>, len: usize) -> Result<()> {
    crate::error::check_len("fill", "buffer", be.len(buf), len)
}
