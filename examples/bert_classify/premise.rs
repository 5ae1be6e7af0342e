//! The method's premise measured on the real model: the share of a step's squared gradient
//! norm that its top 1% entries hold, in the original space and in the basis, per
//! projection type, with one basis per type (the paper's choice) and with one per layer.
//!
//! Dense MLP gradients of `--prelim-steps` batches build the Grams (both groupings at
//! once); the shares are measured on the gradients of `HELD_OUT` further batches.

use crate::args::Args;
use crate::train::Prepared;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use sparsegrad::basis::mean_sparsity_report;
use sparsegrad::linear::trainable::{Method, TrainOptions};
use sparsegrad::model::bert::tokenizer::BertTokenizer;
use sparsegrad::model::bert::{BertModel, BertPlan, HeadConfig, GROUPS};
use sparsegrad::model::TrainingSetup;
use sparsegrad::{Backend, Error, GramAccumulator, Optimizer, Result};
use std::fmt::Write as _;

/// Batches whose gradients are measured (not used for the bases).
const HELD_OUT: usize = 4;

/// Per projection type: `(original, per-type basis, per-layer basis)` top-1% shares,
/// averaged over layers and held-out batches.
pub struct Premise {
    pub rows: Vec<(&'static str, f64, f64, f64)>,
}

impl Premise {
    pub fn markdown(&self) -> String {
        let mut s = String::from(
            "| projection | top-1% share, original | in the basis, one per type | in the basis, one per layer |\n|---|---|---|---|\n",
        );
        for (name, o, t, l) in &self.rows {
            let _ = writeln!(s, "| {name} | {o:.3} | {t:.3} | {l:.3} |");
        }
        s
    }
}

pub fn measure<B: Backend + Clone>(backend: &B, p: &Prepared, args: &Args) -> Result<Premise> {
    let c = &p.weights.config;
    let plan = BertPlan { layers: (0..c.layers).collect(), methods: [Method::Collect; 2], per_layer_basis: false };
    let head =
        HeadConfig { classes: p.classes, pooling: args.pooling, optimizer: Optimizer::default(), seed: args.seed };
    let mut model = BertModel::<B, f32>::new(
        backend,
        &p.weights,
        &TrainingSetup { plan: plan.clone(), bases: None, options: TrainOptions::default() },
        &head,
    )?;
    let mut rng = SmallRng::seed_from_u64(args.seed ^ 0x9E37);
    let mut order: Vec<usize> = (0..p.train.ids.len()).collect();
    order.shuffle(&mut rng);
    let shapes = [(c.ffn, c.hidden), (c.hidden, c.ffn)];
    let mut per_type: Vec<GramAccumulator> = shapes.iter().map(|&(o, i)| GramAccumulator::new(o, i)).collect();
    let mut per_layer: Vec<[GramAccumulator; 2]> = (0..c.layers)
        .map(|_| [GramAccumulator::new(shapes[0].0, shapes[0].1), GramAccumulator::new(shapes[1].0, shapes[1].1)])
        .collect();
    // held[layer][j]: the held-out gradients, concatenated.
    let mut held: Vec<[Vec<f32>; 2]> = (0..c.layers).map(|_| [Vec::new(), Vec::new()]).collect();
    for step in 0..args.prelim_steps + HELD_OUT {
        let idx: Vec<usize> = (0..args.batch).map(|j| order[(step * args.batch + j) % order.len()]).collect();
        let seqs: Vec<Vec<u32>> = idx.iter().map(|&i| p.train.ids[i].clone()).collect();
        let b = BertTokenizer::pad(&seqs, p.pad_id);
        let labels: Vec<u32> = idx.iter().map(|&i| p.train.labels[i]).collect();
        model.forward(&b.ids, &b.lengths, &labels, b.batch, b.seq, 1.0)?;
        model.backward()?;
        for l in 0..c.layers {
            for (j, proj) in model.mlp(l).expect("layer").projections().into_iter().enumerate() {
                let g = proj.linear.dense_grad_host()?;
                if step < args.prelim_steps {
                    per_type[j].add(&g)?;
                    per_layer[l][j].add(&g)?;
                } else {
                    held[l][j].extend_from_slice(&g);
                }
            }
        }
    }
    let mut rows = Vec::new();
    for j in 0..2 {
        let k = (shapes[j].0 * shapes[j].1).div_ceil(100);
        let type_basis = per_type[j].basis(GROUPS[j])?;
        let layer_bases = (0..c.layers)
            .map(|l| per_layer[l][j].basis(&format!("layer.{l}.{}", GROUPS[j])))
            .collect::<Result<Vec<_>>>()?;
        let none = || Error::invalid("premise", "no held-out gradients");
        let typed = mean_sparsity_report(held.iter().map(|h| (h[j].as_slice(), &type_basis)), k)?.ok_or_else(none)?;
        let layered = mean_sparsity_report(held.iter().zip(&layer_bases).map(|(h, b)| (h[j].as_slice(), b)), k)?
            .ok_or_else(none)?;
        let (o, t, pl) = (typed.original_fraction, typed.transformed_fraction, layered.transformed_fraction);
        rows.push((GROUPS[j], o, t, pl));
    }
    Ok(Premise { rows })
}
