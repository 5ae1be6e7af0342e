//! Fixtures of the BERT model tests (tests/bert_model.rs, tests/cuda_bert.rs): a tiny
//! random config, a head, a padded batch and the preliminary phase that builds its bases.

use sparsegrad::linear::trainable::{Method, TrainOptions};
use sparsegrad::model::bert::{BertConfig, BertModel, BertPlan, BertWeights, HeadConfig};
use sparsegrad::model::TrainingSetup;
use sparsegrad::optim::Optimizer;
use sparsegrad::{AdamParams, BasisSet, Cpu, GeluKind, PoolKind};
use std::collections::BTreeMap;

pub fn tiny() -> BertConfig {
    BertConfig {
        vocab: 23,
        hidden: 8,
        layers: 2,
        heads: 2,
        ffn: 12,
        max_positions: 9,
        type_vocab: 2,
        ln_eps: 1e-5,
        gelu: GeluKind::Erf,
    }
}

pub fn head(pooling: PoolKind) -> HeadConfig {
    HeadConfig {
        classes: 3,
        pooling,
        optimizer: Optimizer::Adam(AdamParams { lr: 1e-2, ..Default::default() }),
        seed: 7,
    }
}

/// A padded batch of three sequences (lengths 5, 2, 4) of the tiny vocabulary, with labels.
pub fn batch_data() -> (Vec<u32>, Vec<u32>, Vec<u32>, usize, usize) {
    let (batch, seq) = (3, 5);
    let ids: Vec<u32> = (0..batch * seq).map(|i| ((i * 7 + 3) % 23) as u32).collect();
    (ids, vec![5, 2, 4], vec![0, 2, 1], batch, seq)
}

/// The preliminary phase: dense MLP gradients of a few steps, one basis per projection
/// type (or per layer).
#[allow(clippy::too_many_arguments)]
pub fn collect_bases(
    w: &BertWeights,
    ids: &[u32],
    lengths: &[u32],
    labels: &[u32],
    batch: usize,
    seq: usize,
    per_layer: bool,
) -> BasisSet {
    let cpu = Cpu::new();
    let plan = BertPlan { per_layer_basis: per_layer, ..BertPlan::all(&w.config, Method::Collect) };
    let mut m = BertModel::<Cpu, f32>::new(
        &cpu,
        w,
        &TrainingSetup { plan: plan.clone(), bases: None, options: TrainOptions::default() },
        &head(PoolKind::Mean),
    )
    .unwrap();
    let mut accs = BTreeMap::new();
    for _ in 0..4 {
        m.train_step(ids, lengths, labels, batch, seq).unwrap();
        for l in 0..w.config.layers {
            m.mlp(l).unwrap().collect(&mut accs).unwrap();
        }
    }
    let mut set = BasisSet::new();
    for (group, acc) in &accs {
        set.insert(acc.basis(group).unwrap());
    }
    let want = if per_layer { 2 * w.config.layers } else { 2 };
    assert_eq!(accs.len(), want, "groups {:?}", accs.keys().collect::<Vec<_>>());
    set
}
