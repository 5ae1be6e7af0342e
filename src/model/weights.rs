//! The weights of a LLaMA-architecture model as plain row-major f32 buffers, in
//! Hugging Face's layout: every linear weight is `W (out, in)` (`y = x W^T`), and the query
//! and key projections use HF's "rotate-half" RoPE row order.
//!
//! Sources: a GGUF file (dequantised; Q and K rows un-permuted from llama.cpp's
//! interleaved-RoPE order, see [`unpermute_rope_rows`]) or an HF safetensors directory
//! (`hf` submodule), which [`LlamaWeights::save_hf_safetensors`] also writes. Every
//! tensor's shape is checked against the config, errors naming the tensor.

mod hf;
mod source;

pub(crate) use source::checked_tensor;
pub use source::{LlamaCheckpoint, LlamaSource, Tensor};

use super::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::io::gguf::GgufFile;
use std::path::Path;

/// One decoder layer. Norm weights are `(hidden,)`; projections `(out, in)`:
/// `q (heads*head_dim, hidden)`, `k`/`v (kv_heads*head_dim, hidden)`,
/// `o (hidden, heads*head_dim)`, `gate`/`up (ffn, hidden)`, `down (hidden, ffn)`.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub o: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    pub gate: Vec<f32>,
    pub up: Vec<f32>,
    pub down: Vec<f32>,
}

/// A whole model. `embed` is `(vocab, hidden)`; `lm_head` is `(vocab, hidden)`, `None`
/// exactly when `config.tied_embeddings` (the output projection then reuses `embed`).
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaWeights {
    pub config: LlamaConfig,
    pub embed: Vec<f32>,
    pub layers: Vec<LayerWeights>,
    pub final_norm: Vec<f32>,
    pub lm_head: Option<Vec<f32>>,
}

/// The nine tensors of a decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    AttnNorm,
    Q,
    K,
    V,
    O,
    FfnNorm,
    Gate,
    Up,
    Down,
}

impl Field {
    pub const ALL: [Field; 9] =
        [Field::AttnNorm, Field::Q, Field::K, Field::V, Field::O, Field::FfnNorm, Field::Gate, Field::Up, Field::Down];

    /// `blk.{i}.<this>.weight` in GGUF.
    fn gguf(self) -> &'static str {
        match self {
            Field::AttnNorm => "attn_norm",
            Field::Q => "attn_q",
            Field::K => "attn_k",
            Field::V => "attn_v",
            Field::O => "attn_output",
            Field::FfnNorm => "ffn_norm",
            Field::Gate => "ffn_gate",
            Field::Up => "ffn_up",
            Field::Down => "ffn_down",
        }
    }

    /// `model.layers.{i}.<this>.weight` in HF.
    pub(crate) fn hf(self) -> &'static str {
        match self {
            Field::AttnNorm => "input_layernorm",
            Field::Q => "self_attn.q_proj",
            Field::K => "self_attn.k_proj",
            Field::V => "self_attn.v_proj",
            Field::O => "self_attn.o_proj",
            Field::FfnNorm => "post_attention_layernorm",
            Field::Gate => "mlp.gate_proj",
            Field::Up => "mlp.up_proj",
            Field::Down => "mlp.down_proj",
        }
    }

    /// Row-major shape under `c`.
    pub fn shape(self, c: &LlamaConfig) -> Vec<usize> {
        match self {
            Field::AttnNorm | Field::FfnNorm => vec![c.hidden],
            Field::Q => vec![c.q_dim(), c.hidden],
            Field::K | Field::V => vec![c.kv_dim(), c.hidden],
            Field::O => vec![c.hidden, c.q_dim()],
            Field::Gate | Field::Up => vec![c.ffn, c.hidden],
            Field::Down => vec![c.hidden, c.ffn],
        }
    }
}

impl LayerWeights {
    pub(crate) fn get(&self, f: Field) -> &[f32] {
        match f {
            Field::AttnNorm => &self.attn_norm,
            Field::Q => &self.q,
            Field::K => &self.k,
            Field::V => &self.v,
            Field::O => &self.o,
            Field::FfnNorm => &self.ffn_norm,
            Field::Gate => &self.gate,
            Field::Up => &self.up,
            Field::Down => &self.down,
        }
    }

    /// Builds a layer from `load(field)`, called once per field in [`Field::ALL`] order.
    fn build(mut load: impl FnMut(Field) -> Result<Vec<f32>>) -> Result<Self> {
        Ok(LayerWeights {
            attn_norm: load(Field::AttnNorm)?,
            q: load(Field::Q)?,
            k: load(Field::K)?,
            v: load(Field::V)?,
            o: load(Field::O)?,
            ffn_norm: load(Field::FfnNorm)?,
            gate: load(Field::Gate)?,
            up: load(Field::Up)?,
            down: load(Field::Down)?,
        })
    }
}

/// Undoes llama.cpp's RoPE row permutation of a Q or K weight `(n_head * head_dim, cols)`,
/// returning the rows in Hugging Face's order.
///
/// Why it exists: HF's LLaMA applies RoPE "rotate-half" style, pairing dimension `j` of a
/// head with dimension `j + head_dim/2`; ggml pairs adjacent dimensions `2j` and `2j + 1`.
/// So `convert_hf_to_gguf.py` reorders the rows of `q_proj` and `k_proj`:
///
/// ```text
/// w.reshape(n_head, 2, head_dim/2, cols).swapaxes(1, 2).reshape(rows, cols)
/// ```
///
/// (with `n_head = num_key_value_heads` for `k_proj`). Within head `h`, HF row
/// `h*head_dim + i*(head_dim/2) + j` (`i` in {0, 1}, `j < head_dim/2`) thus lands on GGUF
/// row `h*head_dim + 2j + i`. The inverse reads the GGUF rows as
/// `(n_head, head_dim/2, 2, cols)` and swaps axes 1 and 2 back: HF row
/// `h*head_dim + i*(head_dim/2) + j` = GGUF row `h*head_dim + 2j + i`. (Applying the
/// forward reshape `(n_head, 2, head_dim/2)` again would not undo it unless head_dim = 4.)
pub fn unpermute_rope_rows(w: &[f32], n_head: usize, cols: usize) -> Result<Vec<f32>> {
    const OP: &str = "unpermute_rope_rows";
    if n_head == 0 || cols == 0 {
        return Err(Error::invalid(OP, format!("n_head ({n_head}) and cols ({cols}) must be positive")));
    }
    let rows = w.len() / cols;
    let pair_rows = n_head.checked_mul(2).ok_or_else(|| Error::invalid(OP, format!("n_head {n_head} overflows")))?;
    if rows * cols != w.len() || rows % pair_rows != 0 {
        return Err(Error::shape(
            OP,
            "weight",
            format!("(n_head*head_dim, {cols}) with n_head = {n_head} and even head_dim"),
            format!("{} values", w.len()),
        ));
    }
    let half = rows / n_head / 2;
    let mut out = vec![0.0f32; w.len()];
    for h in 0..n_head {
        for i in 0..2 {
            for j in 0..half {
                let dst = (h * 2 * half + i * half + j) * cols;
                let src = (h * 2 * half + 2 * j + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    Ok(out)
}

/// [`Error::NonFinite`] naming the weight tensor and its file when `w` holds NaN or inf:
/// found at load, such a weight would otherwise surface as a NaN gradient mid-training.
pub(crate) fn check_weight_finite(name: &str, file: &str, w: &[f32]) -> Result<()> {
    crate::io::check_finite(&format!("model weight `{name}` in {file}"), w)
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl LlamaWeights {
    /// Loads and dequantises every tensor of a `llama` GGUF file (config from its
    /// metadata). Q and K come back un-permuted to HF's layout.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        // Every tensor is looked up and shape-checked before anything is allocated, so a
        // config asking for more than the file holds (block_count 0xffffffff) fails here.
        let config = source::check_gguf(f)?;
        struct Borrowed<'a>(&'a GgufFile, LlamaConfig);
        impl LlamaSource for Borrowed<'_> {
            fn config(&self) -> &LlamaConfig {
                &self.1
            }
            fn tensor(&self, t: Tensor) -> Result<std::borrow::Cow<'_, [f32]>> {
                source::read_gguf(self.0, &self.1, t).map(std::borrow::Cow::Owned)
            }
        }
        Self::from_source(&Borrowed(f, config))
    }

    /// [`from_gguf`](Self::from_gguf) on the file at `path`.
    pub fn load_gguf(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_gguf(&GgufFile::open(path)?)
    }

    /// Loads an HF model directory: `config.json` plus `model.safetensors`, or shards
    /// listed by `model.safetensors.index.json` (or named `model-0000x-of-0000y.safetensors`).
    /// Tensors may be f32, f16 or bf16.
    pub fn from_hf_dir(dir: impl AsRef<Path>) -> Result<Self> {
        hf::load(dir.as_ref())
    }

    /// Writes `config.json` and `model.safetensors` (HF names, f32) into `dir`, creating it
    /// if needed; each file is written atomically (temp file, then rename). `lm_head.weight`
    /// is omitted for tied embeddings, as transformers does.
    pub fn save_hf_safetensors(&self, dir: impl AsRef<Path>) -> Result<()> {
        self.validate()?;
        hf::save(self, dir.as_ref())
    }

    /// The output projection `(vocab, hidden)`: `lm_head`, or `embed` when tied.
    pub fn output_weight(&self) -> &[f32] {
        self.lm_head.as_deref().unwrap_or(&self.embed)
    }

    /// Checks the config and that every tensor has the element count its shape needs,
    /// and that `lm_head` is present exactly when the embeddings are not tied.
    pub fn validate(&self) -> Result<()> {
        let c = &self.config;
        c.validate()?;
        let check = |name: &str, data: &[f32], shape: &[usize]| -> Result<()> {
            if data.len() != numel(shape) {
                return Err(Error::shape(
                    "LlamaWeights",
                    format!("tensor `{name}` of shape {shape:?}"),
                    numel(shape),
                    data.len(),
                ));
            }
            Ok(())
        };
        check("embed", &self.embed, &[c.vocab, c.hidden])?;
        if self.layers.len() != c.layers {
            return Err(Error::shape("LlamaWeights", "number of layers", c.layers, self.layers.len()));
        }
        for (i, l) in self.layers.iter().enumerate() {
            for f in Field::ALL {
                check(&format!("layers[{i}].{}", f.hf()), l.get(f), &f.shape(c))?;
            }
        }
        check("final_norm", &self.final_norm, &[c.hidden])?;
        match (&self.lm_head, c.tied_embeddings) {
            (Some(w), false) => check("lm_head", w, &[c.vocab, c.hidden]),
            (None, true) => Ok(()),
            (Some(_), true) => Err(Error::invalid("LlamaWeights", "lm_head is set but the config ties the embeddings")),
            (None, false) => {
                Err(Error::MissingTensor { name: "lm_head".into(), context: Some("untied LlamaWeights".into()) })
            }
        }
    }

    /// Small seeded random weights for tests: linear weights uniform in
    /// `±1/sqrt(in)`, embeddings in `±0.5`, norms in `1 ± 0.1` (never all equal, so a
    /// test that mixes up two tensors notices).
    pub fn random(config: &LlamaConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let c = config;
        let mut rng = SplitMix64::new(seed);
        let mut fill = |shape: &[usize], center: f32, scale: f32| -> Vec<f32> {
            (0..numel(shape)).map(|_| center + scale * (2.0 * rng.next_f32() - 1.0)).collect()
        };
        let embed = fill(&[c.vocab, c.hidden], 0.0, 0.5);
        let mut layers = Vec::with_capacity(c.layers);
        for _ in 0..c.layers {
            layers.push(LayerWeights::build(|f| {
                let shape = f.shape(c);
                Ok(match f {
                    Field::AttnNorm | Field::FfnNorm => fill(&shape, 1.0, 0.1),
                    _ => fill(&shape, 0.0, 1.0 / (shape.last().copied().unwrap_or(1) as f32).sqrt()),
                })
            })?);
        }
        let final_norm = fill(&[c.hidden], 1.0, 0.1);
        let lm_head = (!c.tied_embeddings).then(|| fill(&[c.vocab, c.hidden], 0.0, 1.0 / (c.hidden as f32).sqrt()));
        Ok(LlamaWeights { config: config.clone(), embed, layers, final_norm, lm_head })
    }
}

/// Writes any [`LlamaSource`] as an HF directory (`config.json` and one f32
/// `model.safetensors`, each atomically, HF names, `lm_head.weight` omitted when tied),
/// reading one tensor at a time: a merged model is saved without assembling it in memory.
pub fn save_hf_safetensors(source: &(impl LlamaSource + ?Sized), dir: impl AsRef<Path>) -> Result<()> {
    hf::save(source, dir.as_ref())
}

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny seeded generator, so the library needs no
/// `rand` dependency for test weights and data shuffles.
#[derive(Clone, Debug)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` from the top 24 bits.
    pub(crate) fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in `0..n` by Lemire's multiply-shift (bias below `n / 2^64`); 0 for `n = 0`.
    /// (Only the recipes draw and shuffle.)
    #[cfg(feature = "recipes")]
    pub(crate) fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Fisher-Yates shuffle.
    #[cfg(feature = "recipes")]
    pub(crate) fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}
