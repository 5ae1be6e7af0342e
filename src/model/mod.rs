//! Transformer models: the LLaMA-architecture decoder ([`llama`]: hyper-parameters in
//! [`config`], RoPE frequency scaling in [`rope`], weights loaded from GGUF or safetensors
//! in [`weights`], the byte-level BPE tokenizer rebuilt from GGUF metadata in
//! [`tokenizer`]) and the BERT-family encoder classifier ([`bert`], with its HF weights and
//! WordPiece tokenizer). Attention is shared by both (`attention`, internal).

pub(crate) mod attention;

use crate::basis::BasisSet;
use crate::linear::trainable::TrainOptions;

/// How a model's MLPs train: which layers and projections (`plan`, a [`llama::MlpPlan`] or a
/// [`bert::BertPlan`]), the bases SparseGrad projections take their basis from, and the
/// options every trainable projection shares. The default trains nothing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainingSetup<'a, P> {
    pub plan: P,
    pub bases: Option<&'a BasisSet>,
    pub options: TrainOptions,
}

pub mod bert;
pub mod config;
pub mod llama;
pub mod rope;
mod step_graph;
pub mod tokenizer;
pub mod weights;
