//! `sparsegrad step`: builds one [`SparseGradLinear`] from a safetensors file (weight, bias,
//! basis, inputs, output gradient, hyperparameters in the metadata), runs `steps` times
//! forward, backward and the optimizer step, and writes the first step's outputs and
//! gradients and the final weights, so another implementation can be checked against it.

use crate::args::{self, in_file, CliError, Opt};
use sparsegrad::io::{check_finite, SafetensorsFile, SafetensorsWriter};
use sparsegrad::{
    AdamParams, Backend, Basis, Cpu, Error, Formulation, Keep, Precision, Selection, SparseGradConfig, SparseGradLinear,
};
use std::ffi::OsString;

const HELP: &str = "\
sparsegrad step: run a SparseGrad linear layer y = x W^T + b for a few steps

Usage:
  sparsegrad step --input IN.safetensors --output OUT.safetensors

Input tensors (all F32):
  weight [out, in]   bias [out] (optional)   P [out, out]   Q [in, in] (orthogonal)
  x [T, in]          grad_y [T, out] (dL/dy, used at every step)
Input metadata (strings):
  keep          entries of the gradient of Wt = P^T W Q kept per step (1 ..= out*in)
  selection     `exact` or `sd` (sparse-by-dense, paper section 3.3)
  sd_threshold  for `sd`: relative threshold in [0, 1] (0 gives the exact result)
  lr, beta1, beta2, eps   Adam hyperparameters (SparseAdam on Wt, Adam on the bias,
                no weight decay)
  steps         number of forward/backward/optimizer steps (1 ..= 1000000; runs
                longer than 5 s print progress on stderr)
  formulation   optional: `transformed` or `merged` (default: the cheaper for T tokens;
                `sd` with a threshold above 0 needs `transformed`)
Other tensors and metadata keys are ignored.

Output tensors: from the first step `y` [T, out], `grad_x` [T, in], `grad_bias` [out]
(with a bias), `grad_indices` [k, 2] I64 (row, col of Wt, sorted by row * in + col),
`grad_values` [k]; after the last step `weight_transformed` (Wt) [out, in],
`weight` (P Wt Q^T) [out, in], `bias` [out] (with a bias).
Output metadata: `format` = sparsegrad-step, `formulation`, `selection`, `k`, `steps`.
The output is written atomically; on any error nothing is written.

Options:
  --input FILE    the input file
  --output FILE   where to write the results
  -h, --help      print this help
";

/// Most steps an input file may ask for: the outputs a check needs come from the first
/// step and the last, and a million steps of even a tiny layer take about a minute.
pub const MAX_STEPS: u64 = 1_000_000;
/// Seconds between progress lines on stderr once a run is that long.
const PROGRESS_EVERY_S: u64 = 5;

/// Everything read from the input file, checked.
struct Problem {
    out: usize,
    inp: usize,
    tokens: usize,
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    basis: Basis,
    x: Vec<f32>,
    grad_y: Vec<f32>,
    cfg: SparseGradConfig,
    steps: u64,
}

/// What the first step produced.
struct FirstStep {
    y: Vec<f32>,
    grad_x: Vec<f32>,
    grad_bias: Option<Vec<f32>>,
    rows: Vec<u32>,
    cols: Vec<u32>,
    values: Vec<f32>,
}

pub fn run(argv: &[OsString]) -> Result<(), CliError> {
    let opts = [Opt { name: "input", repeatable: false }, Opt { name: "output", repeatable: false }];
    let parsed = args::parse("step", argv, &opts)?;
    if parsed.help {
        crate::print_out(HELP);
        return Ok(());
    }
    let input = parsed.required("step", "input")?;
    let output = parsed.required("step", "output")?;
    let file = SafetensorsFile::open(&input)?;
    let problem = read_problem(&file).map_err(|e| in_file(&input, e))?;
    let writer = execute(&problem).map_err(|e| in_file(&input, e))?;
    writer.write(&output)?;
    Ok(())
}

fn read_problem(f: &SafetensorsFile) -> Result<Problem, Error> {
    let (weight, wshape) = f.tensor_f32_rank("weight", 2)?;
    let (out, inp) = (wshape[0], wshape[1]);
    if out == 0 || inp == 0 {
        return Err(shape_err("weight", "[out, in] with out, in >= 1", &wshape));
    }
    // A weight given as [in, out] would otherwise be reported on P, which is correct.
    if let (Some(&[po, po2]), Some(&[qi, qi2])) = (f.shape("P"), f.shape("Q")) {
        if po == po2 && qi == qi2 && po != qi && (out, inp) == (qi, po) {
            return Err(shape_err(
                "weight",
                &format!("[{po}, {qi}] ([out, in]: out = {po} from P [{po}, {po}], in = {qi} from Q [{qi}, {qi}]; given transposed?)"),
                &wshape,
            ));
        }
    }
    let p = f.tensor_f32_shaped("P", &[out, out])?;
    let q = f.tensor_f32_shaped("Q", &[inp, inp])?;
    let bias = if f.contains("bias") { Some(f.tensor_f32_shaped("bias", &[out])?) } else { None };
    let (x, xshape) = f.tensor_f32_rank("x", 2)?;
    if xshape[1] != inp || xshape[0] == 0 {
        return Err(shape_err("x", &format!("[T, {inp}] with T >= 1 (in = {inp} from weight)"), &xshape));
    }
    let tokens = xshape[0];
    let grad_y = f.tensor_f32_shaped("grad_y", &[tokens, out])?;
    for (name, data) in [("weight", &weight), ("P", &p), ("Q", &q), ("x", &x), ("grad_y", &grad_y)] {
        check_finite(&format!("tensor `{name}`"), data)?;
    }
    if let Some(b) = &bias {
        check_finite("tensor `bias`", b)?;
    }
    // The singular values are unknown here and unused by the layer; zeros pass validation.
    let basis = Basis::from_parts("P/Q", out, inp, p, q, vec![0.0; out], vec![0.0; inp], 0)?;

    let total = out * inp;
    let k: usize = f.meta_parse("keep")?;
    if k == 0 || k > total {
        return Err(meta_err("keep", format!("{k} is outside 1..={total} (the entries of the {out} x {inp} weight)")));
    }
    let selection = match f.meta_str("selection")?.trim() {
        "exact" => {
            // Unused, but a value that is present must still make sense.
            if let Some(t) = f.optional_meta_parse::<f32>("sd_threshold")? {
                check_threshold(t)?;
            }
            Selection::Exact
        }
        "sd" => {
            let t: f32 = f.meta_parse("sd_threshold")?;
            check_threshold(t)?;
            Selection::SparseByDense { threshold: t }
        }
        other => return Err(meta_err("selection", format!("`{other}` is not one of `exact`, `sd`"))),
    };
    let formulation = match f.optional_meta_str("formulation").map(str::trim) {
        None => None,
        Some("transformed") => Some(Formulation::Transformed),
        Some("merged") => {
            if matches!(selection, Selection::SparseByDense { threshold } if threshold > 0.0) {
                return Err(meta_err(
                    "formulation",
                    "`merged` cannot run selection `sd` with sd_threshold > 0 (it thresholds g P, which only `transformed` computes)".into(),
                ));
            }
            Some(Formulation::Merged)
        }
        Some(other) => return Err(meta_err("formulation", format!("`{other}` is not one of `transformed`, `merged`"))),
    };
    let adam = AdamParams {
        lr: hyper(f, "lr", |v| v >= 0.0, ">= 0")?,
        beta1: hyper(f, "beta1", |v| (0.0..1.0).contains(&v), "in [0, 1)")?,
        beta2: hyper(f, "beta2", |v| (0.0..1.0).contains(&v), "in [0, 1)")?,
        eps: hyper(f, "eps", |v| v > 0.0, "> 0")?,
        weight_decay: 0.0,
    };
    let steps: u64 = f.meta_parse("steps")?;
    if steps == 0 {
        return Err(meta_err("steps", "0: at least one step is needed (the outputs come from the first)".into()));
    }
    if steps > MAX_STEPS {
        return Err(meta_err("steps", format!("{steps} is more than the {MAX_STEPS} this command runs")));
    }
    let cfg = SparseGradConfig {
        keep: Keep::Count(k),
        selection,
        formulation,
        merged_update: None,
        expected_tokens: tokens,
        optimizer: sparsegrad::Optimizer::Adam(adam),
        precision: Precision::Full,
    };
    Ok(Problem { out, inp, tokens, weight, bias, basis, x, grad_y, cfg, steps })
}

fn shape_err(name: &str, expected: &str, got: &[usize]) -> Error {
    Error::Shape {
        op: "sparsegrad step",
        what: format!("tensor `{name}`"),
        expected: expected.into(),
        got: format!("{got:?}"),
    }
}

fn meta_err(key: &str, msg: String) -> Error {
    Error::Metadata { key: key.into(), msg }
}

fn check_threshold(t: f32) -> Result<(), Error> {
    if t.is_finite() && t.is_sign_positive() && (0.0..=1.0).contains(&t) {
        Ok(())
    } else {
        Err(meta_err("sd_threshold", format!("{t} is outside [0, 1]")))
    }
}

/// A finite f32 hyperparameter satisfying `ok`; every one is non-negative, and `-0` (a
/// negative zero, which `>= 0` lets through) is refused with them. Errors show the text the
/// file holds: a value such as `1e-50` rounds to 0 in f32, and "0 must be > 0" would
/// confuse.
fn hyper(f: &SafetensorsFile, key: &str, ok: impl Fn(f32) -> bool, range: &str) -> Result<f32, Error> {
    let v: f32 = f.meta_parse(key)?;
    if v.is_finite() && v.is_sign_positive() && ok(v) {
        Ok(v)
    } else {
        let text = sparsegrad::io::fs::escape(f.meta_str(key)?.trim(), 100);
        let as_f32 = if text == v.to_string() { String::new() } else { format!(" ({v} in f32)") };
        let negative_zero = if v == 0.0 && v.is_sign_negative() { " (a negative zero: write 0)" } else { "" };
        Err(meta_err(key, format!("`{text}`{as_f32} must be finite and {range}{negative_zero}")))
    }
}

/// Runs the steps and collects the outputs.
fn execute(p: &Problem) -> Result<SafetensorsWriter, Error> {
    let cpu = Cpu::new();
    let (out, inp, t) = (p.out, p.inp, p.tokens);
    let mut layer = SparseGradLinear::<Cpu, f32>::new(&cpu, &p.weight, p.bias.as_deref(), &p.basis, p.cfg)?;
    let x = cpu.upload(&p.x)?;
    let g = cpu.upload(&p.grad_y)?;
    let mut y = cpu.alloc::<f32>(t * out)?;
    let mut dx = cpu.alloc::<f32>(t * inp)?;
    let mut first = None;
    let started = std::time::Instant::now();
    let mut last_report = started;
    for s in 0..p.steps {
        // Long runs say where they are (stderr, so the output protocol is untouched).
        if last_report.elapsed().as_secs() >= PROGRESS_EVERY_S {
            last_report = std::time::Instant::now();
            eprintln!("step {s}/{} ({:.0} s)", p.steps, started.elapsed().as_secs_f64());
        }
        layer.forward(&x, t, &mut y)?;
        if s == 0 {
            layer.backward(&g, t, Some(&mut dx))?;
            let grad = layer.grad_host()?;
            let grad_bias = layer.bias_grad_host()?;
            first = Some(FirstStep {
                y: y.to_vec(),
                grad_x: dx.to_vec(),
                grad_bias,
                rows: grad.rows,
                cols: grad.cols,
                values: grad.values,
            });
        } else {
            layer.backward(&g, t, None)?;
        }
        layer.step()?;
    }
    let first = first.ok_or_else(|| meta_err("steps", "0: at least one step is needed".into()))?;
    let wt = layer.weight_transformed()?;
    let w = layer.merged_weight()?;
    let bias = layer.bias_host()?;

    // Overflow (e.g. huge inputs) must not reach the file as inf/NaN.
    let mut outputs: Vec<(&str, Vec<usize>, Vec<f32>)> = vec![
        ("y", vec![t, out], first.y),
        ("grad_x", vec![t, inp], first.grad_x),
        ("grad_values", vec![first.values.len()], first.values),
    ];
    if let Some(db) = first.grad_bias {
        outputs.push(("grad_bias", vec![out], db));
    }
    outputs.push(("weight_transformed", vec![out, inp], wt));
    outputs.push(("weight", vec![out, inp], w));
    if let Some(b) = bias {
        outputs.push(("bias", vec![out], b));
    }
    let mut writer = SafetensorsWriter::new();
    for (name, shape, data) in outputs {
        check_finite(&format!("output `{name}` (inputs or learning rate too large?)"), &data)?;
        writer.add_f32(name, &shape, data)?;
    }
    let k = first.rows.len();
    let indices: Vec<i64> = first.rows.iter().zip(&first.cols).flat_map(|(&r, &c)| [r as i64, c as i64]).collect();
    writer.add_i64("grad_indices", &[k, 2], indices)?;
    writer.set_metadata("format", "sparsegrad-step");
    let formulation = match layer.formulation() {
        Formulation::Transformed => "transformed",
        Formulation::Merged => "merged",
    };
    writer.set_metadata("formulation", formulation);
    let selection = match p.cfg.selection {
        Selection::Exact => "exact",
        Selection::SparseByDense { .. } => "sd",
    };
    writer.set_metadata("selection", selection);
    writer.set_metadata("k", k.to_string());
    writer.set_metadata("steps", p.steps.to_string());
    Ok(writer)
}
