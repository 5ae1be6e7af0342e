//! The fuzz loop of each target: build seeds, mutate, run, judge.

use crate::mutate::{mutate, value, Rng};
use crate::{cap, seeds, Stats};
use sparsegrad::adapter::{adapter_bases, load_adapter, AdapterTarget};
use sparsegrad::io::gguf::GgufFile;
use sparsegrad::io::SafetensorsFile;
use sparsegrad::model::config::LlamaConfig;
use sparsegrad::model::tokenizer::Tokenizer;
use sparsegrad::model::weights::LlamaWeights;
use sparsegrad::{BasisSet, Cpu, Result};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn safetensors_case(path: &Path) -> Result<()> {
    let f = SafetensorsFile::open(path)?;
    for name in f.names() {
        let shape = f.shape(&name).map(<[usize]>::to_vec).unwrap_or_default();
        let _ = f.tensor_f32(&name);
        let _ = f.tensor_float_shaped(&name, &shape);
        let _ = f.tensor_i64_shaped(&name, &shape);
        let _ = f.for_each_f32_chunk(&name, 7, |_| Ok(()));
    }
    for k in ["steps", "lr"] {
        let _ = f.optional_meta_parse::<u64>(k);
        let _ = f.optional_meta_parse::<f32>(k);
    }
    Ok(())
}

fn gguf_case(bytes: Vec<u8>) -> Result<()> {
    let f = GgufFile::from_bytes(bytes)?;
    let _ = LlamaConfig::from_gguf(&f);
    let _ = Tokenizer::from_gguf(&f).map(|t| t.encode("ab a b"));
    let _ = LlamaWeights::from_gguf(&f);
    let names: Vec<String> = f.tensor_infos().iter().take(8).map(|t| t.name.clone()).collect();
    for n in names {
        let _ = f.tensor_f32(&n);
    }
    Ok(())
}

fn adapter_case(path: &Path, fx: &seeds::AdapterFixture) -> Result<()> {
    let cpu = Cpu::new();
    let _ = adapter_bases(path);
    // Accepted when the adapter loads into the block of its own method.
    let mut result = Ok(());
    for m in seeds::adapter_methods() {
        let mut b = seeds::block(&cpu, fx, m);
        let [p_in, p_out] = b.projections_mut();
        let mut targets = [
            AdapterTarget { name: "dense_in", linear: &mut p_in.linear, base_weight: &fx.w_in },
            AdapterTarget { name: "dense_out", linear: &mut p_out.linear, base_weight: &fx.w_out },
        ];
        match load_adapter(path, &mut targets) {
            Ok(()) => return Ok(()),
            Err(e) => result = Err(e),
        }
    }
    result
}

/// Runs one in-process case; `Some(why)` when it failed.
fn judge_in_process(case: impl FnOnce() -> Result<()>, stats: &mut Stats) -> Option<String> {
    let base = cap::reset_peak();
    let (refused_before, _) = cap::refused();
    let r = catch_unwind(AssertUnwindSafe(case));
    stats.max_case_peak = stats.max_case_peak.max(cap::peak_above(base));
    let (refused_after, largest) = cap::refused();
    match r {
        Err(_) => Some("panic".into()),
        Ok(_) if refused_after > refused_before => Some(format!("allocation of {largest} bytes refused by the cap")),
        Ok(Ok(())) => {
            stats.ok += 1;
            None
        }
        Ok(Err(_)) => {
            stats.errors += 1;
            None
        }
    }
}

/// Runs a process with a 4 GiB address-space limit and `limit` of wall time; `Some(why)`
/// when it failed (see the module docs of main).
fn judge_process(cmd: &mut Command, limit: Duration, output: Option<&Path>, stats: &mut Stats) -> Option<String> {
    if let Some(o) = output {
        let _ = std::fs::remove_file(o);
    }
    cmd.stdout(Stdio::null()).stderr(Stdio::piped()).stdin(Stdio::null());
    #[cfg(unix)]
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: 4 << 30, rlim_max: 4 << 30 };
            libc::setrlimit(libc::RLIMIT_AS, &lim);
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Some(format!("cannot spawn: {e}")),
    };
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if started.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                return Some(format!("still running after {} s", limit.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => return Some(format!("wait: {e}")),
        }
    };
    let mut err = String::new();
    if let Some(mut s) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut s, &mut err);
    }
    match status.code() {
        Some(0) => {
            stats.ok += 1;
            None
        }
        Some(1 | 2) => {
            // Progress lines may come first; the failure itself is one last `error:` line.
            let errors = err.lines().filter(|l| l.starts_with("error")).count();
            if errors != 1 || !err.lines().last().is_some_and(|l| l.starts_with("error: ")) {
                return Some(format!("stderr does not end in exactly one error line: {err:?}"));
            }
            if output.is_some_and(Path::exists) {
                return Some("a failed run wrote its output".into());
            }
            stats.errors += 1;
            None
        }
        other => Some(format!("exit {other:?} ({status}); stderr {:?}", err.chars().take(400).collect::<String>())),
    }
}

fn sibling_binary(name: &str) -> PathBuf {
    // target/release/examples/fuzz -> target/release/NAME, target/release/examples/NAME
    let exe = std::env::current_exe().expect("current exe");
    let examples = exe.parent().expect("examples dir").to_path_buf();
    if name == "sparsegrad" {
        examples.parent().expect("profile dir").join(name)
    } else {
        examples.join(name)
    }
}

fn example_args(r: &mut Rng, model: &Path, data: &Path, tok: &Path, out: &Path) -> Vec<String> {
    let mut args = vec![
        "--model".to_string(),
        model.display().to_string(),
        "--tokenizer".into(),
        tok.display().to_string(),
        "--data".into(),
        data.display().to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    // Small defaults so an accepted run ends in a second; one to three flags hostile.
    let mut flags: Vec<(&str, Vec<&str>)> = vec![
        ("--steps", vec!["1", "2"]),
        ("--prelim-steps", vec!["1"]),
        ("--eval-batches", vec!["1", "4611686018427387904"]),
        ("--eval-every", vec!["0", "1"]),
        ("--batch", vec!["2", "3"]),
        ("--seq-len", vec!["8", "4"]),
        ("--blocks", vec!["1", "0,1", "all", "every2"]),
        ("--method", vec!["sparsegrad", "lora", "meprop", "full"]),
        ("--keep", vec!["0.01", "0.5"]),
        ("--lr", vec!["0.001", "1e30"]),
        ("--lora-rank", vec!["1", "2"]),
        ("--seed", vec!["0", "7"]),
        ("--validation-fraction", vec!["0.1", "0.5"]),
    ];
    let hostile = 1 + r.below(3);
    for _ in 0..hostile {
        let i = r.below(flags.len());
        let (name, normal) = flags.swap_remove(i);
        let mut v = value(r, &normal);
        // Step counts stay small or absurd (refused): a valid huge count is a real run.
        if matches!(name, "--steps" | "--prelim-steps") && v.parse::<u64>().is_ok_and(|n| n > 4 && n <= 10_000_000) {
            v = "3".into();
        }
        args.push(name.into());
        args.push(v);
    }
    for (name, normal) in flags {
        args.push(name.into());
        args.push(normal[0].into());
    }
    if r.below(8) == 0 {
        let i = 2 * r.below(args.len() / 2);
        args.remove(i);
    }
    args
}

pub fn fuzz(target: &str, root: &Path, work: &Path, seed: u64, cap: usize, budget: Duration) -> Stats {
    let mut r = Rng::new(seed);
    let mut stats = Stats { cases: 0, failures: 0, errors: 0, ok: 0, max_case_peak: 0 };
    let real_model = root.join("assets/SmolLM2-135M-Instruct.Q4_1.gguf");
    let real = real_model.is_file().then_some(real_model.as_path());
    let seeds_dir = work.join("seeds");
    std::fs::create_dir_all(&seeds_dir).unwrap();
    let current = work.join("current");
    let save_failure = |stats: &mut Stats, why: &str, files: &[(&str, &[u8])], args: &[String]| {
        stats.failures += 1;
        let dir = work.join(format!("failure-{}", stats.failures));
        std::fs::create_dir_all(&dir).unwrap();
        for (n, b) in files {
            std::fs::write(dir.join(n), b).unwrap();
        }
        std::fs::write(dir.join("why.txt"), format!("{why}\nargs: {args:?}\n")).unwrap();
        eprintln!("FAILURE {} of {target}: {why} (saved in {})", stats.failures, dir.display());
    };
    let started = Instant::now();
    macro_rules! each_case {
        ($body:block) => {
            while started.elapsed() < budget {
                stats.cases += 1;
                $body
            }
        };
    }
    match target {
        "safetensors" | "basis" | "adapter" | "gguf" => {
            let (fx, seeds) = match target {
                "safetensors" => (None, seeds::safetensors_seeds(&seeds_dir, &mut r)),
                "basis" => (None, seeds::basis_seeds(&seeds_dir, &mut r)),
                "adapter" => {
                    let (fx, s) = seeds::adapter_seeds(&seeds_dir, &mut r);
                    (Some(fx), s)
                }
                _ => (None, seeds::gguf_seeds(real)),
            };
            cap::set_cap_above_now(cap);
            each_case!({
                let a = r.below(seeds.len());
                let b = r.below(seeds.len());
                let bytes = mutate(&mut r, &seeds[a], &seeds[b]);
                std::fs::write(&current, &bytes).unwrap();
                let why = judge_in_process(
                    || match target {
                        "safetensors" => safetensors_case(&current),
                        "basis" => BasisSet::load(&current).map(|_| ()),
                        "adapter" => adapter_case(&current, fx.as_ref().unwrap()),
                        _ => gguf_case(bytes.clone()),
                    },
                    &mut stats,
                );
                if let Some(why) = why {
                    save_failure(&mut stats, &why, &[("input", &bytes)], &[]);
                }
            });
        }
        "hf" => {
            let seeds = seeds::hf_seeds(&seeds_dir);
            let dir = work.join("current-hf");
            cap::set_cap_above_now(cap);
            each_case!({
                let s = &seeds[r.below(seeds.len())];
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir).unwrap();
                let k = r.below(s.len());
                let other = &s[r.below(s.len())].1;
                let mut files = Vec::new();
                for (i, (name, bytes)) in s.iter().enumerate() {
                    let b = if i == k { mutate(&mut r, bytes, other) } else { bytes.clone() };
                    std::fs::write(dir.join(name), &b).unwrap();
                    files.push((name.as_str(), b));
                }
                let why = judge_in_process(|| LlamaWeights::from_hf_dir(&dir).map(|_| ()), &mut stats);
                if let Some(why) = why {
                    let f: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, &b[..])).collect();
                    save_failure(&mut stats, &why, &f, &[]);
                }
            });
        }
        "step-cli" | "basis-cli" => {
            let bin = sibling_binary("sparsegrad");
            assert!(bin.is_file(), "{} missing: cargo build --release --bins first", bin.display());
            let seed_bytes = if target == "step-cli" {
                seeds::step_seed(&seeds_dir, &mut r)
            } else {
                seeds::grads_seed(&seeds_dir, &mut r)
            };
            let input = work.join("current-input.safetensors");
            let output = work.join("current-output.safetensors");
            each_case!({
                let bytes = mutate(&mut r, &seed_bytes, &seed_bytes);
                std::fs::write(&input, &bytes).unwrap();
                let mut args: Vec<String> = if target == "step-cli" {
                    vec!["step".into(), "--input".into(), input.display().to_string()]
                } else {
                    vec![
                        "basis".into(),
                        "--grads".into(),
                        input.display().to_string(),
                        "--max-memory".into(),
                        "0.05".into(),
                    ]
                };
                args.extend(["--output".to_string(), output.display().to_string()]);
                let why =
                    judge_process(Command::new(&bin).args(&args), Duration::from_secs(60), Some(&output), &mut stats);
                if let Some(why) = why {
                    save_failure(&mut stats, &why, &[("input.safetensors", &bytes)], &args);
                }
            });
        }
        "example-cli" => {
            let bin = sibling_binary("llama_mlp_finetune");
            assert!(
                bin.is_file(),
                "{} missing: cargo build --release --features recipes --examples first",
                bin.display()
            );
            let Some(tok) = real else {
                println!("example-cli: skipped, the real model (its tokenizer) is not in assets/");
                return stats;
            };
            let model = seeds_dir.join("model");
            LlamaWeights::random(&seeds::tiny_config(49152), 5).unwrap().save_hf_safetensors(&model).unwrap();
            let data = seeds_dir.join("data");
            std::fs::create_dir_all(&data).unwrap();
            let lines: String = (0..40).map(|i| format!("{i}\t0.5\tsentence number {i} is fine\n")).collect();
            std::fs::write(data.join("tiny_GroundTruth.txt"), lines).unwrap();
            let out = work.join("current-out");
            each_case!({
                let _ = std::fs::remove_dir_all(&out);
                let args = example_args(&mut r, &model, &data, tok, &out);
                let mut cmd = Command::new(&bin);
                cmd.args(&args).env("OPENBLAS_CORETYPE", "Haswell").env("RAYON_NUM_THREADS", "1");
                let mut why = judge_process(&mut cmd, Duration::from_secs(120), None, &mut stats);
                if why.is_none() && out.exists() && std::fs::read_dir(&out).is_ok_and(|d| d.count() == 0) {
                    why = Some("a failed run left an empty --out directory".into());
                }
                if let Some(why) = why {
                    save_failure(&mut stats, &why, &[], &args);
                }
            });
        }
        _ => unreachable!("target checked in main"),
    }
    stats
}
