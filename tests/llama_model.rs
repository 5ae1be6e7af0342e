//! The LLaMA model on the CPU: forward against a naive f64 reference written here from
//! the weights (tiny random config and the real SmolLM2 on a few tokens), a greedy
//! completion of the real model, and finite differences of the loss for every method.

mod common;

use common::*;
use sparsegrad::linear::trainable::{Linear, Method, TrainOptions};
use sparsegrad::model::config::LlamaConfig;
use sparsegrad::model::llama::{LlamaModel, MlpPlan, TokenBatch, GROUPS};
use sparsegrad::model::weights::LlamaWeights;
use sparsegrad::model::TrainingSetup;
use sparsegrad::{BasisSet, Cpu, Formulation, Keep, Optimizer, Selection};
use std::path::Path;

fn tiny_config(tied: bool) -> LlamaConfig {
    LlamaConfig {
        hidden: 16,
        ffn: 24,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 4,
        rope_theta: 10000.0,
        rope_scaling: None,
        rms_eps: 1e-5,
        vocab: 37,
        tied_embeddings: tied,
        max_seq: 64,
        bos: Some(1),
        eos: Some(2),
    }
}

/// A naive f64 LLaMA forward: logits `(seq, vocab)` of one sequence.
fn reference_logits(w: &LlamaWeights, ids: &[u32]) -> Vec<f64> {
    let c = &w.config;
    let (n, h, hd) = (ids.len(), c.hidden, c.head_dim);
    let f = |v: &[f32]| to64(v);
    let rms = |x: &[f64], g: &[f32]| -> Vec<f64> {
        let mut out = vec![0.0; x.len()];
        for t in 0..n {
            let row = &x[t * h..(t + 1) * h];
            let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / h as f64 + c.rms_eps as f64).sqrt();
            for j in 0..h {
                out[t * h + j] = row[j] * inv * g[j] as f64;
            }
        }
        out
    };
    let linear = |x: &[f64], wt: &[f32], out: usize, inp: usize| matmul(x, &transpose(&f(wt), out, inp), n, inp, out);
    let rope = |x: &mut [f64], heads: usize| {
        for t in 0..n {
            for hh in 0..heads {
                for i in 0..hd / 2 {
                    let freq = (c.rope_theta as f64).powf(-2.0 * i as f64 / hd as f64);
                    let (s, co) = (t as f64 * freq).sin_cos();
                    let base = t * heads * hd + hh * hd;
                    let (a, b) = (x[base + i], x[base + i + hd / 2]);
                    x[base + i] = a * co - b * s;
                    x[base + i + hd / 2] = a * s + b * co;
                }
            }
        }
    };
    let mut x: Vec<f64> = ids.iter().flat_map(|&i| f(&w.embed[i as usize * h..(i as usize + 1) * h])).collect();
    for l in &w.layers {
        let a = rms(&x, &l.attn_norm);
        let mut q = linear(&a, &l.q, c.q_dim(), h);
        let mut k = linear(&a, &l.k, c.kv_dim(), h);
        let v = linear(&a, &l.v, c.kv_dim(), h);
        rope(&mut q, c.heads);
        rope(&mut k, c.kv_heads);
        let mut att = vec![0.0; n * c.q_dim()];
        for hh in 0..c.heads {
            let g = hh / (c.heads / c.kv_heads);
            for i in 0..n {
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..hd).map(|d| q[i * c.q_dim() + hh * hd + d] * k[j * c.kv_dim() + g * hd + d]).sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                for (j, s) in scores.iter().enumerate() {
                    let p = (s - m).exp() / z;
                    for d in 0..hd {
                        att[i * c.q_dim() + hh * hd + d] += p * v[j * c.kv_dim() + g * hd + d];
                    }
                }
            }
        }
        let o = linear(&att, &l.o, h, c.q_dim());
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        let b = rms(&x, &l.ffn_norm);
        let gate = linear(&b, &l.gate, c.ffn, h);
        let up = linear(&b, &l.up, c.ffn, h);
        let act: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
        let down = linear(&act, &l.down, h, c.ffn);
        x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
    }
    let hn = rms(&x, &w.final_norm);
    linear(&hn, w.output_weight(), c.vocab, h)
}

#[test]
fn forward_matches_a_naive_reference_on_a_tiny_random_model() {
    for tied in [true, false] {
        let w = LlamaWeights::random(&tiny_config(tied), 3).unwrap();
        let cpu = Cpu::new();
        let mut model = LlamaModel::<Cpu, f64>::new(&cpu, &w, &TrainingSetup::default(), 64).unwrap();
        let ids = [1u32, 5, 9, 36, 0, 12, 7];
        let got = model.logits(&ids).unwrap();
        let expect = reference_logits(&w, &ids);
        assert_close(&format!("logits (tied = {tied})"), &got, &expect, 1e-10, 1e-9);
    }
}

fn real_model() -> Option<LlamaWeights> {
    let path = common::assets::path(common::assets::SMOLLM_GGUF);
    common::assets::present(&[&path]).then(|| LlamaWeights::load_gguf(&path).unwrap())
}

#[test]
fn real_model_matches_the_reference_and_completes_paris() {
    let Some(w) = real_model() else { return };
    let gguf = sparsegrad::io::gguf::GgufFile::open(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/SmolLM2-135M-Instruct.Q4_1.gguf"),
    )
    .unwrap();
    let tok = sparsegrad::model::tokenizer::Tokenizer::from_gguf(&gguf).unwrap();
    let ids = tok.encode("The capital of France is").unwrap();
    let cpu = Cpu::new();
    let mut model = LlamaModel::<Cpu, f32>::new(&cpu, &w, &TrainingSetup::default(), 64).unwrap();
    let logits = model.logits(&ids).unwrap();
    let expect = reference_logits(&w, &ids);
    // f32 through 30 layers against f64: compare with a tolerance scaled to the logits.
    let err = rel_err(&to64(&logits), &expect);
    assert!(err < 2e-4, "relative error of the logits {err}");
    let vocab = w.config.vocab;
    let last = &logits[(ids.len() - 1) * vocab..];
    let next = (0..vocab).max_by(|&a, &b| last[a].total_cmp(&last[b])).unwrap() as u32;
    assert_eq!(tok.decode(&[next]).unwrap(), " Paris");
}

/// Loss of one fixed batch as a function of the model, in f64.
fn batch() -> (Vec<u32>, Vec<u32>, Vec<f32>, usize, usize) {
    let ids = vec![1, 4, 8, 15, 16, 23, 1, 30, 2, 7, 11, 3];
    let targets = vec![4, 8, 15, 16, 23, 42 % 37, 30, 2, 7, 11, 3, 5];
    let mut mask = vec![1.0f32; 12];
    mask[11] = 0.0; // padding
    (ids, targets, mask, 2, 6)
}

fn bases_for(w: &LlamaWeights, seed: u64) -> BasisSet {
    let c = &w.config;
    let mut r = rng(seed);
    let mut set = BasisSet::new();
    for (g, (o, i)) in GROUPS.iter().zip([(c.ffn, c.hidden), (c.ffn, c.hidden), (c.hidden, c.ffn)]) {
        set.insert(random_basis(&mut r, g, o, i));
    }
    set
}

/// For each method, the analytic gradient of every trained parameter of layer 1's MLP
/// (through attention, norms and the head of layer 1 and the loss) against central
/// differences of the loss.
#[test]
fn finite_differences_of_the_loss_for_every_method() {
    let w = LlamaWeights::random(&tiny_config(true), 11).unwrap();
    let bases = bases_for(&w, 12);
    let (ids, targets, mask, batch, seq) = batch();
    let tokens = TokenBatch { ids: &ids, targets: &targets, mask: &mask, batch, seq };
    let n = mask.iter().filter(|&&m| m != 0.0).count() as f64;
    let cpu = Cpu::new();
    let opts = TrainOptions { optimizer: Optimizer::Sgd { lr: 0.0 }, ..Default::default() };
    let all = Keep::Fraction(1.0);
    let methods = [
        Method::Full,
        Method::SparseGrad { keep: all, selection: Selection::Exact, formulation: Some(Formulation::Transformed) },
        Method::SparseGrad {
            keep: all,
            selection: Selection::SparseByDense { threshold: 0.0 },
            formulation: Some(Formulation::Merged),
        },
        Method::MeProp { keep: all },
        Method::Lora { rank: 2, alpha: 4.0 },
    ];
    let plan_layers = vec![0usize, 1];
    for method in methods {
        let plan = MlpPlan { layers: plan_layers.clone(), methods: [method; 3] };
        let mut model = LlamaModel::<Cpu, f64>::new(
            &cpu,
            &w,
            &TrainingSetup { plan: plan.clone(), bases: Some(&bases), options: opts },
            16,
        )
        .unwrap();
        // LoRA starts at B = 0, where dA vanishes: take one SGD step with lr > 0 first.
        if let Method::Lora { .. } = method {
            let lora_opts = TrainOptions { optimizer: Optimizer::Sgd { lr: 0.5 }, ..opts };
            model = LlamaModel::new(
                &cpu,
                &w,
                &TrainingSetup { plan: plan.clone(), bases: Some(&bases), options: lora_opts },
                16,
            )
            .unwrap();
            model.train_step(&tokens).unwrap();
        }
        model.forward(&tokens, 1.0 / n).unwrap();
        model.backward().unwrap();
        let h = 1e-6;
        // Perturbing a parameter through the layers' own states keeps the test independent of
        // how each method stores it: a fresh model takes every projection's exported state,
        // then one entry moves.
        let states: Vec<(usize, usize, _)> = plan_layers
            .iter()
            .flat_map(|&l| (0..3).map(move |j| (l, j)))
            .map(|(l, j)| (l, j, model.mlp(l).unwrap().projections()[j].linear.export_state().unwrap()))
            .collect();
        for layer in plan_layers.clone() {
            for (j, group) in GROUPS.iter().enumerate() {
                let proj = &model.mlp(layer).unwrap().projections()[j].linear;
                let (analytic, dirs) = gradient_and_directions(proj, &bases, group);
                for (e, (g, dir)) in analytic.iter().zip(dirs).enumerate().step_by(7) {
                    let loss_at = |eps: f64| -> f64 {
                        let mut m = LlamaModel::<Cpu, f64>::new(
                            &cpu,
                            &w,
                            &TrainingSetup { plan: plan.clone(), bases: Some(&bases), options: opts },
                            16,
                        )
                        .unwrap();
                        for (l, jj, st) in &states {
                            m.mlp_mut(*l).unwrap().projections_mut()[*jj].linear.import_state(st).unwrap();
                        }
                        dir(&mut m.mlp_mut(layer).unwrap().projections_mut()[j].linear, eps);
                        m.forward(&tokens, 0.0).unwrap().sum / n
                    };
                    let fd = (loss_at(h) - loss_at(-h)) / (2.0 * h);
                    assert!(
                        (fd - g).abs() < 2e-6 * (1.0 + fd.abs()),
                        "{} layer {layer} {} entry {e}: analytic {g} vs fd {fd}",
                        method.name(),
                        GROUPS[j]
                    );
                }
            }
        }
    }
}

type Direction = Box<dyn Fn(&mut Linear<Cpu, f64>, f64)>;

/// The analytic gradient entries of a projection, each with a function that moves the
/// projection's parameters by `eps` along that entry's direction.
fn gradient_and_directions(p: &Linear<Cpu, f64>, bases: &BasisSet, group: &str) -> (Vec<f64>, Vec<Direction>) {
    let _ = bases.get(group);
    match p {
        Linear::Dense(d) => {
            let g = match d.coo_grad_host() {
                Ok(coo) => {
                    let mut dense = vec![0.0; coo.shape.0 * coo.shape.1];
                    for e in 0..coo.len() {
                        dense[coo.rows[e] as usize * coo.shape.1 + coo.cols[e] as usize] = coo.values[e];
                    }
                    dense
                }
                Err(_) => d.grad_host().unwrap(),
            };
            let dirs = (0..g.len())
                .map(|i| Box::new(move |l: &mut Linear<Cpu, f64>, eps: f64| nudge_dense(l, i, eps)) as Direction)
                .collect();
            (g, dirs)
        }
        Linear::SparseGrad(sg) => {
            let coo = sg.grad_host().unwrap();
            let cols = coo.shape.1;
            let dirs = (0..coo.len())
                .map(|e| {
                    let lin = coo.rows[e] as usize * cols + coo.cols[e] as usize;
                    Box::new(move |l: &mut Linear<Cpu, f64>, eps: f64| nudge_dense(l, lin, eps)) as Direction
                })
                .collect();
            (coo.values.clone(), dirs)
        }
        Linear::Lora(lo) => {
            let (ga, gb) = lo.grad_host().unwrap();
            let na = ga.len();
            let g: Vec<f64> = ga.into_iter().chain(gb).collect();
            let dirs = (0..g.len())
                .map(|i| Box::new(move |l: &mut Linear<Cpu, f64>, eps: f64| nudge_lora(l, i, na, eps)) as Direction)
                .collect();
            (g, dirs)
        }
    }
}

/// Moves entry `i` of the trained matrix (W for dense methods, Wt for SparseGrad) by eps,
/// through the state export/import path.
fn nudge_dense(l: &mut Linear<Cpu, f64>, i: usize, eps: f64) {
    use sparsegrad::linear::state::LayerState;
    let mut st = l.export_state().unwrap();
    match &mut st {
        LayerState::Full { weight, .. } => weight.values[i] += eps,
        LayerState::MeProp { weight, .. } | LayerState::SparseGrad { weight_transformed: weight, .. } => {
            // Make sure the entry is listed, then move it.
            let lin = i as u64;
            match weight.indices.binary_search(&lin) {
                Ok(pos) => weight.values[pos] += eps,
                Err(pos) => {
                    let current = current_entry(l, i);
                    weight.indices.insert(pos, lin);
                    weight.values.insert(pos, current + eps);
                    for m in [&mut weight.exp_avg, &mut weight.exp_avg_sq].into_iter().flatten() {
                        m.insert(pos, 0.0);
                    }
                }
            }
        }
        _ => panic!("not a dense-trained layer"),
    }
    l.import_state(&st).unwrap();
}

fn current_entry(l: &Linear<Cpu, f64>, i: usize) -> f64 {
    match l {
        Linear::SparseGrad(sg) => sg.weight_transformed().unwrap()[i],
        Linear::Dense(d) => d.merged_weight().unwrap()[i],
        Linear::Lora(_) => unreachable!(),
    }
}

fn nudge_lora(l: &mut Linear<Cpu, f64>, i: usize, na: usize, eps: f64) {
    use sparsegrad::linear::state::LayerState;
    let mut st = l.export_state().unwrap();
    if let LayerState::Lora { a, b, .. } = &mut st {
        if i < na {
            a.values[i] += eps;
        } else {
            b.values[i - na] += eps;
        }
    }
    l.import_state(&st).unwrap();
}

/// A layer's error inside the model keeps its kind (here a basis of the wrong shape: a
/// `Shape` error) and says which layer and projection it came from.
#[test]
fn layer_errors_keep_their_kind_inside_the_model() {
    let w = LlamaWeights::random(&tiny_config(true), 5).unwrap();
    let c = &w.config;
    let mut r = rng(6);
    let mut bases = BasisSet::new();
    for (g, (o, i)) in GROUPS.iter().zip([(c.ffn, c.hidden), (c.hidden, c.hidden), (c.hidden, c.ffn)]) {
        bases.insert(random_basis(&mut r, g, o, i)); // `up` is (hidden, hidden): wrong
    }
    let plan = MlpPlan {
        layers: vec![1],
        methods: [Method::SparseGrad { keep: Keep::Fraction(0.1), selection: Selection::Exact, formulation: None }; 3],
    };
    let cpu = Cpu::new();
    let Err(err) = LlamaModel::<Cpu, f32>::new(
        &cpu,
        &w,
        &TrainingSetup { plan: plan.clone(), bases: Some(&bases), options: TrainOptions::default() },
        16,
    ) else {
        panic!("a wrong-shaped basis was accepted")
    };
    match &err {
        sparsegrad::Error::Shape { what, .. } => {
            assert!(what.contains("layer 1 MLP") && what.contains("up"), "context lost: {err}")
        }
        other => panic!("expected a Shape error, got {other:?}"),
    }
}
