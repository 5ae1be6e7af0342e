//! scripts/gpu-report.py (the report step of the GPU run, README "Running on a GPU"): a
//! complete rehearsal output becomes a section whose every figure is marked emulated; an
//! output that lost a part, or a file, is rejected with a `missing:` line naming it.

use std::fs;
use std::path::Path;
use std::process::Command;

const SUMMARY: &str = "gpu-run: mode=rehearse
info date: 2026-12-07T02:00:00Z
info command: scripts/gpu-run.sh --rehearse
info device: emulated (CPU emulation of CUDA) - emulated, not a GPU result
info driver: emulated
info bundle commit: 0123456789abcdef
part preflight rc=0 seconds=1 limit=60
part tests rc=0 seconds=2 limit=420
part kernels rc=0 seconds=3 limit=180
part layer rc=0 seconds=4 limit=180
part shape rc=0 seconds=5 limit=300
part peer rc=0 seconds=1 limit=30
total seconds=16 limit_sum=1170
result: PASS
";

fn fixture(dir: &Path) {
    let files = [
        ("summary.txt", SUMMARY),
        ("preflight.log", "smoke_gemm: rc=0\n"),
        (
            "tests.log",
            "===== test_cuda_dense rc=0\ntest gemm_matches_cpu ... ok\n----- test_cuda_dense devices\n\
             cuda_dense gemm_matches_cpu executed sg-emu\n",
        ),
        (
            "bench.log",
            "===== cuda_kernels\naxpy                                               1.0 us       2.0 GB/s    3.0% of copy\n\
             ===== cuda_layer\n",
        ),
        ("shape.log", "===== gpu_shape tiny\n"),
        ("shape.jsonl", "{\"name\": \"tiny.sparsegrad.bf16\", \"rc\": 0, \"seconds\": 1, \"result\": null}\n"),
        ("peer.log", "PEER stub\n"),
        ("peer.jsonl", "{\"kind\": \"env\", \"stub\": true}\n"),
    ];
    for (name, text) in files {
        fs::write(dir.join(name), text).unwrap();
    }
}

fn report(dir: &Path) -> (bool, String, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu-report.py");
    let out = Command::new("python3").arg(script).arg(dir).output().expect("run python3");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn a_complete_rehearsal_output_is_reported_as_emulated() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let (ok, out, err) = report(dir.path());
    assert!(ok, "report failed: {err}");
    assert!(out.contains("emulated - not a GPU result"), "{out}");
    assert!(out.contains("1.0 (emulated)"), "a figure is not marked emulated:\n{out}");
    assert!(out.contains("`gemm_matches_cpu`: ok"), "{out}");
}

#[test]
fn a_missing_part_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let summary = SUMMARY.replace("part peer rc=0 seconds=1 limit=30\n", "");
    fs::write(dir.path().join("summary.txt"), summary).unwrap();
    let (ok, _, err) = report(dir.path());
    assert!(!ok, "a run without its peer part was reported");
    assert!(err.contains("missing: part peer"), "{err}");
}

#[test]
fn a_missing_file_or_section_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    fs::remove_file(dir.path().join("shape.jsonl")).unwrap();
    let (ok, _, err) = report(dir.path());
    assert!(!ok);
    assert!(err.contains("missing: file shape.jsonl"), "{err}");
    fixture(dir.path());
    fs::write(dir.path().join("bench.log"), "===== cuda_kernels\n").unwrap();
    let (ok, _, err) = report(dir.path());
    assert!(!ok);
    assert!(err.contains("missing: part layer"), "{err}");
}
