//! The whole SparseGrad flow on synthetic data, on the CPU, in a few seconds:
//! gradients -> streaming Gram basis -> SparseGradLinear -> training steps.
//!
//! The task: a linear layer `W0` (768 -> 3072 by default, the BERT-base up-projection)
//! must learn `W* = W0 + U V^T`, a low-rank change, from random inputs. The gradients of
//! such a task share a low-rank subspace, which is what SparseGrad's basis exploits.
//!
//! Run: `cargo run --release --example synthetic_sparsegrad [-- --out 3072 --in 768 --steps 30]`

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sparsegrad::backend::{DenseOps, Gemm};
use sparsegrad::basis::sparsity_report;
use sparsegrad::{
    AdamParams, Backend, Cpu, GramAccumulator, Keep, Optimizer, Selection, SparseGradConfig, SparseGradLinear,
};
use std::time::Instant;

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() -> sparsegrad::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (out, inp) = (arg(&args, "--out", 3072), arg(&args, "--in", 768));
    let (tokens, steps, prelim, rank) =
        (arg(&args, "--tokens", 512), arg(&args, "--steps", 30), arg(&args, "--prelim", 8), 8);
    let mut rng = SmallRng::seed_from_u64(0);
    let mut randn = |n: usize, scale: f32| -> Vec<f32> { (0..n).map(|_| rng.random_range(-scale..scale)).collect() };
    let w0 = randn(out * inp, 0.02);
    let (u, v) = (randn(out * rank, 0.3), randn(inp * rank, 0.3));
    let cpu = Cpu::new();
    // Target W* = W0 + U V^T.
    let mut w_star = cpu.upload(&w0)?;
    cpu.gemm(&Gemm::nt(out, inp, rank).beta(1.0), &cpu.upload(&u)?, &cpu.upload(&v)?, &mut w_star)?;
    let batches: Vec<Vec<f32>> = (0..steps.max(prelim) + 1).map(|_| randn(tokens * inp, 1.0)).collect();
    let w0_buf = cpu.upload(&w0)?;
    let mut y = cpu.alloc::<f32>(tokens * out)?;
    let mut y_star = cpu.alloc::<f32>(tokens * out)?;

    // Preliminary phase: dense gradients of the untrained layer, streamed into Grams.
    let t0 = Instant::now();
    let mut acc = GramAccumulator::new(out, inp);
    let mut prelim_grads = Vec::new();
    let mut dw = cpu.alloc::<f32>(out * inp)?;
    for x in batches.iter().take(prelim) {
        let xb = cpu.upload(x)?;
        cpu.gemm(&Gemm::nt(tokens, out, inp), &xb, &w0_buf, &mut y)?;
        cpu.gemm(&Gemm::nt(tokens, out, inp), &xb, &w_star, &mut y_star)?;
        cpu.axpy(-1.0, &y_star, &mut y, tokens * out)?;
        cpu.gemm(&Gemm::tn(out, inp, tokens).alpha(1.0 / tokens as f32), &y, &xb, &mut dw)?;
        acc.add(&dw)?;
        prelim_grads.extend_from_slice(&dw);
    }
    let basis = acc.basis("up_proj")?;
    println!("basis from {prelim} gradients of {out}x{inp} in {:.2} s", t0.elapsed().as_secs_f64());
    let k = Keep::Fraction(0.01).resolve(out * inp)?;
    let report = sparsity_report(&prelim_grads, prelim, &basis, k)?;
    println!(
        "top-1% entries hold {:.1}% of the gradient's squared norm in the original space, {:.1}% in the SparseGrad basis",
        100.0 * report.original_fraction,
        100.0 * report.transformed_fraction
    );

    let cfg = SparseGradConfig {
        keep: Keep::Count(k),
        selection: Selection::Exact,
        optimizer: Optimizer::Adam(AdamParams { lr: 2e-3, ..Default::default() }),
        expected_tokens: tokens,
        ..Default::default()
    };
    let mut layer = SparseGradLinear::new(&cpu, &w0, None, &basis, cfg)?;
    println!(
        "SparseGradLinear {out}x{inp}: {:?} formulation, k = {k} ({} trainable entries)",
        layer.formulation(),
        layer.trainable_parameters()
    );
    let mut g = cpu.alloc::<f32>(tokens * out)?;
    let t1 = Instant::now();
    for (step, x) in batches.iter().skip(1).take(steps).enumerate() {
        let xb = cpu.upload(x)?;
        layer.forward(&xb, tokens, &mut y)?;
        cpu.gemm(&Gemm::nt(tokens, out, inp), &xb, &w_star, &mut y_star)?;
        // L = 0.5 |y - y*|^2 / T, g = (y - y*) / T
        cpu.copy(&y, &mut g, tokens * out)?;
        cpu.axpy(-1.0, &y_star, &mut g, tokens * out)?;
        let loss: f64 = g.iter().map(|&d| 0.5 * (d as f64) * (d as f64)).sum::<f64>() / tokens as f64;
        g.iter_mut().for_each(|d| *d /= tokens as f32);
        layer.backward(&g, tokens, None)?;
        layer.step()?;
        if step % 5 == 0 || step + 1 == steps {
            println!("step {step:3}  loss {loss:.5}");
        }
    }
    println!(
        "{steps} steps in {:.2} s ({:.1} ms/step)",
        t1.elapsed().as_secs_f64(),
        1e3 * t1.elapsed().as_secs_f64() / steps.max(1) as f64
    );
    let merged = layer.merged_weight()?;
    println!("merged weight: {} values, ready to load into any framework", merged.len());
    Ok(())
}
