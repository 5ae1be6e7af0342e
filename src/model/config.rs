//! The hyper-parameters of a LLaMA-architecture decoder (SmolLM2, LLaMA 2/3, ...), read
//! from GGUF metadata or from a Hugging Face `config.json`, and checked for consistency.

use crate::error::{Error, Result};
use crate::io::gguf::GgufFile;
pub use crate::model::rope::RopeScaling;
use serde_json::Value;
use std::path::Path;

/// Shape and numerics of a LLaMA model. Weight shapes follow from it:
/// `q (heads*head_dim, hidden)`, `k`/`v (kv_heads*head_dim, hidden)`,
/// `o (hidden, heads*head_dim)`, `gate`/`up (ffn, hidden)`, `down (hidden, ffn)`.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub hidden: usize,
    pub ffn: usize,
    pub layers: usize,
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    /// RoPE frequency rescaling for long contexts (LLaMA-3.1's `llama3`); `None`: the
    /// plain frequencies.
    pub rope_scaling: Option<RopeScaling>,
    pub rms_eps: f32,
    pub vocab: usize,
    /// The output projection reuses the token embedding (no separate `lm_head`).
    pub tied_embeddings: bool,
    /// Longest context the model was trained for.
    pub max_seq: usize,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
}

fn usize_of(key: &str, v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::Metadata { key: key.into(), msg: format!("{v} does not fit in usize") })
}

impl LlamaConfig {
    /// Reads the config from GGUF metadata (`<arch>.embedding_length`, ...). The
    /// architecture must be `llama`. GGUF has no flag for tied embeddings: they are tied
    /// when the file has no `output.weight`. `head_dim` is `<arch>.attention.key_length`,
    /// else `<arch>.rope.dimension_count`, else `hidden / heads`; `vocab` is
    /// `<arch>.vocab_size`, else the length of `tokenizer.ggml.tokens`, else the rows of
    /// `token_embd.weight`. RoPE scaling in the file (`<arch>.rope.scaling.*` other than
    /// none, or llama.cpp's `rope_freqs.weight`) is rejected (see
    /// [`check_gguf_rope_scaling`](crate::model::rope::check_gguf_rope_scaling)).
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let arch = f.architecture()?;
        if arch != "llama" {
            return Err(Error::Metadata {
                key: "general.architecture".into(),
                msg: format!("`{arch}` is not supported (only `llama`-architecture models)"),
            });
        }
        let u = |k: &str| -> Result<usize> {
            let key = format!("{arch}.{k}");
            usize_of(&key, f.get_u64(&key)?)
        };
        let opt = |k: &str| -> Result<Option<usize>> {
            let key = format!("{arch}.{k}");
            f.optional_u64(&key)?.map(|v| usize_of(&key, v)).transpose()
        };
        let hidden = u("embedding_length")?;
        let heads = u("attention.head_count")?;
        let kv_heads = opt("attention.head_count_kv")?.unwrap_or(heads);
        let head_dim = match opt("attention.key_length")? {
            Some(d) => d,
            None => match opt("rope.dimension_count")? {
                Some(d) => d,
                None => hidden.checked_div(heads).unwrap_or(0),
            },
        };
        let vocab =
            match opt("vocab_size")? {
                Some(v) => v,
                None => match f.get("tokenizer.ggml.tokens") {
                    Some(_) => f.get_str_array("tokenizer.ggml.tokens")?.len(),
                    None => f.tensor_info("token_embd.weight").and_then(|t| t.shape().first().copied()).ok_or_else(
                        || Error::Metadata {
                            key: format!("{arch}.vocab_size"),
                            msg: "missing, and neither tokenizer.ggml.tokens nor token_embd.weight gives it".into(),
                        },
                    )?,
                },
            };
        crate::model::rope::check_gguf_rope_scaling(f, arch)?;
        let id = |k: &str| f.optional_u32(k);
        let cfg = LlamaConfig {
            hidden,
            ffn: u("feed_forward_length")?,
            layers: u("block_count")?,
            heads,
            kv_heads,
            head_dim,
            rope_theta: f.optional_f32(&format!("{arch}.rope.freq_base"))?.unwrap_or(10_000.0),
            rope_scaling: None,
            rms_eps: f.get_f32(&format!("{arch}.attention.layer_norm_rms_epsilon"))?,
            vocab,
            tied_embeddings: !f.contains_tensor("output.weight"),
            max_seq: u("context_length")?,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a Hugging Face `config.json`. Required: `hidden_size`, `intermediate_size`,
    /// `num_hidden_layers`, `num_attention_heads`, `vocab_size`, `rms_norm_eps`. Defaults
    /// as in transformers' `LlamaConfig`: `num_key_value_heads` = heads, `head_dim` =
    /// hidden / heads, `rope_theta` 10000, `tie_word_embeddings` false,
    /// `max_position_embeddings` 2048; `bos_token_id`/`eos_token_id` optional (a list
    /// of eos ids gives its first). `rope_scaling` (`null`, or a `llama3` object; any other
    /// type is an error naming it) or, from transformers 5, `rope_parameters` (which may
    /// also carry `rope_theta`): see [`RopeScaling::from_hf_json`].
    pub fn from_hf_config_json(path: &Path) -> Result<Self> {
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
        let float = |key: &str| -> Result<Option<f32>> {
            get(key)
                .map(|v| v.as_f64().map(|x| x as f32).ok_or_else(|| meta(key, format!("expected a number, found {v}"))))
                .transpose()
        };
        let token = |key: &str| -> Result<Option<u32>> {
            let v = match get(key) {
                Some(Value::Array(a)) => a.first(),
                other => other,
            };
            v.map(|v| {
                v.as_u64()
                    .and_then(|u| u32::try_from(u).ok())
                    .ok_or_else(|| meta(key, format!("expected a token id, found {v}")))
            })
            .transpose()
        };
        let in_file = |e: Error| match e {
            Error::Metadata { key, msg } => meta(&key, msg),
            e => e,
        };
        let rope_params = get("rope_parameters");
        let rope_scaling = match (get("rope_scaling"), rope_params) {
            (Some(v), _) => RopeScaling::from_hf_json("rope_scaling", v).map_err(in_file)?,
            (None, Some(v)) => RopeScaling::from_hf_json("rope_parameters", v).map_err(in_file)?,
            (None, None) => None,
        };
        let params_theta = match rope_params.and_then(|p| p.get("rope_theta")).filter(|v| !v.is_null()) {
            Some(v) => Some(
                v.as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| meta("rope_parameters.rope_theta", format!("expected a number, found {v}")))?,
            ),
            None => None,
        };
        let rope_theta = match (float("rope_theta")?, params_theta) {
            (Some(a), Some(b)) if a != b => {
                return Err(meta("rope_theta", format!("{a} disagrees with rope_parameters.rope_theta {b}")));
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => 10_000.0,
        };
        let hidden = req("hidden_size")?;
        let heads = req("num_attention_heads")?;
        let cfg = LlamaConfig {
            hidden,
            ffn: req("intermediate_size")?,
            layers: req("num_hidden_layers")?,
            heads,
            kv_heads: uint("num_key_value_heads")?.unwrap_or(heads),
            head_dim: uint("head_dim")?.unwrap_or(hidden.checked_div(heads).unwrap_or(0)),
            rope_theta,
            rope_scaling,
            rms_eps: float("rms_norm_eps")?.ok_or_else(|| meta("rms_norm_eps", "missing".into()))?,
            vocab: req("vocab_size")?,
            tied_embeddings: match get("tie_word_embeddings") {
                None => false,
                Some(v) => {
                    v.as_bool().ok_or_else(|| meta("tie_word_embeddings", format!("expected a bool, found {v}")))?
                }
            },
            max_seq: uint("max_position_embeddings")?.unwrap_or(2048),
            bos: token("bos_token_id")?,
            eos: token("eos_token_id")?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The `config.json` that [`from_hf_config_json`](Self::from_hf_config_json) reads
    /// back to `self` (plus the fields transformers needs to recognise the model).
    pub fn to_hf_config_json(&self) -> Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "torch_dtype": "float32",
            "hidden_size": self.hidden,
            "intermediate_size": self.ffn,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.map(|s| s.to_hf_json()),
            "rms_norm_eps": self.rms_eps,
            "vocab_size": self.vocab,
            "tie_word_embeddings": self.tied_embeddings,
            "max_position_embeddings": self.max_seq,
            "bos_token_id": self.bos,
            "eos_token_id": self.eos,
        })
    }

    /// Checks that the numbers describe a buildable model: every size positive, heads a
    /// multiple of kv_heads, an even head_dim (RoPE rotates pairs), finite positive
    /// rope_theta and rms_eps, a valid [`RopeScaling`], special tokens inside the vocabulary.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::invalid("LlamaConfig", msg));
        for (name, v) in [
            ("hidden", self.hidden),
            ("ffn", self.ffn),
            ("layers", self.layers),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("vocab", self.vocab),
            ("max_seq", self.max_seq),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if self.heads % self.kv_heads != 0 {
            return bad(format!("heads ({}) must be a multiple of kv_heads ({})", self.heads, self.kv_heads));
        }
        if self.head_dim % 2 != 0 {
            return bad(format!("head_dim ({}) must be even for rotary embeddings", self.head_dim));
        }
        // Every weight's element count must be representable (and so allocatable in principle).
        let q = self.heads.checked_mul(self.head_dim);
        let kv = self.kv_heads.checked_mul(self.head_dim);
        let products =
            [q, kv, Some(self.ffn), Some(self.vocab)].map(|rows| rows.and_then(|r| r.checked_mul(self.hidden)));
        if products.iter().any(Option::is_none) {
            return bad("weight sizes overflow".into());
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!("rope_theta ({}) must be finite and positive", self.rope_theta));
        }
        if let Some(s) = &self.rope_scaling {
            s.validate()?;
        }
        if !(self.rms_eps.is_finite() && self.rms_eps > 0.0) {
            return bad(format!("rms_eps ({}) must be finite and positive", self.rms_eps));
        }
        for (name, id) in [("bos", self.bos), ("eos", self.eos)] {
            if let Some(id) = id {
                if id as usize >= self.vocab {
                    return bad(format!("{name} token {id} is outside the vocabulary of {}", self.vocab));
                }
            }
        }
        Ok(())
    }

    /// Rows of the query projection: `heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.heads.saturating_mul(self.head_dim)
    }

    /// Rows of each of the key and value projections: `kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads.saturating_mul(self.head_dim)
    }
}
