//! The study's journal, `study_runs.tsv`: one line per finished run, appended and synced as the
//! run ends, so a killed study loses at most the run in progress and a rerun skips every
//! run it finds. A run is found by its key: task, kind, method, rates, seed, steps, split
//! fingerprint and every other setting that changes its scores (`config`); lines written
//! under other settings stay in the file and are not reused.

use crate::args::MethodKind;
use sparsegrad::{Error, Result};
use std::io::Write as _;
use std::path::{Path, PathBuf};

const HEADER: &str = "task\tkind\tmethod\tlr\thead_lr\tseed\tsteps\tsplit\tconfig\tval_acc\tval_f1\ttest_acc\t\
                      test_f1\tmlp_params\thead_params\tsteps_per_s\tpeak_mib\twall_s\tcpu_s\tval_curve";
const FIELDS: usize = 20;

/// Why a run was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Full fine-tuning with validation along the way: sets the task's steps.
    Probe,
    /// One grid point on one tuning seed: scored on validation.
    Tune,
    /// The picked rate on one run seed: scored on test.
    Final,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Probe => "probe",
            Kind::Tune => "tune",
            Kind::Final => "final",
        }
    }
}

/// What identifies a run. Rates are kept as written (`{:e}` of the f32), so a key read
/// back compares equal to the one built from the same flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    pub task: String,
    pub kind: Kind,
    pub method: MethodKind,
    pub lr: String,
    pub head_lr: String,
    pub seed: u64,
    pub steps: usize,
    pub split: String,
    pub config: String,
}

pub fn rate(lr: f32) -> String {
    format!("{lr:e}")
}

/// One finished run.
#[derive(Clone, Debug)]
pub struct Row {
    pub key: Key,
    pub val: (f64, f64),
    pub test: (f64, f64),
    pub mlp_params: usize,
    pub head_params: usize,
    pub steps_per_s: f64,
    pub peak_mib: f64,
    pub wall_s: f64,
    pub cpu_s: f64,
    /// `(step, validation accuracy)` of a probe; empty otherwise.
    pub curve: Vec<(usize, f64)>,
}

impl Row {
    fn line(&self) -> String {
        let k = &self.key;
        let curve = if self.curve.is_empty() {
            "-".to_string()
        } else {
            self.curve.iter().map(|(s, a)| format!("{s}:{a:.6}")).collect::<Vec<_>>().join(",")
        };
        format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{:.6}\t{:.6}\t{:.6}\t{:.6}\t{}\t{}\t{:.4}\t{:.1}\t{:.1}\t{:.1}\t{curve}\n",
            k.task,
            k.kind.name(),
            k.method.name(),
            k.lr,
            k.head_lr,
            k.seed,
            k.steps,
            k.split,
            k.config,
            self.val.0,
            self.val.1,
            self.test.0,
            self.test.1,
            self.mlp_params,
            self.head_params,
            self.steps_per_s,
            self.peak_mib,
            self.wall_s,
            self.cpu_s
        )
    }

    fn parse(line: &str) -> Option<Row> {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != FIELDS {
            return None;
        }
        let kind = [Kind::Probe, Kind::Tune, Kind::Final].into_iter().find(|k| k.name() == f[1])?;
        let method = MethodKind::ALL.into_iter().find(|m| m.name() == f[2])?;
        let num = |i: usize| f[i].parse::<f64>().ok().filter(|x| x.is_finite());
        let curve = if f[19] == "-" {
            Vec::new()
        } else {
            f[19]
                .split(',')
                .map(|p| {
                    let (s, a) = p.split_once(':')?;
                    Some((s.parse().ok()?, a.parse().ok()?))
                })
                .collect::<Option<Vec<_>>>()?
        };
        Some(Row {
            key: Key {
                task: f[0].into(),
                kind,
                method,
                lr: f[3].into(),
                head_lr: f[4].into(),
                seed: f[5].parse().ok()?,
                steps: f[6].parse().ok()?,
                split: f[7].into(),
                config: f[8].into(),
            },
            val: (num(9)?, num(10)?),
            test: (num(11)?, num(12)?),
            mlp_params: f[13].parse().ok()?,
            head_params: f[14].parse().ok()?,
            steps_per_s: num(15)?,
            peak_mib: num(16)?,
            wall_s: num(17)?,
            cpu_s: num(18)?,
            curve,
        })
    }
}

/// The runs of `study_runs.tsv`, in file order.
pub struct Journal {
    path: PathBuf,
    pub rows: Vec<Row>,
    /// Lines that did not parse (not counting the header and a torn last line).
    pub malformed: usize,
}

impl Journal {
    /// Reads `path` (a missing file is an empty journal). A last line without its newline
    /// is what a killed process leaves: it is cut off the file so the next append starts
    /// on a line of its own.
    pub fn open(path: &Path) -> Result<Journal> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io(path, e)),
        };
        let complete = text.rfind('\n').map_or("", |i| &text[..=i]);
        if complete.len() != text.len() {
            std::fs::write(path, complete).map_err(|e| Error::io(path, e))?;
        }
        let mut j = Journal { path: path.to_path_buf(), rows: Vec::new(), malformed: 0 };
        for line in complete.lines().filter(|l| !l.is_empty() && !l.starts_with("task\t")) {
            match Row::parse(line) {
                Some(r) => j.rows.push(r),
                None => j.malformed += 1,
            }
        }
        Ok(j)
    }

    pub fn find(&self, key: &Key) -> Option<&Row> {
        self.rows.iter().find(|r| &r.key == key)
    }

    /// Appends `row` and syncs it to disk before returning.
    pub fn append(&mut self, row: Row) -> Result<()> {
        let io = |e| Error::io(&self.path, e);
        let fresh = !self.path.exists();
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path).map_err(io)?;
        let mut text = if fresh { format!("{HEADER}\n") } else { String::new() };
        text.push_str(&row.line());
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_data().map_err(io)?;
        self.rows.push(row);
        Ok(())
    }
}
