//! What a run leaves behind: `loss_curve.csv`, `adapter.safetensors`, `merged/` (the
//! merged model as Hugging Face f32 safetensors, config.json and tokenizer.json), the
//! end-of-run summary, and the `--compare` table (printed and as `compare.md`).

use sparsegrad::adapter::{save_adapter, AdapterEntry};
use sparsegrad::io::fs::write_atomic;
use sparsegrad::model::llama::{LlamaModel, GROUPS};
use sparsegrad::model::weights::{save_hf_safetensors, Field, LlamaSource, Tensor};
use sparsegrad::recipes::finetune::{FinetuneReport, PremiseShare, PREMISE_BATCHES};
use sparsegrad::{Backend, BasisSet, Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// `step,train_loss,val_loss`, one row per step from 0 (before training); a loss not
/// measured at a step is an empty field, so the file loads as NaN in pandas.
pub fn write_csv(path: &Path, report: &FinetuneReport) -> Result<()> {
    let mut rows: BTreeMap<usize, (Option<f64>, Option<f64>)> = BTreeMap::new();
    for &(s, l) in &report.train_curve {
        rows.entry(s).or_default().0 = Some(l);
    }
    for &(s, l) in &report.val_curve {
        rows.entry(s).or_default().1 = Some(l);
    }
    let field = |v: Option<f64>| v.map(|x| format!("{x:.6}")).unwrap_or_default();
    let mut text = String::from("step,train_loss,val_loss\n");
    for (s, (t, v)) in rows {
        text.push_str(&format!("{s},{},{}\n", field(t), field(v)));
    }
    write_atomic(path, |w| w.write_all(text.as_bytes()))
}

/// The trained state of every trained projection, named as in Hugging Face
/// (`model.layers.{i}.mlp.{gate,up,down}_proj`), with SparseGrad's bases.
pub fn write_adapter<B: Backend + Clone>(
    path: &Path,
    model: &LlamaModel<B>,
    weights: &dyn LlamaSource,
    blocks: &[usize],
    bases: Option<&BasisSet>,
) -> Result<()> {
    let mut names = Vec::new();
    for &i in blocks {
        for g in GROUPS {
            names.push(format!("model.layers.{i}.mlp.{g}_proj"));
        }
    }
    // The base weights of the trained blocks only (the adapter stores what changed
    // relative to them), read from the checkpoint.
    let mut bases_of_block = Vec::with_capacity(blocks.len());
    for &i in blocks {
        if i >= weights.config().layers {
            return Err(Error::invalid("adapter", format!("the weights have no block {i}")));
        }
        let read = |f: Field| weights.tensor(Tensor::Layer(i, f));
        bases_of_block.push([read(Field::Gate)?, read(Field::Up)?, read(Field::Down)?]);
    }
    let mut entries = Vec::with_capacity(names.len());
    for (n, &i) in blocks.iter().enumerate() {
        let mlp = model.mlp(i).ok_or_else(|| Error::invalid("adapter", format!("the model has no block {i}")))?;
        let base_weights = &bases_of_block[n];
        for (j, p) in mlp.projections().into_iter().enumerate() {
            entries.push(AdapterEntry {
                name: &names[3 * n + j],
                linear: &p.linear,
                base_weight: &base_weights[j],
                basis: bases.map(|b| b.get(GROUPS[j])).transpose()?,
            });
        }
    }
    save_adapter(path, &entries)
}

/// The merged model in `dir` (config.json + model.safetensors, f32) and the tokenizer
/// beside it, so `transformers` and `LlamaWeights::from_hf_dir` can load it as is.
pub fn write_merged<B: Backend + Clone>(
    dir: &Path,
    model: &LlamaModel<B>,
    weights: &dyn LlamaSource,
    tokenizer: &tokenizers::Tokenizer,
) -> Result<()> {
    // One tensor at a time: the merged model is never assembled in host memory.
    save_hf_safetensors(&model.merged(weights), dir)?;
    let path = dir.join("tokenizer.json");
    // Through write_atomic like every output (never replacing a special file).
    let json = tokenizer.to_string(false).map_err(|e| Error::io(&path, std::io::Error::other(e.to_string())))?;
    write_atomic(&path, |w| w.write_all(json.as_bytes()))
}

pub fn human_bytes(b: usize) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else {
        format!("{:.0} MB", b / 1e6)
    }
}

/// Thousands separators, for parameter counts.
pub fn grouped(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Every parameter of the model (embedding, layers, norms, head).
pub fn total_parameters(c: &sparsegrad::LlamaConfig) -> usize {
    Tensor::all(c).map(|t| t.shape(c).iter().product::<usize>()).sum()
}

/// The end-of-run summary of one method.
pub fn summary(r: &FinetuneReport, total_params: usize, detail: &str, seconds: f64) -> String {
    let pct = 100.0 * r.trainable_parameters as f64 / total_params.max(1) as f64;
    let mut s = String::new();
    s.push_str(&format!("  method            {} ({detail})\n", r.method.name()));
    s.push_str(&format!(
        "  trainable params  {} ({pct:.3}% of {})\n",
        grouped(r.trainable_parameters),
        grouped(total_params)
    ));
    s.push_str(&format!(
        "  val loss          {:.4} -> {:.4} ({:+.4})\n",
        r.val_loss_before,
        r.val_loss_after,
        r.val_loss_after - r.val_loss_before
    ));
    s.push_str(&format!("  tokens/s          {:.1} (loss tokens per second of training steps)\n", r.tokens_per_s));
    s.push_str(&format!("  peak memory       {} (held by the backend)\n", human_bytes(r.peak_memory_bytes)));
    s.push_str(&format!(
        "  time              {seconds:.1} s (preliminary {:.1} s, training steps {:.1} s)\n",
        r.preliminary_seconds, r.train_seconds
    ));
    if let Some(t) = r.gram_timing {
        s.push_str(&format!(
            "  bases             {} gradients into the Grams on the {} in {:.2} s, download {:.2} s, \
             eigensolve {:.2} s (CPU)\n",
            t.gradients,
            if t.on_device { "device" } else { "host" },
            t.accumulate_seconds,
            t.download_seconds,
            t.eigensolve_seconds
        ));
    }
    if let Some(step) = r.steady_step_seconds {
        s.push_str(&format!("  step time         {:.1} ms (median training step after the first)\n", step * 1e3));
    }
    if !r.premise.is_empty() {
        s.push_str(&format!("  premise           {}\n", premise_line(&r.premise)));
    }
    s
}

/// The top-1% shares of the preliminary phase's held-out gradients, original -> basis.
pub fn premise_line(premise: &[PremiseShare]) -> String {
    let parts: Vec<String> =
        premise.iter().map(|p| format!("{} {:.3} -> {:.3}", p.group, p.original, p.basis)).collect();
    format!(
        "top-1% share of squared gradient norm, original -> basis ({} held-out batches): {}",
        PREMISE_BATCHES,
        parts.join(", ")
    )
}

/// The `--compare` table as Markdown (also readable as plain text).
pub fn compare_table(rows: &[(FinetuneReport, String)]) -> String {
    let mut s =
        String::from("| method | trainable params | val loss before | val loss after | tokens/s | peak memory |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|\n");
    for (r, detail) in rows {
        s.push_str(&format!(
            "| {} ({detail}) | {} | {:.4} | {:.4} | {:.1} | {} |\n",
            r.method.name(),
            grouped(r.trainable_parameters),
            r.val_loss_before,
            r.val_loss_after,
            r.tokens_per_s,
            human_bytes(r.peak_memory_bytes)
        ));
    }
    s
}

pub fn write_text(path: &Path, text: &str) -> Result<()> {
    write_atomic(path, |w| w.write_all(text.as_bytes()))
}

/// Makes sure `dir` is a directory this process can write into, creating it if needed;
/// `Ok(true)` when it was created here. An existing file, a path under `/proc` or an
/// unwritable directory fails now, with the flag named, not after the run.
pub fn prepare_out_dir(dir: &Path) -> Result<bool> {
    let flag = |msg: String| Error::invalid("--out", format!("{}: {msg}", dir.display()));
    let created = match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => false,
        Ok(_) => return Err(flag("exists and is not a directory".into())),
        Err(_) => {
            std::fs::create_dir_all(dir).map_err(|e| flag(format!("cannot create the directory: {e}")))?;
            true
        }
    };
    let probe = dir.join(format!(".sparsegrad-write-test-{}", std::process::id()));
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(created)
        }
        Err(e) => {
            if created {
                let _ = std::fs::remove_dir(dir);
            }
            Err(flag(format!("cannot write into the directory: {e}")))
        }
    }
}
