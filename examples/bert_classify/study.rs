//! `--study`: per task, a fixed split (its own seed); optionally a probe run of full
//! fine-tuning that sets the number of steps; the head's learning rate tuned on
//! head-only runs; each method's MLP rate tuned with that head rate; then the test score
//! of every method at its picked rate over the run seeds. Every run goes through the
//! journal (`study_runs.tsv`), so a rerun skips what is done. The plan (which runs, which pick)
//! is computed here for the runner and the report alike.

use crate::args::{Args, Device, MethodKind};
use crate::journal::{rate, Journal, Key, Kind, Row};
use crate::train::{self, Evals, RunResult};
use sparsegrad::recipes::classify::{load_task, pick_best_mean, split_fingerprint, stratified_split, TaskSplit};
use sparsegrad::{Cpu, Error, Result};
use std::path::Path;

/// Tuning seeds start here, apart from the run seeds 0..N, so no test score comes from a
/// seed whose validation score picked the rate.
pub const TUNE_SEED_BASE: u64 = 1000;

/// The order methods are tuned and run in: the head first (its rate is shared).
pub const ORDER: [MethodKind; 5] =
    [MethodKind::Head, MethodKind::SparseGrad, MethodKind::Lora, MethodKind::MeProp, MethodKind::Full];

/// A task of the study: its name in the journal, its fixed split and the settings that
/// every key of it carries.
pub struct TaskCtx {
    pub name: String,
    pub split: TaskSplit,
    pub fingerprint: String,
    pub config: String,
}

impl TaskCtx {
    pub fn new(args: &Args, data: &Path) -> Result<TaskCtx> {
        let task = load_task(data, args.margin)?;
        let split = stratified_split(&task, 0.1, 0.1, args.split_seed)?;
        let name = data.file_name().map_or_else(|| data.display().to_string(), |n| n.to_string_lossy().into_owned());
        let layers = args
            .layers
            .as_ref()
            .map_or("all".to_string(), |l| l.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(","));
        let config = format!(
            "model={};layers={layers};batch={};max_len={};keep={};prelim={};selection={};pooling={:?};basis={};\
             margin={};eval_limit={};test_limit={}",
            args.model.file_name().map_or(String::new(), |n| n.to_string_lossy().into_owned()),
            args.batch,
            args.max_len,
            args.keep,
            args.prelim_steps,
            args.sd_threshold.map_or("exact".into(), |t| format!("sd{t}")),
            args.pooling,
            if args.per_layer_basis { "layer" } else { "type" },
            args.margin,
            args.eval_limit(),
            args.test_limit,
        );
        Ok(TaskCtx { name, fingerprint: format!("{:016x}", split_fingerprint(&split)), split, config })
    }

    /// File-name-safe short name, for the task's plot.
    pub fn slug(&self) -> String {
        let stem = self.name.split(['_', '.']).next().unwrap_or(&self.name);
        stem.chars().filter(|c| c.is_ascii_alphanumeric()).collect()
    }

    pub fn key(&self, kind: Kind, method: MethodKind, lr: f32, head_lr: f32, seed: u64, steps: usize) -> Key {
        Key {
            task: self.name.clone(),
            kind,
            method,
            lr: rate(lr),
            head_lr: rate(head_lr),
            seed,
            steps,
            split: self.fingerprint.clone(),
            config: self.config.clone(),
        }
    }
}

fn middle(grid: &[f32]) -> f32 {
    grid[grid.len() / 2]
}

/// The probe's key: full fine-tuning at the middle of its grid (head: the middle of the
/// head's grid), first tuning seed, validation every `eval_every` steps.
pub fn probe_key(args: &Args, t: &TaskCtx) -> Key {
    let mut k = t.key(
        Kind::Probe,
        MethodKind::Full,
        middle(&args.grid(MethodKind::Full)),
        middle(&args.grid(MethodKind::Head)),
        TUNE_SEED_BASE,
        args.probe_steps,
    );
    k.config.push_str(&format!(";eval_every={}", args.eval_every));
    k
}

/// Where the probe's validation accuracy stopped improving: the first evaluation within
/// one binomial standard error (`n` validation sentences) of the best.
pub fn plateau_step(curve: &[(usize, f64)], n: usize) -> Option<usize> {
    let best = curve.iter().map(|c| c.1).fold(f64::NEG_INFINITY, f64::max);
    let se = (best * (1.0 - best) / n.max(1) as f64).sqrt();
    curve.iter().find(|c| c.1 >= best - se).map(|c| c.0)
}

/// Steps of every run of the task: `--steps`, or the probe's plateau capped by it;
/// `None` while the probe has not run.
pub fn task_steps(args: &Args, t: &TaskCtx, j: &Journal) -> Option<usize> {
    if args.probe_steps == 0 {
        return Some(args.steps);
    }
    let row = j.find(&probe_key(args, t))?;
    Some(plateau_step(&row.curve, t.split.validation.len()).unwrap_or(args.steps).min(args.steps))
}

pub fn tune_seeds(args: &Args) -> Vec<u64> {
    (0..args.tune_seeds as u64).map(|i| TUNE_SEED_BASE + i).collect()
}

/// `(MLP rate, head rate)` of a method's run at grid point `lr`: for the head-only
/// baseline the grid is the head's rate.
fn rates(method: MethodKind, lr: f32, head_lr: f32) -> (f32, f32) {
    if method == MethodKind::Head {
        (lr, lr)
    } else {
        (lr, head_lr)
    }
}

/// A method's tuning: mean validation accuracy per grid point and the pick.
pub struct Pick {
    pub grid: Vec<(f32, Vec<f64>)>,
    pub lr: f32,
}

impl Pick {
    /// Picked at the grid's first or last point: the best rate may lie outside.
    pub fn at_edge(&self) -> bool {
        let i = self.grid.iter().position(|g| g.0 == self.lr);
        i == Some(0) || i == Some(self.grid.len() - 1)
    }
}

/// The keys of a method's tuning runs, grid point by grid point.
pub fn tune_keys(args: &Args, t: &TaskCtx, method: MethodKind, head_lr: f32, steps: usize) -> Vec<(f32, Vec<Key>)> {
    args.grid(method)
        .into_iter()
        .map(|lr| {
            let (l, h) = rates(method, lr, head_lr);
            (lr, tune_seeds(args).into_iter().map(|s| t.key(Kind::Tune, method, l, h, s, steps)).collect())
        })
        .collect()
}

/// The pick from the journal; `None` while a tuning run is missing.
pub fn pick(args: &Args, t: &TaskCtx, j: &Journal, method: MethodKind, head_lr: f32, steps: usize) -> Option<Pick> {
    let grid: Vec<(f32, Vec<f64>)> = tune_keys(args, t, method, head_lr, steps)
        .into_iter()
        .map(|(lr, keys)| Some((lr, keys.iter().map(|k| j.find(k).map(|r| r.val.0)).collect::<Option<Vec<_>>>()?)))
        .collect::<Option<_>>()?;
    let scores: Vec<Vec<f64>> = grid.iter().map(|g| g.1.clone()).collect();
    let i = pick_best_mean(&scores).ok()?;
    Some(Pick { lr: grid[i].0, grid })
}

pub fn final_keys(args: &Args, t: &TaskCtx, method: MethodKind, lr: f32, head_lr: f32, steps: usize) -> Vec<Key> {
    let (l, h) = rates(method, lr, head_lr);
    (0..args.study_seeds as u64).map(|s| t.key(Kind::Final, method, l, h, s, steps)).collect()
}

/// Runs planned for a task: the probe, every grid point on every tuning seed, every
/// method on every run seed.
pub fn planned_runs(args: &Args) -> usize {
    let grids: usize = ORDER.iter().map(|&m| args.grid(m).len()).sum();
    usize::from(args.probe_steps > 0) + grids * args.tune_seeds + ORDER.len() * args.study_seeds
}

/// Counts of runs reused from the journal and run now.
#[derive(Default)]
pub struct Tally {
    pub reused: usize,
    pub ran: usize,
}

/// The run of `key` from the journal, or run now (on a fresh backend) and appended.
fn ensure(args: &Args, p: &train::Prepared, j: &mut Journal, key: Key, tally: &mut Tally) -> Result<Row> {
    if let Some(r) = j.find(&key) {
        tally.reused += 1;
        return Ok(r.clone());
    }
    let lr: f32 = key.lr.parse().unwrap_or(args.lr);
    let head_lr: f32 = key.head_lr.parse().unwrap_or(args.head_lr);
    let a = Args {
        method: key.method,
        lr: if key.method == MethodKind::Head { args.lr } else { lr },
        head_lr,
        seed: key.seed,
        steps: key.steps,
        // Tuning and final runs need one score at the end: no evaluation along the way.
        eval_every: if key.kind == Kind::Probe { args.eval_every } else { key.steps },
        ..args.clone()
    };
    let evals = match key.kind {
        Kind::Probe | Kind::Tune => Evals { untrained: false, validation: true, test: false },
        Kind::Final => Evals { untrained: false, validation: false, test: true },
    };
    let r: RunResult = match args.device {
        Device::Cpu => train::run(&Cpu::new(), p, &a, args.keep, true, evals, |_, _| Ok(()))?,
        Device::Cuda => train::run(&crate::cuda()?, p, &a, args.keep, true, evals, |_, _| Ok(()))?,
    };
    let val = r.val_curve.last().map_or((0.0, 0.0), |v| (v.1, v.2));
    let row = Row {
        val,
        test: r.test,
        mlp_params: r.mlp_trainable,
        head_params: r.head_trainable,
        steps_per_s: r.steps_per_s,
        peak_mib: r.peak_bytes as f64 / (1 << 20) as f64,
        wall_s: r.wall_s,
        cpu_s: r.cpu_s,
        curve: if key.kind == Kind::Probe { r.val_curve.iter().map(|v| (v.0, v.1)).collect() } else { Vec::new() },
        key,
    };
    eprintln!(
        "study {} {:?} {} lr {} head {} seed {} ({} steps): validation {:.4}, test {:.4}, {:.0} s",
        row.key.task,
        row.key.kind,
        row.key.method.name(),
        row.key.lr,
        row.key.head_lr,
        row.key.seed,
        row.key.steps,
        row.val.0,
        row.test.0,
        row.wall_s
    );
    j.append(row.clone())?;
    tally.ran += 1;
    Ok(row)
}

/// Every run of one task, in order: probe, head tuning, each method's tuning, finals.
pub fn run_task(args: &Args, t: &TaskCtx, p: &train::Prepared, j: &mut Journal, tally: &mut Tally) -> Result<()> {
    if args.probe_steps > 0 {
        ensure(args, p, j, probe_key(args, t), tally)?;
    }
    let steps = task_steps(args, t, j).unwrap_or(args.steps);
    let mut head_lr = args.head_lr;
    // Each method's finals right after its tuning: a study stopped midway has whole methods.
    for method in ORDER {
        for (_, keys) in tune_keys(args, t, method, head_lr, steps) {
            for key in keys {
                ensure(args, p, j, key, tally)?;
            }
        }
        let lr = pick(args, t, j, method, head_lr, steps)
            .ok_or_else(|| Error::invalid("--study", format!("no pick for {} after its tuning runs", method.name())))?
            .lr;
        if method == MethodKind::Head {
            head_lr = lr;
        }
        for key in final_keys(args, t, method, lr, head_lr, steps) {
            ensure(args, p, j, key, tally)?;
        }
    }
    Ok(())
}
