//! Command line of the `bert_classify` example: flags, defaults and `--help`. Every
//! problem is one `sparsegrad::Error` naming the flag, so `main` prints one `error:` line.

use sparsegrad::{Error, PoolKind, Result};
use std::path::PathBuf;

pub const DEFAULT_MODEL: &str = "assets/all-MiniLM-L6-v2";
pub const DEFAULT_DATA: &str = "assets/vader/movieReviewSnippets_GroundTruth.txt";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MethodKind {
    SparseGrad,
    Lora,
    MeProp,
    Full,
    /// The baseline: every MLP frozen, only the head trains.
    Head,
}

impl MethodKind {
    pub fn name(self) -> &'static str {
        match self {
            MethodKind::SparseGrad => "sparsegrad",
            MethodKind::Lora => "lora",
            MethodKind::MeProp => "meprop",
            MethodKind::Full => "full",
            MethodKind::Head => "head",
        }
    }
    pub const ALL: [MethodKind; 5] =
        [MethodKind::SparseGrad, MethodKind::Lora, MethodKind::MeProp, MethodKind::Full, MethodKind::Head];

    /// The study's default learning-rate grid: five values a half decade apart around the
    /// method's usual range (for `Head`: the head's own rate).
    pub fn default_grid(self) -> Vec<f32> {
        match self {
            MethodKind::Head => vec![1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
            MethodKind::Full => vec![1e-5, 3e-5, 1e-4, 3e-4, 1e-3],
            MethodKind::SparseGrad | MethodKind::MeProp | MethodKind::Lora => vec![1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
        }
    }
}

/// The parsed command line, defaults filled in.
#[derive(Clone, Debug)]
pub struct Args {
    pub model: PathBuf,
    /// Task files; more than one only with `--study`.
    pub data: Vec<PathBuf>,
    pub out: PathBuf,
    pub method: MethodKind,
    pub keep: f64,
    /// `None`: exact selection; `Some(t)`: sparse-by-dense with threshold `t`.
    pub sd_threshold: Option<f32>,
    /// MLP layers that train (`None`: all).
    pub layers: Option<Vec<usize>>,
    pub pooling: PoolKind,
    pub device: Device,
    pub steps: usize,
    pub batch: usize,
    pub max_len: usize,
    pub lr: f32,
    pub head_lr: f32,
    pub prelim_steps: usize,
    pub per_layer_basis: bool,
    pub eval_every: usize,
    /// `None`: 400 sentences in a single run, the whole validation set in a study.
    pub eval_limit: Option<usize>,
    pub test_limit: usize,
    pub margin: f32,
    /// Initialisation (head, LoRA) and data order; the split has its own seed.
    pub seed: u64,
    pub split_seed: u64,
    pub study: bool,
    /// Render the study's report from its journal without running anything.
    pub study_report: bool,
    pub premise: bool,
    /// Run seeds of the study (0..N): test accuracy at the picked rates.
    pub study_seeds: usize,
    /// Tuning seeds of the study (1000..1000+N): validation accuracy per grid point.
    pub tune_seeds: usize,
    /// Learning-rate grids replacing [`MethodKind::default_grid`].
    pub lr_grids: Vec<(MethodKind, Vec<f32>)>,
    /// Longest probe run (full fine-tuning) that sets a study task's steps; 0: no probe,
    /// every task trains `steps`.
    pub probe_steps: usize,
}

impl Args {
    pub fn eval_limit(&self) -> usize {
        self.eval_limit.unwrap_or(if self.study { usize::MAX } else { 400 })
    }

    /// The study's learning-rate grid of `method`, ascending.
    pub fn grid(&self, method: MethodKind) -> Vec<f32> {
        self.lr_grids.iter().rev().find(|g| g.0 == method).map_or_else(|| method.default_grid(), |g| g.1.clone())
    }

    /// The single task file of a run that is not a study.
    pub fn task(&self) -> &std::path::Path {
        &self.data[0]
    }
}

pub const HELP: &str = "\
bert_classify: fine-tune the MLP blocks of a BERT encoder (attention frozen) plus a dense
classification head, with SparseGrad, LoRA, MeProp or full fine-tuning.

usage: bert_classify [flags]
  --model DIR          HF BERT folder: config.json, model.safetensors, tokenizer.json
                       (default assets/all-MiniLM-L6-v2)
  --data FILE          VADER *_GroundTruth.txt (label = sign of the rating) or a
                       label<TAB>text TSV (default the movie review snippets); with
                       --study it may be given several times (one task each)
  --out DIR            results: metrics.csv, curves.png, adapter, merged model
                       (default target/bert_classify)
  --method M           sparsegrad | lora | meprop | full | head (head: MLPs frozen, the
                       baseline; default sparsegrad)
  --keep F             fraction of each MLP weight's entries trained per step
                       (default 0.01); LoRA takes the rank with as many parameters
  --selection S        exact | sd (sparse-by-dense, paper section 3.3; default exact)
  --threshold T        sd threshold relative to max |gt| (default 0: exact result)
  --layers L           all, or a comma list of layer indices (default all)
  --pooling P          mean | cls (default mean)
  --device D           cpu | cuda (default cpu)
  --steps N            training steps (default 150)
  --batch N            sentences per step (default 16)
  --max-len N          tokens per sentence, [CLS] and [SEP] included (default 64)
  --lr F               MLP learning rate (default 2e-4)
  --head-lr F          head learning rate, AdamW (default 1e-2)
  --prelim-steps N     SparseGrad preliminary phase (default 20)
  --per-layer-basis    one basis per layer instead of one per projection type
  --eval-every N       validation every N steps (default 50)
  --eval-limit N       validation sentences evaluated during training (default 400; in
                       a study the whole validation set)
  --test-limit N       test sentences scored at the end (default all)
  --margin F           VADER: drop |rating| < F (default 0.5)
  --seed N             data order and initialisation (default 0)
  --split-seed N       the train/validation/test split (80/10/10; default 0)
  --premise            measure the method's premise only: the top-1% share of the MLP
                       gradients' energy, original vs basis (per type, per layer)
  --study              per task: tune the head's rate (head only), then each method's
                       MLP rate with it, on mean validation accuracy over the tuning
                       seeds; then test accuracy at the picked rates over the run seeds,
                       paired differences vs head-only and vs LoRA. Every run is appended
                       to --out/study_runs.tsv and a rerun skips the runs found there; writes
                       study.md and study_<task>.png
  --study-report       render study.md and the plots from study_runs.tsv, running nothing
  --study-seeds N      run seeds 0..N (default 5)
  --tune-seeds N       tuning seeds 1000..1000+N (default 2)
  --lr-grid M=A,B,..   learning rates tried for method M (head: the head's rate);
                       default 5 per method, half a decade apart
  --probe-steps N      per task, first train full fine-tuning up to N steps (validation
                       every --eval-every) and train every run of the task until its
                       validation accuracy stopped improving, at most --steps (default
                       0: no probe, --steps for all)
  --help";

/// `method=lr,lr,...`: a grid, returned ascending; rates must be positive and distinct.
fn lr_grid(v: &str) -> Result<(MethodKind, Vec<f32>)> {
    let bad = |msg: String| Error::invalid("command line", format!("--lr-grid `{v}`: {msg}"));
    let (m, rates) = v.split_once('=').ok_or_else(|| bad("expected METHOD=LR,LR,...".into()))?;
    let method = MethodKind::ALL
        .into_iter()
        .find(|k| k.name() == m.trim())
        .ok_or_else(|| bad(format!("unknown method `{m}` (sparsegrad, lora, meprop, full, head)")))?;
    let mut grid = rates.split(',').map(|r| num::<f32>("--lr-grid", r.trim())).collect::<Result<Vec<_>>>()?;
    if grid.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
        return Err(bad("every rate must be positive".into()));
    }
    grid.sort_by(f32::total_cmp);
    if grid.windows(2).any(|w| w[0] == w[1]) {
        return Err(bad("a rate is repeated".into()));
    }
    Ok((method, grid))
}

fn value<'a>(flag: &str, it: &mut impl Iterator<Item = &'a String>) -> Result<&'a String> {
    it.next().ok_or_else(|| Error::invalid("command line", format!("{flag} needs a value")))
}

fn num<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T> {
    v.parse().map_err(|_| Error::invalid("command line", format!("{flag}: `{v}` is not a valid number")))
}

/// Parses `argv` (without the program name); `Ok(None)` for `--help`.
pub fn parse(argv: &[String]) -> Result<Option<Args>> {
    let mut a = Args {
        model: DEFAULT_MODEL.into(),
        data: Vec::new(),
        out: "target/bert_classify".into(),
        method: MethodKind::SparseGrad,
        keep: 0.01,
        sd_threshold: None,
        layers: None,
        pooling: PoolKind::Mean,
        device: Device::Cpu,
        steps: 150,
        batch: 16,
        max_len: 64,
        lr: 2e-4,
        head_lr: 1e-2,
        prelim_steps: 20,
        per_layer_basis: false,
        eval_every: 50,
        eval_limit: None,
        test_limit: usize::MAX,
        margin: 0.5,
        seed: 0,
        split_seed: 0,
        study: false,
        study_report: false,
        premise: false,
        study_seeds: 5,
        tune_seeds: 2,
        lr_grids: Vec::new(),
        probe_steps: 0,
    };
    let mut selection_sd = false;
    let mut threshold = 0.0f32;
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let f = flag.as_str();
        match f {
            "--help" | "-h" => return Ok(None),
            "--model" => a.model = value(f, &mut it)?.into(),
            "--data" => a.data.push(value(f, &mut it)?.into()),
            "--out" => a.out = value(f, &mut it)?.into(),
            "--method" => {
                let v = value(f, &mut it)?;
                a.method = MethodKind::ALL.into_iter().find(|m| m.name() == v).ok_or_else(|| {
                    Error::invalid("command line", format!("--method: `{v}` (sparsegrad, lora, meprop, full, head)"))
                })?;
            }
            "--keep" => a.keep = num(f, value(f, &mut it)?)?,
            "--selection" => {
                selection_sd = match value(f, &mut it)?.as_str() {
                    "exact" => false,
                    "sd" => true,
                    v => return Err(Error::invalid("command line", format!("--selection: `{v}` (exact, sd)"))),
                }
            }
            "--threshold" => threshold = num(f, value(f, &mut it)?)?,
            "--layers" => {
                let v = value(f, &mut it)?;
                a.layers = if v == "all" {
                    None
                } else {
                    Some(v.split(',').map(|s| num::<usize>(f, s.trim())).collect::<Result<Vec<_>>>()?)
                };
            }
            "--pooling" => {
                a.pooling = match value(f, &mut it)?.as_str() {
                    "mean" => PoolKind::Mean,
                    "cls" => PoolKind::Cls,
                    v => return Err(Error::invalid("command line", format!("--pooling: `{v}` (mean, cls)"))),
                }
            }
            "--device" => {
                a.device = match value(f, &mut it)?.as_str() {
                    "cpu" => Device::Cpu,
                    "cuda" => Device::Cuda,
                    v => return Err(Error::invalid("command line", format!("--device: `{v}` (cpu, cuda)"))),
                }
            }
            "--steps" => a.steps = num(f, value(f, &mut it)?)?,
            "--batch" => a.batch = num(f, value(f, &mut it)?)?,
            "--max-len" => a.max_len = num(f, value(f, &mut it)?)?,
            "--lr" => a.lr = num(f, value(f, &mut it)?)?,
            "--head-lr" => a.head_lr = num(f, value(f, &mut it)?)?,
            "--prelim-steps" => a.prelim_steps = num(f, value(f, &mut it)?)?,
            "--per-layer-basis" => a.per_layer_basis = true,
            "--eval-every" => a.eval_every = num(f, value(f, &mut it)?)?,
            "--eval-limit" => a.eval_limit = Some(num(f, value(f, &mut it)?)?),
            "--test-limit" => a.test_limit = num(f, value(f, &mut it)?)?,
            "--margin" => a.margin = num(f, value(f, &mut it)?)?,
            "--seed" => a.seed = num(f, value(f, &mut it)?)?,
            "--split-seed" => a.split_seed = num(f, value(f, &mut it)?)?,
            "--study" => a.study = true,
            "--study-report" => (a.study, a.study_report) = (true, true),
            "--premise" => a.premise = true,
            "--study-seeds" => a.study_seeds = num(f, value(f, &mut it)?)?,
            "--tune-seeds" => a.tune_seeds = num(f, value(f, &mut it)?)?,
            "--probe-steps" => a.probe_steps = num(f, value(f, &mut it)?)?,
            "--lr-grid" => a.lr_grids.push(lr_grid(value(f, &mut it)?)?),
            other => return Err(Error::invalid("command line", format!("unknown flag `{other}` (see --help)"))),
        }
    }
    a.sd_threshold = selection_sd.then_some(threshold);
    if a.data.is_empty() {
        a.data.push(DEFAULT_DATA.into());
    }
    let bad = |msg: String| Err(Error::invalid("command line", msg));
    if !(a.keep > 0.0 && a.keep <= 1.0) {
        return bad(format!("--keep {} must be in (0, 1]", a.keep));
    }
    if !(threshold.is_finite() && (0.0..1.0).contains(&threshold)) {
        return bad(format!("--threshold {threshold} must be in [0, 1)"));
    }
    if a.batch == 0 || a.steps == 0 {
        return bad("--batch and --steps must be positive".into());
    }
    if a.max_len < 2 || a.max_len > 512 {
        return bad(format!("--max-len {} must be in 2..=512", a.max_len));
    }
    if !(a.lr.is_finite() && a.lr > 0.0 && a.head_lr.is_finite() && a.head_lr > 0.0) {
        return bad("--lr and --head-lr must be positive".into());
    }
    if a.method == MethodKind::SparseGrad && a.prelim_steps == 0 {
        return bad("--prelim-steps must be positive for sparsegrad (the basis comes from it)".into());
    }
    if a.data.len() > 1 && !a.study {
        return bad("--data may be given more than once only with --study".into());
    }
    if a.study && (a.study_seeds < 2 || a.tune_seeds == 0) {
        return bad(format!(
            "--study-seeds {} must be at least 2 (a paired interval needs two seeds) and --tune-seeds {} positive",
            a.study_seeds, a.tune_seeds
        ));
    }
    Ok(Some(a))
}
