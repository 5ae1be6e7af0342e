//! The CPU attention twin (`AttentionOps` on `Cpu`): against the f64 reference of
//! tests/common/attention.rs (f32 and f64, causal and padding masks with lengths 0, 1,
//! T-1, T and one past T, grouped-query heads, odd head dims, the bf16 mode), bit for bit
//! against the unfused ops it replaced (strided-batched GEMMs plus the softmax ops), its
//! per-call scratch, and its argument checks.

mod common;

use common::attention::{assert_within, reference, round_bf16};
use common::{rand_vec64, rng};
use sparsegrad::backend::cpu::CpuBuf;
use sparsegrad::backend::Gemm;
use sparsegrad::backend::{
    AttentionGrads, AttentionMask, AttentionOps, AttentionShape, DenseOps, EncoderOps, TransformerOps,
};
use sparsegrad::{Backend, Cpu, Error, Precision, Real};

/// `(batch, seq, heads, kv_heads, head_dim, causal)`.
const CASES: [(usize, usize, usize, usize, usize, bool); 8] = [
    (2, 1, 2, 2, 8, true),
    (3, 17, 4, 1, 16, true),
    (2, 40, 4, 2, 13, true),
    (1, 64, 2, 2, 32, true),
    (5, 17, 4, 1, 16, false),
    (5, 1, 2, 2, 8, false),
    (5, 40, 8, 2, 24, false),
    (5, 33, 4, 4, 7, false),
];

/// Lengths 0, 1, T-1, T and T+3 (clamped to T), cycled over the batch.
fn lengths(batch: usize, seq: usize) -> Vec<u32> {
    let pick = [0, 1, seq.saturating_sub(1), seq, seq + 3];
    (0..batch).map(|b| pick[b % pick.len()] as u32).collect()
}

struct Inputs {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    dout: Vec<f64>,
}

fn inputs(s: &AttentionShape, seed: u64) -> Inputs {
    let mut r = rng(seed);
    let (nq, nkv) = (s.batch * s.seq * s.q_dim(), s.batch * s.seq * s.kv_dim());
    // Queries scaled up so some rows are peaked, others flat.
    let q = rand_vec64(&mut r, nq).iter().enumerate().map(|(i, x)| x * if i % 3 == 0 { 4.0 } else { 1.0 }).collect();
    Inputs { q, k: rand_vec64(&mut r, nkv), v: rand_vec64(&mut r, nkv), dout: rand_vec64(&mut r, nq) }
}

/// Forward and backward of the twin: `(out, stats, dq, dk, dv)` widened to f64.
#[allow(clippy::type_complexity)]
fn run_twin<F: Real>(
    be: &Cpu,
    s: &AttentionShape,
    lens: Option<&[u32]>,
    precision: Precision,
    x: &Inputs,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let up = |v: &[f64]| be.upload(&v.iter().map(|&x| F::from_f64(x)).collect::<Vec<F>>()).unwrap();
    let (q, k, v, dout) = (up(&x.q), up(&x.k), up(&x.v), up(&x.dout));
    let lbuf = lens.map(|l| be.upload(l).unwrap());
    let mask = lbuf.as_ref().map_or(AttentionMask::Causal, AttentionMask::Padding);
    let nan = F::from_f64(f64::NAN);
    let poisoned = |n: usize| be.upload(&vec![nan; n]).unwrap();
    let (mut out, mut stats) = (poisoned(x.q.len()), poisoned(s.stats_len()));
    be.attention_forward(s, mask, precision, &q, &k, &v, &mut out, &mut stats).unwrap();
    let (mut dq, mut dk, mut dv) = (poisoned(x.q.len()), poisoned(x.k.len()), poisoned(x.v.len()));
    let grads = AttentionGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv, dv_half: None };
    be.attention_backward(s, mask, precision, &q, &k, &v, &out, &stats, &dout, grads).unwrap();
    let w = |b: &CpuBuf<F>| b.iter().map(|v| v.to_f64()).collect::<Vec<f64>>();
    (w(&out), w(&stats), w(&dq), w(&dk), w(&dv))
}

fn shape(c: (usize, usize, usize, usize, usize, bool)) -> AttentionShape {
    AttentionShape { batch: c.0, seq: c.1, heads: c.2, kv_heads: c.3, head_dim: c.4 }
}

/// Relative error bound of the twin in a precision with unit roundoff `u`: a score sums d
/// products (error <= d u M, M the largest score magnitude), a probability carries its
/// score's error and the max's (2 d u M) plus the row sum's (t u); a product over t terms
/// adds t u and the gradients' extra d-term dot products d u; doubled for slack.
fn accumulation_bound(s: &AttentionShape, max_score_mag: f64, u: f64) -> f64 {
    let (t, d) = (s.seq as f64, s.head_dim as f64);
    2.0 * (2.0 * d * max_score_mag + 2.0 * t + 2.0 * d + 16.0) * u
}

fn check_against_reference<F: Real>(u: f64, precision: Precision) {
    let be = Cpu::new();
    for (n, &c) in CASES.iter().enumerate() {
        let s = shape(c);
        let lens = (!c.5).then(|| lengths(s.batch, s.seq));
        let mut x = inputs(&s, 100 + n as u64);
        if precision == Precision::Bf16 {
            // The twin rounds its inputs to bf16 first: the reference starts from the same values.
            x = Inputs { q: round_bf16(&x.q), k: round_bf16(&x.k), v: round_bf16(&x.v), dout: round_bf16(&x.dout) };
        }
        let r = reference(&s, lens.as_deref(), &x.q, &x.k, &x.v, &x.dout);
        let (out, stats, dq, dk, dv) = run_twin::<F>(&be, &s, lens.as_deref(), precision, &x);
        // bf16: P and dS are rounded before they multiply (relative 2^-8 each).
        let cu =
            accumulation_bound(&s, r.max_score_mag, u) + if precision == Precision::Bf16 { 2.0 / 256.0 } else { 0.0 };
        let what = format!("{} {precision:?} case {n} {s:?} causal {}", F::NAME, c.5);
        let used = [
            assert_within(&format!("{what}: out"), &out, &r.out, &r.e_out, cu),
            assert_within(&format!("{what}: dq"), &dq, &r.dq, &r.e_dq, cu),
            assert_within(&format!("{what}: dk"), &dk, &r.dk, &r.e_dk, cu),
            assert_within(&format!("{what}: dv"), &dv, &r.dv, &r.e_dv, cu),
        ];
        println!("{what}: largest share of the bound used by out, dq, dk, dv: {used:.3?}");
        // The statistics: the max within the scores' error, the sum relative to itself.
        let rows = s.rows();
        let e_max = vec![r.max_score_mag.max(1e-300); rows];
        assert_within(&format!("{what}: row max"), &stats[..rows], &r.stats[..rows], &e_max, cu);
        assert_within(&format!("{what}: row sum"), &stats[rows..], &r.stats[rows..], &r.stats[rows..], cu);
    }
}

#[test]
fn twin_matches_the_f64_reference() {
    check_against_reference::<f32>(f32::EPSILON as f64 / 2.0, Precision::Full);
    check_against_reference::<f64>(f64::EPSILON / 2.0, Precision::Full);
}

#[test]
fn bf16_twin_matches_the_f64_reference_on_rounded_inputs() {
    check_against_reference::<f32>(f32::EPSILON as f64 / 2.0, Precision::Bf16);
}

/// The path the twin replaced (src/model/attention.rs before the fused ops), through the
/// public ops: `(out, dq, dk, dv)`.
fn unfused<F: Real>(be: &Cpu, s: &AttentionShape, lens: Option<&[u32]>, x: &Inputs) -> [Vec<F>; 4] {
    let up = |v: &[f64]| be.upload(&v.iter().map(|&x| F::from_f64(x)).collect::<Vec<F>>()).unwrap();
    let (q, k, v, dout) = (up(&x.q), up(&x.k), up(&x.v), up(&x.dout));
    let lbuf = lens.map(|l| be.upload(l).unwrap());
    let (t, d, group, qd, kvd) = (s.seq, s.head_dim, s.group(), s.q_dim(), s.kv_dim());
    let (mats, scale) = (s.batch * s.heads, s.scale());
    let mut probs = be.alloc::<F>(mats * t * t).unwrap();
    let mut out = be.alloc::<F>(x.q.len()).unwrap();
    let offsets =
        |b: usize, g: usize| (b * t * qd + g * group * d, b * t * kvd + g * d, (b * s.heads + g * group) * t * t);
    let scores = |b: usize, g: usize| {
        let (oq, okv, op) = offsets(b, g);
        let mut spec = Gemm::nt(t, t, d);
        (spec.lda, spec.ldb, spec.ldc) = (qd, kvd, t);
        (spec.offset_a, spec.offset_b, spec.offset_c) = (oq, okv, op);
        (spec.batch, spec.stride_a, spec.stride_b, spec.stride_c) = (group, d, 0, t * t);
        spec
    };
    let apply = |b: usize, g: usize| {
        let (oq, okv, op) = offsets(b, g);
        let mut spec = Gemm::nn(t, d, t);
        (spec.lda, spec.ldb, spec.ldc) = (t, kvd, qd);
        (spec.offset_a, spec.offset_b, spec.offset_c) = (op, okv, oq);
        (spec.batch, spec.stride_a, spec.stride_b, spec.stride_c) = (group, t * t, 0, d);
        spec
    };
    let reduce = |b: usize, g: usize, j: usize| {
        let (oq, okv, op) = offsets(b, g);
        let mut spec = Gemm::tn(t, d, t).beta(if j == 0 { 0.0 } else { 1.0 });
        (spec.lda, spec.ldb, spec.ldc) = (t, qd, kvd);
        (spec.offset_a, spec.offset_b, spec.offset_c) = (op + j * t * t, oq + j * d, okv);
        spec
    };
    let groups = || (0..s.batch).flat_map(|b| (0..s.kv_heads).map(move |g| (b, g)));
    for (b, g) in groups() {
        be.gemm(&scores(b, g), &q, &k, &mut probs).unwrap();
    }
    match &lbuf {
        None => be.softmax_causal(&mut probs, mats, t, scale).unwrap(),
        Some(l) => be.softmax_masked(&mut probs, l, mats, s.heads, t, scale).unwrap(),
    }
    for (b, g) in groups() {
        be.gemm(&apply(b, g), &probs, &v, &mut out).unwrap();
    }
    let (mut dprobs, mut dscores) = (be.alloc::<F>(mats * t * t).unwrap(), be.alloc::<F>(mats * t * t).unwrap());
    let (mut dq, mut dk, mut dv) =
        (be.alloc::<F>(x.q.len()).unwrap(), be.alloc::<F>(x.k.len()).unwrap(), be.alloc::<F>(x.v.len()).unwrap());
    for (b, g) in groups() {
        be.gemm(&scores(b, g), &dout, &v, &mut dprobs).unwrap();
        for j in 0..group {
            be.gemm(&reduce(b, g, j), &probs, &dout, &mut dv).unwrap();
        }
    }
    match &lbuf {
        None => be.softmax_causal_backward(&probs, &dprobs, &mut dscores, mats, t, scale).unwrap(),
        Some(l) => be.softmax_masked_backward(&probs, &dprobs, &mut dscores, l, mats, s.heads, t, scale).unwrap(),
    }
    for (b, g) in groups() {
        be.gemm(&apply(b, g), &dscores, &k, &mut dq).unwrap();
        for j in 0..group {
            be.gemm(&reduce(b, g, j), &dscores, &q, &mut dk).unwrap();
        }
    }
    [out.to_vec(), dq.to_vec(), dk.to_vec(), dv.to_vec()]
}

fn check_bits<F: Real>() {
    let be = Cpu::new();
    for (n, &c) in CASES.iter().enumerate() {
        let s = shape(c);
        let lens = (!c.5).then(|| lengths(s.batch, s.seq));
        let x = inputs(&s, 200 + n as u64);
        let want = unfused::<F>(&be, &s, lens.as_deref(), &x);
        let (out, _, dq, dk, dv) = run_twin::<F>(&be, &s, lens.as_deref(), Precision::Full, &x);
        for (name, got, want) in
            [("out", out, &want[0]), ("dq", dq, &want[1]), ("dk", dk, &want[2]), ("dv", dv, &want[3])]
        {
            let bits = |v: f64| v.to_bits();
            let i = got.iter().zip(want.iter()).position(|(g, w)| bits(*g) != bits(w.to_f64()));
            assert!(i.is_none(), "{} case {n} {name}: differs from the unfused path at {i:?}", F::NAME);
        }
    }
}

#[test]
fn twin_is_bit_identical_to_the_unfused_ops() {
    check_bits::<f32>();
    check_bits::<f64>();
}

#[test]
fn scratch_is_per_call_and_rows_without_keys_are_zero() {
    let be = Cpu::new();
    let s = AttentionShape { batch: 2, seq: 9, heads: 4, kv_heads: 2, head_dim: 8 };
    let x = inputs(&s, 7);
    let before = be.memory_stats().current_bytes;
    let lens = [0u32, 5];
    let (out, stats, dq, dk, dv) = run_twin::<f32>(&be, &s, Some(&lens), Precision::Full, &x);
    assert_eq!(be.memory_stats().current_bytes, before, "scratch outlived the calls");
    // Sequence 0 has no real token: zero outputs and gradients, statistics (-inf, 0).
    let n0 = s.seq * s.q_dim();
    assert!(out[..n0].iter().chain(&dq[..n0]).all(|&v| v == 0.0));
    assert!(dk[..s.seq * s.kv_dim()].iter().chain(&dv[..s.seq * s.kv_dim()]).all(|&v| v == 0.0));
    let rows = s.rows();
    for h in 0..s.heads {
        for i in 0..s.seq {
            assert_eq!((stats[h * s.seq + i], stats[rows + h * s.seq + i]), (f64::NEG_INFINITY, 0.0));
        }
    }
    // Keys past the length get no gradient; padded query rows still attend to the real keys.
    let kv_row = |i: usize| (s.seq + i) * s.kv_dim();
    assert!(dk[kv_row(5)..kv_row(9)].iter().all(|&v| v == 0.0));
    assert!(out[(s.seq + 7) * s.q_dim()..(s.seq + 8) * s.q_dim()].iter().any(|&v| v != 0.0));
}

#[test]
fn bad_arguments_are_errors() {
    let be = Cpu::new();
    let s = AttentionShape { batch: 2, seq: 3, heads: 4, kv_heads: 2, head_dim: 4 };
    let n = s.batch * s.seq * s.q_dim();
    let nkv = s.batch * s.seq * s.kv_dim();
    let buf = |len: usize| be.alloc::<f32>(len).unwrap();
    let (q, k, v) = (buf(n), buf(nkv), buf(nkv));
    let (mut out, mut stats) = (buf(n), buf(s.stats_len()));
    let fwd =
        |s: &AttentionShape,
         q: &CpuBuf<f32>,
         mask: AttentionMask<'_, Cpu>,
         out: &mut CpuBuf<f32>,
         stats: &mut CpuBuf<f32>| { be.attention_forward(s, mask, Precision::Full, q, &k, &v, out, stats) };
    let bad_split = AttentionShape { kv_heads: 3, ..s };
    let e = fwd(&bad_split, &q, AttentionMask::Causal, &mut out, &mut stats).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { op: "attention_forward", .. }), "{e}");
    let short_q = buf(n - 1);
    let e = fwd(&s, &short_q, AttentionMask::Causal, &mut out, &mut stats).unwrap_err();
    assert!(matches!(e, Error::Shape { op: "attention_forward", ref what, .. } if what == "q"), "{e}");
    let mut short_stats = buf(s.stats_len() - 1);
    let e = fwd(&s, &q, AttentionMask::Causal, &mut out, &mut short_stats).unwrap_err();
    assert!(matches!(e, Error::Shape { ref what, .. } if what == "stats"), "{e}");
    let one_length = be.upload(&[3u32]).unwrap();
    let e = fwd(&s, &q, AttentionMask::Padding(&one_length), &mut out, &mut stats).unwrap_err();
    assert!(matches!(e, Error::Shape { ref what, .. } if what == "lengths"), "{e}");
    let (mut dq, mut dk, mut dv) = (buf(n), buf(nkv - 1), buf(nkv));
    let grads = AttentionGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv, dv_half: None };
    let e = be.attention_backward(&s, AttentionMask::Causal, Precision::Full, &q, &k, &v, &out, &stats, &q, grads);
    assert!(matches!(e, Err(Error::Shape { op: "attention_backward", ref what, .. }) if what == "dk"), "{e:?}");
}

/// The models keep no `(batch, heads, seq, seq)` buffer: at the same number of tokens, 1
/// sequence of 128 leaves no more bytes allocated after a forward and backward than 8 of 16
/// (a kept probability buffer would be 8x larger for the long sequence; LLaMA's buffers are
/// all per token, so the two are equal; BERT adds per-sequence ones: lengths, pooled rows).
#[test]
fn models_keep_nothing_of_size_seq_squared() {
    use sparsegrad::linear::trainable::{Method, TrainOptions};
    use sparsegrad::model::bert::{BertModel, BertPlan, BertWeights};
    use sparsegrad::model::config::LlamaConfig;
    use sparsegrad::model::llama::{LlamaModel, MlpPlan, TokenBatch};
    use sparsegrad::model::weights::LlamaWeights;
    use sparsegrad::model::TrainingSetup;
    let c = LlamaConfig {
        hidden: 16,
        ffn: 24,
        layers: 3,
        heads: 4,
        kv_heads: 2,
        head_dim: 4,
        rope_theta: 10000.0,
        rms_eps: 1e-5,
        vocab: 37,
        tied_embeddings: true,
        max_seq: 128,
        bos: Some(1),
        eos: Some(2),
        rope_scaling: None,
    };
    let w = LlamaWeights::random(&c, 3).unwrap();
    let llama_bytes = |batch: usize, seq: usize| {
        let cpu = Cpu::new();
        let setup =
            TrainingSetup { plan: MlpPlan::every(&c, 1, Method::Full), bases: None, options: TrainOptions::default() };
        let mut m = LlamaModel::<Cpu, f32>::new(&cpu, &w, &setup, 128).unwrap();
        let ids: Vec<u32> = (0..batch * seq).map(|i| (i % 37) as u32).collect();
        let mask = vec![1.0; batch * seq];
        m.forward(&TokenBatch { ids: &ids, targets: &ids, mask: &mask, batch, seq }, 1.0).unwrap();
        m.backward().unwrap();
        cpu.memory_stats().current_bytes
    };
    assert_eq!(llama_bytes(8, 16), llama_bytes(1, 128), "LLaMA: memory depends on seq beyond the token count");
    let bc = sparsegrad::model::bert::BertConfig { max_positions: 128, ..common::bert::tiny() };
    let bw = BertWeights::random(&bc, 3).unwrap();
    let bert_bytes = |batch: usize, seq: usize| {
        let cpu = Cpu::new();
        let setup =
            TrainingSetup { plan: BertPlan::all(&bc, Method::Full), bases: None, options: TrainOptions::default() };
        let mut m =
            BertModel::<Cpu, f32>::new(&cpu, &bw, &setup, &common::bert::head(sparsegrad::PoolKind::Mean)).unwrap();
        let ids: Vec<u32> = (0..batch * seq).map(|i| (i % 23) as u32).collect();
        let lengths = vec![seq as u32; batch];
        m.forward(&ids, &lengths, &vec![1; batch], batch, seq, 1.0).unwrap();
        m.backward().unwrap();
        cpu.memory_stats().current_bytes
    };
    let (short, long) = (bert_bytes(8, 16), bert_bytes(1, 128));
    assert!(long <= short, "BERT: one sequence of 128 keeps {long} bytes, 8 of 16 keep {short}");
}
