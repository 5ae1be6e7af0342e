//! The device bytes of one MLP projection of a [`crate::model::llama::LlamaModel`] on the
//! CUDA backend, per [`crate::linear::trainable::Method`]: what `DenseLinear`, `LoraLinear`
//! and `SparseGradLinear` allocate at construction (weights, optimizer state, the top-k
//! workspace, COO lists) and in their first forward of `tokens` rows (saved inputs, bf16
//! staging buffers, SparseGrad's token-sized scratch). Each line names the field it sizes;
//! `tests/cuda_memory_plan.rs` holds the sum to the emulated device's peak.

use super::{Category, Ledger, BF16, MASTER, U32, U64};
use crate::backend::Precision;
use crate::error::Result;
use crate::linear::sparsegrad::{Formulation, GemmMode, MergedUpdate, ScratchLengths, Selection};
use crate::linear::trainable::{Method, TrainOptions};
use crate::optim::Optimizer;
use crate::perf::roofline::DeviceModel;

/// One projection to size: its method, shape `(out, in)`, the tokens of a step, and where
/// its bytes are booked (`label` prefixes every line, e.g. `up`).
pub(super) struct Projection<'a> {
    pub method: Method,
    pub out: usize,
    pub inp: usize,
    pub tokens: usize,
    pub label: &'a str,
}

/// What SparseGrad's layer decides at construction, as `SparseGradLinear::new` decides it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct SparseGradChoice {
    pub k: usize,
    pub formulation: Formulation,
    pub update: Option<MergedUpdate>,
}

/// The formulation and merged update a SparseGrad layer of this shape takes on a device
/// priced by `model` (the same calls `SparseGradLinear::new` makes).
pub(super) fn sparsegrad_choice(
    method: &Method,
    out: usize,
    inp: usize,
    opts: &TrainOptions,
    model: &DeviceModel,
    tf32: bool,
) -> Result<Option<SparseGradChoice>> {
    let Method::SparseGrad { keep, selection, formulation } = *method else { return Ok(None) };
    let k = keep.resolve(super::checked(&[out, inp])?)?;
    let thresholded = matches!(selection, Selection::SparseByDense { threshold } if threshold > 0.0);
    let mode = GemmMode::of(opts.precision, tf32);
    let formulation = match formulation {
        Some(f) => f,
        None if thresholded => Formulation::Transformed,
        None => Formulation::choose_priced(out, inp, opts.expected_tokens, k, opts.precision, mode, model),
    };
    let update = match formulation {
        Formulation::Transformed => None,
        Formulation::Merged => Some(MergedUpdate::choose(out, inp, k, opts.precision, Some((model, mode)))),
    };
    Ok(Some(SparseGradChoice { k, formulation, update }))
}

/// Adam's two moments and its device clock (`Moments::for_optimizer`); nothing for SGD.
fn moments(l: &mut Ledger, opt: &Optimizer, what: &str, len: usize) -> Result<()> {
    if let Optimizer::Adam(_) = opt {
        l.add(Category::OptimizerState, what, &[2, len], MASTER)?;
        l.add(Category::OptimizerState, what, &[crate::backend::CLOCK_LEN], U64)?;
    }
    Ok(())
}

/// A COO list of capacity `k` (`Coo::with_capacity`): u32 rows and columns, `F` values.
fn coo(l: &mut Ledger, cat: Category, what: &str, k: usize) -> Result<()> {
    l.add(cat, what, &[2, k], U32)?;
    l.add(cat, what, &[k], MASTER)
}

/// A buffer in the operand precision (`Operand::alloc`).
fn operand(l: &mut Ledger, cat: Category, what: &str, p: Precision, dims: &[usize]) -> Result<()> {
    l.add(cat, what, dims, if p == Precision::Bf16 { BF16 } else { MASTER })
}

/// Books the bytes of one projection into `l`.
pub(super) fn projection(
    l: &mut Ledger,
    p: &Projection<'_>,
    opts: &TrainOptions,
    choice: Option<SparseGradChoice>,
) -> Result<()> {
    let Projection { method, out, inp, tokens: t, label } = *p;
    // Set again where the buffers made on the first forward start.
    l.tokens_phase = false;
    let half = opts.precision == Precision::Bf16;
    let opt = &opts.optimizer;
    let name = |s: &str| format!("{label} {s}");
    match (method, choice) {
        (Method::SparseGrad { .. }, Some(c)) => {
            // SparseGradLinear::new: the trained weight (Wt or W) and its bf16 compute copy.
            l.add(Category::TrainedWeights, &name("trained weight"), &[out, inp], MASTER)?;
            if half {
                l.add(Category::TrainedWeights, &name("bf16 compute copy"), &[out, inp], BF16)?;
            }
            moments(l, opt, &name("SparseAdam moments"), checked_len(out, inp)?)?;
            coo(l, Category::LayerWorkspace, &name("gradient COO"), c.k)?;
            if let Optimizer::Sgd { .. } = opt {
                l.add(Category::OptimizerState, &name("SGD mask"), &[out, inp], MASTER)?;
                coo(l, Category::OptimizerState, &name("SGD mask"), c.k)?;
            }
            if c.formulation == Formulation::Transformed {
                // Wt = (P^T W) Q: the uploaded W and the product's scratch, freed after
                // construction; a bf16 basis is uploaded again in f32 for it.
                l.transient(&[2, out, inp], MASTER)?;
                if half {
                    l.transient_add(&[out, out], MASTER)?;
                    l.transient_add(&[inp, inp], MASTER)?;
                }
            }
            sparsegrad_workspace(l, label, c, (out, inp, t), opts.precision)
        }
        (Method::SparseGrad { .. }, None) => {
            Err(crate::Error::invalid("memory plan", format!("{label}: SparseGrad without its choice")))
        }
        (Method::Lora { rank: r, .. }, _) => {
            if r == 0 || r > out.min(inp) {
                return Err(crate::Error::invalid(
                    "memory plan",
                    format!("{label}: LoRA rank {r} outside 1..={}", out.min(inp)),
                ));
            }
            l.add(Category::FrozenWeights, &name("weight"), &[out, inp], MASTER)?;
            if half {
                l.add(Category::FrozenWeights, &name("weight, bf16 copy"), &[out, inp], BF16)?;
            }
            for (f, len) in [("A", checked_len(r, inp)?), ("B", checked_len(out, r)?)] {
                let what = name(&format!("LoRA {f}"));
                l.add(Category::TrainedWeights, &what, &[len], MASTER)?;
                if half {
                    l.add(Category::TrainedWeights, &what, &[len], BF16)?;
                }
                l.add(Category::LayerWorkspace, &name("LoRA factor gradients"), &[len], MASTER)?;
                moments(l, opt, &name("LoRA moments"), len)?;
            }
            // LoraWorkspace: saved x, u = x A^T and v = g B (operands only), the bf16
            // gradient staging.
            l.tokens_phase = true;
            operand(l, Category::SavedActivations, &name("saved input"), opts.precision, &[t, inp])?;
            operand(l, Category::SavedActivations, &name("LoRA u"), opts.precision, &[t, r])?;
            operand(l, Category::LayerWorkspace, &name("LoRA v"), opts.precision, &[t, r])?;
            if half {
                l.add(Category::LayerWorkspace, &name("bf16 gradient staging"), &[t, out], BF16)?;
            }
            Ok(())
        }
        (Method::Frozen | Method::Collect | Method::Full | Method::MeProp { .. }, _) => {
            let trains = !matches!(method, Method::Frozen | Method::Collect);
            let grads = method != Method::Frozen;
            let w_cat = if trains { Category::TrainedWeights } else { Category::FrozenWeights };
            // DenseLinear::new: W in F and its bf16 compute copy; a bf16 layer that never
            // changes W holds the bf16 copy alone.
            if trains {
                l.add(w_cat, &name("trained weight"), &[out, inp], MASTER)?;
                if half {
                    l.add(w_cat, &name("bf16 compute copy"), &[out, inp], BF16)?;
                }
            } else {
                l.add(w_cat, &name("weight"), &[out, inp], if half { BF16 } else { MASTER })?;
            }
            if grads {
                l.add(Category::LayerWorkspace, &name("dense weight gradient"), &[out, inp], MASTER)?;
            }
            if let Method::MeProp { keep } = method {
                let k = keep.resolve(checked_len(out, inp)?)?;
                coo(l, Category::LayerWorkspace, &name("MeProp COO"), k)?;
                let words = crate::backend::cuda::topk_workspace_words(checked_len(out, inp)?);
                l.add(Category::LayerWorkspace, &name("top-k workspace"), &[words], U64)?;
                if let Optimizer::Sgd { .. } = opt {
                    l.add(Category::OptimizerState, &name("SGD mask"), &[out, inp], MASTER)?;
                    coo(l, Category::OptimizerState, &name("SGD mask"), k)?;
                }
            }
            if trains {
                moments(l, opt, &name("Adam moments"), checked_len(out, inp)?)?;
            }
            // ensure_tokens: x saved when a weight gradient is computed. The bf16 stagings of
            // x and g are the model's shared pair (booked with the model's scratch).
            l.tokens_phase = true;
            if grads {
                operand(l, Category::SavedActivations, &name("saved input"), opts.precision, &[t, inp])?;
            }
            Ok(())
        }
    }
}

fn checked_len(a: usize, b: usize) -> Result<usize> {
    super::checked(&[a, b])
}

/// `sparsegrad::workspace::Workspace`: the layer's own buffers (`new`, `ensure_tokens`).
/// The scratch it borrows is the model's one shared set, booked by the caller from
/// [`scratch_lengths`].
fn sparsegrad_workspace(
    l: &mut Ledger,
    label: &str,
    c: SparseGradChoice,
    (out, inp, t): (usize, usize, usize),
    p: Precision,
) -> Result<()> {
    let name = |s: &str| format!("{label} {s}");
    let ws = Category::LayerWorkspace;
    l.add(ws, &name("column index"), &[out], U32)?;
    let words = crate::backend::cuda::topk_workspace_words(checked_len(out, inp)?);
    l.add(ws, &name("top-k workspace"), &[words], U64)?;
    match c.update {
        Some(MergedUpdate::Dense) => l.add(ws, &name("update delta"), &[c.k], MASTER)?,
        Some(MergedUpdate::Runs) => {
            l.add(ws, &name("update delta"), &[c.k], MASTER)?;
            l.add(ws, &name("row starts"), &[super::checked_sum(out, 1)?], U32)?;
        }
        Some(MergedUpdate::SparseRows) => {
            coo(l, ws, &name("update COO"), c.k)?;
            l.add(ws, &name("update rows"), &[c.k.min(out)], U32)?;
            l.add(ws, &name("update slots"), &[c.k], U32)?;
        }
        Some(MergedUpdate::SparseColumns) => coo(l, ws, &name("update COO"), c.k)?,
        None => {}
    }
    l.tokens_phase = true;
    operand(l, Category::SavedActivations, &name("saved input"), p, &[t, inp])
}

/// What a SparseGrad projection borrows of the shared scratch in a step on `tokens` rows
/// (the lengths its layer grows the scratch to).
pub(super) fn scratch_lengths(
    method: &Method,
    choice: SparseGradChoice,
    (out, inp, tokens): (usize, usize, usize),
    precision: Precision,
) -> Result<ScratchLengths> {
    let Method::SparseGrad { selection, .. } = *method else {
        return Err(crate::Error::invalid("memory plan", "scratch lengths of a projection that is not SparseGrad"));
    };
    ScratchLengths::of(choice.formulation, choice.update, selection, precision, out, inp, choice.k, tokens)
}

/// Books the shared SparseGrad scratch holding `n` (first forward: token-sized).
pub(super) fn shared_scratch(l: &mut Ledger, n: &ScratchLengths, p: Precision) -> Result<()> {
    let sw = Category::SharedWorkspace;
    let op = if p == Precision::Bf16 { BF16 } else { MASTER };
    let products = "SparseGrad scratch: (out, in) products";
    l.add(sw, products, &[n.big_a + n.big_b + n.et + n.pt_rows], MASTER)?;
    l.add(sw, products, &[n.big_half + n.big_half_b], BF16)?;
    let rows = "SparseGrad scratch: token rows";
    l.add(sw, rows, &[n.tmp_in + n.tmp_out + n.block], MASTER)?;
    l.add(sw, rows, &[n.in_half + n.g_half + n.out_half], BF16)?;
    l.add(sw, rows, &[n.row_idx], U32)?;
    l.add(sw, rows, &[n.block_op + n.rows_op], op)
}
