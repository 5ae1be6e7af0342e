//! MLP blocks on CUDA against the CPU (the specification): [`BertMlp`] and [`LlamaMlp`] with
//! every training method (frozen, collect, full, SparseGrad in both formulations at 5% and
//! 100%, LoRA, MeProp), in f32 and in bf16 precision (the CPU runs the same bf16
//! precision), on ragged shapes, for a few training steps: outputs, input gradients, every
//! projection's gradients (dense `dW`, the selected COO, LoRA's `dA`/`dB`, biases) and the
//! merged weights after the steps.
//!
//! Without a device each test prints `skipped: no CUDA device`. The same check also runs
//! CPU-against-CPU, bit-identical and with the "device" inputs perturbed by 1e-6 relative
//! (standing in for another device's rounding), which validates the harness and its
//! tolerances here.
//!
//! Tolerances are normalised by the reference tensor's largest entry: 1e-4 in f32, 2e-2 in
//! bf16. A top-k selection may differ between devices only at its boundary (entries whose
//! magnitudes tie to rounding); such entries are checked to sit at the boundary, and the
//! case stops comparing its trajectory there (the weights then legitimately diverge).
//! f32 trains with Adam at `eps = 1e-2`, bf16 with SGD: Adam's first step is
//! `lr g / (|g| + eps)`, about `lr sign(g)` at the default eps, which rounding differences
//! between devices flip for near-zero gradients; a larger eps (f32) or an update linear in
//! the gradient (bf16, whose differences are larger) keeps the trajectories comparable.
#![cfg(feature = "cuda")]

mod common;
mod cuda_common;

use cuda_common::cuda_test;

use common::{rand_vec, rng};
use sparsegrad::linear::trainable::{Linear, Method, TrainOptions};
use sparsegrad::mlp::{BertMlp, BertMlpConfig, LlamaMlp, MlpShape, Projection, ProjectionSpec};
use sparsegrad::{
    AdamParams, Backend, Basis, Cpu, Cuda, Formulation, GeluKind, HostCoo, Keep, Optimizer, Precision, Selection,
};
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Bert,
    Llama,
}

/// `(name, out, in, has bias)` of each projection, in `projections()` order.
fn layout(kind: Kind, hidden: usize, ffn: usize) -> Vec<(&'static str, usize, usize, bool)> {
    match kind {
        Kind::Bert => vec![("dense_in", ffn, hidden, true), ("dense_out", hidden, ffn, true)],
        Kind::Llama => vec![("gate", ffn, hidden, false), ("up", ffn, hidden, false), ("down", hidden, ffn, false)],
    }
}

fn variants() -> Vec<(&'static str, Method)> {
    let sg = |keep, f| Method::SparseGrad { keep, selection: Selection::Exact, formulation: Some(f) };
    let part = Keep::Fraction(0.05);
    vec![
        ("frozen", Method::Frozen),
        ("collect", Method::Collect),
        ("full", Method::Full),
        ("sparsegrad transformed 5%", sg(part, Formulation::Transformed)),
        ("sparsegrad merged 5%", sg(part, Formulation::Merged)),
        ("sparsegrad transformed 100%", sg(Keep::Fraction(1.0), Formulation::Transformed)),
        ("sparsegrad merged 100%", sg(Keep::Fraction(1.0), Formulation::Merged)),
        ("lora r4", Method::Lora { rank: 4, alpha: 8.0 }),
        ("meprop 5%", Method::MeProp { keep: part }),
    ]
}

#[allow(clippy::large_enum_variant)]
enum Block<B: Backend + Clone> {
    Bert(BertMlp<B>),
    Llama(LlamaMlp<B>),
}

impl<B: Backend + Clone> Block<B> {
    #[allow(clippy::too_many_arguments)]
    fn build(
        be: &B,
        kind: Kind,
        hidden: usize,
        ffn: usize,
        w: &[Vec<f32>],
        b: &[Option<Vec<f32>>],
        method: Method,
        bases: &[Basis],
        opts: &TrainOptions,
    ) -> Self {
        let spec = |i: usize| ProjectionSpec {
            weight: &w[i],
            bias: b[i].as_deref(),
            method,
            group: bases[i].group(),
            basis: Some(&bases[i]),
        };
        match kind {
            Kind::Bert => Block::Bert(
                BertMlp::new(
                    be,
                    MlpShape { hidden, ffn },
                    [spec(0), spec(1)],
                    BertMlpConfig { gelu: GeluKind::Erf, options: *opts },
                )
                .expect("BertMlp::new"),
            ),
            Kind::Llama => Block::Llama(
                LlamaMlp::new(be, MlpShape { hidden, ffn }, [spec(0), spec(1), spec(2)], opts).expect("LlamaMlp::new"),
            ),
        }
    }
    fn forward(&mut self, x: &B::Buf<f32>, t: usize, y: &mut B::Buf<f32>) {
        match self {
            Block::Bert(m) => m.forward(x, t, y),
            Block::Llama(m) => m.forward(x, t, y),
        }
        .expect("forward")
    }
    fn backward(&mut self, g: &B::Buf<f32>, t: usize, dx: &mut B::Buf<f32>) {
        match self {
            Block::Bert(m) => m.backward(g, t, Some(dx)),
            Block::Llama(m) => m.backward(g, t, Some(dx)),
        }
        .expect("backward")
    }
    fn step(&mut self) {
        match self {
            Block::Bert(m) => m.step(),
            Block::Llama(m) => m.step(),
        }
        .expect("step")
    }
    fn projections(&self) -> Vec<&Projection<B, f32>> {
        match self {
            Block::Bert(m) => m.projections().to_vec(),
            Block::Llama(m) => m.projections().to_vec(),
        }
    }
}

/// A dense orthogonal `(n, n)` matrix in O(n^2): the product of three Householder
/// reflections `I - 2 v v^T / |v|^2` with random `v`, formed in f64.
fn orthogonal(r: &mut rand::rngs::SmallRng, n: usize) -> Vec<f32> {
    let mut m = vec![0.0f64; n * n];
    m.iter_mut().step_by(n + 1).for_each(|d| *d = 1.0);
    for _ in 0..3 {
        let v: Vec<f64> = rand_vec(r, n).into_iter().map(f64::from).collect();
        let s = 2.0 / v.iter().map(|x| x * x).sum::<f64>();
        // M <- M (I - s v v^T) = M - s (M v) v^T
        let mv: Vec<f64> = m.chunks_exact(n).map(|row| row.iter().zip(&v).map(|(a, b)| a * b).sum()).collect();
        for (row, &w) in m.chunks_exact_mut(n).zip(&mv) {
            row.iter_mut().zip(&v).for_each(|(a, &b)| *a -= s * w * b);
        }
    }
    m.into_iter().map(|x| x as f32).collect()
}

fn basis(r: &mut rand::rngs::SmallRng, group: &str, out: usize, inp: usize) -> Basis {
    let (p, q) = (orthogonal(r, out), orthogonal(r, inp));
    Basis::from_parts(group, out, inp, p, q, vec![1.0; out], vec![1.0; inp], 1).expect("valid basis")
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

/// `|got - want| <= tol (max|want| + |want|)` elementwise.
fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    cuda_common::assert_close(what, got, want, tol * max_abs(want), tol);
}

/// Compares two top-k selections. Entries in both must agree in value; an entry in only one
/// must sit at the selection boundary (its magnitude within the tolerance of the k-th
/// largest). Returns whether the selected sets are identical.
fn close_coo(what: &str, got: &HostCoo<f32>, want: &HostCoo<f32>, tol: f32) -> bool {
    assert_eq!(got.len(), want.len(), "{what}: entries kept");
    assert_eq!(got.shape, want.shape, "{what}: shape");
    let scale = max_abs(&want.values);
    let kth = want.values.iter().fold(f32::INFINITY, |m, v| m.min(v.abs()));
    let key = |c: &HostCoo<f32>, e: usize| (c.rows[e], c.cols[e]);
    let want_map: HashMap<(u32, u32), f32> = (0..want.len()).map(|e| (key(want, e), want.values[e])).collect();
    let got_map: HashMap<(u32, u32), f32> = (0..got.len()).map(|e| (key(got, e), got.values[e])).collect();
    let mut same = true;
    for (k, &g) in &got_map {
        match want_map.get(k) {
            Some(&w) => assert!((g - w).abs() <= tol * (scale + w.abs()), "{what}: entry {k:?}: got {g:e}, want {w:e}"),
            None => {
                same = false;
                assert!(
                    (g.abs() - kth).abs() <= 2.0 * tol * scale,
                    "{what}: {k:?} = {g:e} selected only on the device, far from the boundary {kth:e}"
                );
            }
        }
    }
    for (k, &w) in &want_map {
        if !got_map.contains_key(k) {
            assert!(
                (w.abs() - kth).abs() <= 2.0 * tol * scale,
                "{what}: {k:?} = {w:e} selected only on the CPU, far from the boundary {kth:e}"
            );
        }
    }
    // Sorted by linear index on both.
    for c in [got, want] {
        let lin: Vec<u64> = (0..c.len()).map(|e| c.rows[e] as u64 * c.shape.1 as u64 + c.cols[e] as u64).collect();
        assert!(lin.windows(2).all(|w| w[0] < w[1]), "{what}: COO not sorted by linear index");
    }
    same
}

/// Compares one projection's gradients; returns whether its selections (if any) agree.
fn compare_grads<B: Backend + Clone>(
    what: &str,
    dev: &Projection<B, f32>,
    cpu: &Projection<Cpu, f32>,
    tol: f32,
) -> bool {
    match (&dev.linear, &cpu.linear) {
        (Linear::Dense(d), Linear::Dense(c)) => {
            if cpu.method == Method::Frozen {
                assert!(d.grad_host().is_err(), "{what}: a frozen projection has a weight gradient");
                return true;
            }
            close(&format!("{what}: dW"), &d.grad_host().unwrap(), &c.grad_host().unwrap(), tol);
            match (d.bias_grad_host().unwrap(), c.bias_grad_host().unwrap()) {
                (Some(gd), Some(gc)) => close(&format!("{what}: db"), &gd, &gc, tol),
                (None, None) => {}
                _ => panic!("{what}: bias gradient on one side only"),
            }
            match cpu.method {
                Method::MeProp { .. } => close_coo(
                    &format!("{what}: MeProp COO"),
                    &d.coo_grad_host().unwrap(),
                    &c.coo_grad_host().unwrap(),
                    tol,
                ),
                _ => true,
            }
        }
        (Linear::SparseGrad(d), Linear::SparseGrad(c)) => {
            match (d.bias_grad_host().unwrap(), c.bias_grad_host().unwrap()) {
                (Some(gd), Some(gc)) => close(&format!("{what}: db"), &gd, &gc, tol),
                (None, None) => {}
                _ => panic!("{what}: bias gradient on one side only"),
            }
            assert_eq!(d.formulation(), c.formulation(), "{what}: formulation");
            close_coo(&format!("{what}: dWt COO"), &d.grad_host().unwrap(), &c.grad_host().unwrap(), tol)
        }
        (Linear::Lora(d), Linear::Lora(c)) => {
            let ((da, db), (ca, cb)) = (d.grad_host().unwrap(), c.grad_host().unwrap());
            close(&format!("{what}: dA"), &da, &ca, tol);
            // dB = s g^T (x A^T): nonzero from the first step.
            close(&format!("{what}: dB"), &db, &cb, tol);
            true
        }
        _ => panic!("{what}: projections of different types"),
    }
}

/// Runs every variant of a `kind` block on `dev` and on the CPU for `steps` steps.
/// `noise`: relative perturbation of the device's inputs (the harness self-check uses it to
/// stand in for rounding differences between devices; 0 on a real device).
fn check_blocks<B: Backend + Clone>(
    dev: &B,
    kind: Kind,
    (hidden, ffn, t): (usize, usize, usize),
    precision: Precision,
    steps: usize,
    noise: f32,
) {
    let tol = if precision == Precision::Full { 1e-4 } else { 2e-2 };
    let optimizer = match precision {
        // eps well above the devices' gradient differences (~1e-6) and well below typical
        // gradients: Adam's first step `lr g / (|g| + eps)` is then continuous in g, not
        // `lr sign(g)` for every |g| > 1e-8, which rounding could flip.
        Precision::Full => Optimizer::Adam(AdamParams { lr: 1e-3, eps: 1e-2, ..Default::default() }),
        Precision::Bf16 => Optimizer::Sgd { lr: 0.05 },
    };
    let opts = TrainOptions { optimizer, precision, expected_tokens: t, seed: 9 };
    let lay = layout(kind, hidden, ffn);
    for (vname, method) in variants() {
        let case = format!("{kind:?} {hidden}->{ffn}->{hidden} T={t} {precision:?} {vname}");
        let mut r = rng(1234);
        let w: Vec<Vec<f32>> = lay
            .iter()
            .map(|&(_, o, i, _)| rand_vec(&mut r, o * i).iter().map(|v| v * 1.5 / (i as f32).sqrt()).collect())
            .collect();
        let b: Vec<Option<Vec<f32>>> = lay
            .iter()
            .map(|&(_, o, _, bias)| bias.then(|| rand_vec(&mut r, o).iter().map(|v| 0.5 * v).collect()))
            .collect();
        let bases: Vec<Basis> = lay.iter().map(|&(name, o, i, _)| basis(&mut r, name, o, i)).collect();
        let cpu = Cpu::new();
        let mut want = Block::build(&cpu, kind, hidden, ffn, &w, &b, method, &bases, &opts);
        let mut got = Block::build(dev, kind, hidden, ffn, &w, &b, method, &bases, &opts);
        let (mut yc, mut dxc) = (cpu.alloc(t * hidden).unwrap(), cpu.alloc(t * hidden).unwrap());
        let (mut yd, mut dxd) = (dev.alloc(t * hidden).unwrap(), dev.alloc(t * hidden).unwrap());
        let mut diverged = false;
        let mut noise_rng = rng(99);
        for s in 0..steps {
            let x = rand_vec(&mut r, t * hidden);
            let g = rand_vec(&mut r, t * hidden);
            let (xc, gc) = (cpu.upload(&x).unwrap(), cpu.upload(&g).unwrap());
            let jitter = |v: &[f32], r: &mut rand::rngs::SmallRng| -> Vec<f32> {
                v.iter().zip(rand_vec(r, v.len())).map(|(a, e)| a * (1.0 + noise * e)).collect()
            };
            let (xd, gd) =
                (dev.upload(&jitter(&x, &mut noise_rng)).unwrap(), dev.upload(&jitter(&g, &mut noise_rng)).unwrap());
            want.forward(&xc, t, &mut yc);
            got.forward(&xd, t, &mut yd);
            close(&format!("{case} step {s}: y"), &dev.download(&yd, t * hidden).unwrap(), &yc, tol);
            want.backward(&gc, t, &mut dxc);
            got.backward(&gd, t, &mut dxd);
            close(&format!("{case} step {s}: dx"), &dev.download(&dxd, t * hidden).unwrap(), &dxc, tol);
            let mut same = true;
            for (pd, pc) in got.projections().into_iter().zip(want.projections()) {
                same &= compare_grads(&format!("{case} step {s} {}", pc.name), pd, pc, tol);
            }
            if !same {
                println!(
                    "{case}: step {s}: the top-k selections differ at the boundary; trajectory comparison stops here"
                );
                diverged = true;
                break;
            }
            want.step();
            got.step();
        }
        if diverged {
            continue;
        }
        for (i, (pd, pc)) in got.projections().into_iter().zip(want.projections()).enumerate() {
            let what = format!("{case} {} after {steps} steps", pc.name);
            let (wd, wc) = (pd.linear.merged_weight().unwrap(), pc.linear.merged_weight().unwrap());
            close(&format!("{what}: merged W"), &wd, &wc, tol);
            // The change itself, against its own scale: the sharper test of the update.
            let delta = |m: &[f32]| m.iter().zip(&w[i]).map(|(a, b)| a - b).collect::<Vec<f32>>();
            let (dd, dc) = (delta(&wd), delta(&wc));
            if max_abs(&dc) > 0.0 {
                close(&format!("{what}: W - W0"), &dd, &dc, if precision == Precision::Full { 1e-3 } else { tol });
            } else {
                assert_eq!(max_abs(&dd), 0.0, "{what}: the weight moved on the device only");
            }
            match (pd.linear.bias_host().unwrap(), pc.linear.bias_host().unwrap()) {
                (Some(bd), Some(bc)) => close(&format!("{what}: bias"), &bd, &bc, tol),
                (None, None) => {}
                _ => panic!("{what}: bias on one side only"),
            }
        }
    }
}

const SMALL: (usize, usize, usize) = (17, 33, 29);
const LARGE: (usize, usize, usize) = (160, 600, 301);

fn on_cuda(cuda: &Cuda, kind: Kind, precision: Precision) {
    for shape in [SMALL, LARGE] {
        check_blocks(cuda, kind, shape, precision, 3, 0.0);
    }
}

cuda_test!(fn bert_on_cuda_matches_cpu_f32(cuda) {
    on_cuda(&cuda, Kind::Bert, Precision::Full);
});

cuda_test!(fn bert_on_cuda_matches_cpu_bf16(cuda) {
    on_cuda(&cuda, Kind::Bert, Precision::Bf16);
});

cuda_test!(fn llama_on_cuda_matches_cpu_f32(cuda) {
    on_cuda(&cuda, Kind::Llama, Precision::Full);
});

cuda_test!(fn llama_on_cuda_matches_cpu_bf16(cuda) {
    on_cuda(&cuda, Kind::Llama, Precision::Bf16);
});

/// The same check with a second CPU backend as the "device": validates the harness (every
/// variant builds, steps and compares) on machines without a GPU. Bit-identical first; then
/// with the device's inputs perturbed by 1e-6 relative, standing in for the rounding
/// differences of another device, so the tolerances and the boundary handling of top-k
/// selections are exercised too (at bf16, such perturbations flip some bf16 roundings).
#[test]
fn harness_self_check_on_cpu() {
    let other = Cpu::new();
    for kind in [Kind::Bert, Kind::Llama] {
        for precision in [Precision::Full, Precision::Bf16] {
            check_blocks(&other, kind, (7, 13, 11), precision, 2, 0.0);
            check_blocks(&other, kind, SMALL, precision, 3, 1e-6);
        }
    }
}

/// The larger shape under the same perturbation, in bf16 (where perturbations matter most;
/// a few seconds on the CPU: the merged formulation at keep = 100% multiplies its sparse
/// change scalar by scalar, `2 k in` flops with k = out in).
#[test]
fn harness_self_check_on_cpu_large() {
    let other = Cpu::new();
    for kind in [Kind::Bert, Kind::Llama] {
        check_blocks(&other, kind, LARGE, Precision::Bf16, 2, 1e-6);
    }
}

fn coo(entries: &[(u32, u32, f32)]) -> HostCoo<f32> {
    HostCoo {
        rows: entries.iter().map(|e| e.0).collect(),
        cols: entries.iter().map(|e| e.1).collect(),
        values: entries.iter().map(|e| e.2).collect(),
        shape: (4, 4),
    }
}

/// The boundary-tolerant comparison accepts a swap of two entries that tie at the k-th
/// magnitude, and reports it.
#[test]
fn selection_compare_accepts_a_tie_at_the_boundary() {
    let want = coo(&[(0, 1, 2.0), (1, 2, -1.0), (3, 3, 0.5)]);
    assert!(close_coo("same", &want, &want, 1e-4));
    let got = coo(&[(0, 1, 2.0), (1, 2, -1.0), (3, 0, 0.50001)]);
    assert!(!close_coo("tie", &got, &want, 1e-4));
}

#[test]
#[should_panic(expected = "far from the boundary")]
fn selection_compare_rejects_a_wrong_entry() {
    let want = coo(&[(0, 1, 2.0), (1, 2, -1.0), (3, 3, 0.5)]);
    let got = coo(&[(0, 1, 2.0), (1, 2, -1.0), (3, 0, 0.9)]);
    close_coo("wrong", &got, &want, 1e-4);
}

#[test]
#[should_panic(expected = "entry (1, 2)")]
fn selection_compare_rejects_a_wrong_value() {
    let want = coo(&[(0, 1, 2.0), (1, 2, -1.0), (3, 3, 0.5)]);
    let got = coo(&[(0, 1, 2.0), (1, 2, -1.1), (3, 3, 0.5)]);
    close_coo("value", &got, &want, 1e-4);
}
