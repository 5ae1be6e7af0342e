//! The `bert_classify` example end to end: bad flags and bad data give one `error:` line
//! and a non-zero exit, with nothing written; a short SparseGrad run (sparse-by-dense
//! selection) on all-MiniLM-L6-v2 and the movie-review task (when scripts/fetch-assets.sh
//! has fetched them, or `SPARSEGRAD_MINILM_DIR` names the model; `skipped: ...` otherwise)
//! beats the untrained head on the test split and writes the CSV, PNG, adapter, head and a
//! merged model that loads and differs from the base only in the MLP weights.

mod common;

use common::assets::{self, root, MOVIE_REVIEWS};
use common::examples::coretype;
use sparsegrad::model::bert::BertWeights;
use std::path::PathBuf;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(common::examples::binary("bert_classify"))
        .args(args)
        .current_dir(root())
        .env("OPENBLAS_CORETYPE", coretype())
        .output()
        .unwrap()
}

fn one_error_line(out: &Output, needle: &str) {
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "stderr: {err}");
    assert!(errors[0].contains(needle), "expected `{needle}` in {errors:?}");
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sparsegrad-bert-classify-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn bad_flags_and_bad_data_are_one_error_line() {
    one_error_line(&run(&["--method", "adam"]), "--method");
    one_error_line(&run(&["--keep", "0"]), "--keep");
    one_error_line(&run(&["--frobnicate"]), "unknown flag");
    let dir = tmp("bad");
    let tsv = dir.join("task.tsv");
    std::fs::write(&tsv, "pos\tgreat film\nthis line has no label\n").unwrap();
    let out_dir = dir.join("out");
    let out = run(&["--data", tsv.to_str().unwrap(), "--out", out_dir.to_str().unwrap()]);
    one_error_line(&out, "line 2");
    std::fs::write(&tsv, "pos\tgreat film\npos\tloved it\n").unwrap();
    one_error_line(&run(&["--data", tsv.to_str().unwrap(), "--out", out_dir.to_str().unwrap()]), "one class");
    assert!(!out_dir.exists(), "nothing is written on bad input");
    std::fs::remove_dir_all(&dir).ok();
}

fn minilm() -> Option<PathBuf> {
    let dir = assets::minilm_dir();
    assets::present(&[&dir.join("model.safetensors"), &root().join(MOVIE_REVIEWS)]).then_some(dir)
}

#[test]
fn a_short_sparsegrad_run_beats_the_untrained_head_and_writes_everything() {
    let Some(model) = minilm() else { return };
    let dir = tmp("run");
    let out_dir = dir.join("out");
    #[rustfmt::skip]
    let out = run(&[
        "--model", model.to_str().unwrap(), "--out", out_dir.to_str().unwrap(),
        "--method", "sparsegrad", "--selection", "sd", "--steps", "16", "--batch", "16", "--max-len", "40",
        "--prelim-steps", "3", "--eval-every", "8", "--eval-limit", "128", "--layers", "3,4,5",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("token rows skipped"), "{stdout}");
    let line = stdout.lines().find(|l| l.starts_with("untrained head")).expect("summary line");
    let num = |key: &str| -> f64 {
        let rest = &line[line.find(key).unwrap_or_else(|| panic!("{key} in {line}")) + key.len()..];
        rest.split([',', ';', ' ']).find(|s| !s.is_empty()).unwrap().parse().unwrap()
    };
    let (untrained, test) = (num("validation accuracy "), num("test accuracy "));
    assert!(test > untrained + 0.03, "test accuracy {test} vs untrained head {untrained}");
    for f in ["metrics.csv", "curves.png", "adapter.safetensors", "head.safetensors"] {
        assert!(out_dir.join(f).metadata().is_ok_and(|m| m.len() > 0), "{f} missing");
    }
    let csv = std::fs::read_to_string(out_dir.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 3, "{csv}");
    let base = BertWeights::from_hf_dir(&model).unwrap();
    let merged = BertWeights::from_hf_dir(out_dir.join("merged")).unwrap();
    assert_eq!(merged.word_emb, base.word_emb);
    for (i, (m, b)) in merged.layers.iter().zip(&base.layers).enumerate() {
        assert_eq!(m.q, b.q, "layer {i} attention is frozen");
        assert_eq!(m.inter != b.inter, i >= 3, "layer {i} MLP");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_tiny_study_writes_its_table_plot_and_premise() {
    let Some(model) = minilm() else { return };
    let dir = tmp("study");
    let out_dir = dir.join("out");
    #[rustfmt::skip]
    let out = run(&[
        "--model", model.to_str().unwrap(), "--out", out_dir.to_str().unwrap(), "--study", "--study-seeds", "1",
        "--steps", "1", "--batch", "4", "--max-len", "16", "--prelim-steps", "1", "--eval-limit", "8",
        "--test-limit", "16", "--layers", "5",
    ]);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let md = std::fs::read_to_string(out_dir.join("study.md")).unwrap();
    // 3 budgets for each of sparsegrad, lora, meprop, one row for full and one for the
    // head-only baseline; the premise table.
    for m in ["sparsegrad", "lora", "meprop"] {
        assert_eq!(md.lines().filter(|l| l.starts_with(&format!("| {m} |"))).count(), 3, "{md}");
    }
    assert_eq!(md.lines().filter(|l| l.starts_with("| full | all |")).count(), 1, "{md}");
    assert_eq!(md.lines().filter(|l| l.starts_with("| head | none | 0 |")).count(), 1, "{md}");
    assert!(md.contains("| intermediate |") && md.contains("| output |"), "{md}");
    assert!(out_dir.join("study.png").metadata().is_ok_and(|m| m.len() > 0));
    std::fs::remove_dir_all(&dir).ok();
}
