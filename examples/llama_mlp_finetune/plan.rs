//! `--plan`: the device memory plan of the run the flags describe (`sparsegrad::plan`),
//! from the model's configuration alone (an HF config.json, a GGUF header or `--dims`),
//! and the check that stops a CUDA run before loading when the plan exceeds the device's
//! free memory.

use crate::args::Args;
use sparsegrad::{LlamaConfig, Result};

/// Usable memory of the GPUs the README's table names, in bytes (decimal GB, as the plan
/// prints; the cards hold 48 GiB and 80 GiB, so this leaves a few GB for the CUDA context
/// and cuBLAS).
#[cfg(feature = "cuda")]
const GPUS: [(&str, u128); 2] = [("48 GB (A40)", 48_000_000_000), ("80 GB (H100)", 80_000_000_000)];

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
/// The model's configuration without its weights: `--dims`, a directory's config.json,
/// a config.json itself, or a GGUF file's header.
pub fn read_config(args: &Args) -> Result<LlamaConfig> {
    if let Some(name) = &args.dims {
        return sparsegrad::perf::llama::named_config(name);
    }
    let path = &args.model;
    let config = if path.is_dir() {
        LlamaConfig::from_hf_config_json(&path.join("config.json"))?
    } else if path.extension().is_some_and(|e| e == "json") {
        LlamaConfig::from_hf_config_json(path)?
    } else {
        LlamaConfig::from_gguf(&sparsegrad::io::gguf::GgufFile::open(path)?)?
    };
    config.validate()?;
    Ok(config)
}

#[cfg(feature = "cuda")]
mod imp {
    use super::*;
    use sparsegrad::perf::roofline::{DeviceModel, H100_SXM, H200};
    use sparsegrad::plan::{MemoryPlan, PlanSetup};
    use sparsegrad::recipes::finetune::{FinetuneConfig, MethodKind};
    use sparsegrad::{Cuda, Error};

    /// The plan of `args` on `config` at `batch` sentences (the flags' own batch unless told).
    pub fn plan_of(args: &Args, config: &LlamaConfig, batch: usize, projections: [bool; 3]) -> Result<MemoryPlan> {
        plan_on(args, config, batch, projections, H100_SXM)
    }

    fn plan_on(
        args: &Args,
        config: &LlamaConfig,
        batch: usize,
        projections: [bool; 3],
        device: DeviceModel,
    ) -> Result<MemoryPlan> {
        if args.seq_len > config.max_seq {
            return Err(Error::invalid(
                "--seq-len",
                format!("{} exceeds the model's context length of {} tokens", args.seq_len, config.max_seq),
            ));
        }
        let blocks = args.blocks.resolve(config.layers)?;
        let mut cfg = crate::config(args, args.method, &blocks);
        cfg.batch = batch;
        cfg.projections = projections;
        let methods = FinetuneConfig::plan_methods(&cfg, config)?;
        MemoryPlan::llama(&PlanSetup {
            config: config.clone(),
            plan: sparsegrad::MlpPlan { layers: blocks, methods },
            options: cfg.train_options(),
            batch,
            seq: args.seq_len,
            max_positions: args.seq_len,
            device,
            tf32: args.tf32,
        })
    }

    /// The largest batch (sentences of `--seq-len`) whose plan fits `bytes`, if any.
    fn largest_batch(args: &Args, c: &LlamaConfig, projections: [bool; 3], bytes: u128) -> Result<Option<usize>> {
        let fits = |b: usize| -> Result<bool> { Ok(plan_of(args, c, b, projections)?.total() <= bytes) };
        if !fits(1)? {
            return Ok(None);
        }
        // Doubling, then bisection: the plan grows with the batch.
        let (mut lo, mut hi) = (1usize, 2usize);
        while hi <= 1 << 20 && fits(hi)? {
            lo = hi;
            hi *= 2;
        }
        if hi > 1 << 20 {
            return Ok(Some(lo));
        }
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if fits(mid)? {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Ok(Some(lo))
    }

    /// Prints the plan of the run `args` describes and the largest batches that fit.
    pub fn print(args: &Args) -> Result<()> {
        let c = read_config(args)?;
        let plan = plan_of(args, &c, args.batch, args.projections)?;
        let names: Vec<&str> =
            ["gate", "up", "down"].iter().zip(args.projections).filter_map(|(g, on)| on.then_some(*g)).collect();
        let blocks = args.blocks.resolve(c.layers)?;
        let model = args.dims.clone().unwrap_or_else(|| args.model.display().to_string());
        println!(
            "memory plan of {model} ({} blocks, hidden {}, ffn {}, vocab {}): {} on blocks {blocks:?} ({}), \
             batch {} x {} tokens, {}",
            c.layers,
            c.hidden,
            c.ffn,
            c.vocab,
            args.method.name(),
            names.join(","),
            args.batch,
            args.seq_len,
            match args.precision {
                sparsegrad::Precision::Bf16 => "bf16",
                _ if args.tf32 => "f32 (TF32)",
                _ => "f32",
            }
        );
        print!("{}", plan.table());
        println!("largest items:");
        for item in plan.largest(8) {
            println!("  {:<40} {:>9.3} GB", item.what, item.bytes as f64 / 1e9);
        }
        for (label, on) in [("these projections", args.projections), ("gate, up and down", [true; 3])] {
            let mut line = format!("largest batch of {} tokens with {label}:", args.seq_len);
            for (gpu, bytes) in GPUS {
                let b = largest_batch(args, &c, on, bytes)?;
                line.push_str(&format!(" {gpu} {}", b.map_or("none".to_string(), |b| b.to_string())));
                line.push(';');
            }
            line.pop();
            println!("{line}");
        }
        println!("(the training model; the preliminary phase of SparseGrad runs before it, on a model of its own)");
        Ok(())
    }

    /// Stops a CUDA run whose plan exceeds the device's free memory, before it loads (with
    /// `--compare`, the plan of every method: each runs on a fresh backend).
    pub fn check_fits(args: &Args, cuda: &Cuda) -> Result<()> {
        // A configuration that cannot be read is reported by the loader, in its words.
        let Ok(c) = read_config(args) else { return Ok(()) };
        let device = if cuda.device_name().contains("H200") { H200 } else { H100_SXM };
        let (free, _) = cuda.memory_info()?;
        let methods = if args.compare { MethodKind::ALL.to_vec() } else { vec![args.method] };
        for method in methods {
            let args = Args { method, ..args.clone() };
            plan_on(&args, &c, args.batch, args.projections, device)?.check_fits(free as u128)?;
        }
        Ok(())
    }
}

#[cfg(feature = "cuda")]
pub use imp::{check_fits, print};

#[cfg(not(feature = "cuda"))]
pub fn print(_: &Args) -> Result<()> {
    Err(sparsegrad::Error::CudaUnavailable(
        "the memory plan is the CUDA backend's; this build has no CUDA backend (the `cuda` feature is off)".into(),
    ))
}
