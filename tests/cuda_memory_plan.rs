//! The memory plan (`sparsegrad::plan`) against what the CUDA backend really allocates: a
//! LLaMA model of 2 layers is built and trained for two steps at two token counts, for
//! every method (SparseGrad, LoRA, MeProp, full; the paper's up and down projections of the
//! top block, and all three of both blocks) in f32 and bf16, and the plan must equal the
//! peak within 2%: the backend's own byte counters (`Cuda::memory_stats`) and, on the
//! emulated device, the emulator's independent count of live device bytes over the window
//! (`SG_EMU_PROFILE`). On a GPU the emulator's count is skipped.

mod cuda_common;

use cuda_common::cuda_test;
use sparsegrad::perf::emulator::read_windows;
use sparsegrad::perf::roofline::H100_SXM;
use sparsegrad::plan::{MemoryPlan, PlanSetup};
use sparsegrad::{
    Backend, Basis, BasisSet, Cuda, Keep, LlamaConfig, LlamaModel, LlamaWeights, Method, MlpPlan, Precision, ProfileOptions,
    TokenBatch, TrainOptions, TrainingSetup,
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
    assert!(diff <= 0.02, "{what}: the plan says {plan} bytes, the device peaked at {measured} ({:.2}% off)", diff * 100.0);
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
        let c = config();
        let weights = LlamaWeights::random(&c, 3).unwrap();
        let basis = bases(&c);
        let frozen = Method::Frozen;
        for name in ["sparsegrad", "lora", "meprop", "full"] {
            let m = methods(name);
            for precision in [Precision::Full, Precision::Bf16] {
                // The paper's projections of the top block; all three of both blocks.
                for (layers, which) in [(vec![1], [frozen, m, m]), (vec![0, 1], [m; 3])] {
                    for (batch, seq) in [(2, 24), (4, 48)] {
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
                        let what = format!("{name} {precision:?} blocks {layers:?} batch {batch} x {seq}\n{}", plan.table());
                        within(plan.total(), peak, &format!("{what} (backend counters)"));
                        if let Some(e) = emu {
                            within(plan.total(), e, &format!("{what} (emulated device)"));
                        }
                    }
                }
            }
        }
    }
);
