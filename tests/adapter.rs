//! Adapters: save -> load -> continue equals uninterrupted training for every method;
//! loading into another shape, basis, base weight or method is a clear error; writes
//! are atomic.

mod common;

use common::*;
use sparsegrad::adapter::{load_adapter, save_adapter, AdapterEntry, AdapterTarget};
use sparsegrad::linear::trainable::{Method, TrainOptions};
use sparsegrad::mlp::{BertMlp, BertMlpConfig, MlpShape, ProjectionSpec};
use sparsegrad::{AdamParams, Backend, Basis, Cpu, Error, Formulation, GeluKind, Keep, Optimizer, Selection};

const HIDDEN: usize = 12;
const FFN: usize = 20;
const TOKENS: usize = 9;

struct Fixture {
    w_in: Vec<f32>,
    b_in: Vec<f32>,
    w_out: Vec<f32>,
    b_out: Vec<f32>,
    basis_in: Basis,
    basis_out: Basis,
    batches: Vec<(Vec<f32>, Vec<f32>)>,
}

fn fixture() -> Fixture {
    let mut r = rng(21);
    Fixture {
        w_in: rand_vec(&mut r, FFN * HIDDEN).iter().map(|v| v * 0.3).collect(),
        b_in: rand_vec(&mut r, FFN),
        w_out: rand_vec(&mut r, HIDDEN * FFN).iter().map(|v| v * 0.3).collect(),
        b_out: rand_vec(&mut r, HIDDEN),
        basis_in: random_basis(&mut r, "dense_in", FFN, HIDDEN),
        basis_out: random_basis(&mut r, "dense_out", HIDDEN, FFN),
        batches: (0..6).map(|_| (rand_vec(&mut r, TOKENS * HIDDEN), rand_vec(&mut r, TOKENS * HIDDEN))).collect(),
    }
}

fn block(cpu: &Cpu, fx: &Fixture, method: Method, opts: &TrainOptions) -> BertMlp<Cpu> {
    let spec_in =
        ProjectionSpec { weight: &fx.w_in, bias: Some(&fx.b_in), method, group: "dense_in", basis: Some(&fx.basis_in) };
    let spec_out = ProjectionSpec {
        weight: &fx.w_out,
        bias: Some(&fx.b_out),
        method,
        group: "dense_out",
        basis: Some(&fx.basis_out),
    };
    BertMlp::new(
        cpu,
        MlpShape { hidden: HIDDEN, ffn: FFN },
        [spec_in, spec_out],
        BertMlpConfig { gelu: GeluKind::Erf, options: *opts },
    )
    .unwrap()
}

/// One step of L = 0.5 |y - target|^2 / T; returns the loss before the step.
fn train_step(cpu: &Cpu, b: &mut BertMlp<Cpu>, x: &[f32], target: &[f32]) -> f64 {
    let xb = cpu.upload(x).unwrap();
    let mut y = cpu.alloc::<f32>(TOKENS * HIDDEN).unwrap();
    b.forward(&xb, TOKENS, &mut y).unwrap();
    let diff: Vec<f32> = y.iter().zip(target).map(|(a, t)| a - t).collect();
    let loss = diff.iter().map(|d| 0.5 * (*d as f64).powi(2)).sum::<f64>() / TOKENS as f64;
    let g = cpu.upload(&diff.iter().map(|d| d / TOKENS as f32).collect::<Vec<_>>()).unwrap();
    b.backward(&g, TOKENS, None).unwrap();
    b.step().unwrap();
    loss
}

fn save(path: &std::path::Path, b: &BertMlp<Cpu>, fx: &Fixture) -> sparsegrad::Result<()> {
    let entries = [
        AdapterEntry { name: "dense_in", linear: &b.dense_in.linear, base_weight: &fx.w_in, basis: Some(&fx.basis_in) },
        AdapterEntry {
            name: "dense_out",
            linear: &b.dense_out.linear,
            base_weight: &fx.w_out,
            basis: Some(&fx.basis_out),
        },
    ];
    save_adapter(path, &entries)
}

fn load(path: &std::path::Path, b: &mut BertMlp<Cpu>, fx: &Fixture) -> sparsegrad::Result<()> {
    let [p_in, p_out] = b.projections_mut();
    let mut targets = [
        AdapterTarget { name: "dense_in", linear: &mut p_in.linear, base_weight: &fx.w_in },
        AdapterTarget { name: "dense_out", linear: &mut p_out.linear, base_weight: &fx.w_out },
    ];
    load_adapter(path, &mut targets)
}

fn methods() -> Vec<(&'static str, Method, Optimizer)> {
    let adam = Optimizer::Adam(AdamParams { lr: 1e-2, ..Default::default() });
    let sgd = Optimizer::Sgd { lr: 0.05 };
    let sg = |f| Method::SparseGrad { keep: Keep::Fraction(0.05), selection: Selection::Exact, formulation: Some(f) };
    vec![
        ("frozen", Method::Frozen, adam),
        ("full", Method::Full, adam),
        ("sparsegrad transformed", sg(Formulation::Transformed), adam),
        ("sparsegrad merged", sg(Formulation::Merged), adam),
        ("sparsegrad transformed sgd", sg(Formulation::Transformed), sgd),
        ("sparsegrad merged sgd", sg(Formulation::Merged), sgd),
        ("lora", Method::Lora { rank: 3, alpha: 6.0 }, adam),
        ("meprop", Method::MeProp { keep: Keep::Fraction(0.05) }, adam),
        ("meprop sgd", Method::MeProp { keep: Keep::Fraction(0.05) }, sgd),
    ]
}

#[test]
fn save_load_continue_equals_uninterrupted_training() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    for (name, method, optimizer) in methods() {
        let cpu = Cpu::new();
        let opts = TrainOptions { optimizer, seed: 5, ..Default::default() };
        let mut straight = block(&cpu, &fx, method, &opts);
        let losses: Vec<f64> = fx.batches.iter().map(|(x, t)| train_step(&cpu, &mut straight, x, t)).collect();

        let mut first = block(&cpu, &fx, method, &opts);
        let mut resumed_losses: Vec<f64> =
            fx.batches[..3].iter().map(|(x, t)| train_step(&cpu, &mut first, x, t)).collect();
        let path = dir.path().join(format!("{}.safetensors", name.replace(' ', "_")));
        save(&path, &first, &fx).unwrap();
        let mut second = block(&cpu, &fx, method, &opts);
        load(&path, &mut second, &fx).unwrap();
        resumed_losses.extend(fx.batches[3..].iter().map(|(x, t)| train_step(&cpu, &mut second, x, t)));
        assert_close(&format!("{name}: losses after resume"), &resumed_losses, &losses, 1e-9, 1e-5);
        if method != Method::Frozen {
            assert!(losses[5] < losses[0], "{name}: training lowers the loss ({losses:?})");
        }
        for (a, b) in straight.projections().iter().zip(second.projections()) {
            let (wa, wb) = (a.linear.merged_weight().unwrap(), b.linear.merged_weight().unwrap());
            assert_close(&format!("{name}: {} merged weight after resume", a.name), &wb, &wa, 1e-6, 1e-5);
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "temp files left behind");
    }
}

#[test]
fn sparse_adapters_are_small() {
    let fx = fixture();
    let cpu = Cpu::new();
    let opts = TrainOptions {
        optimizer: Optimizer::Adam(AdamParams { lr: 1e-2, ..Default::default() }),
        ..Default::default()
    };
    let method = Method::SparseGrad {
        keep: Keep::Count(3),
        selection: Selection::Exact,
        formulation: Some(Formulation::Transformed),
    };
    let mut b = block(&cpu, &fx, method, &opts);
    train_step(&cpu, &mut b, &fx.batches[0].0, &fx.batches[0].1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.safetensors");
    save(&path, &b, &fx).unwrap();
    let f = sparsegrad::io::SafetensorsFile::open(&path).unwrap();
    assert_eq!(f.shape("dense_in.values"), Some(&[3usize][..]), "one step of k = 3 changes 3 entries");
    assert_eq!(f.optional_meta_str("dense_in.method"), Some("sparsegrad"));
    assert!(f.contains("basis.dense_in.P") && f.contains("basis.dense_out.Q"));
}

#[test]
fn loading_into_another_shape_basis_base_or_method_fails_cleanly() {
    let fx = fixture();
    let cpu = Cpu::new();
    let opts = TrainOptions::default();
    let sg = Method::SparseGrad { keep: Keep::Fraction(0.05), selection: Selection::Exact, formulation: None };
    let mut trained = block(&cpu, &fx, sg, &opts);
    train_step(&cpu, &mut trained, &fx.batches[0].0, &fx.batches[0].1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sg.safetensors");
    save(&path, &trained, &fx).unwrap();

    // Another basis for dense_out: refused, and dense_in (checked first) is left untouched too.
    let mut r = rng(99);
    let other = Fixture { basis_out: random_basis(&mut r, "dense_out", HIDDEN, FFN), ..fixture() };
    let mut target = block(&cpu, &other, sg, &opts);
    let before = target.dense_in.linear.merged_weight().unwrap();
    let err = load(&path, &mut target, &other).unwrap_err();
    assert!(matches!(&err, Error::Incompatible { what, .. } if what.contains("dense_out")), "{err}");
    assert_eq!(target.dense_in.linear.merged_weight().unwrap(), before, "nothing loaded on failure");

    // Another base weight.
    let mut moved = fixture();
    moved.w_in[0] += 1.0;
    let mut target = block(&cpu, &moved, sg, &opts);
    assert!(matches!(load(&path, &mut target, &moved), Err(Error::Incompatible { .. })));

    // Another method.
    let mut lora = block(&cpu, &fx, Method::Lora { rank: 2, alpha: 4.0 }, &opts);
    assert!(matches!(load(&path, &mut lora, &fx), Err(Error::Incompatible { .. })));

    // Another shape: a block with a wider FFN.
    let mut r = rng(3);
    let wide_in = rand_vec(&mut r, (FFN + 1) * HIDDEN);
    let wide_b = rand_vec(&mut r, FFN + 1);
    let wide_out = rand_vec(&mut r, HIDDEN * (FFN + 1));
    let spec_in =
        ProjectionSpec { weight: &wide_in, bias: Some(&wide_b), method: Method::Full, group: "dense_in", basis: None };
    let spec_out = ProjectionSpec {
        weight: &wide_out,
        bias: Some(&fx.b_out),
        method: Method::Full,
        group: "dense_out",
        basis: None,
    };
    let mut wide = BertMlp::new(
        &cpu,
        MlpShape { hidden: HIDDEN, ffn: FFN + 1 },
        [spec_in, spec_out],
        BertMlpConfig { gelu: GeluKind::Erf, options: opts },
    )
    .unwrap();
    let [p_in, p_out] = wide.projections_mut();
    let mut targets = [
        AdapterTarget { name: "dense_in", linear: &mut p_in.linear, base_weight: &wide_in },
        AdapterTarget { name: "dense_out", linear: &mut p_out.linear, base_weight: &wide_out },
    ];
    assert!(matches!(load_adapter(&path, &mut targets), Err(Error::Incompatible { .. })));

    // Not an adapter, truncated, missing.
    let bogus = dir.path().join("bogus.safetensors");
    std::fs::write(&bogus, b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ").unwrap();
    let mut target = block(&cpu, &fx, sg, &opts);
    assert!(load(&bogus, &mut target, &fx).is_err());
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&bogus, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(load(&bogus, &mut target, &fx), Err(Error::Format { .. })));
    assert!(matches!(load(&dir.path().join("missing"), &mut target, &fx), Err(Error::Io { .. })));
}
