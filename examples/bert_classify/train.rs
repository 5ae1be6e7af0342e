//! One fine-tuning run: the preliminary phase and basis (SparseGrad), training with
//! validation accuracy / macro-F1 along the way, and the test scores at the end.

use crate::args::{Args, MethodKind};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use sparsegrad::linear::trainable::{Linear, Method, TrainOptions};
use sparsegrad::model::bert::tokenizer::BertTokenizer;
use sparsegrad::model::bert::{BertModel, BertPlan, BertWeights, HeadConfig};
use sparsegrad::model::TrainingSetup;
use sparsegrad::recipes::classify::accuracy_macro_f1;
use sparsegrad::{AdamParams, Backend, BasisSet, GramSet, Keep, Optimizer, Result, Selection};
use std::io::IsTerminal as _;
use std::time::Instant;

/// A split tokenized once: ids per sentence and labels.
pub struct Encoded {
    pub ids: Vec<Vec<u32>>,
    pub labels: Vec<u32>,
}

/// Everything a run needs that does not depend on the method.
pub struct Prepared {
    pub weights: BertWeights,
    pub classes: usize,
    pub train: Encoded,
    pub validation: Encoded,
    pub test: Encoded,
    pub pad_id: u32,
}

/// Which scores a run computes (each evaluation costs a forward pass over its set).
#[derive(Clone, Copy, Debug)]
pub struct Evals {
    /// The validation score of the untrained head, before the first step.
    pub untrained: bool,
    /// Validation every `eval_every` steps and after the last; `false`: none at all.
    pub validation: bool,
    pub test: bool,
}

impl Evals {
    pub const ALL: Evals = Evals { untrained: true, validation: true, test: true };
}

/// What a run measured.
#[derive(Clone, Debug, Default)]
pub struct RunResult {
    pub untrained: (f64, f64),
    pub test: (f64, f64),
    /// `(step, mean training loss since the last point)`.
    pub loss_curve: Vec<(usize, f64)>,
    /// `(step, validation accuracy, validation macro-F1)`.
    pub val_curve: Vec<(usize, f64, f64)>,
    pub mlp_trainable: usize,
    pub head_trainable: usize,
    pub steps_per_s: f64,
    pub peak_bytes: usize,
    /// Wall and CPU (user + system, this process) seconds of the whole run.
    pub wall_s: f64,
    pub cpu_s: f64,
    /// Per layer: the share of token rows the weight-gradient products skipped (SparseGrad
    /// only), dense_in and dense_out.
    pub rows_skipped: Vec<[f64; 2]>,
}

/// LoRA rank with about `keep` of an `(out, in)` weight's entries.
pub fn lora_rank(keep: f64, out: usize, inp: usize) -> usize {
    ((keep * (out * inp) as f64 / (out + inp) as f64).round() as usize).max(1)
}

fn method_of(args: &Args, keep: f64, out: usize, inp: usize) -> Method {
    match args.method {
        MethodKind::Full => Method::Full,
        MethodKind::Head => Method::Frozen,
        MethodKind::MeProp => Method::MeProp { keep: Keep::Fraction(keep) },
        MethodKind::Lora => {
            let rank = lora_rank(keep, out, inp);
            Method::Lora { rank, alpha: 2.0 * rank as f32 }
        }
        MethodKind::SparseGrad => Method::SparseGrad {
            keep: Keep::Fraction(keep),
            selection: match args.sd_threshold {
                None => Selection::Exact,
                Some(threshold) => Selection::SparseByDense { threshold },
            },
            formulation: None,
        },
    }
}

/// Pads sentences `idx` of `set` into one batch.
fn batch_of(set: &Encoded, idx: &[usize], pad: u32) -> (Vec<u32>, Vec<u32>, Vec<u32>, usize) {
    let seqs: Vec<Vec<u32>> = idx.iter().map(|&i| set.ids[i].clone()).collect();
    let b = BertTokenizer::pad(&seqs, pad);
    (b.ids, b.lengths, idx.iter().map(|&i| set.labels[i]).collect(), b.seq)
}

/// Accuracy and macro-F1 on the first `limit` sentences of `set`, in batches of `chunk`
/// (the training batch: the model's buffers, sized for it, do not grow).
pub fn evaluate<B: Backend + Clone>(
    model: &mut BertModel<B, f32>,
    set: &Encoded,
    limit: usize,
    pad: u32,
    chunk: usize,
) -> Result<(f64, f64)> {
    let n = set.ids.len().min(limit);
    let k = model.head_config().classes;
    let mut pred = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(chunk.max(1)) {
        let (ids, lengths, _, seq) = batch_of(set, chunk, pad);
        let logits = model.logits(&ids, &lengths, chunk.len(), seq)?;
        for row in logits.chunks(k) {
            let best = (0..k).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap_or(0);
            pred.push(best as u32);
        }
    }
    accuracy_macro_f1(&pred, &set.labels[..n], k)
}

fn progress(steps: usize, quiet: bool) -> ProgressBar {
    let pb = ProgressBar::new(steps as u64);
    if quiet {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    let style = ProgressStyle::with_template("{prefix} [{bar:24}] {pos}/{len} [{elapsed}] {wide_msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    pb.set_style(style);
    pb
}

/// The preliminary phase: dense MLP gradients of `prelim_steps` batches into one Gram
/// accumulator per group (on the device for a device backend, see [`GramSet`]), then the
/// bases. Unless `quiet`, prints where the time went (accumulation vs eigensolve).
fn preliminary<B: Backend + Clone>(
    backend: &B,
    p: &Prepared,
    args: &Args,
    plan: &BertPlan,
    head: &HeadConfig,
    quiet: bool,
) -> Result<BasisSet> {
    let collect = BertPlan { methods: [Method::Collect; 2], ..plan.clone() };
    let mut model = BertModel::<B, f32>::new(
        backend,
        &p.weights,
        &TrainingSetup { plan: collect.clone(), bases: None, options: TrainOptions::default() },
        head,
    )?;
    let mut rng = SmallRng::seed_from_u64(args.seed ^ 0x5EED);
    let mut order: Vec<usize> = (0..p.train.ids.len()).collect();
    order.shuffle(&mut rng);
    let mut grams = GramSet::<B, f32>::new(backend);
    let mut accumulate_seconds = 0.0;
    for step in 0..args.prelim_steps {
        let idx: Vec<usize> = (0..args.batch).map(|j| order[(step * args.batch + j) % order.len()]).collect();
        let (ids, lengths, labels, seq) = batch_of(&p.train, &idx, p.pad_id);
        model.train_step(&ids, &lengths, &labels, idx.len(), seq)?;
        backend.synchronize()?;
        let t0 = Instant::now();
        for &l in &plan.layers {
            model.mlp(l).expect("planned layer").collect_grams(&mut grams)?;
        }
        backend.synchronize()?;
        accumulate_seconds += t0.elapsed().as_secs_f64();
    }
    let (mut set, mut download, mut eigensolve) = (BasisSet::new(), 0.0, 0.0);
    for group in grams.groups() {
        let (basis, t) = grams.basis(&group)?;
        (download, eigensolve) = (download + t.download_seconds, eigensolve + t.eigensolve_seconds);
        set.insert(basis);
    }
    if !quiet {
        eprintln!(
            "bases: Gram accumulation on the {} {accumulate_seconds:.2} s, download {download:.2} s, eigensolve \
             {eigensolve:.2} s (CPU)",
            if grams.on_device() { "device" } else { "host" }
        );
    }
    Ok(set)
}

/// Trains one model by `args` (with MLP budget `keep`) and scores it.
pub fn run<B: Backend + Clone>(
    backend: &B,
    p: &Prepared,
    args: &Args,
    keep: f64,
    quiet: bool,
    evals: Evals,
    keep_model: impl FnOnce(&BertModel<B, f32>, Option<&BasisSet>) -> Result<()>,
) -> Result<RunResult> {
    let (wall0, cpu0) = (Instant::now(), cpu_seconds());
    let c = &p.weights.config;
    let layers = match &args.layers {
        None => (0..c.layers).collect(),
        Some(v) => v.clone(),
    };
    let methods = [method_of(args, keep, c.ffn, c.hidden), method_of(args, keep, c.hidden, c.ffn)];
    let plan = BertPlan { layers, methods, per_layer_basis: args.per_layer_basis };
    let head = HeadConfig {
        classes: p.classes,
        pooling: args.pooling,
        optimizer: Optimizer::Adam(AdamParams { lr: args.head_lr, weight_decay: 0.01, ..Default::default() }),
        seed: args.seed,
    };
    let bases = if args.method == MethodKind::SparseGrad {
        if !quiet {
            eprintln!("preliminary phase: {} batches of dense MLP gradients", args.prelim_steps);
        }
        Some(preliminary(backend, p, args, &plan, &head, quiet)?)
    } else {
        None
    };
    let tokens = args.batch * args.max_len / 2;
    let opts = TrainOptions {
        optimizer: Optimizer::Adam(AdamParams { lr: args.lr, ..Default::default() }),
        expected_tokens: tokens,
        seed: args.seed,
        ..Default::default()
    };
    let mut model = BertModel::<B, f32>::new(
        backend,
        &p.weights,
        &TrainingSetup { plan: plan.clone(), bases: bases.as_ref(), options: opts },
        &head,
    )?;
    let mut r = RunResult {
        mlp_trainable: model.mlp_trainable_parameters(),
        head_trainable: model.head().trainable_parameters(),
        ..Default::default()
    };
    if evals.untrained {
        r.untrained = evaluate(&mut model, &p.validation, args.eval_limit(), p.pad_id, args.batch)?;
        r.val_curve.push((0, r.untrained.0, r.untrained.1));
    }
    if !quiet {
        eprintln!(
            "{}: {} MLP parameters train ({:.3}% of the MLPs), head {}; untrained head: validation accuracy {:.3}, macro-F1 {:.3}",
            args.method.name(),
            r.mlp_trainable,
            100.0 * r.mlp_trainable as f64 / (2 * c.hidden * c.ffn * plan.layers.len()).max(1) as f64,
            r.head_trainable,
            r.untrained.0,
            r.untrained.1
        );
    }
    let mut rng = SmallRng::seed_from_u64(args.seed);
    let mut order: Vec<usize> = (0..p.train.ids.len()).collect();
    order.shuffle(&mut rng);
    let (mut cursor, mut loss_sum, mut loss_n) = (0usize, 0.0f64, 0usize);
    let mut skipped = vec![[0.0f64; 2]; c.layers];
    let pb = progress(args.steps, quiet);
    pb.set_prefix(args.method.name());
    let started = Instant::now();
    for step in 1..=args.steps {
        if cursor + args.batch > order.len() {
            order.shuffle(&mut rng);
            cursor = 0;
        }
        let idx = &order[cursor..(cursor + args.batch).min(order.len())];
        cursor += idx.len();
        let (ids, lengths, labels, seq) = batch_of(&p.train, idx, p.pad_id);
        let loss = model.train_step(&ids, &lengths, &labels, idx.len(), seq)?;
        let t = (idx.len() * seq) as f64;
        for &l in &model.plan().layers.clone() {
            for (j, proj) in model.mlp(l).expect("planned layer").projections().into_iter().enumerate() {
                if let Linear::SparseGrad(sg) = &proj.linear {
                    skipped[l][j] += 1.0 - sg.last_stats().rows_multiplied as f64 / t;
                }
            }
        }
        loss_sum += loss.mean();
        loss_n += 1;
        pb.set_message(format!("loss {:.4}", loss.mean()));
        pb.inc(1);
        if evals.validation && (step % args.eval_every.max(1) == 0 || step == args.steps) {
            r.loss_curve.push((step, loss_sum / loss_n as f64));
            (loss_sum, loss_n) = (0.0, 0);
            let (acc, f1) = evaluate(&mut model, &p.validation, args.eval_limit(), p.pad_id, args.batch)?;
            r.val_curve.push((step, acc, f1));
            let line = format!(
                "step {step}: train loss {:.4}, validation accuracy {acc:.3}, macro-F1 {f1:.3}",
                r.loss_curve.last().map_or(0.0, |x| x.1)
            );
            // Without a terminal the bar is hidden (and so are its lines): plain lines for logs.
            match (quiet, std::io::stderr().is_terminal()) {
                (true, _) => {}
                (false, true) => pb.println(line),
                (false, false) => eprintln!("{line}"),
            }
        }
    }
    let train_s = started.elapsed().as_secs_f64();
    pb.finish_and_clear();
    r.steps_per_s = args.steps as f64 / train_s.max(1e-9);
    r.rows_skipped = skipped.iter().map(|s| [s[0] / args.steps as f64, s[1] / args.steps as f64]).collect();
    if evals.test {
        r.test = evaluate(&mut model, &p.test, args.test_limit, p.pad_id, args.batch)?;
    }
    r.peak_bytes = backend.memory_stats().peak_bytes;
    keep_model(&model, bases.as_ref())?;
    (r.wall_s, r.cpu_s) = (wall0.elapsed().as_secs_f64(), cpu_seconds() - cpu0);
    Ok(r)
}

/// User + system CPU seconds of this process so far (`/proc/self/stat`, in the kernel's
/// USER_HZ ticks, 100 a second on Linux); 0 where that file cannot be read.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    // The command name (field 2) may hold spaces: count fields after its closing paren.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, 11 and 12 after the command name.
    (tick(11) + tick(12)) / 100.0
}
