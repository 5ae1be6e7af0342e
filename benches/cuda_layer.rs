//! CUDA layer step (forward + backward + optimizer), f32 and bf16: SparseGradLinear in
//! both formulations, Exact and SparseByDense, against a dense linear step (cuBLAS GEMMs
//! and AdamW) on BERT-base and LLaMA-2-7B MLP shapes at T = 4096, with a flop model at the
//! cuBLAS rate measured in the same run.
//!
//! Run on a GPU machine: `cargo bench --bench cuda_layer` (or through
//! `scripts/gpu-check.sh`). Prints `skipped: no CUDA device` and exits 0 without one.
//! `SPARSEGRAD_BENCH_TOKENS`, `SPARSEGRAD_BENCH_ITERS` as in the CPU bench.

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
    for precision in [Precision::Full, Precision::Bf16] {
        let rate = gemm_rate(&cuda, 8192, precision == Precision::Bf16);
        println!(
            "cuBLAS {} rate (8192^3): {:.1} TFLOP/s; T = {tokens}, {iters} timed steps per case",
            if precision == Precision::Bf16 { "bf16" } else { "f32" },
            rate / 1e12
        );
        for (name, out, inp) in [
            ("BERT up 768->3072", 3072usize, 768usize),
            ("BERT down 3072->768", 768, 3072),
            ("LLaMA up 4096->11008", 11008, 4096),
            ("LLaMA down 11008->4096", 4096, 11008),
        ] {
            bench_shape(&cuda, name, out, inp, tokens, iters, precision, rate);
        }
    }
}
