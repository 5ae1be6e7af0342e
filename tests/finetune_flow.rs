//! The whole fine-tuning flow on a tiny random LLaMA in seconds: preliminary phase,
//! bases, training, evaluation, adapter and merged weights, for every method.

use sparsegrad::linear::trainable::{Method, TrainOptions};
use sparsegrad::model::config::LlamaConfig;
use sparsegrad::model::llama::{LlamaModel, MlpPlan};
use sparsegrad::model::weights::LlamaWeights;
use sparsegrad::model::TrainingSetup;
use sparsegrad::recipes::finetune::{lora_rank_for_budget, run, Dataset, FinetuneConfig, MethodKind, Progress};
use sparsegrad::FormulationChoice;
use sparsegrad::{Cpu, Keep, Precision, Selection};

fn config() -> LlamaConfig {
    LlamaConfig {
        hidden: 24,
        ffn: 40,
        layers: 4,
        heads: 4,
        kv_heads: 2,
        head_dim: 6,
        rope_theta: 10000.0,
        rope_scaling: None,
        rms_eps: 1e-5,
        vocab: 50,
        tied_embeddings: true,
        max_seq: 64,
        bos: Some(1),
        eos: Some(2),
    }
}

/// Sentences from a tiny "language": counting patterns the model can learn fast.
fn dataset() -> Dataset {
    let sentence =
        |i: usize| -> Vec<u32> { (0..3 + i % 5).map(|j| 3 + ((i * 7 + j * (1 + i % 3)) % 40) as u32).collect() };
    Dataset {
        train: (0..200).map(sentence).collect(),
        validation: (200..232).map(sentence).collect(),
        spec_bos: 1,
        spec_eos: Some(2),
    }
}

fn cfg(method: MethodKind) -> FinetuneConfig {
    FinetuneConfig {
        method,
        blocks: vec![1, 3],
        projections: [true; 3],
        steps: 12,
        batch: 4,
        seq_len: 10,
        keep: 0.05,
        selection: Selection::Exact,
        formulation: FormulationChoice::FlopModel,
        lora_rank: 0,
        lora_alpha: 0.0,
        lr: 1e-2,
        seed: 7,
        precision: Precision::Full,
        prelim_steps: 3,
        eval_batches: 2,
        eval_every: 4,
    }
}

#[test]
fn every_method_runs_the_flow_and_lowers_the_validation_loss() {
    let weights = LlamaWeights::random(&config(), 5).unwrap();
    let data = dataset();
    let dir = tempfile::tempdir().unwrap();
    let budget = lora_rank_for_budget(0.05, 40, 24);
    for method in MethodKind::ALL {
        let cpu = Cpu::new();
        let mut events = Vec::new();
        let (report, model, bases) = run(&cpu, &weights, &data, &cfg(method), None, &mut |p| events.push(p)).unwrap();
        assert!(
            report.val_loss_after < report.val_loss_before,
            "{method:?}: {} -> {}",
            report.val_loss_before,
            report.val_loss_after
        );
        assert_eq!(report.train_curve.len(), 12);
        assert_eq!(report.val_curve.iter().map(|v| v.0).collect::<Vec<_>>(), vec![0, 4, 8, 12]);
        assert!(report.peak_memory_bytes > 0 && report.tokens_per_s > 0.0);
        let prelim = events.iter().filter(|e| matches!(e, Progress::Preliminary { .. })).count();
        assert_eq!(prelim, if method == MethodKind::SparseGrad { 3 } else { 0 });
        assert_eq!(bases.is_some(), method == MethodKind::SparseGrad);
        // The premise: measured once, after the bases, for every projection type. The top
        // 1% of any matrix holds at least 1% of its squared norm, and at most all of it.
        let premise: Vec<_> =
            events.iter().filter_map(|e| if let Progress::Premise(p) = e { Some(p) } else { None }).collect();
        if method == MethodKind::SparseGrad {
            assert_eq!(premise, vec![&report.premise]);
            assert_eq!(report.premise.iter().map(|p| p.group).collect::<Vec<_>>(), vec!["gate", "up", "down"]);
            for p in &report.premise {
                assert!((0.01..=1.0 + 1e-9).contains(&p.original), "{p:?}");
                assert!((0.01..=1.0 + 1e-9).contains(&p.basis), "{p:?}");
            }
            let basis_at = events.iter().position(|e| matches!(e, Progress::Basis { .. })).unwrap();
            let ready_at = events.iter().position(|e| matches!(e, Progress::BasisReady(_))).unwrap();
            let premise_at = events.iter().position(|e| matches!(e, Progress::Premise(_))).unwrap();
            assert!(basis_at < ready_at && ready_at < premise_at && premise_at < events.len() - 1);
            // 3 preliminary batches x 2 blocks x 3 projections, on the host (CPU backend).
            let t = report.gram_timing.expect("the preliminary phase's timing");
            assert_eq!(events[ready_at], Progress::BasisReady(t));
            assert_eq!((t.gradients, t.on_device, t.download_seconds), (18, false, 0.0));
            assert!(t.accumulate_seconds > 0.0 && t.eigensolve_seconds > 0.0, "{t:?}");
        } else {
            assert!(premise.is_empty() && report.premise.is_empty() && report.gram_timing.is_none());
        }
        let per_block = match method {
            MethodKind::Full => 3 * 40 * 24,
            MethodKind::Lora => 3 * budget * (40 + 24),
            _ => 3 * Keep::Fraction(0.05).resolve(40 * 24).unwrap(),
        };
        assert_eq!(report.trainable_parameters, 2 * per_block, "{method:?}");

        // The adapter reproduces the trained model; the merged weights give its forward.
        let probe = [1u32, 5, 9, 13, 2];
        let mut trained = model;
        let expect = trained.logits(&probe).unwrap();
        let path = dir.path().join(format!("{}.safetensors", method.name()));
        trained.save_adapter(&path, &weights, bases.as_ref()).unwrap();
        let keep = Keep::Fraction(0.05);
        let rebuilt_method = match method {
            MethodKind::SparseGrad => Method::SparseGrad { keep, selection: Selection::Exact, formulation: None },
            MethodKind::MeProp => Method::MeProp { keep },
            MethodKind::Full => Method::Full,
            MethodKind::Lora => Method::Lora { rank: budget, alpha: 2.0 * budget as f32 },
        };
        let plan = MlpPlan { layers: vec![1, 3], methods: [rebuilt_method; 3] };
        let opts = TrainOptions {
            optimizer: sparsegrad::Optimizer::Adam(sparsegrad::AdamParams { lr: 1e-2, ..Default::default() }),
            expected_tokens: 40,
            seed: 7,
            ..Default::default()
        };
        let mut fresh = LlamaModel::<Cpu, f32>::new(
            &cpu,
            &weights,
            &TrainingSetup { plan: plan.clone(), bases: bases.as_ref(), options: opts },
            10,
        )
        .unwrap();
        fresh.load_adapter(&path, &weights).unwrap();
        let got = fresh.logits(&probe).unwrap();
        let max = expect.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let worst = got.iter().zip(&expect).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst <= 1e-4 * max.max(1.0), "{method:?}: adapter reload differs by {worst}");
        let merged = trained.merged_weights(&weights).unwrap();
        let mut frozen = LlamaModel::<Cpu, f32>::new(&cpu, &merged, &TrainingSetup::default(), 10).unwrap();
        let got = frozen.logits(&probe).unwrap();
        let worst = got.iter().zip(&expect).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst <= 1e-4 * max.max(1.0), "{method:?}: merged model differs by {worst}");
    }
}

#[test]
fn bad_configurations_are_clear_errors() {
    let weights = LlamaWeights::random(&config(), 5).unwrap();
    let data = dataset();
    let cpu = Cpu::new();
    for bad in [
        FinetuneConfig { blocks: vec![4], ..cfg(MethodKind::Full) },
        FinetuneConfig { blocks: vec![], ..cfg(MethodKind::Full) },
        FinetuneConfig { keep: 0.0, ..cfg(MethodKind::SparseGrad) },
        FinetuneConfig { batch: 0, ..cfg(MethodKind::Lora) },
    ] {
        let err = run(&cpu, &weights, &data, &bad, None, &mut |_| {}).err().expect("an error");
        assert!(matches!(err, sparsegrad::Error::InvalidArgument { .. }), "{err}");
    }
    // Sequences longer than the model was built for are refused, not truncated silently.
    let mut model = LlamaModel::<Cpu, f32>::new(&cpu, &weights, &TrainingSetup::default(), 4).unwrap();
    assert!(model.logits(&[1, 2, 3, 4, 5]).is_err());
    assert!(model.logits(&[1, 2, 99]).is_err(), "token outside the vocabulary");
}

#[test]
fn the_formulation_setting_reaches_every_layer_and_never_changes_results() {
    use sparsegrad::Formulation;
    let weights = LlamaWeights::random(&config(), 5).unwrap();
    let data = dataset();
    let cpu = Cpu::new();
    let short = |formulation| FinetuneConfig { steps: 3, eval_every: 0, formulation, ..cfg(MethodKind::SparseGrad) };
    let (_, _, bases) = run(&cpu, &weights, &data, &short(FormulationChoice::FlopModel), None, &mut |_| {}).unwrap();
    let mut losses = Vec::new();
    for choice in [
        FormulationChoice::Fixed(Formulation::Merged),
        FormulationChoice::Fixed(Formulation::Transformed),
        FormulationChoice::Measure,
    ] {
        let (report, model, _) = run(&cpu, &weights, &data, &short(choice), bases.clone(), &mut |_| {}).unwrap();
        for l in [1, 3] {
            for proj in model.mlp(l).unwrap().projections() {
                let got = proj.linear.formulation().expect("a SparseGrad layer");
                if let FormulationChoice::Fixed(f) = choice {
                    assert_eq!(got, f, "block {l}");
                }
            }
        }
        losses.push(report.val_loss_after);
    }
    // Both formulations are exact: the same training up to rounding.
    for l in &losses[1..] {
        assert!((l - losses[0]).abs() <= 1e-4 * losses[0].abs(), "{losses:?}");
    }
    assert!(FormulationChoice::parse("fastest").unwrap_err().to_string().contains("flops, measure, merged"));
    assert_eq!(FormulationChoice::parse("measure").unwrap(), FormulationChoice::Measure);
}
