//! The memory plan (`sparsegrad::plan`) against what the CUDA backend really allocates: a
//! LLaMA model of 2 layers is built and trained for two steps at two token counts, for
//! every method (SparseGrad, LoRA, MeProp, full; the paper's up and down projections of the
//! top block, and all three of both blocks) in f32 and bf16, and the plan must equal the
//! peak within 2%: the backend's own byte counters (`Cuda::memory_stats`) and, on the
//! emulated device, the emulator's independent count of live device bytes over the window
//! (`SG_EMU_PROFILE`). On a GPU the emulator's count is skipped. Last, a run of the example
//! that cannot fit any device is refused before it loads.

mod common;
mod cuda_common;

use cuda_common::cuda_test;
use sparsegrad::perf::emulator::read_windows;
use sparsegrad::perf::roofline::H100_SXM;
use sparsegrad::plan::{MemoryPlan, PlanSetup};
use sparsegrad::{
    Backend, Basis, BasisSet, Cuda, Keep, LlamaConfig, LlamaModel, LlamaWeights, Method, MlpPlan, Precision,
    ProfileOptions, TokenBatch, TrainOptions, TrainingSetup,
};

/// LLaMA shapes at a size the emulator trains in seconds: grouped-query attention, an
/// untied head, ffn not a multiple of the tile sizes.
fn config() -> LlamaConfig {
    LlamaConfig {
        hidden: 128,
        ffn: 344,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 32,
        rope_theta: 10000.0,
        rope_scaling: None,
        rms_eps: 1e-5,
        vocab: 1000,
        tied_embeddings: false,
        max_seq: 64,
        bos: Some(1),
        eos: Some(2),
    }
}

fn methods(name: &str) -> Method {
    match name {
        "sparsegrad" => Method::sparsegrad(Keep::Fraction(0.01)),
        "lora" => Method::Lora { rank: 4, alpha: 8.0 },
        "meprop" => Method::MeProp { keep: Keep::Fraction(0.01) },
        _ => Method::Full,
    }
}

fn bases(c: &LlamaConfig) -> BasisSet {
    let mut set = BasisSet::new();
    // Distinct seeds: equal bases would share one device copy (gate and up have one shape).
    let groups = [("gate", (c.ffn, c.hidden)), ("up", (c.ffn, c.hidden)), ("down", (c.hidden, c.ffn))];
    for (seed, (g, (out, inp))) in groups.into_iter().enumerate() {
        set.insert(Basis::reflection(g, out, inp, 7 + seed as u64).unwrap());
    }
    set
}

/// Builds and trains the model on a fresh backend; returns the backend's peak and, when
/// emulated, the emulator's peak over the window (both relative to the bytes live before).
fn measure(setup: &PlanSetup, weights: &LlamaWeights, basis: &BasisSet, emulated: bool) -> (u128, Option<u128>) {
    let be = Cuda::new(0).unwrap();
    let before = be.memory_stats().current_bytes as u128;
    if emulated {
        be.profile_begin(ProfileOptions::default()).unwrap();
    }
    {
        let ts = TrainingSetup { plan: setup.plan.clone(), bases: Some(basis), options: setup.options };
        let mut model = LlamaModel::<Cuda>::new(&be, weights, &ts, setup.max_positions).unwrap();
        let t = setup.batch * setup.seq;
        let v = setup.config.vocab as u32;
        let ids: Vec<u32> = (0..t as u32).map(|i| (i * 37 + 11) % v).collect();
        let targets: Vec<u32> = (0..t as u32).map(|i| (i * 53 + 5) % v).collect();
        let mask = vec![1.0f32; t];
        let batch = TokenBatch { ids: &ids, targets: &targets, mask: &mask, batch: setup.batch, seq: setup.seq };
        for _ in 0..2 {
            let loss = model.train_step(&batch).unwrap();
            assert!(loss.mean().is_finite());
        }
        be.synchronize().unwrap();
    }
    let peak = be.memory_stats().peak_bytes as u128 - before;
    let emu = if emulated {
        be.profile_end().unwrap();
        let path = std::env::var_os("SG_EMU_PROFILE").unwrap();
        let windows = read_windows(std::path::Path::new(&path)).unwrap();
        let w = windows.last().expect("the emulator wrote the window");
        Some(w.totals.peak_bytes as u128 - w.start_live_bytes as u128)
    } else {
        None
    };
    (peak, emu)
}

fn within(plan: u128, measured: u128, what: &str) {
    let diff = plan.abs_diff(measured) as f64 / measured as f64;
    assert!(
        diff <= 0.02,
        "{what}: the plan says {plan} bytes, the device peaked at {measured} ({:.2}% off)",
        diff * 100.0
    );
}

cuda_test!(
    fn the_plan_equals_the_device_peak_for_every_method_and_dtype(cuda) {
        let emulated = cuda.is_emulated();
        // The emulator writes its count where SG_EMU_PROFILE points, opened at the first
        // window: this binary holds this one test, so nothing else opens one first.
        let dir = tempfile::tempdir().unwrap();
        if emulated && std::env::var_os("SG_EMU_PROFILE").is_none() {
            std::env::set_var("SG_EMU_PROFILE", dir.path().join("emu.jsonl"));
        }
        // SPARSEGRAD_PLAN_DIMS=llama2-7b SPARSEGRAD_PLAN_LAYERS=2 (with SG_EMU_GEMM_ARITHMETIC=0
        // on the emulator) runs the same checks at named dimensions cut to that many layers,
        // at 1 x 16 and 2 x 16 tokens: a long run, outside CI.
        let (c, shapes) = match std::env::var("SPARSEGRAD_PLAN_DIMS") {
            Ok(name) => {
                let mut c = sparsegrad::perf::llama::named_config(&name).unwrap();
                c.layers = std::env::var("SPARSEGRAD_PLAN_LAYERS").map_or(2, |v| v.parse().unwrap());
                (c, [(1, 16), (2, 16)])
            }
            Err(_) => (config(), [(2, 24), (4, 48)]),
        };
        let only: Option<String> = std::env::var("SPARSEGRAD_PLAN_METHOD").ok();
        let weights = LlamaWeights::random(&c, 3).unwrap();
        let basis = bases(&c);
        let frozen = Method::Frozen;
        let top = c.layers - 1;
        for name in ["sparsegrad", "lora", "meprop", "full"] {
            if only.as_deref().is_some_and(|o| o != name) {
                continue;
            }
            let m = methods(name);
            for precision in [Precision::Full, Precision::Bf16] {
                // The paper's projections of the top block; all three of both blocks.
                for (layers, which) in [(vec![top], [frozen, m, m]), (vec![0, top], [m; 3])] {
                    for (batch, seq) in shapes {
                        let setup = PlanSetup {
                            config: c.clone(),
                            plan: MlpPlan { layers: layers.clone(), methods: which },
                            options: TrainOptions { precision, expected_tokens: batch * seq, ..Default::default() },
                            batch,
                            seq,
                            max_positions: seq,
                            device: H100_SXM,
                            tf32: false,
                        };
                        let plan = MemoryPlan::llama(&setup).unwrap();
                        let (peak, emu) = measure(&setup, &weights, &basis, emulated);
                        let label = format!("{name} {precision:?} blocks {layers:?} batch {batch} x {seq}");
                        let off = |m: u128| (plan.total() as f64 - m as f64) / m as f64 * 100.0;
                        let emu_off = emu.map(|e| format!("{:+.3}%", off(e)));
                        println!("{label}: plan {} B, backend peak {peak} B ({:+.3}%), emulator {emu_off:?}", plan.total(), off(peak));
                        let what = format!("{label}\n{}", plan.table());
                        within(plan.total(), peak, &format!("{what} (backend counters)"));
                        if let Some(e) = emu {
                            within(plan.total(), e, &format!("{what} (emulated device)"));
                        }
                    }
                }
            }
        }
        refuses_a_run_that_does_not_fit(&config());
    }
);

/// `llama_mlp_finetune --device cuda` on a model that needs more than any device holds (its
/// config.json alone, no weights: the refusal must come before loading) stops with the
/// total, the free memory and the three largest items.
fn refuses_a_run_that_does_not_fit(c: &LlamaConfig) {
    let dir = tempfile::tempdir().unwrap();
    let mut big = c.clone();
    big.max_seq = 1 << 20;
    std::fs::write(dir.path().join("config.json"), big.to_hf_config_json().to_string()).unwrap();
    let exe = common::examples::binary("llama_mlp_finetune");
    let model = dir.path().display().to_string();
    let args = ["--device", "cuda", "--model", &model, "--batch", "4096", "--seq-len", "65536", "--blocks", "0"];
    let o = std::process::Command::new(exe)
        .args(args)
        .arg("--out")
        .arg(dir.path().join("out"))
        .env("OPENBLAS_CORETYPE", common::examples::coretype())
        .env_remove("SG_EMU_PROFILE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    let last = err.lines().last().unwrap_or("");
    assert_eq!(o.status.code(), Some(1), "{err}");
    for needle in ["the run needs", "of device memory but", "is free; largest items: "] {
        assert!(last.contains(needle), "{last}");
    }
    // Three items, the largest first: at 4096 x 65536 tokens the token-sized MLP buffers
    // (4 x ffn + hidden, then 2 x ffn per token, f32) and the shared residual scratch.
    let items: Vec<&str> = last.split("largest items: ").nth(1).unwrap().split(", ").collect();
    let names = ["MLP scratch", "MLP gate and up outputs", "residual and backward scratch"];
    assert_eq!(items.len(), 3, "{items:?}");
    for (item, name) in items.iter().zip(names) {
        assert!(item.starts_with(name) && item.ends_with(" TB"), "{items:?}");
    }
}
