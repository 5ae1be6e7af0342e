//! Mutation fuzzer for every loader and every command-line input, on stable Rust.
//!
//! `cargo run --release --example fuzz -- --target T --seconds S [--seed N] [--cap-mb M]`
//! with T one of `safetensors`, `gguf`, `hf`, `adapter`, `basis` (the loaders, run in
//! this process) or `step-cli`, `basis-cli`, `example-cli` (the `sparsegrad` binary and
//! the `llama_mlp_finetune` example as processes; build them first with
//! `cargo build --release --features recipes --bins --examples`), or `all` (each for S seconds).
//!
//! Each case mutates a seed (built here from small random models, plus a cut of the real
//! model when `assets/` has it) and runs it. A case fails on a panic, on an allocation
//! past the cap (live heap bytes over the fixtures' plus `--cap-mb`, default 512: the
//! allocator refuses it, so a fallible allocation reports an error and an infallible one
//! aborts the run), and for the processes on an exit other than 0/1/2, a stderr that is
//! not exactly one `error:` line, a run past its time limit, or an output written by a
//! failed run. Failing inputs are saved under `target/fuzz/<target>/`; the input being
//! run is always in `target/fuzz/<target>/current*`, so an abort leaves it behind.

mod cap;
mod mutate;
mod run;
mod seeds;

#[global_allocator]
static ALLOC: cap::Capped = cap::Capped;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

pub const TARGETS: [&str; 8] =
    ["safetensors", "gguf", "hf", "adapter", "basis", "step-cli", "basis-cli", "example-cli"];

pub struct Stats {
    pub cases: u64,
    pub failures: u64,
    pub errors: u64,
    pub ok: u64,
    pub max_case_peak: usize,
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let get = |flag: &str| argv.iter().position(|a| a == flag).and_then(|i| argv.get(i + 1)).cloned();
    let target = get("--target").unwrap_or_else(|| "all".into());
    let seconds: f64 = get("--seconds").and_then(|s| s.parse().ok()).unwrap_or(10.0);
    let seed: u64 = get("--seed").and_then(|s| s.parse().ok()).unwrap_or(1);
    let cap_mb: usize = get("--cap-mb").and_then(|s| s.parse().ok()).unwrap_or(512);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let targets: Vec<&str> = if target == "all" {
        TARGETS.to_vec()
    } else if let Some(t) = TARGETS.iter().find(|t| **t == target) {
        vec![*t]
    } else {
        eprintln!("error: unknown --target `{target}` (one of {}, all)", TARGETS.join(", "));
        return ExitCode::from(2);
    };
    // Panics are counted and their inputs saved; the default hook's backtrace would only
    // flood the log.
    std::panic::set_hook(Box::new(|info| eprintln!("panic: {info}")));
    let mut failed = false;
    for t in targets {
        let work = root.join("target/fuzz").join(t);
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).expect("create target/fuzz");
        let started = Instant::now();
        let stats = run::fuzz(t, &root, &work, seed, cap_mb << 20, Duration::from_secs_f64(seconds));
        let (refused, largest) = cap::refused();
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!(
            "fuzz {t}: {} cases ({} accepted, {} clean errors), {} failures, {refused} allocations refused (largest {largest} bytes), max case peak {:.1} MB, {:.0} s, seed {seed}, cap {cap_mb} MB, load average {}",
            stats.cases,
            stats.ok,
            stats.errors,
            stats.failures,
            stats.max_case_peak as f64 / 1e6,
            started.elapsed().as_secs_f64(),
            load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        );
        failed |= stats.failures > 0 || refused > 0;
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
