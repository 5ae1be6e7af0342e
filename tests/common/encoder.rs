//! The encoder ops' CPU twins, generic over the precision (f64 for finite differences, f32
//! as the specification CUDA is compared with): LayerNorm with its input and parameter
//! gradients, the padding-masked softmax and its backward, row pooling and its backward,
//! each from host slices to host vectors; and random sequence lengths that include 0 and
//! lengths past the padded length.

use rand::Rng;
use sparsegrad::backend::EncoderOps;
use sparsegrad::{Backend, Cpu, PoolKind, Real};

pub type LnOut<F> = (Vec<F>, Vec<F>, Vec<F>);

pub fn cpu_layernorm<F: Real>(cpu: &Cpu, x: &[F], w: &[F], b: &[F], rows: usize, cols: usize, eps: f32) -> LnOut<F> {
    let (mut y, mut m, mut r) = (cpu.alloc(rows * cols).unwrap(), cpu.alloc(rows).unwrap(), cpu.alloc(rows).unwrap());
    let (x, w, b) = (cpu.upload(x).unwrap(), cpu.upload(w).unwrap(), cpu.upload(b).unwrap());
    cpu.layernorm(&x, &w, &b, &mut y, &mut m, &mut r, rows, cols, eps).unwrap();
    (cpu.download(&y, rows * cols).unwrap(), cpu.download(&m, rows).unwrap(), cpu.download(&r, rows).unwrap())
}

#[allow(clippy::too_many_arguments)]
pub fn cpu_layernorm_backward<F: Real>(
    cpu: &Cpu,
    x: &[F],
    w: &[F],
    mean: &[F],
    rstd: &[F],
    dy: &[F],
    rows: usize,
    cols: usize,
) -> LnOut<F> {
    let u = |v: &[F]| cpu.upload(v).unwrap();
    let (x, w, mean, rstd, dy) = (u(x), u(w), u(mean), u(rstd), u(dy));
    let mut dx = cpu.alloc(rows * cols).unwrap();
    cpu.layernorm_backward(&x, &w, &mean, &rstd, &dy, &mut dx, rows, cols).unwrap();
    let (mut dw, mut db) = (cpu.alloc(cols).unwrap(), cpu.alloc(cols).unwrap());
    cpu.layernorm_param_grads(&x, &mean, &rstd, &dy, &mut dw, &mut db, rows, cols, F::ZERO).unwrap();
    (cpu.download(&dx, rows * cols).unwrap(), cpu.download(&dw, cols).unwrap(), cpu.download(&db, cols).unwrap())
}

pub fn cpu_softmax<F: Real>(
    cpu: &Cpu,
    s: &[F],
    lengths: &[u32],
    mats: usize,
    heads: usize,
    t: usize,
    sc: f32,
) -> Vec<F> {
    let mut b = cpu.upload(s).unwrap();
    cpu.softmax_masked(&mut b, &cpu.upload(lengths).unwrap(), mats, heads, t, sc).unwrap();
    cpu.download(&b, mats * t * t).unwrap()
}

#[allow(clippy::too_many_arguments)]
pub fn cpu_softmax_backward<F: Real>(
    cpu: &Cpu,
    p: &[F],
    dp: &[F],
    lengths: &[u32],
    mats: usize,
    heads: usize,
    t: usize,
    sc: f32,
) -> Vec<F> {
    let mut ds = cpu.alloc(p.len()).unwrap();
    let (p, dp, l) = (cpu.upload(p).unwrap(), cpu.upload(dp).unwrap(), cpu.upload(lengths).unwrap());
    cpu.softmax_masked_backward(&p, &dp, &mut ds, &l, mats, heads, t, sc).unwrap();
    cpu.download(&ds, mats * t * t).unwrap()
}

pub fn cpu_pool<F: Real>(
    cpu: &Cpu,
    x: &[F],
    lengths: &[u32],
    batch: usize,
    t: usize,
    cols: usize,
    k: PoolKind,
) -> Vec<F> {
    let mut out = cpu.alloc(batch * cols).unwrap();
    cpu.pool_rows(&cpu.upload(x).unwrap(), &cpu.upload(lengths).unwrap(), &mut out, batch, t, cols, k).unwrap();
    cpu.download(&out, batch * cols).unwrap()
}

#[allow(clippy::too_many_arguments)]
pub fn cpu_pool_backward<F: Real>(
    cpu: &Cpu,
    dout: &[F],
    lengths: &[u32],
    batch: usize,
    t: usize,
    cols: usize,
    k: PoolKind,
) -> Vec<F> {
    let mut dx = cpu.alloc(batch * t * cols).unwrap();
    cpu.pool_rows_backward(&cpu.upload(dout).unwrap(), &cpu.upload(lengths).unwrap(), &mut dx, batch, t, cols, k)
        .unwrap();
    cpu.download(&dx, batch * t * cols).unwrap()
}

/// Random lengths for `batch` sequences of `t` tokens: mostly 1..=t, some 0 and some past t.
pub fn rand_lengths(r: &mut rand::rngs::SmallRng, batch: usize, t: usize) -> Vec<u32> {
    (0..batch)
        .map(|b| match b % 7 {
            5 => 0,
            6 => (t + 3) as u32,
            _ => r.random_range(1..=t.max(1)) as u32,
        })
        .collect()
}
