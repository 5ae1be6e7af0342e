//! CPU layer step (forward + backward + optimizer): SparseGradLinear in both formulations,
//! Exact and SparseByDense, against a dense linear step with AdamW and against the flop
//! count at this machine's measured sgemm rate.
//!
//! Run: `OPENBLAS_CORETYPE=Haswell cargo bench --bench cpu_layer` (SkylakeX where the CPU
//! has avx512f: Debian's OpenBLAS does not detect this CPU and falls back to generic
//! kernels otherwise). `SPARSEGRAD_BENCH_TOKENS` overrides T (default 4096),
//! `SPARSEGRAD_BENCH_ITERS` the timed steps per case (default 3).
//!
//! Inputs: random x, random g with 25% of token rows zero (padding), keep = 1%.

use sparsegrad::linear::dense::{DenseLinear, DenseMode};
use sparsegrad::linear::Precision;
use sparsegrad::{AdamParams, Backend, Basis, Cpu, Formulation, Gemm, Keep, Optimizer, Selection, SparseGradConfig, SparseGradLinear};
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

/// An orthogonal basis cheap to build at any size: Householder reflections
/// `I - 2 v v^T / |v|^2`, which are dense and exactly orthogonal up to rounding.
fn householder(n: usize, seed: u64) -> Vec<f32> {
    let v: Vec<f64> = values(n, seed).into_iter().map(|x| x as f64).collect();
    let norm2: f64 = v.iter().map(|x| x * x).sum();
    let mut m = vec![0.0f32; n * n];
    for i in 0..n {
        for j in 0..n {
            m[i * n + j] = ((if i == j { 1.0 } else { 0.0 }) - 2.0 * v[i] * v[j] / norm2) as f32;
        }
    }
    m
}

fn sgemm_rate(cpu: &Cpu) -> f64 {
    let n = 2048;
    let a = cpu.upload(&values(n * n, 1)).unwrap();
    let b = cpu.upload(&values(n * n, 2)).unwrap();
    let mut c = cpu.alloc::<f32>(n * n).unwrap();
    cpu.gemm(&Gemm::nn(n, n, n), &a, &b, &mut c).unwrap();
    let t = Instant::now();
    let reps = 3;
    for _ in 0..reps {
        cpu.gemm(&Gemm::nn(n, n, n), &a, &b, &mut c).unwrap();
    }
    2.0 * (n as f64).powi(3) * reps as f64 / t.elapsed().as_secs_f64()
}

fn time_steps(iters: usize, mut step: impl FnMut()) -> f64 {
    step(); // warm-up: workspaces are allocated on the first step
    let t = Instant::now();
    for _ in 0..iters {
        step();
    }
    t.elapsed().as_secs_f64() / iters as f64
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let cpu = Cpu::new();
    let tokens = env_usize("SPARSEGRAD_BENCH_TOKENS", 4096);
    let iters = env_usize("SPARSEGRAD_BENCH_ITERS", 3);
    let rate = sgemm_rate(&cpu);
    println!("OPENBLAS_CORETYPE={}", std::env::var("OPENBLAS_CORETYPE").unwrap_or_else(|_| "(unset)".into()));
    println!("measured sgemm rate (2048^3): {:.1} GFLOP/s; T = {tokens}, {iters} timed steps per case", rate / 1e9);
    println!("{:<22} {:<34} {:>10} {:>9} {:>12} {:>9}", "shape", "variant", "ms/step", "vs dense", "flop-model ms", "vs model");
    let adam = AdamParams { lr: 1e-4, ..Default::default() };
    for (name, out, inp) in [("BERT up 768->3072", 3072usize, 768usize), ("BERT down 3072->768", 768, 3072), ("SmolLM2 up 576->1536", 1536, 576)] {
        let w = values(out * inp, 3);
        let bias = values(out, 4);
        let x = cpu.upload(&values(tokens * inp, 5)).unwrap();
        let mut g_host = values(tokens * out, 6);
        for r in (0..tokens).filter(|r| r % 4 == 3) {
            g_host[r * out..(r + 1) * out].fill(0.0);
        }
        let g = cpu.upload(&g_host).unwrap();
        let mut y = cpu.alloc::<f32>(tokens * out).unwrap();
        let mut dx = cpu.alloc::<f32>(tokens * inp).unwrap();
        let dense_flops = 3.0 * 2.0 * tokens as f64 * out as f64 * inp as f64;
        let mut dense = DenseLinear::new(&cpu, &w, Some(&bias), out, inp, DenseMode::Full, Optimizer::Adam(adam), Precision::Full).unwrap();
        let dense_s = time_steps(iters, || {
            dense.forward(&x, tokens, &mut y).unwrap();
            dense.backward(&g, tokens, Some(&mut dx)).unwrap();
            dense.step().unwrap();
        });
        let report = |variant: &str, secs: f64, flops: f64| {
            let model = flops / rate;
            println!("{name:<22} {variant:<34} {:>10.1} {:>8.2}x {:>12.1} {:>8.2}x", secs * 1e3, secs / dense_s, model * 1e3, secs / model);
        };
        report("dense + AdamW", dense_s, dense_flops);
        let basis = Basis::from_parts("bench", out, inp, householder(out, 7), householder(inp, 8), vec![1.0; out], vec![1.0; inp], 1).unwrap();
        let k = Keep::Fraction(0.01).resolve(out * inp).unwrap();
        for form in [Formulation::Transformed, Formulation::Merged] {
            for sel in [Selection::Exact, Selection::SparseByDense { threshold: 0.0 }] {
                let cfg = SparseGradConfig { keep: Keep::Count(k), selection: sel, formulation: Some(form), expected_tokens: tokens, optimizer: Optimizer::Adam(adam), precision: Precision::Full };
                let mut layer = SparseGradLinear::new(&cpu, &w, Some(&bias), &basis, cfg).unwrap();
                let secs = time_steps(iters, || {
                    layer.forward(&x, tokens, &mut y).unwrap();
                    layer.backward(&g, tokens, Some(&mut dx)).unwrap();
                    layer.step().unwrap();
                });
                let (transformed_extra, merged_extra) = Formulation::extra_flops(out, inp, tokens, k);
                let rows = layer.last_stats().rows_multiplied as f64;
                // The weight-gradient GEMM shrinks with the rows SparseByDense keeps.
                let dw_flops = 2.0 * rows * out as f64 * inp as f64;
                let flops = 2.0 * 2.0 * tokens as f64 * out as f64 * inp as f64 + dw_flops + if form == Formulation::Merged { merged_extra } else { transformed_extra };
                let chosen = if Formulation::choose(out, inp, tokens, k) == form { " (default)" } else { "" };
                report(&format!("SparseGrad {form:?} {}{chosen}", if sel == Selection::Exact { "Exact" } else { "SD(0)" }), secs, flops);
            }
        }
    }
}
