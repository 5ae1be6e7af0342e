//! The LLaMA side of a step's shape: the dimensions of the models the paper and the
//! examples use, which kind of layer each layer of a training plan is (what its step
//! launches depends on), and the bytes a step cannot avoid moving.

use super::shape::{CompulsoryBytes, ADAM_BYTES_PER_PARAM, SPARSE_ADAM_BYTES_PER_ENTRY};
use crate::backend::Precision;
use crate::error::{Error, Result};
use crate::linear::trainable::Method;
use crate::model::config::LlamaConfig;
use std::collections::BTreeMap;

/// The named model dimensions, as their Hugging Face `config.json` gives them, and `tiny`
/// (4 layers of hidden 64, grouped-query heads) for tests.
pub const NAMED_DIMS: [&str; 4] = ["smollm2-135m", "llama2-7b", "llama3-8b", "tiny"];

/// The configuration of a named model: `smollm2-135m` (HuggingFaceTB/SmolLM2-135M),
/// `llama2-7b` (meta-llama/Llama-2-7b-hf), `llama3-8b` (meta-llama/Meta-Llama-3-8B), or
/// `tiny`.
pub fn named_config(name: &str) -> Result<LlamaConfig> {
    let c = |hidden, ffn, layers, heads, kv_heads, vocab, tied, theta: f32, max_seq| LlamaConfig {
        hidden,
        ffn,
        layers,
        heads,
        kv_heads,
        head_dim: hidden / heads,
        rope_theta: theta,
        rope_scaling: None,
        rms_eps: 1e-5,
        vocab,
        tied_embeddings: tied,
        max_seq,
        bos: Some(1),
        eos: Some(2),
    };
    match name {
        "smollm2-135m" => Ok(c(576, 1536, 30, 9, 3, 49152, true, 100000.0, 8192)),
        "llama2-7b" => Ok(c(4096, 11008, 32, 32, 32, 32000, false, 10000.0, 4096)),
        "llama3-8b" => Ok(c(4096, 14336, 32, 32, 8, 128256, false, 500000.0, 8192)),
        "tiny" => Ok(c(64, 160, 4, 4, 2, 512, false, 10000.0, 256)),
        other => Err(Error::invalid("dims", format!("`{other}` is not one of {}", NAMED_DIMS.join(", ")))),
    }
}

/// What a decoder layer does in a training step, given the plan's trained layers: below the
/// lowest trained layer nothing needs gradients (forward only); the lowest trained layer
/// computes its MLP's weight gradient but no input gradient; every layer above it
/// backpropagates, trained (weight gradients and an optimizer step) or frozen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LayerKind {
    ForwardOnly,
    TrainedLowest,
    Trained,
    FrozenBackward,
}

impl LayerKind {
    pub fn label(self) -> &'static str {
        match self {
            LayerKind::ForwardOnly => "forward only (below the lowest trained block)",
            LayerKind::TrainedLowest => "lowest trained block",
            LayerKind::Trained => "trained block",
            LayerKind::FrozenBackward => "frozen block with backward",
        }
    }
}

/// The kind of each of `layers` layers under a plan training `trained` (any order).
pub fn layer_kinds(layers: usize, trained: &[usize]) -> Vec<LayerKind> {
    let lowest = trained.iter().copied().min();
    (0..layers)
        .map(|i| match lowest {
            None => LayerKind::ForwardOnly,
            Some(lo) if i < lo => LayerKind::ForwardOnly,
            Some(lo) if i == lo => LayerKind::TrainedLowest,
            Some(_) if trained.contains(&i) => LayerKind::Trained,
            Some(_) => LayerKind::FrozenBackward,
        })
        .collect()
}

/// How many layers of each kind.
pub fn kind_counts(kinds: &[LayerKind]) -> BTreeMap<LayerKind, usize> {
    let mut m = BTreeMap::new();
    for k in kinds {
        *m.entry(*k).or_default() += 1;
    }
    m
}

/// The shortest prefix of the model (layers `0..n`) that holds a layer of every kind the
/// full plan has: the slice a run of a few layers stands for the whole model with.
pub fn covering_prefix(layers: usize, trained: &[usize]) -> usize {
    let full = layer_kinds(layers, trained);
    let needed = kind_counts(&full);
    (1..=layers)
        .find(|&n| {
            let part = kind_counts(&layer_kinds(n, &trained.iter().copied().filter(|&l| l < n).collect::<Vec<_>>()));
            needed.keys().all(|k| part.contains_key(k))
        })
        .unwrap_or(layers)
}

/// Bytes a LLaMA training step cannot avoid moving: every weight read once in its storage
/// precision (bf16 frozen operands with [`Precision::Bf16`], else f32; trained weights stay
/// f32 masters), the embedding rows of the batch's tokens, the bases of SparseGrad
/// projections once, and the optimizer's state: a dense Adam step on every trained
/// parameter, a SparseAdam step on each kept entry.
pub fn compulsory_bytes(
    c: &LlamaConfig,
    trained: &[usize],
    methods: &[Method; 3],
    precision: Precision,
    tokens: usize,
) -> CompulsoryBytes {
    let frozen_b = if precision == Precision::Bf16 { 2.0 } else { 4.0 };
    let (h, f, q, kv) = (c.hidden as f64, c.ffn as f64, c.q_dim() as f64, c.kv_dim() as f64);
    let attn = h * q + 2.0 * h * kv + q * h;
    let mlp = 3.0 * h * f;
    let shapes = [(c.ffn, c.hidden), (c.ffn, c.hidden), (c.hidden, c.ffn)];
    let mut weights = c.layers as f64 * (attn + mlp) * frozen_b + 2.0 * c.layers as f64 * h * 4.0;
    weights += tokens as f64 * h * 4.0 + h * 4.0 + c.vocab as f64 * h * frozen_b;
    let mut state = 0.0;
    let mut bases = [false; 3];
    for _ in trained {
        for (j, m) in methods.iter().enumerate() {
            let (out, inp) = shapes[j];
            let entries = (out * inp) as f64;
            match m {
                Method::Full => state += entries * ADAM_BYTES_PER_PARAM,
                Method::Lora { rank, .. } => state += (*rank * (out + inp)) as f64 * ADAM_BYTES_PER_PARAM,
                Method::SparseGrad { keep, .. } | Method::MeProp { keep } => {
                    let k = keep.resolve(out * inp).unwrap_or(0) as f64;
                    state += k * SPARSE_ADAM_BYTES_PER_ENTRY;
                    if matches!(m, Method::SparseGrad { .. }) {
                        bases[j] = true;
                    }
                }
                Method::Frozen | Method::Collect => {}
            }
        }
    }
    for (j, used) in bases.iter().enumerate() {
        if *used {
            let (out, inp) = shapes[j];
            weights += ((out * out + inp * inp) as f64) * frozen_b;
        }
    }
    CompulsoryBytes { weights_read: weights, optimizer_state: state }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_the_covering_prefix() {
        use LayerKind::*;
        let paper: Vec<usize> = (0..32).step_by(3).collect();
        let kinds = layer_kinds(32, &paper);
        let counts = kind_counts(&kinds);
        assert_eq!(counts[&TrainedLowest], 1);
        assert_eq!(counts[&Trained], 10);
        assert_eq!(counts[&FrozenBackward], 21);
        assert!(!counts.contains_key(&ForwardOnly));
        assert_eq!(covering_prefix(32, &paper), 4);
        // The example's every-third from block 2: 0, 1 forward only; 2 lowest; 3, 4 frozen; 5.
        let every3: Vec<usize> = (2..30).step_by(3).collect();
        assert_eq!(
            layer_kinds(6, &[2, 5]),
            vec![ForwardOnly, ForwardOnly, TrainedLowest, FrozenBackward, FrozenBackward, Trained]
        );
        assert_eq!(covering_prefix(30, &every3), 6);
        assert_eq!(covering_prefix(4, &[]), 1);
    }

    #[test]
    fn compulsory_bytes_by_hand() {
        // A 1-layer model, hidden 2, ffn 3, 1 head of dim 2, vocab 5, tied: attention
        // 4 * 4 = 16, MLP 3 * 6 = 18 weights; f32: (16 + 18) * 4 + norms 2 * 2 * 4 = 152;
        // 3 tokens of embedding rows 3 * 2 * 4 = 24; final norm 8; head 5 * 2 * 4 = 40.
        let c = LlamaConfig {
            hidden: 2,
            ffn: 3,
            layers: 1,
            heads: 1,
            kv_heads: 1,
            head_dim: 2,
            rope_theta: 1e4,
            rope_scaling: None,
            rms_eps: 1e-5,
            vocab: 5,
            tied_embeddings: true,
            max_seq: 8,
            bos: None,
            eos: None,
        };
        let full = compulsory_bytes(&c, &[0], &[Method::Full; 3], Precision::Full, 3);
        assert_eq!(full.weights_read, 152.0 + 24.0 + 8.0 + 40.0);
        assert_eq!(full.optimizer_state, 18.0 * ADAM_BYTES_PER_PARAM);
        let none = compulsory_bytes(&c, &[], &[Method::Full; 3], Precision::Full, 3);
        assert_eq!(none.optimizer_state, 0.0);
        for n in NAMED_DIMS {
            named_config(n).unwrap().validate().unwrap();
        }
        assert!(named_config("gpt-5").is_err());
    }
}
