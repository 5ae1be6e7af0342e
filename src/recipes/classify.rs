//! Sentence-classification tasks for the encoder: a file and a rule become labelled
//! examples, split train / validation / test, and scored by accuracy and macro-F1.
//!
//! Two file kinds:
//! - a VADER ground-truth file (`*_GroundTruth.txt`: id, mean rating, text): label =
//!   rating > 0 (positive) vs < 0 (negative), sentences with |rating| below a margin
//!   (0.5 by default) dropped as too neutral to call;
//! - a `label<TAB>text` TSV: any set of label strings makes a k-class task (labels that are
//!   all integers are ordered numerically, so `0`/`1` keep their meaning; others sorted).
//!
//! Splits are stratified (each class split in the same proportions) and seeded.

use crate::error::{Error, Result};
use crate::model::weights::SplitMix64;
use std::collections::BTreeMap;
use std::path::Path;

/// A task file larger than this is refused before it is read.
const MAX_TASK_BYTES: u64 = 1 << 30;

/// One labelled sentence.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub text: String,
    /// Index into [`Task::labels`].
    pub label: u32,
}

/// A classification task: the class names and the examples.
#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    pub labels: Vec<String>,
    pub examples: Vec<Example>,
}

/// A task split three ways.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskSplit {
    pub labels: Vec<String>,
    pub train: Vec<Example>,
    pub validation: Vec<Example>,
    pub test: Vec<Example>,
}

impl Task {
    pub fn classes(&self) -> usize {
        self.labels.len()
    }

    /// Examples per class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.labels.len()];
        self.examples.iter().for_each(|e| c[e.label as usize] += 1);
        c
    }

    fn check(self, path: Option<&Path>, rule: &str) -> Result<Self> {
        if self.examples.is_empty() {
            return Err(Error::format(path, format!("no examples are left after {rule}")));
        }
        let present = self.class_counts().iter().filter(|&&n| n > 0).count();
        if present < 2 {
            return Err(Error::format(
                path,
                format!("only one class ({}) is left after {rule}", self.labels.join(", ")),
            ));
        }
        Ok(self)
    }
}

/// A VADER ground-truth file's contents as a binary task (`negative` = 0, `positive` = 1),
/// dropping sentences with `|rating| < margin`.
pub fn vader_task(bytes: &[u8], path: Option<&Path>, margin: f32) -> Result<Task> {
    if !(margin.is_finite() && margin >= 0.0) {
        return Err(Error::invalid("vader_task", format!("margin {margin} must be finite and >= 0")));
    }
    let sentences = crate::recipes::vader::parse_corpus(bytes, path)?;
    let examples = sentences
        .into_iter()
        .filter(|s| s.score.abs() >= margin && s.score != 0.0)
        .map(|s| Example { label: u32::from(s.score > 0.0), text: s.text })
        .collect();
    Task { labels: vec!["negative".into(), "positive".into()], examples }
        .check(path, &format!("dropping ratings with |rating| < {margin}"))
}

/// A `label<TAB>text` TSV's contents. Blank lines are skipped; a line without a tab, with
/// an empty label or an empty text is an error naming the line.
pub fn parse_tsv(bytes: &[u8], path: Option<&Path>) -> Result<Task> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut rows: Vec<(String, String)> = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = String::from_utf8_lossy(line.strip_suffix(b"\r").unwrap_or(line));
        if line.trim().is_empty() {
            continue;
        }
        let bad = |msg: &str| {
            Error::format(path, format!("line {}: {msg}: `{}`", i + 1, line.chars().take(80).collect::<String>()))
        };
        let Some((label, text)) = line.split_once('\t') else {
            return Err(bad("expected label<TAB>text (no tab)"));
        };
        let (label, text) = (label.trim(), text.replace('\t', " ").trim().to_string());
        if label.is_empty() {
            return Err(bad("the label is empty"));
        }
        if text.is_empty() {
            return Err(bad("the text is empty"));
        }
        rows.push((label.to_string(), text));
    }
    let mut names: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    names.sort();
    names.dedup();
    if names.iter().all(|n| n.parse::<i64>().is_ok()) {
        names.sort_by_key(|n| n.parse::<i64>().unwrap_or(0));
    }
    let index: BTreeMap<&str, u32> = names.iter().enumerate().map(|(i, n)| (n.as_str(), i as u32)).collect();
    let examples = rows.iter().map(|(l, t)| Example { label: index[l.as_str()], text: t.clone() }).collect();
    Task { labels: names.clone(), examples }.check(path, "reading the file")
}

/// Reads a task file: a VADER ground-truth file when its name ends in `_GroundTruth.txt`
/// (with `margin`), else a `label<TAB>text` TSV.
pub fn load_task(path: &Path, margin: f32) -> Result<Task> {
    let bytes = crate::io::fs::read_bytes(path, MAX_TASK_BYTES)?;
    let vader = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(crate::recipes::vader::CORPUS_FILE_SUFFIX));
    if vader {
        vader_task(&bytes, Some(path), margin)
    } else {
        parse_tsv(&bytes, Some(path))
    }
}

/// Splits each class in the proportions `validation`, `test` and the rest for training
/// (rounded per class), after a seeded shuffle. Every class keeps at least one training
/// example; each part is shuffled again so classes interleave.
pub fn stratified_split(task: &Task, validation: f64, test: f64, seed: u64) -> Result<TaskSplit> {
    let ok = |f: f64| f.is_finite() && (0.0..1.0).contains(&f);
    if !ok(validation) || !ok(test) || validation + test >= 1.0 {
        return Err(Error::invalid(
            "stratified_split",
            format!("validation {validation} and test {test} must be fractions summing below 1"),
        ));
    }
    let mut rng = SplitMix64::new(seed);
    let mut by_class: Vec<Vec<&Example>> = vec![Vec::new(); task.labels.len()];
    task.examples.iter().for_each(|e| by_class[e.label as usize].push(e));
    let (mut tr, mut va, mut te) = (Vec::new(), Vec::new(), Vec::new());
    for mut members in by_class {
        rng.shuffle(&mut members);
        let n = members.len();
        let n_val = ((n as f64 * validation).round() as usize).min(n.saturating_sub(1));
        let n_test = ((n as f64 * test).round() as usize).min(n.saturating_sub(1 + n_val));
        va.extend(members[..n_val].iter().map(|e| (*e).clone()));
        te.extend(members[n_val..n_val + n_test].iter().map(|e| (*e).clone()));
        tr.extend(members[n_val + n_test..].iter().map(|e| (*e).clone()));
    }
    for part in [&mut tr, &mut va, &mut te] {
        rng.shuffle(part);
    }
    Ok(TaskSplit { labels: task.labels.clone(), train: tr, validation: va, test: te })
}

/// Accuracy and macro-F1 (the unweighted mean over classes of `2 TP / (2 TP + FP + FN)`,
/// a class absent from both `pred` and `gold` counting as 1) of predictions.
pub fn accuracy_macro_f1(pred: &[u32], gold: &[u32], classes: usize) -> Result<(f64, f64)> {
    if pred.len() != gold.len() {
        return Err(Error::shape("accuracy_macro_f1", "predictions", gold.len(), pred.len()));
    }
    if let Some(&bad) = pred.iter().chain(gold).find(|&&c| c as usize >= classes) {
        return Err(Error::invalid("accuracy_macro_f1", format!("class {bad} outside 0..{classes}")));
    }
    if gold.is_empty() {
        return Ok((0.0, 0.0));
    }
    let (mut tp, mut fp, mut fn_) = (vec![0usize; classes], vec![0usize; classes], vec![0usize; classes]);
    for (&p, &g) in pred.iter().zip(gold) {
        if p == g {
            tp[p as usize] += 1;
        } else {
            fp[p as usize] += 1;
            fn_[g as usize] += 1;
        }
    }
    let acc = tp.iter().sum::<usize>() as f64 / gold.len() as f64;
    let f1: f64 = (0..classes)
        .map(|c| {
            let d = 2 * tp[c] + fp[c] + fn_[c];
            if d == 0 {
                1.0
            } else {
                2.0 * tp[c] as f64 / d as f64
            }
        })
        .sum::<f64>()
        / classes as f64;
    Ok((acc, f1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vader_rule_drops_neutral_ratings_and_labels_by_sign() {
        let t = vader_task(b"1\t2.5\tgood\n2\t-0.4\tmeh\n3\t-1.0\tbad\n4\t0.5\tok\n", None, 0.5).unwrap();
        let got: Vec<(&str, u32)> = t.examples.iter().map(|e| (e.text.as_str(), e.label)).collect();
        assert_eq!(got, [("good", 1), ("bad", 0), ("ok", 1)]);
        let e = vader_task(b"1\t0.2\tmeh\n2\t-0.1\tso so\n", None, 0.5).unwrap_err().to_string();
        assert!(e.contains("no examples"), "{e}");
        let e = vader_task(b"1\t2.0\tgood\n2\t1.0\tfine\n", None, 0.5).unwrap_err().to_string();
        assert!(e.contains("only one class"), "{e}");
    }

    #[test]
    fn tsv_labels_become_classes_and_bad_lines_are_named() {
        let t = parse_tsv(b"10\ta\n2\tb\n\n10\tc\n", None).unwrap();
        assert_eq!(t.labels, ["2", "10"]);
        assert_eq!(t.examples.iter().map(|e| e.label).collect::<Vec<_>>(), [1, 0, 1]);
        let t = parse_tsv(b"sports\ta\nworld\tb\nscience\tc\n", None).unwrap();
        assert_eq!(t.labels, ["science", "sports", "world"]);
        let e = parse_tsv(b"0\tfine\nno tab here\n", None).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("no tab"), "{e}");
        let e = parse_tsv(b"\tno label\n", None).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("label is empty"), "{e}");
        assert!(parse_tsv(b"\n\n", None).is_err());
    }

    #[test]
    fn split_is_stratified_seeded_and_complete() {
        let mut ex = Vec::new();
        for i in 0..300 {
            ex.push(Example { text: format!("s{i}"), label: u32::from(i % 3 == 0) });
        }
        let task = Task { labels: vec!["a".into(), "b".into()], examples: ex };
        let s = stratified_split(&task, 0.1, 0.2, 5).unwrap();
        assert_eq!((s.train.len(), s.validation.len(), s.test.len()), (210, 30, 60));
        let pos = |v: &[Example]| v.iter().filter(|e| e.label == 1).count();
        assert_eq!((pos(&s.train), pos(&s.validation), pos(&s.test)), (70, 10, 20));
        assert_eq!(s, stratified_split(&task, 0.1, 0.2, 5).unwrap());
        assert_ne!(s.train, stratified_split(&task, 0.1, 0.2, 6).unwrap().train);
        let mut all: Vec<String> = s.train.iter().chain(&s.validation).chain(&s.test).map(|e| e.text.clone()).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 300);
        assert!(stratified_split(&task, 0.5, 0.5, 1).is_err());
    }

    #[test]
    fn the_movie_review_task_has_both_classes() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/vader/movieReviewSnippets_GroundTruth.txt");
        if !path.exists() {
            println!("skipped: {} not found (run scripts/fetch-assets.sh)", path.display());
            return;
        }
        let t = load_task(&path, 0.5).unwrap();
        // Counted independently (python over the same file): 10072 kept, 4996 positive.
        assert_eq!(t.class_counts(), [5076, 4996]);
    }

    #[test]
    fn accuracy_and_macro_f1() {
        let (acc, f1) = accuracy_macro_f1(&[0, 0, 1, 1], &[0, 1, 1, 1], 2).unwrap();
        assert!((acc - 0.75).abs() < 1e-12);
        // class 0: tp 1 fp 1 fn 0 -> 2/3; class 1: tp 2 fp 0 fn 1 -> 4/5.
        assert!((f1 - (2.0 / 3.0 + 0.8) / 2.0).abs() < 1e-12);
        assert!(accuracy_macro_f1(&[2], &[0], 2).is_err());
    }
}
