//! The CPU backend: the readable specification of every op. Dense products go to
//! OpenBLAS (`sgemm`/`dgemm`), everything else is plain Rust, parallel with rayon where
//! rows are independent. Buffers are [`CpuBuf`]s, which count their bytes so the library
//! can report peak memory.
//!
//! This file holds the buffers and the memory ops; each op family is implemented in its
//! own file (dense.rs with the activations, transformer.rs, encoder.rs, attention.rs,
//! sparse.rs, topk.rs, optim.rs; softmax.rs holds the softmax row kernels three of them
//! share), after the family's shared validator.

mod activation;
mod attention;
mod dense;
mod encoder;
mod optim;
mod softmax;
mod sparse;
mod topk;
mod transformer;

use crate::backend::{check_copy, check_download, check_fill, check_upload_into};
use crate::backend::{Backend, Buffers, MemoryCounters, MemoryStats};
use crate::error::{Error, Result};
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

impl Buffers for Cpu {
    type Buf<T: Elem> = CpuBuf<T>;
}

impl Backend for Cpu {
    const HOST_MEMORY: bool = true;

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
        check_upload_into(self, host, dst)?;
        dst[..host.len()].copy_from_slice(host);
        Ok(())
    }

    fn download<T: Elem>(&self, buf: &CpuBuf<T>, len: usize) -> Result<Vec<T>> {
        check_download(self, buf, len)?;
        Ok(buf[..len].to_vec())
    }

    fn copy<T: Elem>(&self, src: &CpuBuf<T>, dst: &mut CpuBuf<T>, len: usize) -> Result<()> {
        check_copy(self, src, dst, len)?;
        dst[..len].copy_from_slice(&src[..len]);
        Ok(())
    }

    fn fill<T: Elem>(&self, buf: &mut CpuBuf<T>, len: usize, value: T) -> Result<()> {
        check_fill(self, buf, len)?;
        buf[..len].fill(value);
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn memory_stats(&self) -> MemoryStats {
        self.counters.memory.stats()
    }
}
