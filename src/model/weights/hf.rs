//! Hugging Face model directories for [`LlamaWeights`]: loading `config.json` plus one
//! `model.safetensors` or a sharded set (f32, f16 or bf16 tensors, converted to f32), and
//! saving `config.json` plus one f32 `model.safetensors`, each file atomically.
//!
//! Tensor names: `model.embed_tokens.weight`, `model.layers.N.<field>.weight`,
//! `model.norm.weight`, `lm_head.weight` (absent when the embeddings are tied).

use super::source::{checked_tensor, LlamaCheckpoint, LlamaSource, Tensor};
use super::LlamaWeights;
use crate::error::{Error, Result};
use crate::io::fs::write_atomic;
use crate::io::SafetensorsFile;
use crate::model::config::LlamaConfig;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;
use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

const OP: &str = "hf safetensors";
const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

/// The safetensors files of the model in `dir`, in a fixed order.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(SINGLE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(INDEX);
    if index.is_file() {
        let json = crate::io::json::read_unique(&index)?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::format(Some(&index), "no `weight_map` object"))?;
        let mut files = BTreeSet::new();
        for (tensor, file) in map {
            // Only plain file names beside the index: never follow a path out of `dir`.
            let name = file.as_str().filter(|f| !f.is_empty() && Path::new(f).file_name() == Some(f.as_ref()));
            let name = name.ok_or_else(|| {
                Error::format(Some(&index), format!("tensor `{tensor}` maps to {file}, not a file name"))
            })?;
            files.insert(dir.join(name));
        }
        return Ok(files.into_iter().collect());
    }
    let mut shards = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("model-") && name.contains("-of-") && name.ends_with(".safetensors") {
            shards.push(entry.path());
        }
    }
    if shards.is_empty() {
        return Err(Error::format(
            Some(dir),
            format!("no {SINGLE}, {INDEX} or model-0000x-of-0000y.safetensors in this directory"),
        ));
    }
    shards.sort();
    Ok(shards)
}

/// The memory-mapped safetensors files of an HF model directory and which file holds each
/// tensor.
pub(super) struct HfShards {
    dir: PathBuf,
    files: Vec<SafetensorsFile>,
    owner: HashMap<String, usize>,
}

impl HfShards {
    /// Opens `dir`'s config and files and checks that every tensor the config needs is
    /// there exactly once with its shape, before anything is read.
    pub(super) fn open(dir: &Path) -> Result<(LlamaConfig, Self)> {
        let meta = fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
        if !meta.is_dir() {
            return Err(Error::format(Some(dir), "not a directory (expected a Hugging Face model directory)"));
        }
        let config = LlamaConfig::from_hf_config_json(&dir.join("config.json"))?;
        let files = shard_files(dir)?.iter().map(SafetensorsFile::open).collect::<Result<Vec<_>>>()?;
        // Which shard holds each tensor; one tensor in two shards is ambiguous, not "first wins".
        let mut owner: HashMap<String, usize> = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for name in f.names() {
                if let Some(j) = owner.insert(name.clone(), i) {
                    return Err(Error::format(
                        Some(dir),
                        format!(
                            "tensor `{name}` appears in both {} and {}",
                            files[j].path().display(),
                            f.path().display()
                        ),
                    ));
                }
            }
        }
        let shards = HfShards { dir: dir.to_path_buf(), files, owner };
        let c = &config;
        for t in Tensor::all(c) {
            let name = t.hf_name();
            let context = match t {
                // Checked before any allocation: num_hidden_layers may ask for far more.
                Tensor::Layer(..) => format!("{} (config.json says {} layers)", dir.display(), c.layers),
                _ => dir.display().to_string(),
            };
            let f =
                shards.file(&name).map_err(|_| Error::MissingTensor { name: name.clone(), context: Some(context) })?;
            let shape = t.shape(c);
            if f.shape(&name) != Some(&shape[..]) {
                return Err(Error::shape(
                    OP,
                    format!("tensor `{name}` in {}", f.path().display()),
                    format!("{shape:?}"),
                    format!("{:?}", f.shape(&name).unwrap_or(&[])),
                ));
            }
        }
        Ok((config, shards))
    }

    fn file(&self, name: &str) -> Result<&SafetensorsFile> {
        self.owner.get(name).map(|&i| &self.files[i]).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            context: Some(self.dir.display().to_string()),
        })
    }

    /// Tensor `t` as f32, checked finite. (Some tied checkpoints still store lm_head, a
    /// copy of the embedding; it is never read.)
    pub(super) fn read(&self, c: &LlamaConfig, t: Tensor) -> Result<Vec<f32>> {
        let name = t.hf_name();
        let f = self.file(&name)?;
        let w = f.tensor_float_shaped(&name, &t.shape(c))?;
        super::check_weight_finite(&name, &f.path().display().to_string(), &w)?;
        Ok(w)
    }
}

pub(super) fn load(dir: &Path) -> Result<LlamaWeights> {
    LlamaWeights::from_source(&LlamaCheckpoint::open(dir)?)
}

/// Writes `source` as `config.json` and one f32 `model.safetensors` in `dir`, one tensor
/// in memory at a time.
pub(super) fn save(source: &(impl LlamaSource + ?Sized), dir: &Path) -> Result<()> {
    let c = source.config();
    c.validate()?;
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tensors: Vec<Tensor> = Tensor::all(c).collect();
    tensors.sort_by_key(|t| t.hf_name());

    let path = dir.join(SINGLE);
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for t in &tensors {
        let shape = t.shape(c);
        let end = offset + shape.iter().product::<usize>() * 4;
        infos.push((t.hf_name(), TensorInfo { dtype: Dtype::F32, shape, data_offsets: (offset, end) }));
        offset = end;
    }
    // transformers refuses safetensors checkpoints without a `format` entry.
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let header = Metadata::new(Some(meta), infos)
        .map_err(|e| Error::format(Some(&path), format!("cannot build the header: {e}")))?;
    let mut header = serde_json::to_string(&header)
        .map_err(|e| Error::format(Some(&path), format!("cannot encode the header: {e}")))?
        .into_bytes();
    // Padding the header to 8 bytes keeps every f32 tensor aligned for readers that map it.
    header.resize(header.len().next_multiple_of(8), b' ');
    // A source error (a tensor that cannot be read) is kept and returned as it is: the
    // temporary file is discarded and nothing replaces the old file.
    let mut source_error = None;
    let written = write_atomic(&path, |out| {
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        let mut buf = Vec::with_capacity(1 << 16);
        for &t in &tensors {
            let data = match checked_tensor(source, t) {
                Ok(d) => d,
                Err(e) => {
                    source_error = Some(e);
                    return Err(std::io::Error::other("a tensor could not be read"));
                }
            };
            for chunk in data.chunks(1 << 14) {
                buf.clear();
                chunk.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
                out.write_all(&buf)?;
            }
        }
        Ok(())
    });
    if let Some(e) = source_error {
        return Err(e);
    }
    written?;

    let config_path = dir.join("config.json");
    let json = serde_json::to_string_pretty(&c.to_hf_config_json())
        .map_err(|e| Error::format(Some(&config_path), format!("cannot encode the config: {e}")))?;
    write_atomic(&config_path, |out| out.write_all(json.as_bytes()))
}
