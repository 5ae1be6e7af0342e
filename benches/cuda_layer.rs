//! CUDA layer step (forward + backward + optimizer), f32 and bf16: SparseGradLinear in
//! both formulations, Exact and SparseByDense, against a dense linear step (cuBLAS GEMMs
//! and AdamW) on BERT-base and LLaMA-2-7B MLP shapes at T = 4096, with a flop model at the
//! cuBLAS rate measured in the same run.
//!
//! Run on a GPU machine: `cargo bench --bench cuda_layer` (or through
//! `scripts/gpu-check.sh`). Prints `skipped: no CUDA device` and exits 0 without one.
//! `SPARSEGRAD_BENCH_TOKENS`, `SPARSEGRAD_BENCH_ITERS` as in the CPU bench.
//! `SPARSEGRAD_BENCH_SHAPES` (a comma list of `bert-up`, `bert-down`, `llama-up`,
//! `llama-down`; default all) picks the shapes; `SPARSEGRAD_BENCH_TINY=1` runs one 48->96 shape
//! and a 128^3 rate instead (the emulator rehearsal of scripts/gpu-run.sh: not GPU results).

mod layer_common;

use layer_common::*;
use sparsegrad::{Cuda, Precision};

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let cuda = match Cuda::new(0) {
        Ok(c) => c,
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            return;
        }
    };
    let tokens = env_usize("SPARSEGRAD_BENCH_TOKENS", 4096);
    let iters = env_usize("SPARSEGRAD_BENCH_ITERS", 5);
    println!("device: {}", cuda.device_name());
    header();
    let tiny = std::env::var("SPARSEGRAD_BENCH_TINY").as_deref() == Ok("1");
    let n = if tiny { 128 } else { 8192 };
    let all = [
        ("bert-up", "BERT up 768->3072", 3072usize, 768usize),
        ("bert-down", "BERT down 3072->768", 768, 3072),
        ("llama-up", "LLaMA up 4096->11008", 11008, 4096),
        ("llama-down", "LLaMA down 11008->4096", 4096, 11008),
    ];
    let wanted = std::env::var("SPARSEGRAD_BENCH_SHAPES").ok();
    let shapes: Vec<(&str, usize, usize)> = if tiny {
        println!("SPARSEGRAD_BENCH_TINY=1: a rehearsal shape, not BERT or LLaMA");
        vec![("tiny up 48->96", 96, 48)]
    } else {
        all.iter()
            .filter(|(key, ..)| wanted.as_deref().is_none_or(|w| w.split(',').any(|k| k.trim() == *key)))
            .map(|&(_, name, out, inp)| (name, out, inp))
            .collect()
    };
    for precision in [Precision::Full, Precision::Bf16] {
        let rate = gemm_rate(&cuda, n, precision == Precision::Bf16);
        println!(
            "cuBLAS {} rate ({n}^3): {:.1} TFLOP/s; T = {tokens}, {iters} timed steps per case",
            if precision == Precision::Bf16 { "bf16" } else { "f32" },
            rate / 1e12
        );
        for &(name, out, inp) in &shapes {
            bench_shape(&cuda, name, out, inp, tokens, iters, precision, rate);
        }
    }
}
