//! The `gpu_shape` table: counts of the run and of the scaled target step, the roofline
//! prediction per category for the H100 SXM and H200 against the floor, GPU measurements
//! where there are any, and the same figures as JSON. Every figure says whether it was
//! emulated, predicted or measured on a GPU.

use crate::args::Args;
use crate::{GraphRun, SeqRun};
use serde_json::{json, Value};
use sparsegrad::model::config::LlamaConfig;
use sparsegrad::perf::llama::LayerKind;
use sparsegrad::perf::roofline::{LaunchMode, DEVICES};
use sparsegrad::perf::shape::{measured_by_category, CompulsoryBytes, LayerWeights, ScalingReport, StepCounts};
use sparsegrad::perf::{Category, ElemType, Event, EventKind, GemmCompute};
use sparsegrad::{Error, Formulation, MemoryStats, MergedUpdate, Method, Precision, Result};

pub struct Context<'a> {
    pub args: &'a Args,
    pub config: &'a LlamaConfig,
    pub trained: &'a [usize],
    pub run_layers: usize,
    pub run_trained: &'a [usize],
    pub run_kinds: &'a [LayerKind],
    pub target_kinds: &'a [LayerKind],
    pub layer_weights: &'a LayerWeights,
    pub methods: &'a [Method; 3],
    pub device: String,
    /// The roofline model the backend prices layers with.
    pub device_model: &'static str,
    pub emulated: bool,
    pub memory: MemoryStats,
    /// (ledger events checked, windows, the emulator's peak device bytes in them).
    pub emulator_check: Option<(usize, usize, Option<u64>)>,
    /// Per projection (gate, up, down): the SparseGrad formulation and merged update.
    pub formulations: [Option<(Formulation, Option<MergedUpdate>)>; 3],
}

fn gb(b: f64) -> String {
    sparsegrad::error::human_bytes(b.max(0.0) as u128)
}

fn flops(f: f64) -> String {
    if f >= 1e12 {
        format!("{:.2} TFLOP", f / 1e12)
    } else {
        format!("{:.3} GFLOP", f / 1e9)
    }
}

fn list(v: &[usize]) -> String {
    if v.len() > 6 {
        let step = v[1] - v[0];
        if v.windows(2).all(|w| w[1] - w[0] == step) {
            return format!("{}, {}, ..., {} ({} blocks)", v[0], v[1], v[v.len() - 1], v.len());
        }
    }
    format!("{} ({} blocks)", v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(","), v.len())
}

fn count_rows(c: &StepCounts) -> Vec<(&'static str, f64)> {
    let g = |o, k| c.gemms.get(&(o, k)).copied().unwrap_or(0.0);
    vec![
        ("kernel launches", c.kernel_launches),
        ("cuBLAS calls, bf16 operands (tensor cores)", g(ElemType::Bf16, GemmCompute::F32)),
        ("cuBLAS calls, f32 with TF32 (tensor cores)", g(ElemType::F32, GemmCompute::F32FastTf32)),
        ("cuBLAS calls, f32 on FP32 cores", g(ElemType::F32, GemmCompute::F32)),
        ("host waits for the device", c.host_syncs),
        ("synchronize calls", c.sync_calls),
        ("blocking device -> host copies", c.blocking_copies),
        ("bytes host -> device", c.htod_bytes),
        ("bytes device -> host", c.dtoh_bytes),
        ("bytes device -> device", c.dtod_bytes),
        ("memsets", c.memsets),
        ("device allocations", c.allocations),
        ("device frees", c.frees),
    ]
}

/// The busiest layer's launches and cuBLAS calls, consecutive repeats of one name folded
/// into a count, in the order the step made them.
fn print_layer_calls(events: &[Event], counts: &StepCounts) {
    let Some((&layer, _)) = counts.launches_per_layer.iter().max_by_key(|(l, n)| (**n, std::cmp::Reverse(**l))) else {
        return;
    };
    let mut rows: Vec<(String, u64)> = Vec::new();
    for e in events.iter().filter(|e| e.is_launch() && e.tag.layer == Some(layer)) {
        let name = match &e.kind {
            EventKind::Launch { cost, .. } => cost.kernel.to_string(),
            EventKind::Gemm { routine, m, n, k, batch, operands, .. } => {
                format!("cuBLAS {routine:?} {m}x{n}x{k} batch {batch} {operands:?}")
            }
            _ => continue,
        };
        let label = format!("{:?}{} {name}", e.tag.phase, if e.tag.attention { " attention" } else { "" });
        match rows.last_mut() {
            Some((last, n)) if *last == label => *n += 1,
            _ => rows.push((label, 1)),
        }
    }
    println!("calls of layer {layer} (the busiest), in step order:");
    for (label, n) in rows {
        println!("  {n:>3} x {label}");
    }
}

/// The target step's predicted H100 device time by kernel (cuBLAS calls by operand type),
/// the largest first: where the roofline model puts a category's time.
fn print_kernel_times<'a>(events: impl IntoIterator<Item = (&'a Event, f64)>) {
    let mut by: std::collections::BTreeMap<String, (f64, f64)> = Default::default();
    for (e, w) in events {
        let name = match &e.kind {
            EventKind::Launch { cost, .. } => cost.kernel.to_string(),
            EventKind::Gemm { operands, .. } => format!("cuBLAS {operands:?}"),
            _ => continue,
        };
        let t = by.entry(name).or_default();
        t.0 += w * DEVICES[0].device_seconds(e);
        t.1 += w;
    }
    let mut rows: Vec<_> = by.into_iter().collect();
    rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    println!("predicted {} device time of the target step by kernel (largest first):", DEVICES[0].name);
    for (name, (s, n)) in rows.iter().take(20) {
        println!("  {:>9.3} ms {:>8} calls  {name}", s * 1e3, fmt_count(*n));
    }
}

fn fmt_count(v: f64) -> String {
    if (v - v.round()).abs() < 1e-6 {
        format!("{}", v.round() as i64)
    } else {
        format!("{v:.1}")
    }
}

pub fn print_and_save(
    ctx: &Context<'_>,
    runs: &[SeqRun],
    graph: &GraphRun,
    target: &[Event],
    scaling: Option<&ScalingReport>,
    compulsory: &CompulsoryBytes,
) -> Result<()> {
    let (a, c) = (ctx.args, ctx.config);
    let run_label = if ctx.emulated { "emulated" } else { "GPU" };
    let last = runs.last().ok_or_else(|| Error::invalid("gpu_shape", "no sequence length was run"))?;
    let dtype = if a.precision == Precision::Bf16 { "bf16" } else { "f32" };
    let proj: Vec<&str> =
        ["gate", "up", "down"].iter().zip(a.projections).filter(|(_, on)| *on).map(|(n, _)| *n).collect();
    println!(
        "gpu_shape: {} (hidden {}, ffn {}, {} layers, {} heads / {} KV heads of {}, vocab {}), {} keep {}, --dtype {dtype}{}",
        a.dims,
        c.hidden,
        c.ffn,
        c.layers,
        c.heads,
        c.kv_heads,
        c.head_dim,
        c.vocab,
        a.method,
        a.keep,
        if a.tf32 { " --tf32" } else { "" }
    );
    println!(
        "target step: batch {} x seq {} = {} tokens; trained blocks {}; projections {}",
        a.batch,
        a.seq,
        a.batch * a.seq,
        list(ctx.trained),
        proj.join(",")
    );
    let forms: Vec<String> = ctx
        .formulations
        .iter()
        .zip(["gate", "up", "down"])
        .filter_map(|(f, n)| {
            f.map(|(f, u)| match u {
                Some(u) => format!("{n} {f:?} (update {u:?})"),
                None => format!("{n} {f:?}"),
            })
        })
        .collect();
    if !forms.is_empty() {
        let how = match a.formulation {
            None => format!("priced at {} tokens on the {}", a.batch * a.seq, ctx.device_model),
            Some(_) => "fixed by --formulation".to_string(),
        };
        println!("SparseGrad formulation ({how}): {}", forms.join(", "));
    }
    println!(
        "run ({run_label}, {}): layers 0..{} (trained {:?}), batch {}, seq {}; {} measured step(s) per length after a warm-up",
        ctx.device,
        ctx.run_layers,
        ctx.run_trained,
        a.batch,
        runs.iter().map(|r| r.seq.to_string()).collect::<Vec<_>>().join(" and "),
        last.steps_measured
    );
    if last.steps_measured > 1 {
        let how = if runs.iter().all(|r| r.steps_identical) {
            "identical device calls"
        } else {
            "the same device calls, some with data-dependent sizes"
        };
        println!("  the {} measured steps made {how}", last.steps_measured);
    }
    let skipped = ctx.emulated && std::env::var("SG_EMU_GEMM_ARITHMETIC").is_ok_and(|v| v == "0");
    if skipped {
        println!("  emulated with cuBLAS arithmetic skipped (SG_EMU_GEMM_ARITHMETIC=0): counts, sizes and types are real, values are not");
    }
    let skipped_kernels = std::env::var("SG_EMU_SKIP_KERNELS").ok().filter(|v| ctx.emulated && !v.is_empty());
    if let Some(k) = &skipped_kernels {
        println!("  emulated with kernels launched but not run (SG_EMU_SKIP_KERNELS={k}): counted and sized, their outputs not computed");
    }
    let mut kinds: Vec<LayerKind> = ctx.target_kinds.to_vec();
    kinds.sort();
    kinds.dedup();
    for k in &kinds {
        let n_target = ctx.target_kinds.iter().filter(|x| *x == k).count();
        let run_idx: Vec<usize> = (0..ctx.run_kinds.len()).filter(|&i| ctx.run_kinds[i] == *k).collect();
        println!("  scaled: {n_target} x {} <- run layers {:?}", k.label(), run_idx);
    }
    if let Some(s) = scaling {
        println!(
            "  scaled: sizes from seq {} and {} to {}: fixed or proportional to the sequence, each cost function \
             evaluated at the target's sizes",
            s.short_seq, s.long_seq, s.target_seq
        );
        for d in &s.data_dependent {
            println!(
                "  data-dependent size (kept at the longer run's): event {} {}: {} then {}",
                d.event, d.what, d.short, d.long
            );
        }
    }
    let run_counts = StepCounts::of(last.events.iter().map(|e| (e, 1.0)));
    let target_counts = StepCounts::of(ctx.layer_weights.weighted(target));
    println!();
    println!("{:<46} {:>16} {:>18}", "per training step", format!("{run_label} run"), "target (scaled)");
    for ((name, r), (_, t)) in count_rows(&run_counts).into_iter().zip(count_rows(&target_counts)) {
        println!("{name:<46} {:>16} {:>18}", fmt_count(r), fmt_count(t));
    }
    println!(
        "{:<46} {:>16} {:>18}",
        "launches + cuBLAS calls, most in one layer",
        run_counts.max_launches_per_layer(),
        "(same per layer)"
    );
    if a.layer_calls {
        print_layer_calls(&last.events, &run_counts);
        print_kernel_times(ctx.layer_weights.weighted(target));
    }
    println!(
        "{:<46} {:>16} {:>18}",
        "peak device bytes (backend)",
        gb(ctx.memory.peak_bytes as f64),
        "(issue 19 plans it)"
    );
    if let Some((events, windows, peak)) = ctx.emulator_check {
        println!(
            "emulator check: the emulated driver and cuBLAS counted the same {events} events in {windows} windows{}",
            peak.map(|p| format!(" (emulated peak in the windows {})", gb(p as f64))).unwrap_or_default()
        );
    } else if ctx.emulated {
        println!("emulator check: not run (set SG_EMU_PROFILE to a file to count independently)");
    }
    // A replayed step of the captured graph: one graph launch, the batch's upload and the
    // loss read outside it, nothing else on the host.
    let g = StepCounts::of(graph.events.iter().map(|e| (e, 1.0)));
    let outside_gemms: f64 = g.gemms.values().fold(0.0, |a, b| a + b);
    // Outside the graph only the loss's reduction runs (it feeds the one read of the step).
    let graph_ok = g.graph_launches == 1.0 && g.kernel_launches <= 1.0 && outside_gemms == 0.0 && g.allocations == 0.0;
    println!(
        "CUDA graph ({run_label}, seq {}): a replayed step is {} graph launch(es), {} launches and {} cuBLAS calls \
         outside it, {} host wait(s), {} allocation(s), {} bytes host -> device",
        graph.seq, g.graph_launches, g.kernel_launches, outside_gemms, g.host_syncs, g.allocations, g.htod_bytes
    );
    let mode = if graph_ok { LaunchMode::Graph } else { LaunchMode::Eager };
    let mode_label = if graph_ok { "CUDA graph" } else { "eager: the graph check failed" };
    println!();
    let mut preds = Vec::new();
    println!(
        "{:<32} {:>14} {:>14}",
        format!("predicted time per step ({mode_label})"),
        DEVICES[0].name,
        DEVICES[1].name
    );
    let p: Vec<_> = DEVICES.iter().map(|d| d.predict(ctx.layer_weights.weighted(target), mode)).collect();
    let work = &target_counts.work;
    let floors: Vec<f64> = DEVICES.iter().map(|d| d.floor(work.flops, compulsory.total())).collect();
    for cat in Category::ALL {
        println!("{:<32} {:>11.3} ms {:>11.3} ms", cat.label(), p[0].get(cat) * 1e3, p[1].get(cat) * 1e3);
    }
    println!("{:<32} {:>11.3} ms {:>11.3} ms", "total (predicted)", p[0].total() * 1e3, p[1].total() * 1e3);
    println!("{:<32} {:>11.3} ms {:>11.3} ms", "floor", floors[0] * 1e3, floors[1] * 1e3);
    println!(
        "{:<32} {:>14.2} {:>14.2}",
        "total / floor (predicted)",
        p[0].total() / floors[0],
        p[1].total() / floors[1]
    );
    println!(
        "floor = {} at the bf16 tensor rate + {} compulsory bytes (weights read once {}, optimizer state {}) at HBM bandwidth",
        flops(work.flops),
        gb(compulsory.total()),
        gb(compulsory.weights_read),
        gb(compulsory.optimizer_state)
    );
    if let Some(s) = scaling {
        let total: f64 = s.work_by_growth.values().map(|w| w.flops).sum();
        let parts: Vec<String> =
            s.work_by_growth.iter().map(|(g, w)| format!("{g} {:.1}%", 100.0 * w.flops / total.max(1.0))).collect();
        println!(
            "growth of the target's flops with the sequence length (from the cost functions): {}",
            parts.join(", ")
        );
    }
    for (d, pr) in DEVICES.iter().zip(&p) {
        preds.push(json!({
            "device": d.name,
            "by_category_s": Category::ALL.iter().map(|c| (c.label().to_string(), json!(pr.get(*c)))).collect::<serde_json::Map<_, _>>(),
            "total_s": pr.total(),
            "floor_s": d.floor(work.flops, compulsory.total()),
            "sources": d.sources.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
        }));
    }
    if let Some(ms) = graph.gpu_step_ms {
        println!(
            "GPU measured ({}): a replayed CUDA graph step at seq {}: {ms:.3} ms (CUDA events)",
            ctx.device, graph.seq
        );
    }
    let mut gpu = Value::Null;
    if let (Some(ms), Some(timed)) = (last.gpu_step_ms, &last.timed_events) {
        let by_cat = measured_by_category(ctx.layer_weights.weighted(timed)).unwrap_or_default();
        println!();
        println!("GPU measured ({}): whole step {ms:.3} ms (CUDA events)", ctx.device);
        for (cat, s) in &by_cat {
            println!("  {:<30} {:>11.3} ms (sum of per-launch event times, scaled by layer)", cat.label(), s * 1e3);
        }
        gpu = json!({
            "step_ms": ms,
            "by_category_s": by_cat.iter().map(|(c, s)| (c.label().to_string(), json!(s))).collect::<serde_json::Map<_, _>>(),
        });
    }
    let counts_json = |c: &StepCounts| {
        json!({
            "kernel_launches": c.kernel_launches,
            "gemm_bf16": c.gemms.get(&(ElemType::Bf16, GemmCompute::F32)).copied().unwrap_or(0.0),
            "gemm_tf32": c.gemms.get(&(ElemType::F32, GemmCompute::F32FastTf32)).copied().unwrap_or(0.0),
            "gemm_fp32": c.fp32_core_gemms(),
            "host_syncs": c.host_syncs,
            "sync_calls": c.sync_calls,
            "blocking_copies": c.blocking_copies,
            "htod_bytes": c.htod_bytes,
            "dtoh_bytes": c.dtoh_bytes,
            "dtod_bytes": c.dtod_bytes,
            "memsets": c.memsets,
            "allocations": c.allocations,
            "frees": c.frees,
            "max_launches_per_layer": c.max_launches_per_layer(),
            "flops": c.work.flops,
            "bytes": c.work.bytes,
        })
    };
    let out = json!({
        "dims": a.dims,
        "method": a.method,
        "dtype": dtype,
        "tf32": a.tf32,
        "formulations": ctx.formulations.map(|f| f.map(|(f, u)| json!({
            "formulation": format!("{f:?}"),
            "merged_update": u.map(|u| format!("{u:?}")),
        }))),
        "batch": a.batch,
        "seq": a.seq,
        "trained_blocks": ctx.trained,
        "projections": proj,
        "device": ctx.device,
        "emulated": ctx.emulated,
        "gemm_arithmetic_skipped": skipped,
        "kernels_not_run": skipped_kernels,
        "run": {
            "layers": ctx.run_layers,
            "trained": ctx.run_trained,
            "seqs": runs.iter().map(|r| r.seq).collect::<Vec<_>>(),
            "steps_identical": runs.iter().all(|r| r.steps_identical),
            "counts": counts_json(&run_counts),
            "peak_device_bytes": ctx.memory.peak_bytes,
        },
        "target": { "counts": counts_json(&target_counts) },
        "graph": {
            "seq": graph.seq,
            "ok": graph_ok,
            "graph_launches": g.graph_launches,
            "kernel_launches_outside": g.kernel_launches,
            "host_syncs": g.host_syncs,
            "allocations": g.allocations,
            "gpu_step_ms": graph.gpu_step_ms,
        },
        "launch_mode": if graph_ok { "graph" } else { "eager" },
        "emulator_check": ctx.emulator_check.map(|(e, w, p)| json!({"events": e, "windows": w, "peak_bytes": p})),
        "data_dependent_sizes": scaling.map(|s| s.data_dependent.len()).unwrap_or(0),
        "predicted": preds,
        "compulsory_bytes": compulsory.total(),
        "gpu": gpu,
        "methods": ctx.methods.iter().map(|m| m.name()).collect::<Vec<_>>(),
    });
    if let Some(path) = &a.json {
        if std::fs::symlink_metadata(path).is_ok_and(|m| !m.is_file()) {
            return Err(Error::invalid("--json", format!("{} exists and is not a regular file", path.display())));
        }
        let text = serde_json::to_string_pretty(&out).map_err(|e| Error::invalid("--json", e.to_string()))?;
        std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}
