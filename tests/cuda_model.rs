//! The LLaMA model and the fine-tuning flow on CUDA against the CPU: logits, losses over
//! a few training steps for every method, f32 and bf16. Skips with
//! `skipped: no CUDA device` where there is no GPU; the same checks run CPU-vs-CPU here
//! to keep the harness honest.
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::cuda_test;
use sparsegrad::linear::trainable::TrainOptions;
use sparsegrad::model::config::LlamaConfig;
use sparsegrad::model::llama::{LlamaModel, MlpPlan};
use sparsegrad::model::weights::LlamaWeights;
use sparsegrad::model::TrainingSetup;
use sparsegrad::recipes::finetune::{run, Dataset, FinetuneConfig, MethodKind};
use sparsegrad::FormulationChoice;
use sparsegrad::{Backend, Cpu, Precision, Selection};

fn config() -> LlamaConfig {
    cuda_common::small_llama_config(true)
}

fn dataset() -> Dataset {
    let sentence =
        |i: usize| -> Vec<u32> { (0..4 + i % 9).map(|j| 3 + ((i * 11 + j * (2 + i % 5)) % 90) as u32).collect() };
    Dataset {
        train: (0..120).map(sentence).collect(),
        validation: (120..150).map(sentence).collect(),
        spec_bos: 1,
        spec_eos: Some(2),
    }
}

fn flow_cfg(method: MethodKind, precision: Precision) -> FinetuneConfig {
    FinetuneConfig {
        method,
        blocks: vec![0, 2],
        projections: [true; 3],
        steps: 4,
        batch: 3,
        seq_len: 17,
        keep: 0.02,
        selection: Selection::Exact,
        formulation: FormulationChoice::FlopModel,
        lora_rank: 0,
        lora_alpha: 0.0,
        lr: 5e-3,
        seed: 3,
        precision,
        prelim_steps: 2,
        eval_batches: 2,
        eval_every: 0,
    }
}

fn logits_on<B: Backend + Clone>(be: &B, w: &LlamaWeights, precision: Precision) -> Vec<f32> {
    let opts = TrainOptions { precision, ..Default::default() };
    let mut m =
        LlamaModel::<B, f32>::new(be, w, &TrainingSetup { plan: MlpPlan::frozen(), bases: None, options: opts }, 32)
            .unwrap();
    m.logits(&[1, 7, 19, 33, 50, 96, 2, 4, 8, 16, 32, 64, 3]).unwrap()
}

fn compare_logits<B: Backend + Clone>(be: &B) {
    let w = LlamaWeights::random(&config(), 9).unwrap();
    for precision in [Precision::Full, Precision::Bf16] {
        let got = logits_on(be, &w, precision);
        let expect = logits_on(&Cpu::new(), &w, precision);
        let scale = expect.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let tol = if precision == Precision::Full { 1e-4 } else { 2e-2 };
        let worst = got.iter().zip(&expect).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst <= tol * scale, "{} {precision:?}: logits differ by {worst} (scale {scale})", be.name());
    }
}

fn compare_flow<B: Backend + Clone>(be: &B) {
    let w = LlamaWeights::random(&config(), 9).unwrap();
    let data = dataset();
    for precision in [Precision::Full, Precision::Bf16] {
        for method in MethodKind::ALL {
            let cfg = flow_cfg(method, precision);
            let (got, _, _) = run(be, &w, &data, &cfg, None, &mut |_| {}).unwrap();
            let (expect, _, _) = run(&Cpu::new(), &w, &data, &cfg, None, &mut |_| {}).unwrap();
            let tol = if precision == Precision::Full { 1e-3 } else { 3e-2 };
            for ((s, a), (_, b)) in got.train_curve.iter().zip(&expect.train_curve) {
                assert!(
                    (a - b).abs() <= tol * b.abs().max(1.0),
                    "{} {method:?} {precision:?} step {s}: loss {a} vs CPU {b}",
                    be.name()
                );
            }
            assert!((got.val_loss_after - expect.val_loss_after).abs() <= tol * expect.val_loss_after.abs().max(1.0));
            assert_eq!(got.trainable_parameters, expect.trainable_parameters);
            // SparseGrad's bases: Grams on the device for a device backend, on the host for the
            // CPU, from the same gradients; the bases concentrate them alike.
            if let (Some(g), Some(e)) = (got.gram_timing, expect.gram_timing) {
                assert_eq!((g.on_device, e.on_device, g.gradients), (!B::HOST_MEMORY, false, e.gradients));
                for (a, b) in got.premise.iter().zip(&expect.premise) {
                    assert!(
                        (a.basis - b.basis).abs() <= 1e-3,
                        "{} {precision:?}: premise {a:?} vs CPU {b:?}",
                        be.name()
                    );
                }
            }
            assert_eq!(got.gram_timing.is_some(), method == MethodKind::SparseGrad);
        }
    }
}

cuda_test!(fn cuda_model_logits_match_the_cpu(cuda) {
    compare_logits(&cuda);
});

cuda_test!(fn cuda_training_flow_matches_the_cpu_for_every_method(cuda) {
    compare_flow(&cuda);
});

#[test]
fn harness_self_check_on_the_cpu() {
    compare_logits(&Cpu::new());
    compare_flow(&Cpu::new());
}
