//! The fine-tuning flow of the paper's LLaMA recipe, scaled: validation loss before;
//! for SparseGrad a preliminary phase that streams the selected blocks' MLP gradients into
//! one Gram accumulator per projection type (on the device for a device backend, see
//! [`GramSet`]) and computes the bases; training of the selected blocks' MLPs; validation
//! loss after. Any method, any backend.

use crate::backend::AdamParams;
use crate::backend::Backend;
use crate::backend::Precision;
use crate::basis::{mean_sparsity_report, BasisSet, GramSet};
use crate::error::{Error, Result};
use crate::linear::sparsegrad::{Formulation, FormulationChoice, Selection};
use crate::linear::trainable::{Method, TrainOptions};
use crate::linear::Keep;
use crate::model::config::LlamaConfig;
use crate::model::llama::{LlamaModel, LossSum, MlpPlan, GROUPS};
use crate::model::weights::LlamaSource;
use crate::model::TrainingSetup;
use crate::optim::Optimizer;
use crate::recipes::vader::{epoch, make_batch, Batch, BatchSpec};
use std::time::Instant;

/// The methods the paper compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MethodKind {
    SparseGrad,
    Lora,
    MeProp,
    Full,
}

impl MethodKind {
    pub const ALL: [MethodKind; 4] = [MethodKind::SparseGrad, MethodKind::Lora, MethodKind::MeProp, MethodKind::Full];
    pub fn name(&self) -> &'static str {
        match self {
            MethodKind::SparseGrad => "sparsegrad",
            MethodKind::Lora => "lora",
            MethodKind::MeProp => "meprop",
            MethodKind::Full => "full",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| Error::invalid("method", format!("`{s}` is not one of sparsegrad, lora, meprop, full")))
    }
}

/// Everything a run needs besides the model and the data. `Default` is the LLaMA example's
/// CPU setting except `blocks`, which depends on the model and must be set:
/// `FinetuneConfig { blocks: vec![23, 26, 29], ..Default::default() }`.
#[derive(Clone, Debug, PartialEq)]
pub struct FinetuneConfig {
    pub method: MethodKind,
    /// Layers whose MLP trains.
    pub blocks: Vec<usize>,
    /// Which projections of those layers train, in [`GROUPS`] order (`gate`, `up`,
    /// `down`); the others stay frozen. The paper trains `up` and `down`.
    pub projections: [bool; 3],
    pub steps: usize,
    pub batch: usize,
    pub seq_len: usize,
    /// Fraction of each projection's entries SparseGrad and MeProp keep per step.
    pub keep: f64,
    pub selection: Selection,
    /// How SparseGrad's layers pick their formulation (per projection type, for
    /// `batch * seq_len` tokens). SparseByDense with a threshold above 0 always runs the
    /// transformed formulation, whatever this says.
    pub formulation: FormulationChoice,
    /// LoRA rank; 0: the rank with as many trainable parameters as `keep`.
    pub lora_rank: usize,
    /// LoRA alpha; 0: twice the rank.
    pub lora_alpha: f32,
    pub lr: f32,
    pub seed: u64,
    pub precision: Precision,
    /// Batches of the preliminary phase (SparseGrad only).
    pub prelim_steps: usize,
    /// Validation batches evaluated before, during and after training.
    pub eval_batches: usize,
    /// Evaluate every this many steps (0: only before and after).
    pub eval_every: usize,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        FinetuneConfig {
            method: MethodKind::SparseGrad,
            blocks: Vec::new(),
            projections: [true; 3],
            steps: 100,
            batch: 8,
            seq_len: 32,
            keep: 0.01,
            selection: Selection::Exact,
            formulation: FormulationChoice::FlopModel,
            lora_rank: 0,
            lora_alpha: 0.0,
            lr: 3e-3,
            seed: 0,
            precision: Precision::Full,
            prelim_steps: 4,
            eval_batches: 4,
            eval_every: 20,
        }
    }
}

/// A LoRA rank whose trainable parameters `r (in + out)` come closest to `keep` of an
/// `(out, in)` projection's entries (at least 1): equal budgets for the comparison.
pub fn lora_rank_for_budget(keep: f64, out: usize, inp: usize) -> usize {
    ((keep * (out * inp) as f64 / (out + inp) as f64).round() as usize).max(1)
}

/// Where the run is, for progress reporting.
#[derive(Clone, Debug, PartialEq)]
pub enum Progress {
    /// A batch of the preliminary phase: its loss and the loss tokens/s of the phase so far.
    Preliminary {
        step: usize,
        of: usize,
        loss: f64,
        tokens_per_s: f64,
    },
    /// The preliminary batches are done: `gradients` dense gradients went into the Grams,
    /// on the device or the host, in `accumulate_seconds` (waited for); the bases follow.
    Basis {
        gradients: u64,
        on_device: bool,
        accumulate_seconds: f64,
    },
    /// The bases are computed (see [`GramTiming`]).
    BasisReady(GramTiming),
    /// The method's premise, measured after the bases (see [`PremiseShare`]).
    Premise(Vec<PremiseShare>),
    Eval {
        step: usize,
        loss: f64,
    },
    Train {
        step: usize,
        of: usize,
        loss: f64,
        tokens_per_s: f64,
    },
}

/// Where the preliminary phase's Gram work went: the gradients accumulated (on the device
/// or the host), the seconds of the accumulation (the device waited for, summed over the
/// batches), of the downloads of the Grams (one per group, zero on the host route) and of
/// the eigensolves on the CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GramTiming {
    pub gradients: u64,
    pub on_device: bool,
    pub accumulate_seconds: f64,
    pub download_seconds: f64,
    pub eigensolve_seconds: f64,
}

/// What a run measured.
#[derive(Clone, Debug, PartialEq)]
pub struct FinetuneReport {
    pub method: MethodKind,
    pub trainable_parameters: usize,
    pub val_loss_before: f64,
    pub val_loss_after: f64,
    /// `(step, loss)` of every training step.
    pub train_curve: Vec<(usize, f64)>,
    /// `(step, validation loss)`, including step 0 and the last step.
    pub val_curve: Vec<(usize, f64)>,
    /// Loss-bearing tokens per second of the training loop.
    pub tokens_per_s: f64,
    /// Peak bytes the backend held during the run (weights, optimizer state, activations, workspaces).
    pub peak_memory_bytes: usize,
    pub preliminary_seconds: f64,
    /// The preliminary phase's Gram accumulation and eigensolves (SparseGrad without given
    /// bases).
    pub gram_timing: Option<GramTiming>,
    pub train_seconds: f64,
    /// Median seconds of one training step after the first (which grows the workspaces);
    /// `None` with fewer than 2 steps.
    pub steady_step_seconds: Option<f64>,
    /// SparseGrad with a preliminary phase: the premise per projection type.
    pub premise: Vec<PremiseShare>,
}

/// Batches after the preliminary phase whose dense gradients measure the premise; they
/// do not enter the bases.
pub const PREMISE_BATCHES: usize = 2;

/// The method's premise for one projection type: the share of a step's squared gradient
/// norm held by its top 1% entries (by magnitude) in the original space and in the
/// type's basis, averaged over the trained blocks and [`PREMISE_BATCHES`] held-out batches.
#[derive(Clone, Debug, PartialEq)]
pub struct PremiseShare {
    pub group: &'static str,
    pub original: f64,
    pub basis: f64,
}

/// Tokenised train and validation sentences.
pub struct Dataset {
    pub train: Vec<Vec<u32>>,
    pub validation: Vec<Vec<u32>>,
    pub spec_bos: u32,
    pub spec_eos: Option<u32>,
}

impl FinetuneConfig {
    fn batch_spec(&self, data: &Dataset) -> BatchSpec {
        BatchSpec {
            batch: self.batch,
            seq_len: self.seq_len,
            bos: data.spec_bos,
            eos: data.spec_eos,
            pad: data.spec_bos,
        }
    }

    /// The method of each projection type, in [`GROUPS`] order ([`Method::Frozen`] where
    /// [`Self::projections`] leaves it out); SparseGrad's formulation resolved on `backend`.
    fn methods<B: Backend + Clone>(&self, backend: &B, weights: &dyn LlamaSource) -> Result<[Method; 3]> {
        self.methods_with(weights.config(), |out, inp, tokens, k| {
            self.formulation.resolve(backend, out, inp, tokens, k)
        })
    }

    /// The options every trained projection gets (Adam at `lr`, the precision, the batch's
    /// token count for SparseGrad's pricing).
    pub fn train_options(&self) -> TrainOptions {
        TrainOptions {
            optimizer: Optimizer::Adam(AdamParams { lr: self.lr, ..Default::default() }),
            precision: self.precision,
            expected_tokens: self.batch * self.seq_len,
            seed: self.seed,
        }
    }

    /// The methods (as `methods` resolves them) from the model's configuration alone, for a memory plan:
    /// [`FormulationChoice::Measure`] (which times both forms on a device) is left to the
    /// layer's own pricing, which a plan reproduces.
    pub fn plan_methods(&self, config: &LlamaConfig) -> Result<[Method; 3]> {
        self.methods_with(config, |_, _, _, _| {
            Ok(match self.formulation {
                FormulationChoice::Fixed(f) => Some(f),
                FormulationChoice::FlopModel | FormulationChoice::Measure => None,
            })
        })
    }

    fn methods_with(
        &self,
        c: &LlamaConfig,
        resolve: impl Fn(usize, usize, usize, usize) -> Result<Option<Formulation>>,
    ) -> Result<[Method; 3]> {
        let keep = Keep::Fraction(self.keep);
        let one = match self.method {
            MethodKind::SparseGrad => {
                let thresholded = matches!(self.selection, Selection::SparseByDense { threshold } if threshold > 0.0);
                let mut methods = [Method::Frozen; 3];
                // gate and up are (ffn, hidden); down is (hidden, ffn).
                let shapes = [(c.ffn, c.hidden), (c.ffn, c.hidden), (c.hidden, c.ffn)];
                for ((m, (out, inp)), on) in methods.iter_mut().zip(shapes).zip(self.projections) {
                    if !on {
                        continue;
                    }
                    let formulation = if thresholded {
                        None
                    } else {
                        let tokens = self.batch * self.seq_len;
                        resolve(out, inp, tokens, keep.resolve(out * inp)?)?
                    };
                    *m = Method::SparseGrad { keep, selection: self.selection, formulation };
                }
                return Ok(methods);
            }
            MethodKind::MeProp => Method::MeProp { keep },
            MethodKind::Full => Method::Full,
            MethodKind::Lora => {
                let rank =
                    if self.lora_rank == 0 { lora_rank_for_budget(self.keep, c.ffn, c.hidden) } else { self.lora_rank };
                Method::Lora { rank, alpha: if self.lora_alpha > 0.0 { self.lora_alpha } else { 2.0 * rank as f32 } }
            }
        };
        let mut methods = [one; 3];
        for (m, on) in methods.iter_mut().zip(self.projections) {
            if !on {
                *m = Method::Frozen;
            }
        }
        Ok(methods)
    }

    fn validate(&self, weights: &dyn LlamaSource) -> Result<()> {
        if self.batch == 0 || self.seq_len == 0 {
            return Err(Error::invalid("finetune", "batch and seq_len must be positive"));
        }
        if self.blocks.is_empty() {
            return Err(Error::invalid("finetune", "no blocks selected to train"));
        }
        if !self.projections.contains(&true) {
            return Err(Error::invalid("finetune", "no projection (gate, up, down) selected to train"));
        }
        if let Some(&b) = self.blocks.iter().find(|&&b| b >= weights.config().layers) {
            return Err(Error::invalid(
                "finetune",
                format!("block {b} does not exist (the model has {} layers)", weights.config().layers),
            ));
        }
        if !(self.keep > 0.0 && self.keep <= 1.0) {
            return Err(Error::invalid("finetune", format!("keep {} outside (0, 1]", self.keep)));
        }
        // Sizes bounded by what the model allows, before anything is allocated.
        let c = weights.config();
        if self.seq_len > c.max_seq {
            return Err(Error::invalid(
                "finetune",
                format!("seq_len {} exceeds the model's context length of {} tokens", self.seq_len, c.max_seq),
            ));
        }
        let tokens = self.batch.checked_mul(self.seq_len);
        if tokens.and_then(|t| t.checked_mul(c.vocab.max(c.ffn))).is_none_or(|n| n > isize::MAX as usize / 8) {
            return Err(Error::invalid(
                "finetune",
                format!("batch {} x seq_len {} tokens is too many to hold the activations", self.batch, self.seq_len),
            ));
        }
        let max_rank = c.ffn.min(c.hidden);
        if self.method == MethodKind::Lora && self.lora_rank > max_rank {
            return Err(Error::invalid(
                "finetune",
                format!(
                    "LoRA rank {} exceeds {max_rank}, the smaller side of the {} x {} MLP projections",
                    self.lora_rank, c.ffn, c.hidden
                ),
            ));
        }
        Ok(())
    }
}

/// NaN or infinity met after `step` training steps is divergence, said in those words.
fn diverged_at(step: usize) -> impl Fn(Error) -> Error {
    move |e| match e {
        Error::NonFinite { .. } if step > 0 => Error::Diverged {
            step,
            detail: "the weights or gradients became NaN or infinite (try a smaller learning rate)".into(),
        },
        e => e,
    }
}

fn eval<B: Backend + Clone>(model: &mut LlamaModel<B>, batches: &[Batch]) -> Result<f64> {
    let mut total = LossSum::default();
    for b in batches {
        let l = model.forward(&b.tokens(), 0.0)?;
        total.sum += l.sum;
        total.tokens += l.tokens;
    }
    Ok(total.mean())
}

/// Batches of the training set forever, reshuffled each epoch.
fn train_batches<'a>(data: &'a Dataset, spec: BatchSpec, seed: u64) -> impl Iterator<Item = Result<Batch>> + 'a {
    (0u64..).flat_map(move |e| match epoch(&data.train, &spec, seed.wrapping_add(e)) {
        Ok(it) => Box::new(it.map(Ok)) as Box<dyn Iterator<Item = Result<Batch>>>,
        Err(err) => Box::new(std::iter::once(Err(err))),
    })
}

/// Runs the preliminary phase: dense MLP gradients of the selected blocks, streamed into
/// one Gram accumulator per projection type, then one basis per type.
fn preliminary<B: Backend + Clone>(
    backend: &B,
    weights: &dyn LlamaSource,
    cfg: &FinetuneConfig,
    data: &Dataset,
    progress: &mut dyn FnMut(Progress),
) -> Result<(BasisSet, Vec<PremiseShare>, GramTiming)> {
    let on = cfg.projections;
    let collect = |j: usize| if on[j] { Method::Collect } else { Method::Frozen };
    let plan = MlpPlan { layers: cfg.blocks.clone(), methods: [collect(0), collect(1), collect(2)] };
    let opts = TrainOptions { precision: cfg.precision, seed: cfg.seed, ..Default::default() };
    let mut model = LlamaModel::<B, f32>::new(
        backend,
        weights,
        &TrainingSetup { plan: plan.clone(), bases: None, options: opts },
        cfg.seq_len,
    )?;
    let mut grams = GramSet::<B, f32>::new(backend);
    let mut timing = GramTiming { on_device: grams.on_device(), ..GramTiming::default() };
    let spec = cfg.batch_spec(data);
    let (started, mut tokens) = (Instant::now(), 0usize);
    // held[j][k]: the held-out gradients of projection j of the k-th trained block, concatenated.
    let mut held: Vec<Vec<Vec<f32>>> = (0..3).map(|_| vec![Vec::new(); cfg.blocks.len()]).collect();
    let batches = train_batches(data, spec, cfg.seed ^ 0x5eed).take(cfg.prelim_steps + PREMISE_BATCHES);
    for (i, batch) in batches.enumerate() {
        let b = batch?;
        let n = b.n_targets().max(1);
        let loss = model.forward(&b.tokens(), 1.0 / n as f64)?;
        model.backward()?;
        let mlp = |l: usize| model.mlp(l).ok_or_else(|| Error::invalid("finetune", format!("no layer {l}")));
        if i < cfg.prelim_steps {
            // Timed alone: the backward is waited for first, the accumulation after.
            backend.synchronize()?;
            let t0 = Instant::now();
            for &l in &cfg.blocks {
                mlp(l)?.collect_grams(&mut grams)?;
            }
            backend.synchronize()?;
            timing.accumulate_seconds += t0.elapsed().as_secs_f64();
        } else {
            for (k, &l) in cfg.blocks.iter().enumerate() {
                for (j, proj) in mlp(l)?.projections().into_iter().enumerate().filter(|(j, _)| on[*j]) {
                    held[j][k].extend_from_slice(&proj.linear.dense_grad_host()?);
                }
            }
        }
        if i < cfg.prelim_steps {
            tokens += loss.tokens;
            let tokens_per_s = tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
            progress(Progress::Preliminary { step: i + 1, of: cfg.prelim_steps, loss: loss.mean(), tokens_per_s });
        }
    }
    timing.gradients = GROUPS.iter().map(|g| grams.count(g)).sum();
    progress(Progress::Basis {
        gradients: timing.gradients,
        on_device: timing.on_device,
        accumulate_seconds: timing.accumulate_seconds,
    });
    let mut set = BasisSet::new();
    for g in GROUPS.into_iter().zip(on).filter_map(|(g, on)| on.then_some(g)) {
        if grams.count(g) == 0 {
            return Err(Error::invalid("finetune", format!("the preliminary phase collected no `{g}` gradients")));
        }
        let (basis, t) = grams.basis(g)?;
        timing.download_seconds += t.download_seconds;
        timing.eigensolve_seconds += t.eigensolve_seconds;
        set.insert(basis);
    }
    drop(grams);
    progress(Progress::BasisReady(timing));
    let mut premise = Vec::with_capacity(3);
    for (j, g) in GROUPS.into_iter().enumerate().filter(|(j, _)| on[*j]) {
        let basis = set.get(g)?;
        let (out, inp) = basis.shape();
        let k = (out * inp).div_ceil(100);
        if let Some(r) = mean_sparsity_report(held[j].iter().map(|g| (g.as_slice(), basis)), k)? {
            premise.push(PremiseShare { group: g, original: r.original_fraction, basis: r.transformed_fraction });
        }
    }
    progress(Progress::Premise(premise.clone()));
    Ok((set, premise, timing))
}

/// Runs the whole flow on `backend` and returns the report and the trained model.
/// `bases` skips the preliminary phase when given (SparseGrad).
pub fn run<B: Backend + Clone>(
    backend: &B,
    weights: &dyn LlamaSource,
    data: &Dataset,
    cfg: &FinetuneConfig,
    bases: Option<BasisSet>,
    progress: &mut dyn FnMut(Progress),
) -> Result<(FinetuneReport, LlamaModel<B>, Option<BasisSet>)> {
    cfg.validate(weights)?;
    if data.train.is_empty() {
        return Err(Error::invalid("finetune", "no training sentences"));
    }
    let spec = cfg.batch_spec(data);
    let val_rows: Vec<&[u32]> =
        data.validation.iter().take(cfg.eval_batches.saturating_mul(cfg.batch)).map(Vec::as_slice).collect();
    if val_rows.is_empty() {
        return Err(Error::invalid("finetune", "no validation sentences"));
    }
    let val_batches = val_rows.chunks(cfg.batch).map(|rows| make_batch(rows, &spec)).collect::<Result<Vec<_>>>()?;
    let started = Instant::now();
    let (bases, premise, gram_timing) = match (cfg.method, bases) {
        (MethodKind::SparseGrad, Some(b)) => (Some(b), Vec::new(), None),
        (MethodKind::SparseGrad, None) => {
            let (b, premise, timing) = preliminary(backend, weights, cfg, data, progress)?;
            (Some(b), premise, Some(timing))
        }
        _ => (None, Vec::new(), None),
    };
    let preliminary_seconds = started.elapsed().as_secs_f64();
    let plan = MlpPlan { layers: cfg.blocks.clone(), methods: cfg.methods(backend, weights)? };
    let opts = cfg.train_options();
    let mut model = LlamaModel::new(
        backend,
        weights,
        &TrainingSetup { plan: plan.clone(), bases: bases.as_ref(), options: opts },
        cfg.seq_len,
    )?;
    let before = eval(&mut model, &val_batches)?;
    progress(Progress::Eval { step: 0, loss: before });
    let mut val_curve = vec![(0, before)];
    // Grown as steps run: `steps` comes from the user and may be far beyond any real run.
    let mut train_curve = Vec::with_capacity(cfg.steps.min(1 << 16));
    let (mut tokens, mut train_seconds) = (0usize, 0.0f64);
    let mut step_seconds = Vec::with_capacity(cfg.steps.min(1 << 16));
    for (i, batch) in train_batches(data, spec, cfg.seed).take(cfg.steps).enumerate() {
        let b = batch?;
        let t0 = Instant::now();
        let loss = model.train_step(&b.tokens()).map_err(diverged_at(i + 1))?;
        if !loss.mean().is_finite() {
            return Err(Error::Diverged {
                step: i + 1,
                detail: format!("the training loss is {} (try a smaller learning rate)", loss.mean()),
            });
        }
        backend.synchronize()?;
        let secs = t0.elapsed().as_secs_f64();
        train_seconds += secs;
        if i > 0 && step_seconds.len() < step_seconds.capacity() {
            step_seconds.push(secs);
        }
        tokens += loss.tokens;
        train_curve.push((i + 1, loss.mean()));
        progress(Progress::Train {
            step: i + 1,
            of: cfg.steps,
            loss: loss.mean(),
            tokens_per_s: tokens as f64 / train_seconds.max(1e-9),
        });
        if cfg.eval_every > 0 && (i + 1) % cfg.eval_every == 0 && i + 1 < cfg.steps {
            let v = eval(&mut model, &val_batches).map_err(diverged_at(i + 1))?;
            val_curve.push((i + 1, v));
            progress(Progress::Eval { step: i + 1, loss: v });
        }
    }
    let after = eval(&mut model, &val_batches).map_err(diverged_at(cfg.steps))?;
    if !after.is_finite() {
        return Err(diverged_at(cfg.steps)(Error::NonFinite {
            what: "validation loss".into(),
            count: 1,
            first_index: 0,
        }));
    }
    val_curve.push((cfg.steps, after));
    progress(Progress::Eval { step: cfg.steps, loss: after });
    let report = FinetuneReport {
        method: cfg.method,
        trainable_parameters: model.trainable_parameters(),
        val_loss_before: before,
        val_loss_after: after,
        train_curve,
        val_curve,
        tokens_per_s: tokens as f64 / train_seconds.max(1e-9),
        peak_memory_bytes: backend.memory_stats().peak_bytes,
        preliminary_seconds,
        gram_timing,
        train_seconds,
        steady_step_seconds: median(&mut step_seconds),
        premise,
    };
    Ok((report, model, bases))
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(if v.len() % 2 == 1 { v[v.len() / 2] } else { (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0 })
}
