//! The recipes' sizes are bounded before anything is allocated: a batch whose size
//! overflows is an error, the fine-tuning flow checks the sequence length, batch and LoRA
//! rank against the model and the data, saturates the evaluation batches, and names the
//! step where training diverged.

use sparsegrad::recipes::finetune::{run, Dataset, FinetuneConfig, MethodKind};
use sparsegrad::recipes::vader::{make_batch, BatchSpec};
use sparsegrad::{Cpu, Error, FormulationChoice, LlamaConfig, LlamaWeights, Precision, Selection};

#[test]
fn batch_sizes_that_overflow_are_errors_not_panics() {
    let spec = BatchSpec { batch: 1 << 62, seq_len: 8, bos: 1, eos: Some(2), pad: 1 };
    assert!(matches!(make_batch(&[&[3, 4]], &spec), Err(Error::InvalidArgument { .. })));
}

fn tiny() -> LlamaConfig {
    LlamaConfig {
        hidden: 8,
        ffn: 16,
        layers: 2,
        heads: 2,
        kv_heads: 1,
        head_dim: 4,
        rope_theta: 10000.0,
        rope_scaling: None,
        rms_eps: 1e-5,
        vocab: 20,
        tied_embeddings: true,
        max_seq: 32,
        bos: Some(1),
        eos: Some(2),
    }
}

fn cfg() -> FinetuneConfig {
    FinetuneConfig {
        method: MethodKind::Full,
        blocks: vec![1],
        projections: [true; 3],
        steps: 1,
        batch: 2,
        seq_len: 8,
        keep: 0.1,
        selection: Selection::Exact,
        formulation: FormulationChoice::FlopModel,
        lora_rank: 0,
        lora_alpha: 0.0,
        lr: 1e-3,
        seed: 0,
        precision: Precision::Full,
        prelim_steps: 1,
        eval_batches: 1,
        eval_every: 0,
    }
}

#[test]
fn finetune_sizes_are_bounded_by_the_model_and_divergence_is_named() {
    let w = LlamaWeights::random(&tiny(), 1).unwrap();
    let data = Dataset {
        train: (0..8).map(|i| vec![3 + i, 4, 5]).collect(),
        validation: vec![vec![3, 6, 7]],
        spec_bos: 1,
        spec_eos: Some(2),
    };
    let cpu = Cpu::new();
    let err = |c: FinetuneConfig| run(&cpu, &w, &data, &c, None, &mut |_| {}).err().expect("refused").to_string();
    assert!(err(FinetuneConfig { seq_len: 100_000, ..cfg() }).contains("context length of 32"));
    assert!(err(FinetuneConfig { batch: 1 << 62, ..cfg() }).contains("too many"));
    let lora = FinetuneConfig { method: MethodKind::Lora, lora_rank: 10_000_000_000, ..cfg() };
    assert!(err(lora).contains("LoRA rank 10000000000 exceeds 8"));
    // 2^62 evaluation batches saturate to every validation sentence instead of wrapping.
    run(&cpu, &w, &data, &FinetuneConfig { eval_batches: 1 << 62, ..cfg() }, None, &mut |_| {}).unwrap();
    let e = err(FinetuneConfig { lr: 1e30, steps: 3, ..cfg() });
    assert!(e.contains("training diverged at step"), "{e}");
}
