//! The CUDA backend: the same op set as [`crate::Cpu`], run by hand-written kernels
//! (`cuda/*.cu`, compiled by build.rs into fatbins embedded in the library) and cuBLAS.
//!
//! - [`Cuda::new`] never panics: it reports [`Error::NoKernels`] when the crate was built
//!   without nvcc, [`Error::CudaUnavailable`] when libcuda, a device or cuBLAS is missing,
//!   and [`Error::Cuda`] when the embedded kernels do not load on the device.
//! - Buffers are [`CudaBuf`]s (device memory that reports its size, like the CPU's
//!   `CpuBuf`). All work goes to one stream (the backend's own, never the legacy NULL stream, so
//!   it can be captured as a CUDA graph: see `graph.rs`; or the engine's stream given to
//!   [`Cuda::from_stream`]), so ops are ordered and buffers can be dropped at any time (frees
//!   are stream-ordered). An engine's own buffers are used in place through [`Cuda::view`]
//!   and [`Cuda::with_view_mut`] (module `interop`).
//! - `F: Real` ops run in f32; f64 returns [`Error::UnsupportedDtype`].
//! - Hot paths allocate nothing. Scratch space lives in the backend: a small status block
//!   and the device error word allocated by `new`, plus one arena that grows (to the next
//!   power of two of the requested size) the first time an op needs more than it holds, and
//!   is reused afterwards. [`Backend::memory_stats`](crate::Backend::memory_stats) counts
//!   all of it. cuBLAS keeps its own workspace, which is not counted.
//! - Host round trips happen only where the trait returns host values (counts, thresholds,
//!   `download`) and where an error must be returned (`topk_coo`'s non-finite check).
//! - Index checks: ops whose CPU twin rejects an out-of-range index cannot inspect device
//!   indices without a round trip, so their kernels skip such entries (gathers write 0) and
//!   set a bit in a device error word; the next
//!   [`Backend::synchronize`](crate::Backend::synchronize) or `download` reports it (once)
//!   as [`Error::InvalidArgument`] naming the op. Ops that read results back anyway
//!   (`nonzero_rows_cols`, `coo_compact_rows`, `topk_coo`) check their own inputs on the
//!   device and fail right away.
//! - Layout: this file holds the buffers, the context and the launch helpers; memory.rs the
//!   memory ops; interop.rs an engine's stream and buffers; each op family its own file
//!   (dense.rs with gemm.rs, transformer.rs, encoder.rs, attention.rs, sparse.rs, topk.rs,
//!   optim.rs), every op calling its shared validator (`backend::ops`) before it launches
//!   anything.

mod attention;
mod consts;
#[cfg(test)]
mod cost_tests;
mod dense;
mod encoder;
mod gemm;
mod graph;
mod interop;
mod memory;
mod optim;
mod profile;
mod sparse;
mod topk;
pub(crate) use topk::topk_workspace_words;
mod transformer;

use crate::error::{checked_mul, Error, Result};
use crate::scalar::Elem;
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{
    result as drv, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
};
use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex, MutexGuard};

pub use interop::CudaBufRef;
pub use profile::ProfileOptions;
pub use topk::CudaTopkWorkspace;

mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Whether this build embeds the CUDA kernels (false when nvcc was not found at build time;
/// [`Cuda::new`] then returns [`Error::NoKernels`]).
pub fn kernels_available() -> bool {
    kernels::HAS_KERNELS
}

use consts::{ERR_BITS, THREADS, TILE};

/// Words of the persistent status block (`Scratch::status`).
const STATUS_WORDS: usize = 16;
/// Words of the device health block (`CudaShared::errors`).
const HEALTH_WORDS: usize = 8;

/// The names of deferred finiteness checks: ids are stable per name, so a step registers
/// nothing new after its first run.
#[derive(Default)]
struct CheckNames {
    names: Vec<String>,
    ids: HashMap<String, u64>,
}

impl CheckNames {
    fn id(&mut self, name: &str) -> u64 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        self.names.push(name.to_string());
        let id = self.names.len() as u64;
        self.ids.insert(name.to_string(), id);
        id
    }
}

use crate::backend::MemoryCounters as Counters;
use crate::perf::{CopyDir, EventKind, KernelCost};
use profile::Profiler;

/// A device buffer of `len` elements that reports its size to the backend that made it.
/// (A zero-length buffer still holds one element of device memory, so every buffer has a
/// valid address; it is not counted.)
pub struct CudaBuf<T> {
    slice: ManuallyDrop<CudaSlice<T>>,
    len: usize,
    counters: Arc<Counters>,
    profiler: Arc<Profiler>,
    /// Memory an engine owns, lent through [`Cuda::view`] or [`Cuda::with_view_mut`]:
    /// never freed here and not counted.
    borrowed: bool,
}

impl<T> CudaBuf<T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The device address (for kernel arguments).
    fn ptr(&self) -> u64 {
        let (ptr, _sync) = self.slice.device_ptr(self.slice.stream());
        ptr
    }
    /// The device address, for a kernel that writes the buffer.
    fn ptr_mut(&mut self) -> u64 {
        self.ptr()
    }
}

impl<T> Drop for CudaBuf<T> {
    fn drop(&mut self) {
        // SAFETY: `slice` is taken once, here, and never used again.
        let slice = unsafe { ManuallyDrop::take(&mut self.slice) };
        if self.borrowed {
            slice.leak();
        } else {
            self.counters.sub(self.len * std::mem::size_of::<T>());
            // The device allocation holds at least one element (see `Cuda::alloc_on`).
            self.profiler.record(EventKind::Free { bytes: (self.len.max(1) * std::mem::size_of::<T>()) as u64 });
            drop(slice);
        }
    }
}

impl<T> std::fmt::Debug for CudaBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBuf<{}>(len = {})", std::any::type_name::<T>(), self.len)
    }
}

/// Scratch owned by the backend, used under its mutex by one op at a time (ops on the one
/// stream are ordered, so an op may reuse what the previous op's kernels still read).
struct Scratch {
    /// Small per-op status words (counts, maxima, flags read back by the host).
    status: CudaBuf<u64>,
    /// Grow-only arena (flags, tile counts, partial sums).
    arena: Option<CudaBuf<u64>>,
}

/// u64 words the scratch arena holds once an op asked for `words` (it grows to powers of
/// two; the memory plan, [`crate::plan`], sizes it by the same function).
pub(crate) fn arena_words(words: usize) -> usize {
    words.max(1).next_power_of_two()
}

/// Arena words the fused attention backward asks for: one f32 per query row
/// (`rows = batch * heads * seq`), as u64 words.
pub(crate) fn attention_backward_arena_words(rows: usize) -> usize {
    rows.div_ceil(2)
}

/// The CUDA backend on one device. Cheap to clone (layers keep a handle): clones share
/// the context, stream, cuBLAS handle, kernels, scratch and memory counters.
#[derive(Clone)]
pub struct Cuda(Arc<CudaShared>);

impl std::ops::Deref for Cuda {
    type Target = CudaShared;
    fn deref(&self) -> &CudaShared {
        &self.0
    }
}

/// What the clones of a [`Cuda`] share.
pub struct CudaShared {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: Mutex<CudaBlas>,
    modules: Vec<(&'static str, Arc<CudaModule>)>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    counters: Arc<Counters>,
    profiler: Arc<Profiler>,
    scratch: Mutex<Scratch>,
    /// The device health block (`HEALTH_WORDS` u64): [0] index error bits (the kernels' `err`
    /// word, its low 32 bits), [1] the first failed finiteness check (0: none), [2] its
    /// count, [3] its first index, [4] the last `sum_to_host` result (f64 bits), [5] index
    /// error bits of the optimizer kernels (kept apart from [0], which gates them).
    errors: CudaBuf<u64>,
    /// Names of the deferred finiteness checks, by id - 1 (see `DenseOps::assert_finite`).
    checks: Mutex<CheckNames>,
    /// Captured graphs, by `GraphId` (a dropped one leaves `None`).
    graphs: Mutex<Vec<Option<graph::Graph>>>,
    sm_count: u32,
    device_name: String,
    compute_capability: (i32, i32),
    /// f32 GEMMs with TF32 tensor cores ([`Cuda::set_tf32`], gemm.rs).
    tf32: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cuda")
            .field("ordinal", &self.ctx.ordinal())
            .field("device", &self.device_name)
            .field("compute_capability", &self.compute_capability)
            .field("sm_count", &self.sm_count)
            .finish()
    }
}

fn cuda_err<E: std::fmt::Display>(op: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Cuda { op, msg: e.to_string() }
}

/// Runs `f`, turning a panic inside cudarc (a missing library symbol, say) into an error.
fn no_panic<R>(what: &str, f: impl FnOnce() -> R) -> Result<R> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into());
        Error::CudaUnavailable(format!("{what}: {msg}"))
    })
}

/// Fails with [`Error::UnsupportedDtype`] unless `F` is f32.
fn require_f32<F: Elem>(op: &'static str) -> Result<()> {
    if std::any::TypeId::of::<F>() == std::any::TypeId::of::<f32>() {
        Ok(())
    } else {
        Err(Error::UnsupportedDtype { op, dtype: F::NAME, backend: "cuda" })
    }
}

/// Kernel parameters: the address of each argument, in order. Every argument must have
/// exactly the Rust type matching the kernel's parameter (u64 for pointers and 64-bit
/// counts, u32, f32, ...).
macro_rules! kargs {
    ($($a:expr),* $(,)?) => {
        [$((&$a) as *const _ as *mut ::std::ffi::c_void),*]
    };
}
pub(crate) use kargs;

/// `kernel!(NAME = "module" / "kernel_name", Category, |a| (bytes, flops))`: the descriptor of
/// one kernel of `cuda/<module>.cu`, defined beside its launcher: its name, where its time
/// goes, and its cost as a function of the size arguments the launcher records (`a`, in the
/// order the launcher's comment gives). `kernel!([A, B, C] = "module" / ["a", "b", "c"], ...)`
/// declares variants of one kernel (block-size groups) with the same cost. `Category,
/// tensor_cores,` marks a kernel whose flops run on bf16 tensor cores (`nvcuda::wmma`).
macro_rules! kernel {
    ($(#[$m:meta])* $id:ident = $module:literal / $name:literal, $cat:ident, tensor_cores, |$a:ident| $cost:expr) => {
        kernel!(@one $(#[$m])* $id = $module / $name, $cat, true, |$a| $cost);
    };
    ($(#[$m:meta])* $id:ident = $module:literal / $name:literal, $cat:ident, |$a:ident| $cost:expr) => {
        kernel!(@one $(#[$m])* $id = $module / $name, $cat, false, |$a| $cost);
    };
    ($(#[$m:meta])* $id:ident = $module:literal / [$($name:literal),+], $cat:ident, tensor_cores, |$a:ident| $cost:expr) => {
        kernel!(@many $(#[$m])* $id = $module / [$($name),+], $cat, true, |$a| $cost);
    };
    ($(#[$m:meta])* $id:ident = $module:literal / [$($name:literal),+], $cat:ident, |$a:ident| $cost:expr) => {
        kernel!(@many $(#[$m])* $id = $module / [$($name),+], $cat, false, |$a| $cost);
    };
    (@one $(#[$m:meta])* $id:ident = $module:literal / $name:literal, $cat:ident, $tc:literal, |$a:ident| $cost:expr) => {
        $(#[$m])*
        pub(super) static $id: crate::perf::KernelCost = crate::perf::KernelCost {
            kernel: $name,
            module: $module,
            category: crate::perf::Category::$cat,
            tensor_cores: $tc,
            eval: |$a: &[u64]| -> crate::perf::Work {
                let (bytes, flops): (u64, u64) = $cost;
                crate::perf::Work::new(bytes, flops)
            },
        };
    };
    (@many $(#[$m:meta])* $id:ident = $module:literal / [$($name:literal),+], $cat:ident, $tc:literal, |$a:ident| $cost:expr) => {
        $(#[$m])*
        pub(super) static $id: [crate::perf::KernelCost; [$($name),+].len()] = [$(crate::perf::KernelCost {
            kernel: $name,
            module: $module,
            category: crate::perf::Category::$cat,
            tensor_cores: $tc,
            eval: |$a: &[u64]| -> crate::perf::Work {
                let (bytes, flops): (u64, u64) = $cost;
                crate::perf::Work::new(bytes, flops)
            },
        }),+];
    };
}
pub(crate) use kernel;

/// Whether the driver library and cuBLAS can be opened, probed without touching the device.
/// Only dynamic loading (the `cuda-dynamic-loading` feature) can find them missing at run
/// time; a binary that links CUDA (cudarc's `dynamic-linking` or `static-linking`, chosen by
/// the final binary) does not start without them. Where the probe is absent, a panic of
/// cudarc's loader is still turned into an error by [`no_panic`].
#[cfg(feature = "cuda-dynamic-loading")]
fn libraries_present() -> (bool, bool) {
    // SAFETY: both only probe whether the library can be opened.
    unsafe { (cudarc::driver::sys::is_culib_present(), cudarc::cublas::sys::is_culib_present()) }
}

#[cfg(not(feature = "cuda-dynamic-loading"))]
fn libraries_present() -> (bool, bool) {
    (true, true)
}

impl Cuda {
    /// Opens device `ordinal`, loads the embedded kernels and creates a cuBLAS handle.
    pub fn new(ordinal: usize) -> Result<Cuda> {
        if !kernels::HAS_KERNELS {
            return Err(Error::NoKernels);
        }
        if !libraries_present().0 {
            return Err(Error::CudaUnavailable("the CUDA driver library (libcuda) was not found".into()));
        }
        let ctx = no_panic("CUDA driver", || CudaContext::new(ordinal))?
            .map_err(|e| Error::CudaUnavailable(format!("no usable CUDA device {ordinal}: {e}")))?;
        if !libraries_present().1 {
            return Err(Error::CudaUnavailable("cuBLAS (libcublas) was not found".into()));
        }
        // SAFETY: this backend uses a single stream, so cudarc's cross-stream event tracking
        // is not needed; buffers made from now on skip it.
        unsafe { ctx.disable_event_tracking() };
        // A stream of its own (not the legacy NULL stream, which cannot be captured as a graph).
        let stream = ctx.new_stream().map_err(|e| Error::CudaUnavailable(format!("stream creation failed: {e}")))?;
        Self::on_stream(stream)
    }

    /// The backend on `stream` (its context already current-able and checked): cuBLAS bound
    /// to the stream, the device's attributes, the embedded kernels loaded into the context.
    fn on_stream(stream: Arc<CudaStream>) -> Result<Cuda> {
        let ctx = stream.context().clone();
        let blas = no_panic("cuBLAS", || CudaBlas::new(stream.clone()))?
            .map_err(|e| Error::CudaUnavailable(format!("cuBLAS initialisation failed: {e}")))?;
        let attr = |a| ctx.attribute(a).map_err(cuda_err("device attribute"));
        let sm_count = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as u32;
        let compute_capability = (
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        let device_name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let mut modules = Vec::with_capacity(kernels::MODULES.len());
        for &(name, image) in kernels::MODULES {
            let module = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(image.to_vec())).map_err(|e| Error::Cuda {
                op: "load kernels",
                msg: format!(
                    "module {name}: {e} (device {device_name} has compute capability {}.{}; the kernels were built \
                     for SPARSEGRAD_CUDA_ARCHS, default sm_80, sm_90 and compute_90)",
                    compute_capability.0, compute_capability.1
                ),
            })?;
            modules.push((name, module));
        }
        let counters = Arc::new(Counters::default());
        let profiler = Arc::new(Profiler::default());
        let status = Self::alloc_on(&ctx, &stream, &counters, &profiler, STATUS_WORDS, true)?;
        let errors = Self::alloc_on::<u64>(&ctx, &stream, &counters, &profiler, HEALTH_WORDS, true)?;
        Self::reset_health(&stream, &errors)?;
        Ok(Cuda(Arc::new(CudaShared {
            ctx,
            stream,
            blas: Mutex::new(blas),
            modules,
            functions: Mutex::new(HashMap::new()),
            counters,
            profiler,
            scratch: Mutex::new(Scratch { status, arena: None }),
            errors,
            checks: Mutex::new(CheckNames::default()),
            graphs: Mutex::new(Vec::new()),
            sm_count,
            device_name,
            compute_capability,
            tf32: std::sync::atomic::AtomicBool::new(false),
        })))
    }

    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// `(free, total)` bytes of device memory, as the driver reports them now
    /// (`cuMemGetInfo`): what [`crate::plan::MemoryPlan::check_fits`] compares with.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.bind()?;
        drv::mem_get_info().map_err(cuda_err("memory_info"))
    }

    /// (major, minor) compute capability.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// Runs `f` (which queues work on this backend) between two CUDA events and returns its
    /// result with the elapsed device time in milliseconds (waits for the work to finish).
    pub fn time_ms<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<(R, f32)> {
        self.bind()?;
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.ctx.new_event(flags).map_err(cuda_err("event"))?;
        let end = self.ctx.new_event(flags).map_err(cuda_err("event"))?;
        start.record(&self.stream).map_err(cuda_err("event"))?;
        let r = f()?;
        end.record(&self.stream).map_err(cuda_err("event"))?;
        end.synchronize().map_err(cuda_err("event"))?;
        self.profiler.record(EventKind::Sync);
        let ms = start.elapsed_ms(&end).map_err(cuda_err("event"))?;
        Ok((r, ms))
    }

    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(cuda_err("bind context"))
    }

    fn alloc_on<T: DeviceRepr>(
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        counters: &Arc<Counters>,
        profiler: &Arc<Profiler>,
        len: usize,
        zero: bool,
    ) -> Result<CudaBuf<T>> {
        let bytes = checked_mul("alloc", len.max(1), std::mem::size_of::<T>())?;
        ctx.bind_to_thread().map_err(cuda_err("alloc"))?;
        // SAFETY: the memory is zeroed below before anyone reads it, or (zero = false) fully
        // overwritten by the caller (`upload`) before the buffer is handed out.
        let slice = unsafe { stream.alloc::<T>(len.max(1)) }.map_err(|e| {
            if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                let what = format!("a cuda backend buffer of {len} x {}", std::any::type_name::<T>());
                Error::OutOfMemory { what, bytes: bytes as u128 }
            } else {
                Error::Cuda { op: "alloc", msg: format!("{len} x {}: {e}", std::any::type_name::<T>()) }
            }
        })?;
        profiler.record(EventKind::Alloc { bytes: bytes as u64 });
        if zero {
            profiler.record(EventKind::Memset { bytes: bytes as u64 });
            let (ptr, _sync) = slice.device_ptr(stream);
            // SAFETY: `ptr` addresses `bytes` bytes just allocated on this stream.
            unsafe { drv::memset_d8_async(ptr, 0, bytes, stream.cu_stream()) }.map_err(cuda_err("alloc"))?;
        }
        counters.add(len * std::mem::size_of::<T>());
        Ok(CudaBuf {
            slice: ManuallyDrop::new(slice),
            len,
            counters: counters.clone(),
            profiler: profiler.clone(),
            borrowed: false,
        })
    }

    fn alloc_buf<T: DeviceRepr>(&self, len: usize, zero: bool) -> Result<CudaBuf<T>> {
        Self::alloc_on(&self.ctx, &self.stream, &self.counters, &self.profiler, len, zero)
    }

    /// A kernel of the embedded modules, loaded on first use and cached.
    fn function(&self, module: &'static str, name: &'static str) -> Result<CudaFunction> {
        let mut cache = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = cache.get(name) {
            return Ok(f.clone());
        }
        let (_, m) = self
            .modules
            .iter()
            .find(|(n, _)| *n == module)
            .ok_or_else(|| Error::Cuda { op: name, msg: format!("kernel module {module} is not embedded") })?;
        let f = m.load_function(name).map_err(|e| Error::Cuda { op: name, msg: format!("{module}.{name}: {e}") })?;
        cache.insert(name, f.clone());
        Ok(f)
    }

    /// Launches `kernel` on the backend's stream and records it in the ledger with its size
    /// arguments `sizes` (the ones `kernel.eval` takes, see [`crate::perf::KernelCost`]).
    /// Empty grids are skipped.
    ///
    /// # Safety
    /// `params` (see `kargs!`) must match the kernel's parameter list in number, order and
    /// size, and every device address among them must cover every element the kernel
    /// touches for the sizes passed and the grid given.
    unsafe fn launch(
        &self,
        kernel: &'static KernelCost,
        cfg: LaunchConfig,
        params: &mut [*mut c_void],
        sizes: &[u64],
    ) -> Result<()> {
        let (gx, gy, gz) = cfg.grid_dim;
        if gx == 0 || gy == 0 || gz == 0 {
            return Ok(());
        }
        let f = self.function(kernel.module, kernel.kernel)?;
        self.bind()?;
        let timer = self.profiler.start_timer(&self.ctx, &self.stream)?;
        // SAFETY: forwarded to the caller (see above).
        unsafe {
            drv::launch_kernel(
                f.cu_function(),
                cfg.grid_dim,
                cfg.block_dim,
                cfg.shared_mem_bytes,
                self.stream.cu_stream(),
                params,
            )
        }
        .map_err(cuda_err(kernel.kernel))?;
        let event = EventKind::Launch {
            cost: kernel,
            grid: [gx, gy, gz],
            block: [cfg.block_dim.0, cfg.block_dim.1, cfg.block_dim.2],
            shared_bytes: cfg.shared_mem_bytes,
            args: sizes.to_vec(),
        };
        self.profiler.record_launch(event, timer, &self.stream)
    }

    /// A 1-D grid for a grid-stride kernel over `n` items: enough blocks to cover `n`, at
    /// most `per_sm` resident-ish blocks per multiprocessor.
    fn grid_1d(&self, n: usize, per_sm: u32) -> LaunchConfig {
        let blocks = n.div_ceil(THREADS as usize).clamp(1, (self.sm_count * per_sm) as usize) as u32;
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
    }

    /// A 2-D grid: x covers `cols` in blocks of `block_x` threads (capped at `max_x` blocks;
    /// the kernels stride over columns), y strides over `rows` (at most 65535).
    fn grid_2d(&self, rows: usize, cols: usize, block_x: u32, max_x: u32) -> LaunchConfig {
        let gx = cols.div_ceil(block_x as usize).clamp(1, max_x as usize) as u32;
        let target = (self.sm_count as usize * 8).div_ceil(gx as usize);
        let gy = target.clamp(1, rows.clamp(1, 65535)) as u32;
        LaunchConfig { grid_dim: (gx, gy, 1), block_dim: (block_x, 1, 1), shared_mem_bytes: 0 }
    }

    /// One block per compaction tile of `n` elements.
    fn grid_tiles(n: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: (n.div_ceil(TILE) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
    }

    fn lock_scratch(&self) -> MutexGuard<'_, Scratch> {
        self.scratch.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The arena's address, grown first if it holds fewer than `words` u64s.
    fn arena(&self, scratch: &mut Scratch, words: usize) -> Result<u64> {
        let words = words.max(1);
        if scratch.arena.as_ref().is_none_or(|a| a.len() < words) {
            // Drop the old arena first (its free is ordered after the kernels using it).
            scratch.arena = None;
            scratch.arena = Some(self.alloc_buf::<u64>(arena_words(words), false)?);
        }
        Ok(scratch.arena.as_ref().map_or(0, |a| a.ptr()))
    }

    /// `bytes` zero bytes at `ptr`.
    fn memset_zero(&self, ptr: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        self.profiler.record(EventKind::Memset { bytes: bytes as u64 });
        // SAFETY: callers pass an address inside a live buffer of at least `bytes` bytes.
        unsafe { drv::memset_d8_async(ptr, 0, bytes, self.stream.cu_stream()) }.map_err(cuda_err("memset"))
    }

    /// Copies `host.len()` elements from device address `src`, then waits for the stream.
    fn read_device<T: DeviceRepr>(&self, src: u64, host: &mut [T]) -> Result<()> {
        if host.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // Into pageable memory, so the copy itself blocks the host; the stream sync after it
        // is the ledger's second host wait, as the driver sees it.
        let bytes = std::mem::size_of_val(host) as u64;
        self.profiler.record(EventKind::Copy { dir: CopyDir::DeviceToHost, bytes, blocking: true });
        // SAFETY: callers pass an address inside a live buffer of at least host.len() elements.
        unsafe { drv::memcpy_dtoh_async(host, src, self.stream.cu_stream()) }.map_err(cuda_err("download"))?;
        self.profiler.record(EventKind::Sync);
        self.stream.synchronize().map_err(cuda_err("synchronize"))
    }

    /// Words [1..4] of the health block back to "no failed check" (first index: u64 max).
    fn reset_health(stream: &Arc<CudaStream>, errors: &CudaBuf<u64>) -> Result<()> {
        let clear = [0u64, 0, u64::MAX];
        // SAFETY: the health block holds HEALTH_WORDS >= 4 words; `clear` is a pageable host
        // array the driver stages before returning.
        unsafe { drv::memcpy_htod_async(errors.ptr() + 8, &clear, stream.cu_stream()) }
            .map_err(cuda_err("health reset"))
    }

    /// Reads (and clears) the device health block, one blocking copy: an index error names
    /// the op that set it, a failed finiteness check the tensor (and layer) it checked.
    /// Returns the block's words.
    fn check_device_errors(&self) -> Result<[u64; HEALTH_WORDS]> {
        let mut words = [0u64; HEALTH_WORDS];
        self.read_device(self.errors.ptr(), &mut words)?;
        let bits = (words[0] | words[5]) as u32;
        if bits != 0 {
            self.memset_zero(self.errors.ptr(), 4)?;
            if words[5] != 0 {
                self.memset_zero(self.errors.ptr() + 5 * 8, 4)?;
            }
            let op = ERR_BITS.iter().find(|(bit, _)| bits & bit != 0).map_or("cuda", |(_, op)| op);
            return Err(Error::invalid(
                op,
                "an index was out of range (found on the device; those entries were skipped and the outputs are incomplete)",
            ));
        }
        if words[1] != 0 {
            self.bind()?;
            self.profiler.record(EventKind::Copy { dir: CopyDir::HostToDevice, bytes: 24, blocking: false });
            Self::reset_health(&self.stream, &self.errors)?;
            let name = self.check_name(words[1]);
            return Err(Error::NonFinite { what: name, count: words[2] as usize, first_index: words[3] as usize });
        }
        Ok(words)
    }

    fn check_name(&self, id: u64) -> String {
        let checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        checks.names.get(id as usize - 1).cloned().unwrap_or_else(|| format!("finiteness check {id}"))
    }

    /// The id of the deferred finiteness check named `what` (the layer of the current
    /// `perf` scope in front, when there is one).
    fn check_id(&self, what: &str) -> u64 {
        let name = match crate::perf::current_tag().layer {
            Some(l) => format!("layer {l}: {what}"),
            None => what.to_string(),
        };
        self.checks.lock().unwrap_or_else(|p| p.into_inner()).id(&name)
    }
}
