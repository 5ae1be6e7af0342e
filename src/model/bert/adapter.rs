//! What a trained [`BertModel`] hands on: the merged HF weights, the MLP adapter (see
//! [`crate::adapter`]) and the classification head, and loading the last two back into a
//! model freshly built from the same base weights and plan.

use super::{BertModel, BertWeights, GROUPS};
use crate::backend::operand::to_f;
use crate::backend::{Backend, PoolKind, Precision};
use crate::basis::BasisSet;
use crate::error::{Error, Result};
use crate::io::safetensors::{check_finite, SafetensorsFile, SafetensorsWriter};
use crate::linear::trainable::{LinearBuilder, Method, TrainOptions};
use crate::scalar::Real;
use std::path::Path;

const HEAD_WEIGHT: &str = "classifier.weight";
const HEAD_BIAS: &str = "classifier.bias";

fn pooling_name(p: PoolKind) -> &'static str {
    match p {
        PoolKind::Mean => "mean",
        PoolKind::Cls => "cls",
    }
}

impl<B: Backend + Clone, F: Real> BertModel<B, F> {
    /// The weights with every planned MLP projection replaced by its merged (trained)
    /// weight and bias.
    pub fn merged_weights(&self, base: &BertWeights) -> Result<BertWeights> {
        let mut out = base.clone();
        let cast = |v: Vec<F>| v.into_iter().map(|x| x.to_f64() as f32).collect::<Vec<f32>>();
        for &i in &self.plan.layers {
            let [pin, pout] = self.layers[i].mlp.projections();
            let lw = &mut out.layers[i];
            // A frozen projection is the base weight (a bf16 layer holds only its rounding).
            if pin.method != Method::Frozen {
                lw.inter = cast(pin.linear.merged_weight()?);
            }
            if pout.method != Method::Frozen {
                lw.out = cast(pout.linear.merged_weight()?);
            }
            if let Some(b) = pin.linear.bias_host()? {
                lw.inter_bias = cast(b);
            }
            if let Some(b) = pout.linear.bias_host()? {
                lw.out_bias = cast(b);
            }
        }
        Ok(out)
    }

    /// HF name of MLP projection `j` (0 = intermediate, 1 = output) of `layer`.
    pub fn projection_name(layer: usize, j: usize) -> String {
        format!("encoder.layer.{layer}.{}.dense", GROUPS[j])
    }

    fn base_mlp_weights(base: &BertWeights, layer: usize) -> Result<[Vec<F>; 2]> {
        let lw = base
            .layers
            .get(layer)
            .ok_or_else(|| Error::invalid("adapter", format!("the base model has no layer {layer}")))?;
        Ok([to_f(&lw.inter), to_f(&lw.out)])
    }

    /// Saves what training changed in the planned layers' MLPs (see [`crate::adapter`]),
    /// relative to `base`, the weights the model was built from. The head is not part of
    /// an adapter (see [`Self::save_head`]).
    pub fn save_adapter(&self, path: &Path, base: &BertWeights, bases: Option<&BasisSet>) -> Result<()> {
        let mut planned = Vec::with_capacity(2 * self.plan.layers.len());
        for &l in &self.plan.layers {
            let weights = Self::base_mlp_weights(base, l)?;
            for (j, (p, w)) in self.layers[l].mlp.projections().into_iter().zip(weights).enumerate() {
                planned.push((Self::projection_name(l, j), p, w));
            }
        }
        crate::adapter::save_projections(path, &planned, bases)
    }

    /// Loads an adapter saved by [`Self::save_adapter`] into this model, freshly built
    /// from the same `base` with the same plan; every projection is checked (method,
    /// shape, base weight, basis) before any layer changes.
    pub fn load_adapter(&mut self, path: &Path, base: &BertWeights) -> Result<()> {
        let planned_layers = &self.plan.layers;
        let mut planned = Vec::with_capacity(2 * planned_layers.len());
        for (l, layer) in self.layers.iter_mut().enumerate().filter(|(l, _)| planned_layers.contains(l)) {
            let weights = Self::base_mlp_weights(base, l)?;
            for (j, (p, w)) in layer.mlp.projections_mut().into_iter().zip(weights).enumerate() {
                planned.push((Self::projection_name(l, j), p, w));
            }
        }
        crate::adapter::load_projections(path, planned)
    }

    /// Writes the classification head (`classifier.weight` `(classes, hidden)`,
    /// `classifier.bias`, the pooling as metadata) as safetensors.
    pub fn save_head(&self, path: &Path) -> Result<()> {
        let classes = self.head_cfg.classes;
        let mut w = SafetensorsWriter::new();
        let f32s = |v: Vec<F>| v.into_iter().map(|x| x.to_f64() as f32).collect::<Vec<f32>>();
        w.add_f32(HEAD_WEIGHT, &[classes, self.config.hidden], f32s(self.head.merged_weight()?))?;
        w.add_f32(HEAD_BIAS, &[classes], f32s(self.head.bias_host()?.unwrap_or_else(|| vec![F::ZERO; classes])))?;
        w.set_metadata("pooling", pooling_name(self.head_cfg.pooling).to_string());
        w.write(path)
    }

    /// Replaces the head by one saved with [`Self::save_head`] (its optimizer state starts
    /// afresh). The file must match this model's classes, hidden size and pooling; on any
    /// error the model is unchanged.
    pub fn load_head(&mut self, path: &Path) -> Result<()> {
        let f = SafetensorsFile::open(path)?;
        let (classes, hidden) = (self.head_cfg.classes, self.config.hidden);
        let want = pooling_name(self.head_cfg.pooling);
        match f.optional_meta_str("pooling") {
            Some(p) if p == want => {}
            other => {
                return Err(Error::format(
                    Some(path),
                    format!("the head was saved with pooling {other:?}; this model pools by `{want}`"),
                ))
            }
        }
        let w = f.tensor_f32_shaped(HEAD_WEIGHT, &[classes, hidden])?;
        let b = f.tensor_f32_shaped(HEAD_BIAS, &[classes])?;
        check_finite(HEAD_WEIGHT, &w)?;
        check_finite(HEAD_BIAS, &b)?;
        let opts =
            TrainOptions { optimizer: self.head_cfg.optimizer, precision: Precision::Full, ..TrainOptions::default() };
        let head = LinearBuilder::new(&to_f::<F>(&w), classes, hidden)
            .bias(&to_f::<F>(&b))
            .method(Method::Full)
            .options(opts)
            .build(&self.backend)?;
        self.head = head;
        Ok(())
    }
}
