//! The main job: fine-tune the MLP blocks of a real LLaMA-architecture model
//! (SmolLM2-135M-Instruct, from `scripts/fetch-assets.sh`) on the VADER sentence corpus
//! with SparseGrad, LoRA, MeProp or full fine-tuning, on the CPU or a CUDA GPU.
//!
//! Loads the model (GGUF, or a Hugging Face directory) and its tokenizer, splits and
//! tokenises the corpus, runs `sparsegrad::recipes::finetune::run` with a progress bar, and writes
//! the loss curves (CSV and PNG), the adapter and the merged model into `--out`. With
//! `--compare` it runs all four methods at equal trainable parameters, each on a fresh
//! backend, and prints one table. `--help` lists the flags; see also README.md.
//!
//! Run: `scripts/run-example.sh [flags]` or
//! `cargo run --release --features recipes --example llama_mlp_finetune -- [flags]`.

mod args;
mod output;
mod plan;
mod plot;

use args::{Args, Device};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use sparsegrad::io::fs::{self as sgfs, escape};
use sparsegrad::io::gguf::GgufFile;
use sparsegrad::model::tokenizer::Tokenizer as GgufTokenizer;
use sparsegrad::model::weights::{LlamaCheckpoint, LlamaSource};
use sparsegrad::recipes::finetune::{
    lora_rank_for_budget, run, Dataset, FinetuneConfig, FinetuneReport, MethodKind, Progress,
};
use sparsegrad::recipes::vader::{load_corpus, train_validation_split};
use sparsegrad::{Backend, Cpu, Error, Precision, Result, Selection};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Exit code of a malformed command line (1 is any other failure).
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let started = Instant::now();
    let argv: std::result::Result<Vec<String>, _> = std::env::args_os().skip(1).map(|a| a.into_string()).collect();
    let parsed = match argv {
        Ok(argv) => args::parse(&argv),
        Err(bad) => Err(Error::invalid("command line", format!("argument {bad:?} is not valid UTF-8"))),
    };
    let args = match parsed {
        Ok(Some(a)) => a,
        Ok(None) => {
            print!("{}", args::HELP);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {}", escape(&e.to_string(), 4000));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if args.plan {
        // Reads the configuration only; writes nothing.
        return match plan::print(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {}", escape(&e.to_string(), 4000));
                ExitCode::FAILURE
            }
        };
    }
    // Checked and created before the model loads, so a bad --out fails in a second, not
    // after the whole run; removed again (if still empty) when the run fails.
    let created = match output::prepare_out_dir(&args.out) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {}", escape(&e.to_string(), 4000));
            return ExitCode::FAILURE;
        }
    };
    match main_with(&args, started) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if created {
                let _ = std::fs::remove_dir(&args.out);
            }
            // Text from files and flags is escaped: one printable line, whatever it held.
            eprintln!("error: {}", escape(&e.to_string(), 4000));
            ExitCode::FAILURE
        }
    }
}

/// The model, its tokenizer (as a `tokenizers` tokenizer, so it can be saved beside the
/// merged model as tokenizer.json) and the special tokens batches need.
struct Loaded {
    /// Memory-mapped: tensors are read and converted one at a time as the model is built.
    weights: LlamaCheckpoint,
    tokenizer: tokenizers::Tokenizer,
    bos: u32,
    eos: Option<u32>,
}

fn not_found(path: &Path, hint: &str) -> Error {
    Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, format!("not found ({hint})")))
}

/// A tokenizer from a GGUF file or a tokenizer.json, with its BOS/EOS ids if it knows them.
/// The kind is told by the content (GGUF magic, else JSON), so a misnamed file still gets
/// the message that fits it.
fn load_tokenizer(path: &Path) -> Result<(tokenizers::Tokenizer, Option<u32>, Option<u32>)> {
    let what = |msg: &str| Error::invalid("--tokenizer", format!("{}: {msg}", path.display()));
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(what("not found")),
        Ok(m) if m.is_dir() => return Err(what("is a directory; expected a .gguf file or a tokenizer.json")),
        _ => {}
    }
    let mut magic = [0u8; 4];
    let n = std::io::Read::read(&mut sgfs::open_regular(path)?, &mut magic).map_err(|e| Error::io(path, e))?;
    if n == 4 && &magic == b"GGUF" {
        let t = GgufTokenizer::from_gguf(&GgufFile::open(path)?)?;
        return Ok((t.inner().clone(), t.bos(), t.eos()));
    }
    let text = sgfs::read_text(path, sgfs::MAX_TEXT_FILE_BYTES)
        .map_err(|_| what("neither a GGUF file nor a tokenizer.json"))?;
    if !text.trim_start().starts_with('{') {
        return Err(what("neither a GGUF file nor a tokenizer.json"));
    }
    let t = <tokenizers::Tokenizer as std::str::FromStr>::from_str(&text)
        .map_err(|e| what(&format!("not a valid tokenizer.json: {}", escape(&e.to_string(), 300))))?;
    Ok((t, None, None))
}

/// The tokenizer of a Hugging Face directory: its tokenizer.json (what this example
/// writes into `merged/`), else the one `.gguf` file inside it or beside it.
fn hf_dir_tokenizer(dir: &Path) -> Result<PathBuf> {
    let json = dir.join("tokenizer.json");
    if json.is_file() {
        return Ok(json);
    }
    if json.exists() {
        return Err(Error::format(Some(&json), "not a regular file (expected the model's tokenizer.json)"));
    }
    for place in [Some(dir), dir.parent()].into_iter().flatten() {
        let ggufs: Vec<PathBuf> = std::fs::read_dir(place)
            .map_err(|e| Error::io(place, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "gguf"))
            .collect();
        match ggufs.as_slice() {
            [one] => return Ok(one.clone()),
            [] => {}
            _ => {
                return Err(Error::invalid(
                    "--model",
                    format!("{} holds several .gguf files; choose the tokenizer with --tokenizer", place.display()),
                ))
            }
        }
    }
    Err(Error::invalid(
        "--model",
        format!(
            "{} has no tokenizer.json and no .gguf beside it; pass --tokenizer FILE.gguf|tokenizer.json",
            dir.display()
        ),
    ))
}

fn load_model(args: &Args) -> Result<Loaded> {
    let path = &args.model;
    if !path.exists() {
        return Err(not_found(path, "run scripts/fetch-assets.sh, or pass --model"));
    }
    // The weights first: a corrupt model is the error worth reporting. Opening checks every
    // tensor's presence and shape; verify reads each once (one at a time, nothing kept).
    // The file's tokenizer is only built when no --tokenizer replaces it.
    let weights = LlamaCheckpoint::open(path)?;
    weights.verify()?;
    let from_model = match (weights.gguf(), &args.tokenizer) {
        (Some(f), None) => {
            let t = GgufTokenizer::from_gguf(f)?;
            Some((t.inner().clone(), t.bos(), t.eos()))
        }
        _ => None,
    };
    let (tokenizer, bos, eos) = match (&args.tokenizer, from_model) {
        (Some(t), _) => load_tokenizer(t)?,
        (None, Some(t)) => t,
        (None, None) => load_tokenizer(&hf_dir_tokenizer(path)?)?,
    };
    check_against_model(args, weights.config())?;
    let vocab = tokenizer.get_vocab_size(true);
    if vocab > weights.config().vocab {
        return Err(Error::Incompatible {
            what: "tokenizer".into(),
            msg: format!("{vocab} tokens, but the model embeds only {}", weights.config().vocab),
        });
    }
    let bos = bos
        .or(weights.config().bos)
        .ok_or_else(|| Error::invalid("tokenizer", "neither the tokenizer nor the model config names a BOS token"))?;
    let eos = eos.or(weights.config().eos);
    Ok(Loaded { weights, tokenizer, bos, eos })
}

/// The flags bounded by the model, checked before anything is allocated for training.
fn check_against_model(args: &Args, c: &sparsegrad::LlamaConfig) -> Result<()> {
    if args.seq_len > c.max_seq {
        return Err(Error::invalid(
            "--seq-len",
            format!("{} exceeds the model's context length of {} tokens", args.seq_len, c.max_seq),
        ));
    }
    let max_rank = c.hidden.min(c.ffn);
    if args.lora_rank > max_rank {
        return Err(Error::invalid(
            "--lora-rank",
            format!(
                "{} exceeds {max_rank}, the smaller side of the model's {} x {} MLP projections",
                args.lora_rank, c.ffn, c.hidden
            ),
        ));
    }
    Ok(())
}

/// The flags bounded by the corpus.
fn check_against_data(args: &Args, data: &Dataset) -> Result<()> {
    if args.batch > data.train.len() {
        return Err(Error::invalid(
            "--batch",
            format!("{} is more than the {} training sentences", args.batch, data.train.len()),
        ));
    }
    Ok(())
}

fn load_data(args: &Args, m: &Loaded) -> Result<Dataset> {
    match std::fs::metadata(&args.data) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(Error::invalid("--data", format!("{} is not a directory", args.data.display()))),
        Err(_) => return Err(not_found(&args.data, "run scripts/fetch-assets.sh, or pass --data")),
    }
    let sentences = load_corpus(&args.data)?;
    let split = train_validation_split(&sentences, args.validation_fraction, args.seed)?;
    let encode = |texts: &[String]| -> Result<Vec<Vec<u32>>> {
        texts
            .par_iter()
            .map(|s| {
                m.tokenizer
                    .encode(s.as_str(), false)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(|e| Error::invalid("tokenizer", format!("cannot encode `{s}`: {e}")))
            })
            .collect()
    };
    Ok(Dataset {
        train: encode(&split.train)?,
        validation: encode(&split.validation)?,
        spec_bos: m.bos,
        spec_eos: m.eos,
    })
}

fn config(args: &Args, method: MethodKind, blocks: &[usize]) -> FinetuneConfig {
    FinetuneConfig {
        method,
        blocks: blocks.to_vec(),
        projections: args.projections,
        steps: args.steps,
        batch: args.batch,
        seq_len: args.seq_len,
        keep: args.keep,
        selection: Selection::Exact,
        formulation: args.formulation,
        lora_rank: args.lora_rank,
        lora_alpha: 0.0,
        lr: args.lr,
        seed: args.seed,
        precision: args.precision,
        prelim_steps: args.prelim_steps,
        eval_batches: args.eval_batches,
        eval_every: args.eval_every,
    }
}

/// How a method's budget is set, for the summary and the table.
fn detail(args: &Args, method: MethodKind, m: &Loaded) -> String {
    let c = m.weights.config();
    match method {
        MethodKind::SparseGrad | MethodKind::MeProp => format!("keep {}%", args.keep * 100.0),
        MethodKind::Lora if args.lora_rank > 0 => format!("rank {}", args.lora_rank),
        MethodKind::Lora => format!("rank {}, budget-matched", lora_rank_for_budget(args.keep, c.ffn, c.hidden)),
        MethodKind::Full => "every entry".into(),
    }
}

/// The progress bar and, when stderr is no terminal (the bar then stays hidden), plain
/// lines, so logs still show how the run went.
fn progress_ui(method: MethodKind, cfg: &FinetuneConfig) -> (ProgressBar, impl FnMut(Progress)) {
    let pb = ProgressBar::new(cfg.steps as u64);
    let style = ProgressStyle::with_template("{spinner} {prefix} [{bar:24}] {pos}/{len} [{elapsed}] {wide_msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    pb.set_style(style);
    let (first, len) = match method {
        MethodKind::SparseGrad => ("preliminary", cfg.prelim_steps),
        // Training has not started: an empty bar of the training length.
        _ => ("evaluating", cfg.steps),
    };
    pb.set_prefix(format!("{}: {first}", method.name()));
    pb.set_length(len as u64);
    pb.set_message(if method == MethodKind::SparseGrad {
        "dense gradients for the bases"
    } else {
        "validation loss before training"
    });
    pb.enable_steady_tick(Duration::from_millis(250));
    let hidden = pb.is_hidden();
    let line = {
        let pb = pb.clone();
        move |s: String| if hidden { eprintln!("{s}") } else { pb.println(s) }
    };
    let (steps, eval_every, name) = (cfg.steps, cfg.eval_every, method.name());
    let log_every = (steps / 10).max(1);
    let bar = pb.clone();
    let phase_start = std::cell::Cell::new(Instant::now());
    let callback = move |p: Progress| match p {
        Progress::Preliminary { step, of, loss, tokens_per_s } => {
            bar.set_position(step as u64);
            bar.set_message(format!("loss {loss:.3} | {tokens_per_s:.0} tok/s | dense gradients for the bases"));
            if hidden {
                line(format!("{name}: preliminary batch {step}/{of}  loss {loss:.4}  {tokens_per_s:.0} tok/s"));
            }
        }
        Progress::Basis { gradients, on_device, accumulate_seconds } => {
            bar.set_prefix(format!("{name}: bases"));
            bar.set_message(if on_device { "Gram download, eigensolves" } else { "eigensolves" });
            line(format!(
                "{name}: preliminary batches done in {:.1} s ({gradients} gradients into the Grams on the {} in \
                 {accumulate_seconds:.2} s); computing the bases",
                phase_start.get().elapsed().as_secs_f64(),
                if on_device { "device" } else { "host" },
            ));
        }
        Progress::BasisReady(t) => {
            bar.set_message("validation loss before");
            line(format!(
                "{name}: bases ready: Gram accumulation {:.2} s, download {:.2} s, eigensolve {:.2} s (CPU)",
                t.accumulate_seconds, t.download_seconds, t.eigensolve_seconds
            ));
        }
        Progress::Premise(shares) => line(format!("{name}: premise: {}", output::premise_line(&shares))),
        Progress::Eval { step, loss } => {
            line(format!("{name}: step {step:>4}  validation loss {loss:.4}"));
            if step == 0 {
                bar.reset();
                bar.set_prefix(format!("{name}: training"));
                bar.set_length(steps as u64);
                bar.set_message("first step");
                phase_start.set(Instant::now());
            } else if step == steps {
                bar.finish_with_message(format!("done: validation loss {loss:.4}"));
            }
        }
        Progress::Train { step, of, loss, tokens_per_s } => {
            bar.set_position(step as u64);
            let evaluating = step == of || (eval_every > 0 && step % eval_every == 0);
            let note = if evaluating { " | evaluating" } else { "" };
            bar.set_message(format!("loss {loss:.3} | {tokens_per_s:.0} tok/s{note}"));
            if hidden && (step % log_every == 0 || step == of) {
                line(format!("{name}: step {step:>4}/{of}  train loss {loss:.4}  {tokens_per_s:.0} tok/s"));
            }
        }
    };
    (pb, callback)
}

/// One method on a fresh backend, its outputs written into `out`.
fn run_method<B: Backend + Clone>(
    backend: &B,
    args: &Args,
    m: &Loaded,
    data: &Dataset,
    blocks: &[usize],
    method: MethodKind,
    out: &Path,
) -> Result<FinetuneReport> {
    let cfg = config(args, method, blocks);
    let (pb, mut callback) = progress_ui(method, &cfg);
    let result = run(backend, &m.weights, data, &cfg, None, &mut callback);
    pb.finish_and_clear();
    let (report, model, bases) = result?;
    output::prepare_out_dir(out)?;
    output::write_csv(&out.join("loss_curve.csv"), &report)?;
    let val_label = format!("validation ({} sentences)", cfg.eval_batches * cfg.batch);
    let smooth = plot::running_mean(&report.train_curve, 5);
    let curves = [
        plot::Curve {
            label: "train (per batch)",
            color: plot::PALETTE[0],
            points: &report.train_curve,
            markers: false,
            faint: true,
        },
        plot::Curve {
            label: "train (mean of last 5)",
            color: plot::PALETTE[0],
            points: &smooth,
            markers: false,
            faint: false,
        },
        plot::Curve {
            label: &val_label,
            color: plot::PALETTE[1],
            points: &report.val_curve,
            markers: true,
            faint: false,
        },
    ];
    let title = format!("{} on blocks {:?}: loss", method.name(), blocks);
    plot::plot(&out.join("loss_curve.png"), &title, &curves)?;
    output::write_adapter(&out.join("adapter.safetensors"), &model, &m.weights, blocks, bases.as_ref())?;
    output::write_merged(&out.join("merged"), &model, &m.weights, &m.tokenizer)?;
    Ok(report)
}

fn main_with(args: &Args, started: Instant) -> Result<()> {
    if args.device == Device::Cuda {
        // Fail before the model loads: a machine without a GPU should hear so at once, and
        // a run that would not fit the device's free memory too.
        let be = cuda(args.tf32)?;
        #[cfg(feature = "cuda")]
        plan::check_fits(args, &be)?;
        #[cfg(not(feature = "cuda"))]
        drop(be);
    }
    let m = load_model(args)?;
    let blocks = args.blocks.resolve(m.weights.config().layers)?;
    let data = load_data(args, &m)?;
    check_against_data(args, &data)?;
    let c = m.weights.config();
    eprintln!(
        "model {} ({} blocks, hidden {}, ffn {}); {} train / {} validation sentences; loaded in {:.1} s",
        args.model.display(),
        c.layers,
        c.hidden,
        c.ffn,
        data.train.len(),
        data.validation.len(),
        started.elapsed().as_secs_f64()
    );
    eprintln!(
        "device {:?}, {}; blocks {blocks:?}; {} steps of batch {} x seq {}; lr {}; seed {}",
        args.device,
        match (args.precision, args.tf32) {
            (Precision::Bf16, _) => "bf16 frozen operands",
            (_, true) => "f32 with TF32 GEMMs",
            _ => "f32",
        },
        args.steps,
        args.batch,
        args.seq_len,
        args.lr,
        args.seed
    );
    match args.device {
        Device::Cpu => drive(|| Ok(Cpu::new()), args, &m, &data, &blocks, started),
        Device::Cuda => drive(|| cuda(args.tf32), args, &m, &data, &blocks, started),
    }
}

/// The CUDA backend, its f32 GEMMs on TF32 tensor cores when `tf32` (set before any layer
/// is built: SparseGrad layers price their formulation at the rates in effect).
#[cfg(feature = "cuda")]
fn cuda(tf32: bool) -> Result<sparsegrad::Cuda> {
    let cuda = sparsegrad::Cuda::new(0)?;
    cuda.set_tf32(tf32);
    Ok(cuda)
}

#[cfg(not(feature = "cuda"))]
fn cuda(_tf32: bool) -> Result<Cpu> {
    Err(Error::CudaUnavailable("this build has no CUDA backend (the `cuda` feature is off)".into()))
}

/// Runs one method, or all four with `--compare`, each on a backend from `make`.
fn drive<B: Backend + Clone>(
    make: impl Fn() -> Result<B>,
    args: &Args,
    m: &Loaded,
    data: &Dataset,
    blocks: &[usize],
    started: Instant,
) -> Result<()> {
    let total = output::total_parameters(m.weights.config());
    if !args.compare {
        let backend = make()?;
        let report = run_method(&backend, args, m, data, blocks, args.method, &args.out)?;
        let secs = started.elapsed().as_secs_f64();
        println!("\n{}", output::summary(&report, total, &detail(args, args.method, m), secs));
        println!("  outputs in {}: loss_curve.csv, loss_curve.png, adapter.safetensors, merged/", args.out.display());
        return Ok(());
    }
    let mut rows = Vec::new();
    for method in MethodKind::ALL {
        let t0 = Instant::now();
        // A fresh backend per method, so its peak memory is that method's alone.
        let backend = make()?;
        let dir = args.out.join(method.name());
        let report = run_method(&backend, args, m, data, blocks, method, &dir)?;
        let d = detail(args, method, m);
        eprintln!("{}", output::summary(&report, total, &d, t0.elapsed().as_secs_f64()));
        rows.push((report, d));
    }
    let table = output::compare_table(&rows);
    let curves: Vec<plot::Curve> = rows
        .iter()
        .zip(plot::PALETTE)
        .map(|((r, _), color)| plot::Curve {
            label: r.method.name(),
            color,
            points: &r.val_curve,
            markers: true,
            faint: false,
        })
        .collect();
    plot::plot(&args.out.join("compare_val_loss.png"), "validation loss by method", &curves)?;
    let setup = format!(
        "blocks {blocks:?}, {} steps, batch {} x seq {}, lr {}, keep {}, {} preliminary batches, {} validation batches, seed {}, device {:?}",
        args.steps, args.batch, args.seq_len, args.lr, args.keep, args.prelim_steps, args.eval_batches, args.seed, args.device
    );
    output::write_text(&args.out.join("compare.md"), &format!("{setup}\n\n{table}"))?;
    println!("\n{setup}\n\n{table}");
    println!(
        "total {:.1} s; per-method outputs in {}/<method>/, table in compare.md",
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}
