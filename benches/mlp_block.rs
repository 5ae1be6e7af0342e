//! MLP block step (forward + backward with `dx` + optimizer) per training method, on the
//! BERT-base (768 -> 3072 -> 768, GELU) and LLaMA-7B (4096 -> 11008 -> 4096, SwiGLU) MLP
//! shapes, on the CPU and on CUDA: milliseconds per step, peak memory of the block (what
//! the backend's counters saw from building the block to the end of the timed steps:
//! weights, bases, optimizer state, saved activations, workspaces; the caller's x, g, y,
//! dx excluded) and trainable parameters.
//!
//! Variants: Frozen; Full (AdamW); SparseGrad at keep 1% (Exact selection, the formulation
//! `Formulation::choose` picks for the token count; SparseAdam); LoRA with the rank that
//! trains about as many parameters as SparseGrad at 1% (7 on BERT, as in the paper);
//! MeProp at 1%. All projections of a block train by the same method. Bases are Householder
//! reflections `I - 2 v v^T / |v|^2` (dense, orthogonal, cheap to build at any size).
//!
//! Run: `cargo bench --bench mlp_block`. Environment:
//! - `SPARSEGRAD_BENCH_SHAPES`: `bert`, `llama` or `bert,llama` (default);
//! - `SPARSEGRAD_BENCH_TOKENS`: tokens per step on the CPU (default 512);
//! - `SPARSEGRAD_BENCH_CUDA_TOKENS`: tokens per step on CUDA (default 4096);
//! - `SPARSEGRAD_BENCH_ITERS`: timed steps per BERT case on the CPU (default 3; CUDA 10),
//!   `SPARSEGRAD_BENCH_LLAMA_ITERS` per LLaMA case on the CPU (default 1: a LLaMA-7B MLP
//!   step at 512 tokens takes seconds here, and SparseGrad's set-up validates and applies
//!   11008 x 11008 bases);
//! - `SPARSEGRAD_BENCH_VARIANTS`: a comma list of `frozen`, `full`, `sparsegrad`, `lora`,
//!   `meprop` (default: all);
//! - `OPENBLAS_CORETYPE`: set to `SkylakeX` where the CPU has avx512f, else `Haswell`, when
//!   unset (Debian's OpenBLAS does not detect every CPU; it reads the variable at load time,
//!   so the bench re-executes itself with it set).
//!
//! Every timed case first runs one untimed step (workspaces are allocated then). "CPU
//! ms/step" is the process's CPU time (all threads) per timed step, steadier than wall time
//! on shared cores (OpenBLAS threads that spin while waiting count too); the last column is
//! the 1-minute load average after the case.

use sparsegrad::linear::trainable::{Method, TrainOptions};
use sparsegrad::mlp::{BertMlp, BertMlpConfig, LlamaMlp, MlpShape, ProjectionSpec};
#[cfg(feature = "cuda")]
use sparsegrad::Cuda;
use sparsegrad::{AdamParams, Backend, Basis, Cpu, GeluKind, Keep, Optimizer, Precision, Selection};
use std::time::Instant;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Deterministic pseudo-random values in [-1, 1) (no RNG dependency in benches).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A basis checked in O(n^2): Householder reflections (`Basis::reflection`).
fn basis(group: &str, out: usize, inp: usize, seed: u64) -> Basis {
    Basis::reflection(group, out, inp, seed).expect("a Householder reflection is orthogonal")
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Bert,
    Llama,
}

struct Shape {
    kind: Kind,
    name: &'static str,
    hidden: usize,
    ffn: usize,
    /// `(group, out, in, has bias)` per projection.
    layout: Vec<(&'static str, usize, usize, bool)>,
    weights: Vec<Vec<f32>>,
    biases: Vec<Option<Vec<f32>>>,
    /// Built on first use (only SparseGrad needs them).
    bases: std::sync::OnceLock<Vec<Basis>>,
}

impl Shape {
    fn new(kind: Kind) -> Shape {
        let (name, hidden, ffn, layout) = match kind {
            Kind::Bert => (
                "BERT-base 768->3072->768",
                768,
                3072,
                vec![("dense_in", 3072, 768, true), ("dense_out", 768, 3072, true)],
            ),
            Kind::Llama => (
                "LLaMA-7B 4096->11008->4096",
                4096,
                11008,
                vec![("gate", 11008, 4096, false), ("up", 11008, 4096, false), ("down", 4096, 11008, false)],
            ),
        };
        let weights = layout
            .iter()
            .enumerate()
            .map(|(i, &(_, o, n, _))| values(o * n, 10 + i as u64).iter().map(|v| v / (n as f32).sqrt()).collect())
            .collect();
        let biases = layout
            .iter()
            .enumerate()
            .map(|(i, &(_, o, _, b))| b.then(|| values(o, 20 + i as u64).iter().map(|v| 0.1 * v).collect()))
            .collect();
        Shape { kind, name, hidden, ffn, layout, weights, biases, bases: std::sync::OnceLock::new() }
    }

    fn bases(&self) -> &[Basis] {
        self.bases.get_or_init(|| {
            self.layout.iter().enumerate().map(|(i, &(g, o, n, _))| basis(g, o, n, 30 + 2 * i as u64)).collect()
        })
    }

    fn parameters(&self) -> usize {
        self.layout.iter().map(|&(_, o, n, b)| o * n + if b { o } else { 0 }).sum()
    }

    /// SparseGrad's trainable parameters at keep 1% (kept entries + biases).
    fn sparsegrad_parameters(&self) -> usize {
        self.layout
            .iter()
            .map(|&(_, o, n, b)| Keep::Fraction(0.01).resolve(o * n).unwrap() + if b { o } else { 0 })
            .sum()
    }

    /// The LoRA rank that trains about as many parameters as SparseGrad at 1%.
    fn lora_rank(&self) -> usize {
        let per_rank: usize = self.layout.iter().map(|&(_, o, n, _)| o + n).sum();
        ((self.sparsegrad_parameters() as f64 / per_rank as f64).round() as usize).max(1)
    }

    fn variants(&self) -> Vec<(String, Method)> {
        let keep = Keep::Fraction(0.01);
        let r = self.lora_rank();
        vec![
            ("Frozen".into(), Method::Frozen),
            ("Full (AdamW)".into(), Method::Full),
            ("SparseGrad 1%".into(), Method::SparseGrad { keep, selection: Selection::Exact, formulation: None }),
            (format!("LoRA r={r}"), Method::Lora { rank: r, alpha: 2.0 * r as f32 }),
            ("MeProp 1%".into(), Method::MeProp { keep }),
        ]
    }
}

#[allow(clippy::large_enum_variant)]
enum Block<B: Backend + Clone> {
    Bert(BertMlp<B>),
    Llama(LlamaMlp<B>),
}

impl<B: Backend + Clone> Block<B> {
    fn build(be: &B, s: &Shape, method: Method, opts: &TrainOptions) -> Self {
        let bases = matches!(method, Method::SparseGrad { .. }).then(|| s.bases());
        let spec = |i: usize| ProjectionSpec {
            weight: &s.weights[i],
            bias: s.biases[i].as_deref(),
            method,
            group: s.layout[i].0,
            basis: bases.map(|b| &b[i]),
        };
        match s.kind {
            Kind::Bert => Block::Bert(
                BertMlp::new(
                    be,
                    MlpShape { hidden: s.hidden, ffn: s.ffn },
                    [spec(0), spec(1)],
                    BertMlpConfig { gelu: GeluKind::Erf, options: *opts },
                )
                .expect("BertMlp::new"),
            ),
            Kind::Llama => Block::Llama(
                LlamaMlp::new(be, MlpShape { hidden: s.hidden, ffn: s.ffn }, [spec(0), spec(1), spec(2)], opts)
                    .expect("LlamaMlp::new"),
            ),
        }
    }
    fn step(&mut self, x: &B::Buf<f32>, g: &B::Buf<f32>, t: usize, y: &mut B::Buf<f32>, dx: &mut B::Buf<f32>) {
        match self {
            Block::Bert(m) => {
                m.forward(x, t, y).unwrap();
                m.backward(g, t, Some(dx)).unwrap();
                m.step().unwrap();
            }
            Block::Llama(m) => {
                m.forward(x, t, y).unwrap();
                m.backward(g, t, Some(dx)).unwrap();
                m.step().unwrap();
            }
        }
    }
    fn trainable_parameters(&self) -> usize {
        match self {
            Block::Bert(m) => m.trainable_parameters(),
            Block::Llama(m) => m.trainable_parameters(),
        }
    }
}

/// A backend instance of its own per case, so its memory counters see only that case.
trait Fresh: Sized {
    fn fresh() -> Self;
}
impl Fresh for Cpu {
    fn fresh() -> Self {
        Cpu::new()
    }
}
#[cfg(feature = "cuda")]
impl Fresh for Cuda {
    fn fresh() -> Self {
        Cuda::new(0).expect("CUDA device 0")
    }
}

fn header() {
    println!("| shape | variant | tokens | ms/step | CPU ms/step | peak MiB | trainable params | % of MLP | set-up s | load |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
}

/// Builds, warms up and times one case on a fresh backend; prints its table row.
fn bench_case<B: Backend + Clone + Fresh>(s: &Shape, name: &str, method: Method, tokens: usize, iters: usize) {
    let be = B::fresh();
    let opts = TrainOptions {
        optimizer: Optimizer::Adam(AdamParams { lr: 1e-4, ..Default::default() }),
        precision: Precision::Full,
        expected_tokens: tokens,
        seed: 1,
    };
    let x = be.upload(&values(tokens * s.hidden, 5)).unwrap();
    let g = be.upload(&values(tokens * s.hidden, 6).iter().map(|v| v * 1e-3).collect::<Vec<_>>()).unwrap();
    let mut y = be.alloc::<f32>(tokens * s.hidden).unwrap();
    let mut dx = be.alloc::<f32>(tokens * s.hidden).unwrap();
    be.synchronize().unwrap();
    let io = be.memory_stats().current_bytes;
    if matches!(method, Method::SparseGrad { .. }) {
        s.bases(); // host-side Householder bases, outside the set-up time
    }
    let t0 = Instant::now();
    let mut block = Block::build(&be, s, method, &opts);
    block.step(&x, &g, tokens, &mut y, &mut dx);
    be.synchronize().unwrap();
    let setup = t0.elapsed().as_secs_f64();
    let (t1, cpu1) = (Instant::now(), cpu_seconds());
    for _ in 0..iters {
        block.step(&x, &g, tokens, &mut y, &mut dx);
    }
    be.synchronize().unwrap();
    let ms = t1.elapsed().as_secs_f64() * 1e3 / iters.max(1) as f64;
    let cpu_ms = match (cpu1, cpu_seconds()) {
        (Some(a), Some(b)) => format!("{:.0}", (b - a) * 1e3 / iters.max(1) as f64),
        _ => "-".into(),
    };
    let peak = be.memory_stats().peak_bytes.saturating_sub(io) as f64 / (1u64 << 20) as f64;
    let trainable = block.trainable_parameters();
    println!(
        "| {} | {name} | {tokens} | {ms:.1} | {cpu_ms} | {peak:.0} | {trainable} | {:.3}% | {setup:.1} | {} |",
        s.name,
        100.0 * trainable as f64 / s.parameters() as f64,
        load_average()
    );
}

/// CPU seconds (user + system, all threads) this process has used, from /proc/self/stat.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ is 100 on Linux
}

/// The 1-minute load average after the case (other processes share the cores), or `-`.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "-".into())
}

fn bench_shape<B: Backend + Clone + Fresh>(s: &Shape, tokens: usize, iters: usize) {
    let wanted = std::env::var("SPARSEGRAD_BENCH_VARIANTS").unwrap_or_default().to_lowercase();
    let selected = |m: &Method| wanted.is_empty() || wanted.split(',').any(|w| w.trim() == m.name());
    for (name, method) in s.variants().into_iter().filter(|(_, m)| selected(m)) {
        bench_case::<B>(s, &name, method, tokens, iters);
    }
}

/// OpenBLAS picks its kernels when the library loads: set the core type and re-execute.
fn ensure_coretype() {
    if std::env::var_os("OPENBLAS_CORETYPE").is_some() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    let coretype = if std::arch::is_x86_feature_detected!("avx512f") { "SkylakeX" } else { "Haswell" };
    #[cfg(not(target_arch = "x86_64"))]
    let coretype = "ARMV8";
    let exe = std::env::current_exe().expect("current executable");
    match std::process::Command::new(exe).args(std::env::args_os().skip(1)).env("OPENBLAS_CORETYPE", coretype).status()
    {
        Ok(status) => std::process::exit(status.code().unwrap_or(1)),
        Err(e) => eprintln!("could not re-execute with OPENBLAS_CORETYPE={coretype} ({e}); continuing without it"),
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    ensure_coretype();
    let wanted = std::env::var("SPARSEGRAD_BENCH_SHAPES").unwrap_or_else(|_| "bert,llama".into()).to_lowercase();
    let kinds: Vec<Kind> = [("bert", Kind::Bert), ("llama", Kind::Llama)]
        .into_iter()
        .filter(|(n, _)| wanted.split(',').any(|w| w.trim() == *n))
        .map(|(_, k)| k)
        .collect();
    let tokens = env_usize("SPARSEGRAD_BENCH_TOKENS", 512);
    let cuda_tokens = env_usize("SPARSEGRAD_BENCH_CUDA_TOKENS", 4096);
    let iters = env_usize("SPARSEGRAD_BENCH_ITERS", 3);
    let llama_iters = env_usize("SPARSEGRAD_BENCH_LLAMA_ITERS", 1);
    println!("OPENBLAS_CORETYPE={}", std::env::var("OPENBLAS_CORETYPE").unwrap_or_else(|_| "(unset)".into()));
    println!("threads: {}", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let shapes: Vec<Shape> = kinds.iter().map(|&k| Shape::new(k)).collect();
    for s in &shapes {
        println!(
            "{}: {} MLP parameters; SparseGrad 1% trains {}, LoRA rank {} trains {}",
            s.name,
            s.parameters(),
            s.sparsegrad_parameters(),
            s.lora_rank(),
            s.lora_rank() * s.layout.iter().map(|&(_, o, n, _)| o + n).sum::<usize>()
        );
    }
    println!("\nCPU ({} timed steps for BERT, {} for LLaMA, after one untimed step):\n", iters, llama_iters);
    header();
    for s in &shapes {
        bench_shape::<Cpu>(s, tokens, if s.kind == Kind::Llama { llama_iters } else { iters });
    }
    println!();
    #[cfg(not(feature = "cuda"))]
    println!("CUDA: skipped: built without the `cuda` feature");
    #[cfg(feature = "cuda")]
    match Cuda::new(0) {
        Err(e) => println!("CUDA: skipped: no CUDA device ({e})"),
        Ok(cuda) => {
            println!(
                "CUDA {cuda:?} ({} timed steps, after one untimed step):\n",
                env_usize("SPARSEGRAD_BENCH_ITERS", 10)
            );
            drop(cuda);
            header();
            for s in &shapes {
                bench_shape::<Cuda>(s, cuda_tokens, env_usize("SPARSEGRAD_BENCH_ITERS", 10));
            }
        }
    }
}
