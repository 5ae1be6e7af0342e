//! The CUDA backend's ledger of device work (see [`crate::perf`]): between
//! [`Cuda::profile_begin`] and [`Cuda::profile_end`] every launch, cuBLAS call, host
//! synchronisation, copy, memset, allocation and free is recorded with the tags of
//! [`crate::perf::scope`] in effect. The window is also opened and closed on the driver
//! (`cuProfilerStart` / `cuProfilerStop`), so the emulated device counts the same window
//! and a GPU profiler (`nsys --capture-range=cudaProfilerApi`) captures it.
//!
//! On a GPU, [`ProfileOptions::time_each_launch`] records a pair of CUDA events around
//! every kernel launch and cuBLAS call; their elapsed device times are read once, after the
//! window closes (one synchronisation outside the window).

use super::{cuda_err, Cuda};
use crate::error::{Error, Result};
use crate::perf::{current_tag, Event, EventKind};
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What a measured window records besides the events themselves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProfileOptions {
    /// A CUDA event pair around every launch, for device time per launch (GPU only: on the
    /// emulated device the elapsed times are host wall time and mean nothing).
    pub time_each_launch: bool,
}

#[derive(Default)]
struct State {
    events: Vec<Event>,
    timing: bool,
    /// (start, end) event pairs, reused across windows; `timers[i]` belongs to the launch
    /// whose `timer` index is `i`.
    pairs: Vec<(CudaEvent, CudaEvent)>,
    /// Event index -> pair index, for launches timed in this window.
    timed: Vec<(usize, usize)>,
}

/// Shared by a backend and its buffers (buffers record their own frees). Also counts the
/// nodes of an open stream capture (whether or not a window is open).
#[derive(Default)]
pub(crate) struct Profiler {
    active: AtomicBool,
    capturing: AtomicBool,
    captured: AtomicU64,
    state: Mutex<State>,
}

impl Profiler {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    pub(crate) fn capturing(&self) -> bool {
        self.capturing.load(Ordering::Relaxed)
    }

    pub(crate) fn set_capturing(&self, on: bool) {
        if on {
            self.captured.store(0, Ordering::Relaxed);
        }
        self.capturing.store(on, Ordering::Relaxed);
    }

    /// The nodes recorded since the capture began.
    pub(crate) fn take_captured_count(&self) -> u64 {
        self.captured.swap(0, Ordering::Relaxed)
    }

    fn event(&self, kind: EventKind) -> Event {
        let captured = self.capturing();
        if captured && is_node(&kind) {
            self.captured.fetch_add(1, Ordering::Relaxed);
        }
        Event { kind, tag: current_tag(), gpu_ms: None, captured }
    }

    /// Records `kind` with the current tags (nothing outside a window, but a captured node
    /// is counted either way).
    pub(crate) fn record(&self, kind: EventKind) {
        let e = self.event(kind);
        if self.active() {
            self.lock().events.push(e);
        }
    }

    /// Before a launch: records the start event of a timing pair when the window times
    /// launches; returns the pair's index for [`Profiler::record_launch`].
    pub(crate) fn start_timer(&self, ctx: &Arc<CudaContext>, stream: &Arc<CudaStream>) -> Result<Option<usize>> {
        if !self.active() || self.capturing() {
            return Ok(None);
        }
        let mut s = self.lock();
        if !s.timing {
            return Ok(None);
        }
        let i = s.timed.len();
        if s.pairs.len() <= i {
            let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
            let a = ctx.new_event(flags).map_err(cuda_err("profile event"))?;
            let b = ctx.new_event(flags).map_err(cuda_err("profile event"))?;
            s.pairs.push((a, b));
        }
        s.pairs[i].0.record(stream).map_err(cuda_err("profile event"))?;
        Ok(Some(i))
    }

    /// After a launch: records it, and the end event of its timing pair.
    pub(crate) fn record_launch(&self, kind: EventKind, timer: Option<usize>, stream: &Arc<CudaStream>) -> Result<()> {
        let e = self.event(kind);
        if !self.active() {
            return Ok(());
        }
        let mut s = self.lock();
        let index = s.events.len();
        s.events.push(e);
        if let Some(i) = timer {
            s.pairs[i].1.record(stream).map_err(cuda_err("profile event"))?;
            s.timed.push((index, i));
        }
        Ok(())
    }
}

/// Whether an event is a node of a captured graph (work on the stream).
fn is_node(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Launch { .. } | EventKind::Gemm { .. } | EventKind::Copy { .. } | EventKind::Memset { .. }
    )
}

impl Cuda {
    /// Whether this device is the CPU emulation of CUDA (`cuda/emu`), whose times are not
    /// GPU times.
    pub fn is_emulated(&self) -> bool {
        self.device_name.starts_with("sparsegrad CPU emulation")
    }

    /// Opens a measured window: from now until [`Cuda::profile_end`] the backend records
    /// every event in its ledger, and the driver's profiler window is open
    /// (`cuProfilerStart`). Work queued before is finished first (outside the window), so
    /// the window holds only what comes after.
    pub fn profile_begin(&self, options: ProfileOptions) -> Result<()> {
        if self.profiler.active() {
            return Err(Error::invalid("Cuda::profile_begin", "a measured window is already open"));
        }
        self.bind()?;
        self.stream.synchronize().map_err(cuda_err("profile_begin"))?;
        {
            let mut s = self.profiler.lock();
            s.events.clear();
            s.timed.clear();
            s.timing = options.time_each_launch;
        }
        // SAFETY: cuProfilerStart takes no arguments; the context is bound to this thread.
        let r = unsafe { cudarc::driver::sys::cuProfilerStart() };
        r.result().map_err(cuda_err("cuProfilerStart"))?;
        self.profiler.active.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Closes the window and returns its events (with device times when the window timed
    /// launches: the one synchronisation that needs happens after the window closed).
    pub fn profile_end(&self) -> Result<Vec<Event>> {
        if !self.profiler.active() {
            return Err(Error::invalid("Cuda::profile_end", "no measured window is open"));
        }
        self.profiler.active.store(false, Ordering::Relaxed);
        self.bind()?;
        // SAFETY: as cuProfilerStart.
        let r = unsafe { cudarc::driver::sys::cuProfilerStop() };
        r.result().map_err(cuda_err("cuProfilerStop"))?;
        let mut s = self.profiler.lock();
        if !s.timed.is_empty() {
            self.stream.synchronize().map_err(cuda_err("profile_end"))?;
            let timed = std::mem::take(&mut s.timed);
            for (index, pair) in timed {
                let ms = s.pairs[pair].0.elapsed_ms(&s.pairs[pair].1).map_err(cuda_err("profile event"))?;
                s.events[index].gpu_ms = Some(ms);
            }
        }
        Ok(std::mem::take(&mut s.events))
    }
}
