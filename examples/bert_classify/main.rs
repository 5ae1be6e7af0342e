//! Sentence classification with a BERT encoder: fine-tune its MLP blocks (attention frozen)
//! and a dense head, by SparseGrad, LoRA (at the rank with as many parameters), MeProp or
//! full fine-tuning; report validation accuracy / macro-F1 while training and test scores
//! at the end; write metrics.csv, curves.png, the adapter, the head and the merged HF model.
//! `--study` compares the methods with per-method learning rates tuned on validation, a
//! fixed split per task and paired differences over run seeds (study.rs, report.rs).
//!
//! Run `scripts/fetch-assets.sh` first (all-MiniLM-L6-v2 and the VADER corpus), then e.g.
//! `cargo run --release --features recipes --example bert_classify -- --method sparsegrad --selection sd`.

mod args;
mod journal;
mod plot;
mod premise;
mod report;
mod study;
mod train;

use args::{Args, Device, MethodKind};
use sparsegrad::model::bert::tokenizer::BertTokenizer;
use sparsegrad::model::bert::{BertModel, BertWeights};
use sparsegrad::recipes::classify::{Example, TaskSplit};
use sparsegrad::{Backend, BasisSet, Cpu, Error, Result};
use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;
use train::{Encoded, Evals, Prepared, RunResult};

fn main() -> ExitCode {
    let argv: std::result::Result<Vec<String>, _> = std::env::args_os().skip(1).map(|a| a.into_string()).collect();
    let parsed = match argv {
        Ok(argv) => args::parse(&argv),
        Err(bad) => Err(Error::invalid("command line", format!("argument {bad:?} is not valid UTF-8"))),
    };
    let args = match parsed {
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
    match main_with(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn encode(tok: &BertTokenizer, set: &[Example], max_len: usize) -> Result<Encoded> {
    Ok(Encoded {
        ids: set.iter().map(|e| tok.encode(&e.text, max_len)).collect::<Result<_>>()?,
        labels: set.iter().map(|e| e.label).collect(),
    })
}

/// The model and `split` tokenized (`data` names the task in the log).
fn prepare(args: &Args, data: &Path, split: &TaskSplit) -> Result<Prepared> {
    let weights = BertWeights::from_hf_dir(&args.model)?;
    let tok = BertTokenizer::from_file(args.model.join("tokenizer.json"))?;
    if tok.vocab_size() > weights.config.vocab {
        return Err(Error::invalid(
            "--model",
            format!("tokenizer.json has {} tokens, the model {}", tok.vocab_size(), weights.config.vocab),
        ));
    }
    eprintln!(
        "task {}: {} classes ({}), {} train / {} validation / {} test sentences",
        data.display(),
        split.labels.len(),
        split.labels.join(", "),
        split.train.len(),
        split.validation.len(),
        split.test.len()
    );
    let max_len = args.max_len.min(weights.config.max_positions);
    Ok(Prepared {
        classes: split.labels.len(),
        train: encode(&tok, &split.train, max_len)?,
        validation: encode(&tok, &split.validation, max_len)?,
        test: encode(&tok, &split.test, max_len)?,
        pad_id: tok.pad_id(),
        weights,
    })
}

fn main_with(args: &Args) -> Result<()> {
    if args.device == Device::Cuda {
        // Fail before the model loads: a machine without a GPU should hear so at once.
        cuda()?;
    }
    if args.study {
        return study(args);
    }
    // The task first: a bad data file is reported without loading the model.
    let split = study::TaskCtx::new(args, args.task())?.split;
    let p = prepare(args, args.task(), &split)?;
    std::fs::create_dir_all(&args.out).map_err(|e| Error::io(&args.out, e))?;
    if args.premise {
        let premise = match args.device {
            Device::Cpu => premise::measure(&Cpu::new(), &p, args)?,
            Device::Cuda => premise::measure(&cuda()?, &p, args)?,
        };
        let md = premise.markdown();
        let path = args.out.join("premise.md");
        std::fs::write(&path, &md).map_err(|e| Error::io(&path, e))?;
        print!("{md}");
        println!("wrote {}", path.display());
        return Ok(());
    }
    let r = match args.device {
        Device::Cpu => {
            train::run(&Cpu::new(), &p, args, args.keep, false, Evals::ALL, |m, b| save_model(args, &p, m, b))?
        }
        Device::Cuda => {
            train::run(&cuda()?, &p, args, args.keep, false, Evals::ALL, |m, b| save_model(args, &p, m, b))?
        }
    };
    report(args, &r)
}

/// The adapter, the head and the merged HF model (config.json, model.safetensors,
/// tokenizer.json) under `--out`.
fn save_model<B: Backend + Clone>(
    args: &Args,
    p: &Prepared,
    m: &BertModel<B, f32>,
    bases: Option<&BasisSet>,
) -> Result<()> {
    m.save_adapter(&args.out.join("adapter.safetensors"), &p.weights, bases)?;
    m.save_head(&args.out.join("head.safetensors"))?;
    let merged_dir = args.out.join("merged");
    m.merged_weights(&p.weights)?.save_hf_safetensors(&merged_dir)?;
    std::fs::copy(args.model.join("tokenizer.json"), merged_dir.join("tokenizer.json"))
        .map_err(|e| Error::io(merged_dir.join("tokenizer.json"), e))?;
    Ok(())
}

fn report(args: &Args, r: &RunResult) -> Result<()> {
    let mut csv = String::from("step,train_loss,val_accuracy,val_macro_f1\n");
    for &(step, acc, f1) in &r.val_curve {
        let loss = r.loss_curve.iter().find(|l| l.0 == step).map_or(String::new(), |l| format!("{:.6}", l.1));
        let _ = writeln!(csv, "{step},{loss},{acc:.6},{f1:.6}");
    }
    let csv_path = args.out.join("metrics.csv");
    std::fs::write(&csv_path, csv).map_err(|e| Error::io(&csv_path, e))?;
    let acc: Vec<(f64, f64, f64)> = r.val_curve.iter().map(|&(s, a, _)| (s as f64, a, 0.0)).collect();
    let f1: Vec<(f64, f64, f64)> = r.val_curve.iter().map(|&(s, _, f)| (s as f64, f, 0.0)).collect();
    let loss: Vec<(f64, f64, f64)> = r.loss_curve.iter().map(|&(s, l)| (s as f64, l, 0.0)).collect();
    let series = [
        plot::Series { label: "validation accuracy", color: plot::PALETTE[0], points: &acc },
        plot::Series { label: "validation macro-F1", color: plot::PALETTE[2], points: &f1 },
        plot::Series { label: "train loss (nats)", color: plot::PALETTE[1], points: &loss },
    ];
    let png = args.out.join("curves.png");
    plot::chart(&png, &format!("bert_classify: {}", args.method.name()), "step", "", &series, false)?;
    if args.method == MethodKind::SparseGrad {
        let mode = match args.sd_threshold {
            None => "exact selection".to_string(),
            Some(t) => format!("sparse-by-dense, threshold {t}"),
        };
        let line: Vec<String> = r
            .rows_skipped
            .iter()
            .enumerate()
            .filter(|(i, _)| args.layers.as_ref().is_none_or(|l| l.contains(i)))
            .map(|(i, s)| format!("layer {i}: {:.1}% / {:.1}%", 100.0 * s[0], 100.0 * s[1]))
            .collect();
        println!(
            "token rows skipped by the weight-gradient products ({mode}; intermediate / output): {}",
            line.join(", ")
        );
    }
    println!(
        "untrained head: validation accuracy {:.3}, macro-F1 {:.3}; after training: test accuracy {:.3}, macro-F1 {:.3} \
         ({} MLP + {} head parameters trained, {:.2} steps/s, peak {:.1} MiB)",
        r.untrained.0,
        r.untrained.1,
        r.test.0,
        r.test.1,
        r.mlp_trainable,
        r.head_trainable,
        r.steps_per_s,
        r.peak_bytes as f64 / (1 << 20) as f64
    );
    println!(
        "wrote {} and {} and the adapter, head and merged model in {}",
        csv_path.display(),
        png.display(),
        args.out.display()
    );
    Ok(())
}

/// `--study` (or `--study-report`): every task's runs through the journal, then
/// study.md and one plot per task from it.
fn study(args: &Args) -> Result<()> {
    // Every task file first: a bad one is reported before hours of runs.
    let tasks = args.data.iter().map(|d| study::TaskCtx::new(args, d)).collect::<Result<Vec<_>>>()?;
    std::fs::create_dir_all(&args.out).map_err(|e| Error::io(&args.out, e))?;
    let mut journal = journal::Journal::open(&args.out.join("study_runs.tsv"))?;
    if journal.malformed > 0 {
        eprintln!("warning: {} lines of study_runs.tsv do not parse and are ignored", journal.malformed);
    }
    let mut tally = study::Tally::default();
    let write = |journal: &journal::Journal| -> Result<std::path::PathBuf> {
        let md = report::render(args, &tasks, journal)?;
        let path = args.out.join("study.md");
        std::fs::write(&path, md).map_err(|e| Error::io(&path, e))?;
        Ok(path)
    };
    if !args.study_report {
        for (t, data) in tasks.iter().zip(&args.data) {
            let p = prepare(args, data, &t.split)?;
            study::run_task(args, t, &p, &mut journal, &mut tally)?;
            write(&journal)?;
        }
    }
    let path = write(&journal)?;
    println!(
        "study: {} runs reused from {}, {} run now; wrote {} and the plots beside it",
        tally.reused,
        args.out.join("study_runs.tsv").display(),
        tally.ran,
        path.display()
    );
    Ok(())
}

#[cfg(feature = "cuda")]
pub(crate) fn cuda() -> Result<sparsegrad::Cuda> {
    sparsegrad::Cuda::new(0)
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn cuda() -> Result<Cpu> {
    Err(Error::CudaUnavailable("this build has no CUDA backend (the `cuda` feature is off)".into()))
}
