//! The memory plan held to the device's peak at LLaMA-2-7B dimensions (hidden 4096, ffn
//! 11008, 32 heads, vocab 32000), cut to 2 layers: the paper's setting (SparseGrad, keep 1%, on the
//! up and down projections of the top block, bf16) at its smallest token count, 1 x 16.
//! The full matrix (every method, f32 and bf16, 2 and 4 layers, two token counts) is
//! tests/cuda_memory_plan.rs with `SPARSEGRAD_PLAN_DIMS=llama2-7b`, too long for CI.
//!
//! On the emulator the GEMMs' arithmetic is skipped (`SG_EMU_GEMM_ARITHMETIC=0`: the
//! bytes a step allocates do not depend on the values) and the run takes a few minutes and
//! about 5 GB of host memory; with `SPARSEGRAD_CUDA_TEST_BIG=0` (the ASan run) the same
//! check runs at SmolLM2-135M dimensions instead. On a GPU it runs at 7B dimensions as is.

mod common;
mod cuda_common;

use cuda_common::cuda_test;
use cuda_common::plan::{bases, check_case, methods};
use sparsegrad::perf::llama::named_config;
use sparsegrad::perf::roofline::H100_SXM;
use sparsegrad::plan::PlanSetup;
use sparsegrad::{LlamaWeights, Method, MlpPlan, Precision, TrainOptions};

cuda_test!(
    fn the_plan_equals_the_device_peak_at_llama2_7b_dimensions(cuda) {
        let emulated = cuda.is_emulated();
        let dir = tempfile::tempdir().unwrap();
        if emulated {
            if std::env::var_os("SG_EMU_PROFILE").is_none() {
                std::env::set_var("SG_EMU_PROFILE", dir.path().join("emu.jsonl"));
            }
            std::env::set_var("SG_EMU_GEMM_ARITHMETIC", "0");
        }
        let big = std::env::var("SPARSEGRAD_CUDA_TEST_BIG").map_or(true, |v| v != "0");
        let mut c = named_config(if big || !emulated { "llama2-7b" } else { "smollm2-135m" }).unwrap();
        c.layers = 2;
        let weights = LlamaWeights::random(&c, 3).unwrap();
        let basis = bases(&c);
        let m = methods("sparsegrad");
        let (batch, seq) = (1, 16);
        let setup = PlanSetup {
            config: c.clone(),
            plan: MlpPlan { layers: vec![1], methods: [Method::Frozen, m, m] },
            options: TrainOptions { precision: Precision::Bf16, expected_tokens: batch * seq, ..Default::default() },
            batch,
            seq,
            max_positions: seq,
            device: H100_SXM,
            tf32: false,
        };
        println!("dimensions: hidden {}, ffn {}, vocab {}, {} layers", c.hidden, c.ffn, c.vocab, c.layers);
        check_case(&setup, &weights, &basis, emulated);
    }
);
