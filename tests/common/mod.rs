//! Test helpers shared by the test files: seeded random data, reference products in f64,
//! orthogonal matrices, an elementwise comparison that reports the worst index; in the
//! submodules the plain reference implementations (`reference`), the assets rule
//! (`assets`), the example binaries (`examples`), the command line's files and processes
//! (`cli`), the encoder ops' CPU twins (`encoder`), the attention reference (`attention`) and
//! model and block fixtures.
#![allow(dead_code)]

pub mod assets;
pub mod attention;
pub mod bert;
pub mod blocks;
pub mod cli;
pub mod encoder;
pub mod examples;
pub mod reference;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sparsegrad::Basis;

/// Applies `f` to every tensor of `w` (embedding, each layer's nine, final norm, `lm_head`).
pub fn for_each_tensor_mut(w: &mut sparsegrad::LlamaWeights, mut f: impl FnMut(&mut Vec<f32>)) {
    f(&mut w.embed);
    for l in &mut w.layers {
        for v in [
            &mut l.attn_norm,
            &mut l.q,
            &mut l.k,
            &mut l.v,
            &mut l.o,
            &mut l.ffn_norm,
            &mut l.gate,
            &mut l.up,
            &mut l.down,
        ] {
            f(v);
        }
    }
    f(&mut w.final_norm);
    if let Some(h) = &mut w.lm_head {
        f(h);
    }
}

pub fn rng(seed: u64) -> SmallRng {
    SmallRng::seed_from_u64(seed)
}

/// Uniform values in [-1, 1), never all zero.
pub fn rand_vec(rng: &mut SmallRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Uniform values in [lo, hi).
pub fn rand_range(rng: &mut SmallRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

pub fn rand_vec64(rng: &mut SmallRng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-1.0f64..1.0)).collect()
}

/// `C = A B` in f64 for row-major `A` `(m, k)` and `B` `(k, n)`.
pub fn matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for p in 0..k {
            let av = a[i * k + p];
            for j in 0..n {
                c[i * n + j] += av * b[p * n + j];
            }
        }
    }
    c
}

pub fn transpose<T: Copy>(m: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut t = Vec::with_capacity(m.len());
    for c in 0..cols {
        t.extend((0..rows).map(|r| m[r * cols + c]));
    }
    t
}

pub fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

pub fn to32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// A random orthogonal `(n, n)` matrix (modified Gram-Schmidt in f64, twice).
pub fn random_orthogonal(rng: &mut SmallRng, n: usize) -> Vec<f64> {
    let mut cols: Vec<Vec<f64>> = (0..n).map(|_| rand_vec64(rng, n)).collect();
    for _pass in 0..2 {
        for j in 0..n {
            let (done, rest) = cols.split_at_mut(j);
            let cj = &mut rest[0];
            for ci in done.iter() {
                let d: f64 = cj.iter().zip(ci).map(|(a, b)| a * b).sum();
                cj.iter_mut().zip(ci).for_each(|(a, b)| *a -= d * b);
            }
            let norm = cj.iter().map(|v| v * v).sum::<f64>().sqrt();
            cj.iter_mut().for_each(|v| *v /= norm);
        }
    }
    let mut m = vec![0.0; n * n];
    for (j, col) in cols.iter().enumerate() {
        for r in 0..n {
            m[r * n + j] = col[r];
        }
    }
    m
}

/// A basis with random orthogonal `P` and `Q`.
pub fn random_basis(rng: &mut SmallRng, group: &str, out: usize, inp: usize) -> Basis {
    let p = to32(&random_orthogonal(rng, out));
    let q = to32(&random_orthogonal(rng, inp));
    let sigma_out = (0..out).rev().map(|i| i as f32 + 1.0).collect();
    let sigma_in = (0..inp).rev().map(|i| i as f32 + 1.0).collect();
    Basis::from_parts(group, out, inp, p, q, sigma_out, sigma_in, 1).expect("valid basis")
}

/// Asserts `|a - b| <= atol + rtol |b|` elementwise; the message names the worst index.
pub fn assert_close<A: Into<f64> + Copy, B: Into<f64> + Copy>(what: &str, a: &[A], b: &[B], atol: f64, rtol: f64) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    let mut worst: Option<(usize, f64)> = None;
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        let (x, y) = (x.into(), y.into());
        let excess = (x - y).abs() - (atol + rtol * y.abs());
        let fails = excess.is_nan() || excess > 0.0;
        if fails && worst.is_none_or(|(_, w)| excess > w || excess.is_nan()) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        panic!(
            "{what}: mismatch at index {i}: got {}, expected {} (atol {atol}, rtol {rtol})",
            a[i].into(),
            b[i].into()
        );
    }
}

/// Max |a - b| / max(max |b|, tiny): a relative error of a whole tensor.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// `merged_weight` of a bf16 SparseGrad layer on `be`, both formulations: before training it
/// gives back the weight the layer was built from, and after a few Adam steps it is
/// `P Wt Q^T` with the f32 basis (not its bf16 rounding), both to f32 precision.
pub fn check_bf16_merged_weight<B: sparsegrad::Backend + Clone>(be: &B) {
    use sparsegrad::{Formulation, Keep, Optimizer, Precision, SparseGradConfig, SparseGradLinear};
    let (out, inp, tokens) = (17usize, 33usize, 29usize);
    let mut r = rng(21);
    let w = rand_vec(&mut r, out * inp);
    let basis = random_basis(&mut r, "g", out, inp);
    let x = be.upload(&rand_vec(&mut r, tokens * inp)).unwrap();
    let g = be.upload(&rand_vec(&mut r, tokens * out)).unwrap();
    for formulation in [Formulation::Transformed, Formulation::Merged] {
        let what = format!("{} bf16 {formulation:?}", be.name());
        let cfg = SparseGradConfig {
            keep: Keep::Fraction(0.1),
            formulation: Some(formulation),
            optimizer: Optimizer::adam(1e-2),
            precision: Precision::Bf16,
            ..Default::default()
        };
        let mut layer = SparseGradLinear::new(be, &w, None, &basis, cfg).unwrap();
        assert_close(
            &format!("{what}: merged weight before training"),
            &layer.merged_weight().unwrap(),
            &w,
            1e-5,
            1e-5,
        );
        let mut y = be.alloc::<f32>(tokens * out).unwrap();
        for _ in 0..3 {
            layer.forward(&x, tokens, &mut y).unwrap();
            layer.backward(&g, tokens, None).unwrap();
            layer.step().unwrap();
        }
        let (p, q) = (to64(basis.p()), to64(basis.q()));
        let wt = to64(&layer.weight_transformed().unwrap());
        let expect = matmul(&matmul(&p, &wt, out, out, inp), &transpose(&q, inp, inp), out, inp, inp);
        assert_close(
            &format!("{what}: merged weight = P Wt Q^T"),
            &layer.merged_weight().unwrap(),
            &expect,
            1e-5,
            1e-5,
        );
    }
}

/// Largest magnitude in `v` (0 for an empty slice).
pub fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0f64, |m, x| m.max(x.abs()))
}

/// `b` with `P` and `Q` changed by `edit`, and no check at all: for the tests of the code
/// that must refuse (or must not reuse) such a basis.
pub fn edited_basis(b: &Basis, edit: impl FnOnce(&mut Vec<f32>, &mut Vec<f32>)) -> Basis {
    let (mut p, mut q) = (b.p().to_vec(), b.q().to_vec());
    edit(&mut p, &mut q);
    let (out, inp) = b.shape();
    let (so, si) = (b.sigma_out().to_vec(), b.sigma_in().to_vec());
    Basis::from_parts_unchecked(b.group(), out, inp, p, q, so, si, b.n_grads())
}
