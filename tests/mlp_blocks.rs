//! MLP blocks ([`BertMlp`], [`LlamaMlp`]) on the CPU, for every training method:
//! - finite differences in f64 of `L = sum(y * R)` against `dx` and each projection's
//!   weight gradient (dense `dW`, SparseGrad's COO along `P e_ij Q^T`, LoRA's `dA`, `dB`);
//! - SparseGrad at keep = 100% follows full fine-tuning under SGD (both formulations);
//!   LoRA with `B = 0` starts at the frozen output bit for bit;
//! - frozen projections run no weight-gradient GEMM (exact GEMM counts);
//! - merged weights reproduce the trained block; `Collect` feeds the Gram accumulators
//!   exactly what a full block's dense gradients would; trainable-parameter counts;
//! - steps allocate nothing after the first.
//!
//! `keep_fraction_is_not_inflated_by_float_rounding` guards a library defect found while
//! writing these (`Keep::Fraction` rounds float noise up) and fails until its fix lands.

mod common;

use common::blocks::*;
use common::*;
use sparsegrad::linear::lora::{LoraConfig, LoraLinear};
use sparsegrad::linear::trainable::{Linear, Method, TrainOptions};
use sparsegrad::linear::LayerWeights;
use sparsegrad::{Backend, Cpu, GramAccumulator, Keep, Optimizer, Precision};
use std::collections::BTreeMap;

/// Finite differences of `L = sum(y * R)` for a whole block whose projections all train by
/// `variant` (keep = 100%), in f64.
fn fd_check(kind: Kind, methods_of: impl Fn(usize) -> Variant, label: &str) {
    let (hidden, ffn, t) = (6usize, 10usize, 4usize);
    let lay = layout(kind, hidden, ffn);
    let mut r = rng(if kind == Kind::Bert { 101 } else { 202 });
    let params: Params<f64> = random_params(&mut r, kind, hidden, ffn);
    let bases = random_bases(&mut r, kind, hidden, ffn);
    let x = rand_vec64(&mut r, t * hidden);
    let probe = rand_vec64(&mut r, t * hidden);
    let cpu = Cpu::new();
    let opts = sgd(0.5, t);
    let variants: Vec<Variant> = (0..lay.len()).map(&methods_of).collect();
    let methods: Vec<Method> = variants.iter().map(|&v| method(v, Keep::Fraction(1.0))).collect();

    // LoRA as the block builds it has B = 0 (so dA = 0); one SGD step gives B != 0, and the
    // finite differences run at those factors.
    let mut lora: Vec<(Vec<f64>, Vec<f64>)> = Vec::new();
    {
        let mut block = build(&cpu, kind, hidden, ffn, &params, &methods, &bases, &opts);
        let xb = cpu.upload(&x).unwrap();
        let gb = cpu.upload(&probe).unwrap();
        let mut y = cpu.alloc(t * hidden).unwrap();
        block.forward(&xb, t, &mut y);
        block.backward(&gb, t, None);
        let before: Vec<Option<(Vec<f64>, Vec<f64>)>> = block
            .projections()
            .iter()
            .map(|p| match &p.linear {
                Linear::Lora(l) => {
                    let (a, b) = l.factors_host().unwrap();
                    let (da, db) = l.grad_host().unwrap();
                    assert!(b.iter().all(|&v| v == 0.0), "{label} {}: LoRA must start with B = 0", p.name);
                    assert!(da.iter().all(|&v| v == 0.0), "{label} {}: dA = s (g B)^T x must be 0 while B = 0", p.name);
                    assert!(db.iter().any(|&v| v != 0.0), "{label} {}: dB must not vanish", p.name);
                    Some((a, db))
                }
                _ => None,
            })
            .collect();
        block.step();
        for (p, before) in block.projections().iter().zip(before) {
            if let Some((a0, db)) = before {
                let (a, b) = lora_of(p).factors_host().unwrap();
                assert_eq!(a, a0, "{label} {}: A moved although dA = 0", p.name);
                assert_close(
                    &format!("{label} {}: B after one SGD step", p.name),
                    &b,
                    &db.iter().map(|v| -0.5 * v).collect::<Vec<_>>(),
                    1e-15,
                    1e-12,
                );
                lora.push((a, b));
            } else {
                lora.push((Vec::new(), Vec::new()));
            }
        }
    }
    let is_lora: Vec<bool> = variants.iter().map(|&v| v == Variant::Lora).collect();

    let loss = |p: &Params<f64>, lora: &[(Vec<f64>, Vec<f64>)], x: &[f64]| -> f64 {
        let mut block = build(&cpu, kind, hidden, ffn, p, &methods, &bases, &opts);
        install_lora(&cpu, &mut block, p, lora, &is_lora, &opts);
        let xb = cpu.upload(x).unwrap();
        let mut y = cpu.alloc(t * hidden).unwrap();
        block.forward(&xb, t, &mut y);
        y.iter().zip(&probe).map(|(a, b)| a * b).sum()
    };

    // Analytic gradients.
    let mut block = build(&cpu, kind, hidden, ffn, &params, &methods, &bases, &opts);
    install_lora(&cpu, &mut block, &params, &lora, &is_lora, &opts);
    let xb = cpu.upload(&x).unwrap();
    let gb = cpu.upload(&probe).unwrap();
    let mut y = cpu.alloc(t * hidden).unwrap();
    let mut dx = cpu.alloc(t * hidden).unwrap();
    block.forward(&xb, t, &mut y);
    assert!(
        (y.iter().zip(&probe).map(|(a, b)| a * b).sum::<f64>() - loss(&params, &lora, &x)).abs() < 1e-12,
        "{label}: loss not reproducible"
    );
    block.backward(&gb, t, Some(&mut dx));

    let fd_x: Vec<f64> =
        (0..t * hidden).map(|i| central(|h| loss(&params, &lora, &axpy(&x, h, &unit(t * hidden, i))))).collect();
    assert_fd(&format!("{label}: dx"), &dx, &fd_x);

    for (i, (proj, &(name, out, inp, has_bias))) in block.projections().into_iter().zip(&lay).enumerate() {
        let what = format!("{label} {name} ({:?})", variants[i]);
        let moved_w = |dir: &[f64], h: f64| {
            let mut p = params.clone();
            p.w[i] = axpy(&params.w[i], h, dir);
            loss(&p, &lora, &x)
        };
        match variants[i] {
            Variant::Frozen => {
                assert!(proj.linear.dense_grad_host().is_err(), "{what}: a frozen projection has no weight gradient");
                let Linear::Dense(l) = &proj.linear else { panic!("{what}: Frozen is a dense layer") };
                assert!(l.bias_grad_host().is_err(), "{what}: a frozen projection has no bias gradient");
                continue;
            }
            Variant::Full | Variant::Collect | Variant::MeProp => {
                let dw = proj.linear.dense_grad_host().unwrap();
                let fd: Vec<f64> = (0..out * inp).map(|e| central(|h| moved_w(&unit(out * inp, e), h))).collect();
                assert_fd(&format!("{what}: dW"), &dw, &fd);
                if variants[i] == Variant::MeProp {
                    let Linear::Dense(l) = &proj.linear else { panic!("{what}: MeProp is a dense layer") };
                    let coo = l.coo_grad_host().unwrap();
                    assert_eq!(coo.len(), out * inp, "{what}: keep = 100% selects every entry");
                    let sel: Vec<f64> =
                        (0..coo.len()).map(|e| dw[coo.rows[e] as usize * inp + coo.cols[e] as usize]).collect();
                    assert_eq!(coo.values, sel, "{what}: MeProp's COO values are dW's entries");
                }
            }
            Variant::SgTransformed | Variant::SgMerged => {
                let Linear::SparseGrad(l) = &proj.linear else { panic!("{what}: not a SparseGrad layer") };
                let coo = l.grad_host().unwrap();
                assert_eq!(coo.len(), out * inp, "{what}: keep = 100% selects every entry");
                let (p, q) = (to64(bases[i].p()), to64(bases[i].q()));
                // Moving Wt(a, b) by h moves W by h P[:, a] Q[:, b]^T.
                let fd: Vec<f64> = (0..coo.len())
                    .map(|e| {
                        let (a, b) = (coo.rows[e] as usize, coo.cols[e] as usize);
                        let dir: Vec<f64> =
                            (0..out * inp).map(|l| p[(l / inp) * out + a] * q[(l % inp) * inp + b]).collect();
                        central(|h| moved_w(&dir, h))
                    })
                    .collect();
                assert_fd(&format!("{what}: dWt (COO)"), &coo.values, &fd);
            }
            Variant::Lora => {
                let (da, db) = lora_of(proj).grad_host().unwrap();
                let (a, b) = &lora[i];
                let moved = |which: usize, e: usize, h: f64| {
                    let mut f = lora.clone();
                    if which == 0 {
                        f[i].0 = axpy(a, h, &unit(a.len(), e));
                    } else {
                        f[i].1 = axpy(b, h, &unit(b.len(), e));
                    }
                    loss(&params, &f, &x)
                };
                let fd_a: Vec<f64> = (0..a.len()).map(|e| central(|h| moved(0, e, h))).collect();
                let fd_b: Vec<f64> = (0..b.len()).map(|e| central(|h| moved(1, e, h))).collect();
                assert_fd(&format!("{what}: dA"), &da, &fd_a);
                assert_fd(&format!("{what}: dB"), &db, &fd_b);
            }
        }
        // Biases train with Full, SparseGrad and MeProp; Collect, Frozen and LoRA keep them.
        let trains_bias = has_bias
            && matches!(variants[i], Variant::Full | Variant::SgTransformed | Variant::SgMerged | Variant::MeProp);
        match bias_grad(proj) {
            Some(db) => {
                assert!(trains_bias, "{what}: unexpected bias gradient");
                let fd: Vec<f64> = (0..out)
                    .map(|e| {
                        central(|h| {
                            let mut p = params.clone();
                            p.b[i] = Some(axpy(params.b[i].as_ref().unwrap(), h, &unit(out, e)));
                            loss(&p, &lora, &x)
                        })
                    })
                    .collect();
                assert_fd(&format!("{what}: db"), &db, &fd);
            }
            None => assert!(!trains_bias, "{what}: bias gradient missing"),
        }
    }
}

#[test]
fn finite_differences_bert_every_variant() {
    for v in VARIANTS {
        fd_check(Kind::Bert, |_| v, &format!("bert/{v:?}"));
    }
}

#[test]
fn finite_differences_llama_every_variant() {
    for v in VARIANTS {
        fd_check(Kind::Llama, |_| v, &format!("llama/{v:?}"));
    }
}

#[test]
fn finite_differences_mixed_methods() {
    // The official setup: gate frozen; and every other pairing of methods across the block.
    let mixes: [&[Variant]; 4] = [
        &[Variant::Frozen, Variant::SgTransformed, Variant::SgMerged],
        &[Variant::Lora, Variant::MeProp, Variant::Frozen],
        &[Variant::Full, Variant::Lora, Variant::SgTransformed],
        &[Variant::SgMerged, Variant::Frozen, Variant::Lora],
    ];
    for m in mixes {
        fd_check(Kind::Llama, |i| m[i], &format!("llama/{m:?}"));
        fd_check(Kind::Bert, |i| m[i + 1], &format!("bert/{:?}", &m[1..]));
    }
}

/// Under SGD (basis-invariant) SparseGrad at keep = 100% is full fine-tuning: the same
/// outputs, input gradients and merged weights step after step, in both formulations.
#[test]
fn sparsegrad_at_full_keep_follows_full_finetuning_under_sgd() {
    let (hidden, ffn, t, steps) = (8usize, 13usize, 7usize, 5usize);
    for kind in KINDS {
        let n = layout(kind, hidden, ffn).len();
        let mut r = rng(303);
        let params: Params<f64> = random_params(&mut r, kind, hidden, ffn);
        let bases = random_bases(&mut r, kind, hidden, ffn);
        let cpu = Cpu::new();
        let opts = sgd(0.05, t);
        let mut blocks: Vec<(Variant, Block<f64>)> = [Variant::Full, Variant::SgTransformed, Variant::SgMerged]
            .into_iter()
            .map(|v| {
                (v, build(&cpu, kind, hidden, ffn, &params, &vec![method(v, Keep::Fraction(1.0)); n], &bases, &opts))
            })
            .collect();
        let mut y = cpu.alloc(t * hidden).unwrap();
        let mut dx = cpu.alloc(t * hidden).unwrap();
        for s in 0..steps {
            let xb = cpu.upload(&rand_vec64(&mut r, t * hidden)).unwrap();
            let gb = cpu.upload(&rand_vec64(&mut r, t * hidden)).unwrap();
            let mut reference: Option<(Vec<f64>, Vec<f64>)> = None;
            for (v, block) in &mut blocks {
                block.forward(&xb, t, &mut y);
                block.backward(&gb, t, Some(&mut dx));
                block.step();
                match &reference {
                    None => reference = Some((y.to_vec(), dx.to_vec())),
                    Some((y0, dx0)) => {
                        let what = format!("{kind:?} {v:?} step {s}");
                        assert_close(&format!("{what}: y"), &y, y0, 1e-6 * max_abs(y0), 1e-6);
                        assert_close(&format!("{what}: dx"), &dx, dx0, 1e-6 * max_abs(dx0), 1e-6);
                    }
                }
            }
        }
        let full = blocks[0].1.merged();
        let moved = full.w.iter().zip(&params.w).map(|(a, b)| max_abs(&axpy(a, -1.0, b))).fold(0.0, f64::max);
        assert!(moved > 1e-2, "{kind:?}: full fine-tuning barely moved the weights ({moved:e})");
        for (v, block) in &blocks[1..] {
            let m = block.merged();
            for (i, (name, ..)) in layout(kind, hidden, ffn).into_iter().enumerate() {
                let what = format!("{kind:?} {v:?} {name} after {steps} SGD steps");
                assert_close(&format!("{what}: merged W"), &m.w[i], &full.w[i], 1e-6 * max_abs(&full.w[i]), 1e-6);
                if let (Some(b), Some(b0)) = (&m.b[i], &full.b[i]) {
                    assert_close(&format!("{what}: bias"), b, b0, 1e-6 * max_abs(b0), 1e-6);
                }
                assert_eq!(m.b[i].is_some(), full.b[i].is_some(), "{what}: bias presence");
            }
        }
    }
}

/// LoRA with `B = 0` adds exactly nothing: the first forward equals a frozen block's bits.
#[test]
fn lora_with_zero_b_starts_at_the_frozen_output_bit_for_bit() {
    let (hidden, ffn, t) = (12usize, 31usize, 9usize);
    for kind in KINDS {
        let n = layout(kind, hidden, ffn).len();
        let mut r = rng(404);
        let params: Params<f32> = random_params(&mut r, kind, hidden, ffn);
        let bases = random_bases(&mut r, kind, hidden, ffn);
        let x = rand_vec(&mut r, t * hidden);
        let cpu = Cpu::new();
        let run = |m: Method| {
            let mut block = build(&cpu, kind, hidden, ffn, &params, &vec![m; n], &bases, &adam(1e-3, t));
            let mut y = cpu.alloc(t * hidden).unwrap();
            block.forward(&cpu.upload(&x).unwrap(), t, &mut y);
            y.to_vec()
        };
        let frozen = run(Method::Frozen);
        let lora = run(Method::Lora { rank: 3, alpha: 16.0 });
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&lora), bits(&frozen), "{kind:?}: LoRA at B = 0 differs from the frozen block");
    }
}

/// GEMMs of one forward and one backward (with or without `dx`).
fn gemm_counts(kind: Kind, methods: &[Method], with_dx: bool) -> (u64, u64) {
    let (hidden, ffn, t) = (8usize, 12usize, 5usize);
    let mut r = rng(505);
    let params: Params<f32> = random_params(&mut r, kind, hidden, ffn);
    let bases = random_bases(&mut r, kind, hidden, ffn);
    let cpu = Cpu::new();
    let mut block = build(&cpu, kind, hidden, ffn, &params, methods, &bases, &adam(1e-3, t));
    let x = cpu.upload(&rand_vec(&mut r, t * hidden)).unwrap();
    let g = cpu.upload(&rand_vec(&mut r, t * hidden)).unwrap();
    let mut y = cpu.alloc(t * hidden).unwrap();
    let mut dx = cpu.alloc(t * hidden).unwrap();
    let c0 = cpu.gemm_calls();
    block.forward(&x, t, &mut y);
    let c1 = cpu.gemm_calls();
    block.backward(&g, t, if with_dx { Some(&mut dx) } else { None });
    let c2 = cpu.gemm_calls();
    (c1 - c0, c2 - c1)
}

#[test]
fn frozen_projections_run_no_weight_gradient_gemm() {
    let (fz, full) = (Method::Frozen, Method::Full);
    // BERT: forward 2; backward dx of dense_out (always: it feeds GELU's backward) and of
    // dense_in (only when dx is asked for); one dW GEMM per trained projection.
    assert_eq!(gemm_counts(Kind::Bert, &[fz, fz], true), (2, 2));
    assert_eq!(gemm_counts(Kind::Bert, &[full, full], true), (2, 2 + 2));
    assert_eq!(gemm_counts(Kind::Bert, &[fz, fz], false), (2, 1));
    assert_eq!(gemm_counts(Kind::Bert, &[full, full], false), (2, 1 + 2));
    assert_eq!(gemm_counts(Kind::Bert, &[fz, full], true), (2, 2 + 1));
    assert_eq!(gemm_counts(Kind::Bert, &[full, fz], true), (2, 2 + 1));
    // LLaMA: forward 3; backward dx of down, gate and up (gate/up only with dx).
    assert_eq!(gemm_counts(Kind::Llama, &[fz, fz, fz], true), (3, 3));
    assert_eq!(gemm_counts(Kind::Llama, &[full, full, full], true), (3, 3 + 3));
    assert_eq!(gemm_counts(Kind::Llama, &[fz, fz, fz], false), (3, 1));
    assert_eq!(gemm_counts(Kind::Llama, &[full, full, full], false), (3, 1 + 3));
    // Frozen down, trained gate and up; and the official code's frozen gate.
    assert_eq!(gemm_counts(Kind::Llama, &[full, full, fz], true), (3, 3 + 2));
    assert_eq!(gemm_counts(Kind::Llama, &[fz, full, full], true), (3, 3 + 2));
    // Collect computes dW as well (that is its point), MeProp too.
    let me = Method::MeProp { keep: Keep::Fraction(0.1) };
    assert_eq!(gemm_counts(Kind::Llama, &[Method::Collect, me, fz], true), (3, 3 + 2));
}

/// After a few Adam steps, a fresh all-frozen block built from `merged_weight()` and the
/// bias reproduces the trained block's forward.
#[test]
fn merged_weights_reproduce_the_trained_block() {
    let (hidden, ffn, t, steps) = (24usize, 40usize, 16usize, 3usize);
    let keep = Keep::Fraction(0.1);
    for kind in KINDS {
        let n = layout(kind, hidden, ffn).len();
        for v in VARIANTS {
            let mut r = rng(606);
            let params: Params<f32> = random_params(&mut r, kind, hidden, ffn);
            let bases = random_bases(&mut r, kind, hidden, ffn);
            let cpu = Cpu::new();
            let opts = adam(1e-2, t);
            let mut block = build(&cpu, kind, hidden, ffn, &params, &vec![method(v, keep); n], &bases, &opts);
            let mut y = cpu.alloc(t * hidden).unwrap();
            for _ in 0..steps {
                let x = cpu.upload(&rand_vec(&mut r, t * hidden)).unwrap();
                let g = cpu.upload(&rand_vec(&mut r, t * hidden)).unwrap();
                block.forward(&x, t, &mut y);
                block.backward(&g, t, None);
                block.step();
            }
            let merged = block.merged();
            let moved = merged
                .w
                .iter()
                .zip(&params.w)
                .map(|(a, b)| a.iter().zip(b).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max))
                .fold(0.0, f32::max);
            let trains = !matches!(v, Variant::Frozen | Variant::Collect);
            let what = format!("{kind:?} {v:?}");
            if trains {
                assert!(moved > 1e-3, "{what}: weights did not move ({moved:e})");
            } else {
                assert_eq!(moved, 0.0, "{what}: weights moved");
            }
            let x = cpu.upload(&rand_vec(&mut r, t * hidden)).unwrap();
            block.forward(&x, t, &mut y);
            let trained = y.to_vec();
            let mut fresh = build(&cpu, kind, hidden, ffn, &merged, &vec![Method::Frozen; n], &bases, &opts);
            fresh.forward(&x, t, &mut y);
            let scale = trained.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
            assert_close(&format!("{what}: forward of the merged weights"), &y, &trained, 1e-5 * scale, 1e-5);
        }
    }
}

/// A LLaMA block in `Collect` hands the accumulators exactly the dense gradients a full
/// block computes, and trains nothing.
#[test]
fn collect_feeds_the_gram_accumulators_and_trains_nothing() {
    let (hidden, ffn, t, steps) = (10usize, 18usize, 11usize, 4usize);
    let kind = Kind::Llama;
    let mut r = rng(707);
    let params: Params<f32> = random_params(&mut r, kind, hidden, ffn);
    // gate and up share one group (the same shape), down has its own.
    let mut bases = random_bases(&mut r, kind, hidden, ffn);
    for b in &mut bases[..2] {
        *b = b.clone().with_group("gate_up");
    }
    let cpu = Cpu::new();
    let opts = adam(1e-2, t);
    let mut collecting = build(&cpu, kind, hidden, ffn, &params, &[Method::Collect; 3], &bases, &opts);
    let mut full = build(&cpu, kind, hidden, ffn, &params, &[Method::Full; 3], &bases, &opts);
    assert_eq!(collecting.trainable_parameters(), 0);
    let mut accs = BTreeMap::new();
    let mut want: BTreeMap<String, GramAccumulator> = BTreeMap::new();
    let (mut y, mut y_full) = (cpu.alloc(t * hidden).unwrap(), cpu.alloc(t * hidden).unwrap());
    let mut first_y = None;
    let x0 = rand_vec(&mut r, t * hidden);
    for s in 0..steps {
        let x = cpu.upload(&if s == 0 { x0.clone() } else { rand_vec(&mut r, t * hidden) }).unwrap();
        let g = cpu.upload(&rand_vec(&mut r, t * hidden)).unwrap();
        collecting.forward(&x, t, &mut y);
        collecting.backward(&g, t, None);
        collecting.collect(&mut accs);
        collecting.step();
        full.forward(&x, t, &mut y_full);
        full.backward(&g, t, None);
        // no step: the full block stays at the same weights
        for p in full.projections() {
            let grad = p.linear.dense_grad_host().unwrap();
            want.entry(p.group.clone())
                .or_insert_with(|| GramAccumulator::new(p.linear.out_features(), p.linear.in_features()))
                .add(&grad)
                .unwrap();
        }
        assert_eq!(y.to_vec(), y_full.to_vec(), "step {s}: collecting block's output");
        first_y.get_or_insert_with(|| y.to_vec());
    }
    assert_eq!(accs.keys().collect::<Vec<_>>(), vec!["down", "gate_up"]);
    for (group, acc) in &accs {
        let w = &want[group];
        let per_step = if group == "gate_up" { 2 } else { 1 };
        assert_eq!(acc.count(), (per_step * steps) as u64, "{group}: gradients collected");
        assert_eq!(acc.shape(), w.shape(), "{group}: shape");
        let (a_out, a_in) = acc.grams().unwrap();
        let (w_out, w_in) = w.grams().unwrap();
        assert!(max_abs(&w_out) > 0.0 && max_abs(&w_in) > 0.0, "{group}: empty Grams");
        assert_eq!(a_out, w_out, "{group}: sum G G^T");
        assert_eq!(a_in, w_in, "{group}: sum G^T G");
    }
    // Nothing trained: the weights are the originals, bit for bit, and so is the output.
    let m = collecting.merged();
    assert!(m.w == params.w, "Collect moved the weights");
    let x = cpu.upload(&x0).unwrap();
    collecting.forward(&x, t, &mut y);
    assert_eq!(Some(y.to_vec()), first_y, "Collect changed the block's output");
}

#[test]
fn trainable_parameter_counts() {
    let (hidden, ffn) = (12usize, 20usize);
    let keep = Keep::Fraction(0.05); // 5% of 240 entries = 12
    let k = 12;
    let cpu = Cpu::new();
    for kind in KINDS {
        let mut r = rng(808);
        let params: Params<f32> = random_params(&mut r, kind, hidden, ffn);
        let bases = random_bases(&mut r, kind, hidden, ffn);
        let lay = layout(kind, hidden, ffn);
        for v in VARIANTS {
            let block =
                build(&cpu, kind, hidden, ffn, &params, &vec![method(v, keep); lay.len()], &bases, &adam(1e-3, 8));
            let want: usize = lay
                .iter()
                .map(|&(_, out, inp, bias)| {
                    let b = if bias { out } else { 0 };
                    match v {
                        Variant::Frozen | Variant::Collect => 0,
                        Variant::Full => out * inp + b,
                        Variant::SgTransformed | Variant::SgMerged | Variant::MeProp => k + b,
                        Variant::Lora => RANK * (inp + out),
                    }
                })
                .sum();
            assert_eq!(block.trainable_parameters(), want, "{kind:?} {v:?}");
        }
    }
    // The paper: LoRA rank 7 on BERT's 768 x 3072 layer is ~1% of its parameters, as many
    // as SparseGrad keeps at 1%.
    let (out, inp) = (3072usize, 768usize);
    let w = vec![0.01f32; out * inp];
    let config =
        LoraConfig { rank: 7, alpha: 16.0, seed: 0, optimizer: Optimizer::default(), precision: Precision::Full };
    let lora = LoraLinear::new(&cpu, LayerWeights::new(&w, out, inp), config).unwrap();
    let frac = lora.trainable_parameters() as f64 / (out * inp) as f64;
    assert_eq!(lora.trainable_parameters(), 7 * (768 + 3072));
    assert!((0.0095..0.0125).contains(&frac), "LoRA rank 7 trains {:.3}% of the layer", 100.0 * frac);
    let k1 = Keep::Fraction(0.01).resolve(out * inp).unwrap();
    assert_eq!(k1, 23_593);
    let ratio = lora.trainable_parameters() as f64 / k1 as f64;
    assert!((0.9..1.2).contains(&ratio), "LoRA rank 7 vs SparseGrad at 1%: {ratio:.3}");
}

/// `Keep::Fraction(f)` is documented as "this fraction of all entries, rounded up": 7% of
/// 100 entries is 7, but `0.07 * 100.0 = 7.000000000000001` in f64 and `ceil` makes it 8,
/// so a MeProp or SparseGrad projection asked for 7% trains 8 entries.
#[test]
fn keep_fraction_is_not_inflated_by_float_rounding() {
    assert_eq!(Keep::Fraction(0.07).resolve(100).unwrap(), 7, "7% of 100 entries");
    let (hidden, ffn) = (10usize, 10usize);
    let mut r = rng(818);
    let params: Params<f32> = random_params(&mut r, Kind::Bert, hidden, ffn);
    let bases = random_bases(&mut r, Kind::Bert, hidden, ffn);
    let cpu = Cpu::new();
    let block = build(
        &cpu,
        Kind::Bert,
        hidden,
        ffn,
        &params,
        &[Method::MeProp { keep: Keep::Fraction(0.07) }; 2],
        &bases,
        &adam(1e-3, 4),
    );
    assert_eq!(block.trainable_parameters(), 2 * (7 + 10), "MeProp at 7% of two 10 x 10 projections (+ biases)");
}

/// Steps 2..4 allocate nothing, for every method and both blocks.
#[test]
fn steps_allocate_nothing_after_the_first() {
    let (hidden, ffn, t) = (9usize, 14usize, 6usize);
    for kind in KINDS {
        let n = layout(kind, hidden, ffn).len();
        for v in VARIANTS {
            for opts in [adam(1e-3, t), sgd(1e-2, t)] {
                let mut r = rng(909);
                let params: Params<f32> = random_params(&mut r, kind, hidden, ffn);
                let bases = random_bases(&mut r, kind, hidden, ffn);
                let cpu = Cpu::new();
                let mut block =
                    build(&cpu, kind, hidden, ffn, &params, &vec![method(v, Keep::Fraction(0.2)); n], &bases, &opts);
                let x = cpu.upload(&rand_vec(&mut r, t * hidden)).unwrap();
                let g = cpu.upload(&rand_vec(&mut r, t * hidden)).unwrap();
                let mut y = cpu.alloc(t * hidden).unwrap();
                let mut dx = cpu.alloc(t * hidden).unwrap();
                let mut run = |block: &mut Block<f32>| {
                    block.forward(&x, t, &mut y);
                    block.backward(&g, t, Some(&mut dx));
                    block.step();
                };
                run(&mut block);
                let after_first = cpu.memory_stats();
                for s in 2..=4 {
                    run(&mut block);
                    let now = cpu.memory_stats();
                    assert_eq!(
                        now.allocations, after_first.allocations,
                        "{kind:?} {v:?} {:?}: step {s} allocated",
                        opts.optimizer
                    );
                    assert_eq!(
                        now.current_bytes, after_first.current_bytes,
                        "{kind:?} {v:?}: step {s} changed held memory"
                    );
                }
            }
        }
    }
}

/// The gate and up projections' output gradients are checked in the SwiGLU backward that
/// makes them: an overflow inside the block (`dh = g W_down` past f32's range, with `g` and
/// every weight finite) is named as their output gradient, in f32 and in bf16. In bf16 the
/// backward writes those gradients over the saved pre-activations, so a second backward of
/// the same forward is refused; f32 keeps its saves and allows it.
#[test]
fn llama_mlp_checks_its_swiglu_gradients_and_consumes_its_bf16_saves() {
    let (hidden, ffn, t) = (8usize, 12usize, 3usize);
    let cpu = Cpu::new();
    let mut r = rng(515);
    let params: Params<f32> = random_params(&mut r, Kind::Llama, hidden, ffn);
    let bases = random_bases(&mut r, Kind::Llama, hidden, ffn);
    let x = cpu.upload(&rand_vec(&mut r, t * hidden)).unwrap();
    let g = cpu.upload(&rand_vec(&mut r, t * hidden)).unwrap();
    let full = [Method::Full; 3];
    for precision in [Precision::Full, Precision::Bf16] {
        let opts = TrainOptions { precision, ..adam(1e-3, t) };
        let Block::Llama(mut block) = build(&cpu, Kind::Llama, hidden, ffn, &params, &full, &bases, &opts) else {
            unreachable!()
        };
        let mut y = cpu.alloc(t * hidden).unwrap();
        block.forward(&x, t, &mut y).unwrap();
        block.backward(&g, t, None).unwrap();
        let again = block.backward(&g, t, None);
        match precision {
            Precision::Bf16 => {
                let e = again.expect_err("a second bf16 backward of one forward").to_string();
                assert!(e.contains("no forward"), "{e}");
            }
            _ => again.expect("a second f32 backward of one forward"),
        }
        // Overflow inside: W_down = 1e30 and g = 1e30 give dh = inf, finite everywhere else.
        let mut huge = params.clone();
        huge.w[2] = vec![1e30; hidden * ffn];
        let Block::Llama(mut block) = build(&cpu, Kind::Llama, hidden, ffn, &huge, &full, &bases, &opts) else {
            unreachable!()
        };
        block.forward(&x, t, &mut y).unwrap();
        match block.backward(&cpu.upload(&vec![1e30f32; t * hidden]).unwrap(), t, None) {
            Err(sparsegrad::Error::NonFinite { what, count, first_index }) => {
                assert!(what.ends_with("output gradient grad_y"), "{precision:?}: {what}");
                assert!(count > 0 && first_index == 0, "{precision:?}: {count} at {first_index}");
            }
            other => panic!("{precision:?}: {other:?}"),
        }
    }
}
