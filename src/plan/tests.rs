//! The plan's arithmetic by hand counts at a configuration small enough to add up on paper.

use super::*;
use crate::backend::CLOCK_LEN;
use crate::linear::Keep;
use crate::perf::roofline::H100_SXM;

/// hidden 8, ffn 16, 2 layers, 2 heads of 4 (q_dim 8), 1 kv head (kv_dim 4), vocab 32.
fn small() -> LlamaConfig {
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
        vocab: 32,
        tied_embeddings: false,
        max_seq: 16,
        bos: Some(1),
        eos: Some(2),
    }
}

fn setup(layers: Vec<usize>, methods: [Method; 3], precision: Precision) -> PlanSetup {
    PlanSetup {
        config: small(),
        plan: MlpPlan { layers, methods },
        options: TrainOptions { precision, expected_tokens: 6, ..Default::default() },
        batch: 2,
        seq: 3,
        max_positions: 3,
        device: H100_SXM,
        tf32: false,
    }
}

fn category(p: &MemoryPlan, c: Category) -> u128 {
    p.by_category().into_iter().find(|(k, _)| *k == c).map_or(0, |(_, b)| b)
}

#[test]
fn full_fine_tuning_of_up_and_down_in_f32_by_hand() {
    // Block 1 trains up and down (gate frozen), t = 2 x 3 = 6 tokens.
    let p = MemoryPlan::llama(&setup(vec![1], [Method::Frozen, Method::Full, Method::Full], Precision::Full)).unwrap();
    let clock = (CLOCK_LEN * 8) as u128;
    // Per layer: 2 norms (2*8*4) + q,k,v (16*8*4) + o (8*8*4) = 64 + 512 + 256; both layers.
    // Frozen MLP weights: 3 in layer 0 and gate of layer 1 (16*8*4 = 512 each).
    // Embedding 32*8*4, final norm 8*4, RoPE 2 tables of 3 positions x 2 frequencies.
    assert_eq!(category(&p, Category::FrozenWeights), 2 * 832 + 4 * 512 + 1024 + 32 + 48);
    assert_eq!(category(&p, Category::TrainedWeights), 2 * 512);
    assert_eq!(category(&p, Category::OptimizerState), 2 * (2 * 512 + clock));
    assert_eq!(category(&p, Category::Bases), 0);
    // Only the layers above the lowest trained block keep a saved set: none here (block 1
    // is the top). The MLP of block 1 keeps a, b (2*6*16*4 = 768); up and down their inputs
    // (6*8*4, 6*16*4).
    assert_eq!(category(&p, Category::SavedActivations), 768 + 192 + 384);
    // Dense gradients of up and down (16*8*4 each).
    assert_eq!(category(&p, Category::LayerWorkspace), 2 * 512);
    // ids, targets 2*6*4; mask, losses, final rms 3*6*4; 5 (t, hidden), 2 (t, q), 2 (t, kv)
    // buffers; one shared saved set (rms 2*6*4, q,k,v 6*16*4, attention 6*8*4 + 2*6*2*4);
    // the shared MLP a, b for block 0 (2*6*16*4), h, dh, da, db (4*6*16*4), dx_up (6*8*4);
    // no arena (the lowest trained block is the top one: no attention backward).
    let saved_set = 48 + 384 + 192 + 96;
    assert_eq!(category(&p, Category::SharedWorkspace), 48 + 72 + 960 + 384 + 192 + saved_set + 768 + 1536 + 192);
    // Head 32*8*4 and logits 6*32*4.
    assert_eq!(category(&p, Category::LogitsAndHead), 1024 + 768);
    assert_eq!(p.construction_transient, 0);
    let sum: u128 = p.by_category().iter().map(|(_, b)| b).sum();
    assert_eq!(p.total(), sum);
}

#[test]
fn bf16_frozen_layers_share_one_staging_and_the_arena_appears_below_the_top() {
    // Block 0 trains (full, every projection): block 1 backpropagates through attention.
    let p = MemoryPlan::llama(&setup(vec![0], [Method::Full; 3], Precision::Bf16)).unwrap();
    // Frozen layer 1: each projection keeps W in bf16 only (16*8*2), 3 of them.
    // Attention weights in bf16: q,k,v 16*8*2 + o 8*8*2 = 384 per layer, norms 64.
    assert_eq!(category(&p, Category::FrozenWeights), 2 * (64 + 384) + 3 * 256 + 1024 + 32 + 48);
    let find = |what: &str| p.items.iter().find(|i| i.what == what).map(|i| i.bytes);
    // The dense projections share one bf16 staging pair, no layer keeps its own.
    assert_eq!(find("frozen MLP bf16 input staging"), None);
    assert_eq!(find("frozen MLP bf16 gradient staging"), None);
    // Shared MLP scratch: h, dh, da, db (4*6*16*4), dx_up (6*8*4), the bf16 staging pair
    // (2*6*16*2), and a, b (2*6*16*4), where a bf16 MLP computes them before saving them
    // rounded (block 0 trains, so no block needs them for want of its own).
    assert_eq!(find("MLP scratch"), Some(1536 + 192 + 384 + 768));
    // Blocks 0 and 1 (the backward crosses both MLPs) save a and b in bf16 (2*6*16*2 each).
    assert_eq!(find("MLP gate and up outputs"), Some(2 * 384));
    // Trained layer 0 saves its inputs in bf16: up and gate 6*8, down 6*16.
    assert_eq!(find("gate saved input"), Some(2 * 48));
    assert_eq!(find("down saved input"), Some(2 * 96));
    // Arena: one f32 per query row, 2*2*3 = 12 rows, 6 words, rounded up to 8.
    assert_eq!(find("scratch arena"), Some(8 * 8));
    // Shared bf16 stagings: 2 (t, max(h, q)) and (t, vocab).
    assert_eq!(find("bf16 stagings"), Some(2 * (2 * 6 * 8 + 6 * 32)));
}

#[test]
fn sparsegrad_books_one_basis_per_group_and_its_top_k() {
    let m = Method::sparsegrad(Keep::Fraction(0.25));
    let p = MemoryPlan::llama(&setup(vec![0, 1], [Method::Frozen, m, m], Precision::Full)).unwrap();
    // One basis per group, not per layer: up (16x16 + 8x8) and down (8x8 + 16x16), f32.
    assert_eq!(category(&p, Category::Bases), 2 * (256 + 64) * 4);
    let find = |what: &str| p.items.iter().find(|i| i.what == what).map(|i| i.bytes);
    // k = 32 of 128 entries: u32 rows and columns, f32 values, in 2 layers.
    assert_eq!(find("up gradient COO"), Some(2 * 32 * 12));
    let words = crate::backend::cuda::topk_workspace_words(128) as u128;
    assert_eq!(find("up top-k workspace"), Some(2 * words * 8));
    assert_eq!(find("gate trained weight"), None);
}

#[test]
fn a_plan_over_the_free_memory_names_total_free_and_the_three_largest() {
    let p = MemoryPlan::llama(&setup(vec![1], [Method::Full; 3], Precision::Full)).unwrap();
    assert!(p.check_fits(p.total()).is_ok());
    let e = p.check_fits(p.total() - 1).unwrap_err();
    match &e {
        Error::WouldNotFit { total_bytes, free_bytes, largest } => {
            assert_eq!(*total_bytes, p.total());
            assert_eq!(*free_bytes, p.total() - 1);
            assert_eq!(largest.len(), 3);
            assert!(largest[0].starts_with(&p.largest(1)[0].what), "{largest:?}");
        }
        other => panic!("expected WouldNotFit, got {other}"),
    }
    let text = e.to_string();
    assert!(text.contains("free") && text.contains("largest items"), "{text}");
}

#[test]
fn sizes_that_overflow_and_bad_plans_are_errors() {
    let mut s = setup(vec![1], [Method::Full; 3], Precision::Full);
    s.batch = usize::MAX / 2;
    s.max_positions = 3;
    assert!(MemoryPlan::llama(&s).is_err());
    let mut s = setup(vec![2], [Method::Full; 3], Precision::Full);
    assert!(MemoryPlan::llama(&s).unwrap_err().to_string().contains("layer 2 does not exist"));
    s.plan.layers = vec![0];
    s.seq = 4;
    assert!(MemoryPlan::llama(&s).unwrap_err().to_string().contains("exceeds the 3 positions"));
    s.seq = 0;
    assert!(MemoryPlan::llama(&s).is_err());
    // A LoRA rank the layer would refuse (above min(out, in) = 8).
    let mut s = setup(vec![1], [Method::Lora { rank: 9, alpha: 1.0 }; 3], Precision::Full);
    assert!(MemoryPlan::llama(&s).unwrap_err().to_string().contains("LoRA rank 9 outside 1..=8"));
    s.plan.methods = [Method::Lora { rank: 8, alpha: 1.0 }; 3];
    assert!(MemoryPlan::llama(&s).is_ok());
}
