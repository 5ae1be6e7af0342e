//! Running inside an engine that owns the CUDA context, the stream and the tensors: a
//! backend on the engine's stream ([`Cuda::from_stream`]), the engine's device buffers used
//! in place without taking them over ([`Cuda::view`] to read, [`Cuda::with_view_mut`] to
//! write), and a buffer of this backend handed to the engine as a plain cudarc slice
//! ([`CudaBuf::into_slice`]).
//!
//! A view is a [`CudaBuf`] marked as borrowed: its drop never frees the engine's memory and
//! it is not counted in [`Backend::memory_stats`](crate::Backend::memory_stats). The view
//! records cudarc's read/write events on the backend's stream when it ends, so an engine
//! that tracks events across streams sees this backend's use of its buffers.

use super::{libraries_present, no_panic, Counters, Cuda, CudaBuf};
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop};
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::sync::Arc;

/// An engine's device buffer, read in place as a [`CudaBuf`] (see [`Cuda::view`]).
pub struct CudaBufRef<'a, T> {
    buf: CudaBuf<T>,
    // Dropped after `buf`: records the read on the backend's stream once this backend's
    // work on the buffer is queued.
    _sync: SyncOnDrop<'a>,
    _borrow: PhantomData<&'a [T]>,
}

impl<T> std::ops::Deref for CudaBufRef<'_, T> {
    type Target = CudaBuf<T>;
    fn deref(&self) -> &CudaBuf<T> {
        &self.buf
    }
}

impl<T> CudaBuf<T> {
    /// The buffer as a cudarc slice on the backend's stream, for an engine to own from now
    /// on (an op's output handed back to it). A zero-length buffer gives a one-element slice
    /// (every buffer holds device memory); its length is 0 here and 1 there.
    pub fn into_slice(self) -> Result<CudaSlice<T>> {
        if self.borrowed {
            return Err(Error::invalid("CudaBuf::into_slice", "the buffer is a view of memory the engine owns"));
        }
        let mut this = ManuallyDrop::new(self);
        this.counters.sub(this.len * std::mem::size_of::<T>());
        // SAFETY: `this` is never dropped, so each field is moved out exactly once.
        let (slice, counters, profiler) = unsafe {
            (ManuallyDrop::take(&mut this.slice), std::ptr::read(&this.counters), std::ptr::read(&this.profiler))
        };
        drop(counters);
        drop(profiler);
        Ok(slice)
    }
}

impl Cuda {
    /// The backend on a stream an engine created and owns: every kernel, cuBLAS call,
    /// allocation, copy and free of this backend and of its clones goes to `stream`, in the
    /// stream's context, so the engine orders this backend's work like its own. The
    /// context's settings (event tracking included) are left as the engine set them.
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Cuda> {
        if !super::kernels::HAS_KERNELS {
            return Err(Error::NoKernels);
        }
        if !libraries_present().1 {
            return Err(Error::CudaUnavailable("cuBLAS (libcublas) was not found".into()));
        }
        no_panic("CUDA", || Cuda::on_stream(stream))?
    }

    /// The stream every operation of this backend is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// An engine's device buffer (a `CudaSlice` or a `CudaView` of one), to pass where
    /// this backend reads a buffer (a layer's input, an output gradient), without a copy and
    /// without taking it over. The buffer must live in this backend's context; its length
    /// is the view's length.
    pub fn view<'a, T, S: DevicePtr<T>>(&'a self, buf: &'a S) -> Result<CudaBufRef<'a, T>> {
        self.check_context("Cuda::view", buf)?;
        let len = buf.len();
        let (ptr, sync) = buf.device_ptr(&self.stream);
        Ok(CudaBufRef { buf: self.borrowed(ptr, len, Arc::default()), _sync: sync, _borrow: PhantomData })
    }

    /// Runs `f` with an engine's device buffer as a writable [`CudaBuf`] (a layer's output,
    /// a gradient written in place), without a copy and without taking it over.
    ///
    /// The view must stay where `f` found it: a view swapped out of `f` (with
    /// `std::mem::swap`, say) would outlive the memory it borrows, so that aborts the
    /// process when `f` returns. Replacing it (`*buf = other`) only drops the view, which
    /// never frees the engine's memory.
    pub fn with_view_mut<T, S: DevicePtrMut<T>, R>(
        &self,
        buf: &mut S,
        f: impl FnOnce(&mut CudaBuf<T>) -> R,
    ) -> Result<R> {
        self.check_context("Cuda::with_view_mut", buf)?;
        let len = buf.len();
        let (ptr, _sync) = buf.device_ptr_mut(&self.stream);
        let marker = Arc::new(Counters::default());
        let mut scope = MutScope { buf: self.borrowed(ptr, len, marker.clone()), marker };
        Ok(f(&mut scope.buf))
    }

    fn check_context<T, S: DeviceSlice<T>>(&self, op: &'static str, buf: &S) -> Result<()> {
        if buf.stream().context().cu_ctx() != self.ctx.cu_ctx() {
            return Err(Error::invalid(op, "the buffer belongs to another CUDA context than this backend's stream"));
        }
        Ok(())
    }

    /// A borrowed [`CudaBuf`] over `len` elements at `ptr` (`counters`: its own, never
    /// added to, since the engine's memory is not this backend's).
    fn borrowed<T>(&self, ptr: u64, len: usize, counters: Arc<Counters>) -> CudaBuf<T> {
        // SAFETY: the slice is marked borrowed, so it is leaked, never freed, when dropped;
        // the callers tie its use to a borrow of the engine's buffer.
        let slice = unsafe { self.stream.upgrade_device_ptr::<T>(ptr, len) };
        CudaBuf { slice: ManuallyDrop::new(slice), len, counters, profiler: self.profiler.clone(), borrowed: true }
    }
}

/// The writable view of [`Cuda::with_view_mut`], checked when the scope ends (also on a
/// panic in the closure): `marker` is shared with the view alone, so if the view is no
/// longer in `buf` but its marker is still alive elsewhere, it escaped its borrow.
struct MutScope<T> {
    buf: CudaBuf<T>,
    marker: Arc<Counters>,
}

impl<T> Drop for MutScope<T> {
    fn drop(&mut self) {
        let in_place = self.buf.borrowed && Arc::ptr_eq(&self.buf.counters, &self.marker);
        if !in_place && Arc::strong_count(&self.marker) > 1 {
            eprintln!(
                "sparsegrad: a CudaBuf viewing an engine's buffer was moved out of Cuda::with_view_mut; aborting"
            );
            std::process::abort();
        }
    }
}
