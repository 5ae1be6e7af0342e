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
}

/// The parsed command line, defaults filled in.
#[derive(Clone, Debug)]
pub struct Args {
    pub model: PathBuf,
    pub data: PathBuf,
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
    pub eval_limit: usize,
    pub test_limit: usize,
    pub margin: f32,
    pub seed: u64,
    pub study: bool,
    pub premise: bool,
    pub study_seeds: usize,
}

pub const HELP: &str = "\
bert_classify: fine-tune the MLP blocks of a BERT encoder (attention frozen) plus a dense
classification head, with SparseGrad, LoRA, MeProp or full fine-tuning.

usage: bert_classify [flags]
  --model DIR          HF BERT folder: config.json, model.safetensors, tokenizer.json
                       (default assets/all-MiniLM-L6-v2)
  --data FILE          VADER *_GroundTruth.txt (label = sign of the rating) or a
                       label<TAB>text TSV (default the movie review snippets)
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
  --eval-limit N       validation sentences evaluated during training (default 400)
  --test-limit N       test sentences scored at the end (default all)
  --margin F           VADER: drop |rating| < F (default 0.5)
  --seed N             split, batches and initialisation (default 0)
  --study              methods x keep 0.5%/1%/2% x seeds; writes study.md and study.png
  --premise            measure the method's premise only: the top-1% share of the MLP
                       gradients' energy, original vs basis (per type, per layer)
  --study-seeds N      seeds of the study (default 3)
  --help";

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
        data: DEFAULT_DATA.into(),
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
        eval_limit: 400,
        test_limit: usize::MAX,
        margin: 0.5,
        seed: 0,
        study: false,
        premise: false,
        study_seeds: 3,
    };
    let mut selection_sd = false;
    let mut threshold = 0.0f32;
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let f = flag.as_str();
        match f {
            "--help" | "-h" => return Ok(None),
            "--model" => a.model = value(f, &mut it)?.into(),
            "--data" => a.data = value(f, &mut it)?.into(),
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
            "--eval-limit" => a.eval_limit = num(f, value(f, &mut it)?)?,
            "--test-limit" => a.test_limit = num(f, value(f, &mut it)?)?,
            "--margin" => a.margin = num(f, value(f, &mut it)?)?,
            "--seed" => a.seed = num(f, value(f, &mut it)?)?,
            "--study" => a.study = true,
            "--premise" => a.premise = true,
            "--study-seeds" => a.study_seeds = num(f, value(f, &mut it)?)?,
            other => return Err(Error::invalid("command line", format!("unknown flag `{other}` (see --help)"))),
        }
    }
    a.sd_threshold = selection_sd.then_some(threshold);
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
    if a.study && a.study_seeds == 0 {
        return bad("--study-seeds must be positive".into());
    }
    Ok(Some(a))
}
