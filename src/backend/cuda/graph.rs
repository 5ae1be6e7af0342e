//! CUDA graphs: the work queued between [`Backend::begin_capture`] and
//! [`Backend::end_capture`] is recorded on the backend's stream (not run) and instantiated
//! once; [`Backend::replay`] launches it again, one host call for the whole step. Whatever a
//! capture cannot hold (a synchronisation, a host read, an allocation or free, a copy from
//! pageable host memory) fails it loudly, as on a GPU: the driver invalidates the capture
//! and `end_capture` returns the error. The ledger marks captured events
//! ([`crate::perf::Event::captured`]) and records each replay as one
//! [`crate::perf::EventKind::GraphLaunch`].

use super::{cuda_err, Cuda};
use crate::backend::GraphId;
use crate::error::{Error, Result};
use crate::perf::EventKind;
use cudarc::driver::{result as drv, sys};

/// An instantiated graph (and the graph it came from), owned by the backend.
pub(super) struct Graph {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
    nodes: u64,
}

// SAFETY: the handles are only used under the backend's `graphs` mutex, from whichever
// thread holds it, with the backend's context bound (the driver's graph objects may move
// between threads; they must not be used concurrently, which the mutex ensures).
unsafe impl Send for Graph {}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: both handles came from a successful instantiate and are destroyed once.
        // Errors at teardown have nowhere to go (the driver may already be shutting down).
        unsafe {
            let _ = drv::graph::exec_destroy(self.exec);
            let _ = drv::graph::destroy(self.graph);
        }
    }
}

impl Cuda {
    pub(super) fn capture_begin(&self) -> Result<()> {
        self.bind()?;
        if self.profiler.capturing() {
            return Err(Error::invalid("begin_capture", "a capture is already open"));
        }
        // SAFETY: the backend's stream is a live stream created by this context (never the
        // legacy NULL stream, which cannot be captured). Thread-local mode: an unsafe call
        // (allocation, synchronisation) of this thread invalidates the capture; an engine's
        // other threads keep using CUDA undisturbed.
        unsafe {
            drv::stream::begin_capture(
                self.stream.cu_stream(),
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        }
        .map_err(cuda_err("cuStreamBeginCapture"))?;
        self.profiler.set_capturing(true);
        Ok(())
    }

    pub(super) fn capture_end(&self) -> Result<GraphId> {
        if !self.profiler.capturing() {
            return Err(Error::invalid("end_capture", "no capture is open"));
        }
        self.profiler.set_capturing(false);
        let nodes = self.profiler.take_captured_count();
        self.bind()?;
        // SAFETY: the stream is capturing (begun above); the returned graph is owned here.
        let graph = unsafe { drv::stream::end_capture(self.stream.cu_stream()) }.map_err(|e| Error::Cuda {
            op: "cuStreamEndCapture",
            msg: format!("the captured work is not a valid graph ({e}): it synchronised, read back, allocated or copied from pageable memory"),
        })?;
        if graph.is_null() {
            return Err(Error::Cuda { op: "cuStreamEndCapture", msg: "the capture produced no graph".into() });
        }
        // SAFETY: `graph` is a valid graph from the capture.
        let exec = match unsafe { drv::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) } {
            Ok(exec) => exec,
            Err(e) => {
                // SAFETY: `graph` is valid and destroyed once.
                unsafe {
                    let _ = drv::graph::destroy(graph);
                }
                return Err(cuda_err("cuGraphInstantiate")(e));
            }
        };
        let mut graphs = self.graphs.lock().unwrap_or_else(|p| p.into_inner());
        graphs.push(Some(Graph { graph, exec, nodes }));
        Ok(GraphId(graphs.len() - 1))
    }

    pub(super) fn graph_replay(&self, id: GraphId) -> Result<()> {
        let graphs = self.graphs.lock().unwrap_or_else(|p| p.into_inner());
        let g = graphs
            .get(id.0)
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::invalid("replay", format!("graph {} does not exist (dropped?)", id.0)))?;
        self.bind()?;
        // SAFETY: the exec handle is live (owned by `graphs`, which we hold locked) and the
        // stream is the one it was captured on.
        unsafe { drv::graph::launch(g.exec, self.stream.cu_stream()) }.map_err(cuda_err("cuGraphLaunch"))?;
        self.profiler.record(EventKind::GraphLaunch { nodes: g.nodes });
        Ok(())
    }

    pub(super) fn graph_drop(&self, id: GraphId) {
        let mut graphs = self.graphs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = graphs.get_mut(id.0) {
            *slot = None;
        }
    }
}
