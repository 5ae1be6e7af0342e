//! The encoder ops of the CPU backend against their definitions, in f64: LayerNorm (the
//! forward against the per-row formula, the input and parameter gradients by finite
//! differences, the parameter gradients accumulating with beta), the padding-masked softmax
//! (masked keys exactly zero, rows summing to one, the backward by finite differences) and
//! mean / [CLS] pooling (against the naive sums, the backward by finite differences). The
//! CUDA kernels are compared with these CPU ops in tests/cuda_encoder.rs.

mod common;

use common::encoder::*;
use common::{rand_range, rand_vec, rng, to64};
use sparsegrad::backend::EncoderOps;
use sparsegrad::{Backend, Cpu, PoolKind};

fn fd_check(what: &str, analytic: &[f64], mut loss: impl FnMut(usize, f64) -> f64) {
    let h = 1e-6;
    for (i, &a) in analytic.iter().enumerate() {
        let num = (loss(i, h) - loss(i, -h)) / (2.0 * h);
        assert!((num - a).abs() <= 1e-6 + 1e-5 * num.abs(), "{what}: entry {i}: analytic {a}, numeric {num}");
    }
}

#[test]
fn layernorm_backward_matches_finite_differences() {
    let cpu = Cpu::new();
    let mut r = rng(10);
    let (rows, cols, eps) = (3, 7, 1e-5);
    let x = to64(&rand_range(&mut r, rows * cols, -2.0, 2.0));
    let w = to64(&rand_range(&mut r, cols, -1.5, 1.5));
    let b = to64(&rand_vec(&mut r, cols));
    let rw = to64(&rand_vec(&mut r, rows * cols));
    let loss = |x: &[f64], w: &[f64], b: &[f64]| {
        let (y, _, _) = cpu_layernorm(&cpu, x, w, b, rows, cols, eps);
        y.iter().zip(&rw).map(|(a, b)| a * b).sum::<f64>()
    };
    let (_, mean, rstd) = cpu_layernorm(&cpu, &x, &w, &b, rows, cols, eps);
    // The forward against a naive per-row computation.
    for row in 0..rows {
        let xr = &x[row * cols..(row + 1) * cols];
        let mu = xr.iter().sum::<f64>() / cols as f64;
        let var = xr.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / cols as f64;
        assert!((mean[row] - mu).abs() < 1e-12 && (rstd[row] - 1.0 / (var + eps as f64).sqrt()).abs() < 1e-9);
    }
    let (dx, dw, db) = cpu_layernorm_backward(&cpu, &x, &w, &mean, &rstd, &rw, rows, cols);
    let bump = |v: &[f64], i: usize, h: f64| {
        let mut v = v.to_vec();
        v[i] += h;
        v
    };
    fd_check("layernorm dx", &dx, |i, h| loss(&bump(&x, i, h), &w, &b));
    fd_check("layernorm dw", &dw, |i, h| loss(&x, &bump(&w, i, h), &b));
    fd_check("layernorm db", &db, |i, h| loss(&x, &w, &bump(&b, i, h)));
    // beta accumulates.
    let (xb, mb, rb, dyb) =
        (cpu.upload(&x).unwrap(), cpu.upload(&mean).unwrap(), cpu.upload(&rstd).unwrap(), cpu.upload(&rw).unwrap());
    let (mut dwb, mut dbb) = (cpu.upload(&vec![1.0f64; cols]).unwrap(), cpu.upload(&vec![2.0f64; cols]).unwrap());
    cpu.layernorm_param_grads(&xb, &mb, &rb, &dyb, &mut dwb, &mut dbb, rows, cols, 0.5).unwrap();
    for c in 0..cols {
        assert!((dwb[c] - (0.5 + dw[c])).abs() < 1e-12 && (dbb[c] - (1.0 + db[c])).abs() < 1e-12);
    }
}

#[test]
fn softmax_masked_backward_matches_finite_differences() {
    let cpu = Cpu::new();
    let mut r = rng(11);
    let (heads, t) = (2, 5);
    let lengths = [3u32, 5, 0];
    let mats = heads * lengths.len();
    let s = to64(&rand_range(&mut r, mats * t * t, -3.0, 3.0));
    let rw = to64(&rand_vec(&mut r, mats * t * t));
    let sc = 0.7;
    let p = cpu_softmax(&cpu, &s, &lengths, mats, heads, t, sc);
    // Masked keys are exactly zero; live entries of a row sum to 1.
    for row in 0..mats * t {
        let n = (lengths[row / t / heads] as usize).min(t);
        assert!(p[row * t + n..(row + 1) * t].iter().all(|&v| v == 0.0));
        let sum: f64 = p[row * t..row * t + n].iter().sum();
        assert!(n == 0 || (sum - 1.0).abs() < 1e-12, "row {row} sums to {sum}");
    }
    let ds = cpu_softmax_backward(&cpu, &p, &rw, &lengths, mats, heads, t, sc);
    fd_check("softmax_masked ds", &ds, |i, h| {
        let mut s2 = s.clone();
        s2[i] += h;
        cpu_softmax(&cpu, &s2, &lengths, mats, heads, t, sc).iter().zip(&rw).map(|(a, b)| a * b).sum()
    });
}

#[test]
fn pooling_backward_matches_finite_differences() {
    let cpu = Cpu::new();
    let mut r = rng(12);
    let (t, cols) = (4, 3);
    let lengths = [2u32, 4, 0, 9];
    let batch = lengths.len();
    let x = to64(&rand_vec(&mut r, batch * t * cols));
    let rw = to64(&rand_vec(&mut r, batch * cols));
    for kind in [PoolKind::Mean, PoolKind::Cls] {
        let out = cpu_pool(&cpu, &x, &lengths, batch, t, cols, kind);
        // Naive reference.
        for b in 0..batch {
            let n = (lengths[b] as usize).min(t);
            for c in 0..cols {
                let want = match (n, kind) {
                    (0, _) => 0.0,
                    (_, PoolKind::Cls) => x[b * t * cols + c],
                    (_, PoolKind::Mean) => (0..n).map(|j| x[(b * t + j) * cols + c]).sum::<f64>() / n as f64,
                };
                assert!((out[b * cols + c] - want).abs() < 1e-12, "{kind:?} sequence {b} column {c}");
            }
        }
        let dx = cpu_pool_backward(&cpu, &rw, &lengths, batch, t, cols, kind);
        fd_check(&format!("pool {kind:?} dx"), &dx, |i, h| {
            let mut x2 = x.clone();
            x2[i] += h;
            cpu_pool(&cpu, &x2, &lengths, batch, t, cols, kind).iter().zip(&rw).map(|(a, b)| a * b).sum()
        });
    }
}
