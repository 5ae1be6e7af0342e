//! Where a LLaMA model's tensors come from, one tensor at a time: [`LlamaSource`].
//!
//! [`LlamaWeights`] holds every tensor in host memory; [`LlamaCheckpoint`] keeps an HF
//! directory (one `model.safetensors` or shards) or a GGUF file memory-mapped, checks every
//! tensor's presence and shape when it opens, and converts a tensor to f32 only when asked
//! for it. Building a model from a checkpoint (`LlamaModel::new`) therefore holds one
//! tensor's f32 copy on the host at a time, never the whole model: a LLaMA-2-7B in bf16
//! shards (13.5 GB on disk) needs at most its largest tensor (the 0.5 GB embedding) in f32
//! beside the mapped files, where loading [`LlamaWeights`] first needs 27 GB.

use super::hf::HfShards;
use super::{check_weight_finite, unpermute_rope_rows, Field, LayerWeights, LlamaWeights};
use crate::error::{Error, Result};
use crate::io::gguf::GgufFile;
use crate::model::config::LlamaConfig;
use std::borrow::Cow;
use std::path::Path;

/// One tensor of a LLaMA model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tensor {
    /// `(vocab, hidden)` token embedding.
    Embed,
    /// Tensor `field` of decoder layer `layer`.
    Layer(usize, Field),
    /// `(hidden,)` final RMS norm.
    FinalNorm,
    /// `(vocab, hidden)` output projection: `lm_head`, or the embedding when the config ties them.
    Output,
}

impl Tensor {
    /// Row-major shape under `c`.
    pub fn shape(self, c: &LlamaConfig) -> Vec<usize> {
        match self {
            Tensor::Embed | Tensor::Output => vec![c.vocab, c.hidden],
            Tensor::Layer(_, f) => f.shape(c),
            Tensor::FinalNorm => vec![c.hidden],
        }
    }

    /// Every tensor a model of config `c` stores, in load order; `Output` only when the
    /// embeddings are not tied (a tied model has no `lm_head` of its own). Lazy: a config
    /// from a file is walked before anything sized by it is allocated.
    pub fn all(c: &LlamaConfig) -> impl Iterator<Item = Tensor> + use<> {
        let layers = (0..c.layers).flat_map(|i| Field::ALL.into_iter().map(move |f| Tensor::Layer(i, f)));
        std::iter::once(Tensor::Embed)
            .chain(layers)
            .chain(std::iter::once(Tensor::FinalNorm))
            .chain((!c.tied_embeddings).then_some(Tensor::Output))
    }

    /// The tensor's Hugging Face name.
    pub fn hf_name(self) -> String {
        match self {
            Tensor::Embed => "model.embed_tokens.weight".into(),
            Tensor::Layer(i, f) => format!("model.layers.{i}.{}.weight", f.hf()),
            Tensor::FinalNorm => "model.norm.weight".into(),
            Tensor::Output => "lm_head.weight".into(),
        }
    }

    /// The tensor's GGUF name.
    pub fn gguf_name(self) -> String {
        match self {
            Tensor::Embed => "token_embd.weight".into(),
            Tensor::Layer(i, f) => format!("blk.{i}.{}.weight", f.gguf()),
            Tensor::FinalNorm => "output_norm.weight".into(),
            Tensor::Output => "output.weight".into(),
        }
    }

    /// For a tied model `Output` is stored as `Embed`.
    fn stored(self, c: &LlamaConfig) -> Tensor {
        if self == Tensor::Output && c.tied_embeddings {
            Tensor::Embed
        } else {
            self
        }
    }
}

/// A LLaMA model's configuration and its tensors, handed out one at a time as f32 in
/// Hugging Face's layout (Q and K rows in "rotate-half" order).
pub trait LlamaSource {
    fn config(&self) -> &LlamaConfig;

    /// The values of `t`, of `t.shape(self.config())` elements: borrowed where the source
    /// holds them as f32 already, else converted for this call only.
    fn tensor(&self, t: Tensor) -> Result<Cow<'_, [f32]>>;
}

/// `source.tensor(t)`, checked to hold exactly the elements `t`'s shape needs.
pub(crate) fn checked_tensor(source: &(impl LlamaSource + ?Sized), t: Tensor) -> Result<Cow<'_, [f32]>> {
    let shape = t.shape(source.config());
    let v = source.tensor(t)?;
    let n: usize = shape.iter().product();
    if v.len() != n {
        return Err(Error::shape("LlamaSource", format!("tensor `{}` of shape {shape:?}", t.hf_name()), n, v.len()));
    }
    Ok(v)
}

impl LlamaSource for LlamaWeights {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn tensor(&self, t: Tensor) -> Result<Cow<'_, [f32]>> {
        let missing = || Error::invalid("LlamaWeights", format!("no tensor `{}`", t.hf_name()));
        Ok(Cow::Borrowed(match t {
            Tensor::Embed => &self.embed,
            Tensor::Layer(i, f) => self.layers.get(i).ok_or_else(missing)?.get(f),
            Tensor::FinalNorm => &self.final_norm,
            Tensor::Output => self.output_weight(),
        }))
    }
}

impl LlamaWeights {
    /// Every tensor of `source`, read into host memory.
    pub fn from_source(source: &(impl LlamaSource + ?Sized)) -> Result<Self> {
        let c = source.config().clone();
        let read = |t: Tensor| checked_tensor(source, t).map(Cow::into_owned);
        let embed = read(Tensor::Embed)?;
        let layers =
            (0..c.layers).map(|i| LayerWeights::build(|f| read(Tensor::Layer(i, f)))).collect::<Result<Vec<_>>>()?;
        let final_norm = read(Tensor::FinalNorm)?;
        let lm_head = if c.tied_embeddings { None } else { Some(read(Tensor::Output)?) };
        let w = LlamaWeights { config: c, embed, layers, final_norm, lm_head };
        w.validate()?;
        Ok(w)
    }
}

/// Checks that a `llama` GGUF file holds every tensor of its config with the right shape;
/// returns the config. Nothing is read beyond the header.
pub(super) fn check_gguf(f: &GgufFile) -> Result<LlamaConfig> {
    let c = LlamaConfig::from_gguf(f)?;
    let where_ = gguf_where(f);
    for t in Tensor::all(&c) {
        let name = t.gguf_name();
        let info = f.tensor_info(&name).ok_or_else(|| Error::MissingTensor {
            name: name.clone(),
            context: Some(format!("{where_} (llama.block_count says {} blocks)", c.layers)),
        })?;
        let shape = t.shape(&c);
        if info.shape() != shape {
            return Err(Error::shape(
                "gguf",
                format!("tensor `{name}` in {where_}"),
                format!("{shape:?}"),
                format!("{:?}", info.shape()),
            ));
        }
    }
    Ok(c)
}

fn gguf_where(f: &GgufFile) -> String {
    f.path().map(|p| p.display().to_string()).unwrap_or_else(|| "GGUF data".into())
}

/// Tensor `t` of a GGUF file checked by [`check_gguf`], dequantised, Q and K un-permuted
/// to HF's row order.
pub(super) fn read_gguf(f: &GgufFile, c: &LlamaConfig, t: Tensor) -> Result<Vec<f32>> {
    let t = t.stored(c);
    let name = t.gguf_name();
    let w = f.tensor_f32_shaped(&name, &t.shape(c))?;
    check_weight_finite(&name, &gguf_where(f), &w)?;
    match t {
        Tensor::Layer(_, Field::Q) => unpermute_rope_rows(&w, c.heads, c.hidden),
        Tensor::Layer(_, Field::K) => unpermute_rope_rows(&w, c.kv_heads, c.hidden),
        _ => Ok(w),
    }
}

enum Files {
    Hf(HfShards),
    Gguf(GgufFile),
}

/// A model on disk, memory-mapped: an HF directory or a GGUF file. Opening it reads the
/// config and checks every tensor's presence and shape (a config asking for more layers
/// than the files hold fails here); each [`LlamaSource::tensor`] call then reads and
/// converts that one tensor (f32, f16, bf16 or a GGUF quantisation, to f32), checking it
/// is finite.
pub struct LlamaCheckpoint {
    config: LlamaConfig,
    files: Files,
}

impl LlamaCheckpoint {
    /// A directory as an HF model (`config.json` plus `model.safetensors`, or shards listed
    /// by `model.safetensors.index.json` or named `model-0000x-of-0000y.safetensors`), any
    /// other path as a GGUF file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            let (config, shards) = HfShards::open(path)?;
            Ok(LlamaCheckpoint { config, files: Files::Hf(shards) })
        } else {
            Self::from_gguf(GgufFile::open(path)?)
        }
    }

    /// A GGUF file already opened (its tokenizer may be read from [`Self::gguf`]).
    pub fn from_gguf(f: GgufFile) -> Result<Self> {
        let config = check_gguf(&f)?;
        Ok(LlamaCheckpoint { config, files: Files::Gguf(f) })
    }

    /// Reads every tensor once, one at a time, so a corrupt or non-finite tensor is
    /// reported (named) now rather than when a model is built from it. Holds one tensor's
    /// f32 copy at a time.
    pub fn verify(&self) -> Result<()> {
        for t in Tensor::all(&self.config) {
            checked_tensor(self, t)?;
        }
        Ok(())
    }

    /// The GGUF file, when the checkpoint is one.
    pub fn gguf(&self) -> Option<&GgufFile> {
        match &self.files {
            Files::Gguf(f) => Some(f),
            Files::Hf(_) => None,
        }
    }
}

impl LlamaSource for LlamaCheckpoint {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn tensor(&self, t: Tensor) -> Result<Cow<'_, [f32]>> {
        match &self.files {
            Files::Hf(s) => s.read(&self.config, t.stored(&self.config)).map(Cow::Owned),
            Files::Gguf(f) => read_gguf(f, &self.config, t).map(Cow::Owned),
        }
    }
}
