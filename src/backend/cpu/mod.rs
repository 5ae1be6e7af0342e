//! The CPU backend: the readable specification of every op. Dense products go to
//! OpenBLAS (`sgemm`/`dgemm`), everything else is plain Rust, parallel with rayon where
//! rows are independent. Buffers are [`CpuBuf`]s, which count their bytes so the library
//! can report peak memory.

mod activation;
mod dense;
mod encoder;
mod optim;
mod sparse;
mod topk;
mod transformer;

use crate::backend::{Backend, MemoryCounters, MemoryStats};
use crate::error::{check_len, Error, Result};
use crate::scalar::Elem;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use topk::CpuTopkWorkspace;

/// The backend's memory counters plus a GEMM call count (tests show frozen projections
/// skip the weight-gradient GEMM with it).
#[derive(Default, Debug)]
struct Counters {
    memory: MemoryCounters,
    gemm_calls: AtomicU64,
}

/// A host buffer that reports its size to the backend that made it.
pub struct CpuBuf<T> {
    data: Vec<T>,
    counters: Arc<Counters>,
}

impl<T> CpuBuf<T> {
    fn new(data: Vec<T>, counters: &Arc<Counters>) -> Self {
        counters.memory.add(data.len() * std::mem::size_of::<T>());
        CpuBuf { data, counters: counters.clone() }
    }
}

impl<T> Drop for CpuBuf<T> {
    fn drop(&mut self) {
        self.counters.memory.sub(self.data.len() * std::mem::size_of::<T>());
    }
}

impl<T> Deref for CpuBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.data
    }
}

impl<T> DerefMut for CpuBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.data
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for CpuBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.data.iter().take(16)).finish()
    }
}

/// An empty Vec with room for `len` elements, or [`Error::OutOfMemory`] naming the
/// buffer and its bytes where `vec![..; len]` would abort the process.
fn try_host_vec<T>(len: usize) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| Error::OutOfMemory {
        what: format!("a cpu backend buffer of {len} x {}", std::any::type_name::<T>()),
        bytes: len as u128 * std::mem::size_of::<T>() as u128,
    })?;
    Ok(v)
}

/// The CPU backend. Cheap to clone; clones share memory counters.
#[derive(Clone, Default, Debug)]
pub struct Cpu {
    counters: Arc<Counters>,
}

impl Cpu {
    pub fn new() -> Self {
        Cpu::default()
    }

    /// GEMMs run so far (bf16 ones included); tests use it to show frozen projections
    /// skip the weight-gradient product.
    pub fn gemm_calls(&self) -> u64 {
        self.counters.gemm_calls.load(Ordering::Relaxed)
    }
}

impl Backend for Cpu {
    type Buf<T: Elem> = CpuBuf<T>;
    type TopkWorkspace = CpuTopkWorkspace;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn instance_id(&self) -> usize {
        Arc::as_ptr(&self.counters) as usize
    }

    fn len<T: Elem>(&self, buf: &CpuBuf<T>) -> usize {
        buf.data.len()
    }

    fn alloc<T: Elem>(&self, len: usize) -> Result<CpuBuf<T>> {
        let mut data = try_host_vec::<T>(len)?;
        data.resize(len, T::default());
        Ok(CpuBuf::new(data, &self.counters))
    }

    fn upload<T: Elem>(&self, host: &[T]) -> Result<CpuBuf<T>> {
        let mut data = try_host_vec::<T>(host.len())?;
        data.extend_from_slice(host);
        Ok(CpuBuf::new(data, &self.counters))
    }

    fn upload_into<T: Elem>(&self, host: &[T], dst: &mut CpuBuf<T>) -> Result<()> {
        check_len("upload_into", "destination", dst.len(), host.len())?;
        dst[..host.len()].copy_from_slice(host);
        Ok(())
    }

    fn download<T: Elem>(&self, buf: &CpuBuf<T>, len: usize) -> Result<Vec<T>> {
        check_len("download", "source", buf.len(), len)?;
        Ok(buf[..len].to_vec())
    }

    fn copy<T: Elem>(&self, src: &CpuBuf<T>, dst: &mut CpuBuf<T>, len: usize) -> Result<()> {
        check_len("copy", "source", src.len(), len)?;
        check_len("copy", "destination", dst.len(), len)?;
        dst[..len].copy_from_slice(&src[..len]);
        Ok(())
    }

    fn fill<T: Elem>(&self, buf: &mut CpuBuf<T>, len: usize, value: T) -> Result<()> {
        check_len("fill", "buffer", buf.len(), len)?;
        buf[..len].fill(value);
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn memory_stats(&self) -> MemoryStats {
        self.counters.memory.stats()
    }

    fn gemm<F: crate::Real>(&self, spec: &crate::Gemm, a: &CpuBuf<F>, b: &CpuBuf<F>, c: &mut CpuBuf<F>) -> Result<()> {
        self.counters.gemm_calls.fetch_add(1, Ordering::Relaxed);
        dense::gemm(spec, a, b, c)
    }

    fn gemm_bf16<F: crate::Real>(
        &self,
        spec: &crate::Gemm,
        a: &CpuBuf<half::bf16>,
        b: &CpuBuf<half::bf16>,
        c: &mut CpuBuf<F>,
    ) -> Result<()> {
        self.counters.gemm_calls.fetch_add(1, Ordering::Relaxed);
        dense::gemm_bf16(spec, a, b, c)
    }

    fn cast_to_bf16<F: crate::Real>(&self, src: &CpuBuf<F>, dst: &mut CpuBuf<half::bf16>, len: usize) -> Result<()> {
        dense::cast_to_bf16(src, dst, len)
    }

    fn cast_from_bf16<F: crate::Real>(&self, src: &CpuBuf<half::bf16>, dst: &mut CpuBuf<F>, len: usize) -> Result<()> {
        dense::cast_from_bf16(src, dst, len)
    }

    fn add_bias<F: crate::Real>(&self, y: &mut CpuBuf<F>, bias: &CpuBuf<F>, rows: usize, cols: usize) -> Result<()> {
        dense::add_bias(y, bias, rows, cols)
    }

    fn bias_grad<F: crate::Real>(
        &self,
        g: &CpuBuf<F>,
        rows: usize,
        cols: usize,
        db: &mut CpuBuf<F>,
        beta: F,
    ) -> Result<()> {
        dense::bias_grad(g, rows, cols, db, beta)
    }

    fn count_nonfinite<F: crate::Real>(&self, x: &CpuBuf<F>, len: usize) -> Result<(usize, usize)> {
        dense::count_nonfinite(x, len)
    }

    fn axpy<F: crate::Real>(&self, alpha: F, x: &CpuBuf<F>, y: &mut CpuBuf<F>, len: usize) -> Result<()> {
        dense::axpy(alpha, x, y, len)
    }

    fn gelu<F: crate::Real>(
        &self,
        x: &CpuBuf<F>,
        y: &mut CpuBuf<F>,
        len: usize,
        kind: crate::backend::GeluKind,
    ) -> Result<()> {
        activation::gelu(x, y, len, kind)
    }

    fn gelu_backward<F: crate::Real>(
        &self,
        x: &CpuBuf<F>,
        dy: &CpuBuf<F>,
        dx: &mut CpuBuf<F>,
        len: usize,
        kind: crate::backend::GeluKind,
    ) -> Result<()> {
        activation::gelu_backward(x, dy, dx, len, kind)
    }

    fn swiglu<F: crate::Real>(&self, gate: &CpuBuf<F>, up: &CpuBuf<F>, h: &mut CpuBuf<F>, len: usize) -> Result<()> {
        activation::swiglu(gate, up, h, len)
    }

    fn swiglu_backward<F: crate::Real>(
        &self,
        gate: &CpuBuf<F>,
        up: &CpuBuf<F>,
        dh: &CpuBuf<F>,
        d_gate: &mut CpuBuf<F>,
        d_up: &mut CpuBuf<F>,
        len: usize,
    ) -> Result<()> {
        activation::swiglu_backward(gate, up, dh, d_gate, d_up, len)
    }

    fn rmsnorm<F: crate::Real>(
        &self,
        x: &CpuBuf<F>,
        w: &CpuBuf<F>,
        y: &mut CpuBuf<F>,
        inv_rms: &mut CpuBuf<F>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        transformer::rmsnorm(x, w, y, inv_rms, rows, cols, eps)
    }

    fn rmsnorm_backward<F: crate::Real>(
        &self,
        x: &CpuBuf<F>,
        w: &CpuBuf<F>,
        inv_rms: &CpuBuf<F>,
        dy: &CpuBuf<F>,
        dx: &mut CpuBuf<F>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        transformer::rmsnorm_backward(x, w, inv_rms, dy, dx, rows, cols)
    }

    fn rope<F: crate::Real>(
        &self,
        x: &mut CpuBuf<F>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        seq_len: usize,
        cos: &CpuBuf<F>,
        sin: &CpuBuf<F>,
        inverse: bool,
    ) -> Result<()> {
        transformer::rope(x, tokens, heads, head_dim, seq_len, cos, sin, inverse)
    }

    fn softmax_causal<F: crate::Real>(&self, s: &mut CpuBuf<F>, mats: usize, t: usize, scale: f32) -> Result<()> {
        transformer::softmax_causal(s, mats, t, scale)
    }

    fn softmax_causal_backward<F: crate::Real>(
        &self,
        p: &CpuBuf<F>,
        dp: &CpuBuf<F>,
        ds: &mut CpuBuf<F>,
        mats: usize,
        t: usize,
        scale: f32,
    ) -> Result<()> {
        transformer::softmax_causal_backward(p, dp, ds, mats, t, scale)
    }

    fn cross_entropy<F: crate::Real>(
        &self,
        logits: &mut CpuBuf<F>,
        targets: &CpuBuf<u32>,
        mask: &CpuBuf<F>,
        rows: usize,
        vocab: usize,
        grad_scale: F,
        losses: &mut CpuBuf<F>,
    ) -> Result<()> {
        transformer::cross_entropy(logits, targets, mask, rows, vocab, grad_scale, losses)
    }

    fn layernorm<F: crate::Real>(
        &self,
        x: &CpuBuf<F>,
        w: &CpuBuf<F>,
        b: &CpuBuf<F>,
        y: &mut CpuBuf<F>,
        mean: &mut CpuBuf<F>,
        rstd: &mut CpuBuf<F>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        encoder::layernorm(x, w, b, y, mean, rstd, rows, cols, eps)
    }

    fn layernorm_backward<F: crate::Real>(
        &self,
        x: &CpuBuf<F>,
        w: &CpuBuf<F>,
        mean: &CpuBuf<F>,
        rstd: &CpuBuf<F>,
        dy: &CpuBuf<F>,
        dx: &mut CpuBuf<F>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        encoder::layernorm_backward(x, w, mean, rstd, dy, dx, rows, cols)
    }

    fn layernorm_param_grads<F: crate::Real>(
        &self,
        x: &CpuBuf<F>,
        mean: &CpuBuf<F>,
        rstd: &CpuBuf<F>,
        dy: &CpuBuf<F>,
        dw: &mut CpuBuf<F>,
        db: &mut CpuBuf<F>,
        rows: usize,
        cols: usize,
        beta: F,
    ) -> Result<()> {
        encoder::layernorm_param_grads(x, mean, rstd, dy, dw, db, rows, cols, beta)
    }

    fn softmax_masked<F: crate::Real>(
        &self,
        s: &mut CpuBuf<F>,
        lengths: &CpuBuf<u32>,
        mats: usize,
        heads: usize,
        t: usize,
        scale: f32,
    ) -> Result<()> {
        encoder::softmax_masked(s, lengths, mats, heads, t, scale)
    }

    fn softmax_masked_backward<F: crate::Real>(
        &self,
        p: &CpuBuf<F>,
        dp: &CpuBuf<F>,
        ds: &mut CpuBuf<F>,
        lengths: &CpuBuf<u32>,
        mats: usize,
        heads: usize,
        t: usize,
        scale: f32,
    ) -> Result<()> {
        encoder::softmax_masked_backward(p, dp, ds, lengths, mats, heads, t, scale)
    }

    fn pool_rows<F: crate::Real>(
        &self,
        x: &CpuBuf<F>,
        lengths: &CpuBuf<u32>,
        out: &mut CpuBuf<F>,
        batch: usize,
        t: usize,
        cols: usize,
        kind: crate::PoolKind,
    ) -> Result<()> {
        encoder::pool_rows(x, lengths, out, batch, t, cols, kind)
    }

    fn pool_rows_backward<F: crate::Real>(
        &self,
        dout: &CpuBuf<F>,
        lengths: &CpuBuf<u32>,
        dx: &mut CpuBuf<F>,
        batch: usize,
        t: usize,
        cols: usize,
        kind: crate::PoolKind,
    ) -> Result<()> {
        encoder::pool_rows_backward(dout, lengths, dx, batch, t, cols, kind)
    }

    fn nonzero_rows_cols<F: crate::Real>(
        &self,
        m: &CpuBuf<F>,
        rows: usize,
        cols: usize,
        threshold_rel: F,
        row_idx: &mut CpuBuf<u32>,
        col_idx: &mut CpuBuf<u32>,
    ) -> Result<crate::backend::NonzeroBlock<F>> {
        sparse::nonzero_rows_cols(m, rows, cols, threshold_rel, row_idx, col_idx)
    }

    fn gather_rows<T: Elem>(
        &self,
        src: &CpuBuf<T>,
        src_rows: usize,
        cols: usize,
        row_idx: &CpuBuf<u32>,
        n_idx: usize,
        dst: &mut CpuBuf<T>,
    ) -> Result<()> {
        sparse::gather_rows(src, src_rows, cols, row_idx, n_idx, dst)
    }

    fn gather_block<F: crate::Real>(
        &self,
        src: &CpuBuf<F>,
        src_rows: usize,
        src_cols: usize,
        row_idx: &CpuBuf<u32>,
        n_rows: usize,
        col_idx: &CpuBuf<u32>,
        n_cols: usize,
        abs_threshold: F,
        dst: &mut CpuBuf<F>,
    ) -> Result<()> {
        sparse::gather_block(src, src_rows, src_cols, row_idx, n_rows, col_idx, n_cols, abs_threshold, dst)
    }

    fn topk_workspace(&self, max_len: usize) -> Result<CpuTopkWorkspace> {
        Ok(CpuTopkWorkspace::new(max_len))
    }

    fn topk_coo<F: crate::Real>(
        &self,
        m: &CpuBuf<F>,
        rows: usize,
        cols: usize,
        k: usize,
        maps: &crate::backend::IndexMaps<'_, Self>,
        ws: &mut CpuTopkWorkspace,
        out: &mut crate::Coo<Self, F>,
    ) -> Result<()> {
        topk::topk_coo(m, rows, cols, k, maps, ws, out)
    }

    fn coo_scatter_add<F: crate::Real>(
        &self,
        coo: &crate::Coo<Self, F>,
        alpha: F,
        dense: &mut CpuBuf<F>,
    ) -> Result<()> {
        sparse::coo_scatter_add(coo, alpha, dense)
    }

    fn coo_compact_rows<F: crate::Real>(
        &self,
        coo: &crate::Coo<Self, F>,
        unique_rows: &mut CpuBuf<u32>,
        slot: &mut CpuBuf<u32>,
    ) -> Result<usize> {
        sparse::coo_compact_rows(coo, unique_rows, slot)
    }

    fn coo_dense_t<F: crate::Real>(
        &self,
        coo: &crate::Coo<Self, F>,
        slot: &CpuBuf<u32>,
        n_slots: usize,
        b: &CpuBuf<F>,
        b_rows: usize,
        out: &mut CpuBuf<F>,
    ) -> Result<()> {
        sparse::coo_dense_t(coo, slot, n_slots, b, b_rows, out)
    }

    fn sparse_adam<F: crate::Real>(
        &self,
        coo: &crate::Coo<Self, F>,
        exp_avg: &mut CpuBuf<F>,
        exp_avg_sq: &mut CpuBuf<F>,
        step: u64,
        hp: &crate::AdamParams,
        param: Option<&mut CpuBuf<F>>,
        delta: Option<&mut CpuBuf<F>>,
    ) -> Result<()> {
        optim::sparse_adam(coo, exp_avg, exp_avg_sq, step, hp, param, delta)
    }

    fn adamw<F: crate::Real>(
        &self,
        param: &mut CpuBuf<F>,
        grad: &CpuBuf<F>,
        exp_avg: &mut CpuBuf<F>,
        exp_avg_sq: &mut CpuBuf<F>,
        len: usize,
        step: u64,
        hp: &crate::AdamParams,
    ) -> Result<()> {
        optim::adamw(param, grad, exp_avg, exp_avg_sq, len, step, hp)
    }
}
