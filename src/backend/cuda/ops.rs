//! The [`Backend`] trait for [`Cuda`]: memory ops here, every compute op delegated to its
//! launcher module (dense, gemm, sparse, topk, optim, transformer, encoder).

use super::{cuda_err, dense, encoder, gemm, optim, sparse, topk, transformer, Cuda, CudaBuf, CudaTopkWorkspace};
use crate::backend::{Backend, MemoryStats};
use crate::error::{check_len, Result};
use crate::scalar::Elem;
use cudarc::driver::result as drv;
use std::sync::Arc;

impl Backend for Cuda {
    type Buf<T: Elem> = CudaBuf<T>;
    type TopkWorkspace = CudaTopkWorkspace;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn instance_id(&self) -> usize {
        Arc::as_ptr(&self.0) as usize
    }

    fn len<T: Elem>(&self, buf: &CudaBuf<T>) -> usize {
        buf.len
    }

    fn alloc<T: Elem>(&self, len: usize) -> Result<CudaBuf<T>> {
        self.alloc_buf(len, true)
    }

    fn upload<T: Elem>(&self, host: &[T]) -> Result<CudaBuf<T>> {
        let mut buf = self.alloc_buf(host.len(), false)?;
        self.upload_into(host, &mut buf)?;
        Ok(buf)
    }

    fn upload_into<T: Elem>(&self, host: &[T], dst: &mut CudaBuf<T>) -> Result<()> {
        check_len("upload_into", "destination", dst.len, host.len())?;
        if host.is_empty() {
            return Ok(());
        }
        self.bind()?;
        let bytes = std::mem::size_of_val(host) as u64;
        self.profiler.record(crate::perf::EventKind::Copy { dir: crate::perf::CopyDir::HostToDevice, bytes, blocking: false });
        // SAFETY: dst holds at least host.len() elements; a pageable source is staged by the
        // driver before the call returns, so `host` may be dropped afterwards.
        unsafe { drv::memcpy_htod_async(dst.ptr_mut(), host, self.stream.cu_stream()) }.map_err(cuda_err("upload"))
    }

    fn download<T: Elem>(&self, buf: &CudaBuf<T>, len: usize) -> Result<Vec<T>> {
        check_len("download", "source", buf.len, len)?;
        let mut host = vec![T::default(); len];
        self.read_device(buf.ptr(), &mut host)?;
        self.check_device_errors()?;
        Ok(host)
    }

    fn copy<T: Elem>(&self, src: &CudaBuf<T>, dst: &mut CudaBuf<T>, len: usize) -> Result<()> {
        check_len("copy", "source", src.len, len)?;
        check_len("copy", "destination", dst.len, len)?;
        if len == 0 {
            return Ok(());
        }
        self.bind()?;
        let bytes = (len * std::mem::size_of::<T>()) as u64;
        self.profiler.record(crate::perf::EventKind::Copy { dir: crate::perf::CopyDir::DeviceToDevice, bytes, blocking: false });
        // SAFETY: both buffers hold at least `len` elements and are distinct (&, &mut).
        unsafe {
            drv::memcpy_dtod_async(dst.ptr_mut(), src.ptr(), len * std::mem::size_of::<T>(), self.stream.cu_stream())
        }
        .map_err(cuda_err("copy"))
    }

    fn fill<T: Elem>(&self, buf: &mut CudaBuf<T>, len: usize, value: T) -> Result<()> {
        dense::fill(self, buf, len, value)
    }

    fn synchronize(&self) -> Result<()> {
        self.bind()?;
        self.profiler.record(crate::perf::EventKind::Sync);
        self.stream.synchronize().map_err(cuda_err("synchronize"))?;
        self.check_device_errors()
    }

    fn memory_stats(&self) -> MemoryStats {
        self.counters.stats()
    }

    fn gemm<F: crate::Real>(
        &self,
        spec: &crate::Gemm,
        a: &CudaBuf<F>,
        b: &CudaBuf<F>,
        c: &mut CudaBuf<F>,
    ) -> Result<()> {
        gemm::gemm(self, spec, a, b, c)
    }

    fn gemm_bf16<F: crate::Real>(
        &self,
        spec: &crate::Gemm,
        a: &CudaBuf<half::bf16>,
        b: &CudaBuf<half::bf16>,
        c: &mut CudaBuf<F>,
    ) -> Result<()> {
        gemm::gemm_bf16(self, spec, a, b, c)
    }

    fn cast_to_bf16<F: crate::Real>(&self, src: &CudaBuf<F>, dst: &mut CudaBuf<half::bf16>, len: usize) -> Result<()> {
        dense::cast_to_bf16(self, src, dst, len)
    }

    fn cast_from_bf16<F: crate::Real>(
        &self,
        src: &CudaBuf<half::bf16>,
        dst: &mut CudaBuf<F>,
        len: usize,
    ) -> Result<()> {
        dense::cast_from_bf16(self, src, dst, len)
    }

    fn add_bias<F: crate::Real>(&self, y: &mut CudaBuf<F>, bias: &CudaBuf<F>, rows: usize, cols: usize) -> Result<()> {
        dense::add_bias(self, y, bias, rows, cols)
    }

    fn bias_grad<F: crate::Real>(
        &self,
        g: &CudaBuf<F>,
        rows: usize,
        cols: usize,
        db: &mut CudaBuf<F>,
        beta: F,
    ) -> Result<()> {
        dense::bias_grad(self, g, rows, cols, db, beta)
    }

    fn count_nonfinite<F: crate::Real>(&self, x: &CudaBuf<F>, len: usize) -> Result<(usize, usize)> {
        dense::count_nonfinite(self, x, len)
    }

    fn axpy<F: crate::Real>(&self, alpha: F, x: &CudaBuf<F>, y: &mut CudaBuf<F>, len: usize) -> Result<()> {
        dense::axpy(self, alpha, x, y, len)
    }

    fn gelu<F: crate::Real>(
        &self,
        x: &CudaBuf<F>,
        y: &mut CudaBuf<F>,
        len: usize,
        kind: crate::GeluKind,
    ) -> Result<()> {
        dense::gelu(self, x, y, len, kind)
    }

    fn gelu_backward<F: crate::Real>(
        &self,
        x: &CudaBuf<F>,
        dy: &CudaBuf<F>,
        dx: &mut CudaBuf<F>,
        len: usize,
        kind: crate::GeluKind,
    ) -> Result<()> {
        dense::gelu_backward(self, x, dy, dx, len, kind)
    }

    fn swiglu<F: crate::Real>(&self, gate: &CudaBuf<F>, up: &CudaBuf<F>, h: &mut CudaBuf<F>, len: usize) -> Result<()> {
        dense::swiglu(self, gate, up, h, len)
    }

    fn swiglu_backward<F: crate::Real>(
        &self,
        gate: &CudaBuf<F>,
        up: &CudaBuf<F>,
        dh: &CudaBuf<F>,
        d_gate: &mut CudaBuf<F>,
        d_up: &mut CudaBuf<F>,
        len: usize,
    ) -> Result<()> {
        dense::swiglu_backward(self, gate, up, dh, d_gate, d_up, len)
    }

    fn rmsnorm<F: crate::Real>(
        &self,
        x: &CudaBuf<F>,
        w: &CudaBuf<F>,
        y: &mut CudaBuf<F>,
        inv_rms: &mut CudaBuf<F>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        transformer::rmsnorm(self, x, w, y, inv_rms, rows, cols, eps)
    }

    fn rmsnorm_backward<F: crate::Real>(
        &self,
        x: &CudaBuf<F>,
        w: &CudaBuf<F>,
        inv_rms: &CudaBuf<F>,
        dy: &CudaBuf<F>,
        dx: &mut CudaBuf<F>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        transformer::rmsnorm_backward(self, x, w, inv_rms, dy, dx, rows, cols)
    }

    fn rope<F: crate::Real>(
        &self,
        x: &mut CudaBuf<F>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        seq_len: usize,
        cos: &CudaBuf<F>,
        sin: &CudaBuf<F>,
        inverse: bool,
    ) -> Result<()> {
        transformer::rope(self, x, tokens, heads, head_dim, seq_len, cos, sin, inverse)
    }

    fn softmax_causal<F: crate::Real>(&self, s: &mut CudaBuf<F>, mats: usize, t: usize, scale: f32) -> Result<()> {
        transformer::softmax_causal(self, s, mats, t, scale)
    }

    fn softmax_causal_backward<F: crate::Real>(
        &self,
        p: &CudaBuf<F>,
        dp: &CudaBuf<F>,
        ds: &mut CudaBuf<F>,
        mats: usize,
        t: usize,
        scale: f32,
    ) -> Result<()> {
        transformer::softmax_causal_backward(self, p, dp, ds, mats, t, scale)
    }

    fn cross_entropy<F: crate::Real>(
        &self,
        logits: &mut CudaBuf<F>,
        targets: &CudaBuf<u32>,
        mask: &CudaBuf<F>,
        rows: usize,
        vocab: usize,
        grad_scale: F,
        losses: &mut CudaBuf<F>,
    ) -> Result<()> {
        transformer::cross_entropy(self, logits, targets, mask, rows, vocab, grad_scale, losses)
    }

    fn nonzero_rows_cols<F: crate::Real>(
        &self,
        m: &CudaBuf<F>,
        rows: usize,
        cols: usize,
        threshold_rel: F,
        row_idx: &mut CudaBuf<u32>,
        col_idx: &mut CudaBuf<u32>,
    ) -> Result<crate::NonzeroBlock<F>> {
        sparse::nonzero_rows_cols(self, m, rows, cols, threshold_rel, row_idx, col_idx)
    }

    fn gather_rows<T: Elem>(
        &self,
        src: &CudaBuf<T>,
        src_rows: usize,
        cols: usize,
        row_idx: &CudaBuf<u32>,
        n_idx: usize,
        dst: &mut CudaBuf<T>,
    ) -> Result<()> {
        sparse::gather_rows(self, src, src_rows, cols, row_idx, n_idx, dst)
    }

    fn gather_block<F: crate::Real>(
        &self,
        src: &CudaBuf<F>,
        src_rows: usize,
        src_cols: usize,
        row_idx: &CudaBuf<u32>,
        n_rows: usize,
        col_idx: &CudaBuf<u32>,
        n_cols: usize,
        abs_threshold: F,
        dst: &mut CudaBuf<F>,
    ) -> Result<()> {
        sparse::gather_block(self, src, src_rows, src_cols, row_idx, n_rows, col_idx, n_cols, abs_threshold, dst)
    }

    fn topk_workspace(&self, max_len: usize) -> Result<CudaTopkWorkspace> {
        topk::workspace(self, max_len)
    }

    fn topk_coo<F: crate::Real>(
        &self,
        m: &CudaBuf<F>,
        rows: usize,
        cols: usize,
        k: usize,
        maps: &crate::IndexMaps<'_, Self>,
        ws: &mut CudaTopkWorkspace,
        out: &mut crate::Coo<Self, F>,
    ) -> Result<()> {
        topk::topk_coo(self, m, rows, cols, k, maps, ws, out)
    }

    fn coo_scatter_add<F: crate::Real>(
        &self,
        coo: &crate::Coo<Self, F>,
        alpha: F,
        dense: &mut CudaBuf<F>,
    ) -> Result<()> {
        sparse::coo_scatter_add(self, coo, alpha, dense)
    }

    fn coo_compact_rows<F: crate::Real>(
        &self,
        coo: &crate::Coo<Self, F>,
        unique_rows: &mut CudaBuf<u32>,
        slot: &mut CudaBuf<u32>,
    ) -> Result<usize> {
        sparse::coo_compact_rows(self, coo, unique_rows, slot)
    }

    fn coo_dense_t<F: crate::Real>(
        &self,
        coo: &crate::Coo<Self, F>,
        slot: &CudaBuf<u32>,
        n_slots: usize,
        b: &CudaBuf<F>,
        b_rows: usize,
        out: &mut CudaBuf<F>,
    ) -> Result<()> {
        sparse::coo_dense_t(self, coo, slot, n_slots, b, b_rows, out)
    }

    fn sparse_adam<F: crate::Real>(
        &self,
        coo: &crate::Coo<Self, F>,
        exp_avg: &mut CudaBuf<F>,
        exp_avg_sq: &mut CudaBuf<F>,
        step: u64,
        hp: &crate::AdamParams,
        param: Option<&mut CudaBuf<F>>,
        delta: Option<&mut CudaBuf<F>>,
    ) -> Result<()> {
        optim::sparse_adam(self, coo, exp_avg, exp_avg_sq, step, hp, param, delta)
    }

    fn adamw<F: crate::Real>(
        &self,
        param: &mut CudaBuf<F>,
        grad: &CudaBuf<F>,
        exp_avg: &mut CudaBuf<F>,
        exp_avg_sq: &mut CudaBuf<F>,
        len: usize,
        step: u64,
        hp: &crate::AdamParams,
    ) -> Result<()> {
        optim::adamw(self, param, grad, exp_avg, exp_avg_sq, len, step, hp)
    }

    fn layernorm<F: crate::Real>(
        &self,
        x: &CudaBuf<F>,
        w: &CudaBuf<F>,
        b: &CudaBuf<F>,
        y: &mut CudaBuf<F>,
        mean: &mut CudaBuf<F>,
        rstd: &mut CudaBuf<F>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        encoder::layernorm(self, x, w, b, y, mean, rstd, rows, cols, eps)
    }

    fn layernorm_backward<F: crate::Real>(
        &self,
        x: &CudaBuf<F>,
        w: &CudaBuf<F>,
        mean: &CudaBuf<F>,
        rstd: &CudaBuf<F>,
        dy: &CudaBuf<F>,
        dx: &mut CudaBuf<F>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        encoder::layernorm_backward(self, x, w, mean, rstd, dy, dx, rows, cols)
    }

    fn layernorm_param_grads<F: crate::Real>(
        &self,
        x: &CudaBuf<F>,
        mean: &CudaBuf<F>,
        rstd: &CudaBuf<F>,
        dy: &CudaBuf<F>,
        dw: &mut CudaBuf<F>,
        db: &mut CudaBuf<F>,
        rows: usize,
        cols: usize,
        beta: F,
    ) -> Result<()> {
        encoder::layernorm_param_grads(self, x, mean, rstd, dy, dw, db, rows, cols, beta)
    }

    fn softmax_masked<F: crate::Real>(
        &self,
        s: &mut CudaBuf<F>,
        lengths: &CudaBuf<u32>,
        mats: usize,
        heads: usize,
        t: usize,
        scale: f32,
    ) -> Result<()> {
        encoder::softmax_masked(self, s, lengths, mats, heads, t, scale)
    }

    fn softmax_masked_backward<F: crate::Real>(
        &self,
        p: &CudaBuf<F>,
        dp: &CudaBuf<F>,
        ds: &mut CudaBuf<F>,
        lengths: &CudaBuf<u32>,
        mats: usize,
        heads: usize,
        t: usize,
        scale: f32,
    ) -> Result<()> {
        encoder::softmax_masked_backward(self, p, dp, ds, lengths, mats, heads, t, scale)
    }

    fn pool_rows<F: crate::Real>(
        &self,
        x: &CudaBuf<F>,
        lengths: &CudaBuf<u32>,
        out: &mut CudaBuf<F>,
        batch: usize,
        t: usize,
        cols: usize,
        kind: crate::PoolKind,
    ) -> Result<()> {
        encoder::pool_rows(self, x, lengths, out, batch, t, cols, kind)
    }

    fn pool_rows_backward<F: crate::Real>(
        &self,
        dout: &CudaBuf<F>,
        lengths: &CudaBuf<u32>,
        dx: &mut CudaBuf<F>,
        batch: usize,
        t: usize,
        cols: usize,
        kind: crate::PoolKind,
    ) -> Result<()> {
        encoder::pool_rows_backward(self, dout, lengths, dx, batch, t, cols, kind)
    }
}
