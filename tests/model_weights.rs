//! LLaMA weights: HF safetensors save/load round trips (single file, sharded with and
//! without an index, f16/bf16 checkpoints), the RoPE row un-permutation against
//! llama.cpp's permute re-implemented here, GGUF loading of a hand-built file with
//! permuted Q/K, config parsing, and the errors for missing tensors and wrong shapes.

mod common;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use sparsegrad::io::gguf::GgufFile;
use sparsegrad::model::config::LlamaConfig;
use sparsegrad::model::weights::{unpermute_rope_rows, LlamaCheckpoint, LlamaWeights};
use sparsegrad::Error;
use std::collections::BTreeMap;
use std::path::Path;

/// head_dim 8: large enough that llama.cpp's permutation is not its own inverse.
fn tiny(tied: bool) -> LlamaConfig {
    LlamaConfig {
        hidden: 48,
        ffn: 40,
        layers: 2,
        heads: 6,
        kv_heads: 2,
        head_dim: 8,
        rope_theta: 10_000.0,
        rope_scaling: None,
        rms_eps: 1e-6,
        vocab: 37,
        tied_embeddings: tied,
        max_seq: 64,
        bos: Some(1),
        eos: Some(2),
    }
}

/// llama.cpp's `convert_hf_to_gguf.py` permute, verbatim in index form:
/// `w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)`.
fn llama_cpp_permute(w: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let half = rows / n_head / 2;
    let mut out = vec![f32::NAN; w.len()];
    // Output element [h, j, i, c] (axes swapped) is input element [h, i, j, c].
    for h in 0..n_head {
        for j in 0..half {
            for i in 0..2 {
                let dst = ((h * half + j) * 2 + i) * cols;
                let src = ((h * 2 + i) * half + j) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

fn seq(n: usize) -> Vec<f32> {
    (0..n).map(|i| i as f32 * 0.5 - 3.0).collect()
}

#[test]
fn unpermute_inverts_llama_cpp_permute() {
    for (n_head, head_dim, cols) in [(9, 64, 5), (3, 64, 7), (2, 8, 3), (1, 2, 1), (4, 6, 2)] {
        let w = seq(n_head * head_dim * cols);
        let p = llama_cpp_permute(&w, n_head, cols);
        if head_dim > 2 {
            assert_ne!(p, w, "the permutation must move something for ({n_head}, {head_dim})");
        }
        assert_eq!(unpermute_rope_rows(&p, n_head, cols).unwrap(), w, "({n_head}, {head_dim}, {cols})");
    }
    // By hand, one head of 6 rows: HF rows [0 1 2 | 3 4 5] are the two rotate-half halves;
    // GGUF interleaves them as [0 3 1 4 2 5].
    let gguf = [0.0, 3.0, 1.0, 4.0, 2.0, 5.0];
    assert_eq!(llama_cpp_permute(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], 1, 1), gguf);
    assert_eq!(unpermute_rope_rows(&gguf, 1, 1).unwrap(), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    // Applying the forward permute again is not the inverse (head_dim 8).
    let w = seq(2 * 8 * 3);
    assert_ne!(llama_cpp_permute(&llama_cpp_permute(&w, 2, 3), 2, 3), w);
    // Shapes that cannot be (n_head, even head_dim, cols).
    assert!(matches!(unpermute_rope_rows(&seq(18), 2, 3), Err(Error::Shape { .. })));
    assert!(matches!(unpermute_rope_rows(&seq(7), 1, 2), Err(Error::Shape { .. })));
    assert!(matches!(unpermute_rope_rows(&seq(8), 0, 2), Err(Error::InvalidArgument { .. })));
}

#[test]
fn hf_round_trip_untied_and_tied() {
    for tied in [false, true] {
        let w = LlamaWeights::random(&tiny(tied), 7).unwrap();
        assert_eq!(w.lm_head.is_none(), tied);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("nested/model");
        w.save_hf_safetensors(&out).unwrap();
        let back = LlamaWeights::from_hf_dir(&out).unwrap();
        assert_eq!(back, w, "tied = {tied}");
        let st = std::fs::read(out.join("model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&st).unwrap();
        assert_eq!(st.names().len(), 2 + 2 * 9 + usize::from(!tied));
        assert_eq!(st.tensor("model.layers.1.mlp.down_proj.weight").unwrap().shape(), &[48, 40]);
        assert_eq!(st.tensor("model.layers.0.self_attn.k_proj.weight").unwrap().shape(), &[16, 48]);
        assert_eq!(LlamaConfig::from_hf_config_json(&out.join("config.json")).unwrap(), w.config);
        // No temp files left behind.
        let names: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        // Saving again over the old files works (atomic replace).
        w.save_hf_safetensors(&out).unwrap();
    }
}

#[test]
fn random_is_seeded_and_varied() {
    let c = tiny(false);
    let a = LlamaWeights::random(&c, 1).unwrap();
    assert_eq!(a, LlamaWeights::random(&c, 1).unwrap());
    assert_ne!(a, LlamaWeights::random(&c, 2).unwrap());
    assert!(a.layers[0].attn_norm.iter().all(|&x| (0.9..=1.1).contains(&x)));
    assert!(a.layers[0].q.iter().all(|&x| x.abs() <= 1.0 / 48f32.sqrt()));
    assert!(a.layers[0].q != a.layers[1].q);
    a.validate().unwrap();
}

/// A tensor as (name, dtype, shape, little-endian bytes).
type StTensor = (String, Dtype, Vec<usize>, Vec<u8>);

/// Writes `tensors` as a safetensors file with the given dtype per tensor.
fn write_st(path: &Path, tensors: &[StTensor]) {
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// The tensors of a saved model, as (name, dtype, shape, bytes).
fn read_st(path: &Path) -> Vec<StTensor> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<_> =
        st.tensors().into_iter().map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn saved(tied: bool) -> (tempfile::TempDir, LlamaWeights, Vec<StTensor>) {
    let w = LlamaWeights::random(&tiny(tied), 3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    w.save_hf_safetensors(dir.path()).unwrap();
    let t = read_st(&dir.path().join("model.safetensors"));
    (dir, w, t)
}

#[test]
fn loads_sharded_checkpoints_with_and_without_index() {
    let (dir, w, tensors) = saved(false);
    let d = dir.path();
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    let (a, b) = tensors.split_at(tensors.len() / 2);
    write_st(&d.join("model-00001-of-00002.safetensors"), a);
    write_st(&d.join("model-00002-of-00002.safetensors"), b);
    // Without an index: the shards are found by name.
    assert_eq!(LlamaWeights::from_hf_dir(d).unwrap(), w);
    // With an index naming them.
    let map: BTreeMap<_, _> = a
        .iter()
        .map(|t| (t.0.clone(), "model-00001-of-00002.safetensors"))
        .chain(b.iter().map(|t| (t.0.clone(), "model-00002-of-00002.safetensors")))
        .collect();
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_eq!(LlamaWeights::from_hf_dir(d).unwrap(), w);
    // An index pointing outside the directory is refused.
    let evil = serde_json::json!({ "weight_map": { "x": "../model-00001-of-00002.safetensors" } });
    std::fs::write(d.join("model.safetensors.index.json"), evil.to_string()).unwrap();
    assert!(matches!(LlamaWeights::from_hf_dir(d), Err(Error::Format { .. })));
}

#[test]
fn loads_f16_and_bf16_checkpoints() {
    let (dir, w, tensors) = saved(true);
    for (dtype, conv) in [
        (Dtype::F16, (|x: f32| half::f16::from_f32(x).to_le_bytes().to_vec()) as fn(f32) -> Vec<u8>),
        (Dtype::BF16, |x| half::bf16::from_f32(x).to_le_bytes().to_vec()),
    ] {
        let back = |b: &[u8]| -> f32 {
            let bits = u16::from_le_bytes([b[0], b[1]]);
            if dtype == Dtype::F16 {
                half::f16::from_bits(bits).to_f32()
            } else {
                half::bf16::from_bits(bits).to_f32()
            }
        };
        let mut expect = w.clone();
        let round = |v: &mut Vec<f32>| v.iter_mut().for_each(|x| *x = back(&conv(*x)));
        common::for_each_tensor_mut(&mut expect, round);
        let half_tensors: Vec<_> = tensors
            .iter()
            .map(|(n, _, s, b)| {
                let data: Vec<u8> =
                    b.chunks_exact(4).flat_map(|c| conv(f32::from_le_bytes(c.try_into().unwrap()))).collect();
                (n.clone(), dtype, s.clone(), data)
            })
            .collect();
        write_st(&dir.path().join("model.safetensors"), &half_tensors);
        let got = LlamaWeights::from_hf_dir(dir.path()).unwrap();
        assert_eq!(got, expect, "{dtype:?}");
        assert_ne!(got, w, "{dtype:?} rounding must show");
    }
}

#[test]
fn missing_tensor_wrong_shape_and_dtype_errors_name_the_tensor() {
    let (dir, _, tensors) = saved(false);
    let path = dir.path().join("model.safetensors");
    let victim = "model.layers.1.mlp.up_proj.weight";

    let without: Vec<_> = tensors.iter().filter(|t| t.0 != victim).cloned().collect();
    write_st(&path, &without);
    let err = LlamaWeights::from_hf_dir(dir.path()).unwrap_err();
    assert!(matches!(&err, Error::MissingTensor { name, .. } if name == victim), "{err:?}");

    let reshaped: Vec<_> = tensors
        .iter()
        .map(|t| if t.0 == victim { (t.0.clone(), t.1, vec![48, 40], t.3.clone()) } else { t.clone() })
        .collect();
    write_st(&path, &reshaped);
    let err = LlamaWeights::from_hf_dir(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Shape { .. }) && err.to_string().contains(victim), "{err}");

    let retyped: Vec<_> = tensors
        .iter()
        .map(|t| if t.0 == victim { (t.0.clone(), Dtype::I32, t.2.clone(), t.3.clone()) } else { t.clone() })
        .collect();
    write_st(&path, &retyped);
    let err = LlamaWeights::from_hf_dir(dir.path()).unwrap_err();
    assert!(matches!(&err, Error::Dtype { name, .. } if name == victim), "{err:?}");

    // Untied config without lm_head.
    let no_head: Vec<_> = tensors.iter().filter(|t| t.0 != "lm_head.weight").cloned().collect();
    write_st(&path, &no_head);
    assert!(
        matches!(LlamaWeights::from_hf_dir(dir.path()), Err(Error::MissingTensor { name, .. }) if name == "lm_head.weight")
    );

    // A truncated safetensors file.
    std::fs::write(&path, &std::fs::read(dir.path().join("config.json")).unwrap()[..10]).unwrap();
    assert!(matches!(LlamaWeights::from_hf_dir(dir.path()), Err(Error::Format { .. })));
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(LlamaWeights::from_hf_dir(dir.path()), Err(Error::Format { .. })));
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    assert!(matches!(LlamaWeights::from_hf_dir(dir.path()), Err(Error::Io { .. })));
}

#[test]
fn validate_catches_inconsistent_weights() {
    let mut w = LlamaWeights::random(&tiny(false), 5).unwrap();
    w.layers[1].down.pop();
    let err = w.validate().unwrap_err();
    assert!(err.to_string().contains("layers[1].mlp.down_proj"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    assert!(w.save_hf_safetensors(dir.path()).is_err());
    let mut w = LlamaWeights::random(&tiny(true), 5).unwrap();
    w.lm_head = Some(w.embed.clone());
    assert!(w.validate().is_err());
    w.lm_head = None;
    w.layers.pop();
    assert!(matches!(w.validate(), Err(Error::Shape { .. })));
    let mut c = tiny(false);
    c.kv_heads = 4;
    assert!(LlamaWeights::random(&c, 0).is_err(), "6 heads are not a multiple of 4 kv heads");
    c.kv_heads = 2;
    c.head_dim = 7;
    assert!(c.validate().is_err());
}

#[test]
fn hf_config_json_defaults_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.json");
    let write = |v: serde_json::Value| std::fs::write(&p, v.to_string()).unwrap();
    write(serde_json::json!({
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
        "vocab_size": 100, "rms_norm_eps": 1e-5, "eos_token_id": [5, 6], "bos_token_id": null
    }));
    let c = LlamaConfig::from_hf_config_json(&p).unwrap();
    assert_eq!((c.kv_heads, c.head_dim, c.rope_theta, c.tied_embeddings, c.max_seq), (4, 16, 10_000.0, false, 2048));
    assert_eq!((c.bos, c.eos), (None, Some(5)));
    write(serde_json::json!({ "hidden_size": "64" }));
    assert!(matches!(LlamaConfig::from_hf_config_json(&p), Err(Error::Metadata { key, .. }) if key == "hidden_size"));
    write(serde_json::json!({ "hidden_size": 64 }));
    assert!(
        matches!(LlamaConfig::from_hf_config_json(&p), Err(Error::Metadata { key, .. }) if key == "num_attention_heads")
    );
    std::fs::write(&p, "{ not json").unwrap();
    assert!(matches!(LlamaConfig::from_hf_config_json(&p), Err(Error::Format { .. })));
}

// ---------------------------------------------------------------------------------------
// GGUF: a hand-built llama file whose Q and K are stored permuted as llama.cpp does.

fn gstr(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

/// A GGUF v3 file with u32/f32/string metadata and F32 tensors `(name, row-major shape, data)`.
fn gguf_file(meta: &[(&str, Vec<u8>)], tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        b.extend(gstr(k));
        b.extend_from_slice(v);
    }
    let mut off = 0usize;
    for (name, shape, data) in tensors {
        b.extend(gstr(name));
        b.extend_from_slice(&(shape.len() as u32).to_le_bytes());
        shape.iter().rev().for_each(|&d| b.extend_from_slice(&(d as u64).to_le_bytes()));
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&(off as u64).to_le_bytes());
        off = (off + data.len() * 4).next_multiple_of(32);
    }
    let start = b.len().next_multiple_of(32);
    b.resize(start, 0);
    let mut off = 0usize;
    for (_, _, data) in tensors {
        b.resize(start + off, 0);
        data.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
        off = (off + data.len() * 4).next_multiple_of(32);
    }
    b
}

fn u32v(v: u32) -> Vec<u8> {
    [4u32.to_le_bytes(), v.to_le_bytes()].concat()
}
fn f32v(v: f32) -> Vec<u8> {
    [6u32.to_le_bytes(), v.to_le_bytes()].concat()
}
fn strv(s: &str) -> Vec<u8> {
    [8u32.to_le_bytes().to_vec(), gstr(s)].concat()
}

fn to_gguf(w: &LlamaWeights) -> Vec<u8> {
    let c = &w.config;
    let meta = vec![
        ("general.architecture", strv("llama")),
        ("llama.embedding_length", u32v(c.hidden as u32)),
        ("llama.feed_forward_length", u32v(c.ffn as u32)),
        ("llama.block_count", u32v(c.layers as u32)),
        ("llama.attention.head_count", u32v(c.heads as u32)),
        ("llama.attention.head_count_kv", u32v(c.kv_heads as u32)),
        ("llama.rope.dimension_count", u32v(c.head_dim as u32)),
        ("llama.rope.freq_base", f32v(c.rope_theta)),
        ("llama.attention.layer_norm_rms_epsilon", f32v(c.rms_eps)),
        ("llama.context_length", u32v(c.max_seq as u32)),
        ("llama.vocab_size", u32v(c.vocab as u32)),
        ("tokenizer.ggml.bos_token_id", u32v(1)),
        ("tokenizer.ggml.eos_token_id", u32v(2)),
    ];
    let (h, f) = (c.hidden, c.ffn);
    let mut t = vec![("token_embd.weight".to_string(), vec![c.vocab, h], w.embed.clone())];
    for (i, l) in w.layers.iter().enumerate() {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        t.push((n("attn_norm"), vec![h], l.attn_norm.clone()));
        t.push((n("attn_q"), vec![c.heads * c.head_dim, h], llama_cpp_permute(&l.q, c.heads, h)));
        t.push((n("attn_k"), vec![c.kv_heads * c.head_dim, h], llama_cpp_permute(&l.k, c.kv_heads, h)));
        t.push((n("attn_v"), vec![c.kv_heads * c.head_dim, h], l.v.clone()));
        t.push((n("attn_output"), vec![h, c.heads * c.head_dim], l.o.clone()));
        t.push((n("ffn_norm"), vec![h], l.ffn_norm.clone()));
        t.push((n("ffn_gate"), vec![f, h], l.gate.clone()));
        t.push((n("ffn_up"), vec![f, h], l.up.clone()));
        t.push((n("ffn_down"), vec![h, f], l.down.clone()));
    }
    t.push(("output_norm.weight".into(), vec![h], w.final_norm.clone()));
    if let Some(head) = &w.lm_head {
        t.push(("output.weight".into(), vec![c.vocab, h], head.clone()));
    }
    gguf_file(&meta, &t)
}

#[test]
fn gguf_load_unpermutes_q_and_k() {
    for tied in [true, false] {
        let w = LlamaWeights::random(&tiny(tied), 11).unwrap();
        let f = GgufFile::from_bytes(to_gguf(&w)).unwrap();
        let back = LlamaWeights::from_gguf(&f).unwrap();
        assert_eq!(back, w, "tied = {tied}");
        // The same file as a streaming checkpoint, read tensor by tensor.
        let ckpt = LlamaCheckpoint::from_gguf(GgufFile::from_bytes(to_gguf(&w)).unwrap()).unwrap();
        assert!(ckpt.gguf().is_some());
        assert_eq!(LlamaWeights::from_source(&ckpt).unwrap(), w, "tied = {tied}");
        // And GGUF -> HF safetensors -> back is lossless.
        let dir = tempfile::tempdir().unwrap();
        back.save_hf_safetensors(dir.path()).unwrap();
        assert_eq!(LlamaWeights::from_hf_dir(dir.path()).unwrap(), w);
    }
}

#[test]
fn gguf_shape_errors_name_the_tensor() {
    let w = LlamaWeights::random(&tiny(true), 11).unwrap();
    // The metadata says ffn = 41 while the file's ffn tensors keep 40 rows.
    let mut bytes = to_gguf(&w);
    // Rewrite llama.feed_forward_length = 41 in place: find its key.
    let key = gstr("llama.feed_forward_length");
    let at = bytes.windows(key.len()).position(|x| x == key).unwrap() + key.len() + 4;
    bytes[at..at + 4].copy_from_slice(&41u32.to_le_bytes());
    let err = LlamaWeights::from_gguf(&GgufFile::from_bytes(bytes).unwrap()).unwrap_err();
    assert!(matches!(err, Error::Shape { .. }) && err.to_string().contains("blk.0.ffn_gate.weight"), "{err}");
    // The metadata says 3 layers; the file has 2.
    let mut bytes = to_gguf(&w);
    let key = gstr("llama.block_count");
    let at = bytes.windows(key.len()).position(|x| x == key).unwrap() + key.len() + 4;
    bytes[at..at + 4].copy_from_slice(&3u32.to_le_bytes());
    let err = LlamaWeights::from_gguf(&GgufFile::from_bytes(bytes).unwrap()).unwrap_err();
    assert!(matches!(&err, Error::MissingTensor { name, .. } if name == "blk.2.attn_norm.weight"), "{err:?}");
}
