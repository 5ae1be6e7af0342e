//! Command line of the `gpu_shape` example (hand-rolled, one `error:` line per mistake, like
//! the other examples).

use sparsegrad::{Error, Formulation, Precision, Result};
use std::path::PathBuf;

pub const HELP: &str = "\
gpu_shape: the GPU shape of a LLaMA training step, on a GPU or on the CPU emulation of CUDA

Runs training steps of a LLaMA model with random weights of the named dimensions on the CUDA
backend and prints, per step: kernel launches, cuBLAS calls by compute type, host-blocking
syncs, bytes copied each way, allocations, peak device bytes, and the roofline model's
predicted H100 SXM and H200 time by category against the step's floor. On the emulated
device it runs a few layers at the real batch and head structure with two short sequence
lengths and scales the counts and costs to the full model at its real sequence length; on a
GPU it runs the real sequence length and prints measured times (CUDA events) beside the
prediction. Every figure is labelled emulated, predicted or GPU.

usage: cargo run --release --example gpu_shape -- [flags]

  --dims NAME          smollm2-135m, llama2-7b or llama3-8b (default llama2-7b)
  --method M           sparsegrad, lora, meprop or full (default sparsegrad)
  --dtype D            f32 or bf16 (frozen operands in bf16) (default bf16)
  --tf32               f32 GEMMs on TF32 tensor cores (CUBLAS_COMPUTE_32F_FAST_TF32); without
                       it f32 GEMMs are exact f32 on FP32 cores (as PyTorch's default)
  --formulation F      SparseGrad's formulation: auto (priced for the target's tokens at the
                       precision's rates on the GPU model), merged or transformed (default auto)
  --blocks B           trained blocks of the full model: a list (0,3,6), everyN (every N-th
                       from block N-1, the llama_mlp_finetune example's), everyN+S (every N-th
                       from block S) or all. Default: every3+0 (0, 3, ..., the paper's) for
                       the LLaMA dims, every3 (the example's CUDA default) for smollm2-135m
  --projections P      which projections of a trained block train: any of gate,up,down
                       (default gate,up,down)
  --batch N            sentences per step (default 32)
  --seq N              the target sequence length (default 128)
  --keep F             SparseGrad / MeProp entries kept per step (default 0.01); LoRA gets
                       the rank with as many parameters
  --layers N           layers to run (default: the shortest prefix of the model holding every
                       kind of layer the plan has); `all` runs the whole model
  --run-seqs S1,S2     the two sequence lengths run on the emulated device (default 2,4);
                       on a GPU the target length is run
  --steps N            the first step, at the longest length, is a warm-up (it allocates);
                       then N - 1 measured steps at each length (default 2)
  --json PATH          also write every figure as JSON (a regular file; replaced)
  --layer-calls        also list the busiest layer's launches and cuBLAS calls by phase and
                       name, in step order (where a per-layer count comes from)
  --seed N             weights and tokens (default 0)

With SG_EMU_PROFILE set (the emulated device writes its own counts there), the command
checks its ledger against the emulator's, event by event, and fails on any difference.";

#[derive(Clone, Debug)]
pub struct Args {
    pub dims: String,
    pub method: String,
    pub precision: Precision,
    pub tf32: bool,
    /// `None`: priced by the layer.
    pub formulation: Option<Formulation>,
    pub blocks: Option<String>,
    pub projections: [bool; 3],
    pub batch: usize,
    pub seq: usize,
    pub keep: f64,
    pub layers: Option<Option<usize>>,
    pub run_seqs: Option<(usize, usize)>,
    pub steps: usize,
    pub json: Option<PathBuf>,
    pub seed: u64,
    pub layer_calls: bool,
}

fn number<T: std::str::FromStr>(flag: &'static str, v: &str) -> Result<T> {
    v.parse().map_err(|_| Error::invalid(flag, format!("`{v}` is not a valid number")))
}

fn positive(flag: &'static str, v: &str) -> Result<usize> {
    let n: usize = number(flag, v)?;
    if n == 0 {
        return Err(Error::invalid(flag, "must be at least 1"));
    }
    Ok(n)
}

/// Resolves `--blocks` for a model of `layers` layers.
pub fn resolve_blocks(spec: &str, layers: usize) -> Result<Vec<usize>> {
    const FLAG: &str = "--blocks";
    let v: Vec<usize> = if spec == "all" {
        (0..layers).collect()
    } else if let Some(rest) = spec.strip_prefix("every") {
        let (n, start) = match rest.split_once('+') {
            Some((n, s)) => (positive(FLAG, n)?, number::<usize>(FLAG, s)?),
            None => {
                let n = positive(FLAG, rest)?;
                (n, n - 1)
            }
        };
        (start..layers).step_by(n).collect()
    } else {
        let mut list = Vec::new();
        for part in spec.split(',') {
            let b: usize = number(FLAG, part)?;
            if list.contains(&b) {
                return Err(Error::invalid(FLAG, format!("block {b} is listed twice")));
            }
            list.push(b);
        }
        list.sort_unstable();
        list
    };
    if let Some(b) = v.iter().find(|&&b| b >= layers) {
        return Err(Error::invalid(FLAG, format!("block {b} does not exist: the model has {layers} blocks")));
    }
    if v.is_empty() {
        return Err(Error::invalid(FLAG, format!("`{spec}` selects no block of the model's {layers}")));
    }
    Ok(v)
}

/// `Ok(None)`: `--help`.
pub fn parse(argv: &[String]) -> Result<Option<Args>> {
    if argv.iter().any(|a| a == "-h" || a == "--help") {
        return Ok(None);
    }
    let mut a = Args {
        dims: "llama2-7b".into(),
        method: "sparsegrad".into(),
        precision: Precision::Bf16,
        tf32: false,
        formulation: None,
        blocks: None,
        projections: [true; 3],
        batch: 32,
        seq: 128,
        keep: 0.01,
        layers: None,
        run_seqs: None,
        steps: 2,
        json: None,
        seed: 0,
        layer_calls: false,
    };
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        if flag == "--tf32" {
            a.tf32 = true;
            continue;
        }
        if flag == "--layer-calls" {
            a.layer_calls = true;
            continue;
        }
        let name: &'static str = match flag.as_str() {
            "--dims" => "--dims",
            "--method" => "--method",
            "--dtype" => "--dtype",
            "--formulation" => "--formulation",
            "--blocks" => "--blocks",
            "--projections" => "--projections",
            "--batch" => "--batch",
            "--seq" => "--seq",
            "--keep" => "--keep",
            "--layers" => "--layers",
            "--run-seqs" => "--run-seqs",
            "--steps" => "--steps",
            "--json" => "--json",
            "--seed" => "--seed",
            other => return Err(Error::invalid("command line", format!("unknown flag `{other}` (see --help)"))),
        };
        let v = it.next().ok_or_else(|| Error::invalid(name, "needs a value"))?;
        match name {
            "--dims" => a.dims = v.clone(),
            "--method" => {
                if !["sparsegrad", "lora", "meprop", "full"].contains(&v.as_str()) {
                    return Err(Error::invalid(name, format!("`{v}` is not one of sparsegrad, lora, meprop, full")));
                }
                a.method = v.clone();
            }
            "--dtype" => {
                a.precision = match v.as_str() {
                    "f32" => Precision::Full,
                    "bf16" => Precision::Bf16,
                    _ => return Err(Error::invalid(name, format!("`{v}` is not f32 or bf16"))),
                }
            }
            "--formulation" => {
                a.formulation = match v.as_str() {
                    "auto" => None,
                    "merged" => Some(Formulation::Merged),
                    "transformed" => Some(Formulation::Transformed),
                    _ => return Err(Error::invalid(name, format!("`{v}` is not auto, merged or transformed"))),
                }
            }
            "--blocks" => a.blocks = Some(v.clone()),
            "--projections" => {
                let mut p = [false; 3];
                for part in v.split(',') {
                    let j = ["gate", "up", "down"]
                        .iter()
                        .position(|&n| n == part)
                        .ok_or_else(|| Error::invalid(name, format!("`{part}` is not one of gate, up, down")))?;
                    p[j] = true;
                }
                a.projections = p;
            }
            "--batch" => a.batch = positive(name, v)?,
            "--seq" => a.seq = positive(name, v)?,
            "--keep" => {
                let k: f64 = number(name, v)?;
                if !(k > 0.0 && k <= 1.0) {
                    return Err(Error::invalid(name, format!("{k} is outside (0, 1]")));
                }
                a.keep = k;
            }
            "--layers" => a.layers = Some(if v == "all" { None } else { Some(positive(name, v)?) }),
            "--run-seqs" => {
                let (s1, s2) = v
                    .split_once(',')
                    .ok_or_else(|| Error::invalid(name, format!("`{v}`: expected two lengths, e.g. 2,4")))?;
                let (s1, s2) = (positive(name, s1)?, positive(name, s2)?);
                if s1 >= s2 {
                    return Err(Error::invalid(name, format!("`{v}`: the first length must be the shorter")));
                }
                a.run_seqs = Some((s1, s2));
            }
            "--steps" => {
                a.steps = positive(name, v)?;
                if a.steps < 2 {
                    return Err(Error::invalid(name, "needs at least 2 (a warm-up and a measured step)"));
                }
            }
            "--json" => a.json = Some(PathBuf::from(v)),
            "--seed" => a.seed = number(name, v)?,
            _ => unreachable!("every flag name is matched above"),
        }
    }
    Ok(Some(a))
}
