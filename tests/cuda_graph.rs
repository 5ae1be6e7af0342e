//! CUDA graphs and the sync-free step: capture and replay on the backend (a replay equals
//! the eager ops bit for bit; what a capture cannot hold fails it loudly and leaves the
//! backend usable), and the LLaMA training step captured per shape: replayed steps give
//! bit-identical losses, weights and optimizer state to eager steps, for every method, f32
//! and bf16, with one host wait per step, no allocation and one graph launch.
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::cuda_test;
use sparsegrad::backend::DenseOps;
use sparsegrad::linear::trainable::{Method, TrainOptions};
use sparsegrad::model::config::LlamaConfig;
use sparsegrad::model::llama::{LlamaModel, MlpPlan, TokenBatch};
use sparsegrad::model::weights::LlamaWeights;
use sparsegrad::model::TrainingSetup;
use sparsegrad::perf::shape::StepCounts;
use sparsegrad::{Backend, Basis, BasisSet, Cuda, Error, Keep, Precision, ProfileOptions, Selection};

fn config() -> LlamaConfig {
    cuda_common::small_llama_config(false)
}

/// Seeded ids, next-token targets and a mask with some padding (the mean over the mask must
/// be recomputed on the device for every batch, or a replay would use a stale scale).
fn batch(step: usize, batch: usize, seq: usize) -> (Vec<u32>, Vec<u32>, Vec<f32>) {
    let ids: Vec<u32> = (0..batch * seq).map(|i| 3 + ((i * 7 + step * 13 + i * i) % 90) as u32).collect();
    let targets: Vec<u32> = (0..batch * seq).map(|i| ids[(i + 1) % ids.len()]).collect();
    let mask: Vec<f32> = (0..batch * seq).map(|i| if (i + step) % 7 == 3 { 0.0 } else { 1.0 }).collect();
    (ids, targets, mask)
}

fn methods(m: &str) -> [Method; 3] {
    let keep = Keep::Fraction(0.05);
    let one = match m {
        "sparsegrad" => Method::SparseGrad { keep, selection: Selection::Exact, formulation: None },
        "sparse-by-dense" => {
            Method::SparseGrad { keep, selection: Selection::SparseByDense { threshold: 0.3 }, formulation: None }
        }
        "lora" => Method::Lora { rank: 2, alpha: 4.0 },
        "meprop" => Method::MeProp { keep },
        _ => Method::Full,
    };
    [one; 3]
}

fn bases() -> BasisSet {
    let c = config();
    let mut bases = BasisSet::new();
    for (g, out, inp) in [("gate", c.ffn, c.hidden), ("up", c.ffn, c.hidden), ("down", c.hidden, c.ffn)] {
        bases.insert(Basis::reflection(g, out, inp, 3).unwrap());
    }
    bases
}

fn model(cuda: &Cuda, method: &str, precision: Precision, graphs: bool) -> (LlamaModel<Cuda>, LlamaWeights) {
    let c = config();
    let weights = LlamaWeights::random(&c, 7).unwrap();
    let bases = bases();
    let setup = TrainingSetup {
        plan: MlpPlan { layers: vec![0, 2], methods: methods(method) },
        bases: Some(&bases),
        options: TrainOptions { precision, expected_tokens: 64, seed: 5, ..Default::default() },
    };
    let mut m = LlamaModel::new(cuda, &weights, &setup, 32).unwrap();
    m.set_cuda_graphs(graphs);
    (m, weights)
}

cuda_test!(
    fn replayed_steps_equal_eager_steps_bit_for_bit(cuda) {
        for method in ["sparsegrad", "sparse-by-dense", "lora", "meprop", "full"] {
            for precision in [Precision::Full, Precision::Bf16] {
                let what = format!("{method} {precision:?}");
                let (mut eager, base) = model(&cuda, method, precision, false);
                let (mut graph, _) = model(&cuda, method, precision, true);
                for step in 0..5 {
                    let (ids, targets, mask) = batch(step, 2, 11);
                    let b = TokenBatch { ids: &ids, targets: &targets, mask: &mask, batch: 2, seq: 11 };
                    let (le, lg) = (eager.train_step(&b).unwrap(), graph.train_step(&b).unwrap());
                    assert_eq!(le.sum.to_bits(), lg.sum.to_bits(), "{what}: loss of step {step}");
                    assert_eq!(le.tokens, lg.tokens);
                }
                let (we, wg) = (eager.merged_weights(&base).unwrap(), graph.merged_weights(&base).unwrap());
                for l in [0, 2] {
                    for (a, b) in [(&we.layers[l].gate, &wg.layers[l].gate), (&we.layers[l].down, &wg.layers[l].down)] {
                        assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "{what}: weights of layer {l}");
                    }
                }
                // The saved state (moments and step counters) matches too.
                let dir = tempfile::tempdir().unwrap();
                let (pe, pg) = (dir.path().join("e.safetensors"), dir.path().join("g.safetensors"));
                let bases = bases();
                eager.save_adapter(&pe, &base, Some(&bases)).unwrap();
                graph.save_adapter(&pg, &base, Some(&bases)).unwrap();
                // The same header (as JSON: the metadata map's key order is not part of the
                // format) and the same tensor bytes.
                let split = |f: Vec<u8>| {
                    let n = u64::from_le_bytes(f[..8].try_into().unwrap()) as usize;
                    let header: serde_json::Value = serde_json::from_slice(&f[8..8 + n]).unwrap();
                    (header, f[8 + n..].to_vec())
                };
                let (he, de) = split(std::fs::read(&pe).unwrap());
                let (hg, dg) = split(std::fs::read(&pg).unwrap());
                assert_eq!(he, hg, "{what}: adapter headers");
                assert!(de == dg, "{what}: adapter tensors differ");
            }
        }
    }
);

cuda_test!(
    fn a_replayed_step_waits_once_and_launches_one_graph(cuda) {
        let (mut m, _) = model(&cuda, "sparsegrad", Precision::Bf16, true);
        for step in 0..2 {
            let (ids, targets, mask) = batch(step, 2, 9);
            m.train_step(&TokenBatch { ids: &ids, targets: &targets, mask: &mask, batch: 2, seq: 9 }).unwrap();
        }
        let (ids, targets, mask) = batch(9, 2, 9);
        cuda.profile_begin(ProfileOptions::default()).unwrap();
        m.train_step(&TokenBatch { ids: &ids, targets: &targets, mask: &mask, batch: 2, seq: 9 }).unwrap();
        let events = cuda.profile_end().unwrap();
        let c = StepCounts::of(events.iter().map(|e| (e, 1.0)));
        assert_eq!(c.graph_launches, 1.0, "{c:?}");
        assert!(c.host_syncs <= 1.0, "{} host waits in a replayed step", c.host_syncs);
        assert_eq!(c.allocations, 0.0);
        // Uploads of ids, targets and mask, the graph, the loss sum and its read.
        assert!(c.host_calls <= 6.0, "{} host calls in a replayed step: {events:?}", c.host_calls);
    }
);

cuda_test!(
    fn what_a_capture_cannot_hold_fails_it_and_the_backend_goes_on(cuda) {
        let x = cuda.upload(&[1.0f32, 2.0, 3.0]).unwrap();
        let mut y = cuda.upload(&[0.5f32, 0.5, 0.5]).unwrap();
        // A capture replays what it recorded, every time.
        cuda.begin_capture().unwrap();
        cuda.axpy(2.0, &x, &mut y, 3).unwrap();
        let g = cuda.end_capture().unwrap();
        assert_eq!(cuda.download(&y, 3).unwrap(), vec![0.5, 0.5, 0.5], "a capture does not run its ops");
        cuda.replay(g).unwrap();
        cuda.replay(g).unwrap();
        assert_eq!(cuda.download(&y, 3).unwrap(), vec![4.5, 8.5, 12.5]);
        // A host read inside a capture is refused and the capture fails at its end.
        cuda.begin_capture().unwrap();
        assert!(cuda.download(&y, 3).is_err());
        assert!(matches!(cuda.end_capture(), Err(Error::Cuda { .. })));
        // So is an allocation.
        cuda.begin_capture().unwrap();
        assert!(cuda.alloc::<f32>(5).is_err());
        assert!(cuda.end_capture().is_err());
        // The backend works on, and a dropped graph is gone.
        cuda.axpy(1.0, &x, &mut y, 3).unwrap();
        assert_eq!(cuda.download(&y, 3).unwrap(), vec![5.5, 10.5, 15.5]);
        cuda.drop_graph(g);
        assert!(cuda.replay(g).is_err());
        assert!(cuda.end_capture().is_err(), "no capture is open");
    }
);

cuda_test!(
    fn a_non_finite_gradient_is_reported_with_the_loss_and_changes_nothing(cuda) {
        for method in ["sparsegrad", "full"] {
            let (mut m, base) = model(&cuda, method, Precision::Full, true);
            let (ids, targets, mask) = batch(0, 2, 9);
            let b = TokenBatch { ids: &ids, targets: &targets, mask: &mask, batch: 2, seq: 9 };
            m.train_step(&b).unwrap();
            let before = m.merged_weights(&base).unwrap();
            // A NaN mask weight: the loss turns NaN and every gradient with it; the deferred
            // finiteness checks report it with the step's loss read, and the optimizer
            // kernels leave every parameter, moment and clock as they were.
            let mut bad_mask = mask.clone();
            bad_mask[0] = f32::NAN;
            let b = TokenBatch { ids: &ids, targets: &targets, mask: &bad_mask, batch: 2, seq: 9 };
            let err = m.train_step(&b).unwrap_err();
            assert!(matches!(err, Error::NonFinite { .. }), "{method}: {err}");
            let after = m.merged_weights(&base).unwrap();
            for l in [0, 2] {
                assert_eq!(before.layers[l].gate, after.layers[l].gate, "{method}: layer {l} changed by a bad step");
            }
            // The next good step trains on.
            let b = TokenBatch { ids: &ids, targets: &targets, mask: &mask, batch: 2, seq: 9 };
            m.train_step(&b).unwrap();
        }
    }
);
