//! The study's report from its journal: per task the probe and the steps, the tuning
//! grid with the picks, test accuracy at the picked rates over the run seeds, paired
//! differences against head-only and against LoRA with Student-t 95% intervals, and a
//! plot of accuracy against trainable parameters. A study still running renders too:
//! missing runs are named as missing.

use crate::args::{Args, MethodKind};
use crate::journal::{Journal, Row};
use crate::plot;
use crate::study::{self, Pick, TaskCtx, ORDER};
use sparsegrad::recipes::classify::{paired_difference, student_t_975, PairedDifference};
use sparsegrad::Result;
use std::fmt::Write as _;

/// One method of one task as far as the journal goes.
struct MethodResult {
    method: MethodKind,
    pick: Option<Pick>,
    /// The final runs, seed by seed, once all are done.
    finals: Option<Vec<Row>>,
}

impl MethodResult {
    fn test(&self) -> Option<Vec<f64>> {
        self.finals.as_ref().map(|f| f.iter().map(|r| r.test.0).collect())
    }
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 { v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64 } else { 0.0 };
    (m, var.sqrt())
}

/// Half width of the t 95% interval of a mean; 0 below two values.
fn half_width(v: &[f64]) -> f64 {
    let (_, sd) = mean_sd(v);
    student_t_975(v.len().saturating_sub(1)).map_or(0.0, |t| t * sd / (v.len() as f64).sqrt())
}

fn results(args: &Args, t: &TaskCtx, j: &Journal, steps: usize) -> Vec<MethodResult> {
    let head = study::pick(args, t, j, MethodKind::Head, args.head_lr, steps);
    let head_lr = head.as_ref().map(|p| p.lr);
    ORDER
        .iter()
        .map(|&method| {
            let pick = if method == MethodKind::Head {
                study::pick(args, t, j, method, args.head_lr, steps)
            } else {
                head_lr.and_then(|h| study::pick(args, t, j, method, h, steps))
            };
            let finals = match (&pick, head_lr) {
                (Some(p), Some(h)) => study::final_keys(args, t, method, p.lr, h, steps)
                    .iter()
                    .map(|k| j.find(k).cloned())
                    .collect::<Option<Vec<_>>>(),
                _ => None,
            };
            MethodResult { method, pick, finals }
        })
        .collect()
}

/// `lr: mean validation accuracy (seeds done)` for every grid point with a run so far.
fn tune_progress(
    args: &Args,
    t: &TaskCtx,
    j: &Journal,
    method: MethodKind,
    head_lr: Option<f32>,
    steps: usize,
) -> Vec<String> {
    let head_lr = if method == MethodKind::Head { Some(args.head_lr) } else { head_lr };
    let Some(head_lr) = head_lr else { return Vec::new() };
    study::tune_keys(args, t, method, head_lr, steps)
        .into_iter()
        .filter_map(|(lr, keys)| {
            let v: Vec<f64> = keys.iter().filter_map(|k| j.find(k).map(|r| r.val.0)).collect();
            (!v.is_empty()).then(|| format!("{lr:e}: {:.4} ({} of {} seeds)", mean_sd(&v).0, v.len(), keys.len()))
        })
        .collect()
}

fn points(d: f64) -> String {
    format!("{:+.1}", 100.0 * d)
}

fn verdict(d: &PairedDifference) -> &'static str {
    if d.covers_zero() {
        "no difference"
    } else if d.lower > 0.0 {
        "better"
    } else {
        "worse"
    }
}

fn diff_cells(a: &MethodResult, b: Option<&MethodResult>) -> String {
    let (Some(x), Some(y)) = (a.test(), b.and_then(|b| b.test())) else { return "| | ".into() };
    match paired_difference(&x, &y) {
        Ok(d) => format!("| {} [{}, {}] | {} ", points(d.mean), points(d.lower), points(d.upper), verdict(&d)),
        Err(e) => format!("| {e} | "),
    }
}

fn section(args: &Args, t: &TaskCtx, j: &Journal, md: &mut String, summary: &mut String) -> Result<()> {
    let s = &t.split;
    let _ = writeln!(
        md,
        "\n## {}\n\n{} classes ({}); split seed {} (fingerprint `{}`): {} train / {} validation / {} test sentences.\n",
        t.name,
        s.labels.len(),
        s.labels.join(", "),
        args.split_seed,
        t.fingerprint,
        s.train.len(),
        s.validation.len(),
        s.test.len()
    );
    if args.probe_steps > 0 {
        let key = study::probe_key(args, t);
        match j.find(&key) {
            None => {
                let _ = writeln!(md, "The probe run has not run yet.");
                return Ok(());
            }
            Some(r) => {
                let curve: Vec<String> = r.curve.iter().map(|(s, a)| format!("{s}: {a:.3}")).collect();
                let plateau = study::plateau_step(&r.curve, s.validation.len());
                let _ = writeln!(
                    md,
                    "Steps: a probe run of full fine-tuning (MLP lr {}, head lr {}, seed {}) for {} steps, validation \
                     accuracy every {} steps: {}. Its validation accuracy stopped improving (first evaluation within \
                     one standard error of the best) at step {}; every run of this task trains {} steps{}.\n",
                    key.lr,
                    key.head_lr,
                    key.seed,
                    key.steps,
                    args.eval_every,
                    curve.join(", "),
                    plateau.map_or("?".into(), |p| p.to_string()),
                    study::task_steps(args, t, j).unwrap_or(args.steps),
                    if plateau.is_some_and(|p| p > args.steps) {
                        format!(" (capped by --steps {})", args.steps)
                    } else {
                        String::new()
                    }
                );
            }
        }
    } else {
        let _ = writeln!(md, "Steps: {} for every run (no probe).\n", args.steps);
    }
    let steps = study::task_steps(args, t, j).unwrap_or(args.steps);
    let res = results(args, t, j, steps);
    let seeds = study::tune_seeds(args);
    let _ = writeln!(
        md,
        "Learning rates: mean validation accuracy over tuning seeds {seeds:?} per grid point (head: the head's rate, \
         MLPs frozen; the others: MLP rate, head at the head's pick); **picked**, `edge` where the pick is the \
         grid's first or last point.\n\n| method | grid: mean validation accuracy | picked |\n|---|---|---|"
    );
    let head_lr = res.iter().find(|r| r.method == MethodKind::Head).and_then(|r| r.pick.as_ref()).map(|p| p.lr);
    for r in &res {
        let Some(p) = &r.pick else {
            // What the journal holds so far: the mean over the seeds done at each rate.
            let done: Vec<String> = tune_progress(args, t, j, r.method, head_lr, steps);
            let so_far = if done.is_empty() { "no grid point run yet".to_string() } else { done.join(" · ") };
            let _ = writeln!(md, "| {} | not finished: {so_far} | |", r.method.name());
            continue;
        };
        let cells: Vec<String> = p
            .grid
            .iter()
            .map(|(lr, v)| {
                let m = mean_sd(v).0;
                if *lr == p.lr {
                    format!("**{lr:e}: {m:.4}**")
                } else {
                    format!("{lr:e}: {m:.4}")
                }
            })
            .collect();
        let edge = if p.at_edge() { " `edge`" } else { "" };
        let _ = writeln!(md, "| {} | {} | {:e}{edge} |", r.method.name(), cells.join(" · "), p.lr);
    }
    let _ = writeln!(
        md,
        "\nTest accuracy at the picked rates, run seeds 0 to {} (mean ± standard deviation; 95% t interval of the \
         mean); speed and backend peak memory of the same runs.\n\n| method | lr | trainable params (MLP + head) | \
         test accuracy | 95% interval | per seed | macro-F1 | steps/s | peak MiB | CPU s/run |\n\
         |---|---|---:|---|---|---|---|---:|---:|---:|",
        args.study_seeds - 1
    );
    // Per method one point: (trainable parameters, mean test accuracy, 95% half width).
    let mut series_pts: Vec<(MethodKind, [plot::Point; 1])> = Vec::new();
    for r in &res {
        let (Some(p), Some(f)) = (&r.pick, &r.finals) else {
            let _ = writeln!(md, "| {} | not finished | | | | | | | | |", r.method.name());
            continue;
        };
        let acc: Vec<f64> = f.iter().map(|x| x.test.0).collect();
        let f1: Vec<f64> = f.iter().map(|x| x.test.1).collect();
        let (m, sd) = mean_sd(&acc);
        let hw = half_width(&acc);
        let params = f[0].mlp_params + f[0].head_params;
        let n = f.len() as f64;
        let _ = writeln!(
            md,
            "| {} | {:e} | {params} | {m:.4} ± {sd:.4} | [{:.4}, {:.4}] | {} | {:.4} | {:.2} | {:.0} | {:.0} |",
            r.method.name(),
            p.lr,
            m - hw,
            m + hw,
            acc.iter().map(|a| format!("{a:.3}")).collect::<Vec<_>>().join(" "),
            mean_sd(&f1).0,
            f.iter().map(|x| x.steps_per_s).sum::<f64>() / n,
            f.iter().map(|x| x.peak_mib).fold(0.0, f64::max),
            f.iter().map(|x| x.cpu_s).sum::<f64>() / n,
        );
        // SparseGrad and MeProp train as many parameters: drawn side by side (5%, 0.02 decades, apart on
        // the log axis) so neither hides the other.
        let same = series_pts.iter().filter(|p| p.1[0].0.round() as usize == params).count();
        series_pts.push((r.method, [(params as f64 * 1.05f64.powi(same as i32), m, hw)]));
    }
    let by = |m: MethodKind| res.iter().find(|r| r.method == m);
    let _ = writeln!(
        md,
        "\nPaired differences of test accuracy (percentage points, method minus baseline, same run seed; mean and \
         95% t interval over {} seeds):\n\n| method | vs head only | | vs LoRA | |\n|---|---|---|---|---|",
        args.study_seeds
    );
    for r in &res {
        let vs_head = if r.method == MethodKind::Head { "| | ".into() } else { diff_cells(r, by(MethodKind::Head)) };
        let vs_lora = if r.method == MethodKind::Lora { "| | ".into() } else { diff_cells(r, by(MethodKind::Lora)) };
        let _ = writeln!(md, "| {} {vs_head}{vs_lora}|", r.method.name());
    }
    let png = format!("study_{}.png", t.slug());
    if !series_pts.is_empty() {
        let series: Vec<plot::Series> = series_pts
            .iter()
            .map(|(m, pts)| plot::Series {
                label: m.name(),
                color: plot::PALETTE[ORDER.iter().position(|o| o == m).unwrap_or(0) % plot::PALETTE.len()],
                points: pts,
            })
            .collect();
        plot::chart(
            &args.out.join(&png),
            &format!("{}: test accuracy (95% interval) vs trainable parameters", t.slug()),
            "trainable parameters, MLP + head",
            "test accuracy",
            &series,
            true,
        )?;
        let _ = writeln!(
            md,
            "\n![test accuracy vs trainable parameters]({png})\n\n(Error bars: the 95% t interval of the mean test \
             accuracy; methods with equal parameter counts are drawn side by side.)"
        );
    }
    let cells: Vec<String> = res
        .iter()
        .map(|r| r.test().map_or("-".into(), |v| format!("{:.4} ± {:.4}", mean_sd(&v).0, half_width(&v))))
        .collect();
    let _ = writeln!(summary, "| {} | {} |", t.name, cells.join(" | "));
    Ok(())
}

/// study.md's text; writes the plots beside it.
pub fn render(args: &Args, tasks: &[TaskCtx], j: &Journal) -> Result<String> {
    let mut body = String::new();
    let mut summary =
        format!("| task | {} |\n|---|{}\n", ORDER.map(|m| m.name()).join(" | "), "---|".repeat(ORDER.len()));
    for t in tasks {
        section(args, t, j, &mut body, &mut summary)?;
    }
    let mine: Vec<&Row> = j
        .rows
        .iter()
        .filter(|r| {
            tasks
                .iter()
                .any(|t| r.key.task == t.name && r.key.split == t.fingerprint && r.key.config.starts_with(&t.config))
        })
        .collect();
    let planned = study::planned_runs(args) * tasks.len();
    let grids: Vec<String> = ORDER
        .iter()
        .map(|&m| {
            format!("{} {}", m.name(), args.grid(m).iter().map(|g| format!("{g:e}")).collect::<Vec<_>>().join(","))
        })
        .collect();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# bert_classify study\n\nModel `{}`, MLP blocks {}, attention frozen; batch {}, max_len {}, pooling {:?}; \
         SparseGrad and MeProp keep {}% of each MLP weight's entries (SparseGrad: {} selection, {} preliminary \
         batches), LoRA at the rank with as many parameters; AdamW for the head, dense parameters and LoRA, \
         SparseAdam for the sparse methods. Learning-rate grids: {}. Tuning seeds {:?} (validation), run seeds \
         0 to {} (test).\n\nRuns in the journal for these tasks and settings: {} of {} planned{}; {:.2} h wall, \
         {:.2} h CPU (user + system).\n\nMean test accuracy at the picked rates ± the 95% t half width:\n\n{summary}",
        args.model.display(),
        args.layers.as_ref().map_or("all".to_string(), |l| format!("{l:?}")),
        args.batch,
        args.max_len,
        args.pooling,
        100.0 * args.keep,
        args.sd_threshold.map_or("exact".into(), |t| format!("sparse-by-dense (threshold {t})")),
        args.prelim_steps,
        grids.join("; "),
        study::tune_seeds(args),
        args.study_seeds - 1,
        mine.len(),
        planned,
        if mine.len() < planned { " (the study is not finished; rerunning its command resumes it)" } else { "" },
        mine.iter().map(|r| r.wall_s).sum::<f64>() / 3600.0,
        mine.iter().map(|r| r.cpu_s).sum::<f64>() / 3600.0,
    );
    md.push_str(&body);
    Ok(md)
}
