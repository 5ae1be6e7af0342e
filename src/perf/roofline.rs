//! A roofline model of the NVIDIA H100 SXM and H200: what the counted events of a step
//! would take on them, by category, and the step's floor.
//!
//! Every constant has its source in [`DeviceModel::sources`]. Rates are the datasheets'
//! dense peaks (no structured sparsity); latencies are assumptions until a GPU run measures
//! them. A time from here is a **prediction**, never a measurement.
//!
//! Pricing (per event, in seconds):
//! - a kernel: `max(bytes / HBM bandwidth, flops / FP32 rate)`;
//! - a cuBLAS GEMM: `max(flops / rate, bytes / HBM bandwidth)`, the rate set by its types:
//!   bf16 operands with f32 accumulation run on tensor cores at the bf16 rate, f32 operands
//!   with `CUBLAS_COMPUTE_32F_FAST_TF32` at the TF32 rate, f32 operands with
//!   `CUBLAS_COMPUTE_32F` on FP32 cores at the FP32 rate;
//! - a device copy or memset: its bytes at the HBM bandwidth; a host copy: its bytes at the
//!   PCIe rate;
//! - launch overhead: each launch (kernel, cuBLAS call, copy or memset on the stream) keeps
//!   the GPU busy for at least the host's launch interval, so a launch shorter than that
//!   adds `interval - device time` to [`Category::Overhead`]: the eager interval for what the
//!   host launches itself (and for a graph launch, one call), the graph-node interval for
//!   the nodes of a replayed CUDA graph (captured events);
//! - a host-blocking synchronisation (explicit, or a blocking copy): the sync latency, in
//!   [`Category::Overhead`]; a synchronisation right after a blocking copy is the same wait
//!   and is charged once.
//!
//! Events are summed serially (no overlap between kernels), which is how one stream runs.
//!
//! The floor of a step is `flops / bf16 tensor rate + compulsory bytes / HBM bandwidth`: all
//! its arithmetic on tensor cores, and only the bytes it cannot avoid moving (see
//! [`super::llama::compulsory_bytes`]).

use super::{Category, ElemType, Event, EventKind, GemmCompute, Work};
use std::collections::BTreeMap;

/// One GPU's rates and latencies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceModel {
    pub name: &'static str,
    /// Device memory in bytes.
    pub memory_bytes: f64,
    /// HBM bandwidth, bytes/s.
    pub hbm_bytes_per_s: f64,
    /// Dense bf16 tensor-core rate (f32 accumulation), flop/s.
    pub bf16_tensor_flops: f64,
    /// Dense TF32 tensor-core rate, flop/s.
    pub tf32_tensor_flops: f64,
    /// FP32 (non-tensor) rate, flop/s.
    pub fp32_flops: f64,
    /// Host-device copy rate each way (PCIe Gen5 x16), bytes/s.
    pub pcie_bytes_per_s: f64,
    /// Host time between two eager launches on one stream, s.
    pub eager_launch_s: f64,
    /// Per-node time of a replayed CUDA graph, s.
    pub graph_node_s: f64,
    /// A host-blocking synchronisation: drain, wake-up and refill, s.
    pub sync_s: f64,
    /// Where each number comes from.
    pub sources: &'static [(&'static str, &'static str)],
}

const LATENCY_SOURCES: [(&str, &str); 3] = [
    (
        "eager launch 3 us",
        "assumed: shared/design.md section 5 gives 2-4 us a launch; to be replaced by the first GPU run's measurement",
    ),
    (
        "graph node 1 us",
        "assumed: CUDA graphs remove most of the per-launch host cost; to be measured on the first GPU run",
    ),
    (
        "sync 10 us",
        "assumed: shared/design.md section 5 gives ~10 us plus the drained pipeline; to be measured on the first GPU run",
    ),
];

/// NVIDIA H100 SXM5 80 GB.
pub const H100_SXM: DeviceModel = DeviceModel {
    name: "H100 SXM",
    memory_bytes: 80e9,
    hbm_bytes_per_s: 3.35e12,
    bf16_tensor_flops: 989.4e12,
    tf32_tensor_flops: 494.7e12,
    fp32_flops: 66.9e12,
    pcie_bytes_per_s: 64e9,
    eager_launch_s: 3e-6,
    graph_node_s: 1e-6,
    sync_s: 10e-6,
    sources: &[
        (
            "HBM3 3.35 TB/s, 80 GB; BF16 989.4, TF32 494.7 dense tensor TFLOP/s; FP32 66.9 TFLOP/s; PCIe Gen5 128 GB/s (64 each way)",
            "NVIDIA H100 Tensor Core GPU datasheet (SXM5 column; the sparse figures halved to dense)",
        ),
        (
            "this workplace measured 3.0 TB/s device copy and 798 TFLOP/s bf16 GEMM (8192^3) on one H100",
            "/work/.library/device/KINDS.md, 2026-11-13 (not used by the model: datasheet peaks are)",
        ),
        LATENCY_SOURCES[0],
        LATENCY_SOURCES[1],
        LATENCY_SOURCES[2],
    ],
};

/// NVIDIA H200 SXM 141 GB.
pub const H200: DeviceModel = DeviceModel {
    name: "H200",
    memory_bytes: 141e9,
    hbm_bytes_per_s: 4.8e12,
    bf16_tensor_flops: 989.4e12,
    tf32_tensor_flops: 494.7e12,
    fp32_flops: 66.9e12,
    pcie_bytes_per_s: 64e9,
    eager_launch_s: 3e-6,
    graph_node_s: 1e-6,
    sync_s: 10e-6,
    sources: &[
        (
            "HBM3e 4.8 TB/s, 141 GB; compute rates as the H100 SXM (BF16 989, TF32 494.7 dense, FP32 67 TFLOP/s); PCIe Gen5 128 GB/s",
            "NVIDIA H200 Tensor Core GPU datasheet (SXM column)",
        ),
        (
            "this workplace measured 4.3 TB/s device copy and 769-798 TFLOP/s bf16 GEMM (8192^3) on one H200",
            "/work/.library/device/KINDS.md, 2026-10-28 and 2026-11-04 (not used by the model)",
        ),
        LATENCY_SOURCES[0],
        LATENCY_SOURCES[1],
        LATENCY_SOURCES[2],
    ],
};

/// Both modelled GPUs.
pub const DEVICES: [DeviceModel; 2] = [H100_SXM, H200];

/// How launches reach the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaunchMode {
    /// One host API call per launch.
    Eager,
    /// The step replayed as one CUDA graph.
    Graph,
}

/// Predicted seconds by category, with the work and counts they come from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Prediction {
    pub seconds: BTreeMap<Category, f64>,
    pub work: Work,
    pub launches: f64,
    pub host_syncs: f64,
}

impl Prediction {
    pub fn total(&self) -> f64 {
        self.seconds.values().sum()
    }
    pub fn get(&self, c: Category) -> f64 {
        self.seconds.get(&c).copied().unwrap_or(0.0)
    }
}

impl DeviceModel {
    /// The rate a GEMM of these types runs at, flop/s.
    pub fn gemm_rate(&self, operands: ElemType, compute: GemmCompute) -> f64 {
        match (operands, compute) {
            (ElemType::Bf16, _) => self.bf16_tensor_flops,
            (ElemType::F32, GemmCompute::F32FastTf32) => self.tf32_tensor_flops,
            (ElemType::F32, GemmCompute::F32) => self.fp32_flops,
        }
    }

    /// Device seconds of one event (its own category), without launch overhead.
    pub fn device_seconds(&self, e: &Event) -> f64 {
        let w = e.work();
        match &e.kind {
            EventKind::Launch { cost, .. } => {
                let rate = if cost.tensor_cores { self.bf16_tensor_flops } else { self.fp32_flops };
                (w.bytes / self.hbm_bytes_per_s).max(w.flops / rate)
            }
            EventKind::Gemm { operands, compute, .. } => {
                (w.flops / self.gemm_rate(*operands, *compute)).max(w.bytes / self.hbm_bytes_per_s)
            }
            EventKind::Copy { dir: super::CopyDir::DeviceToDevice, .. } | EventKind::Memset { .. } => {
                w.bytes / self.hbm_bytes_per_s
            }
            EventKind::Copy { bytes, .. } => *bytes as f64 / self.pcie_bytes_per_s,
            EventKind::Sync | EventKind::Alloc { .. } | EventKind::Free { .. } | EventKind::GraphLaunch { .. } => 0.0,
        }
    }

    /// Prices `events`, each counted `weight` times (see [`super::shape`]'s scaling). `mode`
    /// is how the host launches the events it launches itself; captured events are nodes of
    /// a CUDA graph (priced at the graph-node interval) and a graph launch is one eager call.
    pub fn predict<'a>(&self, events: impl IntoIterator<Item = (&'a Event, f64)>, mode: LaunchMode) -> Prediction {
        let eager = match mode {
            LaunchMode::Eager => self.eager_launch_s,
            LaunchMode::Graph => self.graph_node_s,
        };
        let mut p = Prediction::default();
        let mut previous: Option<&Event> = None;
        for (e, weight) in events {
            let device = self.device_seconds(e);
            *p.seconds.entry(e.category()).or_default() += weight * device;
            p.work += e.work() * weight;
            let on_stream = e.is_launch()
                || matches!(
                    e.kind,
                    EventKind::Memset { .. }
                        | EventKind::Copy { dir: super::CopyDir::DeviceToDevice, .. }
                        | EventKind::GraphLaunch { .. }
                );
            if e.is_launch() {
                p.launches += weight;
            }
            if on_stream {
                let interval = if e.captured {
                    self.graph_node_s
                } else if matches!(e.kind, EventKind::GraphLaunch { .. }) {
                    self.eager_launch_s
                } else {
                    eager
                };
                *p.seconds.entry(Category::Overhead).or_default() += weight * (interval - device).max(0.0);
            }
            if e.is_host_wait_after(previous) {
                p.host_syncs += weight;
                *p.seconds.entry(Category::Overhead).or_default() += weight * self.sync_s;
            }
            previous = Some(e);
        }
        p
    }

    /// `flops` on tensor cores plus `compulsory_bytes` at the HBM bandwidth.
    pub fn floor(&self, flops: f64, compulsory_bytes: f64) -> f64 {
        flops / self.bf16_tensor_flops + compulsory_bytes / self.hbm_bytes_per_s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perf::{KernelCost, Tag};

    fn ev(kind: EventKind) -> Event {
        Event { kind, tag: Tag::default(), gpu_ms: None, captured: false }
    }

    static STREAM: KernelCost = KernelCost {
        kernel: "test_stream",
        module: "test",
        category: Category::Elementwise,
        tensor_cores: false,
        eval: |a| Work::new(a[0], a[1]),
    };

    #[test]
    fn prices_by_type_and_adds_overhead() {
        let m = H100_SXM;
        // A 4096^3 GEMM: 2 * 4096^3 = 137.4 GFLOP; bytes 3 * 4096^2 * 2 (bf16 A, B; f32 C 4 B
        // counted separately) are far below the compute time at either rate.
        let g = |operands, compute| {
            ev(EventKind::Gemm {
                routine: crate::perf::BlasRoutine::Gemm,
                m: 4096,
                n: 4096,
                k: 4096,
                batch: 1,
                operands,
                output: ElemType::F32,
                compute,
                accumulate: false,
            })
        };
        let flops = 2.0 * 4096f64.powi(3);
        let bf = m.device_seconds(&g(ElemType::Bf16, GemmCompute::F32));
        let f32c = m.device_seconds(&g(ElemType::F32, GemmCompute::F32));
        let tf = m.device_seconds(&g(ElemType::F32, GemmCompute::F32FastTf32));
        assert!((bf - flops / 989.4e12).abs() < 1e-12);
        assert!((f32c - flops / 66.9e12).abs() < 1e-12);
        assert!((tf - flops / 494.7e12).abs() < 1e-12);
        // A memory-bound kernel moving 3.35 MB takes 1 us, below the 3 us eager interval:
        // 2 us of overhead; in a graph (1 us a node) none.
        let k = ev(EventKind::Launch {
            cost: &STREAM,
            grid: [1, 1, 1],
            block: [256, 1, 1],
            shared_bytes: 0,
            args: vec![3_350_000, 10],
        });
        let eager = m.predict([(&k, 1.0)], LaunchMode::Eager);
        assert!((eager.get(Category::Elementwise) - 1e-6).abs() < 1e-12);
        assert!((eager.get(Category::Overhead) - 2e-6).abs() < 1e-12);
        let graph = m.predict([(&k, 2.0)], LaunchMode::Graph);
        assert_eq!(graph.get(Category::Overhead), 0.0);
        assert!((graph.total() - 2e-6).abs() < 1e-12);
        assert_eq!(graph.launches, 2.0);
        // The same kernel captured, replayed by one graph launch: the node costs its device
        // time (above the 1 us node interval), the launch one eager interval.
        let node = Event { captured: true, ..k.clone() };
        let launch = ev(EventKind::GraphLaunch { nodes: 1 });
        let replay = m.predict([(&node, 1.0), (&launch, 1.0)], LaunchMode::Eager);
        assert!((replay.get(Category::Overhead) - 3e-6).abs() < 1e-12);
        assert!((replay.get(Category::Elementwise) - 1e-6).abs() < 1e-12);
        // A sync costs its latency; a blocking copy its PCIe time plus the latency; a sync right
        // after a blocking copy waits for nothing more.
        let s = ev(EventKind::Sync);
        let c = ev(EventKind::Copy { dir: super::super::CopyDir::DeviceToHost, bytes: 64_000, blocking: true });
        let p = m.predict([(&s, 1.0), (&c, 1.0)], LaunchMode::Eager);
        assert_eq!(p.host_syncs, 2.0);
        assert!((p.get(Category::Overhead) - 20e-6).abs() < 1e-12);
        let p = m.predict([(&c, 1.0), (&s, 1.0)], LaunchMode::Eager);
        assert_eq!(p.host_syncs, 1.0);
        assert!((p.get(Category::HostCopy) - 1e-6).abs() < 1e-12);
        // The floor: 989.4 TFLOP on tensor cores and 3.35 TB are one second each.
        assert!((m.floor(989.4e12, 3.35e12) - 2.0).abs() < 1e-9);
        const { assert!(H200.hbm_bytes_per_s > H100_SXM.hbm_bytes_per_s) };
        assert!(DEVICES.iter().all(|d| d.sources.len() >= 3));
    }
}
