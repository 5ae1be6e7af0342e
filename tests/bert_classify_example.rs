//! The `bert_classify` example end to end: bad flags and bad data give one `error:` line
//! and a non-zero exit, with nothing written; a short SparseGrad run (sparse-by-dense
//! selection) on all-MiniLM-L6-v2 and the movie-review task (when scripts/fetch-assets.sh
//! has fetched them, or `SPARSEGRAD_MINILM_DIR` names the model; `skipped: ...` otherwise)
//! beats the untrained head on the test split and writes the CSV, PNG, adapter, head and a
//! merged model that loads and differs from the base only in the MLP weights; a toy
//! `--study` picks each rate by mean validation accuracy, keeps one split whatever the
//! seeds, resumes from its journal and reports paired differences as computed here.

mod common;

use common::assets::{self, root, MOVIE_REVIEWS};
use common::examples::coretype;
use sparsegrad::model::bert::BertWeights;
use std::path::{Path, PathBuf};
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
    one_error_line(&run(&["--study", "--lr-grid", "adam=1e-3"]), "unknown method");
    one_error_line(&run(&["--study", "--lr-grid", "lora=1e-3,-1"]), "positive");
    one_error_line(&run(&["--data", "a.tsv", "--data", "b.tsv"]), "only with --study");
    one_error_line(&run(&["--study", "--study-seeds", "1"]), "--study-seeds");
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

/// A 3-class toy task the model can separate a little: each sentence holds one cue word of
/// its class among filler words (a fixed linear congruential generator, no files needed).
fn toy_task(path: &Path, n: usize) {
    let cues = [["good", "great", "superb"], ["bad", "awful", "dull"], ["film", "plot", "cast"]];
    let filler = ["the", "a", "was", "is", "story", "music", "scene", "and"];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = |k: usize| {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) as usize % k
    };
    let mut tsv = String::new();
    for i in 0..n {
        let class = i % 3;
        let mut words: Vec<&str> = (0..4).map(|_| filler[next(filler.len())]).collect();
        words.insert(next(5), cues[class][next(3)]);
        tsv.push_str(&format!("{}\t{}\n", ["pos", "neg", "neu"][class], words.join(" ")));
    }
    std::fs::write(path, tsv).unwrap();
}

/// `study_runs.tsv` as rows of fields, header dropped.
fn journal(dir: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(dir.join("study_runs.tsv")).unwrap();
    text.lines().skip(1).map(|l| l.split('\t').map(String::from).collect()).collect()
}

#[test]
fn a_toy_study_tunes_on_validation_keeps_its_split_resumes_and_pairs_seeds() {
    use sparsegrad::recipes::classify::{load_task, paired_difference, split_fingerprint, stratified_split};
    let Some(model) = minilm() else { return };
    let dir = tmp("study");
    let (data, out_dir) = (dir.join("toy.tsv"), dir.join("out"));
    toy_task(&data, 60);
    #[rustfmt::skip]
    let args = [
        "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out_dir.to_str().unwrap(),
        "--study", "--study-seeds", "2", "--tune-seeds", "2", "--split-seed", "7", "--steps", "2", "--batch", "4",
        "--max-len", "12", "--prelim-steps", "1", "--layers", "5", "--probe-steps", "4", "--eval-every", "2",
        "--lr-grid", "head=1e-2,1e-1", "--lr-grid", "sparsegrad=1e-3,1e-2", "--lr-grid", "lora=1e-3,1e-2",
        "--lr-grid", "meprop=1e-3,1e-2", "--lr-grid", "full=1e-4,1e-3",
    ];
    let study = |extra: &[&str]| {
        let out = run(&[&args[..], extra].concat());
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "stdout: {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr));
        stdout
    };
    let stdout = study(&[]);
    // 1 probe + 5 methods x 2 rates x 2 tuning seeds + 5 methods x 2 run seeds.
    assert!(stdout.contains("0 runs reused") && stdout.contains("31 run now"), "{stdout}");
    let rows = journal(&out_dir);
    assert_eq!(rows.len(), 31);

    // The split comes from --split-seed alone: every run, whatever its seed, saw this one.
    let split = stratified_split(&load_task(&data, 0.5).unwrap(), 0.1, 0.1, 7).unwrap();
    let fp = format!("{:016x}", split_fingerprint(&split));
    assert!(
        rows.iter().all(|r| r[7] == fp),
        "split fingerprints {:?} vs {fp}",
        rows.iter().map(|r| &r[7]).collect::<Vec<_>>()
    );
    let seeds = |kind: &str| {
        let mut s: Vec<u64> = rows.iter().filter(|r| r[1] == kind).map(|r| r[5].parse().unwrap()).collect();
        s.sort();
        s.dedup();
        s
    };
    assert_eq!(seeds("tune"), [1000, 1001]);
    assert_eq!(seeds("final"), [0, 1]);

    // The picks: per method the rate of the best mean validation accuracy over the two
    // tuning seeds (ties to the smaller rate); the finals ran at it, the others with the
    // head's pick as their head rate.
    let md = std::fs::read_to_string(out_dir.join("study.md")).unwrap();
    let mut head_pick = String::new();
    for method in ["head", "sparsegrad", "lora", "meprop", "full"] {
        let tune: Vec<&Vec<String>> = rows.iter().filter(|r| r[1] == "tune" && r[2] == method).collect();
        assert_eq!(tune.len(), 4, "{method}");
        let mut rates: Vec<&str> = tune.iter().map(|r| r[3].as_str()).collect();
        rates.sort_by(|a, b| a.parse::<f64>().unwrap().total_cmp(&b.parse().unwrap()));
        rates.dedup();
        let mean =
            |lr: &str| tune.iter().filter(|r| r[3] == lr).map(|r| r[9].parse::<f64>().unwrap()).sum::<f64>() / 2.0;
        let best = rates.iter().fold(rates[0], |b, &lr| if mean(lr) > mean(b) { lr } else { b });
        let finals: Vec<&Vec<String>> = rows.iter().filter(|r| r[1] == "final" && r[2] == method).collect();
        assert_eq!(finals.len(), 2, "{method}");
        assert!(finals.iter().all(|r| r[3] == best), "{method}: picked {best}, finals at {:?}", finals[0][3]);
        if method == "head" {
            head_pick = best.to_string();
        } else {
            assert!(tune.iter().chain(&finals).all(|r| r[4] == head_pick), "{method} runs with the head's pick");
        }
        // The tuning table's row: the only row of the method with a bold (picked) cell.
        let line = md.lines().find(|l| l.starts_with(&format!("| {method} | ")) && l.contains("**")).unwrap();
        assert!(line.contains(&format!("**{best}: ")), "{method}: {line}");
    }

    // The paired difference of sparsegrad and the head on the run seeds, as the report states it.
    let test = |method: &str| -> Vec<f64> {
        let mut f: Vec<(u64, f64)> = rows
            .iter()
            .filter(|r| r[1] == "final" && r[2] == method)
            .map(|r| (r[5].parse().unwrap(), r[11].parse().unwrap()))
            .collect();
        f.sort_by_key(|x| x.0);
        f.into_iter().map(|x| x.1).collect()
    };
    let d = paired_difference(&test("sparsegrad"), &test("head")).unwrap();
    let verdict = if d.covers_zero() {
        "no difference"
    } else if d.lower > 0.0 {
        "better"
    } else {
        "worse"
    };
    let want = format!("{:+.1} [{:+.1}, {:+.1}] | {verdict}", 100.0 * d.mean, 100.0 * d.lower, 100.0 * d.upper);
    let paired = md.lines().rfind(|l| l.starts_with("| sparsegrad | ")).unwrap();
    assert!(paired.contains(&want), "expected `{want}` in {paired}");
    assert!(out_dir.join("study_toy.png").metadata().is_ok_and(|m| m.len() > 0));

    // Resume: drop the last three runs and leave a torn line, as a killed study would.
    let text = std::fs::read_to_string(out_dir.join("study_runs.tsv")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let kept = lines[..lines.len() - 3].join("\n") + "\n";
    std::fs::write(out_dir.join("study_runs.tsv"), format!("{kept}toy.tsv\tfinal\tfu")).unwrap();
    let stdout = study(&[]);
    assert!(stdout.contains("28 runs reused") && stdout.contains("3 run now"), "{stdout}");
    let after = std::fs::read_to_string(out_dir.join("study_runs.tsv")).unwrap();
    assert!(after.starts_with(&kept), "the finished runs stay as they were");
    assert_eq!(after.lines().count(), 32);
    assert!(study(&[]).contains("31 runs reused from"));
    // Another split seed is another split: nothing of it is done; --study-report runs nothing.
    let stdout = study(&["--split-seed", "8", "--study-report"]);
    assert!(stdout.contains("0 run now"), "{stdout}");
    let md = std::fs::read_to_string(out_dir.join("study.md")).unwrap();
    assert!(md.contains("0 of 31 planned") && md.contains("probe run has not run yet"), "{md}");
    std::fs::remove_dir_all(&dir).ok();
}
