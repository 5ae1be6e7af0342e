//! The library side of issue 10's hardening: fallible backend allocation, strict JSON,
//! the writer's refusal of special files, and sizes bounded before allocation in the
//! batch builder and the fine-tuning flow.

use sparsegrad::io::{escape, json::parse_unique, write_atomic};
use sparsegrad::model::config::LlamaConfig;
use sparsegrad::model::weights::LlamaWeights;
use sparsegrad::recipes::finetune::{run, Dataset, FinetuneConfig, MethodKind};
use sparsegrad::recipes::vader::{make_batch, BatchSpec};
use sparsegrad::FormulationChoice;
use sparsegrad::{Backend, Cpu, Error, Precision, Selection};

#[test]
fn cpu_allocation_failure_is_an_error_naming_the_buffer_and_bytes() {
    let cpu = Cpu::new();
    // Past isize::MAX (capacity overflow) and 70 TB (refused by the allocator): both
    // aborted the process through vec![..; len] before.
    for len in [usize::MAX / 8, 1usize << 44] {
        match cpu.alloc::<f32>(len) {
            Err(Error::OutOfMemory { what, bytes }) => {
                assert!(what.contains("cpu") && what.contains("f32"), "{what}");
                assert_eq!(bytes, len as u128 * 4);
            }
            other => panic!("alloc of {len} f32: expected OutOfMemory, got {:?}", other.map(|_| ())),
        }
    }
    let e = cpu.alloc::<f32>(1usize << 44).err().unwrap().to_string();
    assert!(e.contains("out of memory") && e.contains("70.4 TB"), "{e}");
    assert_eq!(cpu.memory_stats().current_bytes, 0, "a failed alloc must not count");
}

#[test]
fn json_with_a_repeated_key_is_refused_at_any_depth() {
    assert!(parse_unique(r#"{"a": 1, "b": {"c": [1, {"d": 2}]}}"#, None).is_ok());
    for bad in [r#"{"a": 1, "a": 2}"#, r#"{"w": {"x": "f1", "x": "f2"}}"#, r#"[{"k": 1, "k": 1}]"#] {
        let e = parse_unique(bad, None).expect_err("duplicate refused").to_string();
        assert!(e.contains("appears twice"), "{e}");
    }
}

#[test]
fn writer_refuses_special_targets_and_escape_keeps_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("t");
    std::fs::write(&target, b"keep").unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let e = write_atomic(&link, |w| w.write_all(b"new")).expect_err("refused").to_string();
    assert!(e.contains("symbolic link"), "{e}");
    assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(escape("a\r\nb\0c\u{1b}[2J", 100), "a\\r\\nb\\u{0}c\\u{1b}[2J");
    assert_eq!(escape("abcdef", 3), "abc...");
}

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
