//! Hugging Face model directories for [`LlamaWeights`]: loading `config.json` plus one
//! `model.safetensors` or a sharded set (f32, f16 or bf16 tensors, converted to f32), and
//! saving `config.json` plus one f32 `model.safetensors`, each file atomically.
//!
//! Tensor names: `model.embed_tokens.weight`, `model.layers.N.<field>.weight`,
//! `model.norm.weight`, `lm_head.weight` (absent when the embeddings are tied).

use super::{Field, LayerWeights, LlamaWeights};
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

pub(super) fn load(dir: &Path) -> Result<LlamaWeights> {
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
                    format!("tensor `{name}` appears in both {} and {}", files[j].path().display(), f.path().display()),
                ));
            }
        }
    }
    let c = &config;
    let mut wanted = vec![(EMBED.to_string(), vec![c.vocab, c.hidden])];
    for i in 0..c.layers {
        for f in Field::ALL {
            let name = layer_name(i, f);
            // Checked here, before any allocation: num_hidden_layers may ask for far more.
            if !owner.contains_key(&name) {
                return Err(Error::MissingTensor {
                    name,
                    context: Some(format!("{} (config.json says {} layers)", dir.display(), c.layers)),
                });
            }
            wanted.push((name, f.shape(c)));
        }
    }
    wanted.push((NORM.into(), vec![c.hidden]));
    if !c.tied_embeddings {
        wanted.push((LM_HEAD.into(), vec![c.vocab, c.hidden]));
    }
    for (name, shape) in &wanted {
        let f = owner
            .get(name)
            .map(|&i| &files[i])
            .ok_or_else(|| Error::MissingTensor { name: name.clone(), context: Some(dir.display().to_string()) })?;
        if f.shape(name) != Some(&shape[..]) {
            return Err(Error::shape(
                OP,
                format!("tensor `{name}` in {}", f.path().display()),
                format!("{shape:?}"),
                format!("{:?}", f.shape(name).unwrap_or(&[])),
            ));
        }
    }
    let load = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
        let f = owner
            .get(name)
            .map(|&i| &files[i])
            .ok_or_else(|| Error::MissingTensor { name: name.to_string(), context: Some(dir.display().to_string()) })?;
        let w = f.tensor_float_shaped(name, shape)?;
        super::check_weight_finite(name, &f.path().display().to_string(), &w)?;
        Ok(w)
    };
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
