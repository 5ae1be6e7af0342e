//! bf16 and TF32 against the f32 specification (issue 18, item 3), and the GPU's merged
//! update against it in f32 (item 5).
//!
//! A SparseGradLinear (both formulations, every merged update) runs one forward, backward
//! (all entries kept, so the selection is the whole `dWt`) and SGD step; `y`, `dx`, `dWt`
//! and the merged weight are compared elementwise with a plain f64 evaluation of the f32
//! specification on the same f32 inputs and basis. The tolerance of each element follows
//! from the rounding the mode does, never from a fitted constant:
//!
//! - rounding to a format of unit roundoff `u` (bf16 keeps 8 significant bits: `u = 2^-8`;
//!   TF32 11: `u = 2^-11`; f32 24: `2^-24`) multiplies a value by `(1 + d)`, `|d| <= u`;
//! - a product chain whose operands went through `r` such roundings on their way (inputs,
//!   the basis, the staged intermediates) is, entry by entry, within `((1 + u)^r - 1)` times
//!   the same chain evaluated on absolute values (`|P|^T |g|^T |x| |Q|` for `dWt`): each
//!   rounding scales one factor of every term by at most `1 + u`;
//! - accumulating in f32 adds at most `n 2^-24` of that absolute chain, `n` the summed
//!   inner dimensions (plus a few roundings of sums); so an element's bound is
//!   `((1 + u)^r (1 + n 2^-24) - 1) |chain|`.
//!
//! Roundings `r` per output (bf16: every GEMM operand is bf16; TF32: the tensor cores round
//! every f32 operand): merged `y = x W^T` and `dx = g W`: 2 (x or g, and W); transformed
//! `y = ((x Q) Wt^T) P^T`: 6 (x, Q, xt, Wt, h, P), `dx = ((g P) Wt) Q^T`: 6; `dWt` in every
//! order (`P^T (g^T x) Q`: g, x, dW, P, P^T dW, Q; `(g P)^T (x Q)`: g, P, gt, x, Q, xt): 6;
//! the merged update `W += P (D Q^T)`: 4 (D, Q, E, P) on top of `D`'s own error (`lr` times
//! `dWt`'s bound, carried through `|P| . |Q^T|`); the transformed form's `Wt = P^T W Q` and its
//! merge back are exact f32 in every mode (`Gemm::exact_f32` under TF32, the f32 basis in
//! bf16), so only `dWt`'s error reaches its weight. In f32 (`u = 0`) only the accumulation term
//! is left: that is the tolerance the GPU's merged update (Dense, Runs) is held to against
//! the CPU's specification.
#![cfg(feature = "cuda")]

mod common;
mod cuda_common;

use common::{matmul, rand_vec, random_basis, rng, transpose};
use cuda_common::cuda_test;
use sparsegrad::perf::{ElemType, EventKind, GemmCompute};
use sparsegrad::{
    Backend, Cpu, Cuda, Formulation, Keep, MergedUpdate, Optimizer, Precision, ProfileOptions, SparseGradConfig,
    SparseGradLinear,
};

const U_BF16: f64 = 1.0 / 256.0;
const U_TF32: f64 = 1.0 / 2048.0;
const U_F32: f64 = 1.0 / 16_777_216.0;
const LR: f32 = 0.05;

/// `(out, in, tokens)`: ragged; `(64, 40, 7)` takes the merged token order, the others the
/// weight order.
const SHAPES: [(usize, usize, usize); 4] = [(17, 33, 29), (64, 40, 7), (40, 64, 100), (1, 5, 1)];

fn abs(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| x.abs()).collect()
}

/// The f32 specification in f64 for one layer step, with the absolute chains.
struct Spec {
    y: Vec<f64>,
    dx: Vec<f64>,
    dwt: Vec<f64>,
    w_new: Vec<f64>,
    /// `|chain|` of y and dx per formulation, of dWt, and of the update `|P| |dWt| |Q^T|`.
    y_abs: Vec<f64>,
    dx_abs: Vec<f64>,
    dwt_abs: Vec<f64>,
    update_abs: Vec<f64>,
    /// `|P| |P^T| |W| |Q| |Q^T|`: the transformed form's round trip of the weight.
    w_trip_abs: Vec<f64>,
}

struct Inputs {
    w: Vec<f32>,
    b: Vec<f32>,
    x: Vec<f32>,
    g: Vec<f32>,
    basis: sparsegrad::Basis,
}

fn inputs(out: usize, inp: usize, tokens: usize, seed: u64) -> Inputs {
    let mut r = rng(seed);
    let w = rand_vec(&mut r, out * inp);
    let b = rand_vec(&mut r, out);
    let basis = random_basis(&mut r, "g", out, inp);
    let x = rand_vec(&mut r, tokens * inp);
    let g = rand_vec(&mut r, tokens * out);
    Inputs { w, b, x, g, basis }
}

fn spec(i: &Inputs, out: usize, inp: usize, t: usize, transformed: bool) -> Spec {
    let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let (w, b, x, g, p, q) = (f(&i.w), f(&i.b), f(&i.x), f(&i.g), f(i.basis.p()), f(i.basis.q()));
    let (pt, qt, wtr) = (transpose(&p, out, out), transpose(&q, inp, inp), transpose(&w, out, inp));
    let wt = matmul(&matmul(&pt, &w, out, out, inp), &q, out, inp, inp);
    let add_bias = |m: Vec<f64>, bias: &[f64]| -> Vec<f64> {
        m.chunks(out).flat_map(|row| row.iter().zip(bias).map(|(a, b)| a + b).collect::<Vec<_>>()).collect()
    };
    let y = add_bias(matmul(&x, &wtr, t, inp, out), &b);
    let dx = matmul(&g, &w, t, out, inp);
    let gt_x = matmul(&transpose(&g, t, out), &x, out, t, inp);
    let dwt = matmul(&matmul(&pt, &gt_x, out, out, inp), &q, out, inp, inp);
    let (ap, aq, apt, aqt, ax, ag) = (abs(&p), abs(&q), abs(&pt), abs(&qt), abs(&x), abs(&g));
    // |Wt| bounded by its f32 chain |P^T| |W| |Q| (Wt is computed in f32 from W).
    let aw = abs(&w);
    let awt = matmul(&matmul(&apt, &aw, out, out, inp), &aq, out, inp, inp);
    let (y_abs, dx_abs) = if transformed {
        let xq = matmul(&ax, &aq, t, inp, inp);
        let h = matmul(&xq, &transpose(&awt, out, inp), t, inp, out);
        let gp = matmul(&ag, &ap, t, out, out);
        (add_bias(matmul(&h, &apt, t, out, out), &abs(&b)), matmul(&matmul(&gp, &awt, t, out, inp), &aqt, t, inp, inp))
    } else {
        (add_bias(matmul(&ax, &transpose(&aw, out, inp), t, inp, out), &abs(&b)), matmul(&ag, &aw, t, out, inp))
    };
    let agx = matmul(&transpose(&ag, t, out), &ax, out, t, inp);
    let dwt_abs = matmul(&matmul(&apt, &agx, out, out, inp), &aq, out, inp, inp);
    let lr = LR as f64;
    // Merged: W - lr P dWt Q^T; transformed: P (Wt - lr dWt) Q^T.
    let change = matmul(&matmul(&p, &dwt, out, out, inp), &qt, out, inp, inp);
    let w_new = if transformed {
        let wt_new: Vec<f64> = wt.iter().zip(&dwt).map(|(a, d)| a - lr * d).collect();
        matmul(&matmul(&p, &wt_new, out, out, inp), &qt, out, inp, inp)
    } else {
        w.iter().zip(&change).map(|(a, c)| a - lr * c).collect()
    };
    let update_abs = matmul(&matmul(&ap, &abs(&dwt), out, out, inp), &aqt, out, inp, inp);
    let w_trip_abs = matmul(&matmul(&ap, &awt, out, out, inp), &aqt, out, inp, inp);
    Spec { y, dx, dwt, w_new, y_abs, dx_abs, dwt_abs, update_abs, w_trip_abs }
}

/// `(1 + u)^r (1 + n 2^-24) - 1`: the relative bound of a chain (module docs).
fn rel_bound(u: f64, r: i32, n: usize) -> f64 {
    (1.0 + u).powi(r) * (1.0 + n as f64 * U_F32) - 1.0
}

/// Asserts `|got - want| <= tol` elementwise; names the worst element.
fn assert_within(what: &str, got: &[f32], want: &[f64], tol: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let mut worst = (0usize, f64::NEG_INFINITY);
    for (i, ((&a, &b), &t)) in got.iter().zip(want).zip(tol).enumerate() {
        let excess = (a as f64 - b).abs() - t;
        assert!(!excess.is_nan(), "{what}: NaN at {i}");
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    let i = worst.0;
    assert!(worst.1 <= 0.0, "{what}: element {i} = {} vs {} beyond its bound {}", got[i], want[i], tol[i]);
}

/// One step of a layer on `be` against the f32 specification with unit roundoff `u`.
fn check_step<B: Backend + Clone>(be: &B, what: &str, cfg: SparseGradConfig, u: f64, seed: u64) {
    for (out, inp, t) in SHAPES {
        let i = inputs(out, inp, t, seed);
        let mut layer = SparseGradLinear::new(be, &i.w, Some(&i.b), &i.basis, cfg).unwrap();
        let transformed = layer.formulation() == Formulation::Transformed;
        let what = format!("{what} {out}x{inp} T={t} {:?} {:?}", layer.formulation(), layer.merged_update());
        let s = spec(&i, out, inp, t, transformed);
        let (mut y, mut dx) = (be.alloc::<f32>(t * out).unwrap(), be.alloc::<f32>(t * inp).unwrap());
        layer.forward(&be.upload(&i.x).unwrap(), t, &mut y).unwrap();
        layer.backward(&be.upload(&i.g).unwrap(), t, Some(&mut dx)).unwrap();
        let grad = layer.grad_host().unwrap();
        assert_eq!(grad.len(), out * inp, "{what}: every entry kept");
        layer.step().unwrap();
        let n = t + 2 * (out + inp) + 8;
        let r_io = if transformed { 6 } else { 2 };
        let bound = |chain: &[f64], r: i32| -> Vec<f64> { chain.iter().map(|a| rel_bound(u, r, n) * a).collect() };
        assert_within(&format!("{what}: y"), &be.download(&y, t * out).unwrap(), &s.y, &bound(&s.y_abs, r_io));
        assert_within(&format!("{what}: dx"), &be.download(&dx, t * inp).unwrap(), &s.dx, &bound(&s.dx_abs, r_io));
        let dwt_tol = bound(&s.dwt_abs, 6);
        let mut dwt = vec![0.0f32; out * inp];
        for (e, l) in grad.linear_indices().into_iter().enumerate() {
            dwt[l as usize] = grad.values[e];
        }
        assert_within(&format!("{what}: dWt"), &dwt, &s.dwt, &dwt_tol);
        // dWt's bound carried through the update's products: |P| tol |Q^T|.
        let (ap, aqt) = (abs(&to64(i.basis.p())), abs(&transpose(&to64(i.basis.q()), inp, inp)));
        let carried = matmul(&matmul(&ap, &dwt_tol, out, out, inp), &aqt, out, inp, inp);
        let lr = LR as f64;
        let update_r = if transformed { 0 } else { 4 };
        let w_tol: Vec<f64> = (0..out * inp)
            .map(|j| {
                let update = lr * (rel_bound(u, update_r, n) * s.update_abs[j] + (1.0 + u).powi(4) * carried[j]);
                update + rel_bound(0.0, 0, n) * (s.w_trip_abs[j] + s.w_new[j].abs())
            })
            .collect();
        assert_within(
            &format!("{what}: merged weight after a step"),
            &layer.merged_weight().unwrap(),
            &s.w_new,
            &w_tol,
        );
    }
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn config(precision: Precision, formulation: Formulation, update: Option<MergedUpdate>) -> SparseGradConfig {
    SparseGradConfig {
        keep: Keep::Fraction(1.0),
        formulation: Some(formulation),
        merged_update: update,
        optimizer: Optimizer::Sgd { lr: LR },
        precision,
        ..Default::default()
    }
}

/// bf16 (every backend) and, on `be`, the f32 updates it offers.
fn check_modes<B: Backend + Clone>(be: &B, f32_updates: &[MergedUpdate]) {
    for formulation in [Formulation::Transformed, Formulation::Merged] {
        check_step(be, "bf16", config(Precision::Bf16, formulation, None), U_BF16, 7);
    }
    check_step(be, "f32", config(Precision::Full, Formulation::Transformed, None), 0.0, 8);
    for &u in f32_updates {
        check_step(be, "f32", config(Precision::Full, Formulation::Merged, Some(u)), 0.0, 9);
    }
}

cuda_test!(fn bf16_and_the_gpu_update_match_the_f32_specification(cuda) {
    check_modes(&cuda, &[MergedUpdate::Dense, MergedUpdate::Runs]);
});

cuda_test!(fn tf32_matches_the_f32_specification(cuda) {
    cuda.set_tf32(true);
    for formulation in [Formulation::Transformed, Formulation::Merged] {
        for update in [None, Some(MergedUpdate::Dense), Some(MergedUpdate::Runs)] {
            if formulation == Formulation::Transformed && update.is_some() {
                continue;
            }
            check_step(&cuda, "tf32", config(Precision::Full, formulation, update), U_TF32, 10);
        }
    }
    cuda.set_tf32(false);
});

#[test]
fn harness_on_cpu() {
    // The CPU's own f32 merged updates are its tuned sparse ones; it runs the GPU's too.
    check_modes(
        &Cpu::new(),
        &[MergedUpdate::SparseRows, MergedUpdate::SparseColumns, MergedUpdate::Dense, MergedUpdate::Runs],
    );
}

/// Rounds to TF32 (10 explicit mantissa bits) to nearest even, as the emulator's cuBLAS does.
fn tf32(x: f32) -> f32 {
    let b = x.to_bits();
    if b & 0x7f80_0000 == 0x7f80_0000 {
        return x;
    }
    f32::from_bits((b + 0x0fff + ((b >> 13) & 1)) & !0x1fff)
}

cuda_test!(fn tf32_gemm_rounds_its_operands_and_is_recorded(cuda) {
    use sparsegrad::backend::DenseOps;
    use sparsegrad::backend::Gemm;
    // 1 x 1 products that show the rounding: 1 + 2^-12 is below half a TF32 ulp (rounds to 1);
    // 1 + 2^-11 is a tie (to even: 1); 1 + 3 * 2^-11 a tie between 1 + 2^-10 (odd) and
    // 1 + 2^-9 (even).
    let cases = [(1.0 + 2f32.powi(-12), 1.0), (1.0 + 2f32.powi(-11), 1.0), (1.0 + 3.0 * 2f32.powi(-11), 1.0 + 2f32.powi(-9))];
    let one = cuda.upload(&[1.0f32]).unwrap();
    let mut c = cuda.alloc::<f32>(1).unwrap();
    for (a, want) in cases {
        assert_eq!(tf32(a), want);
        let a_buf = cuda.upload(&[a]).unwrap();
        cuda.set_tf32(true);
        cuda.profile_begin(ProfileOptions::default()).unwrap();
        cuda.gemm(&Gemm::nn(1, 1, 1), &a_buf, &one, &mut c).unwrap();
        let events = cuda.profile_end().unwrap();
        assert_eq!(cuda.download(&c, 1).unwrap()[0], want, "TF32 product of {a}");
        let computes: Vec<GemmCompute> = events
            .iter()
            .filter_map(|e| match e.kind {
                EventKind::Gemm { compute, .. } => Some(compute),
                _ => None,
            })
            .collect();
        assert_eq!(computes, [GemmCompute::F32FastTf32]);
        cuda.set_tf32(false);
        cuda.gemm(&Gemm::nn(1, 1, 1), &a_buf, &one, &mut c).unwrap();
        assert_eq!(cuda.download(&c, 1).unwrap()[0], a, "exact f32 product of {a}");
    }
    // A ragged product: exactly the f32 product of the TF32-rounded operands (f64 reference,
    // within f32 accumulation: (k + 1) 2^-24 of the absolute chain).
    let (m, k, n) = (17, 300, 33);
    let mut r = rng(11);
    let (a, b) = (rand_vec(&mut r, m * k), rand_vec(&mut r, k * n));
    let (ar, br): (Vec<f64>, Vec<f64>) =
        (a.iter().map(|&v| tf32(v) as f64).collect(), b.iter().map(|&v| tf32(v) as f64).collect());
    let want = matmul(&ar, &br, m, k, n);
    let chain = matmul(&abs(&ar), &abs(&br), m, k, n);
    let mut c = cuda.alloc::<f32>(m * n).unwrap();
    cuda.set_tf32(true);
    cuda.gemm(&Gemm::nn(m, n, k), &cuda.upload(&a).unwrap(), &cuda.upload(&b).unwrap(), &mut c).unwrap();
    cuda.set_tf32(false);
    let tol: Vec<f64> = chain.iter().map(|x| (k + 1) as f64 * U_F32 * x).collect();
    assert_within("TF32 17x300x33", &cuda.download(&c, m * n).unwrap(), &want, &tol);
});

/// Which GEMMs one step of a layer makes, and whether two steps on different data make the
/// same calls with the same sizes (a fixed launch shape).
fn step_ledger(cuda: &Cuda, cfg: SparseGradConfig, out: usize, inp: usize, t: usize) -> (Vec<EventKind>, bool) {
    let i = inputs(out, inp, t, 12);
    let mut layer = SparseGradLinear::new(cuda, &i.w, Some(&i.b), &i.basis, cfg).unwrap();
    let (mut y, mut dx) = (cuda.alloc::<f32>(t * out).unwrap(), cuda.alloc::<f32>(t * inp).unwrap());
    let mut r = rng(13);
    let mut ledgers = Vec::new();
    for step in 0..3 {
        let (x, g) =
            (cuda.upload(&rand_vec(&mut r, t * inp)).unwrap(), cuda.upload(&rand_vec(&mut r, t * out)).unwrap());
        if step > 0 {
            cuda.profile_begin(ProfileOptions::default()).unwrap();
        }
        layer.forward(&x, t, &mut y).unwrap();
        layer.backward(&g, t, Some(&mut dx)).unwrap();
        layer.step().unwrap();
        if step > 0 {
            ledgers.push(cuda.profile_end().unwrap());
        }
    }
    let fixed = sparsegrad::perf::shape::identical_calls(&ledgers[0], &ledgers[1]);
    (ledgers.pop().unwrap().into_iter().map(|e| e.kind).collect(), fixed)
}

cuda_test!(fn every_gemm_of_a_bf16_step_takes_bf16_operands(cuda) {
    // A step of each formulation and merged order: no GEMM with f32 operands, and no
    // scattered-atomics kernel (coo_dense_t) or data-dependent compaction on the update.
    for (formulation, (out, inp, t)) in
        [(Formulation::Transformed, (40, 64, 9)), (Formulation::Merged, (64, 40, 7)), (Formulation::Merged, (40, 64, 100))]
    {
        let cfg = SparseGradConfig { keep: Keep::Fraction(0.05), formulation: Some(formulation), precision: Precision::Bf16, ..Default::default() };
        let (events, fixed) = step_ledger(&cuda, cfg, out, inp, t);
        let gemms: Vec<ElemType> =
            events.iter().filter_map(|e| match e { EventKind::Gemm { operands, .. } => Some(*operands), _ => None }).collect();
        assert!(!gemms.is_empty());
        assert!(gemms.iter().all(|&o| o == ElemType::Bf16), "{formulation:?} {out}x{inp}: {gemms:?}");
        check_update_kernels(&events, &format!("bf16 {formulation:?}"));
        assert!(fixed, "bf16 {formulation:?} {out}x{inp}: two steps made different calls or sizes");
    }
    // f32 (both GPU updates) and TF32: the same shape every step; under TF32 every f32 GEMM
    // says so.
    for update in [MergedUpdate::Dense, MergedUpdate::Runs] {
        for on in [false, true] {
            cuda.set_tf32(on);
            let cfg = SparseGradConfig {
                keep: Keep::Fraction(0.05),
                formulation: Some(Formulation::Merged),
                merged_update: Some(update),
                ..Default::default()
            };
            let (events, fixed) = step_ledger(&cuda, cfg, 64, 40, 100);
            cuda.set_tf32(false);
            let want = if on { GemmCompute::F32FastTf32 } else { GemmCompute::F32 };
            for e in &events {
                if let EventKind::Gemm { compute, .. } = e {
                    assert_eq!(*compute, want, "{update:?} tf32={on}");
                }
            }
            check_update_kernels(&events, &format!("{update:?} tf32={on}"));
            assert!(fixed, "{update:?} tf32={on}: two steps made different calls or sizes");
        }
    }
});

/// No `coo_dense_t` (one atomic per entry and row) nor row compaction in a GPU step.
fn check_update_kernels(events: &[EventKind], what: &str) {
    for e in events {
        if let EventKind::Launch { cost, .. } = e {
            assert!(
                !["coo_dense_t_f32", "coo_rows_tile_count", "coo_rows_scatter", "coo_scatter_add_f32"]
                    .contains(&cost.kernel),
                "{what}: {} on the step",
                cost.kernel
            );
        }
    }
}
