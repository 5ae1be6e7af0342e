//! The GPU shape of a LLaMA training step (see `--help`): runs steps of a random-weight
//! LLaMA of named dimensions on the CUDA backend (a GPU, or the CPU emulation of CUDA in
//! `cuda/emu`), records every device call of each measured step in the backend's ledger
//! (`sparsegrad::perf`), checks it against the emulated device's own count when
//! `SG_EMU_PROFILE` is set, scales a short run of a few layers to the full model, and prints
//! counts and the roofline prediction for the H100 SXM and H200 beside the step's floor.

mod args;
mod report;

use sparsegrad::linear::Keep;
use sparsegrad::model::llama::{LlamaModel, MlpPlan, TokenBatch};
use sparsegrad::model::weights::LlamaWeights;
use sparsegrad::model::TrainingSetup;
use sparsegrad::perf::emulator::{check_against_ledger, read_windows};
use sparsegrad::perf::llama::{compulsory_bytes, covering_prefix, kind_counts, layer_kinds, named_config};
use sparsegrad::perf::shape::{extrapolate, identical_calls, same_calls, LayerWeights};
use sparsegrad::perf::Event;
use sparsegrad::{Basis, BasisSet, Cuda, Error, Method, ProfileOptions, Result, Selection, TrainOptions};
use std::process::ExitCode;

fn main() -> ExitCode {
    let argv: std::result::Result<Vec<String>, _> = std::env::args_os().skip(1).map(|a| a.into_string()).collect();
    let parsed = match argv {
        Ok(argv) => args::parse(&argv),
        Err(bad) => Err(Error::invalid("command line", format!("argument {bad:?} is not valid UTF-8"))),
    };
    let a = match parsed {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{}", args::HELP);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The method of each projection (gate, up, down) of a trained block.
fn methods(a: &args::Args, ffn: usize, hidden: usize) -> [Method; 3] {
    let keep = Keep::Fraction(a.keep);
    // LoRA at the rank whose r (in + out) parameters come closest to `keep` of the entries.
    let rank = ((a.keep * (ffn * hidden) as f64 / (ffn + hidden) as f64).round() as usize).max(1);
    let one = match a.method.as_str() {
        "sparsegrad" => Method::SparseGrad { keep, selection: Selection::Exact, formulation: a.formulation },
        "lora" => Method::Lora { rank, alpha: 2.0 * rank as f32 },
        "meprop" => Method::MeProp { keep },
        _ => Method::Full,
    };
    let mut m = [one; 3];
    for (mj, on) in m.iter_mut().zip(a.projections) {
        if !on {
            *mj = Method::Frozen;
        }
    }
    m
}

/// Seeded token ids, their next-token targets and a full mask.
fn tokens(vocab: usize, batch: usize, seq: usize, seed: u64) -> (Vec<u32>, Vec<u32>, Vec<f32>) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % vocab as u64) as u32
    };
    let ids: Vec<u32> = (0..batch * seq).map(|_| next()).collect();
    let targets: Vec<u32> = (0..batch * seq).map(|i| if (i + 1) % seq == 0 { ids[i] } else { ids[i + 1] }).collect();
    (ids, targets, vec![1.0; batch * seq])
}

/// One sequence length's measured steps.
/// One replayed step of the CUDA graph of the step.
pub struct GraphRun {
    pub seq: usize,
    pub events: Vec<Event>,
    /// Device milliseconds of one replayed step between CUDA events (GPU only).
    pub gpu_step_ms: Option<f32>,
}

pub struct SeqRun {
    pub seq: usize,
    pub events: Vec<Event>,
    pub steps_measured: usize,
    /// Whether every measured step made exactly the same calls, sizes included.
    pub steps_identical: bool,
    /// Device milliseconds of one whole step between CUDA events (GPU only).
    pub gpu_step_ms: Option<f32>,
    /// The step again with an event pair around every launch (GPU only).
    pub timed_events: Option<Vec<Event>>,
}

fn run(a: &args::Args) -> Result<()> {
    let full = named_config(&a.dims)?;
    let spec = a.blocks.clone().unwrap_or_else(|| if a.dims == "smollm2-135m" { "every3" } else { "every3+0" }.into());
    let trained = args::resolve_blocks(&spec, full.layers)?;
    let cuda = Cuda::new(0)?;
    // Before any layer is built: SparseGrad layers price their choices at these rates.
    cuda.set_tf32(a.tf32);
    let emulated = cuda.is_emulated();
    let run_layers = match a.layers {
        None => covering_prefix(full.layers, &trained),
        Some(None) => full.layers,
        Some(Some(n)) => n.min(full.layers),
    };
    let run_trained: Vec<usize> = trained.iter().copied().filter(|&l| l < run_layers).collect();
    let target_kinds = layer_kinds(full.layers, &trained);
    let run_kinds = layer_kinds(run_layers, &run_trained);
    let layer_weights = LayerWeights::by_kind(&run_kinds, &kind_counts(&target_kinds))?;
    let seqs: Vec<usize> = match (a.run_seqs, emulated) {
        (Some((s1, s2)), _) => vec![s1, s2],
        (None, true) => vec![2, 4],
        (None, false) => vec![a.seq],
    };
    let target_tokens = a.batch * a.seq;
    let methods = methods(a, full.ffn, full.hidden);
    let mut cfg = full.clone();
    cfg.layers = run_layers;
    let max_seq = seqs.iter().copied().max().unwrap_or(a.seq);
    eprintln!("gpu_shape: building a {run_layers}-layer {} slice (random weights) on {}", a.dims, cuda.device_name());
    let host = LlamaWeights::random(&cfg, a.seed)?;
    let mut bases = BasisSet::new();
    if a.method == "sparsegrad" {
        for (j, (group, out, inp)) in
            [("gate", full.ffn, full.hidden), ("up", full.ffn, full.hidden), ("down", full.hidden, full.ffn)]
                .into_iter()
                .enumerate()
        {
            if a.projections[j] {
                bases.insert(Basis::reflection(group, out, inp, a.seed.wrapping_add(j as u64))?);
            }
        }
    }
    let setup = TrainingSetup {
        plan: MlpPlan { layers: run_trained.clone(), methods },
        bases: (a.method == "sparsegrad").then_some(&bases),
        // The formulation is chosen for the target's tokens, not the short run's.
        options: TrainOptions {
            precision: a.precision,
            expected_tokens: target_tokens,
            seed: a.seed,
            ..Default::default()
        },
    };
    let mut model = LlamaModel::<Cuda, f32>::new(&cuda, &host, &setup, max_seq)?;
    drop(host);
    // The measured steps run eagerly, so the ledger holds every launch and cuBLAS call (the
    // nodes a graph of the step holds); the CUDA graph of the step is checked after them.
    model.set_cuda_graphs(false);
    let emu_profile = std::env::var_os("SG_EMU_PROFILE").map(std::path::PathBuf::from);
    let windows_before = match &emu_profile {
        Some(p) if p.exists() => read_windows(p)?.len(),
        _ => 0,
    };
    let mut runs: Vec<SeqRun> = Vec::new();
    let mut ledgers: Vec<Vec<Event>> = Vec::new();
    // The longest length first: its warm-up step grows every token-sized buffer, so the
    // shorter length needs none (fewer steps on the emulator).
    let mut order = seqs.clone();
    order.sort_unstable_by(|x, y| y.cmp(x));
    for (nth, &seq) in order.iter().enumerate() {
        let (ids, targets, mask) = tokens(cfg.vocab, a.batch, seq, a.seed.wrapping_add(seq as u64));
        let batch = TokenBatch { ids: &ids, targets: &targets, mask: &mask, batch: a.batch, seq };
        let mut measured: Vec<Vec<Event>> = Vec::new();
        let first = if nth == 0 { 0 } else { 1 };
        for step in first..a.steps {
            eprintln!("gpu_shape: seq {seq}, step {} of {}", step + 1, a.steps);
            if step > 0 {
                cuda.profile_begin(ProfileOptions::default())?;
            }
            let r = model.train_step(&batch);
            if step > 0 {
                let events = cuda.profile_end()?;
                r?;
                ledgers.push(events.clone());
                measured.push(events);
            } else {
                r?;
            }
        }
        if let Some(i) = measured.windows(2).position(|w| !same_calls(&w[0], &w[1])) {
            return Err(Error::invalid(
                "gpu_shape",
                format!("measured steps {} and {} at seq {seq} made different device calls", i + 2, i + 3),
            ));
        }
        // The same calls with different sizes: data-dependent sizes (reported, not an error).
        let steps_identical = measured.windows(2).all(|w| identical_calls(&w[0], &w[1]));
        let (mut gpu_step_ms, mut timed_events) = (None, None);
        if !emulated {
            let ((), ms) = cuda.time_ms(|| model.train_step(&batch).map(|_| ()))?;
            gpu_step_ms = Some(ms);
            cuda.profile_begin(ProfileOptions { time_each_launch: true })?;
            let r = model.train_step(&batch);
            let events = cuda.profile_end()?;
            r?;
            timed_events = Some(events);
        }
        let steps_measured = measured.len();
        let events = measured.pop().unwrap_or_default();
        runs.push(SeqRun { seq, events, steps_measured, steps_identical, gpu_step_ms, timed_events });
    }
    // The step as a CUDA graph, at the last (shortest) length run: its next step is captured
    // (and run), the one after it replayed and counted.
    let graph = {
        let seq = *order.last().ok_or_else(|| Error::invalid("gpu_shape", "no sequence length to run"))?;
        let (ids, targets, mask) = tokens(cfg.vocab, a.batch, seq, a.seed.wrapping_add(seq as u64));
        let batch = TokenBatch { ids: &ids, targets: &targets, mask: &mask, batch: a.batch, seq };
        model.set_cuda_graphs(true);
        eprintln!("gpu_shape: seq {seq}, capturing the step as a CUDA graph, then one replay");
        model.train_step(&batch)?;
        cuda.profile_begin(ProfileOptions::default())?;
        let r = model.train_step(&batch);
        let events = cuda.profile_end()?;
        r?;
        ledgers.push(events.clone());
        let ms = if emulated { None } else { Some(cuda.time_ms(|| model.train_step(&batch).map(|_| ()))?.1) };
        GraphRun { seq, events, gpu_step_ms: ms }
    };
    runs.sort_by_key(|r| r.seq);
    // The independent count: the emulated driver and cuBLAS saw the same calls.
    let emulator_check = match &emu_profile {
        Some(path) if emulated => {
            let windows = read_windows(path)?;
            let new = windows.get(windows_before..).unwrap_or_default();
            if new.len() < ledgers.len() {
                return Err(Error::invalid(
                    "gpu_shape",
                    format!("SG_EMU_PROFILE holds {} new windows, the run opened {}", new.len(), ledgers.len()),
                ));
            }
            for (i, (ledger, window)) in ledgers.iter().zip(new).enumerate() {
                check_against_ledger(ledger, window).map_err(|e| e.context(&format!("measured window {}", i + 1)))?;
            }
            Some((
                ledgers.iter().map(Vec::len).sum::<usize>(),
                ledgers.len(),
                new.iter().map(|w| w.totals.peak_bytes).max(),
            ))
        }
        _ => None,
    };
    let (target_events, scaling) = if runs.len() == 2 {
        let (t, r) = extrapolate(&runs[0].events, runs[0].seq, &runs[1].events, runs[1].seq, a.seq)?;
        (t, Some(r))
    } else {
        (runs[0].events.clone(), None)
    };
    let compulsory = compulsory_bytes(&full, &trained, &methods, a.precision, target_tokens);
    let ctx = report::Context {
        args: a,
        config: &full,
        trained: &trained,
        run_layers,
        run_trained: &run_trained,
        run_kinds: &run_kinds,
        target_kinds: &target_kinds,
        layer_weights: &layer_weights,
        methods: &methods,
        device: cuda.device_name().to_string(),
        device_model: sparsegrad::Backend::device_model(&cuda).map_or("CPU", |m| m.name),
        emulated,
        memory: sparsegrad::Backend::memory_stats(&cuda),
        emulator_check,
        formulations: [0, 1, 2].map(|j| {
            run_trained.first().and_then(|&l| model.mlp(l)).and_then(|m| {
                let linear = &m.projections()[j].linear;
                linear.formulation().map(|f| (f, linear.merged_update()))
            })
        }),
    };
    report::print_and_save(&ctx, &runs, &graph, &target_events, scaling.as_ref(), &compulsory)
}
