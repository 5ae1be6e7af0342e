//! The op set every backend implements. Layer, block and model math is written once
//! against [`Backend`]; [`cpu::Cpu`] is the readable specification and
//! [`cuda::Cuda`] runs the same ops through hand-written kernels and cuBLAS.
//!
//! Conventions shared by all ops:
//! - matrices are row-major and contiguous unless a [`Gemm`] says otherwise;
//! - every op writes into caller-owned outputs (no allocation inside ops on hot paths);
//! - buffers may be longer than the logical size an op is given (workspaces sized for
//!   the largest batch); ops check `len >= needed` and return
//!   [`Error::Shape`](crate::Error::Shape) otherwise;
//! - index buffers are `u32`.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod gemm;
pub(crate) mod operand;

pub use gemm::Gemm;
pub use operand::Precision;

use crate::error::Result;
use crate::scalar::{Elem, Real};
use half::bf16;

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
        let t = step.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - (self.beta1 as f64).powi(t);
        let bc2 = 1.0 - (self.beta2 as f64).powi(t);
        self.lr as f64 * bc2.sqrt() / bc1
    }
}

/// A COO list of `len` entries of a `(shape.0, shape.1)` matrix, sorted by linear index.
/// Buffers hold `capacity` entries; only the first `len` are meaningful.
pub struct Coo<B: Backend, F: Elem> {
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

/// Result of [`Backend::nonzero_rows_cols`]: counts of the compacted index lists and the
/// absolute threshold `threshold_rel * max|m|` that was applied.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NonzeroBlock<F> {
    pub n_rows: usize,
    pub n_cols: usize,
    pub abs_threshold: F,
}

/// Optional maps restoring block indices to full-matrix indices in [`Backend::topk_coo`].
/// Both maps must be strictly increasing, so block order equals full linear order.
pub struct IndexMaps<'a, B: Backend> {
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

/// How [`Backend::pool_rows`] turns a sequence's token rows into one vector.
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

/// The op set. Every method has a CPU twin (the specification) and a CUDA launcher with
/// the same argument names. All `F: Real` ops run in f32 on CUDA (f64 is CPU-only and
/// returns [`crate::Error::UnsupportedDtype`] there).
pub trait Backend: Send + Sync + Sized + 'static {
    /// A device buffer of `T`.
    type Buf<T: Elem>: Send + Sync + 'static;
    /// Scratch space for [`Backend::topk_coo`], sized once by [`Backend::topk_workspace`].
    type TopkWorkspace: Send + Sync + 'static;

    fn name(&self) -> &'static str;
    /// Identifies the backend instance (clones share it): buffers of backends with the
    /// same id are interchangeable, so layers may share them (see [`crate::Basis`]).
    fn instance_id(&self) -> usize;

    // ---- memory -------------------------------------------------------------------
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

    // ---- dense --------------------------------------------------------------------
    /// `C = alpha op(A) op(B) + beta C` in `F`.
    fn gemm<F: Real>(&self, spec: &Gemm, a: &Self::Buf<F>, b: &Self::Buf<F>, c: &mut Self::Buf<F>) -> Result<()>;
    /// The same with bf16 operands and an `F` output, accumulating in f32 (cuBLAS GemmEx).
    fn gemm_bf16<F: Real>(
        &self,
        spec: &Gemm,
        a: &Self::Buf<bf16>,
        b: &Self::Buf<bf16>,
        c: &mut Self::Buf<F>,
    ) -> Result<()>;
    /// `dst[i] = bf16(src[i])`, round to nearest even.
    fn cast_to_bf16<F: Real>(&self, src: &Self::Buf<F>, dst: &mut Self::Buf<bf16>, len: usize) -> Result<()>;
    /// `dst[i] = F(src[i])`.
    fn cast_from_bf16<F: Real>(&self, src: &Self::Buf<bf16>, dst: &mut Self::Buf<F>, len: usize) -> Result<()>;
    /// `y[r, c] += bias[c]` for a `(rows, cols)` matrix.
    fn add_bias<F: Real>(&self, y: &mut Self::Buf<F>, bias: &Self::Buf<F>, rows: usize, cols: usize) -> Result<()>;
    /// `db[c] = beta * db[c] + sum_r g[r, c]` (column sums of a `(rows, cols)` matrix).
    fn bias_grad<F: Real>(
        &self,
        g: &Self::Buf<F>,
        rows: usize,
        cols: usize,
        db: &mut Self::Buf<F>,
        beta: F,
    ) -> Result<()>;
    /// Number of NaN/inf entries in `x[..len]` and the index of the first one.
    fn count_nonfinite<F: Real>(&self, x: &Self::Buf<F>, len: usize) -> Result<(usize, usize)>;
    /// `y[..len] += alpha * x[..len]`.
    fn axpy<F: Real>(&self, alpha: F, x: &Self::Buf<F>, y: &mut Self::Buf<F>, len: usize) -> Result<()>;

    // ---- activations (elementwise, `len` entries) ------------------------------------
    /// `y = gelu(x)` in the erf form (BERT) or the tanh approximation.
    fn gelu<F: Real>(&self, x: &Self::Buf<F>, y: &mut Self::Buf<F>, len: usize, kind: GeluKind) -> Result<()>;
    /// `dx = dy * gelu'(x)`.
    fn gelu_backward<F: Real>(
        &self,
        x: &Self::Buf<F>,
        dy: &Self::Buf<F>,
        dx: &mut Self::Buf<F>,
        len: usize,
        kind: GeluKind,
    ) -> Result<()>;
    /// SwiGLU: `h = silu(gate) * up`, `silu(z) = z / (1 + exp(-z))`.
    fn swiglu<F: Real>(&self, gate: &Self::Buf<F>, up: &Self::Buf<F>, h: &mut Self::Buf<F>, len: usize) -> Result<()>;
    /// `d_gate = dh * up * silu'(gate)`, `d_up = dh * silu(gate)`.
    #[allow(clippy::too_many_arguments)]
    fn swiglu_backward<F: Real>(
        &self,
        gate: &Self::Buf<F>,
        up: &Self::Buf<F>,
        dh: &Self::Buf<F>,
        d_gate: &mut Self::Buf<F>,
        d_up: &mut Self::Buf<F>,
        len: usize,
    ) -> Result<()>;

    // ---- transformer ops (the frozen rest of a model that gradients flow through) ---------
    /// RMSNorm over the rows of `x` `(rows, cols)`: `inv_rms[r] = 1 / sqrt(mean(x[r, :]^2) + eps)`
    /// (written, for the backward), `y[r, c] = x[r, c] * inv_rms[r] * w[c]`.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm<F: Real>(
        &self,
        x: &Self::Buf<F>,
        w: &Self::Buf<F>,
        y: &mut Self::Buf<F>,
        inv_rms: &mut Self::Buf<F>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()>;
    /// Input gradient of [`Backend::rmsnorm`] (`w` is frozen: no weight gradient):
    /// `dx[r, c] = inv_rms[r] * (w[c] dy[r, c] - x[r, c] inv_rms[r]^2 mean_c'(w dy x)[r])`.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward<F: Real>(
        &self,
        x: &Self::Buf<F>,
        w: &Self::Buf<F>,
        inv_rms: &Self::Buf<F>,
        dy: &Self::Buf<F>,
        dx: &mut Self::Buf<F>,
        rows: usize,
        cols: usize,
    ) -> Result<()>;
    /// Rotary position embedding in the rotate-half layout, in place on `x`
    /// `(tokens, heads * head_dim)`. Token `t` sits at position `p = t % seq_len`; for
    /// `i < head_dim / 2`, with `c = cos[p, i]`, `s = sin[p, i]` (tables `(seq_len, head_dim/2)`):
    /// `(x_i, x_{i+h}) <- (x_i c - x_{i+h} s, x_i s + x_{i+h} c)`, `h = head_dim / 2`.
    /// `inverse` rotates by the opposite angle: the backward of the forward rotation.
    #[allow(clippy::too_many_arguments)]
    fn rope<F: Real>(
        &self,
        x: &mut Self::Buf<F>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        seq_len: usize,
        cos: &Self::Buf<F>,
        sin: &Self::Buf<F>,
        inverse: bool,
    ) -> Result<()>;
    /// Causal softmax in place over `mats` row-major `(t, t)` matrices: in row `i`,
    /// `p_j = exp(scale s_ij - max) / sum` over `j <= i`, and `p_j = 0` for `j > i`.
    fn softmax_causal<F: Real>(&self, s: &mut Self::Buf<F>, mats: usize, t: usize, scale: f32) -> Result<()>;
    /// Backward of [`Backend::softmax_causal`] with respect to the unscaled scores:
    /// `ds_ij = scale * p_ij (dp_ij - sum_j' p_ij' dp_ij')` (0 above the diagonal).
    fn softmax_causal_backward<F: Real>(
        &self,
        p: &Self::Buf<F>,
        dp: &Self::Buf<F>,
        ds: &mut Self::Buf<F>,
        mats: usize,
        t: usize,
        scale: f32,
    ) -> Result<()>;
    /// Masked cross-entropy of `logits` `(rows, vocab)`:
    /// `losses[r] = mask[r] (logsumexp(logits[r]) - logits[r, targets[r]])`, and `logits` is
    /// replaced by its gradient `grad_scale mask[r] (softmax(logits[r]) - onehot(targets[r]))`.
    /// Rows with `mask[r] = 0` get zero loss and gradient whatever their target.
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy<F: Real>(
        &self,
        logits: &mut Self::Buf<F>,
        targets: &Self::Buf<u32>,
        mask: &Self::Buf<F>,
        rows: usize,
        vocab: usize,
        grad_scale: F,
        losses: &mut Self::Buf<F>,
    ) -> Result<()>;

    // ---- encoder ops (BERT: LayerNorm, padding-masked softmax, pooling) ---------------
    // Padding is a length per sequence: sequence `b` has `n = min(lengths[b], t)` real
    // tokens, then padding (right-padded batches); a length of 0 is allowed (all padding).
    /// LayerNorm over the rows of `x` `(rows, cols)`: `mean[r]`, `rstd[r] = 1 / sqrt(var[r] + eps)`
    /// (population variance; both written for the backward), `y = (x - mean) rstd w + b`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm<F: Real>(
        &self,
        x: &Self::Buf<F>,
        w: &Self::Buf<F>,
        b: &Self::Buf<F>,
        y: &mut Self::Buf<F>,
        mean: &mut Self::Buf<F>,
        rstd: &mut Self::Buf<F>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()>;
    /// Input gradient of [`Backend::layernorm`]: with `xh = (x - mean) rstd`, `g = w dy`,
    /// `dx = rstd (g - mean_c(g) - xh mean_c(g xh))`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward<F: Real>(
        &self,
        x: &Self::Buf<F>,
        w: &Self::Buf<F>,
        mean: &Self::Buf<F>,
        rstd: &Self::Buf<F>,
        dy: &Self::Buf<F>,
        dx: &mut Self::Buf<F>,
        rows: usize,
        cols: usize,
    ) -> Result<()>;
    /// Affine parameter gradients of [`Backend::layernorm`]:
    /// `dw[c] = beta dw[c] + sum_r dy[r, c] xh[r, c]`, `db[c] = beta db[c] + sum_r dy[r, c]`
    /// (`beta = 0` overwrites).
    #[allow(clippy::too_many_arguments)]
    fn layernorm_param_grads<F: Real>(
        &self,
        x: &Self::Buf<F>,
        mean: &Self::Buf<F>,
        rstd: &Self::Buf<F>,
        dy: &Self::Buf<F>,
        dw: &mut Self::Buf<F>,
        db: &mut Self::Buf<F>,
        rows: usize,
        cols: usize,
        beta: F,
    ) -> Result<()>;
    /// Bidirectional softmax in place over `mats = batch * heads` row-major `(t, t)` score
    /// matrices, matrix `m` belonging to sequence `m / heads`: in every row,
    /// `p_j = exp(scale s_j - max) / sum` over the real keys `j < n`, and `p_j = 0` for the
    /// padding keys `j >= n` (a row of zeros when `n = 0`).
    fn softmax_masked<F: Real>(
        &self,
        s: &mut Self::Buf<F>,
        lengths: &Self::Buf<u32>,
        mats: usize,
        heads: usize,
        t: usize,
        scale: f32,
    ) -> Result<()>;
    /// Backward of [`Backend::softmax_masked`] with respect to the unscaled scores:
    /// `ds_j = scale p_j (dp_j - sum_{j' < n} p_j' dp_j')`, 0 for padding keys.
    #[allow(clippy::too_many_arguments)]
    fn softmax_masked_backward<F: Real>(
        &self,
        p: &Self::Buf<F>,
        dp: &Self::Buf<F>,
        ds: &mut Self::Buf<F>,
        lengths: &Self::Buf<u32>,
        mats: usize,
        heads: usize,
        t: usize,
        scale: f32,
    ) -> Result<()>;
    /// Pools each sequence of `x` `(batch * t, cols)` into a row of `out` `(batch, cols)`:
    /// the mean of its `n` real token rows ([`PoolKind::Mean`], summed row by row in `F`) or
    /// its first row ([`PoolKind::Cls`]); a zero row when `n = 0`.
    #[allow(clippy::too_many_arguments)]
    fn pool_rows<F: Real>(
        &self,
        x: &Self::Buf<F>,
        lengths: &Self::Buf<u32>,
        out: &mut Self::Buf<F>,
        batch: usize,
        t: usize,
        cols: usize,
        kind: PoolKind,
    ) -> Result<()>;
    /// Backward of [`Backend::pool_rows`]: `dx` `(batch * t, cols)` gets `dout[b] / n` on the
    /// real rows (mean) or `dout[b]` on row 0 (CLS), zero elsewhere (overwritten).
    #[allow(clippy::too_many_arguments)]
    fn pool_rows_backward<F: Real>(
        &self,
        dout: &Self::Buf<F>,
        lengths: &Self::Buf<u32>,
        dx: &mut Self::Buf<F>,
        batch: usize,
        t: usize,
        cols: usize,
        kind: PoolKind,
    ) -> Result<()>;

    // ---- sparse-by-dense ----------------------------------------------------------
    /// For a `(rows, cols)` matrix `m`, with `t = threshold_rel * max|m|`: writes the
    /// ascending indices of rows (into `row_idx`) and columns (into `col_idx`) holding an
    /// entry with `|v| >= t` and `v != 0`. Returns the counts and `t`.
    fn nonzero_rows_cols<F: Real>(
        &self,
        m: &Self::Buf<F>,
        rows: usize,
        cols: usize,
        threshold_rel: F,
        row_idx: &mut Self::Buf<u32>,
        col_idx: &mut Self::Buf<u32>,
    ) -> Result<NonzeroBlock<F>>;
    /// `dst[i, :] = src[row_idx[i], :]` for `i < n_idx`, rows of length `cols`.
    fn gather_rows<T: Elem>(
        &self,
        src: &Self::Buf<T>,
        src_rows: usize,
        cols: usize,
        row_idx: &Self::Buf<u32>,
        n_idx: usize,
        dst: &mut Self::Buf<T>,
    ) -> Result<()>;
    /// `dst[i, j] = v` where `v = src[row_idx[i], col_idx[j]]` if `|v| >= abs_threshold`,
    /// else 0; `dst` is `(n_rows, n_cols)`.
    #[allow(clippy::too_many_arguments)]
    fn gather_block<F: Real>(
        &self,
        src: &Self::Buf<F>,
        src_rows: usize,
        src_cols: usize,
        row_idx: &Self::Buf<u32>,
        n_rows: usize,
        col_idx: &Self::Buf<u32>,
        n_cols: usize,
        abs_threshold: F,
        dst: &mut Self::Buf<F>,
    ) -> Result<()>;

    // ---- top-k --------------------------------------------------------------------
    /// Scratch for selecting from matrices of up to `max_len` entries.
    fn topk_workspace(&self, max_len: usize) -> Result<Self::TopkWorkspace>;
    /// Keeps the `k` entries of largest magnitude of the full matrix described by `maps`
    /// (the `(rows, cols)` block `m`, placed through the maps; entries outside the block
    /// are zero), ties to the lower full linear index, written to `out` sorted by linear
    /// index. Fails with [`crate::Error::NonFinite`] if `m` holds NaN or infinity.
    #[allow(clippy::too_many_arguments)]
    fn topk_coo<F: Real>(
        &self,
        m: &Self::Buf<F>,
        rows: usize,
        cols: usize,
        k: usize,
        maps: &IndexMaps<'_, Self>,
        ws: &mut Self::TopkWorkspace,
        out: &mut Coo<Self, F>,
    ) -> Result<()>;

    // ---- COO ----------------------------------------------------------------------
    /// `dense[r, c] += alpha * v` for every entry; `dense` has `coo.shape`.
    fn coo_scatter_add<F: Real>(&self, coo: &Coo<Self, F>, alpha: F, dense: &mut Self::Buf<F>) -> Result<()>;
    /// Distinct rows of a sorted COO list into `unique_rows` (ascending) and, per entry,
    /// the position of its row in that list into `slot`. Returns the number of rows.
    fn coo_compact_rows<F: Real>(
        &self,
        coo: &Coo<Self, F>,
        unique_rows: &mut Self::Buf<u32>,
        slot: &mut Self::Buf<u32>,
    ) -> Result<usize>;
    /// `out[i, s] = sum over entries e with slot[e] = s of values[e] * b[i, cols[e]]`, i.e.
    /// `out = B D^T` for the row-compacted sparse `D`. `b` is `(b_rows, coo.shape.1)`, `out` is
    /// `(b_rows, n_slots)`, overwritten.
    fn coo_dense_t<F: Real>(
        &self,
        coo: &Coo<Self, F>,
        slot: &Self::Buf<u32>,
        n_slots: usize,
        b: &Self::Buf<F>,
        b_rows: usize,
        out: &mut Self::Buf<F>,
    ) -> Result<()>;

    // ---- optimizers ---------------------------------------------------------------
    /// PyTorch SparseAdam on the listed entries of a `coo.shape` parameter at step
    /// `step` (1-based): updates `exp_avg`, `exp_avg_sq` and, if given, `param`; if
    /// `delta` is given, writes each entry's change of the parameter into it (length
    /// `coo.len`). Entries not listed are untouched.
    #[allow(clippy::too_many_arguments)]
    fn sparse_adam<F: Real>(
        &self,
        coo: &Coo<Self, F>,
        exp_avg: &mut Self::Buf<F>,
        exp_avg_sq: &mut Self::Buf<F>,
        step: u64,
        hp: &AdamParams,
        param: Option<&mut Self::Buf<F>>,
        delta: Option<&mut Self::Buf<F>>,
    ) -> Result<()>;
    /// Dense AdamW (PyTorch semantics, decoupled weight decay) on `len` entries.
    #[allow(clippy::too_many_arguments)]
    fn adamw<F: Real>(
        &self,
        param: &mut Self::Buf<F>,
        grad: &Self::Buf<F>,
        exp_avg: &mut Self::Buf<F>,
        exp_avg_sq: &mut Self::Buf<F>,
        len: usize,
        step: u64,
        hp: &AdamParams,
    ) -> Result<()>;
}
