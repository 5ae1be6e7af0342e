//! Seed inputs, built here from small random models (so the fuzzer needs no download)
//! and, where `assets/` holds them, cut from the real model: safetensors files (F32, I64,
//! F16, BF16, metadata), tiny LLaMA GGUF files with a tokenizer, Hugging Face directories
//! (single file and sharded), adapters, basis files, `sparsegrad step` and `basis` inputs.

use crate::mutate::Rng;
use sparsegrad::adapter::{save_adapter, AdapterEntry};
use sparsegrad::io::SafetensorsWriter;
use sparsegrad::linear::trainable::{Method, TrainOptions};
use sparsegrad::mlp::{BertMlp, BertMlpConfig, MlpShape, ProjectionSpec};
use sparsegrad::model::config::LlamaConfig;
use sparsegrad::model::weights::LlamaWeights;
use sparsegrad::{Backend, Basis, BasisSet, Cpu, GeluKind, GramAccumulator, Keep, Selection};
use std::path::Path;

pub fn randn(r: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| ((r.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale).collect()
}

pub fn tiny_config(vocab: usize) -> LlamaConfig {
    LlamaConfig {
        hidden: 8,
        ffn: 16,
        layers: 2,
        heads: 2,
        kv_heads: 1,
        head_dim: 4,
        rope_theta: 10000.0,
        rope_scaling: None,
        rms_eps: 1e-5,
        vocab,
        tied_embeddings: true,
        max_seq: 64,
        bos: Some(0),
        eos: Some(1),
    }
}

/// A basis of `group` from a few random gradients.
pub fn basis(r: &mut Rng, group: &str, out: usize, inp: usize) -> Basis {
    let mut acc = GramAccumulator::new(out, inp);
    acc.add_batch(&randn(r, 3 * out * inp, 1.0), 3).expect("gradients");
    acc.basis(group).expect("basis")
}

pub fn safetensors_seeds(dir: &Path, r: &mut Rng) -> Vec<Vec<u8>> {
    let mut w = SafetensorsWriter::new();
    w.add_f32("weight", &[3, 4], randn(r, 12, 1.0)).unwrap();
    w.add_f32("bias", &[3], randn(r, 3, 1.0)).unwrap();
    w.add_i64("indices", &[2, 2], vec![0, 1, 2, 3]).unwrap();
    w.set_metadata("steps", "3");
    w.set_metadata("lr", "0.01");
    let p = dir.join("seed-a.safetensors");
    w.write(&p).unwrap();
    let a = std::fs::read(&p).unwrap();
    // F16 and BF16 tensors, written by the safetensors crate itself.
    let h: Vec<u8> = (0..6).flat_map(|i| half::f16::from_f32(i as f32 * 0.5).to_le_bytes()).collect();
    let bf: Vec<u8> = (0..4).flat_map(|i| half::bf16::from_f32(i as f32 - 1.0).to_le_bytes()).collect();
    let views = vec![
        ("half".to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![2, 3], &h).unwrap()),
        ("brain".to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![4], &bf).unwrap()),
    ];
    let b = safetensors::serialize(views, None).unwrap();
    vec![a, b]
}

fn gstr(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

fn kv_u32(k: &str, v: u32) -> Vec<u8> {
    [gstr(k), 4u32.to_le_bytes().to_vec(), v.to_le_bytes().to_vec()].concat()
}
fn kv_f32(k: &str, v: f32) -> Vec<u8> {
    [gstr(k), 6u32.to_le_bytes().to_vec(), v.to_le_bytes().to_vec()].concat()
}
fn kv_str(k: &str, v: &str) -> Vec<u8> {
    [gstr(k), 8u32.to_le_bytes().to_vec(), gstr(v)].concat()
}
fn kv_strs(k: &str, v: &[&str]) -> Vec<u8> {
    let mut b = [gstr(k), 9u32.to_le_bytes().to_vec(), 8u32.to_le_bytes().to_vec()].concat();
    b.extend_from_slice(&(v.len() as u64).to_le_bytes());
    v.iter().for_each(|s| b.extend(gstr(s)));
    b
}
fn kv_i32s(k: &str, v: &[i32]) -> Vec<u8> {
    let mut b = [gstr(k), 9u32.to_le_bytes().to_vec(), 5u32.to_le_bytes().to_vec()].concat();
    b.extend_from_slice(&(v.len() as u64).to_le_bytes());
    v.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
    b
}

/// A GGUF v3 llama file of `w` (F32 tensors) with a five-token BPE tokenizer.
pub fn gguf_of(w: &LlamaWeights) -> Vec<u8> {
    let c = &w.config;
    let meta = vec![
        kv_str("general.architecture", "llama"),
        kv_u32("llama.embedding_length", c.hidden as u32),
        kv_u32("llama.feed_forward_length", c.ffn as u32),
        kv_u32("llama.block_count", c.layers as u32),
        kv_u32("llama.attention.head_count", c.heads as u32),
        kv_u32("llama.attention.head_count_kv", c.kv_heads as u32),
        kv_u32("llama.rope.dimension_count", c.head_dim as u32),
        kv_f32("llama.rope.freq_base", c.rope_theta),
        kv_f32("llama.attention.layer_norm_rms_epsilon", c.rms_eps),
        kv_u32("llama.context_length", c.max_seq as u32),
        kv_u32("llama.vocab_size", c.vocab as u32),
        kv_str("tokenizer.ggml.model", "gpt2"),
        kv_str("tokenizer.ggml.pre", "smollm"),
        kv_strs("tokenizer.ggml.tokens", &["<s>", "</s>", "a", "b", "ab"]),
        kv_strs("tokenizer.ggml.merges", &["a b"]),
        kv_i32s("tokenizer.ggml.token_type", &[3, 3, 1, 1, 1]),
        kv_u32("tokenizer.ggml.bos_token_id", 0),
        kv_u32("tokenizer.ggml.eos_token_id", 1),
    ];
    let (h, f) = (c.hidden, c.ffn);
    let mut t: Vec<(String, Vec<usize>, &[f32])> = vec![("token_embd.weight".into(), vec![c.vocab, h], &w.embed)];
    for (i, l) in w.layers.iter().enumerate() {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        t.push((n("attn_norm"), vec![h], &l.attn_norm));
        t.push((n("attn_q"), vec![c.heads * c.head_dim, h], &l.q));
        t.push((n("attn_k"), vec![c.kv_heads * c.head_dim, h], &l.k));
        t.push((n("attn_v"), vec![c.kv_heads * c.head_dim, h], &l.v));
        t.push((n("attn_output"), vec![h, c.heads * c.head_dim], &l.o));
        t.push((n("ffn_norm"), vec![h], &l.ffn_norm));
        t.push((n("ffn_gate"), vec![f, h], &l.gate));
        t.push((n("ffn_up"), vec![f, h], &l.up));
        t.push((n("ffn_down"), vec![h, f], &l.down));
    }
    t.push(("output_norm.weight".into(), vec![h], &w.final_norm));
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(t.len() as u64).to_le_bytes());
    b.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    meta.iter().for_each(|kv| b.extend_from_slice(kv));
    let mut off = 0usize;
    for (name, shape, data) in &t {
        b.extend(gstr(name));
        b.extend_from_slice(&(shape.len() as u32).to_le_bytes());
        shape.iter().rev().for_each(|&d| b.extend_from_slice(&(d as u64).to_le_bytes()));
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&(off as u64).to_le_bytes());
        off = (off + data.len() * 4).next_multiple_of(32);
    }
    let start = b.len().next_multiple_of(32);
    let mut off = 0usize;
    for (_, _, data) in &t {
        b.resize(start + off, 0);
        data.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
        off = (off + data.len() * 4).next_multiple_of(32);
    }
    b
}

/// The tiny GGUF, and the real model's header plus its first 64 kB of tensor data.
pub fn gguf_seeds(real: Option<&Path>) -> Vec<Vec<u8>> {
    let w = LlamaWeights::random(&tiny_config(5), 3).unwrap();
    let mut seeds = vec![gguf_of(&w)];
    if let Some(p) = real {
        if let Ok(f) = sparsegrad::io::gguf::GgufFile::open(p) {
            let end = f.data_offset() + (64 << 10);
            if let Ok(bytes) = std::fs::read(p) {
                seeds.push(bytes[..end.min(bytes.len())].to_vec());
            }
        }
    }
    seeds
}

/// HF directories as (file name, bytes) lists: one `model.safetensors`, and two shards
/// with an index.
pub fn hf_seeds(dir: &Path) -> Vec<Vec<(String, Vec<u8>)>> {
    let w = LlamaWeights::random(&tiny_config(32), 4).unwrap();
    let d = dir.join("hf-seed");
    w.save_hf_safetensors(&d).unwrap();
    let read = |n: &str| std::fs::read(d.join(n)).unwrap();
    let single =
        vec![("config.json".to_string(), read("config.json")), ("model.safetensors".into(), read("model.safetensors"))];
    // Shards: layer 0 and the embeddings in one file, the rest in the other.
    let st = sparsegrad::io::SafetensorsFile::open(d.join("model.safetensors")).unwrap();
    let (mut a, mut b) = (SafetensorsWriter::new(), SafetensorsWriter::new());
    let mut map = serde_json::Map::new();
    for name in st.names() {
        let (v, shape) = st.tensor_f32(&name).unwrap();
        let first = name.contains("layers.0.") || name.contains("embed");
        let (wr, file) = if first {
            (&mut a, "model-00001-of-00002.safetensors")
        } else {
            (&mut b, "model-00002-of-00002.safetensors")
        };
        wr.add_f32(&name, &shape, v).unwrap();
        map.insert(name, serde_json::Value::String(file.into()));
    }
    a.write(&d.join("s1")).unwrap();
    b.write(&d.join("s2")).unwrap();
    let index = serde_json::json!({ "metadata": {}, "weight_map": map }).to_string().into_bytes();
    let sharded = vec![
        ("config.json".to_string(), read("config.json")),
        ("model.safetensors.index.json".into(), index),
        ("model-00001-of-00002.safetensors".into(), read("s1")),
        ("model-00002-of-00002.safetensors".into(), read("s2")),
    ];
    vec![single, sharded]
}

pub const HIDDEN: usize = 6;
pub const FFN: usize = 10;

/// The base weights, bases and methods the adapter seeds were trained from.
pub struct AdapterFixture {
    pub w_in: Vec<f32>,
    pub b_in: Vec<f32>,
    pub w_out: Vec<f32>,
    pub b_out: Vec<f32>,
    pub basis_in: Basis,
    pub basis_out: Basis,
}

pub fn adapter_methods() -> [Method; 3] {
    [
        Method::SparseGrad { keep: Keep::Fraction(0.1), selection: Selection::Exact, formulation: None },
        Method::Lora { rank: 2, alpha: 4.0 },
        Method::MeProp { keep: Keep::Fraction(0.1) },
    ]
}

pub fn block(cpu: &Cpu, fx: &AdapterFixture, method: Method) -> BertMlp<Cpu> {
    let spec_in =
        ProjectionSpec { weight: &fx.w_in, bias: Some(&fx.b_in), method, group: "dense_in", basis: Some(&fx.basis_in) };
    let spec_out = ProjectionSpec {
        weight: &fx.w_out,
        bias: Some(&fx.b_out),
        method,
        group: "dense_out",
        basis: Some(&fx.basis_out),
    };
    BertMlp::new(
        cpu,
        MlpShape { hidden: HIDDEN, ffn: FFN },
        [spec_in, spec_out],
        BertMlpConfig { gelu: GeluKind::Erf, options: TrainOptions::default() },
    )
    .unwrap()
}

/// One adapter per method, each after two training steps.
pub fn adapter_seeds(dir: &Path, r: &mut Rng) -> (AdapterFixture, Vec<Vec<u8>>) {
    let fx = AdapterFixture {
        w_in: randn(r, FFN * HIDDEN, 0.3),
        b_in: randn(r, FFN, 0.1),
        w_out: randn(r, HIDDEN * FFN, 0.3),
        b_out: randn(r, HIDDEN, 0.1),
        basis_in: basis(r, "dense_in", FFN, HIDDEN),
        basis_out: basis(r, "dense_out", HIDDEN, FFN),
    };
    let cpu = Cpu::new();
    let t = 4;
    let mut seeds = Vec::new();
    for (k, m) in adapter_methods().into_iter().enumerate() {
        let mut b = block(&cpu, &fx, m);
        for _ in 0..2 {
            let x = cpu.upload(&randn(r, t * HIDDEN, 1.0)).unwrap();
            let mut y = cpu.alloc::<f32>(t * HIDDEN).unwrap();
            b.forward(&x, t, &mut y).unwrap();
            let g = cpu.upload(&randn(r, t * HIDDEN, 0.1)).unwrap();
            b.backward(&g, t, None).unwrap();
            b.step().unwrap();
        }
        let entries = [
            AdapterEntry {
                name: "dense_in",
                linear: &b.dense_in.linear,
                base_weight: &fx.w_in,
                basis: Some(&fx.basis_in),
            },
            AdapterEntry {
                name: "dense_out",
                linear: &b.dense_out.linear,
                base_weight: &fx.w_out,
                basis: Some(&fx.basis_out),
            },
        ];
        let p = dir.join(format!("adapter-seed-{k}.safetensors"));
        save_adapter(&p, &entries).unwrap();
        seeds.push(std::fs::read(&p).unwrap());
    }
    (fx, seeds)
}

pub fn basis_seeds(dir: &Path, r: &mut Rng) -> Vec<Vec<u8>> {
    let mut set = BasisSet::new();
    set.insert(basis(r, "up", 5, 3));
    set.insert(basis(r, "down", 3, 5));
    let p = dir.join("basis-seed.safetensors");
    set.save(&p).unwrap();
    vec![std::fs::read(&p).unwrap()]
}

/// A valid `sparsegrad step` input: out 4, in 3, T 5, with a bias.
pub fn step_seed(dir: &Path, r: &mut Rng) -> Vec<u8> {
    let (out, inp, t) = (4, 3, 5);
    let (p, q) = (basis(r, "P", out, inp), basis(r, "Q", inp, out));
    let mut w = SafetensorsWriter::new();
    w.add_f32("weight", &[out, inp], randn(r, out * inp, 1.0)).unwrap();
    w.add_f32("bias", &[out], randn(r, out, 1.0)).unwrap();
    w.add_f32("P", &[out, out], p.p().to_vec()).unwrap();
    w.add_f32("Q", &[inp, inp], q.p().to_vec()).unwrap();
    w.add_f32("x", &[t, inp], randn(r, t * inp, 1.0)).unwrap();
    w.add_f32("grad_y", &[t, out], randn(r, t * out, 1.0)).unwrap();
    for (k, v) in [
        ("keep", "3"),
        ("selection", "exact"),
        ("lr", "0.01"),
        ("beta1", "0.9"),
        ("beta2", "0.999"),
        ("eps", "1e-8"),
        ("steps", "2"),
    ] {
        w.set_metadata(k, v);
    }
    let path = dir.join("step-seed.safetensors");
    w.write(&path).unwrap();
    std::fs::read(&path).unwrap()
}

/// A `sparsegrad basis` input: stacks of two groups.
pub fn grads_seed(dir: &Path, r: &mut Rng) -> Vec<u8> {
    let mut w = SafetensorsWriter::new();
    w.add_f32("up", &[2, 5, 3], randn(r, 30, 1.0)).unwrap();
    w.add_f32("down", &[3, 3, 5], randn(r, 45, 1.0)).unwrap();
    let path = dir.join("grads-seed.safetensors");
    w.write(&path).unwrap();
    std::fs::read(&path).unwrap()
}
