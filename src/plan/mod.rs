//! The memory plan: the device bytes a LLaMA fine-tune on the CUDA backend will hold, by
//! category, computed from the model's configuration, the training plan, the batch shape
//! and the precision before anything is allocated.
//!
//! Every line sizes a buffer the code allocates, by the same rule (the top-k workspace and
//! the scratch arena by the very functions the CUDA backend allocates them with; SparseGrad's
//! formulation and merged update by the same pricing calls its layer makes). The plan is of
//! the training model ([`crate::model::llama::LlamaModel::new`] then
//! [`crate::model::llama::LlamaModel::train_step`] at one batch shape): its peak is
//!
//! `persistent + max(token-sized + step scratch, largest construction transient)`,
//!
//! where persistent holds the weights, optimizer state and bases, token-sized the buffers
//! grown on the first forward (saved activations, workspaces, logits), and the construction
//! transients the scratch a SparseGrad layer frees after building `Wt`. The CUDA backend's
//! own buffers (made by `Cuda::new`, before any model) and cuBLAS's workspace are not
//! counted. `tests/cuda_memory_plan.rs` holds the plan to the emulated device's measured
//! peak within 2%; `llama_mlp_finetune --plan` prints it; [`MemoryPlan::check_fits`] stops
//! a run that would not fit before it loads.

mod linear;

use crate::backend::Precision;
use crate::error::{human_bytes, Error, Result};
use crate::linear::trainable::{Method, TrainOptions};
use crate::model::config::LlamaConfig;
use crate::model::llama::{MlpPlan, GROUPS};
use crate::perf::roofline::DeviceModel;

/// Bytes of the master precision `F` (f32: the CUDA backend trains in f32 masters).
const MASTER: usize = 4;
const BF16: usize = 2;
const U32: usize = 4;
const U64: usize = 8;

/// What a line of the plan holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Category {
    /// Weights that never change: attention, norms, embedding, frozen MLP projections.
    FrozenWeights,
    /// Trained MLP weights (master and bf16 compute copy) and LoRA factors.
    TrainedWeights,
    /// Adam's moments and clocks (SGD's masks).
    OptimizerState,
    /// SparseGrad's `P` and `Q`, one copy per group.
    Bases,
    /// Activations kept from the forward for the backward.
    SavedActivations,
    /// Per-layer scratch: MLP intermediates, gradients, bf16 stagings, top-k and COO buffers.
    LayerWorkspace,
    /// Scratch shared by all layers: the residual stream, backward scratch, the arena.
    SharedWorkspace,
    /// The LM head's weight and the logits (with their gradient in place).
    LogitsAndHead,
}

impl Category {
    pub const ALL: [Category; 8] = [
        Category::FrozenWeights,
        Category::TrainedWeights,
        Category::OptimizerState,
        Category::Bases,
        Category::SavedActivations,
        Category::LayerWorkspace,
        Category::SharedWorkspace,
        Category::LogitsAndHead,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Category::FrozenWeights => "frozen weights",
            Category::TrainedWeights => "trained weights",
            Category::OptimizerState => "optimizer state",
            Category::Bases => "bases",
            Category::SavedActivations => "activations saved for backward",
            Category::LayerWorkspace => "per-layer workspaces",
            Category::SharedWorkspace => "shared workspaces",
            Category::LogitsAndHead => "logits and head",
        }
    }
}

/// One line of the plan: a kind of buffer summed over the layers that hold it.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanItem {
    pub category: Category,
    pub what: String,
    pub bytes: u128,
}

/// The device bytes of a training run; see the module docs.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    /// Every line, in the order first booked.
    pub items: Vec<PlanItem>,
    /// Scratch freed again while the model is built (the largest of one layer), counted in
    /// [`Self::total`] only where it exceeds the token-sized part.
    pub construction_transient: u128,
}

/// `a * b * ...` without wrapping.
fn checked(dims: &[usize]) -> Result<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(|| {
        Error::invalid("memory plan", format!("the buffer size {dims:?} overflows (the configuration is too large)"))
    })
}

fn checked_sum(a: usize, b: usize) -> Result<usize> {
    a.checked_add(b).ok_or_else(|| Error::invalid("memory plan", format!("{a} + {b} overflows")))
}

/// Lines being booked.
#[derive(Default)]
struct Ledger {
    items: Vec<PlanItem>,
    /// Token-sized lines (grown on the first forward), by their index in `items`.
    token_sized: Vec<bool>,
    /// True while booking buffers that are made on the first forward.
    tokens_phase: bool,
    /// The transient of the layer being built, and the largest so far.
    transient_now: u128,
    transient_max: u128,
}

impl Ledger {
    fn add(&mut self, category: Category, what: &str, dims: &[usize], elem: usize) -> Result<()> {
        let bytes = checked(dims)? as u128 * elem as u128;
        if bytes == 0 {
            return Ok(());
        }
        let token = self.tokens_phase || is_token_sized(category);
        match self.items.iter().position(|i| i.category == category && i.what == what) {
            Some(i) => self.items[i].bytes += bytes,
            None => {
                self.items.push(PlanItem { category, what: what.to_string(), bytes });
                self.token_sized.push(token);
            }
        }
        Ok(())
    }
    /// Starts a layer's transient at `dims * elem` bytes.
    fn transient(&mut self, dims: &[usize], elem: usize) -> Result<()> {
        self.transient_now = checked(dims)? as u128 * elem as u128;
        self.transient_max = self.transient_max.max(self.transient_now);
        Ok(())
    }
    fn transient_add(&mut self, dims: &[usize], elem: usize) -> Result<()> {
        self.transient_now += checked(dims)? as u128 * elem as u128;
        self.transient_max = self.transient_max.max(self.transient_now);
        Ok(())
    }
}

/// Categories made on the first forward, whatever books them.
fn is_token_sized(c: Category) -> bool {
    matches!(c, Category::SavedActivations | Category::SharedWorkspace)
}

/// A training run to plan: the model, what trains, how, and the batch shape.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanSetup {
    pub config: LlamaConfig,
    pub plan: MlpPlan,
    /// Precision, optimizer and SparseGrad's expected token count, as the model gets them.
    pub options: TrainOptions,
    pub batch: usize,
    pub seq: usize,
    /// Positions the RoPE tables cover (`LlamaModel::new`'s `max_positions`).
    pub max_positions: usize,
    /// The device SparseGrad's layers price their formulation on.
    pub device: DeviceModel,
    /// f32 GEMMs on TF32 tensor cores (changes SparseGrad's pricing).
    pub tf32: bool,
}

impl MemoryPlan {
    /// The plan of `setup`; fails on sizes that overflow or a plan the model would reject.
    pub fn llama(setup: &PlanSetup) -> Result<MemoryPlan> {
        let c = &setup.config;
        let (plan, opts) = (&setup.plan, &setup.options);
        if let Some(&l) = plan.layers.iter().find(|&&l| l >= c.layers) {
            return Err(Error::invalid(
                "memory plan",
                format!("layer {l} does not exist (the model has {})", c.layers),
            ));
        }
        if setup.batch == 0 || setup.seq == 0 {
            return Err(Error::invalid("memory plan", "batch and sequence length must be positive"));
        }
        if setup.seq > setup.max_positions.max(1) {
            return Err(Error::invalid(
                "memory plan",
                format!("sequence length {} exceeds the {} positions planned", setup.seq, setup.max_positions),
            ));
        }
        let t = checked(&[setup.batch, setup.seq])?;
        let (h, f, q, kv, v) = (c.hidden, c.ffn, c.q_dim(), c.kv_dim(), c.vocab);
        let half = opts.precision == Precision::Bf16;
        let operand = if half { BF16 } else { MASTER };
        let mut l = Ledger::default();
        let lowest = plan.layers.iter().min().copied();
        // What each projection kind of a trained layer decides (shared by its layers).
        let shapes = [(f, h), (f, h), (h, f)];
        let mut choices = [None; 3];
        for j in 0..3 {
            let (out, inp) = shapes[j];
            choices[j] = linear::sparsegrad_choice(&plan.methods[j], out, inp, opts, &setup.device, setup.tf32)?;
        }
        // The SparseGrad scratch every trained projection borrows, sized for the largest.
        let mut scratch = None;
        // LlamaModel::new: per layer the norms, q, k, v, o (operands), the MLP.
        for i in 0..c.layers {
            let trains = plan.layers.contains(&i);
            l.add(Category::FrozenWeights, "attention and norms", &[2, h], MASTER)?;
            l.add(
                Category::FrozenWeights,
                "attention and norms",
                &[checked_sum(checked_sum(q, kv)?, kv)?, h],
                operand,
            )?;
            l.add(Category::FrozenWeights, "attention and norms", &[h, q], operand)?;
            for j in 0..3 {
                let method = if trains { plan.methods[j] } else { Method::Frozen };
                let (out, inp) = shapes[j];
                let label = if trains { GROUPS[j].to_string() } else { "frozen MLP".to_string() };
                let p = linear::Projection { method, out, inp, tokens: t, label: &label };
                l.transient_now = 0;
                linear::projection(&mut l, &p, opts, if trains { choices[j] } else { None })?;
                if let (true, Some(ch)) = (trains, choices[j]) {
                    let n = linear::scratch_lengths(&method, ch, (out, inp, t), opts.precision)?;
                    scratch = Some(scratch.map_or(n, |s: crate::linear::sparsegrad::ScratchLengths| s.max(n)));
                }
            }
        }
        // One device basis per SparseGrad group (shared by its layers).
        if !plan.layers.is_empty() {
            for (j, choice) in choices.iter().enumerate() {
                let Some(ch) = choice else { continue };
                let (out, inp) = shapes[j];
                let elem = match ch.update {
                    Some(crate::linear::sparsegrad::MergedUpdate::Dense) | None => operand,
                    _ => MASTER,
                };
                l.add(Category::Bases, &format!("{} P and Q", GROUPS[j]), &[out, out], elem)?;
                l.add(Category::Bases, &format!("{} P and Q", GROUPS[j]), &[inp, inp], elem)?;
            }
        }
        l.add(Category::FrozenWeights, "embedding", &[v, h], MASTER)?;
        l.add(Category::LogitsAndHead, "LM head weight", &[v, h], operand)?;
        l.add(Category::FrozenWeights, "attention and norms", &[h], MASTER)?;
        let half_dim = c.head_dim / 2;
        l.add(Category::FrozenWeights, "RoPE tables", &[2, setup.max_positions.max(1), half_dim], MASTER)?;
        // The first forward (LlamaModel::ensure, LlamaMlp::forward_shared): the layers above
        // the lowest trained block keep their own saved set, the others share one (without
        // the residual copies); the MLPs from the lowest trained block up keep `a` and `b`
        // (in the operand precision).
        l.tokens_phase = true;
        let sa = Category::SavedActivations;
        let qkv = checked_sum(checked_sum(q, kv)?, kv)?;
        let keeping = lowest.map_or(0, |lo| c.layers - 1 - lo);
        let mlp_saving = lowest.map_or(0, |lo| c.layers - lo);
        // A kept set (`residual`) of a bf16 model holds q, k, v and the attention output in
        // bf16; the shared set holds them in `F`.
        let saved_set = |l: &mut Ledger, cat: Category, residual: bool| -> Result<()> {
            let elem = if residual { operand } else { MASTER };
            if residual {
                l.add(cat, "residual stream (x_in, x_mid)", &[2, t, h], MASTER)?;
            }
            l.add(cat, "rms statistics", &[2, t], MASTER)?;
            l.add(cat, "q, k, v", &[t, qkv], elem)?;
            l.add(cat, "attention output and statistics", &[t, q], elem)?;
            l.add(cat, "attention output and statistics", &[2, t, c.heads], MASTER)
        };
        for _ in 0..keeping {
            saved_set(&mut l, sa, true)?;
        }
        for _ in 0..mlp_saving {
            l.add(sa, "MLP gate and up outputs", &[2, t, f], operand)?;
        }
        if keeping < c.layers || (half && keeping > 0) {
            saved_set(&mut l, Category::SharedWorkspace, false)?;
        }
        if mlp_saving < c.layers || half {
            // `a` and `b` of the blocks that save none, and in bf16 where every block
            // computes them before saving them rounded.
            l.add(Category::SharedWorkspace, "MLP scratch", &[2, t, f], MASTER)?;
        }
        l.add(Category::SharedWorkspace, "MLP scratch", &[4, t, f], MASTER)?;
        l.add(Category::SharedWorkspace, "MLP scratch", &[t, h], MASTER)?;
        if half {
            // The dense projections' bf16 stagings of x and g (Bf16Staging), shared.
            l.add(Category::SharedWorkspace, "MLP scratch", &[2, t, f.max(h)], BF16)?;
        }
        // On the GPU a block's SparseGrad projections select in one batch: all but the last
        // leave `dWt` in a selection buffer (LlamaMlpScratch::ensure_selections).
        let sparsegrad_projections = choices.iter().filter(|ch| ch.is_some()).count();
        if !plan.layers.is_empty() && sparsegrad_projections >= 2 {
            l.add(Category::SharedWorkspace, "MLP selection buffers", &[sparsegrad_projections - 1, f, h], MASTER)?;
        }
        if let Some(n) = &scratch {
            linear::shared_scratch(&mut l, n, opts.precision)?;
        }
        // The shared scratch (LlamaModel::ensure).
        let sw = Category::SharedWorkspace;
        l.add(sw, "token ids, targets", &[2, t], U32)?;
        l.add(sw, "mask, losses, final rms", &[3, t], MASTER)?;
        l.add(sw, "residual and backward scratch", &[5, t, h], MASTER)?;
        l.add(sw, "residual and backward scratch", &[2, t, q], MASTER)?;
        l.add(sw, "residual and backward scratch", &[2, t, kv], MASTER)?;
        l.add(Category::LogitsAndHead, "logits", &[t, v], MASTER)?;
        if half {
            l.add(sw, "bf16 stagings", &[2, t, h.max(q)], BF16)?;
            l.add(sw, "bf16 stagings", &[t, v.max(q).max(kv).max(h)], BF16)?;
        }
        // The attention backward's arena, when the backward crosses an attention layer.
        if let Some(lowest) = lowest {
            if lowest + 1 < c.layers {
                let rows = checked(&[setup.batch, c.heads, setup.seq])?;
                let words =
                    crate::backend::cuda::arena_words(crate::backend::cuda::attention_backward_arena_words(rows));
                l.add(sw, "scratch arena", &[words], U64)?;
            }
        }
        // Zero-byte lines (a plan with no such buffer) are left out.
        let mut items = Vec::with_capacity(l.items.len());
        for (item, token) in l.items.into_iter().zip(l.token_sized) {
            if item.bytes > 0 {
                items.push((item, token));
            }
        }
        let token_bytes: u128 = items.iter().filter(|(_, t)| *t).map(|(i, _)| i.bytes).sum();
        let construction_transient = l.transient_max.saturating_sub(token_bytes);
        Ok(MemoryPlan { items: items.into_iter().map(|(i, _)| i).collect(), construction_transient })
    }

    /// The peak: every line plus the construction transient beyond the token-sized part.
    pub fn total(&self) -> u128 {
        self.items.iter().map(|i| i.bytes).sum::<u128>() + self.construction_transient
    }

    /// Bytes per category, in [`Category::ALL`] order.
    pub fn by_category(&self) -> Vec<(Category, u128)> {
        Category::ALL
            .iter()
            .map(|&c| (c, self.items.iter().filter(|i| i.category == c).map(|i| i.bytes).sum()))
            .collect()
    }

    /// The `n` largest lines, largest first.
    pub fn largest(&self, n: usize) -> Vec<&PlanItem> {
        let mut v: Vec<&PlanItem> = self.items.iter().collect();
        v.sort_by_key(|i| std::cmp::Reverse(i.bytes));
        v.truncate(n);
        v
    }

    /// Fails with [`Error::WouldNotFit`] when the plan's total exceeds `free_bytes`.
    pub fn check_fits(&self, free_bytes: u128) -> Result<()> {
        let total = self.total();
        if total <= free_bytes {
            return Ok(());
        }
        let largest = self.largest(3).into_iter().map(|i| format!("{} {}", i.what, human_bytes(i.bytes))).collect();
        Err(Error::WouldNotFit { total_bytes: total, free_bytes, largest })
    }

    /// One line per category and a `total` line, in GB (10^9 bytes).
    pub fn table(&self) -> String {
        let gb = |b: u128| b as f64 / 1e9;
        let mut s = String::new();
        for (c, b) in self.by_category() {
            s.push_str(&format!("  {:<32} {:>9.3} GB\n", c.label(), gb(b)));
        }
        if self.construction_transient > 0 {
            s.push_str(&format!(
                "  {:<32} {:>9.3} GB\n",
                "construction scratch (freed)",
                gb(self.construction_transient)
            ));
        }
        s.push_str(&format!("  {:<32} {:>9.3} GB\n", "total", gb(self.total())));
        s
    }
}

#[cfg(test)]
mod tests;
