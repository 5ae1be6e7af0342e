//! `llama_mlp_finetune --plan`: the memory plan printed from a configuration alone (named
//! dimensions, or an HF config.json with no weights beside it), equal to the library's plan
//! of the same run, nothing written; `--projections` and `--dims` checked like every flag.
//! The refusal of a CUDA run that does not fit is in tests/cuda_memory_plan.rs (it needs a
//! device).

mod common;

use sparsegrad::perf::llama::named_config;
use sparsegrad::perf::roofline::H100_SXM;
use sparsegrad::plan::{MemoryPlan, PlanSetup};
use sparsegrad::recipes::finetune::{FinetuneConfig, MethodKind};
use sparsegrad::{MlpPlan, Precision};
use std::process::Output;

fn run(dir: &std::path::Path, args: &[&str]) -> Output {
    std::process::Command::new(common::examples::binary("llama_mlp_finetune"))
        .args(args)
        .current_dir(dir)
        .env("OPENBLAS_CORETYPE", common::examples::coretype())
        .output()
        .expect("cannot run the example")
}

/// The `total` line of a printed plan, in GB.
fn total_gb(stdout: &str) -> f64 {
    let line = stdout.lines().find(|l| l.trim_start().starts_with("total")).expect("a total line");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn the_paper_setting_is_printed_from_named_dims_and_equals_the_library_plan() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--plan",
        "--device",
        "cuda",
        "--dtype",
        "bf16",
        "--dims",
        "llama2-7b",
        "--blocks",
        "every3",
        "--projections",
        "up,down",
        "--batch",
        "32",
        "--seq-len",
        "128",
    ];
    let o = run(dir.path(), &args);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    for line in [
        "frozen weights",
        "trained weights",
        "optimizer state",
        "bases",
        "activations saved for backward",
        "per-layer workspaces",
        "shared workspaces",
        "logits and head",
        "largest batch of 128 tokens with these projections: 48 GB (A40)",
        "largest batch of 128 tokens with gate, up and down",
        "(up,down)",
    ] {
        assert!(out.contains(line), "no `{line}` in\n{out}");
    }
    // The same run planned by the library.
    let c = named_config("llama2-7b").unwrap();
    let blocks: Vec<usize> = (2..32).step_by(3).collect();
    let cfg = FinetuneConfig {
        method: MethodKind::SparseGrad,
        blocks: blocks.clone(),
        projections: [false, true, true],
        batch: 32,
        seq_len: 128,
        lr: 1e-3,
        precision: Precision::Bf16,
        ..Default::default()
    };
    let methods = cfg.plan_methods(&c).unwrap();
    let setup = PlanSetup {
        config: c,
        plan: MlpPlan { layers: blocks, methods },
        options: cfg.train_options(),
        batch: 32,
        seq: 128,
        max_positions: 128,
        device: H100_SXM,
        tf32: false,
    };
    let plan = MemoryPlan::llama(&setup).unwrap();
    let printed = total_gb(&out);
    assert!((printed - plan.total() as f64 / 1e9).abs() < 0.0006, "printed {printed} GB, plan {}", plan.total());
    // Nothing written: no output folder.
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "--plan wrote into the working folder");
}

#[test]
fn a_config_json_without_weights_is_enough_and_projections_change_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    let c = named_config("smollm2-135m").unwrap();
    std::fs::write(model.join("config.json"), c.to_hf_config_json().to_string()).unwrap();
    let m = model.display().to_string();
    let plan = |proj: &str| {
        let o = run(dir.path(), &["--plan", "--model", &m, "--blocks", "every3", "--projections", proj]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        total_gb(&String::from_utf8_lossy(&o.stdout))
    };
    let (all, up_down) = (plan("gate,up,down"), plan("up,down"));
    assert!(all > up_down, "training gate too must need more: {all} vs {up_down} GB");
}

#[test]
fn bad_plan_flags_are_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    for (args, needle) in [
        (
            vec!["--plan", "--dims", "llama2-7b", "--projections", "up,sideways"],
            "`sideways` is not one of gate, up, down",
        ),
        (vec!["--plan", "--dims", "llama2-7b", "--projections", "up,up"], "listed twice"),
        (vec!["--dims", "llama2-7b"], "--plan only"),
        (vec!["--plan", "--dims", "llama-9000"], "is not one of"),
        (vec!["--plan", "--dims", "llama2-7b", "--seq-len", "100000"], "context length"),
        (vec!["--plan", "--dims", "llama2-7b", "--model", "x.gguf"], "either --dims or --model"),
    ] {
        let o = run(dir.path(), &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        let last = err.lines().last().unwrap_or("");
        assert!(last.starts_with("error: ") && last.contains(needle), "{args:?}: {err}");
    }
}
