//! SparseGradLinear on the CPU: exactness of forward/backward in both formulations,
//! finite differences in f64, SparseByDense, training, merge, errors, allocations.

mod common;

use common::*;
use sparsegrad::Precision;
use sparsegrad::{
    AdamParams, Backend, Cpu, Formulation, Keep, Optimizer, Selection, SparseGradConfig, SparseGradLinear,
};

const FORMS: [Formulation; 2] = [Formulation::Transformed, Formulation::Merged];

fn cfg(form: Formulation, keep: Keep, selection: Selection) -> SparseGradConfig {
    SparseGradConfig { keep, selection, formulation: Some(form), ..Default::default() }
}

struct Problem {
    out: usize,
    inp: usize,
    t: usize,
    w: Vec<f32>,
    b: Vec<f32>,
    x: Vec<f32>,
    g: Vec<f32>,
    basis: sparsegrad::Basis,
}

fn problem(seed: u64, out: usize, inp: usize, t: usize) -> Problem {
    let mut r = rng(seed);
    Problem {
        out,
        inp,
        t,
        w: rand_vec(&mut r, out * inp),
        b: rand_vec(&mut r, out),
        x: rand_vec(&mut r, t * inp),
        g: rand_vec(&mut r, t * out),
        basis: random_basis(&mut r, "test", out, inp),
    }
}

/// Runs forward + backward; returns (y, dx, db, dense dWt from a keep-all COO).
fn run_once(pr: &Problem, c: SparseGradConfig) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let cpu = Cpu::new();
    let mut layer = SparseGradLinear::new(&cpu, &pr.w, Some(&pr.b), &pr.basis, c).unwrap();
    let x = cpu.upload(&pr.x).unwrap();
    let g = cpu.upload(&pr.g).unwrap();
    let mut y = cpu.alloc(pr.t * pr.out).unwrap();
    let mut dx = cpu.alloc(pr.t * pr.inp).unwrap();
    layer.forward(&x, pr.t, &mut y).unwrap();
    layer.backward(&g, pr.t, Some(&mut dx)).unwrap();
    let coo = layer.grad_host().unwrap();
    let mut dwt = vec![f32::NAN; pr.out * pr.inp];
    for e in 0..coo.len() {
        dwt[coo.rows[e] as usize * pr.inp + coo.cols[e] as usize] = coo.values[e];
    }
    (y.to_vec(), dx.to_vec(), layer.bias_grad_host().unwrap().unwrap(), dwt)
}

#[test]
fn forward_backward_equal_the_dense_layer_in_both_formulations() {
    for (seed, (out, inp, t)) in [(17usize, 33usize, 29usize), (40, 24, 64), (1, 5, 3)].into_iter().enumerate() {
        let pr = problem(seed as u64, out, inp, t);
        let (w, x, g) = (to64(&pr.w), to64(&pr.x), to64(&pr.g));
        let mut y_ref = matmul(&x, &transpose(&w, out, inp), t, inp, out);
        for r in 0..t {
            for c in 0..out {
                y_ref[r * out + c] += pr.b[c] as f64;
            }
        }
        let dx_ref = matmul(&g, &w, t, out, inp);
        let db_ref: Vec<f64> = (0..out).map(|c| (0..t).map(|r| g[r * out + c]).sum()).collect();
        let dw = matmul(&transpose(&g, t, out), &x, out, t, inp);
        let (p, q) = (to64(pr.basis.p()), to64(pr.basis.q()));
        let dwt_ref = matmul(&matmul(&transpose(&p, out, out), &dw, out, out, inp), &q, out, inp, inp);
        for form in FORMS {
            let (y, dx, db, dwt) = run_once(&pr, cfg(form, Keep::Fraction(1.0), Selection::Exact));
            let what = format!("{form:?} {out}x{inp} T={t}");
            assert!(rel_err(&to64(&y), &y_ref) < 1e-5, "{what}: y rel err {}", rel_err(&to64(&y), &y_ref));
            assert!(rel_err(&to64(&dx), &dx_ref) < 1e-5, "{what}: dx rel err {}", rel_err(&to64(&dx), &dx_ref));
            assert!(rel_err(&to64(&db), &db_ref) < 1e-5, "{what}: db");
            assert!(rel_err(&to64(&dwt), &dwt_ref) < 1e-5, "{what}: dWt rel err {}", rel_err(&to64(&dwt), &dwt_ref));
        }
    }
}

/// Loss `L = sum(y * R)`; finite differences in f64 against dx, db and dWt.
#[test]
fn finite_differences_in_f64_match_the_whole_layer() {
    let (out, inp, t) = (6usize, 5usize, 4usize);
    let mut r = rng(7);
    let w = rand_vec64(&mut r, out * inp);
    let b = rand_vec64(&mut r, out);
    let x = rand_vec64(&mut r, t * inp);
    let probe = rand_vec64(&mut r, t * out);
    let basis = random_basis(&mut r, "fd", out, inp);
    let (p, q) = (to64(basis.p()), to64(basis.q()));
    let cpu = Cpu::new();
    for form in FORMS {
        let c = cfg(form, Keep::Fraction(1.0), Selection::Exact);
        let loss = |w: &[f64], b: &[f64], x: &[f64]| -> f64 {
            let mut layer = SparseGradLinear::<Cpu, f64>::new(&cpu, w, Some(b), &basis, c).unwrap();
            let xb = cpu.upload(x).unwrap();
            let mut y = cpu.alloc(t * out).unwrap();
            layer.forward(&xb, t, &mut y).unwrap();
            y.iter().zip(&probe).map(|(a, b)| a * b).sum()
        };
        let mut layer = SparseGradLinear::<Cpu, f64>::new(&cpu, &w, Some(&b), &basis, c).unwrap();
        let xb = cpu.upload(&x).unwrap();
        let gb = cpu.upload(&probe).unwrap();
        let mut y = cpu.alloc(t * out).unwrap();
        let mut dx = cpu.alloc(t * inp).unwrap();
        layer.forward(&xb, t, &mut y).unwrap();
        layer.backward(&gb, t, Some(&mut dx)).unwrap();
        let coo = layer.grad_host().unwrap();
        let db = layer.bias_grad_host().unwrap().unwrap();
        let h = 1e-6;
        for i in 0..t * inp {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[i] += h;
            xm[i] -= h;
            let fd = (loss(&w, &b, &xp) - loss(&w, &b, &xm)) / (2.0 * h);
            assert!((fd - dx[i]).abs() < 1e-7 * (1.0 + fd.abs()), "{form:?} dx[{i}]: fd {fd} vs {}", dx[i]);
        }
        for i in 0..out {
            let (mut bp, mut bm) = (b.clone(), b.clone());
            bp[i] += h;
            bm[i] -= h;
            let fd = (loss(&w, &bp, &x) - loss(&w, &bm, &x)) / (2.0 * h);
            assert!((fd - db[i]).abs() < 1e-7 * (1.0 + fd.abs()), "{form:?} db[{i}]");
        }
        // Moving Wt(i, j) by h moves W by h P[:, i] Q[:, j]^T.
        for e in 0..coo.len() {
            let (i, j) = (coo.rows[e] as usize, coo.cols[e] as usize);
            let dir: Vec<f64> = (0..out * inp).map(|l| p[(l / inp) * out + i] * q[(l % inp) * inp + j]).collect();
            let wp: Vec<f64> = w.iter().zip(&dir).map(|(a, d)| a + h * d).collect();
            let wm: Vec<f64> = w.iter().zip(&dir).map(|(a, d)| a - h * d).collect();
            let fd = (loss(&wp, &b, &x) - loss(&wm, &b, &x)) / (2.0 * h);
            // P and Q are orthogonal only to f32 precision, hence the 1e-6.
            assert!(
                (fd - coo.values[e]).abs() < 1e-6 * (1.0 + fd.abs()),
                "{form:?} dWt({i},{j}): fd {fd} vs {}",
                coo.values[e]
            );
        }
    }
}

#[test]
fn sparse_by_dense_at_threshold_zero_equals_exact_and_skips_padding_rows() {
    let (out, inp, t) = (24usize, 18usize, 40usize);
    let mut pr = problem(11, out, inp, t);
    // Padding: tokens 5..15 and 30..40 have a zero output gradient.
    for r in (5..15).chain(30..40) {
        pr.g[r * out..(r + 1) * out].fill(0.0);
    }
    let cpu = Cpu::new();
    for form in FORMS {
        for keep in [Keep::Count(1), Keep::Count(7), Keep::Fraction(0.05), Keep::Fraction(1.0)] {
            let mut results = Vec::new();
            for sel in [Selection::Exact, Selection::SparseByDense { threshold: 0.0 }] {
                let mut layer =
                    SparseGradLinear::new(&cpu, &pr.w, Some(&pr.b), &pr.basis, cfg(form, keep, sel)).unwrap();
                let x = cpu.upload(&pr.x).unwrap();
                let g = cpu.upload(&pr.g).unwrap();
                let mut y = cpu.alloc(t * out).unwrap();
                layer.forward(&x, t, &mut y).unwrap();
                layer.backward(&g, t, None).unwrap();
                results.push((layer.grad_host().unwrap(), layer.last_stats()));
            }
            let ((exact, s_exact), (sd, s_sd)) = (&results[0], &results[1]);
            assert_eq!(exact.rows, sd.rows, "{form:?} {keep:?}: rows");
            assert_eq!(exact.cols, sd.cols, "{form:?} {keep:?}: cols");
            assert_close(&format!("{form:?} {keep:?} values"), &sd.values, &exact.values, 1e-6, 1e-6);
            assert_eq!(s_exact.rows_multiplied, t);
            assert_eq!(s_sd.rows_multiplied, t - 20, "{form:?}: SparseByDense multiplies only the non-padding rows");
        }
    }
}

#[test]
fn sparse_by_dense_with_a_threshold_multiplies_a_smaller_block() {
    let pr = problem(12, 32, 16, 48);
    let cpu = Cpu::new();
    let c = SparseGradConfig {
        keep: Keep::Count(20),
        selection: Selection::SparseByDense { threshold: 0.5 },
        ..Default::default()
    };
    let mut layer = SparseGradLinear::new(&cpu, &pr.w, None, &pr.basis, c).unwrap();
    assert_eq!(layer.formulation(), Formulation::Transformed, "a positive threshold needs the transformed form");
    let x = cpu.upload(&pr.x).unwrap();
    let g = cpu.upload(&pr.g).unwrap();
    let mut y = cpu.alloc(48 * 32).unwrap();
    layer.forward(&x, 48, &mut y).unwrap();
    layer.backward(&g, 48, None).unwrap();
    let s = layer.last_stats();
    assert!(s.rows_multiplied < 48 && s.cols_multiplied < 32, "{s:?}");
    let coo = layer.grad_host().unwrap();
    assert_eq!(coo.len(), 20);
    coo.validate().unwrap();
    let bad = SparseGradConfig { formulation: Some(Formulation::Merged), ..c };
    assert!(matches!(
        SparseGradLinear::new(&cpu, &pr.w, None, &pr.basis, bad),
        Err(sparsegrad::Error::InvalidArgument { .. })
    ));
}

/// Several training steps: both formulations follow the same trajectory, and merge()
/// equals P Wt Q^T; a layer rebuilt from the merged weight gives the same forward.
#[test]
fn training_merge_round_trip_and_formulations_agree() {
    // 20 x 12: the merged step updates W by columns, (P D) Q^T; 12 x 20: by touched rows.
    for (out, inp) in [(20usize, 12usize), (12, 20)] {
        let k = Keep::Fraction(0.1).resolve(out * inp).unwrap();
        assert_eq!(Formulation::merged_update_by_columns(out, inp, k), out > inp);
        training_round_trip(out, inp);
    }
}

fn training_round_trip(out: usize, inp: usize) {
    let t = 30usize;
    let pr = problem(13, out, inp, t);
    let cpu = Cpu::new();
    let adam = AdamParams { lr: 1e-2, ..Default::default() };
    let mut finals = Vec::new();
    for form in FORMS {
        let c =
            SparseGradConfig { optimizer: Optimizer::Adam(adam), ..cfg(form, Keep::Fraction(0.1), Selection::Exact) };
        let mut layer = SparseGradLinear::new(&cpu, &pr.w, Some(&pr.b), &pr.basis, c).unwrap();
        let x = cpu.upload(&pr.x).unwrap();
        let mut y = cpu.alloc(t * out).unwrap();
        for _ in 0..5 {
            layer.forward(&x, t, &mut y).unwrap();
            // Gradient of 0.5 |y|^2 / T: a loss that actually depends on the weights.
            let g: Vec<f32> = y.iter().map(|v| v / t as f32).collect();
            let g = cpu.upload(&g).unwrap();
            layer.backward(&g, t, None).unwrap();
            layer.step().unwrap();
        }
        let wt = layer.weight_transformed().unwrap();
        let merged = layer.merged_weight().unwrap();
        let (p, q) = (to64(pr.basis.p()), to64(pr.basis.q()));
        let expect = matmul(&matmul(&p, &to64(&wt), out, out, inp), &transpose(&q, inp, inp), out, inp, inp);
        assert_close(&format!("{form:?}: merge = P Wt Q^T"), &to64(&merged), &expect, 1e-5, 1e-5);
        // Rebuild from the merged weight: same forward.
        layer.forward(&x, t, &mut y).unwrap();
        let bias = layer.bias_host().unwrap().unwrap();
        let mut rebuilt = SparseGradLinear::new(
            &cpu,
            &merged,
            Some(&bias),
            &pr.basis,
            SparseGradConfig { optimizer: Optimizer::Adam(adam), ..cfg(form, Keep::Fraction(0.1), Selection::Exact) },
        )
        .unwrap();
        let mut y2 = cpu.alloc(t * out).unwrap();
        rebuilt.forward(&x, t, &mut y2).unwrap();
        assert_close(&format!("{form:?}: rebuilt forward"), &y2, &y, 1e-5, 1e-4);
        finals.push((wt, merged, bias));
    }
    assert_close("Wt transformed vs merged", &finals[1].0, &finals[0].0, 1e-5, 1e-4);
    assert_close("W transformed vs merged", &finals[1].1, &finals[0].1, 1e-5, 1e-4);
    assert_close("bias transformed vs merged", &finals[1].2, &finals[0].2, 1e-6, 1e-5);
}

#[test]
fn bf16_precision_tracks_f32() {
    let (out, inp, t) = (24usize, 16usize, 20usize);
    let pr = problem(14, out, inp, t);
    for form in FORMS {
        let full = run_once(&pr, cfg(form, Keep::Fraction(1.0), Selection::Exact));
        let half = run_once(
            &pr,
            SparseGradConfig { precision: Precision::Bf16, ..cfg(form, Keep::Fraction(1.0), Selection::Exact) },
        );
        for (name, a, b) in [("y", &half.0, &full.0), ("dx", &half.1, &full.1), ("dWt", &half.3, &full.3)] {
            let err = rel_err(&to64(a), &to64(b));
            assert!(err < 3e-2, "{form:?} bf16 {name}: rel err {err}");
        }
    }
}

#[test]
fn steps_allocate_nothing_after_the_first() {
    let pr = problem(15, 16, 12, 10);
    let cpu = Cpu::new();
    // k = 9: the merged step updates by rows; k = 40: by columns.
    for (form, k) in FORMS.into_iter().flat_map(|f| [(f, 9), (f, 40)]) {
        for sel in [Selection::Exact, Selection::SparseByDense { threshold: 0.0 }] {
            let mut layer =
                SparseGradLinear::new(&cpu, &pr.w, Some(&pr.b), &pr.basis, cfg(form, Keep::Count(k), sel)).unwrap();
            let x = cpu.upload(&pr.x).unwrap();
            let g = cpu.upload(&pr.g).unwrap();
            let mut y = cpu.alloc(10 * 16).unwrap();
            let mut dx = cpu.alloc(10 * 12).unwrap();
            let mut run = |layer: &mut SparseGradLinear<Cpu>| {
                layer.forward(&x, 10, &mut y).unwrap();
                layer.backward(&g, 10, Some(&mut dx)).unwrap();
                layer.step().unwrap();
            };
            run(&mut layer);
            let before = cpu.memory_stats().allocations;
            run(&mut layer);
            run(&mut layer);
            assert_eq!(cpu.memory_stats().allocations, before, "{form:?} {sel:?} k={k}: a step allocated");
        }
    }
}

#[test]
fn bad_inputs_give_clear_errors_and_leave_the_layer_unchanged() {
    let pr = problem(16, 8, 6, 5);
    let cpu = Cpu::new();
    let c = cfg(Formulation::Transformed, Keep::Count(4), Selection::Exact);
    assert!(matches!(
        SparseGradLinear::new(&cpu, &pr.w[1..], None, &pr.basis, c),
        Err(sparsegrad::Error::Shape { .. })
    ));
    assert!(matches!(
        SparseGradLinear::new(&cpu, &pr.w, Some(&pr.b[1..]), &pr.basis, c),
        Err(sparsegrad::Error::Shape { .. })
    ));
    for keep in [Keep::Count(0), Keep::Count(49), Keep::Fraction(0.0), Keep::Fraction(1.5)] {
        let r = SparseGradLinear::new(&cpu, &pr.w, None, &pr.basis, SparseGradConfig { keep, ..c });
        assert!(matches!(r, Err(sparsegrad::Error::InvalidArgument { .. })), "{keep:?}");
    }
    let mut layer = SparseGradLinear::new(&cpu, &pr.w, Some(&pr.b), &pr.basis, c).unwrap();
    let x = cpu.upload(&pr.x).unwrap();
    let mut y = cpu.alloc(5 * 8).unwrap();
    assert!(layer.backward(&cpu.upload(&pr.g).unwrap(), 5, None).is_err(), "backward before forward");
    assert!(layer.step().is_err(), "step before backward");
    layer.forward(&x, 5, &mut y).unwrap();
    let mut g = pr.g.clone();
    g[7] = f32::NAN;
    let err = layer.backward(&cpu.upload(&g).unwrap(), 5, None).unwrap_err();
    assert!(matches!(err, sparsegrad::Error::NonFinite { first_index: 7, .. }), "{err}");
    assert!(layer.step().is_err(), "no gradient after a failed backward");
    assert_eq!(layer.merged_weight().unwrap().len(), 48);
    let before = layer.weight_transformed().unwrap();
    let mut small = cpu.alloc(3).unwrap();
    assert!(matches!(layer.forward(&x, 5, &mut small), Err(sparsegrad::Error::Shape { .. })));
    assert_eq!(layer.weight_transformed().unwrap(), before);
    let mut xn = pr.x.clone();
    xn[0] = f32::INFINITY;
    assert!(matches!(layer.forward(&cpu.upload(&xn).unwrap(), 5, &mut y), Err(sparsegrad::Error::NonFinite { .. })));
}

#[test]
fn a_non_orthogonal_basis_is_refused_at_construction() {
    let pr = problem(17, 12, 9, 4);
    let cpu = Cpu::new();
    // Made without any check, as no public constructor would.
    let bad = edited_basis(&pr.basis, |_, q| q[3 * 9 + 4] += 0.05);
    let err = SparseGradLinear::new(&cpu, &pr.w, None, &bad, SparseGradConfig::default()).err().expect("refused");
    assert!(matches!(&err, sparsegrad::Error::InvalidBasis { msg, .. } if msg.contains("Q")), "{err}");
    let nan = edited_basis(&pr.basis, |p, _| p[0] = f32::NAN);
    assert!(matches!(
        SparseGradLinear::new(&cpu, &pr.w, None, &nan, SparseGradConfig::default()),
        Err(sparsegrad::Error::NonFinite { .. })
    ));
}

#[test]
fn layers_of_a_group_share_one_device_copy_of_the_basis() {
    let (out, inp) = (48usize, 40usize);
    let pr = problem(18, out, inp, 3);
    for form in FORMS {
        let cpu = Cpu::new();
        let c = cfg(form, Keep::Count(5), Selection::Exact);
        let basis_bytes = (out * out + inp * inp) * 4;
        let before = cpu.memory_stats().current_bytes;
        let first = SparseGradLinear::new(&cpu, &pr.w, None, &pr.basis, c).unwrap();
        let one = cpu.memory_stats().current_bytes - before;
        let second = SparseGradLinear::new(&cpu, &pr.w, None, &pr.basis.clone(), c).unwrap();
        let two = cpu.memory_stats().current_bytes - before;
        assert_eq!(two - one, one - basis_bytes, "{form:?}: the second layer holds no copy of P and Q");
        // An edited basis (two columns of P swapped: still orthogonal) gets its own copy.
        let edited = edited_basis(&pr.basis, |p, _| (0..out).for_each(|r| p.swap(r * out, r * out + 1)));
        let third = SparseGradLinear::new(&cpu, &pr.w, None, &edited, c).unwrap();
        let three = cpu.memory_stats().current_bytes - before;
        assert_eq!(three - two, one, "{form:?}: an edited basis is not served a stale copy");
        drop((first, second, third));
        assert_eq!(
            cpu.memory_stats().current_bytes,
            before,
            "{form:?}: the shared copies are freed with the last layer"
        );
        // Another backend instance never shares.
        let other = Cpu::new();
        let _fourth = SparseGradLinear::new(&other, &pr.w, None, &pr.basis, c).unwrap();
        assert_eq!(other.memory_stats().current_bytes, one, "{form:?}");
    }
}

#[test]
fn cost_model_picks_merged_for_large_token_counts() {
    // BERT-base up-projection, T = 4096: the transformed form pays 4T(out^2 + in^2).
    assert_eq!(Formulation::choose(3072, 768, 4096, 23_593), Formulation::Merged);
    assert_eq!(Formulation::choose(768, 3072, 4096, 23_593), Formulation::Merged);
    // A handful of tokens: the transformed form is cheaper.
    assert_eq!(Formulation::choose(3072, 768, 16, 23_593), Formulation::Transformed);
    // The merged update: (P D) Q^T over the 768 columns for the up-projection (2 out in^2
    // = 3.6 GFLOP), P[:, rows] (D Q^T) over the 768 rows for the down-projection.
    assert!(Formulation::merged_update_by_columns(3072, 768, 23_593));
    assert!(!Formulation::merged_update_by_columns(768, 3072, 23_593));
    // Few entries touch few rows: by rows again.
    assert!(!Formulation::merged_update_by_columns(3072, 768, 300));
}

#[test]
fn bf16_merged_weight_uses_the_f32_basis() {
    check_bf16_merged_weight(&Cpu::new());
}

#[test]
fn merged_token_order_matches_the_f64_reference_and_the_transformed_form() {
    // T (out^2 + in^2) < out in (out + in): the merged backward forms dWt as (g P)^T (x Q).
    let (out, inp, t) = (40usize, 24usize, 8usize);
    assert!(Formulation::merged_token_order(out, inp, t));
    assert!(!Formulation::merged_token_order(out, inp, 64));
    let pr = problem(21, out, inp, t);
    let dw = matmul(&transpose(&to64(&pr.g), t, out), &to64(&pr.x), out, t, inp);
    let (p, q) = (to64(pr.basis.p()), to64(pr.basis.q()));
    let dwt_ref = matmul(&matmul(&transpose(&p, out, out), &dw, out, out, inp), &q, out, inp, inp);
    let (_, dx_m, _, dwt_m) = run_once(&pr, cfg(Formulation::Merged, Keep::Fraction(1.0), Selection::Exact));
    let (_, dx_t, _, dwt_t) = run_once(&pr, cfg(Formulation::Transformed, Keep::Fraction(1.0), Selection::Exact));
    assert!(rel_err(&to64(&dwt_m), &dwt_ref) < 1e-5, "merged dWt rel err {}", rel_err(&to64(&dwt_m), &dwt_ref));
    assert_close("merged vs transformed dWt", &dwt_m, &dwt_t, 1e-5, 1e-4);
    assert_close("merged vs transformed dx", &dx_m, &dx_t, 1e-5, 1e-4);
    // Training with keep 10%: both formulations reach the same weight.
    let cpu = Cpu::new();
    let adam = AdamParams { lr: 1e-2, ..Default::default() };
    let mut finals = Vec::new();
    for form in FORMS {
        let c =
            SparseGradConfig { optimizer: Optimizer::Adam(adam), ..cfg(form, Keep::Fraction(0.1), Selection::Exact) };
        let mut layer = SparseGradLinear::new(&cpu, &pr.w, Some(&pr.b), &pr.basis, c).unwrap();
        let x = cpu.upload(&pr.x).unwrap();
        let mut y = cpu.alloc(t * out).unwrap();
        for _ in 0..4 {
            layer.forward(&x, t, &mut y).unwrap();
            let g: Vec<f32> = y.iter().map(|v| v / t as f32).collect();
            layer.backward(&cpu.upload(&g).unwrap(), t, None).unwrap();
            layer.step().unwrap();
        }
        finals.push(layer.merged_weight().unwrap());
    }
    assert_close("W transformed vs merged (token order)", &finals[1], &finals[0], 1e-5, 1e-4);
}

#[test]
fn measured_formulation_is_remembered_and_checks_its_arguments() {
    let cpu = Cpu::new();
    // Which form wins is a timing, and timings are for benchmarks (`cargo bench --bench
    // cpu_layer` times both forms per shape); a loaded host can flip even a 30x gap. What is
    // checked: the calibration runs, its answer is remembered, and bad arguments are errors.
    let first = Formulation::measure(&cpu, 512, 256, 1, 8000).unwrap();
    assert!(matches!(first, Formulation::Transformed | Formulation::Merged));
    assert_eq!(Formulation::measure(&cpu, 512, 256, 1, 8000).unwrap(), first);
    assert!(Formulation::measure(&cpu, 0, 128, 1, 1).is_err());
    let e = Formulation::measure(&cpu, 4, 3, 2, 13).unwrap_err().to_string();
    assert!(e.contains("k = 13") && e.contains("12 entries"), "{e}");
    let e = Formulation::measure(&cpu, usize::MAX / 2, 3, 2, 1).unwrap_err().to_string();
    assert!(e.contains("overflows"), "{e}");
}

/// Layers of different shapes, formulations and updates that borrow one scratch compute,
/// bit for bit, what the same layers with their own compute, interleaved as a model runs
/// them (all forwards, backwards in reverse, then the steps); the shared set is smaller.
#[test]
fn layers_sharing_one_scratch_compute_what_layers_with_their_own_do() {
    use sparsegrad::SparseGradScratch;
    let shapes = [(16, 12, 9), (12, 16, 40), (20, 7, 30)];
    let t = 10;
    for sel in [Selection::Exact, Selection::SparseByDense { threshold: 0.0 }] {
        let run = |shared: bool| {
            let cpu = Cpu::new();
            let scratch = SparseGradScratch::<Cpu, f32>::shared(&cpu, Precision::Full).unwrap();
            let problems: Vec<Problem> =
                shapes.iter().enumerate().map(|(i, &(o, n, _))| problem(70 + i as u64, o, n, t)).collect();
            let mut layers: Vec<SparseGradLinear<Cpu>> = shapes
                .iter()
                .zip(&problems)
                .enumerate()
                .map(|(i, (&(_, _, k), pr))| {
                    let form = FORMS[i % 2];
                    let mut l =
                        SparseGradLinear::new(&cpu, &pr.w, Some(&pr.b), &pr.basis, cfg(form, Keep::Count(k), sel))
                            .unwrap();
                    if shared {
                        l.share_scratch(&scratch).unwrap();
                    }
                    l
                })
                .collect();
            let mut outs = Vec::new();
            for _ in 0..3 {
                let mut dxs = Vec::new();
                for (l, pr) in layers.iter_mut().zip(&problems) {
                    let mut y = cpu.alloc(t * pr.out).unwrap();
                    l.forward(&cpu.upload(&pr.x).unwrap(), t, &mut y).unwrap();
                    outs.push(y.to_vec());
                }
                for (l, pr) in layers.iter_mut().zip(&problems).rev() {
                    let mut dx = cpu.alloc(t * pr.inp).unwrap();
                    l.backward(&cpu.upload(&pr.g).unwrap(), t, Some(&mut dx)).unwrap();
                    dxs.push(dx.to_vec());
                }
                for l in layers.iter_mut() {
                    l.step().unwrap();
                }
                outs.extend(dxs);
            }
            outs.extend(layers.iter().map(|l| l.merged_weight().unwrap()));
            (outs, cpu.memory_stats().peak_bytes)
        };
        let (own, own_peak) = run(false);
        let (shared, shared_peak) = run(true);
        assert_eq!(own.len(), shared.len());
        for (a, b) in own.iter().zip(&shared) {
            assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "{sel:?}: sharing changed a result");
        }
        assert!(shared_peak < own_peak, "{sel:?}: shared peak {shared_peak} not below {own_peak}");
    }
}

#[test]
fn a_scratch_of_another_precision_is_refused() {
    use sparsegrad::SparseGradScratch;
    let pr = problem(80, 9, 6, 4);
    let cpu = Cpu::new();
    let mut l =
        SparseGradLinear::new(&cpu, &pr.w, None, &pr.basis, cfg(Formulation::Merged, Keep::Count(5), Selection::Exact))
            .unwrap();
    let bf16 = SparseGradScratch::<Cpu, f32>::shared(&cpu, Precision::Bf16).unwrap();
    let e = l.share_scratch(&bf16).unwrap_err().to_string();
    assert!(e.contains("Bf16") && e.contains("Full"), "{e}");
    // The layer still runs on its own scratch.
    let (x, mut y) = (cpu.upload(&pr.x).unwrap(), cpu.alloc(4 * 9).unwrap());
    l.forward(&x, 4, &mut y).unwrap();
}
