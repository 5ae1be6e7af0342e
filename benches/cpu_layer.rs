//! CPU layer step (forward + backward + optimizer): SparseGradLinear in both formulations,
//! Exact and SparseByDense, against a dense linear step with AdamW and against the flop
//! count at this machine's measured sgemm rate.
//!
//! Run: `OPENBLAS_CORETYPE=Haswell cargo bench --bench cpu_layer` (SkylakeX where the CPU
//! has avx512f: Debian's OpenBLAS does not detect this CPU and falls back to generic
//! kernels otherwise). `SPARSEGRAD_BENCH_TOKENS` overrides T (default 4096),
//! `SPARSEGRAD_BENCH_ITERS` the timed steps per case (default 3), `SPARSEGRAD_BENCH_SHAPES`
//! a comma-separated subset of the shape names' first words joined by '-' (`bert-up`,
//! `bert-down`, `smollm2-up`, `llama-7b`; default all but `llama-7b`), as the peer harness
//! uses. `llama-7b` (the LLaMA-7B up-projection 4096->11008) is opt-in: at T = 4096 one
//! of its steps is 1-3 TFLOP, minutes per case on a small CPU.
//!
//! Inputs: random x, random g with 25% of token rows zero (padding), keep = 1%.

mod layer_common;

use layer_common::*;
use sparsegrad::{Cpu, Precision};

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let cpu = Cpu::new();
    let tokens = env_usize("SPARSEGRAD_BENCH_TOKENS", 4096);
    let iters = env_usize("SPARSEGRAD_BENCH_ITERS", 3);
    let rate = gemm_rate(&cpu, 2048, false);
    println!("OPENBLAS_CORETYPE={}", std::env::var("OPENBLAS_CORETYPE").unwrap_or_else(|_| "(unset)".into()));
    println!("measured sgemm rate (2048^3): {:.1} GFLOP/s; T = {tokens}, {iters} timed steps per case", rate / 1e9);
    let only = std::env::var("SPARSEGRAD_BENCH_SHAPES").ok();
    header();
    for (key, name, out, inp) in [
        ("bert-up", "BERT up 768->3072", 3072usize, 768usize),
        ("bert-down", "BERT down 3072->768", 768, 3072),
        ("smollm2-up", "SmolLM2 up 576->1536", 1536, 576),
        ("llama-7b", "LLaMA-7B up 4096->11008", 11008, 4096),
    ] {
        let picked = match only.as_deref() {
            Some(o) => o.split(',').any(|k| k.trim() == key),
            None => key != "llama-7b",
        };
        if !picked {
            continue;
        }
        bench_shape(&cpu, name, out, inp, tokens, iters, Precision::Full, rate);
    }
}
