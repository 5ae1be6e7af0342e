//! The fused attention kernels (cuda/attention.cu: f32; cuda/attention_wmma.cu: bf16 on
//! tensor cores) against the CPU twin (itself checked against an f64 reference in
//! tests/cpu_attention.rs), forward outputs, row statistics and dq, dk, dv, on ragged
//! shapes: T = 1, 17, 33, 128 (and 300 with the big shapes), head dims 64 and 128 (and 8, 40
//! that the bf16 path pads), grouped-query groups 1, 2 and 4, causal and padding masks with
//! lengths 0, 1, T-1, T and past T. Every output is poisoned (NaN) first and has a poisoned
//! tail that must stay untouched. Skips with `skipped: no CUDA device` where there is none;
//! the same comparison runs CPU against CPU to keep the harness honest.
//!
//! Tolerances, elementwise `|cuda - cpu| <= cu e` with `e` the error scale of the entry
//! from the f64 reference (`common::attention::reference`: every sum with its terms'
//! magnitudes, so the bound follows each entry's own size):
//! - f32: both sides are within `b = 2 (2 d M + 2 t + 2 d + 16) u` of the exact result,
//!   u = 2^-24 (a score sums d products of magnitude up to M, a probability carries its
//!   score's and the max's error and the row sum's t u, a product adds t or d terms;
//!   tests/cpu_attention.rs checks the twin against it), so `cu = 2 b`;
//! - bf16: both sides round q, k, v and dout to the same bf16 values; each then rounds its
//!   probabilities and score gradients to bf16 (relative 2^-8, the twin after normalising,
//!   the kernels before), so the two differ by at most `2 * 2 * 2^-8` of the scale plus the
//!   f32 part: `cu = 4 * 2^-8 + 2 b`.
#![cfg(feature = "cuda")]

mod common;
mod cuda_common;

use common::attention::{assert_within, reference, round_bf16};
use cuda_common::{big_shapes, cuda_test, rand_f32, rng};
use sparsegrad::backend::{AttentionGrads, AttentionMask, AttentionOps, AttentionShape};
use sparsegrad::{Backend, Cpu, Error, Precision};

/// `(batch, seq, heads, kv_heads, head_dim, causal)`.
type Case = (usize, usize, usize, usize, usize, bool);

fn cases(big: bool) -> Vec<Case> {
    let mut c = vec![
        (2, 1, 2, 2, 64, true),
        (5, 1, 2, 2, 64, false),
        (2, 17, 4, 1, 64, true),
        (5, 17, 4, 1, 128, false),
        (1, 17, 2, 2, 128, true),
        (5, 33, 4, 2, 40, false),
        (2, 33, 4, 2, 40, true),
        (5, 20, 2, 1, 8, false),
        (1, 128, 4, 1, 64, true),
    ];
    if big {
        c.extend([(4, 128, 2, 2, 128, false), (1, 300, 4, 1, 128, true), (4, 300, 2, 2, 64, false)]);
    }
    c
}

/// Lengths 0, 1, T-1, T and T+3 (clamped to T), cycled over the batch.
fn lengths(batch: usize, seq: usize) -> Vec<u32> {
    let pick = [0, 1, seq.saturating_sub(1), seq, seq + 3];
    (0..batch).map(|b| pick[b % pick.len()] as u32).collect()
}

const TAIL: usize = 7;

struct Outputs {
    out: Vec<f32>,
    stats: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// Forward then backward on `be`, every output poisoned first with a poisoned tail of
/// `TAIL` entries that must come back untouched.
#[allow(clippy::too_many_arguments)]
fn run<B: Backend>(
    be: &B,
    s: &AttentionShape,
    lens: Option<&[u32]>,
    precision: Precision,
    with_half: bool,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
) -> Outputs {
    let up = |x: &[f32]| be.upload(x).unwrap();
    let (qb, kb, vb, dob) = (up(q), up(k), up(v), up(dout));
    let lbuf = lens.map(|l| be.upload(l).unwrap());
    let mask = lbuf.as_ref().map_or(AttentionMask::Causal, AttentionMask::Padding);
    let poisoned = |n: usize| be.upload(&vec![f32::NAN; n + TAIL]).unwrap();
    let (mut out, mut stats) = (poisoned(q.len()), poisoned(s.stats_len()));
    be.attention_forward(s, mask, precision, &qb, &kb, &vb, &mut out, &mut stats).unwrap();
    let (mut dq, mut dk, mut dv) = (poisoned(q.len()), poisoned(k.len()), poisoned(v.len()));
    // dv's bf16 rounding, asked for in bf16 and on every other f32 case (`with_half`).
    let mut dv_half = be.upload(&vec![half::bf16::NAN; v.len() + TAIL]).unwrap();
    let grads = AttentionGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv, dv_half: with_half.then_some(&mut dv_half) };
    be.attention_backward(s, mask, precision, &qb, &kb, &vb, &out, &stats, &dob, grads).unwrap();
    let down = |b: &B::Buf<f32>, n: usize, what: &str| {
        let all = be.download(b, n + TAIL).unwrap();
        assert!(all[n..].iter().all(|x| x.is_nan()), "{what}: the tail past the output was written");
        all[..n].to_vec()
    };
    let halves = be.download(&dv_half, v.len() + TAIL).unwrap();
    let dv_all = be.download(&dv, v.len()).unwrap();
    for (i, h) in halves.iter().enumerate() {
        let want = if with_half && i < v.len() { half::bf16::from_f32(dv_all[i]) } else { half::bf16::NAN };
        assert_eq!(h.to_bits(), want.to_bits(), "dv_half[{i}] (asked for: {with_half})");
    }
    Outputs {
        out: down(&out, q.len(), "out"),
        stats: down(&stats, s.stats_len(), "stats"),
        dq: down(&dq, q.len(), "dq"),
        dk: down(&dk, k.len(), "dk"),
        dv: down(&dv, v.len(), "dv"),
    }
}

/// `be` against the CPU twin on every case, both precisions.
fn compare<B: Backend>(be: &B, big: bool) {
    let u = f32::EPSILON as f64 / 2.0;
    for (n, c) in cases(big).into_iter().enumerate() {
        let s = AttentionShape { batch: c.0, seq: c.1, heads: c.2, kv_heads: c.3, head_dim: c.4 };
        let lens = (!c.5).then(|| lengths(s.batch, s.seq));
        let mut r = rng(40 + n as u64);
        let (nq, nkv) = (s.batch * s.seq * s.q_dim(), s.batch * s.seq * s.kv_dim());
        let q: Vec<f32> =
            rand_f32(&mut r, nq).iter().enumerate().map(|(i, x)| if i % 3 == 0 { 4.0 * x } else { *x }).collect();
        let (k, v, dout) = (rand_f32(&mut r, nkv), rand_f32(&mut r, nkv), rand_f32(&mut r, nq));
        for precision in [Precision::Full, Precision::Bf16] {
            let what = format!("{} {precision:?} case {n} {s:?} causal {}", be.name(), c.5);
            let with_half = precision == Precision::Bf16 || n % 2 == 1;
            let got = run(be, &s, lens.as_deref(), precision, with_half, &q, &k, &v, &dout);
            let want = run(&Cpu::new(), &s, lens.as_deref(), precision, with_half, &q, &k, &v, &dout);
            let wide = |x: &[f32]| -> Vec<f64> {
                let x: Vec<f64> = x.iter().map(|&v| v as f64).collect();
                if precision == Precision::Bf16 {
                    round_bf16(&x)
                } else {
                    x
                }
            };
            let e = reference(&s, lens.as_deref(), &wide(&q), &wide(&k), &wide(&v), &wide(&dout));
            let (t, d) = (s.seq as f64, s.head_dim as f64);
            let b = 2.0 * (2.0 * d * e.max_score_mag + 2.0 * t + 2.0 * d + 16.0) * u;
            let cu = if precision == Precision::Full { 2.0 * b } else { 4.0 / 256.0 + 2.0 * b };
            let used = [
                assert_within(&format!("{what}: out"), &got.out, &want.out, &e.e_out, cu),
                assert_within(&format!("{what}: dq"), &got.dq, &want.dq, &e.e_dq, cu),
                assert_within(&format!("{what}: dk"), &got.dk, &want.dk, &e.e_dk, cu),
                assert_within(&format!("{what}: dv"), &got.dv, &want.dv, &e.e_dv, cu),
            ];
            let rows = s.rows();
            let e_max = vec![e.max_score_mag.max(1e-30); rows];
            assert_within(&format!("{what}: row max"), &got.stats[..rows], &want.stats[..rows], &e_max, cu);
            let e_sum: Vec<f64> = want.stats[rows..].iter().map(|&l| l as f64).collect();
            assert_within(&format!("{what}: row sum"), &got.stats[rows..], &want.stats[rows..], &e_sum, cu);
            println!("{what}: largest share of the bound used by out, dq, dk, dv: {used:.3?}");
        }
    }
}

cuda_test!(fn cuda_attention_matches_the_cpu_twin(cuda) {
    compare(&cuda, big_shapes());
});

cuda_test!(fn cuda_attention_rejects_what_its_kernels_do_not_take(cuda) {
    let s = AttentionShape { batch: 1, seq: 4, heads: 2, kv_heads: 1, head_dim: 136 };
    let (nq, nkv) = (s.batch * s.seq * s.q_dim(), s.batch * s.seq * s.kv_dim());
    let (q, k, v) = (cuda.alloc::<f32>(nq).unwrap(), cuda.alloc::<f32>(nkv).unwrap(), cuda.alloc::<f32>(nkv).unwrap());
    let (mut out, mut stats) = (cuda.alloc::<f32>(nq).unwrap(), cuda.alloc::<f32>(s.stats_len()).unwrap());
    for precision in [Precision::Full, Precision::Bf16] {
        let e = cuda.attention_forward(&s, AttentionMask::Causal, precision, &q, &k, &v, &mut out, &mut stats);
        assert!(matches!(e, Err(Error::InvalidArgument { op: "attention_forward", .. })), "{e:?}");
    }
    let s = AttentionShape { head_dim: 8, ..s };
    let (nq, nkv) = (s.batch * s.seq * s.q_dim(), s.batch * s.seq * s.kv_dim());
    let (q, k, v) = (cuda.alloc::<f64>(nq).unwrap(), cuda.alloc::<f64>(nkv).unwrap(), cuda.alloc::<f64>(nkv).unwrap());
    let (mut out, mut stats) = (cuda.alloc::<f64>(nq).unwrap(), cuda.alloc::<f64>(s.stats_len()).unwrap());
    let e = cuda.attention_forward(&s, AttentionMask::Causal, Precision::Full, &q, &k, &v, &mut out, &mut stats);
    assert!(matches!(e, Err(Error::UnsupportedDtype { .. })), "{e:?}");
});

#[test]
fn harness_self_check_on_the_cpu() {
    compare(&Cpu::new(), false);
}
