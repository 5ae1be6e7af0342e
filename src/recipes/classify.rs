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
//!
//! For comparing methods over seeds: the learning-rate pick by mean validation score, and
//! the paired difference of two methods' per-seed scores with its Student-t 95% interval.

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

/// A 64-bit FNV-1a hash of a split's three parts (texts and labels, in order): equal
/// fingerprints mean the same split, so runs can show that they shared one.
pub fn split_fingerprint(split: &TaskSplit) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for (tag, part) in [(b'T', &split.train), (b'V', &split.validation), (b'E', &split.test)] {
        eat(&[tag]);
        for e in part {
            eat(&e.label.to_le_bytes());
            eat(e.text.as_bytes());
            eat(&[0]);
        }
    }
    h
}

/// The index of the candidate with the highest mean score (`scores[i]`: candidate `i`'s
/// score per seed); ties go to the lower index, so a grid in ascending order picks the
/// smaller learning rate.
pub fn pick_best_mean(scores: &[Vec<f64>]) -> Result<usize> {
    if scores.is_empty() {
        return Err(Error::invalid("pick_best_mean", "no candidates"));
    }
    let mut best: Option<(usize, f64)> = None;
    for (i, s) in scores.iter().enumerate() {
        if s.is_empty() || s.iter().any(|x| !x.is_finite()) {
            return Err(Error::invalid("pick_best_mean", format!("candidate {i} has no scores or a non-finite one")));
        }
        let m = s.iter().sum::<f64>() / s.len() as f64;
        if best.is_none_or(|(_, b)| m > b) {
            best = Some((i, m));
        }
    }
    Ok(best.map_or(0, |b| b.0))
}

/// Two-sided 97.5% quantile of Student's t with `df` degrees of freedom: a table for
/// 1..=30, above that the Cornish-Fisher expansion around the normal quantile (error
/// below 1e-5 there).
pub fn student_t_975(df: usize) -> Result<f64> {
    const TABLE: [f64; 30] = [
        12.706204736,
        4.302652730,
        3.182446305,
        2.776445105,
        2.570581836,
        2.446911851,
        2.364624252,
        2.306004135,
        2.262157163,
        2.228138852,
        2.200985160,
        2.178812830,
        2.160368656,
        2.144786688,
        2.131449546,
        2.119905299,
        2.109815578,
        2.100922040,
        2.093024054,
        2.085963447,
        2.079613845,
        2.073873068,
        2.068657610,
        2.063898562,
        2.059538553,
        2.055529439,
        2.051830516,
        2.048407142,
        2.045229642,
        2.042272456,
    ];
    match df {
        0 => Err(Error::invalid("student_t_975", "0 degrees of freedom (a t interval needs two or more pairs)")),
        1..=30 => Ok(TABLE[df - 1]),
        _ => {
            let (z, v) = (1.959_963_984_540_054f64, df as f64);
            let (z3, z5, z7) = (z.powi(3), z.powi(5), z.powi(7));
            Ok(z + (z3 + z) / (4.0 * v)
                + (5.0 * z5 + 16.0 * z3 + 3.0 * z) / (96.0 * v * v)
                + (3.0 * z7 + 19.0 * z5 + 17.0 * z3 - 15.0 * z) / (384.0 * v * v * v))
        }
    }
}

/// The per-seed difference `a[i] - b[i]` of two methods run on the same seeds: its mean,
/// standard deviation and Student-t 95% interval for the mean.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairedDifference {
    pub pairs: usize,
    pub mean: f64,
    pub std: f64,
    pub lower: f64,
    pub upper: f64,
}

impl PairedDifference {
    /// Whether the interval covers 0: the data show no difference at 95%.
    pub fn covers_zero(&self) -> bool {
        self.lower <= 0.0 && self.upper >= 0.0
    }
}

/// Paired difference of `a` and `b` (the same seeds in the same order).
pub fn paired_difference(a: &[f64], b: &[f64]) -> Result<PairedDifference> {
    if a.len() != b.len() {
        return Err(Error::shape("paired_difference", "second sample", a.len(), b.len()));
    }
    if a.iter().chain(b).any(|x| !x.is_finite()) {
        return Err(Error::invalid("paired_difference", "a score is not finite"));
    }
    let n = a.len();
    let t = student_t_975(n.saturating_sub(1))?;
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let mean = d.iter().sum::<f64>() / n as f64;
    let std = (d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
    let half = t * std / (n as f64).sqrt();
    Ok(PairedDifference { pairs: n, mean, std, lower: mean - half, upper: mean + half })
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
    #[test]
    fn paired_t_interval_matches_a_hand_computation() {
        // d = a - b = [1, 2, 3, 0, 4]: mean 2, squared deviations 1+0+1+4+4 = 10, variance
        // 10/4 = 2.5, standard error sqrt(2.5/5) = 0.70711, t(0.975, 4) = 2.776445:
        // half width 1.963243, interval [0.036757, 3.963243].
        let a = [11.0, 12.0, 13.0, 10.0, 14.0];
        let b = [10.0, 10.0, 10.0, 10.0, 10.0];
        let d = paired_difference(&a, &b).unwrap();
        assert_eq!(d.pairs, 5);
        assert!((d.mean - 2.0).abs() < 1e-12 && (d.std - 2.5f64.sqrt()).abs() < 1e-12);
        assert!((d.lower - 0.036757).abs() < 1e-5 && (d.upper - 3.963243).abs() < 1e-5, "{d:?}");
        assert!(!d.covers_zero());
        // Swapping the samples mirrors the interval; a noisy difference covers 0.
        let r = paired_difference(&b, &a).unwrap();
        assert!((r.lower + d.upper).abs() < 1e-12 && (r.upper + d.lower).abs() < 1e-12);
        assert!(paired_difference(&[1.0, -1.0, 2.0], &[0.0, 0.0, 0.0]).unwrap().covers_zero());
        assert!(paired_difference(&[1.0], &[0.0]).is_err());
        assert!(paired_difference(&[1.0, 2.0], &[0.0]).is_err());
        assert!(paired_difference(&[1.0, f64::NAN], &[0.0, 0.0]).is_err());
    }

    #[test]
    fn t_quantiles_join_the_expansion_smoothly() {
        assert!((student_t_975(4).unwrap() - 2.776445).abs() < 1e-6);
        // The expansion at 30 against the table's exact value, and at 60 and 120 against
        // published quantiles (2.000298, 1.979930).
        let v: f64 = {
            let (z, v) = (1.959_963_984_540_054f64, 30.0f64);
            z + (z.powi(3) + z) / (4.0 * v)
                + (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / (96.0 * v * v)
                + (3.0 * z.powi(7) + 19.0 * z.powi(5) + 17.0 * z.powi(3) - 15.0 * z) / (384.0 * v * v * v)
        };
        assert!((v - student_t_975(30).unwrap()).abs() < 2e-5, "{v}");
        assert!((student_t_975(60).unwrap() - 2.000298).abs() < 1e-5);
        assert!((student_t_975(120).unwrap() - 1.979930).abs() < 1e-5);
        assert!(student_t_975(0).is_err());
    }

    #[test]
    fn the_best_mean_wins_and_ties_go_to_the_first() {
        assert_eq!(pick_best_mean(&[vec![0.7, 0.8], vec![0.8, 0.9], vec![0.9, 0.7]]).unwrap(), 1);
        assert_eq!(pick_best_mean(&[vec![0.5, 0.7], vec![0.6, 0.6]]).unwrap(), 0);
        assert!(pick_best_mean(&[]).is_err());
        assert!(pick_best_mean(&[vec![0.5], vec![]]).is_err());
        assert!(pick_best_mean(&[vec![f64::NAN]]).is_err());
    }

    #[test]
    fn fingerprints_tell_splits_apart() {
        let ex: Vec<Example> = (0..40).map(|i| Example { text: format!("s{i}"), label: i % 2 }).collect();
        let task = Task { labels: vec!["a".into(), "b".into()], examples: ex };
        let s1 = stratified_split(&task, 0.2, 0.2, 1).unwrap();
        assert_eq!(split_fingerprint(&s1), split_fingerprint(&stratified_split(&task, 0.2, 0.2, 1).unwrap()));
        assert_ne!(split_fingerprint(&s1), split_fingerprint(&stratified_split(&task, 0.2, 0.2, 2).unwrap()));
        let mut moved = s1.clone();
        let e = moved.validation.pop().unwrap();
        moved.test.insert(0, e);
        assert_ne!(split_fingerprint(&s1), split_fingerprint(&moved));
    }
}
