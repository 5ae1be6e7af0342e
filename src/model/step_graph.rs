//! A model's training step as a CUDA graph, one per batch shape: the first step of a shape
//! runs eagerly (it grows every buffer it needs), the second is captured with
//! [`Backend::begin_capture`] and replayed, every later one is a replay (one host call).
//! On a backend that cannot capture (the CPU), or when turned off, every step runs eagerly.
//!
//! A graph holds the device addresses of the buffers it was captured with: when the backend
//! has allocated since (a buffer grew for a larger batch and the old one was freed), every
//! graph is dropped and recaptured, never replayed against freed memory.

use crate::backend::{Backend, GraphId};
use crate::error::Result;
use std::collections::{HashMap, HashSet};
use std::hash::Hash;

/// The graphs of one model, by step shape `K`.
pub(crate) struct StepGraphs<K> {
    enabled: bool,
    warm: HashSet<K>,
    /// The graph of a shape and the backend's allocation count when it was captured.
    graphs: HashMap<K, (GraphId, u64)>,
}

impl<K: Hash + Eq + Copy> StepGraphs<K> {
    pub(crate) fn new(enabled: bool) -> Self {
        StepGraphs { enabled, warm: HashSet::new(), graphs: HashMap::new() }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    /// Turns graphs on or off (off drops the captured ones).
    pub(crate) fn set_enabled<B: Backend>(&mut self, backend: &B, on: bool) {
        if !on {
            self.clear(backend);
        }
        self.enabled = on;
    }

    /// Drops every graph (the shapes stay warm).
    pub(crate) fn clear<B: Backend>(&mut self, backend: &B) {
        for (_, (g, _)) in self.graphs.drain() {
            backend.drop_graph(g);
        }
    }

    /// Runs one step of shape `key`: `queue` queues the step's work (it must upload nothing,
    /// read nothing back and allocate nothing after the shape's first step). Returns whether
    /// a replay stood in for `queue`, whose host bookkeeping (step counters, say) the caller
    /// then does itself.
    pub(crate) fn run<B: Backend>(
        &mut self,
        backend: &B,
        key: K,
        mut queue: impl FnMut() -> Result<()>,
    ) -> Result<bool> {
        if !self.enabled || !backend.supports_capture() {
            queue()?;
            // An eager step grew every buffer of its shape: with graphs turned on later, the
            // next step of the shape can be captured at once.
            self.warm.insert(key);
            return Ok(false);
        }
        let allocations = backend.memory_stats().allocations;
        if let Some(&(g, at)) = self.graphs.get(&key) {
            if at == allocations {
                backend.replay(g)?;
                return Ok(true);
            }
            self.clear(backend);
        }
        if !self.warm.contains(&key) {
            queue()?;
            self.warm.insert(key);
            return Ok(false);
        }
        backend.begin_capture()?;
        let queued = queue();
        let captured = backend.end_capture();
        queued?;
        let g = captured?;
        self.graphs.insert(key, (g, backend.memory_stats().allocations));
        // The capture recorded the step without running it: run it now.
        backend.replay(g)?;
        Ok(false)
    }
}
