//! The CPU transformer ops (the specification of cuda/transformer.cu) checked on their own,
//! in f64: RMSNorm against the naive formula, every backward against central finite
//! differences, RoPE against the Hugging Face rotate-half definition (and its inverse as
//! both the undo and the transpose), causal softmax's rows and zeros, and cross-entropy's
//! losses, masking and target errors.

mod common;

use common::*;
use half::bf16;
use rand::rngs::SmallRng;
use rand::Rng;
use sparsegrad::backend::{Buffers, DenseOps, TransformerOps};
use sparsegrad::{Backend, Cpu, Error};

fn up(cpu: &Cpu, v: &[f64]) -> <Cpu as Buffers>::Buf<f64> {
    cpu.upload(v).unwrap()
}

fn down(cpu: &Cpu, b: &<Cpu as Buffers>::Buf<f64>, n: usize) -> Vec<f64> {
    cpu.download(b, n).unwrap()
}

fn rand_range64(r: &mut SmallRng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n).map(|_| r.random_range(lo..hi)).collect()
}

/// Elementwise `|got - want| <= atol + rtol |want|`, reporting the worst index.
fn assert_close64(what: &str, got: &[f64], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let worst = got
        .iter()
        .zip(want)
        .enumerate()
        .map(|(i, (&g, &w))| (i, (g - w).abs() - (atol + rtol * w.abs())))
        .fold((0, f64::NEG_INFINITY), |a, b| if b.1 > a.1 || b.1.is_nan() { b } else { a });
    assert!(worst.1 <= 0.0, "{what}: worst at index {}: got {:e}, want {:e}", worst.0, got[worst.0], want[worst.0]);
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Central differences of the scalar function `f` at `x`, step `h`.
fn finite_diff(x: &[f64], h: f64, mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            xp[i] = x[i] + h;
            let fp = f(&xp);
            xp[i] = x[i] - h;
            let fm = f(&xp);
            xp[i] = x[i];
            (fp - fm) / (2.0 * h)
        })
        .collect()
}

const FD_H: f64 = 1e-5;
const FD_ATOL: f64 = 1e-8;
const FD_RTOL: f64 = 1e-6;

// ---- RMSNorm ----------------------------------------------------------------------------------

fn rmsnorm(cpu: &Cpu, x: &[f64], w: &[f64], rows: usize, cols: usize, eps: f32) -> (Vec<f64>, Vec<f64>) {
    let (mut y, mut inv) = (up(cpu, &vec![f64::NAN; rows * cols]), up(cpu, &vec![f64::NAN; rows]));
    cpu.rmsnorm(&up(cpu, x), &up(cpu, w), &mut y, &mut inv, rows, cols, eps).unwrap();
    (down(cpu, &y, rows * cols), down(cpu, &inv, rows))
}

#[test]
fn rmsnorm_matches_the_naive_formula() {
    let cpu = Cpu::new();
    let mut r = rng(1);
    for (rows, cols) in [(1, 1), (3, 7), (17, 33), (5, 576)] {
        let x = rand_range64(&mut r, rows * cols, -2.0, 2.0);
        let w = rand_range64(&mut r, cols, 0.5, 1.5);
        for eps in [1e-6f32, 1e-5, 0.5] {
            let (y, inv) = rmsnorm(&cpu, &x, &w, rows, cols, eps);
            let mut want_y = vec![0.0; rows * cols];
            let mut want_inv = vec![0.0; rows];
            for i in 0..rows {
                let row = &x[i * cols..(i + 1) * cols];
                let ms = row.iter().map(|v| v * v).sum::<f64>() / cols as f64;
                want_inv[i] = 1.0 / (ms + eps as f64).sqrt();
                for c in 0..cols {
                    want_y[i * cols + c] = row[c] * want_inv[i] * w[c];
                }
            }
            assert_close64(&format!("rmsnorm y {rows}x{cols} eps {eps}"), &y, &want_y, 1e-14, 1e-13);
            assert_close64(&format!("rmsnorm inv_rms {rows}x{cols} eps {eps}"), &inv, &want_inv, 0.0, 1e-13);
        }
    }
}

#[test]
fn rmsnorm_backward_matches_finite_differences() {
    let cpu = Cpu::new();
    let mut r = rng(2);
    for (rows, cols) in [(1, 1), (2, 5), (3, 17)] {
        let x = rand_range64(&mut r, rows * cols, -2.0, 2.0);
        let w = rand_range64(&mut r, cols, 0.5, 1.5);
        let dy = rand_range64(&mut r, rows * cols, -1.0, 1.0);
        let eps = 1e-5;
        let (_, inv) = rmsnorm(&cpu, &x, &w, rows, cols, eps);
        let mut dx = up(&cpu, &vec![f64::NAN; rows * cols]);
        cpu.rmsnorm_backward(&up(&cpu, &x), &up(&cpu, &w), &up(&cpu, &inv), &up(&cpu, &dy), &mut dx, rows, cols)
            .unwrap();
        let fd = finite_diff(&x, FD_H, |xp| dot(&dy, &rmsnorm(&cpu, xp, &w, rows, cols, eps).0));
        assert_close64(
            &format!("rmsnorm_backward {rows}x{cols}"),
            &down(&cpu, &dx, rows * cols),
            &fd,
            FD_ATOL,
            FD_RTOL,
        );
    }
}

#[test]
fn rmsnorm_backward_add_adds_the_backward_into_the_residual_gradient() {
    let cpu = Cpu::new();
    let mut r = rng(21);
    for (rows, cols) in [(1, 1), (2, 5), (3, 17)] {
        let x = rand_range64(&mut r, rows * cols, -2.0, 2.0);
        let w = rand_range64(&mut r, cols, 0.5, 1.5);
        let dy = rand_range64(&mut r, rows * cols, -1.0, 1.0);
        let acc = rand_range64(&mut r, rows * cols, -1.0, 1.0);
        let (_, inv) = rmsnorm(&cpu, &x, &w, rows, cols, 1e-5);
        let (xb, wb, ib, dyb) = (up(&cpu, &x), up(&cpu, &w), up(&cpu, &inv), up(&cpu, &dy));
        let mut dx = up(&cpu, &vec![f64::NAN; rows * cols]);
        cpu.rmsnorm_backward(&xb, &wb, &ib, &dyb, &mut dx, rows, cols).unwrap();
        let mut sum = up(&cpu, &acc);
        cpu.rmsnorm_backward_add(&xb, &wb, &ib, &dyb, None, &mut sum, None, rows, cols).unwrap();
        let want: Vec<f64> = acc.iter().zip(down(&cpu, &dx, rows * cols)).map(|(a, d)| a + d).collect();
        assert_eq!(down(&cpu, &sum, rows * cols), want, "rmsnorm_backward_add {rows}x{cols}");
        // The output gradient in two parts: the backward of their sum (dy2 added into dy
        // first, as axpy does), bit for bit.
        let dy2 = rand_range64(&mut r, rows * cols, -1.0, 1.0);
        let mut dy_sum = up(&cpu, &dy);
        cpu.axpy(1.0, &up(&cpu, &dy2), &mut dy_sum, rows * cols).unwrap();
        let mut want = up(&cpu, &acc);
        cpu.rmsnorm_backward_add(&xb, &wb, &ib, &dy_sum, None, &mut want, None, rows, cols).unwrap();
        let mut got = up(&cpu, &acc);
        cpu.rmsnorm_backward_add(&xb, &wb, &ib, &dyb, Some(&up(&cpu, &dy2)), &mut got, None, rows, cols).unwrap();
        assert_eq!(down(&cpu, &got, rows * cols), down(&cpu, &want, rows * cols), "two parts {rows}x{cols}");
    }
    let b = |n: usize| up(&cpu, &vec![1.0; n]);
    let mut dx = b(12);
    assert!(matches!(
        cpu.rmsnorm_backward_add(&b(12), &b(4), &b(3), &b(11), None, &mut dx, None, 3, 4),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        cpu.rmsnorm_backward_add(&b(12), &b(4), &b(3), &b(12), Some(&b(11)), &mut dx, None, 3, 4),
        Err(Error::Shape { op: "rmsnorm_backward_add", .. })
    ));
    assert_eq!(down(&cpu, &dx, 12), vec![1.0; 12], "a rejected call leaves dx as it was");
}

#[test]
fn rmsnorm_rejects_bad_shapes() {
    let cpu = Cpu::new();
    let b = |n: usize| up(&cpu, &vec![1.0; n]);
    let (mut y, mut inv) = (b(12), b(3));
    assert!(matches!(cpu.rmsnorm(&b(11), &b(4), &mut y, &mut inv, 3, 4, 1e-5), Err(Error::Shape { .. })));
    assert!(matches!(cpu.rmsnorm(&b(12), &b(3), &mut y, &mut inv, 3, 4, 1e-5), Err(Error::Shape { .. })));
    assert!(matches!(cpu.rmsnorm(&b(12), &b(4), &mut y, &mut b(2), 3, 4, 1e-5), Err(Error::Shape { .. })));
    assert!(matches!(cpu.rmsnorm(&b(12), &b(4), &mut y, &mut inv, 3, 0, 1e-5), Err(Error::InvalidArgument { .. })));
    let mut dx = b(12);
    assert!(matches!(cpu.rmsnorm_backward(&b(12), &b(4), &b(3), &b(11), &mut dx, 3, 4), Err(Error::Shape { .. })));
    assert!(matches!(
        cpu.rmsnorm_backward(&b(12), &b(4), &b(3), &b(12), &mut dx, 3, 0),
        Err(Error::InvalidArgument { .. })
    ));
    // No rows: nothing to do.
    cpu.rmsnorm(&b(0), &b(4), &mut y, &mut inv, 0, 4, 1e-5).unwrap();
}

// ---- RoPE -------------------------------------------------------------------------------------

/// HF tables: `inv_freq[i] = base^(-2i / head_dim)`, `angle[p, i] = p inv_freq[i]`,
/// as `(seq_len, head_dim / 2)` cos and sin tables.
fn rope_tables(seq_len: usize, head_dim: usize, base: f64) -> (Vec<f64>, Vec<f64>) {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(seq_len * half);
    let mut sin = Vec::with_capacity(seq_len * half);
    for p in 0..seq_len {
        for i in 0..half {
            let angle = p as f64 * base.powf(-2.0 * i as f64 / head_dim as f64);
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    (cos, sin)
}

/// Hugging Face `apply_rotary_pos_emb` for one layout: `emb = cat(freqs, freqs)`,
/// `out = x cos(emb) + rotate_half(x) sin(emb)`, `rotate_half(x) = cat(-x2, x1)`, with
/// token `t` at position `t % seq_len`.
fn rope_hf(x: &[f64], tokens: usize, heads: usize, head_dim: usize, seq_len: usize, base: f64) -> Vec<f64> {
    let half = head_dim / 2;
    let mut out = vec![0.0; x.len()];
    for t in 0..tokens {
        let p = (t % seq_len) as f64;
        let emb: Vec<f64> = (0..head_dim).map(|k| p * base.powf(-2.0 * (k % half) as f64 / head_dim as f64)).collect();
        for h in 0..heads {
            let o = (t * heads + h) * head_dim;
            let q = &x[o..o + head_dim];
            let rot: Vec<f64> = (0..head_dim).map(|k| if k < half { -q[k + half] } else { q[k - half] }).collect();
            for k in 0..head_dim {
                out[o + k] = q[k] * emb[k].cos() + rot[k] * emb[k].sin();
            }
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn rope(
    cpu: &Cpu,
    x: &[f64],
    tokens: usize,
    heads: usize,
    head_dim: usize,
    seq_len: usize,
    cos: &[f64],
    sin: &[f64],
    inverse: bool,
) -> Vec<f64> {
    let mut b = up(cpu, x);
    cpu.rope(&mut b, tokens, heads, head_dim, seq_len, &up(cpu, cos), &up(cpu, sin), inverse).unwrap();
    down(cpu, &b, x.len())
}

const ROPE_SHAPES: &[(usize, usize, usize, usize)] = &[
    // (tokens, heads, head_dim, seq_len)
    (1, 1, 2, 1),
    (17, 3, 64, 5),
    (10, 2, 8, 10),
    (40, 9, 64, 16),
];

#[test]
fn rope_matches_the_hf_rotate_half_definition() {
    let cpu = Cpu::new();
    let mut r = rng(3);
    for &(tokens, heads, head_dim, seq_len) in ROPE_SHAPES {
        for base in [10000.0, 100.0] {
            let x = rand_range64(&mut r, tokens * heads * head_dim, -1.0, 1.0);
            let (cos, sin) = rope_tables(seq_len, head_dim, base);
            let got = rope(&cpu, &x, tokens, heads, head_dim, seq_len, &cos, &sin, false);
            let want = rope_hf(&x, tokens, heads, head_dim, seq_len, base);
            assert_close64(
                &format!("rope {tokens}x{heads}x{head_dim} seq {seq_len} base {base}"),
                &got,
                &want,
                1e-14,
                1e-14,
            );
        }
    }
}

#[test]
fn rope_qk_rotates_queries_and_keys_like_two_rope_calls() {
    let cpu = Cpu::new();
    let mut r = rng(31);
    for &(tokens, heads, head_dim, seq_len) in ROPE_SHAPES {
        let k_heads = heads.div_ceil(3);
        let (cos, sin) = rope_tables(seq_len, head_dim, 10000.0);
        let q = rand_range64(&mut r, tokens * heads * head_dim, -1.0, 1.0);
        let k = rand_range64(&mut r, tokens * k_heads * head_dim, -1.0, 1.0);
        for inverse in [false, true] {
            let (mut qb, mut kb) = (up(&cpu, &q), up(&cpu, &k));
            let (c, s) = (up(&cpu, &cos), up(&cpu, &sin));
            let (mut qh, mut kh) =
                (cpu.upload(&vec![bf16::ZERO; q.len()]).unwrap(), cpu.upload(&vec![bf16::ZERO; k.len()]).unwrap());
            let halves = Some((&mut qh, &mut kh));
            cpu.rope_qk(&mut qb, heads, &mut kb, k_heads, tokens, head_dim, seq_len, &c, &s, inverse, halves).unwrap();
            let what = format!("rope_qk {tokens}x{heads}/{k_heads}x{head_dim} inverse {inverse}");
            let want_q = rope(&cpu, &q, tokens, heads, head_dim, seq_len, &cos, &sin, inverse);
            let want_k = rope(&cpu, &k, tokens, k_heads, head_dim, seq_len, &cos, &sin, inverse);
            assert_eq!(down(&cpu, &qb, q.len()), want_q, "{what}: queries");
            assert_eq!(down(&cpu, &kb, k.len()), want_k, "{what}: keys");
            // The bf16 copies are the rounded results.
            let rounded = |v: &[f64]| v.iter().map(|&x| bf16::from_f32(x as f32)).collect::<Vec<_>>();
            assert_eq!(cpu.download(&qh, q.len()).unwrap(), rounded(&want_q), "{what}: bf16 queries");
            assert_eq!(cpu.download(&kh, k.len()).unwrap(), rounded(&want_k), "{what}: bf16 keys");
        }
    }
    // Both tensors are checked before either changes.
    let (c, s) = (up(&cpu, &[1.0; 16]), up(&cpu, &[0.5; 16]));
    let (mut q, mut k) = (up(&cpu, &[2.0; 64]), up(&cpu, &[2.0; 31]));
    assert!(matches!(cpu.rope_qk(&mut q, 2, &mut k, 1, 4, 8, 4, &c, &s, false, None), Err(Error::Shape { .. })));
    assert_eq!(down(&cpu, &q, 64), vec![2.0; 64]);
}

#[test]
fn rope_inverse_undoes_rope_and_is_its_transpose() {
    let cpu = Cpu::new();
    let mut r = rng(4);
    for &(tokens, heads, head_dim, seq_len) in ROPE_SHAPES {
        let n = tokens * heads * head_dim;
        let (cos, sin) = rope_tables(seq_len, head_dim, 10000.0);
        let x = rand_range64(&mut r, n, -1.0, 1.0);
        let y = rand_range64(&mut r, n, -1.0, 1.0);
        let what = format!("{tokens}x{heads}x{head_dim} seq {seq_len}");
        let rx = rope(&cpu, &x, tokens, heads, head_dim, seq_len, &cos, &sin, false);
        // A rotation and its inverse: exact up to rounding (cos^2 + sin^2 = 1 to 1 ulp).
        let back = rope(&cpu, &rx, tokens, heads, head_dim, seq_len, &cos, &sin, true);
        assert_close64(&format!("rope inverse after rope {what}"), &back, &x, 1e-15, 1e-14);
        let fwd_of_inv = rope(
            &cpu,
            &rope(&cpu, &x, tokens, heads, head_dim, seq_len, &cos, &sin, true),
            tokens,
            heads,
            head_dim,
            seq_len,
            &cos,
            &sin,
            false,
        );
        assert_close64(&format!("rope after rope inverse {what}"), &fwd_of_inv, &x, 1e-15, 1e-14);
        // The backward is the transpose: <R x, y> = <x, R^T y> with R^T = the inverse.
        let riy = rope(&cpu, &y, tokens, heads, head_dim, seq_len, &cos, &sin, true);
        let (lhs, rhs) = (dot(&rx, &y), dot(&x, &riy));
        assert!((lhs - rhs).abs() <= 1e-12 * (1.0 + lhs.abs()), "rope transpose {what}: {lhs} vs {rhs}");
        // Position 0 is the identity; tokens that share a position rotate alike.
        let half = head_dim / 2;
        assert_close64(
            &format!("rope at position 0 {what}"),
            &rx[..heads * head_dim],
            &x[..heads * head_dim],
            0.0,
            0.0,
        );
        assert!(cos[..half].iter().all(|&c| c == 1.0));
    }
}

#[test]
fn rope_rejects_bad_arguments() {
    let cpu = Cpu::new();
    let (cos, sin) = rope_tables(4, 8, 10000.0);
    let (c, s) = (up(&cpu, &cos), up(&cpu, &sin));
    let mut x = up(&cpu, &[0.5; 64]);
    assert!(matches!(cpu.rope(&mut x, 4, 2, 7, 4, &c, &s, false), Err(Error::InvalidArgument { .. })));
    assert!(matches!(cpu.rope(&mut x, 4, 2, 8, 0, &c, &s, false), Err(Error::InvalidArgument { .. })));
    assert!(matches!(cpu.rope(&mut x, 5, 2, 8, 4, &c, &s, false), Err(Error::Shape { .. })));
    assert!(matches!(cpu.rope(&mut x, 4, 2, 8, 5, &c, &s, false), Err(Error::Shape { .. })));
    assert!(matches!(cpu.rope(&mut x, 4, 2, 8, 4, &up(&cpu, &cos[..15]), &s, false), Err(Error::Shape { .. })));
    assert_eq!(down(&cpu, &x, 64), vec![0.5; 64], "a rejected call writes nothing");
}

// ---- causal softmax ---------------------------------------------------------------------------

fn softmax(cpu: &Cpu, s: &[f64], mats: usize, t: usize, scale: f32) -> Vec<f64> {
    let mut b = up(cpu, s);
    cpu.softmax_causal(&mut b, mats, t, scale).unwrap();
    down(cpu, &b, s.len())
}

#[test]
fn softmax_causal_rows_sum_to_one_with_zeros_above_the_diagonal() {
    let cpu = Cpu::new();
    let mut r = rng(5);
    for (mats, t) in [(1, 1), (2, 5), (3, 17), (1, 64)] {
        for scale in [1.0f32, 0.125, -0.7] {
            let mut s = rand_range64(&mut r, mats * t * t, -4.0, 4.0);
            // Large scores (max subtraction keeps them finite) and NaN above the diagonal
            // (never read).
            for m in 0..mats {
                for i in 0..t {
                    s[(m * t + i) * t + i / 2] += 500.0;
                    for j in i + 1..t {
                        s[(m * t + i) * t + j] = f64::NAN;
                    }
                }
            }
            let p = softmax(&cpu, &s, mats, t, scale);
            for m in 0..mats {
                for i in 0..t {
                    let row = &p[(m * t + i) * t..(m * t + i + 1) * t];
                    let srow = &s[(m * t + i) * t..(m * t + i + 1) * t];
                    let what = format!("softmax {mats}x{t} scale {scale} matrix {m} row {i}");
                    assert!(row[i + 1..].iter().all(|&v| v == 0.0), "{what}: nonzero above the diagonal");
                    let sum: f64 = row[..=i].iter().sum();
                    assert!((sum - 1.0).abs() <= 1e-14, "{what}: sums to {sum}");
                    let sc = scale as f64;
                    let mx = srow[..=i].iter().map(|v| sc * v).fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = srow[..=i].iter().map(|v| (sc * v - mx).exp()).sum();
                    let want: Vec<f64> = srow[..=i].iter().map(|v| (sc * v - mx).exp() / z).collect();
                    assert_close64(&what, &row[..=i], &want, 1e-300, 1e-14);
                    assert!(row[..=i].iter().all(|v| v.is_finite() && *v >= 0.0), "{what}: not a distribution");
                }
            }
        }
    }
}

#[test]
fn softmax_causal_backward_matches_finite_differences() {
    let cpu = Cpu::new();
    let mut r = rng(6);
    for (mats, t, scale) in [(1, 1, 1.0f32), (2, 5, 0.7), (1, 9, -1.3)] {
        let n = mats * t * t;
        let s = rand_range64(&mut r, n, -2.0, 2.0);
        let dp = rand_range64(&mut r, n, -1.0, 1.0);
        let p = softmax(&cpu, &s, mats, t, scale);
        let mut ds = up(&cpu, &vec![f64::NAN; n]);
        cpu.softmax_causal_backward(&up(&cpu, &p), &up(&cpu, &dp), &mut ds, mats, t, scale).unwrap();
        let ds = down(&cpu, &ds, n);
        // Entries above the diagonal do not reach the output: their FD gradient is exactly 0.
        let fd = finite_diff(&s, FD_H, |sp| dot(&dp, &softmax(&cpu, sp, mats, t, scale)));
        assert_close64(&format!("softmax_causal_backward {mats}x{t} scale {scale}"), &ds, &fd, FD_ATOL, FD_RTOL);
        for m in 0..mats {
            for i in 0..t {
                assert!(ds[(m * t + i) * t + i + 1..(m * t + i + 1) * t].iter().all(|&v| v == 0.0));
            }
        }
    }
}

#[test]
fn softmax_causal_rejects_short_buffers() {
    let cpu = Cpu::new();
    let mut s = up(&cpu, &[1.0; 17]);
    assert!(matches!(cpu.softmax_causal(&mut s, 2, 3, 1.0), Err(Error::Shape { .. })));
    let mut ds = up(&cpu, &[1.0; 18]);
    assert!(matches!(
        cpu.softmax_causal_backward(&s, &up(&cpu, &[1.0; 18]), &mut ds, 2, 3, 1.0),
        Err(Error::Shape { .. })
    ));
    cpu.softmax_causal(&mut s, 0, 3, 1.0).unwrap();
    cpu.softmax_causal(&mut s, 3, 0, 1.0).unwrap();
}

// ---- cross-entropy -----------------------------------------------------------------------------

/// `(losses, gradient)` of [`TransformerOps::cross_entropy`].
#[allow(clippy::too_many_arguments)]
fn cross_entropy(
    cpu: &Cpu,
    logits: &[f64],
    targets: &[u32],
    mask: &[f64],
    rows: usize,
    vocab: usize,
    grad_scale: f64,
) -> sparsegrad::Result<(Vec<f64>, Vec<f64>)> {
    let mut l = up(cpu, logits);
    let mut losses = up(cpu, &vec![f64::NAN; rows]);
    cpu.cross_entropy(&mut l, &cpu.upload(targets)?, &up(cpu, mask), rows, vocab, grad_scale, &mut losses)?;
    Ok((down(cpu, &losses, rows), down(cpu, &l, rows * vocab)))
}

#[test]
fn cross_entropy_losses_and_gradient() {
    let cpu = Cpu::new();
    let mut r = rng(7);
    for (rows, vocab) in [(1, 1), (4, 6), (6, 33)] {
        let logits = rand_range64(&mut r, rows * vocab, -3.0, 3.0);
        let targets: Vec<u32> =
            (0..rows).map(|i| if i == 1 { u32::MAX } else { r.random_range(0..vocab as u32) }).collect();
        // Row 1 is masked out (with a bad target, which is then ignored); weights != 1.
        let mask: Vec<f64> = (0..rows).map(|i| [1.0, 0.0, 0.5, 2.0][i % 4]).collect();
        let grad_scale = 0.3;
        let what = format!("cross_entropy {rows}x{vocab}");
        let (losses, grad) = cross_entropy(&cpu, &logits, &targets, &mask, rows, vocab, grad_scale).unwrap();
        for i in 0..rows {
            let row = &logits[i * vocab..(i + 1) * vocab];
            let want = if mask[i] == 0.0 {
                0.0
            } else {
                let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = mx + row.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
                mask[i] * (lse - row[targets[i] as usize])
            };
            assert!(
                (losses[i] - want).abs() <= 1e-13 * (1.0 + want.abs()),
                "{what} row {i}: loss {} vs {want}",
                losses[i]
            );
            if mask[i] == 0.0 {
                assert!(
                    grad[i * vocab..(i + 1) * vocab].iter().all(|&g| g == 0.0),
                    "{what}: masked row {i} has a gradient"
                );
            }
        }
        // The gradient is that of grad_scale * sum(losses), masked rows included (zero).
        let fd = finite_diff(&logits, FD_H, |lp| {
            grad_scale
                * cross_entropy(&cpu, lp, &targets, &mask, rows, vocab, grad_scale).unwrap().0.iter().sum::<f64>()
        });
        assert_close64(&format!("{what} gradient"), &grad, &fd, FD_ATOL, FD_RTOL);
        // Each masked-in row's gradient sums to 0 (softmax minus one-hot).
        for i in (0..rows).filter(|&i| mask[i] != 0.0) {
            let s: f64 = grad[i * vocab..(i + 1) * vocab].iter().sum();
            assert!(s.abs() <= 1e-13, "{what} row {i}: gradient sums to {s}");
        }
    }
}

#[test]
fn cross_entropy_is_stable_for_huge_logits() {
    // exp(1000) overflows f64: only the max subtraction keeps these finite.
    let cpu = Cpu::new();
    let logits = [1000.0, 999.0, -1000.0, 1e4, 1e4 - 1.0, 0.0];
    let (losses, grad) = cross_entropy(&cpu, &logits, &[1, 0], &[1.0, 1.0], 2, 3, 1.0).unwrap();
    let lse0 = 1000.0 + (1.0 + (-1.0f64).exp()).ln();
    assert!((losses[0] - (lse0 - 999.0)).abs() <= 1e-12, "{losses:?}");
    let lse1 = 1e4 + (1.0 + (-1.0f64).exp()).ln();
    assert!((losses[1] - (lse1 - 1e4)).abs() <= 1e-12, "{losses:?}");
    assert!(grad.iter().all(|g| g.is_finite()), "{grad:?}");
    assert!(
        (grad[0] - (1000.0 - lse0).exp()).abs() <= 1e-15 && (grad[1] - ((999.0 - lse0).exp() - 1.0)).abs() <= 1e-15,
        "{grad:?}"
    );
    assert_eq!(grad[2], 0.0, "exp(-2000) underflows to 0");
}

#[test]
fn cross_entropy_rejects_a_target_outside_the_vocabulary_before_writing() {
    let cpu = Cpu::new();
    let logits = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6];
    let mut l = up(&cpu, &logits);
    let mut losses = up(&cpu, &[7.0, 7.0]);
    let targets = cpu.upload(&[0u32, 3]).unwrap();
    let r = cpu.cross_entropy(&mut l, &targets, &up(&cpu, &[1.0, 0.5]), 2, 3, 1.0, &mut losses);
    assert!(matches!(r, Err(Error::InvalidArgument { .. })), "{r:?}");
    assert_eq!(down(&cpu, &l, 6), logits.to_vec(), "logits untouched");
    assert_eq!(down(&cpu, &losses, 2), vec![7.0, 7.0], "losses untouched");
    // The same target on a masked-out row is fine.
    cpu.cross_entropy(&mut l, &targets, &up(&cpu, &[1.0, 0.0]), 2, 3, 1.0, &mut losses).unwrap();
    assert_eq!(down(&cpu, &losses, 2)[1], 0.0);
    assert_eq!(&down(&cpu, &l, 6)[3..], &[0.0; 3]);
    // Shapes and the empty vocabulary.
    assert!(matches!(
        cpu.cross_entropy(&mut l, &targets, &up(&cpu, &[1.0]), 2, 3, 1.0, &mut losses),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        cpu.cross_entropy(&mut l, &targets, &up(&cpu, &[1.0, 1.0]), 2, 4, 1.0, &mut losses),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        cpu.cross_entropy(&mut l, &targets, &up(&cpu, &[1.0, 1.0]), 2, 0, 1.0, &mut losses),
        Err(Error::InvalidArgument { .. })
    ));
}
