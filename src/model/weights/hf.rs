//! Hugging Face model directories for [`LlamaWeights`]: loading `config.json` plus one
//! `model.safetensors` or a sharded set (f32, f16 or bf16 tensors, converted to f32), and
//! saving `config.json` plus one f32 `model.safetensors`, each file atomically.
//!
//! Tensor names: `model.embed_tokens.weight`, `model.layers.N.<field>.weight`,
//! `model.norm.weight`, `lm_head.weight` (absent when the embeddings are tied).

use super::{Field, LayerWeights, LlamaWeights};
use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::model::config::LlamaConfig;
use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

const OP: &str = "hf safetensors";
const EMBED: &str = "model.embed_tokens.weight";
const NORM: &str = "model.norm.weight";
const LM_HEAD: &str = "lm_head.weight";
const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

fn layer_name(i: usize, f: Field) -> String {
    format!("model.layers.{i}.{}.weight", f.hf())
}

/// The safetensors files of the model in `dir`, in a fixed order.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(SINGLE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(INDEX);
    if index.is_file() {
        let text = fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(Some(&index), format!("not valid JSON: {e}")))?;
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

fn map(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: read-only map; safetensors validates the header and every tensor's byte
    // range against the map's length before handing out slices.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

/// Little-endian f32, f16 or bf16 bytes to f32.
fn to_f32(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    let two = |f: fn(u16) -> f32| bytes.chunks_exact(2).map(|b| f(u16::from_le_bytes([b[0], b[1]]))).collect();
    Ok(match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F16 => two(|b| half::f16::from_bits(b).to_f32()),
        Dtype::BF16 => two(|b| half::bf16::from_bits(b).to_f32()),
        other => {
            return Err(Error::Dtype {
                name: name.to_string(),
                expected: "F32, F16 or BF16".into(),
                got: format!("{other:?}"),
            })
        }
    })
}

pub(super) fn load(dir: &Path) -> Result<LlamaWeights> {
    let config = LlamaConfig::from_hf_config_json(&dir.join("config.json"))?;
    let paths = shard_files(dir)?;
    let maps = paths.iter().map(|p| map(p)).collect::<Result<Vec<_>>>()?;
    let files = paths
        .iter()
        .zip(&maps)
        .map(|(p, m)| {
            SafeTensors::deserialize(m).map(|st| (p, st)).map_err(|e| {
                Error::format(Some(p), format!("not a valid safetensors file (truncated or corrupt?): {e}"))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let load = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
        let (path, view) = files
            .iter()
            .find_map(|(p, st)| st.tensor(name).ok().map(|v| (p, v)))
            .ok_or_else(|| Error::MissingTensor { name: name.to_string(), context: Some(dir.display().to_string()) })?;
        if view.shape() != shape {
            return Err(Error::shape(
                OP,
                format!("tensor `{name}` in {}", path.display()),
                format!("{shape:?}"),
                format!("{:?}", view.shape()),
            ));
        }
        to_f32(name, view.dtype(), view.data())
    };
    let c = &config;
    let embed = load(EMBED, &[c.vocab, c.hidden])?;
    let layers = (0..c.layers)
        .map(|i| LayerWeights::build(|f| load(&layer_name(i, f), &f.shape(c))))
        .collect::<Result<Vec<_>>>()?;
    let final_norm = load(NORM, &[c.hidden])?;
    // Some tied checkpoints still store lm_head (a copy of the embedding); it is ignored.
    let lm_head = if c.tied_embeddings { None } else { Some(load(LM_HEAD, &[c.vocab, c.hidden])?) };
    let w = LlamaWeights { config, embed, layers, final_norm, lm_head };
    w.validate()?;
    Ok(w)
}

pub(super) fn save(w: &LlamaWeights, dir: &Path) -> Result<()> {
    let c = &w.config;
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tensors: Vec<(String, Vec<usize>, &[f32])> = vec![(EMBED.into(), vec![c.vocab, c.hidden], &w.embed[..])];
    for (i, l) in w.layers.iter().enumerate() {
        tensors.extend(Field::ALL.iter().map(|&f| (layer_name(i, f), f.shape(c), l.get(f))));
    }
    tensors.push((NORM.into(), vec![c.hidden], &w.final_norm[..]));
    if let Some(h) = &w.lm_head {
        tensors.push((LM_HEAD.into(), vec![c.vocab, c.hidden], &h[..]));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));

    let path = dir.join(SINGLE);
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for (name, shape, data) in &tensors {
        let end = offset + data.len() * 4;
        infos.push((name.clone(), TensorInfo { dtype: Dtype::F32, shape: shape.clone(), data_offsets: (offset, end) }));
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
    write_atomic(&path, |out| {
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        let mut buf = Vec::with_capacity(1 << 16);
        for (_, _, data) in &tensors {
            for chunk in data.chunks(1 << 14) {
                buf.clear();
                chunk.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
                out.write_all(&buf)?;
            }
        }
        Ok(())
    })?;

    let config_path = dir.join("config.json");
    let json = serde_json::to_string_pretty(&c.to_hf_config_json())
        .map_err(|e| Error::format(Some(&config_path), format!("cannot encode the config: {e}")))?;
    write_atomic(&config_path, |out| out.write_all(json.as_bytes()))
}
