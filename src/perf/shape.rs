//! From the ledger of a step run small to the shape of the step at full size.
//!
//! The emulator cannot run a 7B model at 4,096 tokens a step, so a step is run with a few
//! of its layers at the real batch and head structure and short sequences, twice, at two
//! sequence lengths `s1 < s2`. [`extrapolate`] pairs the two ledgers event by event (their
//! launch sequences must be identical: a step whose launch count depends on the sequence
//! length is reported as such) and classifies every size argument of every event: the
//! same in both runs (fixed: weights, `k`, optimizer state), or proportional to the
//! sequence length (tokens, the rows of attention scores); anything else is data-dependent
//! and reported. Each event's cost function is then evaluated again at the target's
//! arguments, so a kernel whose cost is quadratic in the sequence (attention scores) grows
//! quadratically, and the growth of every event is printed from its cost function.
//! [`LayerWeights`] says how many target layers each run layer stands for (counts per layer
//! times layers).

use super::{BlasRoutine, Category, CopyDir, ElemType, Event, EventKind, GemmCompute, Work};
use crate::error::{Error, Result};
use std::collections::BTreeMap;

/// How a size grew from the short run to the long one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ArgGrowth {
    Fixed,
    Proportional,
    DataDependent,
}

fn classify(a1: u64, a2: u64, s1: u64, s2: u64) -> ArgGrowth {
    if a1 == a2 {
        ArgGrowth::Fixed
    } else if a1 as u128 * s2 as u128 == a2 as u128 * s1 as u128 {
        ArgGrowth::Proportional
    } else {
        ArgGrowth::DataDependent
    }
}

fn scale_arg(a1: u64, a2: u64, s1: u64, s2: u64, target: u64) -> (u64, ArgGrowth) {
    match classify(a1, a2, s1, s2) {
        ArgGrowth::Fixed => (a1, ArgGrowth::Fixed),
        ArgGrowth::Proportional => ((a1 as u128 * target as u128 / s1 as u128) as u64, ArgGrowth::Proportional),
        // Data-dependent sizes (counts of touched rows, say) keep the long run's value.
        ArgGrowth::DataDependent => (a2, ArgGrowth::DataDependent),
    }
}

/// One size argument that was neither fixed nor proportional to the sequence length.
#[derive(Clone, Debug, PartialEq)]
pub struct DataDependentArg {
    pub event: usize,
    pub what: String,
    pub short: u64,
    pub long: u64,
}

/// What [`extrapolate`] found about the growth of the step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScalingReport {
    pub short_seq: usize,
    pub long_seq: usize,
    pub target_seq: usize,
    /// Work of the target step by how it grows with the sequence length (from its cost
    /// functions): "fixed", "linear", "quadratic" (or "other").
    pub work_by_growth: BTreeMap<&'static str, Work>,
    pub data_dependent: Vec<DataDependentArg>,
}

fn event_name(e: &Event) -> String {
    match &e.kind {
        EventKind::Launch { cost, .. } => cost.kernel.to_string(),
        EventKind::Gemm { routine: BlasRoutine::Gemm, operands, .. } => format!("gemm({})", operands.name()),
        EventKind::Gemm { routine: BlasRoutine::Syrk, operands, .. } => format!("syrk({})", operands.name()),
        EventKind::Sync => "sync".into(),
        EventKind::Copy { dir, .. } => format!("copy {dir:?}"),
        EventKind::Memset { .. } => "memset".into(),
        EventKind::Alloc { .. } => "alloc".into(),
        EventKind::Free { .. } => "free".into(),
        EventKind::GraphLaunch { .. } => "graph launch".into(),
    }
}

fn same_shape(a: &Event, b: &Event) -> bool {
    use EventKind as K;
    let kinds = match (&a.kind, &b.kind) {
        (K::Launch { cost: c1, args: a1, .. }, K::Launch { cost: c2, args: a2, .. }) => {
            std::ptr::eq(*c1, *c2) && a1.len() == a2.len()
        }
        (
            K::Gemm { routine: r1, operands: o1, output: p1, compute: c1, accumulate: x1, batch: b1, .. },
            K::Gemm { routine: r2, operands: o2, output: p2, compute: c2, accumulate: x2, batch: b2, .. },
        ) => r1 == r2 && o1 == o2 && p1 == p2 && c1 == c2 && x1 == x2 && b1 == b2,
        (K::Copy { dir: d1, blocking: b1, .. }, K::Copy { dir: d2, blocking: b2, .. }) => d1 == d2 && b1 == b2,
        (K::Sync, K::Sync) | (K::Memset { .. }, K::Memset { .. }) => true,
        (K::Alloc { .. }, K::Alloc { .. }) | (K::Free { .. }, K::Free { .. }) => true,
        (K::GraphLaunch { nodes: n1 }, K::GraphLaunch { nodes: n2 }) => n1 == n2,
        _ => false,
    };
    kinds && a.tag == b.tag && a.captured == b.captured
}

/// Whether two runs of a step made the same device calls in the same order (kernels, cuBLAS
/// types, copies, syncs, with the same tags), whatever their sizes.
pub fn same_calls(a: &[Event], b: &[Event]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same_shape(x, y))
}

/// Whether two runs of a step made exactly the same device calls, sizes included.
pub fn identical_calls(a: &[Event], b: &[Event]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| same_shape(x, y) && format!("{:?}", x.kind) == format!("{:?}", y.kind))
}

fn growth_label(short: Work, target: Work, s1: usize, target_seq: usize) -> &'static str {
    let (q1, q2) = (short.bytes + short.flops, target.bytes + target.flops);
    if q1 <= 0.0 || target_seq == s1 {
        return "fixed";
    }
    let p = (q2 / q1).ln() / (target_seq as f64 / s1 as f64).ln();
    if p < 0.05 {
        "fixed"
    } else if p < 1.05 {
        "linear"
    } else if p < 2.05 {
        "quadratic"
    } else {
        "other"
    }
}

/// The step at `target_seq`, from the same step run at `short_seq` and `long_seq` (same
/// batch, same layers): every event with its sizes scaled, and the report of how they grew.
pub fn extrapolate(
    short: &[Event],
    short_seq: usize,
    long: &[Event],
    long_seq: usize,
    target_seq: usize,
) -> Result<(Vec<Event>, ScalingReport)> {
    if short_seq == 0 || long_seq <= short_seq {
        return Err(Error::invalid(
            "perf::extrapolate",
            format!("needs two sequence lengths 0 < s1 < s2, got {short_seq} and {long_seq}"),
        ));
    }
    if short.len() != long.len() {
        return Err(Error::invalid(
            "perf::extrapolate",
            format!(
                "the step made {} device calls at sequence length {short_seq} and {} at {long_seq}: its launch \
                 count depends on the sequence length, so it cannot be scaled by layer",
                short.len(),
                long.len()
            ),
        ));
    }
    let (s1, s2, st) = (short_seq as u64, long_seq as u64, target_seq as u64);
    let mut report = ScalingReport { short_seq, long_seq, target_seq, ..Default::default() };
    let mut out = Vec::with_capacity(short.len());
    for (i, (a, b)) in short.iter().zip(long).enumerate() {
        if !same_shape(a, b) {
            return Err(Error::invalid(
                "perf::extrapolate",
                format!(
                    "event {i} is {} at sequence length {short_seq} but {} at {long_seq}",
                    event_name(a),
                    event_name(b)
                ),
            ));
        }
        let mut note = |what: String, x1: u64, x2: u64, g: ArgGrowth| {
            if g == ArgGrowth::DataDependent {
                report.data_dependent.push(DataDependentArg { event: i, what, short: x1, long: x2 });
            }
        };
        let mut sc = |what: &str, x1: u64, x2: u64| {
            let (v, g) = scale_arg(x1, x2, s1, s2, st);
            note(format!("{} {what}", event_name(a)), x1, x2, g);
            v
        };
        let kind = match (&a.kind, &b.kind) {
            (EventKind::Launch { cost, grid, block, shared_bytes, args: a1 }, EventKind::Launch { args: a2, .. }) => {
                EventKind::Launch {
                    cost,
                    grid: *grid,
                    block: *block,
                    shared_bytes: *shared_bytes,
                    args: a1
                        .iter()
                        .zip(a2)
                        .enumerate()
                        .map(|(j, (&x, &y))| sc(&format!("argument {j}"), x, y))
                        .collect(),
                }
            }
            (
                EventKind::Gemm { routine, m, n, k, batch, operands, output, compute, accumulate },
                EventKind::Gemm { m: m2, n: n2, k: k2, .. },
            ) => EventKind::Gemm {
                routine: *routine,
                m: sc("m", *m, *m2),
                n: sc("n", *n, *n2),
                k: sc("k", *k, *k2),
                batch: *batch,
                operands: *operands,
                output: *output,
                compute: *compute,
                accumulate: *accumulate,
            },
            (EventKind::Copy { dir, bytes, blocking }, EventKind::Copy { bytes: b2, .. }) => {
                EventKind::Copy { dir: *dir, bytes: sc("bytes", *bytes, *b2), blocking: *blocking }
            }
            (EventKind::Memset { bytes }, EventKind::Memset { bytes: b2 }) => {
                EventKind::Memset { bytes: sc("bytes", *bytes, *b2) }
            }
            (EventKind::Alloc { bytes }, EventKind::Alloc { bytes: b2 }) => {
                EventKind::Alloc { bytes: sc("bytes", *bytes, *b2) }
            }
            (EventKind::Free { bytes }, EventKind::Free { bytes: b2 }) => {
                EventKind::Free { bytes: sc("bytes", *bytes, *b2) }
            }
            (k, _) => k.clone(),
        };
        let e = Event { kind, tag: a.tag, gpu_ms: None, captured: a.captured };
        let label = growth_label(a.work(), e.work(), short_seq, target_seq);
        *report.work_by_growth.entry(label).or_default() += e.work();
        out.push(e);
    }
    Ok((out, report))
}

/// How many target layers each run layer stands for: `weights[i]` for run layer `i`
/// (events outside any layer count once).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerWeights(pub Vec<f64>);

impl LayerWeights {
    /// The same layers as were run (every weight 1).
    pub fn identity(layers: usize) -> Self {
        LayerWeights(vec![1.0; layers])
    }

    /// Run layer `i` is of kind `run_kinds[i]`; the target has `target_counts[kind]` layers
    /// of each kind. Every kind of the target must appear in the run.
    pub fn by_kind<K: Ord + Copy + std::fmt::Debug>(
        run_kinds: &[K],
        target_counts: &BTreeMap<K, usize>,
    ) -> Result<Self> {
        let mut in_run: BTreeMap<K, usize> = BTreeMap::new();
        for k in run_kinds {
            *in_run.entry(*k).or_default() += 1;
        }
        for (k, &n) in target_counts {
            if n > 0 && !in_run.contains_key(k) {
                return Err(Error::invalid(
                    "perf::LayerWeights",
                    format!("the target has {n} layers of kind {k:?} but the run has none to stand for them"),
                ));
            }
        }
        Ok(LayerWeights(
            run_kinds.iter().map(|k| target_counts.get(k).copied().unwrap_or(0) as f64 / in_run[k] as f64).collect(),
        ))
    }

    pub fn weight(&self, e: &Event) -> f64 {
        e.tag.layer.map_or(1.0, |l| self.0.get(l as usize).copied().unwrap_or(0.0))
    }

    /// Each event with its weight, for [`super::roofline::DeviceModel::predict`].
    pub fn weighted<'a>(&'a self, events: &'a [Event]) -> impl Iterator<Item = (&'a Event, f64)> + 'a {
        events.iter().map(move |e| (e, self.weight(e)))
    }
}

/// Counts of a step (weighted: a scaled step may have fractional per-kind layer weights,
/// whose sums are whole for whole layers).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepCounts {
    /// Kernel launches (eager or graph nodes).
    pub kernel_launches: f64,
    /// Calls the host makes on the stream (eager launches, copies, memsets, graph launches).
    pub host_calls: f64,
    pub graph_launches: f64,
    /// Launches and cuBLAS calls recorded into a graph capture.
    pub graph_nodes: f64,
    /// cuBLAS calls by `(operand type, compute)`.
    pub gemms: BTreeMap<(ElemType, GemmCompute), f64>,
    /// Times the host waits for the device (a sync right after a blocking copy is the same wait).
    pub host_syncs: f64,
    /// Of those, explicit synchronize calls, and blocking device-to-host copies.
    pub sync_calls: f64,
    pub blocking_copies: f64,
    pub htod_bytes: f64,
    pub dtoh_bytes: f64,
    pub dtod_bytes: f64,
    pub memsets: f64,
    pub allocations: f64,
    pub frees: f64,
    /// Kernel launches plus cuBLAS calls per layer (unweighted, as run), by layer index.
    pub launches_per_layer: BTreeMap<u32, u64>,
    pub work: Work,
}

impl StepCounts {
    pub fn of<'a>(events: impl IntoIterator<Item = (&'a Event, f64)>) -> StepCounts {
        let mut c = StepCounts::default();
        let mut previous: Option<&Event> = None;
        for (e, w) in events {
            c.work += e.work() * w;
            if e.is_launch() {
                if let Some(l) = e.tag.layer {
                    *c.launches_per_layer.entry(l).or_default() += 1;
                }
                if e.captured {
                    c.graph_nodes += w;
                }
            }
            if e.is_host_call() {
                c.host_calls += w;
            }
            if e.is_host_wait_after(previous) {
                c.host_syncs += w;
            }
            previous = Some(e);
            match &e.kind {
                EventKind::Launch { .. } => c.kernel_launches += w,
                EventKind::Gemm { operands, compute, .. } => *c.gemms.entry((*operands, *compute)).or_default() += w,
                EventKind::Copy { dir, bytes, blocking } => {
                    if *blocking {
                        c.blocking_copies += w;
                    }
                    let b = *bytes as f64 * w;
                    match dir {
                        CopyDir::HostToDevice => c.htod_bytes += b,
                        CopyDir::DeviceToHost => c.dtoh_bytes += b,
                        CopyDir::DeviceToDevice => c.dtod_bytes += b,
                    }
                }
                EventKind::Memset { .. } => c.memsets += w,
                EventKind::Alloc { .. } => c.allocations += w,
                EventKind::Free { .. } => c.frees += w,
                EventKind::Sync => c.sync_calls += w,
                EventKind::GraphLaunch { .. } => c.graph_launches += w,
            }
        }
        c
    }

    pub fn gemm_calls(&self) -> f64 {
        self.gemms.values().sum()
    }

    /// cuBLAS calls with f32 operands on FP32 cores.
    pub fn fp32_core_gemms(&self) -> f64 {
        self.gemms.get(&(ElemType::F32, GemmCompute::F32)).copied().unwrap_or(0.0)
    }

    /// The most kernel launches plus cuBLAS calls of any one layer.
    pub fn max_launches_per_layer(&self) -> u64 {
        self.launches_per_layer.values().copied().max().unwrap_or(0)
    }
}

/// Seconds by category as measured on a GPU (CUDA events around each launch), weighted.
pub fn measured_by_category<'a>(events: impl IntoIterator<Item = (&'a Event, f64)>) -> Option<BTreeMap<Category, f64>> {
    let mut out: BTreeMap<Category, f64> = BTreeMap::new();
    let mut any = false;
    for (e, w) in events {
        if let Some(ms) = e.gpu_ms {
            any = true;
            *out.entry(e.category()).or_default() += w * ms as f64 / 1e3;
        }
    }
    any.then_some(out)
}

/// Bytes a training step cannot avoid moving through device memory: every weight it reads,
/// once, in the dtype it is stored in, plus the state the optimizer must read and write.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CompulsoryBytes {
    pub weights_read: f64,
    pub optimizer_state: f64,
}

impl CompulsoryBytes {
    pub fn total(&self) -> f64 {
        self.weights_read + self.optimizer_state
    }
}

/// Bytes of a dense Adam step per parameter: parameter, gradient and two moments read,
/// parameter and moments written, all f32.
pub const ADAM_BYTES_PER_PARAM: f64 = 28.0;
/// Bytes of a SparseAdam step per kept entry: the COO entry (row, column, value) read, the
/// parameter and moments read and written.
pub const SPARSE_ADAM_BYTES_PER_ENTRY: f64 = 36.0;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::perf::{KernelCost, Tag};

    pub(crate) static TEST_KERNEL_AXPY: KernelCost = KernelCost {
        kernel: "axpy_f32",
        module: "dense",
        category: Category::Elementwise,
        tensor_cores: false,
        eval: |a| Work::new(12 * a[0], 2 * a[0]),
    };
    static SCORES: KernelCost = KernelCost {
        kernel: "softmax_causal_f32",
        module: "transformer",
        category: Category::Attention,
        tensor_cores: false,
        // args: matrices, t: t^2 entries per matrix read and written.
        eval: |a| Work::new(8 * a[0] * a[1] * a[1], 5 * a[0] * a[1] * a[1]),
    };

    fn launch(cost: &'static KernelCost, args: Vec<u64>, layer: Option<u32>) -> Event {
        Event {
            kind: EventKind::Launch { cost, grid: [1, 1, 1], block: [256, 1, 1], shared_bytes: 0, args },
            tag: Tag { layer, ..Tag::default() },
            gpu_ms: None,
            captured: false,
        }
    }

    fn gemm(m: u64, n: u64, k: u64, layer: Option<u32>) -> Event {
        Event {
            kind: EventKind::Gemm {
                routine: BlasRoutine::Gemm,
                m,
                n,
                k,
                batch: 1,
                operands: ElemType::F32,
                output: ElemType::F32,
                compute: GemmCompute::F32,
                accumulate: false,
            },
            tag: Tag { layer, ..Tag::default() },
            gpu_ms: None,
            captured: false,
        }
    }

    #[test]
    fn scales_fixed_linear_and_quadratic_sizes() {
        // batch 2, hidden 8: tokens = 2 s. An axpy over tokens x hidden, the optimizer's
        // fixed-size axpy, a scores softmax over (2 x 4 heads) matrices of s x s, and a
        // weight-gradient GEMM (hidden x hidden x tokens).
        let step = |s: u64| {
            vec![
                launch(&TEST_KERNEL_AXPY, vec![2 * s * 8], Some(0)),
                launch(&TEST_KERNEL_AXPY, vec![64], Some(0)),
                launch(&SCORES, vec![8, s], Some(1)),
                gemm(8, 8, 2 * s, None),
            ]
        };
        let (target, report) = extrapolate(&step(2), 2, &step(4), 4, 128).unwrap();
        let want = step(128);
        for (t, w) in target.iter().zip(&want) {
            assert_eq!(t.work(), w.work());
        }
        assert!(report.data_dependent.is_empty());
        let g = &report.work_by_growth;
        assert_eq!(g["fixed"], Work::new(12 * 64, 128));
        assert_eq!(g["quadratic"], Work::new(8 * 8 * 128 * 128, 5 * 8 * 128 * 128));
        assert_eq!(g["linear"], want[0].work() + want[3].work());
        // Layer 0 stands for 3 target layers, layer 1 for 2: counts scale by kind.
        let weights = LayerWeights(vec![3.0, 2.0]);
        let c = StepCounts::of(weights.weighted(&target));
        assert_eq!(c.kernel_launches, 3.0 + 3.0 + 2.0);
        assert_eq!(c.gemm_calls(), 1.0);
        assert_eq!(c.launches_per_layer[&0], 2);
        // A size that is neither is reported; a launch count that changes is an error.
        let mut odd = step(4);
        odd[1] = launch(&TEST_KERNEL_AXPY, vec![65], Some(0));
        let (_, r) = extrapolate(&step(2), 2, &odd, 4, 128).unwrap();
        assert_eq!(r.data_dependent.len(), 1);
        assert_eq!((r.data_dependent[0].short, r.data_dependent[0].long), (64, 65));
        let err = extrapolate(&step(2), 2, &step(4)[..3], 4, 128).unwrap_err().to_string();
        assert!(err.contains("depends on the sequence length"), "{err}");
        assert!(extrapolate(&step(2), 2, &step(2), 2, 128).is_err());
    }

    #[test]
    fn layer_weights_by_kind() {
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
        enum K {
            Lowest,
            Trained,
            Frozen,
        }
        let target = BTreeMap::from([(K::Lowest, 1), (K::Trained, 10), (K::Frozen, 21)]);
        let w = LayerWeights::by_kind(&[K::Lowest, K::Frozen, K::Frozen, K::Trained], &target).unwrap();
        assert_eq!(w.0, vec![1.0, 10.5, 10.5, 10.0]);
        assert!(LayerWeights::by_kind(&[K::Lowest, K::Frozen], &target).is_err());
    }
}
