//! The `llama_mlp_finetune` example end to end: bad flags give one `error:` line and a
//! non-zero exit; a tiny SparseGrad run on the real assets (when `scripts/fetch-assets.sh`
//! has fetched them; `skipped: ...` otherwise) writes the CSV, PNG, adapter and merged
//! model; the merged model loads with `LlamaWeights::from_hf_dir` and differs from the base
//! only in the trained MLP weights; and the example fine-tunes that merged directory again.
//!
//! The example is built once with `cargo build --release --features recipes --example`
//! (the same profile as `scripts/run-example.sh`, so a prior build is reused) and its
//! binary run directly.

mod common;

use common::assets::{self, root, SMOLLM_GGUF as MODEL, VADER_DIR as DATA};
use common::examples::coretype;
use sparsegrad::adapter::adapter_bases;
use sparsegrad::model::weights::LlamaWeights;

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(common::examples::binary("llama_mlp_finetune"))
        .args(args)
        .current_dir(root())
        .env("OPENBLAS_CORETYPE", coretype())
        .output()
        .expect("cannot run the example")
}

fn assets() -> bool {
    assets::present(&[&root().join(MODEL), &root().join(DATA)])
}

/// Exactly one stderr line, `error: ...`, and the given exit code.
fn assert_one_error(args: &[&str], code: i32, needle: &str) {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: exit code; stderr: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one stderr line, got {lines:?}");
    assert!(lines[0].starts_with("error: ") && lines[0].contains(needle), "{args:?}: {:?} lacks {needle:?}", lines[0]);
    assert!(out.stdout.is_empty(), "{args:?}: unexpected stdout");
}

#[test]
fn bad_flags_give_one_error_line() {
    assert_one_error(&["--steps", "x"], 2, "--steps");
    assert_one_error(&["--steps", "0"], 2, "--steps");
    assert_one_error(&["--bogus"], 2, "unknown flag `--bogus`");
    assert_one_error(&["stray"], 2, "unexpected argument `stray`");
    assert_one_error(&["--method", "adam"], 2, "--method");
    assert_one_error(&["--blocks", "1,x"], 2, "--blocks");
    assert_one_error(&["--blocks", "every0"], 2, "--blocks");
    assert_one_error(&["--keep", "0"], 2, "--keep");
    assert_one_error(&["--lr", "nan"], 2, "--lr");
    assert_one_error(&["--dtype", "bf16"], 2, "--dtype");
    assert_one_error(&["--device", "tpu"], 2, "--device");
    assert_one_error(&["--formulation", "fastest"], 2, "--formulation");
    assert_one_error(&["--seq-len"], 2, "needs a value");
    assert_one_error(&["--steps", "2", "--steps", "3"], 2, "more than once");
    assert_one_error(&["--compare", "--method", "lora"], 2, "--compare");
    assert_one_error(&["--model", "/nonexistent/model.gguf"], 1, "fetch-assets");
    #[cfg(feature = "cuda")]
    if sparsegrad::Cuda::new(0).is_err() {
        assert_one_error(&["--device", "cuda"], 1, "");
    }
    let help = run(&["--help"]);
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in ["--method", "--device", "--dtype", "--blocks", "--compare", "--out", "--lora-rank", "--formulation"] {
        assert!(text.contains(flag), "--help does not mention {flag}");
    }
}

#[test]
fn bad_block_for_the_model_is_one_error_line() {
    if !assets() {
        return;
    }
    assert_one_error(&["--blocks", "30"], 1, "block 30 does not exist");
}

#[test]
fn tiny_run_writes_every_output_and_the_merged_model_loads() {
    if !assets() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let out_s = out.to_str().unwrap();
    let tiny = [
        "--steps",
        "2",
        "--batch",
        "2",
        "--seq-len",
        "8",
        "--blocks",
        "29",
        "--prelim-steps",
        "1",
        "--eval-batches",
        "1",
    ];
    let res = run(&[&tiny[..], &["--out", out_s]].concat());
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success(), "run failed:\n{stdout}\n{}", String::from_utf8_lossy(&res.stderr));
    for key in ["trainable params", "val loss", "tokens/s", "peak memory", "time"] {
        assert!(stdout.contains(key), "summary lacks {key}:\n{stdout}");
    }

    let csv = std::fs::read_to_string(out.join("loss_curve.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows[0], "step,train_loss,val_loss");
    assert_eq!(rows.len(), 1 + 3, "steps 0..=2:\n{csv}");
    assert!(rows[1].starts_with("0,,") && rows[3].split(',').all(|f| !f.is_empty()), "{csv}");
    let png = std::fs::read(out.join("loss_curve.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "loss_curve.png is not a PNG");

    let bases = adapter_bases(&out.join("adapter.safetensors")).unwrap();
    let mut groups: Vec<&str> = bases.iter().map(|b| b.group()).collect();
    groups.sort_unstable();
    assert_eq!(groups, ["down", "gate", "up"]);

    let merged = LlamaWeights::from_hf_dir(out.join("merged")).unwrap();
    let base = LlamaWeights::load_gguf(root().join(MODEL)).unwrap();
    assert_eq!(merged.config, base.config);
    assert!(merged.embed == base.embed && merged.final_norm == base.final_norm && merged.lm_head == base.lm_head);
    for (i, (m, b)) in merged.layers.iter().zip(&base.layers).enumerate() {
        let frozen = [
            (&m.attn_norm, &b.attn_norm),
            (&m.q, &b.q),
            (&m.k, &b.k),
            (&m.v, &b.v),
            (&m.o, &b.o),
            (&m.ffn_norm, &b.ffn_norm),
        ];
        assert!(frozen.iter().all(|(x, y)| x == y), "layer {i}: a frozen tensor changed");
        for (name, x, y) in [("gate", &m.gate, &b.gate), ("up", &m.up, &b.up), ("down", &m.down, &b.down)] {
            assert_eq!(x != y, i == 29, "layer {i} {name}: changed exactly when trained");
        }
    }

    // The merged directory is a model the example takes again (tokenizer.json inside).
    let again = dir.path().join("again");
    let res = run(&[
        "--model",
        out.join("merged").to_str().unwrap(),
        "--method",
        "lora",
        "--steps",
        "1",
        "--batch",
        "1",
        "--seq-len",
        "4",
        "--blocks",
        "29",
        "--eval-batches",
        "1",
        "--out",
        again.to_str().unwrap(),
    ]);
    assert!(res.status.success(), "rerun on merged/ failed:\n{}", String::from_utf8_lossy(&res.stderr));
    assert!(again.join("merged").join("model.safetensors").is_file());
}
