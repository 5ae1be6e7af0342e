//! The whole SparseGradLinear step (forward, backward, selection, SparseAdam, merge) on
//! CUDA against the CPU: both formulations, Exact and SparseByDense, f32 and bf16, each
//! GPU merged update by name, ragged shapes, several steps. In f32 the COO indices must equal the CPU's exactly; in bf16
//! (same bf16-rounded operands on both sides) an index may differ only where the two
//! magnitudes tie within the documented tolerance. Skips without a GPU; the same checks
//! run CPU-vs-CPU to keep the harness honest.
#![cfg(feature = "cuda")]

mod common;
mod cuda_common;

use common::*;
use cuda_common::cuda_test;
use sparsegrad::{
    AdamParams, Backend, Cpu, Formulation, HostCoo, Keep, MergedUpdate, Optimizer, Precision, Selection,
    SparseGradConfig, SparseGradLinear,
};

struct Run {
    y: Vec<f32>,
    dx: Vec<f32>,
    grads: Vec<HostCoo<f32>>,
    merged: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
fn run<B: Backend + Clone>(
    be: &B,
    out: usize,
    inp: usize,
    tokens: usize,
    cfg: SparseGradConfig,
    seed: u64,
    steps: usize,
    padding: bool,
) -> Run {
    let mut r = rng(seed);
    let w = rand_vec(&mut r, out * inp);
    let b = rand_vec(&mut r, out);
    let basis = random_basis(&mut r, "g", out, inp);
    let mut layer = SparseGradLinear::new(be, &w, Some(&b), &basis, cfg).unwrap();
    let (mut y, mut dx) = (be.alloc::<f32>(tokens * out).unwrap(), be.alloc::<f32>(tokens * inp).unwrap());
    let mut grads = Vec::new();
    let mut first = None;
    for step in 0..steps {
        let x = be.upload(&rand_vec(&mut r, tokens * inp)).unwrap();
        let mut g = rand_vec(&mut r, tokens * out);
        if padding {
            for t in (0..tokens).filter(|t| t % 3 == 1) {
                g[t * out..(t + 1) * out].fill(0.0);
            }
        }
        let g = be.upload(&g).unwrap();
        layer.forward(&x, tokens, &mut y).unwrap();
        layer.backward(&g, tokens, Some(&mut dx)).unwrap();
        grads.push(layer.grad_host().unwrap());
        if step == 0 {
            first = Some((be.download(&y, tokens * out).unwrap(), be.download(&dx, tokens * inp).unwrap()));
        }
        layer.step().unwrap();
    }
    let (y, dx) = first.unwrap();
    Run { y, dx, grads, merged: layer.merged_weight().unwrap() }
}

fn check<B: Backend + Clone>(be: &B, shapes: &[(usize, usize, usize)]) {
    let adam = Optimizer::Adam(AdamParams { lr: 1e-2, ..Default::default() });
    for &(out, inp, tokens) in shapes {
        for precision in [Precision::Full, Precision::Bf16] {
            for formulation in [Formulation::Transformed, Formulation::Merged] {
                for selection in [
                    Selection::Exact,
                    Selection::SparseByDense { threshold: 0.0 },
                    Selection::SparseByDense { threshold: 0.3 },
                ] {
                    if formulation == Formulation::Merged && selection == (Selection::SparseByDense { threshold: 0.3 })
                    {
                        continue;
                    }
                    // The merged form also runs each GPU update by name (Dense: SparseAdam
                    // writes its change densely), against the CPU's own choice.
                    let updates: &[Option<MergedUpdate>] =
                        if formulation == Formulation::Merged && selection == Selection::Exact {
                            // Runs is f32 only (bf16 layers refuse it).
                            match precision {
                                Precision::Full => &[None, Some(MergedUpdate::Dense), Some(MergedUpdate::Runs)],
                                Precision::Bf16 => &[None, Some(MergedUpdate::Dense)],
                            }
                        } else {
                            &[None]
                        };
                    for (keep, &merged_update) in [Keep::Count(1), Keep::Fraction(0.05), Keep::Fraction(1.0)]
                        .into_iter()
                        .flat_map(|k| updates.iter().map(move |u| (k, u)))
                    {
                        let cfg = SparseGradConfig {
                            keep,
                            selection,
                            formulation: Some(formulation),
                            merged_update,
                            expected_tokens: tokens,
                            optimizer: adam,
                            precision,
                        };
                        let what = format!(
                            "{} {out}x{inp} T={tokens} {precision:?} {formulation:?} {selection:?} {keep:?} {merged_update:?}",
                            be.name()
                        );
                        let got = run(be, out, inp, tokens, cfg, 5, 3, true);
                        let cpu_cfg = SparseGradConfig { merged_update: None, ..cfg };
                        let expect = run(&Cpu::new(), out, inp, tokens, cpu_cfg, 5, 3, true);
                        let (atol, rtol) = if precision == Precision::Full { (1e-5, 1e-4) } else { (2e-2, 2e-2) };
                        assert_close(&format!("{what}: y"), &got.y, &expect.y, atol, rtol);
                        assert_close(&format!("{what}: dx"), &got.dx, &expect.dx, atol, rtol);
                        for (s, (g, e)) in got.grads.iter().zip(&expect.grads).enumerate() {
                            assert_eq!(g.len(), e.len(), "{what}: step {s} k");
                            if precision == Precision::Full {
                                assert_eq!((&g.rows, &g.cols), (&e.rows, &e.cols), "{what}: step {s} indices");
                                assert_close(&format!("{what}: step {s} values"), &g.values, &e.values, 1e-5, 1e-5);
                            } else {
                                bf16_indices_agree(&what, s, g, e);
                            }
                        }
                        let tol = if precision == Precision::Full { 1e-4 } else { 5e-2 };
                        assert_close(&format!("{what}: merged weight"), &got.merged, &expect.merged, tol, tol);
                    }
                }
            }
        }
    }
}

/// In bf16 the selections may differ only at the boundary: every index one side keeps and
/// the other does not must have a magnitude within 1e-2 (relative) of the k-th largest.
fn bf16_indices_agree(what: &str, step: usize, g: &HostCoo<f32>, e: &HostCoo<f32>) {
    let kth = |c: &HostCoo<f32>| c.values.iter().map(|v| v.abs()).fold(f32::INFINITY, f32::min);
    let boundary = kth(e).max(kth(g));
    let (gl, el) = (g.linear_indices(), e.linear_indices());
    for (c, other, name) in [(g, &el, "gpu"), (e, &gl, "cpu")] {
        for (i, l) in c.linear_indices().iter().enumerate() {
            if other.binary_search(l).is_err() {
                let v = c.values[i].abs();
                assert!(
                    v <= boundary * 1.01 + 1e-6,
                    "{what}: step {step}: {name} keeps {l} (|v| = {v}) far above the boundary {boundary}"
                );
            }
        }
    }
}

cuda_test!(fn cuda_sparsegrad_step_matches_the_cpu(cuda) {
    check(&cuda, &[(17, 33, 29), (1, 5, 1), (64, 40, 100), (160, 100, 257)]);
});

#[test]
fn harness_self_check_on_the_cpu() {
    check(&Cpu::new(), &[(17, 33, 29), (1, 5, 1)]);
}

cuda_test!(fn cuda_bf16_merged_weight_uses_the_f32_basis(cuda) {
    check_bf16_merged_weight(&cuda);
});

// A frozen bf16 projection holds only its bf16 weight (rounded on the host): forward and
// `dx` must equal, bit for bit, those of the same weight kept in f32 and cast on the device
// (a Full layer before its first step), and its merged weight is that rounding widened.
cuda_test!(fn cuda_frozen_bf16_layer_without_an_f32_copy_computes_the_same(cuda) {
    use sparsegrad::{LinearBuilder, Method, TrainOptions};
    let (out, inp, tokens) = (37, 29, 13);
    let mut r = rng(41);
    let w = rand_vec(&mut r, out * inp);
    let x = rand_vec(&mut r, tokens * inp);
    let g = rand_vec(&mut r, tokens * out);
    let opts = TrainOptions { precision: Precision::Bf16, ..Default::default() };
    let run = |method: Method| {
        let mut layer = LinearBuilder::new(&w, out, inp).method(method).options(opts).build(&cuda).unwrap();
        let (xb, gb) = (cuda.upload(&x).unwrap(), cuda.upload(&g).unwrap());
        let (mut y, mut dx) = (cuda.upload(&vec![f32::NAN; tokens * out]).unwrap(), cuda.upload(&vec![f32::NAN; tokens * inp]).unwrap());
        layer.forward(&xb, tokens, &mut y).unwrap();
        layer.backward(&gb, tokens, Some(&mut dx)).unwrap();
        (cuda.download(&y, tokens * out).unwrap(), cuda.download(&dx, tokens * inp).unwrap(), layer.merged_weight().unwrap())
    };
    let (yf, dxf, wf) = run(Method::Frozen);
    let (yt, dxt, wt) = run(Method::Full);
    assert!(yf.iter().zip(&yt).all(|(a, b)| a.to_bits() == b.to_bits()), "forward differs");
    assert!(dxf.iter().zip(&dxt).all(|(a, b)| a.to_bits() == b.to_bits()), "dx differs");
    assert_eq!(wt, w, "the Full layer's master weight is exact");
    let rounded: Vec<f32> = w.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
    assert_eq!(wf, rounded, "a frozen bf16 layer holds W rounded to bf16");
    // The device allocated no f32 copy: the frozen layer's weight is out * in bf16 values.
    let before = cuda.memory_stats().current_bytes;
    let frozen = LinearBuilder::new(&w, out, inp).method(Method::Frozen).options(opts).build(&cuda).unwrap();
    assert_eq!(cuda.memory_stats().current_bytes - before, out * inp * 2);
    drop(frozen);
});

/// Every method and formulation, f32 and bf16: a NaN in a layer's input is reported as
/// "layer input x" and one in its output gradient as "output gradient grad_y", with the
/// count and first index of the bad entries (CUDA checks them in the pass that stages the
/// tensor and reports them at the next synchronisation; the CPU at once).
fn check_non_finite_inputs_are_named<B: Backend + Clone>(be: &B) {
    use sparsegrad::{Error, LinearBuilder, Method, TrainOptions};
    let (out, inp, tokens) = (23, 19, 7);
    let mut r = rng(43);
    let w = rand_vec(&mut r, out * inp);
    let basis = random_basis(&mut r, "g", out, inp);
    let keep = Keep::Fraction(0.1);
    let sparsegrad =
        |formulation| Method::SparseGrad { keep, selection: Selection::Exact, formulation: Some(formulation) };
    let methods = [
        Method::Frozen,
        Method::Full,
        Method::MeProp { keep },
        Method::Lora { rank: 2, alpha: 4.0 },
        sparsegrad(Formulation::Merged),
        sparsegrad(Formulation::Transformed),
    ];
    let named = |res: sparsegrad::Result<()>, what: &str, first: usize, label: &str| match res {
        Err(Error::NonFinite { what: w, count, first_index }) => {
            assert!(w.ends_with(what), "{label}: {w}");
            assert_eq!((count, first_index), (2, first), "{label}");
        }
        other => panic!("{label}: expected a non-finite {what}, got {other:?}"),
    };
    for precision in [Precision::Full, Precision::Bf16] {
        for method in methods {
            let label = format!("{method:?} {precision:?}");
            let opts = TrainOptions { precision, ..Default::default() };
            let mut layer =
                LinearBuilder::new(&w, out, inp).method(method).basis(&basis).options(opts).build(be).unwrap();
            let (mut y, mut dx) = (be.alloc::<f32>(tokens * out).unwrap(), be.alloc::<f32>(tokens * inp).unwrap());
            let mut x = rand_vec(&mut r, tokens * inp);
            let g = be.upload(&rand_vec(&mut r, tokens * out)).unwrap();
            layer.forward(&be.upload(&x).unwrap(), tokens, &mut y).unwrap();
            layer.backward(&g, tokens, Some(&mut dx)).unwrap();
            be.synchronize().unwrap();
            (x[5], x[11]) = (f32::NAN, f32::INFINITY);
            let res = layer.forward(&be.upload(&x).unwrap(), tokens, &mut y).and_then(|()| be.synchronize());
            named(res, "layer input x", 5, &label);
            let mut bad = rand_vec(&mut r, tokens * out);
            (bad[3], bad[40]) = (f32::NEG_INFINITY, f32::NAN);
            x[5] = 0.5;
            x[11] = 0.25;
            layer.forward(&be.upload(&x).unwrap(), tokens, &mut y).unwrap();
            let res = layer.backward(&be.upload(&bad).unwrap(), tokens, Some(&mut dx)).and_then(|()| be.synchronize());
            named(res, "output gradient grad_y", 3, &label);
        }
    }
}

cuda_test!(fn non_finite_inputs_and_gradients_are_named_for_every_method(cuda) {
    check_non_finite_inputs_are_named(&cuda);
});

#[test]
fn non_finite_inputs_and_gradients_are_named_on_the_cpu() {
    check_non_finite_inputs_are_named(&Cpu::new());
}
