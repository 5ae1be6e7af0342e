//! What a SparseGrad layer's extra work costs on a GPU, priced by the roofline model of
//! [`crate::perf::roofline`]: the two formulations ([`Formulation::price`]) and the ways a
//! merged layer can apply its sparse step `W += P D Q^T` ([`MergedUpdate::price`]).
//!
//! Each price is the sum of the device work the layer issues for it, every piece priced as
//! the roofline prices the ledger's events: a GEMM at the rate of its operand and compute
//! types (bf16 operands on tensor cores, f32 with TF32 on tensor cores at half that rate,
//! f32 on FP32 cores at ~1/15 of it) or at the HBM bandwidth, whichever binds; a kernel,
//! cast or memset at `max(bytes / HBM, flops / FP32 rate)`. So a form that trades GEMM flops
//! for memory traffic prices differently in bf16 than in f32, and the formulation and the
//! update a layer takes on a GPU follow its precision. The CPU keeps the flop model
//! ([`Formulation::choose`]): one rate for every flop. Launch latency is left out (both
//! forms launch a handful of kernels; the step's graph is the lead's concern).
//!
//! The merged update's candidates (issue 18, item 5), for `D` with `k` entries:
//! - [`MergedUpdate::Dense`] (a): zero an `(out, in)` buffer in the operand precision,
//!   store each entry (distinct and sorted, so a plain store, no atomics), then
//!   `E = D Q^T` and `W += P E` by two GEMMs (`2 out in (out + in)` flops);
//! - [`MergedUpdate::Runs`] (b): `E = D Q^T` by rows, each block summing its row's run of
//!   entries in registers against rows of `Q^T` (`4 k in` bytes gathered, `4 out in`
//!   written), then the one GEMM `W += P E` (`2 out^2 in` flops);
//! - [`MergedUpdate::SparseColumns`] / [`MergedUpdate::SparseRows`]: the CPU's tuned
//!   `coo_dense_t` paths, which on a GPU do one scattered atomic add per entry and row of
//!   the dense operand (priced here only to show what the GPU path replaced).

use super::Formulation;
use crate::backend::Precision;
use crate::perf::roofline::DeviceModel;
use crate::perf::{ElemType, Event, EventKind, GemmCompute, Tag};

/// How a layer's GEMMs run: their operand type and cuBLAS compute type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmMode {
    pub operands: ElemType,
    pub compute: GemmCompute,
}

impl GemmMode {
    /// bf16 operands with f32 accumulation in bf16 mode; f32 operands otherwise, with TF32
    /// tensor cores when `tf32` (`CUBLAS_COMPUTE_32F_FAST_TF32`).
    pub fn of(precision: Precision, tf32: bool) -> GemmMode {
        match precision {
            Precision::Bf16 => GemmMode { operands: ElemType::Bf16, compute: GemmCompute::F32 },
            Precision::Full if tf32 => GemmMode { operands: ElemType::F32, compute: GemmCompute::F32FastTf32 },
            Precision::Full => GemmMode { operands: ElemType::F32, compute: GemmCompute::F32 },
        }
    }

    /// Bytes of one operand element.
    fn bytes(self) -> f64 {
        self.operands.bytes() as f64
    }

    fn is_bf16(self) -> bool {
        self.operands == ElemType::Bf16
    }
}

/// How a merged layer applies the sparse change `D` of `Wt` to `W` (`W += P D Q^T`); see the
/// module docs. Fixed per layer at construction: each keeps the basis in its own layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergedUpdate {
    /// `W += P[:, rows] (D Q^T)[rows, :]` over the rows the step touched (CPU, f32).
    SparseRows,
    /// `W += (P D) Q^T` (CPU, f32).
    SparseColumns,
    /// (a) `D` stored densely, then `W += P (D Q^T)` by two GEMMs.
    Dense,
    /// (b) `E = D Q^T` by row runs summed in registers, then `W += P E`.
    Runs,
}

impl MergedUpdate {
    /// The update a merged layer takes. bf16 layers take [`MergedUpdate::Dense`] on every
    /// backend (every basis product in bf16 with f32 accumulation). In f32, a backend with a
    /// device model (a GPU) takes the cheaper of [`MergedUpdate::Dense`] and
    /// [`MergedUpdate::Runs`] at its rates, the CPU its tuned sparse update in the order
    /// [`Formulation::merged_update_by_columns`] picks.
    pub fn choose(
        out: usize,
        inp: usize,
        k: usize,
        precision: Precision,
        device: Option<(&DeviceModel, GemmMode)>,
    ) -> MergedUpdate {
        if precision == Precision::Bf16 {
            return MergedUpdate::Dense;
        }
        match device {
            Some((model, mode)) => {
                let runs = MergedUpdate::Runs.price(out, inp, k, mode, model);
                if runs < MergedUpdate::Dense.price(out, inp, k, mode, model) {
                    MergedUpdate::Runs
                } else {
                    MergedUpdate::Dense
                }
            }
            None if Formulation::merged_update_by_columns(out, inp, k) => MergedUpdate::SparseColumns,
            None => MergedUpdate::SparseRows,
        }
    }

    /// Predicted seconds of one update on `model`, in `mode` (see the module docs). The
    /// sparse CPU orders are priced as their GPU kernels would run (with every row touched).
    pub fn price(self, out: usize, inp: usize, k: usize, mode: GemmMode, model: &DeviceModel) -> f64 {
        let (o, i, kf) = (out as u64, inp as u64, k as u64);
        let eb = mode.bytes();
        let (of, inf) = (out as f64, inp as f64);
        match self {
            MergedUpdate::Dense => {
                // Zero D, store the entries (rows, cols, values read; one element written),
                // E = D Q^T (f32 out), in bf16 E cast to bf16, W += P E.
                let scatter = kernel(model, update_kernel_work::coo_densify(kf, mode.operands.bytes()));
                let cast = if mode.is_bf16() { memory(model, 6.0 * of * inf) } else { 0.0 };
                memory(model, eb * of * inf)
                    + scatter
                    + gemm(model, o, i, i, mode, false)
                    + cast
                    + gemm(model, o, i, o, mode, true)
            }
            MergedUpdate::Runs => {
                // As a kernel reading Q^T in the operand type would (only f32 exists: in bf16
                // [`MergedUpdate::choose`] takes Dense, priced lower at every shape of the paper).
                let runs = kernel(model, update_kernel_work::coo_row_starts(kf, o))
                    + kernel(model, update_kernel_work::coo_mm(kf, o, i, mode.operands.bytes()));
                let cast = if mode.is_bf16() { memory(model, 6.0 * of * inf) } else { 0.0 };
                runs + cast + gemm(model, o, i, o, mode, true)
            }
            MergedUpdate::SparseColumns => {
                // coo_dense_t against P (out rows of P), then (P D) Q^T.
                kernel(model, update_kernel_work::coo_dense_t(kf, o)) + gemm(model, o, i, i, mode, true)
            }
            MergedUpdate::SparseRows => {
                // Row compaction (rows read twice), coo_dense_t against Q, the gather of the
                // touched rows of P^T (every row at worst), then the GEMM over them.
                let touched = o.min(kf);
                let compact = memory(model, 16.0 * kf as f64);
                let gather = memory(model, 8.0 * (touched * o) as f64);
                compact
                    + kernel(model, update_kernel_work::coo_dense_t(kf, i))
                    + gather
                    + gemm(model, o, i, touched, mode, true)
            }
        }
    }
}

/// Bytes and flops of the update kernels: the `kernel!` descriptors in
/// `backend/cuda/sparse.rs` evaluate these (hand counts in `backend/cuda/cost_tests.rs`), so
/// the ledger and the prices here are one count.
pub(crate) mod update_kernel_work {
    /// `coo_densify` of `len` entries into elements of `elem_bytes`: rows, cols and values
    /// read (12 bytes), the previous entry's indices read for the order check (8), one
    /// element written.
    pub(crate) fn coo_densify(len: u64, elem_bytes: u64) -> (u64, u64) {
        (len * (20 + elem_bytes), 0)
    }

    /// `coo_row_starts` for an `(n_rows, _)` COO of `len` entries: a binary search per row
    /// start (`ceil(log2(len + 1))` probes of 4 bytes), the starts written, and the order
    /// check reading each entry's row and column once.
    pub(crate) fn coo_row_starts(len: u64, n_rows: u64) -> (u64, u64) {
        let probes = 64 - len.leading_zeros() as u64;
        (4 * (n_rows + 1) * (probes + 1) + 8 * len, 0)
    }

    /// `coo_mm` of `len` entries of an `(n_rows, _)` COO against `b_cols` columns of `b`
    /// (elements of `b_bytes`): the starts and each entry's column and value read once, one
    /// row of `b` gathered per entry, the f32 output written once; a multiply and an add
    /// per entry and column.
    pub(crate) fn coo_mm(len: u64, n_rows: u64, b_cols: u64, b_bytes: u64) -> (u64, u64) {
        (4 * (n_rows + 1) + 8 * len + len * b_cols * b_bytes + 4 * n_rows * b_cols, 2 * len * b_cols)
    }

    /// Today's `coo_dense_t` (see its descriptor): per entry its fields and slot, per entry and
    /// row of `b` a read of `b` and an atomic read-modify-write of the output.
    pub(crate) fn coo_dense_t(len: u64, b_rows: u64) -> (u64, u64) {
        (16 * len + 12 * len * b_rows, 2 * len * b_rows)
    }
}

fn memory(model: &DeviceModel, bytes: f64) -> f64 {
    bytes / model.hbm_bytes_per_s
}

fn kernel(model: &DeviceModel, (bytes, flops): (u64, u64)) -> f64 {
    (bytes as f64 / model.hbm_bytes_per_s).max(flops as f64 / model.fp32_flops)
}

/// An `(m, n)` product over `k` in `mode` with an f32 output, priced as the ledger's event.
fn gemm(model: &DeviceModel, m: u64, n: u64, k: u64, mode: GemmMode, accumulate: bool) -> f64 {
    let kind = EventKind::Gemm {
        routine: crate::perf::BlasRoutine::Gemm,
        m,
        n,
        k,
        batch: 1,
        operands: mode.operands,
        output: ElemType::F32,
        compute: mode.compute,
        accumulate,
    };
    model.device_seconds(&Event { kind, tag: Tag::default(), gpu_ms: None, captured: false })
}

/// Predicted seconds of each formulation's extra work per step on a GPU, `(transformed,
/// merged)`, at `tokens` tokens, Exact selection.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FormulationPrice {
    pub transformed: f64,
    pub merged: f64,
    /// The update the merged form would take ([`MergedUpdate::choose`]).
    pub update: MergedUpdate,
}

impl Formulation {
    /// The extra work of each formulation over a dense layer of the same precision, priced
    /// on `model` in `mode` (see the module docs):
    /// - transformed: `x Q`, `h P^T`, `g P` and `(gt Wt) Q^T` (`4 T (out^2 + in^2)` flops),
    ///   and in bf16 the casts of the four `(T, out)` / `(T, in)` intermediates;
    /// - merged: `dWt` from `dW = g^T x` as `(P^T dW) Q` (in bf16 with `dW` and `P^T dW`
    ///   cast to bf16), or as `(g P)^T (x Q)` when that has fewer flops
    ///   ([`Formulation::merged_token_order`]), plus the update [`MergedUpdate::choose`] takes.
    pub fn price(
        out: usize,
        inp: usize,
        tokens: usize,
        k: usize,
        precision: Precision,
        mode: GemmMode,
        model: &DeviceModel,
    ) -> FormulationPrice {
        let (o, i, t) = (out as u64, inp as u64, tokens as u64);
        let cast = |n: u64| if mode.is_bf16() { memory(model, 6.0 * n as f64) } else { 0.0 };
        let transformed = 2.0 * gemm(model, t, i, i, mode, false)
            + 2.0 * gemm(model, t, o, o, mode, false)
            + 2.0 * cast(t * i)
            + 2.0 * cast(t * o);
        let rotate = if Formulation::merged_token_order(out, inp, tokens) {
            gemm(model, t, o, o, mode, false) + gemm(model, t, i, i, mode, false) + cast(t * o) + cast(t * i)
        } else {
            gemm(model, o, i, o, mode, false) + gemm(model, o, i, i, mode, false) + 2.0 * cast(o * i)
        };
        let update = MergedUpdate::choose(out, inp, k, precision, Some((model, mode)));
        FormulationPrice { transformed, merged: rotate + update.price(out, inp, k, mode, model), update }
    }

    /// The formulation a GPU layer takes: the cheaper of [`Formulation::price`]'s two. It can
    /// differ from [`Formulation::choose`] (the CPU's flop count) and between precisions:
    /// the transformed form's extra GEMMs are `T`-sized and bind on the bandwidth at small
    /// `T` in bf16, while the merged form's are weight-sized.
    pub fn choose_priced(
        out: usize,
        inp: usize,
        tokens: usize,
        k: usize,
        precision: Precision,
        mode: GemmMode,
        model: &DeviceModel,
    ) -> Formulation {
        let p = Self::price(out, inp, tokens, k, precision, mode, model);
        if p.merged < p.transformed {
            Formulation::Merged
        } else {
            Formulation::Transformed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perf::roofline::{H100_SXM, H200};

    /// The literal alternative (b) of issue 18 for the by-columns order, priced but not
    /// built: sort `D` stably by column (assumed 4 radix passes, each reading and writing the
    /// 12-byte entries), then `(P D)[:, c]` as the run of column `c` summed in registers
    /// against rows of `P^T` (one `out`-long row gathered per entry), `P D` written once, and
    /// the GEMM `W += (P D) Q^T`.
    fn sorted_columns_price(out: usize, inp: usize, k: usize, mode: GemmMode, model: &DeviceModel) -> f64 {
        let (o, i, kf) = (out as u64, inp as u64, k as u64);
        let sort = memory(model, 4.0 * 24.0 * kf as f64);
        let runs = kernel(model, update_kernel_work::coo_mm(kf, i, o, mode.operands.bytes()));
        let cast = if mode.is_bf16() { memory(model, 6.0 * (o * i) as f64) } else { 0.0 };
        sort + runs + cast + gemm(model, o, i, i, mode, true)
    }

    const MODES: [(&str, Precision, bool); 3] =
        [("f32", Precision::Full, false), ("tf32", Precision::Full, true), ("bf16", Precision::Bf16, false)];
    /// BERT-base's and LLaMA-2-7B's MLP projections, `(out, in)`.
    const SHAPES: [(&str, usize, usize); 4] = [
        ("BERT-base up 3072x768", 3072, 768),
        ("BERT-base down 768x3072", 768, 3072),
        ("LLaMA-2-7B gate/up 11008x4096", 11008, 4096),
        ("LLaMA-2-7B down 4096x11008", 4096, 11008),
    ];

    /// Issue 18, item 5: the prices of the merged update's candidates at BERT-base and
    /// LLaMA-2-7B with the paper's 1% of entries kept (`cargo test --lib merged_update_prices
    /// -- --nocapture` prints the table). On the H100 SXM and the H200: with bf16 operands or
    /// TF32, (a) Dense is the cheapest (1.3 to 2.4 times below (b) by rows, and below (b) by
    /// columns); in exact f32, (b) by rows (Runs) is cheaper than (a) (FP32 cores make the
    /// second GEMM of (a) cost more than gathering `k` rows of `Q^T`). Every candidate is far
    /// below today's scattered atomics.
    #[test]
    fn merged_update_prices_at_bert_and_llama() {
        for model in [H100_SXM, H200] {
            println!("merged update W += P D Q^T, 1% kept, predicted on the {} (us):", model.name);
            println!(
                "{:<32} {:>5} {:>11} {:>11} {:>11} {:>13} {:>13}  chosen",
                "shape", "mode", "(a) Dense", "(b) rows", "(b) cols", "atomics cols", "atomics rows"
            );
            for (name, out, inp) in SHAPES {
                let k = (0.01 * (out * inp) as f64).round() as usize;
                for (mode_name, precision, tf32) in MODES {
                    let mode = GemmMode::of(precision, tf32);
                    let us = |u: MergedUpdate| 1e6 * u.price(out, inp, k, mode, &model);
                    let (dense, runs) = (us(MergedUpdate::Dense), us(MergedUpdate::Runs));
                    let cols = 1e6 * sorted_columns_price(out, inp, k, mode, &model);
                    let (atomic_c, atomic_r) = (us(MergedUpdate::SparseColumns), us(MergedUpdate::SparseRows));
                    let chosen = MergedUpdate::choose(out, inp, k, precision, Some((&model, mode)));
                    println!(
                        "{name:<32} {mode_name:>5} {dense:>11.1} {runs:>11.1} {cols:>11.1} {atomic_c:>13.1} {atomic_r:>13.1}  {chosen:?}"
                    );
                    if precision == Precision::Full && !tf32 {
                        assert!(runs < dense, "{name} f32: (b) {runs} vs (a) {dense}");
                        assert_eq!(chosen, MergedUpdate::Runs, "{name} f32");
                    } else {
                        assert!(dense < runs.min(cols), "{name} {mode_name}: (a) {dense} vs (b) {runs}, {cols}");
                        assert_eq!(chosen, MergedUpdate::Dense, "{name} {mode_name}");
                    }
                    assert!(dense.min(runs) < atomic_c.min(atomic_r), "{name} {mode_name}");
                }
            }
        }
        // The CPU keeps its tuned sparse orders.
        assert_eq!(MergedUpdate::choose(3072, 768, 23_593, Precision::Full, None), MergedUpdate::SparseColumns);
        assert_eq!(MergedUpdate::choose(768, 3072, 23_593, Precision::Full, None), MergedUpdate::SparseRows);
        assert_eq!(MergedUpdate::choose(768, 3072, 23_593, Precision::Bf16, None), MergedUpdate::Dense);
    }

    #[test]
    fn update_prices_by_hand() {
        // A 1000 x 1000 update at 1% (k = 10^4) on a device of round numbers: 1 TB/s, FP32
        // 1e12 flop/s, bf16 8e12, TF32 4e12.
        let m = DeviceModel {
            hbm_bytes_per_s: 1e12,
            fp32_flops: 1e12,
            bf16_tensor_flops: 8e12,
            tf32_tensor_flops: 4e12,
            ..H100_SXM
        };
        let (n, k) = (1000usize, 10_000usize);
        let f32 = GemmMode::of(Precision::Full, false);
        // (a): memset 4e6 B (4 us), scatter 24e4 B (0.24 us), two 2e9-flop GEMMs at FP32 (2 ms
        // each; their 12e6 / 16e6 bytes take 12 / 16 us, below that).
        let dense = MergedUpdate::Dense.price(n, n, k, f32, &m);
        assert!((dense - (4e-6 + 0.24e-6 + 4e-3)).abs() < 1e-12, "{dense}");
        // (b): row starts 4 * 1001 * 15 + 8e4 B, coo_mm 4004 + 8e4 + 4e7 + 4e6 B (2e7 flops:
        // 20 us, below 44 us of bytes), one GEMM (2 ms).
        let runs = MergedUpdate::Runs.price(n, n, k, f32, &m);
        let expect = (4.0 * 1001.0 * 15.0 + 8e4) / 1e12 + (4004.0 + 8e4 + 4e7 + 4e6) / 1e12 + 2e-3;
        assert!((runs - expect).abs() < 1e-12, "{runs} vs {expect}");
        // bf16: the GEMMs at 8e12 (0.25 ms each), D in bf16 (2e6 B memset, 22e4 B scatter),
        // E cast to bf16 (6e6 B).
        let bf16 = MergedUpdate::Dense.price(n, n, k, GemmMode::of(Precision::Bf16, false), &m);
        assert!((bf16 - (2e-6 + 0.22e-6 + 6e-6 + 0.5e-3)).abs() < 1e-12, "{bf16}");
    }

    /// The formulation follows the precision on a GPU: at BERT-base's up projection with 1%
    /// kept, exact f32 prices the merged form lower from a few hundred tokens on, bf16 only
    /// from many more (its GEMMs are 15 times cheaper, its `(out, in)` casts and memsets are
    /// not); between the two thresholds the two precisions choose differently.
    #[test]
    fn formulation_choice_follows_the_precision() {
        let (out, inp, k) = (3072, 768, 23_593);
        let pick = |tokens: usize, precision: Precision| {
            Formulation::choose_priced(out, inp, tokens, k, precision, GemmMode::of(precision, false), &H100_SXM)
        };
        let first_merged = |precision: Precision| (1..=1 << 16).find(|&t| pick(t, precision) == Formulation::Merged);
        let (f32_from, bf16_from) = (first_merged(Precision::Full), first_merged(Precision::Bf16));
        println!("BERT up, merged from: f32 {f32_from:?} tokens, bf16 {bf16_from:?} tokens (H100 SXM)");
        let (f32_from, bf16_from) = (f32_from.unwrap(), bf16_from.unwrap());
        assert!(f32_from < bf16_from, "f32 from {f32_from}, bf16 from {bf16_from}");
        assert_eq!(pick(f32_from, Precision::Full), Formulation::Merged);
        assert_eq!(pick(f32_from, Precision::Bf16), Formulation::Transformed);
        // Monotone: once merged, merged for every longer batch (checked on a grid).
        for t in (f32_from..1 << 16).step_by(97) {
            assert_eq!(pick(t, Precision::Full), Formulation::Merged, "f32 at {t}");
        }
        // The CPU's flop model is unchanged by any of this.
        assert_eq!(Formulation::choose(out, inp, 4096, k), Formulation::Merged);
    }
}
