//! Command line of the `llama_mlp_finetune` example: flags, their defaults per device,
//! and `--help`. Every problem is one `sparsegrad::Error` naming the flag, so `main` can
//! print exactly one `error: ...` line.
//!
//! Hand-rolled rather than clap, like the `sparsegrad` binary: a flat list of flags and a
//! one-line error for each mistake, which clap's multi-line usage errors are not.

use sparsegrad::recipes::finetune::MethodKind;
use sparsegrad::{Error, FormulationChoice, Precision, Result};
use std::path::PathBuf;

/// Where the model and corpus are when `scripts/fetch-assets.sh` put them there.
pub const DEFAULT_MODEL: &str = "assets/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_DATA: &str = "assets/vader";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

/// Which blocks' MLPs train; resolved once the model's layer count is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blocks {
    List(Vec<usize>),
    /// Every n-th block starting at block n-1 (the paper: every third, n = 3).
    Every(usize),
    All,
}

impl Blocks {
    pub fn resolve(&self, layers: usize) -> Result<Vec<usize>> {
        let v: Vec<usize> = match self {
            Blocks::List(v) => v.clone(),
            Blocks::Every(n) => (n - 1..layers).step_by(*n).collect(),
            Blocks::All => (0..layers).collect(),
        };
        if let Some(b) = v.iter().find(|&&b| b >= layers) {
            return Err(Error::invalid(
                "--blocks",
                format!("block {b} does not exist: the model has {layers} blocks (0..={})", layers.saturating_sub(1)),
            ));
        }
        if v.is_empty() {
            return Err(Error::invalid("--blocks", format!("selects no block of the model's {layers}")));
        }
        Ok(v)
    }
}

/// The parsed command line, defaults filled in.
#[derive(Clone, Debug)]
pub struct Args {
    pub method: MethodKind,
    pub compare: bool,
    pub device: Device,
    pub precision: Precision,
    /// f32 GEMMs with TF32 (`Cuda::set_tf32`).
    pub tf32: bool,
    pub blocks: Blocks,
    /// Which projections of each trained block train (`gate`, `up`, `down`).
    pub projections: [bool; 3],
    /// Print the memory plan and exit (`--plan`).
    pub plan: bool,
    /// Named model dimensions instead of `--model` (`--dims`, with `--plan` only).
    pub dims: Option<String>,
    pub steps: usize,
    pub batch: usize,
    pub seq_len: usize,
    pub keep: f64,
    pub formulation: FormulationChoice,
    /// 0: the rank whose parameter count matches `keep` (`lora_rank_for_budget`).
    pub lora_rank: usize,
    pub lr: f32,
    pub seed: u64,
    pub model: PathBuf,
    pub tokenizer: Option<PathBuf>,
    pub data: PathBuf,
    pub out: PathBuf,
    pub prelim_steps: usize,
    pub eval_batches: usize,
    pub eval_every: usize,
    pub validation_fraction: f64,
}

pub const HELP: &str = "\
llama_mlp_finetune: fine-tune the MLP blocks of a LLaMA-architecture model on the VADER
sentence corpus with SparseGrad (or LoRA, MeProp, full fine-tuning) and write the adapter,
the merged model and the loss curves.

usage: cargo run --release --features recipes --example llama_mlp_finetune -- [flags]
       scripts/run-example.sh [flags]

flags (defaults: CPU / with --device cuda):
  --method M         sparsegrad | lora | meprop | full                  [sparsegrad]
  --compare          run all four methods at equal trainable parameters, one table
  --device D         cpu | cuda                                         [cpu]
  --dtype T          f32 | bf16 (bf16: frozen operands in bf16, cuda only)  [f32]
  --tf32             f32 GEMMs on TF32 tensor cores (cuda only; default: exact f32)
  --blocks B         trained blocks: `23,26,29`, `every3` (every third block, the
                     paper's choice; any everyN), or `all`    [23,26,29 / every3]
  --projections P    which projections of those blocks train: any of gate,up,down
                     (the paper: up,down)                               [gate,up,down]
  --plan             print the device memory plan of the run (one line per category
                     and a total, in GB; the largest batch that fits 48 and 80 GB) and
                     exit: reads only the model's configuration (config.json or a GGUF
                     header), loads no weights and no data
  --dims NAME        with --plan: named dimensions instead of --model:
                     smollm2-135m, llama2-7b, llama3-8b, tiny
  --steps N          training steps (at most 10000000)                  [100 / 300]
  --batch N          sentences per batch (at most the training sentences)  [8 / 32]
  --seq-len N        tokens per sentence (longer ones are cut; at most the
                     model's context length)                            [32 / 128]
  --keep F           fraction of each projection's entries SparseGrad and MeProp
                     update per step                                    [0.01]
  --formulation F    SparseGrad's formulation per projection: flops (the flop
                     count on the CPU, the predicted time at the precision's rates
                     on a GPU), measure (time a step of both once per shape),
                     merged, transformed                                [flops]
  --lora-rank R      LoRA rank [the rank with the same trainable parameters as --keep]
  --lr F             learning rate (Adam/SparseAdam)                    [3e-3 / 1e-3]
  --seed N           data order, split and initialisation               [0]
  --prelim-steps N   SparseGrad's preliminary batches for the bases     [4 / 30]
  --eval-batches N   validation batches per evaluation                  [4 / 16]
  --eval-every N     evaluate every N steps (0: only before and after)  [20 / 50]
  --model PATH       a GGUF file, or a Hugging Face directory (config.json +
                     *.safetensors)        [assets/SmolLM2-135M-Instruct.Q4_1.gguf]
  --tokenizer PATH   a GGUF file or tokenizer.json (only needed for a Hugging Face
                     directory without tokenizer.json and without a .gguf inside)
  --data DIR         the VADER *_GroundTruth.txt files                  [assets/vader]
  --validation-fraction F  share of the sentences held out for validation  [0.1]
  --out DIR          where outputs go (per method under DIR/<method>/ with --compare) [out]
  --help             this text

outputs in --out: loss_curve.csv (step, train_loss, val_loss), loss_curve.png,
adapter.safetensors (the trained state, resumable), merged/ (the merged model as Hugging
Face f32 safetensors + config.json + tokenizer.json); with --compare also compare.md.
";

/// The defaults that depend on the device: a ~3-minute run on a small CPU, the paper's
/// shape (every third block, longer sequences, more steps) on a GPU.
struct Defaults {
    blocks: Blocks,
    steps: usize,
    batch: usize,
    seq_len: usize,
    lr: f32,
    prelim_steps: usize,
    eval_batches: usize,
    eval_every: usize,
}

fn defaults(device: Device) -> Defaults {
    match device {
        Device::Cpu => Defaults {
            blocks: Blocks::List(vec![23, 26, 29]),
            steps: 100,
            batch: 8,
            seq_len: 32,
            lr: 3e-3,
            prelim_steps: 4,
            eval_batches: 4,
            eval_every: 20,
        },
        Device::Cuda => Defaults {
            blocks: Blocks::Every(3),
            steps: 300,
            batch: 32,
            seq_len: 128,
            lr: 1e-3,
            prelim_steps: 30,
            eval_batches: 16,
            eval_every: 50,
        },
    }
}

fn number<T: std::str::FromStr>(flag: &'static str, v: &str, what: &str) -> Result<T> {
    v.trim()
        .parse()
        .map_err(|_| Error::invalid(flag, format!("`{}` is not {what}", sparsegrad::io::fs::escape(v, 100))))
}

/// ` (inf in f32)`-style note when the value parsed differs from the text written.
fn as_f32(text: &str, v: f32) -> String {
    if text.trim() == v.to_string() {
        String::new()
    } else {
        format!(" ({v} in f32)")
    }
}

/// Most training steps a run may ask for; beyond it the run would not end in a lifetime
/// on any machine, and the loss history alone would grow past memory.
pub const MAX_STEPS: usize = 10_000_000;

fn at_most(flag: &'static str, v: usize, max: usize) -> Result<usize> {
    if v > max {
        return Err(Error::invalid(flag, format!("{v} is more than the {max} a run may ask for")));
    }
    Ok(v)
}

fn positive(flag: &'static str, v: &str) -> Result<usize> {
    match number::<usize>(flag, v, "a positive whole number")? {
        0 => Err(Error::invalid(flag, "must be at least 1")),
        n => Ok(n),
    }
}

fn parse_blocks(v: &str) -> Result<Blocks> {
    const FLAG: &str = "--blocks";
    if v == "all" {
        return Ok(Blocks::All);
    }
    if let Some(n) = v.strip_prefix("every") {
        return Ok(Blocks::Every(
            positive(FLAG, n)
                .map_err(|_| Error::invalid(FLAG, format!("`{v}`: expected everyN with N >= 1, e.g. every3")))?,
        ));
    }
    let mut list = Vec::new();
    for part in v.split(',') {
        let b = number::<usize>(FLAG, part, "a block index (expected e.g. `23,26,29`, `every3` or `all`)")?;
        if list.contains(&b) {
            return Err(Error::invalid(FLAG, format!("block {b} is listed twice")));
        }
        list.push(b);
    }
    list.sort_unstable();
    Ok(Blocks::List(list))
}

fn parse_projections(v: &str) -> Result<[bool; 3]> {
    const FLAG: &str = "--projections";
    let mut on = [false; 3];
    for part in v.split(',') {
        let j = ["gate", "up", "down"].iter().position(|&g| g == part.trim()).ok_or_else(|| {
            Error::invalid(FLAG, format!("`{}` is not one of gate, up, down", sparsegrad::io::fs::escape(part, 100)))
        })?;
        if on[j] {
            return Err(Error::invalid(FLAG, format!("`{}` is listed twice", part.trim())));
        }
        on[j] = true;
    }
    Ok(on)
}

/// Parses the arguments after the program name. `Ok(None)`: `--help` was asked (it wins
/// over every other problem, as users reach for it when confused).
pub fn parse(argv: &[String]) -> Result<Option<Args>> {
    if argv.iter().any(|a| a == "-h" || a == "--help") {
        return Ok(None);
    }
    let mut given: Vec<(&'static str, String)> = Vec::new();
    let mut compare = false;
    let mut tf32 = false;
    let mut plan = false;
    let mut it = argv.iter();
    const FLAGS: [&str; 25] = [
        "--method",
        "--device",
        "--dtype",
        "--blocks",
        "--steps",
        "--batch",
        "--seq-len",
        "--keep",
        "--formulation",
        "--lora-rank",
        "--lr",
        "--seed",
        "--model",
        "--tokenizer",
        "--data",
        "--out",
        "--prelim-steps",
        "--eval-batches",
        "--eval-every",
        "--validation-fraction",
        "--compare",
        "--tf32",
        "--plan",
        "--projections",
        "--dims",
    ];
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (arg.as_str(), None),
        };
        let Some(&flag) = FLAGS.iter().find(|&&f| f == name) else {
            let what = if arg.starts_with('-') { "unknown flag" } else { "unexpected argument" };
            return Err(Error::invalid("command line", format!("{what} `{arg}` (see --help)")));
        };
        if flag == "--compare" || flag == "--tf32" || flag == "--plan" {
            if inline.is_some() {
                return Err(Error::invalid(flag, "takes no value"));
            }
            match flag {
                "--compare" => compare = true,
                "--tf32" => tf32 = true,
                _ => plan = true,
            }
            continue;
        }
        let value = match inline {
            Some(v) => v,
            // A following `--flag` is almost surely a forgotten value.
            None => match it.next() {
                Some(v) if !v.starts_with("--") => v.clone(),
                _ => return Err(Error::invalid(flag, "needs a value (see --help)")),
            },
        };
        if value.is_empty() {
            return Err(Error::invalid(flag, "has an empty value"));
        }
        if given.iter().any(|(n, _)| *n == flag) {
            return Err(Error::invalid(flag, "given more than once"));
        }
        given.push((flag, value));
    }
    let get = |flag: &str| given.iter().find(|(n, _)| *n == flag).map(|(_, v)| v.as_str());

    let device = match get("--device") {
        None | Some("cpu") => Device::Cpu,
        Some("cuda") => Device::Cuda,
        Some(v) => return Err(Error::invalid("--device", format!("`{v}` is not one of cpu, cuda"))),
    };
    let d = defaults(device);
    let precision = match get("--dtype") {
        None | Some("f32") => Precision::Full,
        Some("bf16") if device == Device::Cuda => Precision::Bf16,
        Some("bf16") => {
            return Err(Error::invalid("--dtype", "bf16 needs --device cuda (the CPU backend computes in f32)"))
        }
        Some(v) => return Err(Error::invalid("--dtype", format!("`{v}` is not one of f32, bf16"))),
    };
    if tf32 && device != Device::Cuda {
        return Err(Error::invalid("--tf32", "needs --device cuda (the CPU backend's f32 GEMMs are exact f32)"));
    }
    if compare && get("--method").is_some() {
        return Err(Error::invalid("--compare", "runs every method; drop --method"));
    }
    let method = match get("--method") {
        None => MethodKind::SparseGrad,
        Some(v) => MethodKind::parse(v)
            .map_err(|_| Error::invalid("--method", format!("`{v}` is not one of sparsegrad, lora, meprop, full")))?,
    };
    let keep = match get("--keep") {
        None => 0.01,
        Some(v) => match number::<f64>("--keep", v, "a number")? {
            k if k > 0.0 && k <= 1.0 => k,
            _ => return Err(Error::invalid("--keep", format!("`{v}` is outside (0, 1]"))),
        },
    };
    let lr = match get("--lr") {
        None => d.lr,
        Some(v) => match number::<f32>("--lr", v, "a number")? {
            lr if lr.is_finite() && lr > 0.0 => lr,
            lr => return Err(Error::invalid("--lr", format!("`{v}`{} must be positive and finite", as_f32(v, lr)))),
        },
    };
    let validation_fraction = match get("--validation-fraction") {
        None => 0.1,
        Some(v) => match number::<f64>("--validation-fraction", v, "a number")? {
            f if f > 0.0 && f < 1.0 => f,
            _ => return Err(Error::invalid("--validation-fraction", format!("`{v}` is outside (0, 1)"))),
        },
    };
    let pos = |flag: &'static str, default: usize| get(flag).map_or(Ok(default), |v| positive(flag, v));
    let whole =
        |flag: &'static str, default: usize| get(flag).map_or(Ok(default), |v| number(flag, v, "a whole number"));
    if get("--dims").is_some() && !plan {
        return Err(Error::invalid("--dims", "names dimensions for --plan only (a run needs --model)"));
    }
    if get("--dims").is_some() && get("--model").is_some() {
        return Err(Error::invalid("--dims", "give either --dims or --model"));
    }
    if plan && compare {
        return Err(Error::invalid("--plan", "plans one method; drop --compare"));
    }
    let seq_len = pos("--seq-len", d.seq_len)?;
    if seq_len < 2 {
        return Err(Error::invalid("--seq-len", "must be at least 2 (one input and one next-token target beside BOS)"));
    }
    Ok(Some(Args {
        method,
        compare,
        device,
        precision,
        tf32,
        blocks: get("--blocks").map_or(Ok(d.blocks), parse_blocks)?,
        projections: get("--projections").map_or(Ok([true; 3]), parse_projections)?,
        plan,
        dims: get("--dims").map(str::to_string),
        steps: at_most("--steps", pos("--steps", d.steps)?, MAX_STEPS)?,
        batch: pos("--batch", d.batch)?,
        seq_len,
        keep,
        formulation: get("--formulation").map_or(Ok(FormulationChoice::FlopModel), |v| {
            FormulationChoice::parse(v).map_err(|_| {
                Error::invalid(
                    "--formulation",
                    format!(
                        "`{}` is not one of flops, measure, merged, transformed",
                        sparsegrad::io::fs::escape(v, 100)
                    ),
                )
            })
        })?,
        lora_rank: get("--lora-rank").map_or(Ok(0), |v| positive("--lora-rank", v))?,
        lr,
        seed: get("--seed").map_or(Ok(0), |v| number("--seed", v, "a whole number"))?,
        model: get("--model").map_or_else(|| asset(DEFAULT_MODEL), PathBuf::from),
        tokenizer: get("--tokenizer").map(PathBuf::from),
        data: get("--data").map_or_else(|| asset(DEFAULT_DATA), PathBuf::from),
        out: PathBuf::from(get("--out").unwrap_or("out")),
        prelim_steps: at_most("--prelim-steps", pos("--prelim-steps", d.prelim_steps)?, MAX_STEPS)?,
        eval_batches: pos("--eval-batches", d.eval_batches)?,
        eval_every: whole("--eval-every", d.eval_every)?,
        validation_fraction,
    }))
}

/// A default asset path: relative to the working directory when it is there, else to the
/// crate root (so `cargo run --example` works from any folder of the checkout).
fn asset(rel: &str) -> PathBuf {
    let here = PathBuf::from(rel);
    let in_crate = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel);
    if !here.exists() && in_crate.exists() {
        in_crate
    } else {
        here
    }
}
