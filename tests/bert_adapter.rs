//! A trained BertModel's adapter and head, saved and loaded into a model freshly built
//! from the same base: the same logits; mismatched files are clear errors that leave the
//! model unchanged.

mod common;

use common::bert::{batch_data, collect_bases, head, tiny};
use sparsegrad::linear::trainable::{Method, TrainOptions};
use sparsegrad::model::bert::{BertModel, BertPlan, BertWeights, HeadConfig};
use sparsegrad::model::TrainingSetup;
use sparsegrad::optim::Optimizer;
use sparsegrad::{AdamParams, BasisSet, Cpu, Keep, PoolKind, Selection};
use std::path::PathBuf;

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sparsegrad-bert-adapter-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn build(w: &BertWeights, method: Method, bases: &BasisSet, head_cfg: &HeadConfig) -> BertModel<Cpu, f32> {
    let opts = TrainOptions {
        optimizer: Optimizer::Adam(AdamParams { lr: 1e-2, ..Default::default() }),
        ..Default::default()
    };
    let plan = BertPlan { layers: vec![1], ..BertPlan::all(&w.config, method) };
    BertModel::<Cpu, f32>::new(&Cpu::new(), w, &TrainingSetup { plan, bases: Some(bases), options: opts }, head_cfg)
        .unwrap()
}

#[test]
fn adapter_and_head_round_trip_for_every_method() {
    let w = BertWeights::random(&tiny(), 11).unwrap();
    let (ids, lengths, labels, batch, seq) = batch_data();
    let bases = collect_bases(&w, &ids, &lengths, &labels, batch, seq, false);
    let keep = Keep::Fraction(0.1);
    let methods = [
        Method::Full,
        Method::Lora { rank: 2, alpha: 4.0 },
        Method::MeProp { keep },
        Method::SparseGrad { keep, selection: Selection::Exact, formulation: None },
    ];
    let dir = tempdir("trip");
    for method in methods {
        let mut trained = build(&w, method, &bases, &head(PoolKind::Mean));
        for _ in 0..8 {
            trained.train_step(&ids, &lengths, &labels, batch, seq).unwrap();
        }
        let (adapter, head_file) = (dir.join("adapter.safetensors"), dir.join("head.safetensors"));
        trained.save_adapter(&adapter, &w, Some(&bases)).unwrap();
        trained.save_head(&head_file).unwrap();
        let want = trained.logits(&ids, &lengths, batch, seq).unwrap();

        let mut fresh = build(&w, method, &bases, &head(PoolKind::Mean));
        let before = fresh.logits(&ids, &lengths, batch, seq).unwrap();
        assert_ne!(before, want, "{}: training changed nothing", method.name());
        fresh.load_adapter(&adapter, &w).unwrap();
        fresh.load_head(&head_file).unwrap();
        let got = fresh.logits(&ids, &lengths, batch, seq).unwrap();
        for (g, e) in got.iter().zip(&want) {
            assert!((g - e).abs() <= 1e-5 * (1.0 + e.abs()), "{}: logits {got:?} vs {want:?}", method.name());
        }
        // The loaded model goes on training.
        fresh.train_step(&ids, &lengths, &labels, batch, seq).unwrap();
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn mismatched_adapters_and_heads_are_errors_that_change_nothing() {
    let w = BertWeights::random(&tiny(), 12).unwrap();
    let (ids, lengths, labels, batch, seq) = batch_data();
    let bases = collect_bases(&w, &ids, &lengths, &labels, batch, seq, false);
    let dir = tempdir("bad");
    let mut lora = build(&w, Method::Lora { rank: 2, alpha: 4.0 }, &bases, &head(PoolKind::Mean));
    lora.train_step(&ids, &lengths, &labels, batch, seq).unwrap();
    let adapter = dir.join("lora.safetensors");
    lora.save_adapter(&adapter, &w, None).unwrap();
    let head_file = dir.join("head.safetensors");
    lora.save_head(&head_file).unwrap();

    let mut full = build(&w, Method::Full, &bases, &head(PoolKind::Mean));
    let before = full.logits(&ids, &lengths, batch, seq).unwrap();
    let e = full.load_adapter(&adapter, &w).unwrap_err().to_string();
    assert!(e.contains("encoder.layer.1"), "{e}");

    // Another pooling, another class count, a missing tensor, a missing file.
    let mut cls = build(&w, Method::Full, &bases, &head(PoolKind::Cls));
    let e = cls.load_head(&head_file).unwrap_err().to_string();
    assert!(e.contains("pooling") && e.contains("cls"), "{e}");
    let two = HeadConfig { classes: 2, ..head(PoolKind::Mean) };
    let mut two_class = build(&w, Method::Full, &bases, &two);
    let e = two_class.load_head(&head_file).unwrap_err().to_string();
    assert!(e.contains("classifier.weight"), "{e}");
    let e = full.load_head(&adapter).unwrap_err().to_string();
    assert!(e.contains("pooling") || e.contains("classifier"), "{e}");
    let e = full.load_head(&dir.join("missing.safetensors")).unwrap_err().to_string();
    assert!(e.contains("missing.safetensors"), "{e}");
    assert_eq!(full.logits(&ids, &lengths, batch, seq).unwrap(), before, "a failed load changed the model");
    std::fs::remove_dir_all(&dir).ok();
}
