//! The BERT classifier on CUDA against the CPU: pooled vectors of a padded batch, the
//! training losses of a few steps and the trained MLP weights, for every method and both
//! poolings, on a tiny random config.
#![cfg(feature = "cuda")]

mod common;
mod cuda_common;

use common::assert_close;
use common::bert::{batch_data, collect_bases, head, tiny};
use cuda_common::cuda_test;
use sparsegrad::linear::trainable::{Method, TrainOptions};
use sparsegrad::model::bert::{BertConfig, BertModel, BertPlan, BertWeights};
use sparsegrad::model::TrainingSetup;
use sparsegrad::optim::Optimizer;
use sparsegrad::{AdamParams, Cpu, Keep, PoolKind, Selection};

cuda_test!(fn cuda_model_matches_cpu(cuda) {
    let cfg = BertConfig { hidden: 32, heads: 4, ffn: 48, layers: 2, ..tiny() };
    let w = BertWeights::random(&cfg, 21).unwrap();
    let (ids, lengths, labels, batch, seq) = batch_data();
    let bases = collect_bases(&w, &ids, &lengths, &labels, batch, seq, false);
    let opts = TrainOptions {
        optimizer: Optimizer::Adam(AdamParams { lr: 1e-3, ..Default::default() }),
        ..Default::default()
    };
    let keep = Keep::Fraction(0.1);
    for method in [
        Method::Full,
        Method::Lora { rank: 2, alpha: 4.0 },
        Method::MeProp { keep },
        Method::SparseGrad { keep, selection: Selection::SparseByDense { threshold: 0.0 }, formulation: None },
    ] {
        for pooling in [PoolKind::Mean, PoolKind::Cls] {
            let plan = BertPlan::all(&cfg, method);
            let cpu = Cpu::new();
            let mut a = BertModel::<Cpu, f32>::new(&cpu, &w, &TrainingSetup { plan: plan.clone(), bases: Some(&bases), options: opts }, &head(pooling)).unwrap();
            let mut b =
                BertModel::<sparsegrad::Cuda, f32>::new(&cuda, &w, &TrainingSetup { plan: plan.clone(), bases: Some(&bases), options: opts }, &head(pooling)).unwrap();
            let what = format!("{} {pooling:?}", method.name());
            let pa = a.embed(&ids, &lengths, batch, seq).unwrap();
            let pb = b.embed(&ids, &lengths, batch, seq).unwrap();
            assert_close(&format!("{what}: pooled"), &pb, &pa, 1e-5, 1e-4);
            for step in 0..3 {
                let la = a.train_step(&ids, &lengths, &labels, batch, seq).unwrap().mean();
                let lb = b.train_step(&ids, &lengths, &labels, batch, seq).unwrap().mean();
                assert!((la - lb).abs() <= 1e-4 * la.abs().max(1.0), "{what}: step {step} loss {lb} vs CPU {la}");
            }
            let (ma, mb) = (a.merged_weights(&w).unwrap(), b.merged_weights(&w).unwrap());
            for l in 0..cfg.layers {
                assert_close(
                    &format!("{what}: layer {l} intermediate"),
                    &mb.layers[l].inter,
                    &ma.layers[l].inter,
                    1e-5,
                    1e-3,
                );
                assert_close(&format!("{what}: layer {l} output"), &mb.layers[l].out, &ma.layers[l].out, 1e-5, 1e-3);
            }
        }
    }
});
