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
use cuda_common::plan::{bases, check_case, methods};
use sparsegrad::perf::roofline::H100_SXM;
use sparsegrad::plan::PlanSetup;
use sparsegrad::{LlamaConfig, LlamaWeights, Method, MlpPlan, Precision, TrainOptions};

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
        // SPARSEGRAD_PLAN_METHOD, _PRECISION (f32, bf16) and _PROJECTIONS (paper, all) run
        // part of the matrix (its cases at 7B dimensions take up to 20 minutes each).
        let only = |var: &str, value: &str| std::env::var(var).map_or(true, |v| v == value);
        let weights = LlamaWeights::random(&c, 3).unwrap();
        let basis = bases(&c);
        let frozen = Method::Frozen;
        let top = c.layers - 1;
        for name in ["sparsegrad", "lora", "meprop", "full"] {
            if !only("SPARSEGRAD_PLAN_METHOD", name) {
                continue;
            }
            let m = methods(name);
            for (precision, p) in [(Precision::Full, "f32"), (Precision::Bf16, "bf16")] {
                if !only("SPARSEGRAD_PLAN_PRECISION", p) {
                    continue;
                }
                // The paper's projections of the top block; all three of both blocks.
                for (layers, which, j) in [(vec![top], [frozen, m, m], "paper"), (vec![0, top], [m; 3], "all")] {
                    if !only("SPARSEGRAD_PLAN_PROJECTIONS", j) {
                        continue;
                    }
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
                        check_case(&setup, &weights, &basis, emulated);
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
