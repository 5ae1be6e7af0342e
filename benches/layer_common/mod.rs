//! The layer-step benchmark shared by the CPU and CUDA benches: a dense linear step
//! (forward, backward, AdamW) against SparseGradLinear in both formulations, Exact and
//! SparseByDense, with a flop model at a measured GEMM rate. `SPARSEGRAD_BENCH_VARIANTS`
//! (a comma list of `transformed-exact`, `transformed-sd`, `merged-exact`, `merged-sd`;
//! default all) picks the SparseGrad rows; the dense row, their yardstick, always runs.
//! After each f32 shape, `Formulation::measure`'s pick is printed beside the flop model's
//! (`SPARSEGRAD_BENCH_MEASURE=0` skips that calibration).
#![allow(dead_code)]

use sparsegrad::backend::Gemm;
use sparsegrad::linear::dense::{DenseConfig, DenseLinear, DenseMode};
use sparsegrad::linear::LayerWeights;
use sparsegrad::{
    AdamParams, Backend, Basis, Formulation, Keep, Optimizer, Precision, Selection, SparseGradConfig, SparseGradLinear,
};
use std::time::Instant;

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Deterministic pseudo-random values in [-1, 1) (no RNG dependency in benches).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
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

/// FLOP/s of an `n^3` GEMM on `be` (bf16 operands when `bf16`): the best of 5 timed
/// calls after 2 warm-ups, the rate this machine reaches. (A mean of 3 calls right after
/// start-up ranged from 246 to 429 GFLOP/s between runs on one 2-core host.)
pub fn gemm_rate<B: Backend>(be: &B, n: usize, bf16: bool) -> f64 {
    let spec = Gemm::nn(n, n, n);
    let mut c = be.alloc::<f32>(n * n).unwrap();
    let best = |call: &mut dyn FnMut()| {
        for _ in 0..2 {
            call();
        }
        be.synchronize().unwrap();
        (0..5)
            .map(|_| {
                let t = Instant::now();
                call();
                be.synchronize().unwrap();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let secs = if bf16 {
        let a = be.upload(&values(n * n, 1).into_iter().map(half::bf16::from_f32).collect::<Vec<_>>()).unwrap();
        best(&mut || be.gemm_bf16(&spec, &a, &a, &mut c).unwrap())
    } else {
        let a = be.upload(&values(n * n, 1)).unwrap();
        best(&mut || be.gemm(&spec, &a, &a, &mut c).unwrap())
    };
    2.0 * (n as f64).powi(3) / secs
}

fn time_steps<B: Backend>(be: &B, iters: usize, mut step: impl FnMut()) -> f64 {
    step(); // warm-up: workspaces are allocated on the first step
    be.synchronize().unwrap();
    let t = Instant::now();
    for _ in 0..iters {
        step();
    }
    be.synchronize().unwrap();
    t.elapsed().as_secs_f64() / iters as f64
}

/// Seconds of one f32 GEMM `spec` alone on `be` (best of 3 after a warm-up), cached per
/// spec: the GEMM-time model sums these over a step's GEMMs.
fn gemm_seconds<B: Backend>(be: &B, spec: &Gemm, cache: &mut Vec<(Gemm, f64)>) -> f64 {
    if let Some(&(_, s)) = cache.iter().find(|(g, _)| g == spec) {
        return s;
    }
    let a = be.upload(&values(spec.m * spec.k, 11)).unwrap();
    let b = be.upload(&values(spec.k * spec.n, 12)).unwrap();
    let mut c = be.upload(&values(spec.m * spec.n, 13)).unwrap();
    be.gemm(spec, &a, &b, &mut c).unwrap();
    be.synchronize().unwrap();
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        be.gemm(spec, &a, &b, &mut c).unwrap();
        be.synchronize().unwrap();
        best = best.min(t.elapsed().as_secs_f64());
    }
    cache.push((*spec, best));
    best
}

/// The GEMMs of one layer step, as the layer runs them: `None` for dense, else the
/// formulation with the token rows and output columns the weight-gradient product used.
fn step_gemms(
    out: usize,
    inp: usize,
    tokens: usize,
    k: usize,
    sparse: Option<(Formulation, usize, usize)>,
) -> Vec<Gemm> {
    let (t, o, i) = (tokens, out, inp);
    let Some((form, rows, cols)) = sparse else {
        return vec![Gemm::nt(t, o, i), Gemm::nn(t, i, o), Gemm::tn(o, i, t)];
    };
    let update = if Formulation::merged_update_by_columns(o, i, k) {
        Gemm::nt(o, i, i).beta(1.0)
    } else {
        Gemm::new(true, true, o, i, o.min(k)).beta(1.0)
    };
    match form {
        Formulation::Transformed => vec![
            Gemm::nn(t, i, i),
            Gemm::nt(t, o, i),
            Gemm::nt(t, o, o),
            Gemm::nn(t, o, o),
            Gemm::nn(t, i, o),
            Gemm::nt(t, i, i),
            Gemm::tn(cols, i, rows),
        ],
        Formulation::Merged if rows == t && Formulation::merged_token_order(o, i, t) => {
            vec![Gemm::nt(t, o, i), Gemm::nn(t, i, o), Gemm::nt(t, o, o), Gemm::nn(t, i, i), Gemm::tn(o, i, t), update]
        }
        Formulation::Merged => {
            vec![
                Gemm::nt(t, o, i),
                Gemm::nn(t, i, o),
                Gemm::tn(o, i, rows),
                Gemm::nn(o, i, o),
                Gemm::nn(o, i, i),
                update,
            ]
        }
    }
}

/// One shape: dense + AdamW, then every SparseGrad variant; prints a table row each.
#[allow(clippy::too_many_arguments)]
pub fn bench_shape<B: Backend + Clone>(
    be: &B,
    name: &str,
    out: usize,
    inp: usize,
    tokens: usize,
    iters: usize,
    precision: Precision,
    rate: f64,
) {
    let adam = AdamParams { lr: 1e-4, ..Default::default() };
    let w = values(out * inp, 3);
    let bias = values(out, 4);
    let x = be.upload(&values(tokens * inp, 5)).unwrap();
    let mut g_host = values(tokens * out, 6);
    for r in (0..tokens).filter(|r| r % 4 == 3) {
        g_host[r * out..(r + 1) * out].fill(0.0);
    }
    let g = be.upload(&g_host).unwrap();
    let mut y = be.alloc::<f32>(tokens * out).unwrap();
    let mut dx = be.alloc::<f32>(tokens * inp).unwrap();
    let dense_flops = 3.0 * 2.0 * tokens as f64 * out as f64 * inp as f64;
    let dense_s = {
        let config = DenseConfig { mode: DenseMode::Full, optimizer: Optimizer::Adam(adam), precision };
        let weights = LayerWeights::new(&w, out, inp).with_bias(Some(&bias));
        let mut dense = DenseLinear::new(be, weights, config).unwrap();
        time_steps(be, iters, || {
            dense.forward(&x, tokens, &mut y).unwrap();
            dense.backward(&g, tokens, Some(&mut dx)).unwrap();
            dense.step().unwrap();
        })
    };
    let mut cache = Vec::new();
    // The GEMM-time model: f32 only (the bf16 steps mix operand precisions per GEMM).
    let mut gemm_model = |gemms: Vec<Gemm>| -> Option<f64> {
        (precision == Precision::Full).then(|| gemms.iter().map(|g| gemm_seconds(be, g, &mut cache)).sum())
    };
    let report = |variant: &str, secs: f64, flops: f64, gemms: Option<f64>| {
        let model = flops / rate;
        let gemm_cols = gemms
            .map_or_else(|| format!("{:>10} {:>9}", "-", "-"), |g| format!("{:>10.2} {:>8.2}x", g * 1e3, secs / g));
        println!(
            "{name:<22} {:<5} {variant:<38} {:>10.2} {:>8.2}x {:>13.2} {:>8.2}x {gemm_cols}",
            format!("{precision:?}"),
            secs * 1e3,
            secs / dense_s,
            model * 1e3,
            secs / model
        );
    };
    report("dense + AdamW", dense_s, dense_flops, gemm_model(step_gemms(out, inp, tokens, 0, None)));
    let basis = Basis::reflection("bench", out, inp, 7).unwrap();
    let k = Keep::Fraction(0.01).resolve(out * inp).unwrap();
    let wanted = std::env::var("SPARSEGRAD_BENCH_VARIANTS").ok();
    for form in [Formulation::Transformed, Formulation::Merged] {
        for sel in [Selection::Exact, Selection::SparseByDense { threshold: 0.0 }] {
            let key = format!(
                "{}-{}",
                if form == Formulation::Merged { "merged" } else { "transformed" },
                if sel == Selection::Exact { "exact" } else { "sd" }
            );
            if wanted.as_deref().is_some_and(|w| !w.split(',').any(|v| v.trim() == key)) {
                continue;
            }
            let cfg = SparseGradConfig {
                keep: Keep::Count(k),
                selection: sel,
                formulation: Some(form),
                merged_update: None,
                expected_tokens: tokens,
                optimizer: Optimizer::Adam(adam),
                precision,
            };
            let mut layer = SparseGradLinear::new(be, &w, Some(&bias), &basis, cfg).unwrap();
            let secs = time_steps(be, iters, || {
                layer.forward(&x, tokens, &mut y).unwrap();
                layer.backward(&g, tokens, Some(&mut dx)).unwrap();
                layer.step().unwrap();
            });
            let (transformed_extra, merged_extra) = Formulation::extra_flops(out, inp, tokens, k);
            let rows = layer.last_stats().rows_multiplied as f64;
            // The weight-gradient GEMM shrinks with the rows SparseByDense keeps.
            let dw_flops = 2.0 * rows * out as f64 * inp as f64;
            let flops = 2.0 * 2.0 * tokens as f64 * out as f64 * inp as f64
                + dw_flops
                + if form == Formulation::Merged { merged_extra } else { transformed_extra };
            let chosen = if Formulation::choose(out, inp, tokens, k) == form { " (default)" } else { "" };
            let stats = layer.last_stats();
            let gemms =
                gemm_model(step_gemms(out, inp, tokens, k, Some((form, stats.rows_multiplied, stats.cols_multiplied))));
            report(
                &format!("SparseGrad {form:?} {}{chosen}", if sel == Selection::Exact { "Exact" } else { "SD(0)" }),
                secs,
                flops,
                gemms,
            );
        }
    }
    if precision == Precision::Full && std::env::var("SPARSEGRAD_BENCH_MEASURE").as_deref() != Ok("0") {
        let t = Instant::now();
        let measured = Formulation::measure(be, out, inp, tokens, k).unwrap();
        println!(
            "{name:<22} Formulation::measure picks {measured:?} ({:.1} s of calibration); the flop model picks {:?}",
            t.elapsed().as_secs_f64(),
            Formulation::choose(out, inp, tokens, k)
        );
    }
}

pub fn header() {
    println!(
        "{:<22} {:<5} {:<38} {:>10} {:>9} {:>13} {:>9} {:>10} {:>9}",
        "shape", "prec", "variant", "ms/step", "vs dense", "flop-model ms", "vs model", "GEMMs ms", "vs GEMMs"
    );
    println!(
        "(flop model: the step's flops at the 2048^3 sgemm rate; GEMMs: the sum of the step's own GEMMs, each timed alone)"
    );
}
