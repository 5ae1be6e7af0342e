//! A BERT encoder's hyper-parameters ([`BertConfig`], read from and written to Hugging
//! Face's `config.json`) and weights ([`BertWeights`], row-major f32 in HF's layout), loaded
//! from and saved to `model.safetensors` under HF's names, with or without the `bert.`
//! prefix that task checkpoints (`BertForSequenceClassification`) add.
//!
//! Every size from a file is checked before anything is allocated: the config's extents
//! are bounded, and each tensor's shape is compared with what the config implies before
//! its data is copied (a missing tensor or a mismatch is one error naming it).

use crate::backend::GeluKind;
use crate::error::{Error, Result};
use crate::io::safetensors::{SafetensorsFile, SafetensorsWriter};
use crate::model::weights::SplitMix64;
use serde_json::Value;
use std::path::Path;

/// Hyper-parameters of a BERT encoder.
#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    /// MLP width (`intermediate_size`).
    pub ffn: usize,
    pub max_positions: usize,
    pub type_vocab: usize,
    pub ln_eps: f32,
    pub gelu: GeluKind,
}

/// Extents beyond which a config is rejected (far above any BERT: guards allocations).
const MAX_EXTENT: usize = 1 << 24;
const MAX_LAYERS: usize = 1024;

impl BertConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads.max(1)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::invalid("BertConfig", msg));
        for (name, v) in [
            ("vocab_size", self.vocab),
            ("hidden_size", self.hidden),
            ("num_attention_heads", self.heads),
            ("intermediate_size", self.ffn),
            ("max_position_embeddings", self.max_positions),
            ("type_vocab_size", self.type_vocab),
        ] {
            if v == 0 || v > MAX_EXTENT {
                return bad(format!("{name} = {v} outside 1..={MAX_EXTENT}"));
            }
        }
        if self.layers > MAX_LAYERS {
            return bad(format!("num_hidden_layers = {} exceeds {MAX_LAYERS}", self.layers));
        }
        if self.hidden % self.heads != 0 {
            return bad(format!("hidden_size {} is not a multiple of num_attention_heads {}", self.hidden, self.heads));
        }
        // Every matrix must be addressable: the largest is vocab x hidden or hidden x ffn.
        for (a, b) in [(self.vocab, self.hidden), (self.hidden, self.ffn), (self.max_positions, self.hidden)] {
            if a.checked_mul(b).is_none_or(|n| n > isize::MAX as usize / 8) {
                return bad(format!("a {a} x {b} weight is too large"));
            }
        }
        if !(self.ln_eps.is_finite() && self.ln_eps > 0.0) {
            return bad(format!("layer_norm_eps = {} must be finite and positive", self.ln_eps));
        }
        Ok(())
    }

    /// Reads a Hugging Face `config.json` (`model_type` bert or absent). Required:
    /// `vocab_size`, `hidden_size`, `num_hidden_layers`, `num_attention_heads`,
    /// `intermediate_size`; defaults as transformers' `BertConfig`: 512 positions, 2 token
    /// types, `layer_norm_eps` 1e-12, `hidden_act` gelu (erf; `gelu_new`/`gelu_pytorch_tanh`
    /// select the tanh form).
    pub fn from_hf_config_json(path: &Path) -> Result<Self> {
        // Strict like every side file: a regular file, size-capped, no key twice.
        let json: Value = crate::io::json::read_unique(path)?;
        let meta =
            |key: &str, msg: String| Error::Metadata { key: key.into(), msg: format!("{msg} in {}", path.display()) };
        let get = |key: &str| json.get(key).filter(|v| !v.is_null());
        let uint = |key: &str| -> Result<Option<usize>> {
            get(key)
                .map(|v| {
                    v.as_u64()
                        .and_then(|u| usize::try_from(u).ok())
                        .ok_or_else(|| meta(key, format!("expected an unsigned integer, found {v}")))
                })
                .transpose()
        };
        let req = |key: &str| -> Result<usize> { uint(key)?.ok_or_else(|| meta(key, "missing".into())) };
        if let Some(t) = get("model_type") {
            let t = t.as_str().ok_or_else(|| meta("model_type", format!("expected a string, found {t}")))?;
            if !matches!(t, "bert" | "roberta" | "xlm-roberta") {
                return Err(meta("model_type", format!("`{t}` is not a BERT encoder")));
            }
        }
        let gelu = match get("hidden_act") {
            None => GeluKind::Erf,
            Some(v) => match v.as_str() {
                Some("gelu") => GeluKind::Erf,
                Some("gelu_new" | "gelu_pytorch_tanh") => GeluKind::Tanh,
                _ => return Err(meta("hidden_act", format!("unsupported activation {v} (gelu, gelu_new)"))),
            },
        };
        let ln_eps = match get("layer_norm_eps") {
            None => 1e-12,
            Some(v) => {
                v.as_f64().ok_or_else(|| meta("layer_norm_eps", format!("expected a number, found {v}")))? as f32
            }
        };
        let cfg = BertConfig {
            vocab: req("vocab_size")?,
            hidden: req("hidden_size")?,
            layers: req("num_hidden_layers")?,
            heads: req("num_attention_heads")?,
            ffn: req("intermediate_size")?,
            max_positions: uint("max_position_embeddings")?.unwrap_or(512),
            type_vocab: uint("type_vocab_size")?.unwrap_or(2),
            ln_eps,
            gelu,
        };
        cfg.validate().map_err(|e| Error::format(Some(path), e.to_string()))?;
        Ok(cfg)
    }

    /// The `config.json` [`from_hf_config_json`](Self::from_hf_config_json) reads back.
    pub fn to_hf_config_json(&self) -> Value {
        serde_json::json!({
            "architectures": ["BertModel"],
            "model_type": "bert",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "intermediate_size": self.ffn,
            "max_position_embeddings": self.max_positions,
            "type_vocab_size": self.type_vocab,
            "layer_norm_eps": self.ln_eps,
            "hidden_act": match self.gelu { GeluKind::Erf => "gelu", GeluKind::Tanh => "gelu_new" },
            "position_embedding_type": "absolute",
            "pad_token_id": 0,
        })
    }
}

/// The tensors of one encoder layer, HF names relative to `encoder.layer.{i}.`.
pub const LAYER_TENSORS: [&str; 16] = [
    "attention.self.query.weight",
    "attention.self.query.bias",
    "attention.self.key.weight",
    "attention.self.key.bias",
    "attention.self.value.weight",
    "attention.self.value.bias",
    "attention.output.dense.weight",
    "attention.output.dense.bias",
    "attention.output.LayerNorm.weight",
    "attention.output.LayerNorm.bias",
    "intermediate.dense.weight",
    "intermediate.dense.bias",
    "output.dense.weight",
    "output.dense.bias",
    "output.LayerNorm.weight",
    "output.LayerNorm.bias",
];

/// Weights of one encoder layer (`(out, in)` matrices), in [`LAYER_TENSORS`] order.
#[derive(Clone, Debug, PartialEq)]
pub struct BertLayerWeights {
    pub q: Vec<f32>,
    pub q_bias: Vec<f32>,
    pub k: Vec<f32>,
    pub k_bias: Vec<f32>,
    pub v: Vec<f32>,
    pub v_bias: Vec<f32>,
    pub o: Vec<f32>,
    pub o_bias: Vec<f32>,
    pub attn_ln_w: Vec<f32>,
    pub attn_ln_b: Vec<f32>,
    /// MLP `dense_in` `(ffn, hidden)` (`intermediate.dense`).
    pub inter: Vec<f32>,
    pub inter_bias: Vec<f32>,
    /// MLP `dense_out` `(hidden, ffn)` (`output.dense`).
    pub out: Vec<f32>,
    pub out_bias: Vec<f32>,
    pub out_ln_w: Vec<f32>,
    pub out_ln_b: Vec<f32>,
}

impl BertLayerWeights {
    fn shapes(c: &BertConfig) -> [Vec<usize>; 16] {
        let (h, f) = (c.hidden, c.ffn);
        let (m, v) = (|a: usize, b: usize| vec![a, b], |a: usize| vec![a]);
        [
            m(h, h),
            v(h),
            m(h, h),
            v(h),
            m(h, h),
            v(h),
            m(h, h),
            v(h),
            v(h),
            v(h),
            m(f, h),
            v(f),
            m(h, f),
            v(h),
            v(h),
            v(h),
        ]
    }

    fn fields(&self) -> [&Vec<f32>; 16] {
        [
            &self.q,
            &self.q_bias,
            &self.k,
            &self.k_bias,
            &self.v,
            &self.v_bias,
            &self.o,
            &self.o_bias,
            &self.attn_ln_w,
            &self.attn_ln_b,
            &self.inter,
            &self.inter_bias,
            &self.out,
            &self.out_bias,
            &self.out_ln_w,
            &self.out_ln_b,
        ]
    }

    fn from_fields(v: Vec<Vec<f32>>) -> Result<Self> {
        let [q, q_bias, k, k_bias, vv, v_bias, o, o_bias, attn_ln_w, attn_ln_b, inter, inter_bias, out, out_bias, out_ln_w, out_ln_b]: [Vec<f32>; 16] =
            v.try_into().map_err(|_| Error::invalid("BertLayerWeights", "expected 16 tensors"))?;
        Ok(BertLayerWeights {
            q,
            q_bias,
            k,
            k_bias,
            v: vv,
            v_bias,
            o,
            o_bias,
            attn_ln_w,
            attn_ln_b,
            inter,
            inter_bias,
            out,
            out_bias,
            out_ln_w,
            out_ln_b,
        })
    }
}

/// A BERT encoder's weights (no pooler or task head: the classifier is built fresh).
#[derive(Clone, Debug, PartialEq)]
pub struct BertWeights {
    pub config: BertConfig,
    /// `(vocab, hidden)`.
    pub word_emb: Vec<f32>,
    /// `(max_positions, hidden)`.
    pub pos_emb: Vec<f32>,
    /// `(type_vocab, hidden)`.
    pub type_emb: Vec<f32>,
    pub emb_ln_w: Vec<f32>,
    pub emb_ln_b: Vec<f32>,
    pub layers: Vec<BertLayerWeights>,
}

const EMBEDDINGS: [&str; 5] = [
    "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight",
    "embeddings.LayerNorm.weight",
    "embeddings.LayerNorm.bias",
];

impl BertWeights {
    fn embedding_shapes(c: &BertConfig) -> [Vec<usize>; 5] {
        [
            vec![c.vocab, c.hidden],
            vec![c.max_positions, c.hidden],
            vec![c.type_vocab, c.hidden],
            vec![c.hidden],
            vec![c.hidden],
        ]
    }

    /// Every tensor as `(HF name, shape, data)`.
    fn named(&self) -> Vec<(String, Vec<usize>, &Vec<f32>)> {
        let c = &self.config;
        let emb = [&self.word_emb, &self.pos_emb, &self.type_emb, &self.emb_ln_w, &self.emb_ln_b];
        let mut out: Vec<_> = EMBEDDINGS
            .iter()
            .zip(Self::embedding_shapes(c))
            .zip(emb)
            .map(|((n, s), d)| (n.to_string(), s, d))
            .collect();
        for (i, l) in self.layers.iter().enumerate() {
            for ((name, shape), data) in LAYER_TENSORS.iter().zip(BertLayerWeights::shapes(c)).zip(l.fields()) {
                out.push((format!("encoder.layer.{i}.{name}"), shape, data));
            }
        }
        out
    }

    /// Checks the config and every tensor's element count.
    pub fn validate(&self) -> Result<()> {
        self.config.validate()?;
        if self.layers.len() != self.config.layers {
            return Err(Error::shape("BertWeights", "number of layers", self.config.layers, self.layers.len()));
        }
        for (name, shape, data) in self.named() {
            let n: usize = shape.iter().product();
            if data.len() != n {
                return Err(Error::shape("BertWeights", format!("tensor `{name}` of shape {shape:?}"), n, data.len()));
            }
        }
        Ok(())
    }

    /// Loads `config.json` and `model.safetensors` from an HF model directory. Tensor names
    /// may carry the `bert.` prefix; other tensors (pooler, task heads, `position_ids`) are
    /// ignored.
    pub fn from_hf_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = BertConfig::from_hf_config_json(&dir.join("config.json"))?;
        let file = SafetensorsFile::open(dir.join("model.safetensors"))?;
        Self::from_safetensors(&file, config)
    }

    /// The weights of `config`'s shape from an open safetensors file.
    pub fn from_safetensors(file: &SafetensorsFile, config: BertConfig) -> Result<Self> {
        config.validate()?;
        let prefix = if file.contains(EMBEDDINGS[0]) { "" } else { "bert." };
        if !file.contains(&format!("{prefix}{}", EMBEDDINGS[0])) {
            return Err(Error::MissingTensor {
                name: EMBEDDINGS[0].into(),
                context: Some(format!("{} (with or without the `bert.` prefix)", file.path().display())),
            });
        }
        // Shapes are compared with the config before any data is copied.
        let get = |name: &str, shape: &[usize]| file.tensor_f32_shaped(&format!("{prefix}{name}"), shape);
        let shapes = Self::embedding_shapes(&config);
        let mut emb = Vec::with_capacity(5);
        for (name, shape) in EMBEDDINGS.iter().zip(&shapes) {
            emb.push(get(name, shape)?);
        }
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let mut fields = Vec::with_capacity(16);
            for (name, shape) in LAYER_TENSORS.iter().zip(BertLayerWeights::shapes(&config)) {
                fields.push(get(&format!("encoder.layer.{i}.{name}"), &shape)?);
            }
            layers.push(BertLayerWeights::from_fields(fields)?);
        }
        if file.contains(&format!("{prefix}encoder.layer.{}.output.dense.weight", config.layers)) {
            return Err(Error::format(
                Some(file.path()),
                format!("the file holds more than the config's {} layers", config.layers),
            ));
        }
        let [word_emb, pos_emb, type_emb, emb_ln_w, emb_ln_b]: [Vec<f32>; 5] =
            emb.try_into().map_err(|_| Error::invalid("BertWeights", "expected 5 embedding tensors"))?;
        let w = BertWeights { config, word_emb, pos_emb, type_emb, emb_ln_w, emb_ln_b, layers };
        w.validate()?;
        Ok(w)
    }

    /// Writes `config.json` and `model.safetensors` (HF names without prefix, f32) into
    /// `dir`, creating it if needed; each file is written atomically.
    pub fn save_hf_safetensors(&self, dir: impl AsRef<Path>) -> Result<()> {
        self.validate()?;
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut w = SafetensorsWriter::new();
        for (name, shape, data) in self.named() {
            w.add_f32(&name, &shape, data.clone())?;
        }
        w.set_metadata("format", "pt");
        w.write(&dir.join("model.safetensors"))?;
        let json = serde_json::to_string_pretty(&self.config.to_hf_config_json())
            .map_err(|e| Error::invalid("BertWeights", format!("config.json: {e}")))?;
        crate::io::fs::write_atomic(&dir.join("config.json"), |f| f.write_all(json.as_bytes()))
    }

    /// Small seeded random weights for tests: matrices uniform in `±1/sqrt(in)`, biases and
    /// embeddings in `±0.5`, LayerNorm weights in `1 ± 0.2`.
    pub fn random(config: &BertConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let c = config;
        let mut rng = SplitMix64::new(seed);
        let mut fill = |shape: &[usize], center: f32, scale: f32| -> Vec<f32> {
            (0..shape.iter().product()).map(|_| center + scale * (2.0 * rng.next_f32() - 1.0)).collect()
        };
        let es = Self::embedding_shapes(c);
        let (word_emb, pos_emb, type_emb) = (fill(&es[0], 0.0, 0.5), fill(&es[1], 0.0, 0.5), fill(&es[2], 0.0, 0.5));
        let (emb_ln_w, emb_ln_b) = (fill(&es[3], 1.0, 0.2), fill(&es[4], 0.0, 0.5));
        let mut layers = Vec::with_capacity(c.layers);
        for _ in 0..c.layers {
            let mut fields = Vec::with_capacity(16);
            for (name, shape) in LAYER_TENSORS.iter().zip(BertLayerWeights::shapes(c)) {
                fields.push(if name.contains("LayerNorm.weight") {
                    fill(&shape, 1.0, 0.2)
                } else if shape.len() == 2 {
                    fill(&shape, 0.0, 1.0 / (shape[1] as f32).sqrt())
                } else {
                    fill(&shape, 0.0, 0.5)
                });
            }
            layers.push(BertLayerWeights::from_fields(fields)?);
        }
        Ok(BertWeights { config: c.clone(), word_emb, pos_emb, type_emb, emb_ln_w, emb_ln_b, layers })
    }
}
