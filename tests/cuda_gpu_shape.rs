//! The `gpu_shape` example at a tiny configuration, for every method and dtype: it runs,
//! its ledger agrees event by event with the emulated device's independent count (the
//! example fails otherwise when `SG_EMU_PROFILE` is set), and the step holds the invariants
//! the CUDA path keeps today: no device allocation after the first step, the same device
//! calls in every measured step and at every sequence length (else the example fails), and
//! a prediction that is at least its floor; one host wait per step; the step replayed as
//! one CUDA graph; bf16 mode with every GEMM on tensor cores and f32 mode exact; and as many
//! launches per layer at any batch.

mod cuda_common;

use cuda_common::cuda_test;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Builds the example (same profile as the tests) and returns its binary; where
/// `SPARSEGRAD_GPU_SHAPE_EXE` names one (the GPU bundle, on a machine without cargo), that.
fn example() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(exe) = std::env::var_os("SPARSEGRAD_GPU_SHAPE_EXE") {
            return PathBuf::from(exe);
        }
        if let Some(dir) = std::env::var_os("SPARSEGRAD_EXAMPLES_DIR") {
            return PathBuf::from(dir).join("gpu_shape");
        }
        // Under scripts/test-cuda-emu.sh asan the test runs with ASan preloaded: cargo and
        // rustc are not built for it (rustc crashes), so they run without the preload.
        let out = Command::new(env!("CARGO"))
            .env_remove("LD_PRELOAD")
            .args(["build", "--release", "--example", "gpu_shape", "--message-format=json-render-diagnostics"])
            .current_dir(root())
            .output()
            .expect("cannot run cargo");
        assert!(out.status.success(), "cargo build failed:\n{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "gpu_shape")
            .find_map(|m| m["executable"].as_str().map(PathBuf::from))
            .expect("cargo reported no executable for the example")
    })
}

/// Runs the example with `args` (and the emulator's own count when emulated); returns its
/// JSON and stdout.
fn run(emulated: bool, args: &[&str]) -> (Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("shape.json");
    let mut cmd = Command::new(example());
    cmd.args(args).arg("--json").arg(&json);
    if emulated {
        cmd.env("SG_EMU_PROFILE", dir.path().join("emu.jsonl"));
    }
    let out = cmd.output().expect("run gpu_shape");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "gpu_shape {args:?} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    (serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap(), stdout)
}

cuda_test!(
    fn the_step_shape_of_every_method_and_dtype(cuda) {
        let emulated = cuda.is_emulated();
        for method in ["sparsegrad", "lora", "meprop", "full"] {
            for dtype in ["f32", "bf16"] {
                let args = ["--dims", "tiny", "--method", method, "--dtype", dtype, "--blocks", "0,2", "--batch", "3"];
                let (j, stdout) = run(emulated, &[&args[..], &["--seq", "16", "--steps", "3", "--layer-calls"]].concat());
                let what = format!("{method} {dtype}");
                check_layer_calls(&j, &stdout, dtype == "bf16", &what);
                if emulated {
                    assert!(j["emulator_check"]["events"].as_u64().unwrap() > 0, "{what}: no emulator check");
                    assert!(stdout.contains("emulator check: the emulated driver and cuBLAS counted the same"));
                }
                let run = &j["run"]["counts"];
                assert_eq!(run["allocations"], 0.0, "{what}: a device allocation after the first step");
                assert!(run["kernel_launches"].as_f64().unwrap() > 0.0, "{what}");
                let gemms: f64 = ["gemm_bf16", "gemm_tf32", "gemm_fp32"].iter().map(|k| run[k].as_f64().unwrap()).sum();
                assert!(gemms > 0.0, "{what}: no cuBLAS call counted");
                if dtype == "bf16" {
                    assert!(run["gemm_bf16"].as_f64().unwrap() > 0.0, "{what}: bf16 frozen operands, no bf16 GEMM");
                    // Every GEMM on tensor cores in bf16 mode, the basis products included.
                    assert_eq!(run["gemm_fp32"], 0.0, "{what}: a GEMM on FP32 cores in bf16 mode");
                } else {
                    // f32 stays exact f32 unless --tf32 is given.
                    assert_eq!(run["gemm_bf16"].as_f64().unwrap() + run["gemm_tf32"].as_f64().unwrap(), 0.0, "{what}");
                }
                // The step reads one value back (the loss, with the deferred error flags).
                assert_eq!(run["host_syncs"], 1.0, "{what}: host waits per step");
                assert_eq!(j["target"]["counts"]["host_syncs"], 1.0, "{what}: host waits per step at the target");
                // Replayed as one CUDA graph: outside it only the loss's reduction and its read.
                let g = &j["graph"];
                assert_eq!(g["ok"], true, "{what}: the step is not one CUDA graph: {g}");
                assert_eq!((g["graph_launches"].as_f64(), g["host_syncs"].as_f64()), (Some(1.0), Some(1.0)), "{what}");
                assert_eq!(j["launch_mode"], "graph", "{what}");
                assert!(stdout.contains("CUDA graph (emulated") || !emulated, "{what}");
                // The tiny slice is run whole (blocks 0 and 2 of 4 layers cover every kind):
                // the 4-layer target differs only by its longer sequence.
                assert_eq!(j["run"]["layers"], 3, "{what}");
                for p in j["predicted"].as_array().unwrap() {
                    let (total, floor) = (p["total_s"].as_f64().unwrap(), p["floor_s"].as_f64().unwrap());
                    assert!(floor > 0.0 && total >= floor, "{what}: predicted {total} s below its floor {floor} s");
                }
                for line in ["predicted time per step", "total / floor (predicted)", "target (scaled)"] {
                    assert!(stdout.contains(line), "{what}: no `{line}` in\n{stdout}");
                }
            }
        }
    }
);

/// `--layer-calls` lists the busiest layer's calls, and they add up to its count; in bf16
/// every layer input and output gradient is checked in the pass that rounds it, so no
/// finiteness check runs as a launch of its own.
fn check_layer_calls(j: &Value, stdout: &str, bf16: bool, what: &str) {
    let listing: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("calls of layer"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .collect();
    let total: u64 = listing
        .iter()
        .map(|l| l.trim().split(" x ").next().unwrap().trim().parse::<u64>().unwrap_or_else(|_| panic!("{what}: {l}")))
        .sum();
    assert_eq!(Some(total), j["run"]["counts"]["max_launches_per_layer"].as_u64(), "{what}: {listing:#?}");
    if bf16 {
        assert!(listing.iter().all(|l| !l.contains("flag_nonfinite")), "{what}: {listing:#?}");
        assert!(listing.iter().any(|l| l.contains("cast_f32_to_bf16_checked")), "{what}: {listing:#?}");
    }
    assert!(stdout.contains("device time of the target step by kernel"), "{what}");
}

cuda_test!(
    fn launches_per_layer_do_not_grow_with_the_batch(cuda) {
        // The attention is fused and the top-k reads nothing back, so a layer's launches and
        // cuBLAS calls are the same at any batch (they grew with batch x KV heads before).
        // SparseGrad's formulation is pinned (priced from the token count, it is part of the
        // configuration); within the merged one the backward's order of products changes
        // with the token count (4 to 8 and 128 to 256 tokens here: token order, then dW
        // first), and both orders make the same calls.
        let emulated = cuda.is_emulated();
        let runs = [("sparsegrad", "merged"), ("sparsegrad", "transformed"), ("full", "auto")];
        for ((method, formulation), dtype) in runs.into_iter().flat_map(|r| [(r, "bf16"), (r, "f32")]) {
            let per_layer: Vec<f64> = ["2", "64"]
                .iter()
                .map(|b| {
                    let args = ["--dims", "tiny", "--method", method, "--dtype", dtype, "--blocks", "0,2", "--batch", b];
                    let more = ["--seq", "16", "--steps", "2", "--formulation", formulation];
                    let (j, _) = run(emulated, &[&args[..], &more].concat());
                    j["run"]["counts"]["max_launches_per_layer"].as_f64().unwrap()
                })
                .collect();
            let what = format!("{method} {formulation} {dtype}");
            assert_eq!(per_layer[0], per_layer[1], "{what}: launches + cuBLAS calls per layer at batch 2 and 64");
        }
    }
);

cuda_test!(
    fn bad_flags_are_one_error_line(cuda) {
        let _ = cuda;
        let out = Command::new(example()).args(["--dims", "gpt-9"]).output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("error:") && err.contains("gpt-9"), "{err}");
        let out = Command::new(example()).args(["--steps", "1"]).output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("--steps"));
    }
);
