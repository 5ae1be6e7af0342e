//! Test helpers: seeded random data, reference products in f64, orthogonal matrices,
//! and an elementwise comparison that reports the worst index.
#![allow(dead_code)]

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sparsegrad::Basis;

pub fn rng(seed: u64) -> SmallRng {
    SmallRng::seed_from_u64(seed)
}

/// Uniform values in [-1, 1), never all zero.
pub fn rand_vec(rng: &mut SmallRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
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
