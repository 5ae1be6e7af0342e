//! `examples/llama_mlp_finetune` on the hostile inputs of issue 10, one check per recipe:
//! absurd sizes (bounded by the model and the corpus before anything is allocated),
//! corrupt, ambiguous and NaN-holding model files, FIFOs, a bad `--out` (refused before
//! the model loads), wrong tokenizers and data paths, divergence. Every failure is one
//! `error:` line and a non-zero exit. Needs the real model and corpus (`assets/`).

mod common;

use common::assets::{self, root, SMOLLM_GGUF as MODEL, VADER_DIR as DATA};
use sparsegrad::io::SafetensorsWriter;
use sparsegrad::model::config::LlamaConfig;
use sparsegrad::model::weights::LlamaWeights;
use std::path::Path;
use std::process::{Command, Output};

fn assets() -> bool {
    assets::present(&[&root().join(MODEL), &root().join(DATA)])
}

/// `Q` of the issue: one quick step on block 29, with `--out` in `out`.
fn quick(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--steps",
        "1",
        "--prelim-steps",
        "1",
        "--eval-batches",
        "1",
        "--eval-every",
        "0",
        "--blocks",
        "29",
        "--batch",
        "2",
        "--seq-len",
        "8",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // A flag given in `extra` replaces the quick default.
    for pair in extra.chunks(2) {
        if let Some(i) = a.iter().position(|x| x == pair[0]) {
            a.drain(i..i + 2);
        }
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a.extend(["--out".to_string(), out.display().to_string()]);
    a
}

fn run(args: &[String]) -> Output {
    Command::new(common::examples::binary("llama_mlp_finetune"))
        .args(args)
        .current_dir(root())
        .env("OPENBLAS_CORETYPE", "Haswell")
        .output()
        .expect("cannot run the example")
}

/// A failure: exit 1 or 2, the last stderr line the only `error:` line, holding every
/// needle, no control character in it, and `out` not left behind.
fn fails(args: &[String], needles: &[&str], out: &Path) {
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(matches!(o.status.code(), Some(1 | 2)), "{args:?}: exit {:?}; stderr {err}", o.status);
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{args:?}: one error line expected: {err}");
    let last = err.lines().last().unwrap_or("");
    assert!(last.starts_with("error: "), "{args:?}: the error must be the last line: {err}");
    assert!(!last.chars().any(char::is_control), "{args:?}: control characters in {last:?}");
    for n in needles {
        assert!(last.contains(n), "{args:?}: {last:?} lacks {n:?}");
    }
    assert!(!out.exists() || out.is_file(), "{args:?}: a failed run left {} behind", out.display());
}

fn tiny_config(vocab: usize) -> LlamaConfig {
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

// ---------------------------------------------------------------- a hand-built GGUF

fn gstr(s: &[u8]) -> Vec<u8> {
    [(s.len() as u64).to_le_bytes().to_vec(), s.to_vec()].concat()
}
fn kv_u32(k: &[u8], v: u32) -> Vec<u8> {
    [gstr(k), 4u32.to_le_bytes().to_vec(), v.to_le_bytes().to_vec()].concat()
}
fn kv_f32(k: &str, v: f32) -> Vec<u8> {
    [gstr(k.as_bytes()), 6u32.to_le_bytes().to_vec(), v.to_le_bytes().to_vec()].concat()
}
fn kv_str(k: &str, v: &str) -> Vec<u8> {
    [gstr(k.as_bytes()), 8u32.to_le_bytes().to_vec(), gstr(v.as_bytes())].concat()
}

/// A GGUF of tiny random weights with F32 tensors; `edit` may change the metadata list
/// and the tensor table (name, row-major shape, data, data offset) before writing.
fn tiny_gguf(path: &Path, edit: impl FnOnce(&mut Vec<Vec<u8>>, &mut Vec<(String, Vec<usize>, Vec<f32>, usize)>)) {
    let w = LlamaWeights::random(&tiny_config(5), 1).unwrap();
    let c = &w.config;
    let mut meta = vec![
        kv_str("general.architecture", "llama"),
        kv_u32(b"llama.embedding_length", c.hidden as u32),
        kv_u32(b"llama.feed_forward_length", c.ffn as u32),
        kv_u32(b"llama.block_count", c.layers as u32),
        kv_u32(b"llama.attention.head_count", c.heads as u32),
        kv_u32(b"llama.attention.head_count_kv", c.kv_heads as u32),
        kv_f32("llama.attention.layer_norm_rms_epsilon", c.rms_eps),
        kv_u32(b"llama.context_length", c.max_seq as u32),
        kv_u32(b"llama.vocab_size", c.vocab as u32),
    ];
    let (h, f) = (c.hidden, c.ffn);
    let mut t = vec![("token_embd.weight".to_string(), vec![c.vocab, h], w.embed.clone())];
    for (i, l) in w.layers.iter().enumerate() {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        t.push((n("attn_norm"), vec![h], l.attn_norm.clone()));
        t.push((n("attn_q"), vec![c.q_dim(), h], l.q.clone()));
        t.push((n("attn_k"), vec![c.kv_dim(), h], l.k.clone()));
        t.push((n("attn_v"), vec![c.kv_dim(), h], l.v.clone()));
        t.push((n("attn_output"), vec![h, c.q_dim()], l.o.clone()));
        t.push((n("ffn_norm"), vec![h], l.ffn_norm.clone()));
        t.push((n("ffn_gate"), vec![f, h], l.gate.clone()));
        t.push((n("ffn_up"), vec![f, h], l.up.clone()));
        t.push((n("ffn_down"), vec![h, f], l.down.clone()));
    }
    t.push(("output_norm.weight".into(), vec![h], w.final_norm.clone()));
    let mut off = 0usize;
    let mut t: Vec<(String, Vec<usize>, Vec<f32>, usize)> = t
        .into_iter()
        .map(|(n, s, d)| {
            let at = off;
            off = (off + d.len() * 4).next_multiple_of(32);
            (n, s, d, at)
        })
        .collect();
    edit(&mut meta, &mut t);
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(t.len() as u64).to_le_bytes());
    b.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    meta.iter().for_each(|kv| b.extend_from_slice(kv));
    for (name, shape, _, at) in &t {
        b.extend(gstr(name.as_bytes()));
        b.extend_from_slice(&(shape.len() as u32).to_le_bytes());
        shape.iter().rev().for_each(|&d| b.extend_from_slice(&(d as u64).to_le_bytes()));
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&(*at as u64).to_le_bytes());
    }
    let start = b.len().next_multiple_of(32);
    for (_, _, data, at) in &t {
        b.resize(b.len().max(start + at), 0);
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        let s = start + at;
        if b.len() < s + bytes.len() {
            b.resize(s + bytes.len(), 0);
        }
        b[s..s + bytes.len()].copy_from_slice(&bytes);
    }
    std::fs::write(path, b).unwrap();
}

// ---------------------------------------------------------------- the recipes

#[test]
fn absurd_sizes_are_bounded_before_anything_is_allocated() {
    if !assets() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    for (flag, value, needles) in [
        ("--steps", "100000000000000000", vec!["--steps", "10000000"]),
        ("--steps", "1000000000000000000", vec!["--steps", "10000000"]),
        ("--seq-len", "100000", vec!["--seq-len", "context length of 8192"]),
        ("--batch", "1000000000000", vec!["--batch", "training sentences"]),
        ("--batch", "4611686018427387904", vec!["--batch", "training sentences"]),
    ] {
        fails(&quick(&out, &[flag, value]), &needles, &out);
    }
    fails(&quick(&out, &["--batch", "8", "--seq-len", "2305843009213693952"]), &["--seq-len", "context"], &out);
    for rank in ["10000000000", "100000"] {
        fails(&quick(&out, &["--method", "lora", "--lora-rank", rank]), &["--lora-rank", rank, "576"], &out);
    }
}

#[test]
fn corrupt_ambiguous_and_nan_models_name_the_key_or_tensor() {
    if !assets() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out");
    let model = |name: &str| d.join(name).display().to_string();
    // block_count 0xffffffff: Vec::with_capacity asked for 928 GB.
    tiny_gguf(&d.join("layers.gguf"), |m, _| m[3] = kv_u32(b"llama.block_count", u32::MAX));
    fails(&quick(&out, &["--model", &model("layers.gguf")]), &["blk.2.", "4294967295 blocks"], &out);
    // Two tensors over the same bytes trained on the wrong weights.
    tiny_gguf(&d.join("overlap.gguf"), |_, t| t[2].3 = t[1].3);
    fails(&quick(&out, &["--model", &model("overlap.gguf")]), &["overlaps", "blk.0.attn_q.weight"], &out);
    // NaN in a weight: found at load, named, not mid-training on `grad_y`.
    tiny_gguf(&d.join("nan.gguf"), |_, t| t[8].2[3] = f32::NAN);
    fails(&quick(&out, &["--model", &model("nan.gguf")]), &["non-finite", "blk.0.ffn_up.weight"], &out);
    // A corrupt key with NUL and CR bytes printed raw over many lines.
    tiny_gguf(&d.join("key.gguf"), |m, _| {
        m.push(kv_u32(b"bad\0key\r\nline2", 1));
        m.push(kv_u32(b"bad\0key\r\nline2", 2));
    });
    fails(&quick(&out, &["--model", &model("key.gguf")]), &["appears twice", "\\r\\n"], &out);
    // The same tensor in two Hugging Face shards (first wins, silently, before).
    let hf = d.join("hf");
    LlamaWeights::random(&tiny_config(49152), 2).unwrap().save_hf_safetensors(&hf).unwrap();
    std::fs::rename(hf.join("model.safetensors"), hf.join("model-00001-of-00002.safetensors")).unwrap();
    let mut w = SafetensorsWriter::new();
    w.add_f32("model.norm.weight", &[8], vec![1.0; 8]).unwrap();
    w.write(&hf.join("model-00002-of-00002.safetensors")).unwrap();
    let hf_s = hf.display().to_string();
    let tok = root().join(MODEL).display().to_string();
    fails(&quick(&out, &["--model", &hf_s, "--tokenizer", &tok]), &["`model.norm.weight`", "appears in both"], &out);
    // A FIFO as the model: an error at once, not a hang.
    let fifo = d.join("model.gguf");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    fails(&quick(&out, &["--model", &fifo.display().to_string()]), &["FIFO"], &out);
}

#[test]
fn out_is_checked_before_the_model_loads() {
    if !assets() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    // The model path does not exist: an --out error proves --out was checked first.
    let missing = dir.path().join("no-model.gguf").display().to_string();
    let f = file.display().to_string();
    fails(&quick(&file, &["--model", &missing]), &["--out", "not a directory"], &dir.path().join("none"));
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
    fails(
        &quick(Path::new("/proc/x"), &["--model", &missing]),
        &["--out", "/proc/x", "cannot create"],
        Path::new("/x"),
    );
    // A failed run does not leave the --out directory it created.
    let created = dir.path().join("fresh");
    fails(&quick(&created, &["--model", &missing]), &["no-model.gguf"], &created);
    assert!(!created.exists(), "an empty --out directory was left behind");
    let _ = f;
}

#[test]
fn tokenizer_data_and_divergence_messages() {
    if !assets() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out");
    let p = |n: &str| d.join(n).display().to_string();
    fails(&quick(&out, &["--tokenizer", &p("x.json")]), &["--tokenizer", "x.json", "not found"], &out);
    std::fs::create_dir(d.join("tokdir")).unwrap();
    fails(&quick(&out, &["--tokenizer", &p("tokdir")]), &["--tokenizer", "is a directory"], &out);
    std::fs::write(d.join("vocab.txt"), "hello\nworld\n").unwrap();
    fails(&quick(&out, &["--tokenizer", &p("vocab.txt")]), &["neither a GGUF file nor a tokenizer.json"], &out);
    let hf = d.join("hf");
    LlamaWeights::random(&tiny_config(49152), 2).unwrap().save_hf_safetensors(&hf).unwrap();
    std::fs::create_dir(hf.join("tokenizer.json")).unwrap();
    fails(&quick(&out, &["--model", &hf.display().to_string()]), &["tokenizer.json", "not a regular file"], &out);
    std::fs::write(d.join("data.txt"), "1\t0.5\ta sentence\n").unwrap();
    fails(&quick(&out, &["--data", &p("data.txt")]), &["--data", "not a directory"], &out);
    fails(&quick(&out, &["--lr", "1e39"]), &["--lr", "`1e39`", "inf"], &out);
    fails(&quick(&out, &["--lr", "1e30"]), &["training diverged at step 1"], &out);
    // 2^62 evaluation batches used to wrap to "no validation sentences".
    let o = run(&quick(&out, &["--eval-batches", "4611686018427387904", "--validation-fraction", "0.0005"]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn outputs_never_replace_special_files() {
    if !assets() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let precious = dir.path().join("precious");
    std::fs::write(&precious, b"keep").unwrap();
    // plotters wrote the PNG in place, through the link.
    std::os::unix::fs::symlink(&precious, out.join("loss_curve.png")).unwrap();
    let none = dir.path().join("none");
    fails(&quick(&out, &[]), &["refusing to replace", "symbolic link", "loss_curve.png"], &none);
    assert_eq!(std::fs::read(&precious).unwrap(), b"keep");
    assert!(std::fs::symlink_metadata(out.join("loss_curve.png")).unwrap().file_type().is_symlink());
}
