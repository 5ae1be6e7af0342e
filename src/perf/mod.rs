//! The GPU shape of a training step, measurable without a GPU.
//!
//! While a measured window is open ([`crate::Cuda::profile_begin`] ...
//! [`crate::Cuda::profile_end`]), the CUDA backend writes an [`Event`] into its ledger for
//! every kernel launch, cuBLAS call, host-blocking synchronisation, copy, memset, allocation
//! and free it makes. Each kernel launch carries its [`KernelCost`]: a function of the
//! launch's size arguments giving the bytes the kernel must move and the flops it does
//! (defined once, next to the kernel's launcher); cuBLAS calls are costed from `m, n, k`,
//! the batch and the operand types. [`roofline`] prices those events on an H100 SXM or an
//! H200, and [`shape`] turns a run of a few layers at short sequences into the counts and
//! the predicted time of the full model at its real sequence length.
//!
//! The window is bounded by `cuProfilerStart` / `cuProfilerStop`, so on a GPU the same
//! window is what `nsys --capture-range=cudaProfilerApi` records; on the CPU emulation of
//! CUDA (`cuda/emu`) the emulated driver and cuBLAS count the same entry points
//! independently (`SG_EMU_PROFILE`, see [`emulator`]), which is how the ledger is checked.
//!
//! Model code tags the events with where they happen (layer, phase, attention) through
//! [`scope`]; the tags are thread-local and cost nothing when no window is open.
//!
//! Nothing here measures speed: the emulator proves counts, sizes and types; a time printed
//! from [`roofline`] is a prediction and is labelled as one.

pub mod emulator;
pub mod llama;
pub mod roofline;
pub mod shape;

use std::cell::Cell;

/// Bytes a piece of device work must move through device memory and the floating-point
/// operations it does.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Work {
    pub bytes: f64,
    pub flops: f64,
}

impl Work {
    pub fn new(bytes: u64, flops: u64) -> Work {
        Work { bytes: bytes as f64, flops: flops as f64 }
    }
}

impl std::ops::Add for Work {
    type Output = Work;
    fn add(self, o: Work) -> Work {
        Work { bytes: self.bytes + o.bytes, flops: self.flops + o.flops }
    }
}

impl std::ops::AddAssign for Work {
    fn add_assign(&mut self, o: Work) {
        *self = *self + o;
    }
}

impl std::ops::Mul<f64> for Work {
    type Output = Work;
    fn mul(self, w: f64) -> Work {
        Work { bytes: self.bytes * w, flops: self.flops * w }
    }
}

/// What a predicted or measured time is spent on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Category {
    /// GEMMs with bf16 operands or TF32 math: tensor cores.
    GemmTensor,
    /// GEMMs with f32 operands and `CUBLAS_COMPUTE_32F`: FP32 cores.
    GemmFp32,
    /// Attention: its GEMMs, softmax and fused kernels.
    Attention,
    /// Elementwise and row-wise kernels (activations, norms, RoPE, casts, loss), device
    /// copies and memsets.
    Elementwise,
    /// Top-k selection, compaction and the sparse products.
    TopkSparse,
    /// Adam, AdamW and SparseAdam.
    Optimizer,
    /// Host-device copies.
    HostCopy,
    /// Kernel launch latency and host-blocking synchronisations.
    Overhead,
}

impl Category {
    pub const ALL: [Category; 8] = [
        Category::GemmTensor,
        Category::GemmFp32,
        Category::Attention,
        Category::Elementwise,
        Category::TopkSparse,
        Category::Optimizer,
        Category::HostCopy,
        Category::Overhead,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Category::GemmTensor => "GEMM, tensor cores",
            Category::GemmFp32 => "GEMM, FP32 cores",
            Category::Attention => "attention",
            Category::Elementwise => "elementwise",
            Category::TopkSparse => "top-k and sparse",
            Category::Optimizer => "optimizer",
            Category::HostCopy => "host copies",
            Category::Overhead => "launch and sync overhead",
        }
    }
}

/// The cost of one kernel, in one place next to its launcher: `eval` maps the launch's size
/// arguments (in the order its launcher documents) to the bytes and flops of the launch.
#[derive(Debug)]
pub struct KernelCost {
    /// The kernel's name in `cuda/*.cu`.
    pub kernel: &'static str,
    /// The `.cu` file (module) it is compiled in.
    pub module: &'static str,
    pub category: Category,
    /// Whether the kernel's flops run on bf16 tensor cores (`nvcuda::wmma`) rather than the
    /// FP32 cores: the roofline prices them at the tensor-core rate.
    pub tensor_cores: bool,
    pub eval: fn(&[u64]) -> Work,
}

/// Element type of GEMM operands and outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ElemType {
    F32,
    Bf16,
}

impl ElemType {
    pub fn bytes(self) -> u64 {
        match self {
            ElemType::F32 => 4,
            ElemType::Bf16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            ElemType::F32 => "f32",
            ElemType::Bf16 => "bf16",
        }
    }
}

/// How cuBLAS multiplies: `CUBLAS_COMPUTE_32F` with the default math mode (f32 operands on
/// FP32 cores, bf16 operands on tensor cores with f32 accumulation) or with TF32 allowed
/// (`CUBLAS_COMPUTE_32F_FAST_TF32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GemmCompute {
    F32,
    F32FastTf32,
}

/// Which cuBLAS routine a [`EventKind::Gemm`] is: a general product (`cublasGemmEx`, or its
/// strided-batched form) or a symmetric rank-k update (`cublasSsyrk_v2`: `m = n`, only one
/// triangle of C computed, about half a GEMM's flops and C traffic).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlasRoutine {
    Gemm,
    Syrk,
}

/// Which way a copy goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CopyDir {
    HostToDevice,
    DeviceToHost,
    DeviceToDevice,
}

/// One thing the backend asked of the device.
#[derive(Clone, Debug)]
pub enum EventKind {
    Launch {
        cost: &'static KernelCost,
        grid: [u32; 3],
        block: [u32; 3],
        shared_bytes: u32,
        args: Vec<u64>,
    },
    /// A cuBLAS call (see [`BlasRoutine`]), with its dimensions as cuBLAS receives them.
    Gemm {
        routine: BlasRoutine,
        m: u64,
        n: u64,
        k: u64,
        batch: u64,
        operands: ElemType,
        output: ElemType,
        compute: GemmCompute,
        accumulate: bool,
    },
    /// The host waited for the device (stream, context or event synchronize).
    Sync,
    /// `blocking`: the host waited for the copy (device-to-host into pageable memory).
    Copy {
        dir: CopyDir,
        bytes: u64,
        blocking: bool,
    },
    Memset {
        bytes: u64,
    },
    Alloc {
        bytes: u64,
    },
    Free {
        bytes: u64,
    },
    /// One launch of a captured CUDA graph of `nodes` nodes (their work is priced from the
    /// capture's events, see [`Event::captured`]).
    GraphLaunch {
        nodes: u64,
    },
}

/// An [`EventKind`] with the tags in effect when it happened and, on a GPU, its measured
/// device time.
#[derive(Clone, Debug)]
pub struct Event {
    pub kind: EventKind,
    pub tag: Tag,
    /// Device milliseconds between CUDA events recorded around it (GPU only, when asked for).
    pub gpu_ms: Option<f32>,
    /// Recorded into a stream capture: a node of a CUDA graph, run by each replay (not when
    /// it was recorded).
    pub captured: bool,
}

impl Event {
    /// Bytes and flops of the event's device work (zero for syncs, allocations and frees).
    pub fn work(&self) -> Work {
        match &self.kind {
            EventKind::Launch { cost, args, .. } => (cost.eval)(args),
            EventKind::Gemm { .. } => gemm_work(&self.kind),
            EventKind::Copy { bytes, dir, .. } => {
                // A device copy reads and writes; a host copy moves its bytes once each side.
                let moved = if *dir == CopyDir::DeviceToDevice { 2 * bytes } else { *bytes };
                Work::new(moved, 0)
            }
            EventKind::Memset { bytes } => Work::new(*bytes, 0),
            EventKind::Sync | EventKind::Alloc { .. } | EventKind::Free { .. } | EventKind::GraphLaunch { .. } => {
                Work::default()
            }
        }
    }

    /// The category its device time belongs to (launch latency is [`Category::Overhead`]
    /// separately, see [`roofline::DeviceModel::predict`]).
    pub fn category(&self) -> Category {
        match &self.kind {
            EventKind::Launch { cost, .. } => {
                if self.tag.attention {
                    Category::Attention
                } else {
                    cost.category
                }
            }
            EventKind::Gemm { operands, compute, .. } => {
                if self.tag.attention {
                    Category::Attention
                } else if *operands == ElemType::Bf16 || *compute == GemmCompute::F32FastTf32 {
                    Category::GemmTensor
                } else {
                    Category::GemmFp32
                }
            }
            EventKind::Copy { dir: CopyDir::DeviceToDevice, .. } | EventKind::Memset { .. } => Category::Elementwise,
            EventKind::Copy { .. } => Category::HostCopy,
            EventKind::Sync | EventKind::Alloc { .. } | EventKind::Free { .. } | EventKind::GraphLaunch { .. } => {
                Category::Overhead
            }
        }
    }

    /// Whether the device runs it as a launch (a kernel or a cuBLAS call).
    pub fn is_launch(&self) -> bool {
        matches!(self.kind, EventKind::Launch { .. } | EventKind::Gemm { .. })
    }

    /// Whether the host makes one API call for it on the stream (an eager launch, copy,
    /// memset, or a graph launch); captured events are made by the graph, not the host.
    pub fn is_host_call(&self) -> bool {
        !self.captured
            && matches!(
                self.kind,
                EventKind::Launch { .. }
                    | EventKind::Gemm { .. }
                    | EventKind::Copy { .. }
                    | EventKind::Memset { .. }
                    | EventKind::GraphLaunch { .. }
            )
    }

    /// Whether the host waits for the device at this event.
    pub fn is_host_sync(&self) -> bool {
        matches!(self.kind, EventKind::Sync | EventKind::Copy { blocking: true, .. })
    }

    /// Whether the host waits for the device here, given the event before: a
    /// synchronisation right after a blocking copy waits for nothing (the copy drained the
    /// stream), so the pair is one wait.
    pub fn is_host_wait_after(&self, previous: Option<&Event>) -> bool {
        match self.kind {
            EventKind::Sync => !previous.is_some_and(|p| matches!(p.kind, EventKind::Copy { blocking: true, .. })),
            EventKind::Copy { blocking: true, .. } => true,
            _ => false,
        }
    }
}

/// A GEMM: `2 m n k` flops per batch entry; A and B read once, C written once (and read
/// first when the product accumulates into it). A SYRK (`m = n`): `n (n + 1) k` flops (one
/// triangle with its diagonal), A `(n, k)` read once, the `n (n + 1) / 2` entries of C's
/// triangle written (and read first when accumulating).
pub fn gemm_work(kind: &EventKind) -> Work {
    let EventKind::Gemm { routine, m, n, k, batch, operands, output, accumulate, .. } = *kind else {
        return Work::default();
    };
    let c_passes = if accumulate { 2 } else { 1 };
    match routine {
        BlasRoutine::Gemm => {
            let bytes = batch * ((m * k + k * n) * operands.bytes() + c_passes * m * n * output.bytes());
            Work::new(bytes, 2 * m * n * k * batch)
        }
        BlasRoutine::Syrk => {
            let bytes = batch * (n * k * operands.bytes() + c_passes * n * (n + 1) / 2 * output.bytes());
            Work::new(bytes, n * (n + 1) * k * batch)
        }
    }
}

/// Where the events happen: a decoder layer (or none: embedding, head, loss), the phase of
/// the step, and whether inside attention.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tag {
    pub layer: Option<u32>,
    pub phase: Phase,
    pub attention: bool,
}

/// The part of a training step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    #[default]
    Other,
    Forward,
    Backward,
    Optimizer,
}

thread_local! {
    static TAG: Cell<Tag> = const { Cell::new(Tag { layer: None, phase: Phase::Other, attention: false }) };
}

/// The tags in effect on this thread.
pub fn current_tag() -> Tag {
    TAG.with(|t| t.get())
}

/// Restores the previous tags when dropped.
#[must_use = "the scope ends when this guard is dropped"]
pub struct ScopeGuard(Tag);

impl Drop for ScopeGuard {
    fn drop(&mut self) {
        TAG.with(|t| t.set(self.0));
    }
}

/// Scopes that tag the events below them; each returns a guard restoring the outer tags.
pub mod scope {
    use super::{current_tag, Phase, ScopeGuard, Tag, TAG};

    fn set(f: impl FnOnce(&mut Tag)) -> ScopeGuard {
        let outer = current_tag();
        let mut inner = outer;
        f(&mut inner);
        TAG.with(|t| t.set(inner));
        ScopeGuard(outer)
    }

    /// Events of decoder (or encoder) layer `index`.
    pub fn layer(index: usize) -> ScopeGuard {
        set(|t| t.layer = Some(index as u32))
    }

    /// Events outside any layer (embedding, head, loss), even inside a layer scope.
    pub fn no_layer() -> ScopeGuard {
        set(|t| t.layer = None)
    }

    pub fn phase(phase: Phase) -> ScopeGuard {
        set(|t| t.phase = phase)
    }

    /// Events of attention (its GEMMs and softmax kernels count as attention).
    pub fn attention() -> ScopeGuard {
        set(|t| t.attention = true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_nest_and_restore() {
        assert_eq!(current_tag(), Tag::default());
        {
            let _p = scope::phase(Phase::Backward);
            let _l = scope::layer(3);
            {
                let _a = scope::attention();
                assert_eq!(current_tag(), Tag { layer: Some(3), phase: Phase::Backward, attention: true });
                let _n = scope::no_layer();
                assert_eq!(current_tag().layer, None);
            }
            assert_eq!(current_tag(), Tag { layer: Some(3), phase: Phase::Backward, attention: false });
        }
        assert_eq!(current_tag(), Tag::default());
    }

    #[test]
    fn gemm_work_by_hand() {
        // 3 x 5 x 7 bf16 product into f32, twice, accumulating: flops 2*3*5*7*2 = 420;
        // bytes 2 * ((3*7 + 7*5) * 2 + 2 * 3*5 * 4) = 2 * (112 + 120) = 464.
        let k = EventKind::Gemm {
            routine: BlasRoutine::Gemm,
            m: 3,
            n: 5,
            k: 7,
            batch: 2,
            operands: ElemType::Bf16,
            output: ElemType::F32,
            compute: GemmCompute::F32,
            accumulate: true,
        };
        assert_eq!(gemm_work(&k), Work::new(464, 420));
        // A 5 x 5 SYRK of depth 7 in f32, accumulating: flops 5*6*7 = 210; bytes 5*7*4 +
        // 2 * 15 * 4 = 260.
        let s = EventKind::Gemm {
            routine: BlasRoutine::Syrk,
            m: 5,
            n: 5,
            k: 7,
            batch: 1,
            operands: ElemType::F32,
            output: ElemType::F32,
            compute: GemmCompute::F32,
            accumulate: true,
        };
        assert_eq!(gemm_work(&s), Work::new(260, 210));
        assert_eq!(
            Event { kind: s, tag: Tag::default(), gpu_ms: None, captured: false }.category(),
            Category::GemmFp32
        );
        let e = Event { kind: k, tag: Tag::default(), gpu_ms: None, captured: false };
        assert_eq!(e.category(), Category::GemmTensor);
        assert!(e.is_launch() && !e.is_host_sync());
    }
}
