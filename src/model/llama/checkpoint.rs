//! What a trained [`LlamaModel`] hands back: its merged weights (all at once, or one tensor
//! at a time as a [`LlamaSource`], to save without assembling them) and adapters (what
//! training changed in the planned MLPs, relative to the base weights).

use super::{LlamaModel, GROUPS};
use crate::backend::operand::to_f;
use crate::backend::Backend;
use crate::basis::BasisSet;
use crate::error::{Error, Result};
use crate::linear::trainable::Method;
use crate::model::config::LlamaConfig;
use crate::model::weights::{checked_tensor, Field, LlamaSource, LlamaWeights, Tensor};
use crate::scalar::Real;
use std::borrow::Cow;

impl<B: Backend + Clone, F: Real> LlamaModel<B, F> {
    /// The weights with every MLP projection replaced by its merged (trained) weight, all in
    /// host memory. [`Self::merged`] hands them out one at a time instead.
    pub fn merged_weights(&self, base: &(impl LlamaSource + ?Sized)) -> Result<LlamaWeights> {
        LlamaWeights::from_source(&self.merged(base))
    }

    /// `base` (the weights the model was built from) with every trained MLP projection
    /// replaced by its merged weight, read from the device when asked for: save it with
    /// [`crate::model::weights::save_hf_safetensors`] to write the merged model one tensor
    /// at a time.
    pub fn merged<'a, S: LlamaSource + ?Sized>(&'a self, base: &'a S) -> MergedLlama<'a, B, F, S> {
        MergedLlama { model: self, base }
    }

    /// Name of an MLP projection in adapters and HF checkpoints.
    pub fn projection_name(layer: usize, j: usize) -> String {
        format!("model.layers.{layer}.mlp.{}_proj", GROUPS[j])
    }

    fn base_mlp_weights(base: &(impl LlamaSource + ?Sized), layer: usize) -> Result<[Vec<F>; 3]> {
        if layer >= base.config().layers {
            return Err(Error::invalid("adapter", format!("the base model has no layer {layer}")));
        }
        let read = |f: Field| checked_tensor(base, Tensor::Layer(layer, f)).map(|w| to_f::<F>(&w));
        Ok([read(Field::Gate)?, read(Field::Up)?, read(Field::Down)?])
    }

    /// Saves what training changed in the planned layers' MLPs (see [`crate::adapter`]),
    /// relative to `base`, the weights the model was built from.
    pub fn save_adapter(
        &self,
        path: &std::path::Path,
        base: &(impl LlamaSource + ?Sized),
        bases: Option<&BasisSet>,
    ) -> Result<()> {
        let mut planned = Vec::with_capacity(3 * self.plan.layers.len());
        for &l in &self.plan.layers {
            let weights = Self::base_mlp_weights(base, l)?;
            for (j, (p, w)) in self.layers[l].mlp.projections().into_iter().zip(weights).enumerate() {
                planned.push((Self::projection_name(l, j), p, w));
            }
        }
        crate::adapter::save_projections(path, &planned, bases)
    }

    /// Loads an adapter saved by [`Self::save_adapter`] into this model, freshly built
    /// from the same `base` with the same plan; every projection is checked first.
    pub fn load_adapter(&mut self, path: &std::path::Path, base: &(impl LlamaSource + ?Sized)) -> Result<()> {
        let planned_layers = &self.plan.layers;
        let mut planned = Vec::with_capacity(3 * planned_layers.len());
        for (l, layer) in self.layers.iter_mut().enumerate().filter(|(l, _)| planned_layers.contains(l)) {
            let weights = Self::base_mlp_weights(base, l)?;
            for (j, (p, w)) in layer.mlp.projections_mut().into_iter().zip(weights).enumerate() {
                planned.push((Self::projection_name(l, j), p, w));
            }
        }
        crate::adapter::load_projections(path, planned)
    }
}

/// A trained model's merged weights over its base, as a [`LlamaSource`] (see
/// [`LlamaModel::merged`]): trained MLP projections come from the device, every other
/// tensor from the base.
pub struct MergedLlama<'a, B: Backend, F: Real, S: LlamaSource + ?Sized> {
    model: &'a LlamaModel<B, F>,
    base: &'a S,
}

impl<B: Backend + Clone, F: Real, S: LlamaSource + ?Sized> LlamaSource for MergedLlama<'_, B, F, S> {
    fn config(&self) -> &LlamaConfig {
        self.base.config()
    }

    fn tensor(&self, t: Tensor) -> Result<Cow<'_, [f32]>> {
        let j = match t {
            Tensor::Layer(i, f) if self.model.plan.layers.contains(&i) => match f {
                Field::Gate => Some((i, 0)),
                Field::Up => Some((i, 1)),
                Field::Down => Some((i, 2)),
                _ => None,
            },
            _ => None,
        };
        if let Some((i, j)) = j {
            let layer = self.model.layers.get(i).ok_or_else(|| Error::invalid("merged", format!("no layer {i}")))?;
            let p = layer.mlp.projections()[j];
            // A frozen projection is the base weight (a bf16 layer holds only its rounding).
            if p.method != Method::Frozen {
                let merged = p.linear.merged_weight()?;
                return Ok(Cow::Owned(merged.into_iter().map(|x| x.to_f64() as f32).collect()));
            }
        }
        self.base.tensor(t)
    }
}
