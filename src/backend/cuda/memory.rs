//! The buffer type and memory ops of [`Cuda`]: allocation, host-device copies, device
//! copies, fill (the fill kernels of cuda/dense.cu), synchronization and the counters.

use super::dense::{fill_kernel, PER_SM};
use super::{cuda_err, kargs, Cuda, CudaBuf};
use crate::backend::{check_copy, check_download, check_fill, check_upload_into};
use crate::backend::{Backend, Buffers, MemoryStats};
use crate::error::Result;
use crate::perf::{CopyDir, EventKind};
use crate::scalar::Elem;
use cudarc::driver::result as drv;
use std::sync::Arc;

impl Buffers for Cuda {
    type Buf<T: Elem> = CudaBuf<T>;
}

impl Backend for Cuda {
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
        check_upload_into(self, host, dst)?;
        if host.is_empty() {
            return Ok(());
        }
        self.bind()?;
        let bytes = std::mem::size_of_val(host) as u64;
        self.profiler.record(EventKind::Copy { dir: CopyDir::HostToDevice, bytes, blocking: false });
        // SAFETY: dst holds at least host.len() elements; a pageable source is staged by the
        // driver before the call returns, so `host` may be dropped afterwards.
        unsafe { drv::memcpy_htod_async(dst.ptr_mut(), host, self.stream.cu_stream()) }.map_err(cuda_err("upload"))
    }

    fn download<T: Elem>(&self, buf: &CudaBuf<T>, len: usize) -> Result<Vec<T>> {
        check_download(self, buf, len)?;
        let mut host = vec![T::default(); len];
        self.read_device(buf.ptr(), &mut host)?;
        self.check_device_errors()?;
        Ok(host)
    }

    fn copy<T: Elem>(&self, src: &CudaBuf<T>, dst: &mut CudaBuf<T>, len: usize) -> Result<()> {
        check_copy(self, src, dst, len)?;
        if len == 0 {
            return Ok(());
        }
        self.bind()?;
        let bytes = (len * std::mem::size_of::<T>()) as u64;
        self.profiler.record(EventKind::Copy { dir: CopyDir::DeviceToDevice, bytes, blocking: false });
        // SAFETY: both buffers hold at least `len` elements and are distinct (&, &mut).
        unsafe {
            drv::memcpy_dtod_async(dst.ptr_mut(), src.ptr(), len * std::mem::size_of::<T>(), self.stream.cu_stream())
        }
        .map_err(cuda_err("copy"))
    }

    fn fill<T: Elem>(&self, buf: &mut CudaBuf<T>, len: usize, value: T) -> Result<()> {
        check_fill(self, buf, len)?;
        if len == 0 {
            return Ok(());
        }
        let (p, n) = (buf.ptr_mut(), len as u64);
        let cfg = self.grid_1d(len, PER_SM);
        let size = std::mem::size_of::<T>();
        let kernel =
            fill_kernel(size).ok_or(crate::Error::UnsupportedDtype { op: "fill", dtype: T::NAME, backend: "cuda" })?;
        let sizes = [n, size as u64];
        // SAFETY (all arms): `transmute_copy` reads exactly size_of::<T>() bytes of a Copy value
        // into an integer of that size; fill_uN(T* buf, u64 n, T value) writes buf[..n], and
        // `buf` holds at least `len` = n elements (checked above).
        match size {
            1 => {
                let v: u8 = unsafe { std::mem::transmute_copy(&value) };
                unsafe { self.launch(kernel, cfg, &mut kargs![p, n, v], &sizes) }
            }
            2 => {
                let v: u16 = unsafe { std::mem::transmute_copy(&value) };
                unsafe { self.launch(kernel, cfg, &mut kargs![p, n, v], &sizes) }
            }
            4 => {
                let v: u32 = unsafe { std::mem::transmute_copy(&value) };
                unsafe { self.launch(kernel, cfg, &mut kargs![p, n, v], &sizes) }
            }
            _ => {
                let v: u64 = unsafe { std::mem::transmute_copy(&value) };
                unsafe { self.launch(kernel, cfg, &mut kargs![p, n, v], &sizes) }
            }
        }
    }

    fn synchronize(&self) -> Result<()> {
        self.bind()?;
        self.profiler.record(EventKind::Sync);
        self.stream.synchronize().map_err(cuda_err("synchronize"))?;
        self.check_device_errors().map(|_| ())
    }

    fn memory_stats(&self) -> MemoryStats {
        self.counters.stats()
    }

    /// The H200 on an H200, else the H100 SXM (the emulated device included).
    fn device_model(&self) -> Option<crate::perf::roofline::DeviceModel> {
        use crate::perf::roofline::{H100_SXM, H200};
        Some(if self.device_name().contains("H200") { H200 } else { H100_SXM })
    }

    fn tf32(&self) -> bool {
        self.tf32_enabled()
    }

    fn supports_capture(&self) -> bool {
        true
    }

    fn begin_capture(&self) -> Result<()> {
        self.capture_begin()
    }

    fn end_capture(&self) -> Result<crate::backend::GraphId> {
        self.capture_end()
    }

    fn replay(&self, graph: crate::backend::GraphId) -> Result<()> {
        self.graph_replay(graph)
    }

    fn drop_graph(&self, graph: crate::backend::GraphId) {
        self.graph_drop(graph)
    }
}
