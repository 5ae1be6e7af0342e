//! The BERT classifier: forward against a naive f64 reference written out here, the
//! hand-rolled backward against finite differences of that reference (every MLP projection
//! of every layer and the head, both poolings, ragged padded batches), training that
//! lowers the loss with each method, the loaders' errors, and the real all-MiniLM-L6-v2
//! against the reference embeddings of Hugging Face transformers.

mod common;

use common::assert_close;
use common::bert::{batch_data, collect_bases, head, tiny};
use sparsegrad::linear::trainable::{Method, TrainOptions};
use sparsegrad::model::bert::tokenizer::BertTokenizer;
use sparsegrad::model::bert::{BertModel, BertPlan, BertWeights, HeadConfig};
use sparsegrad::model::TrainingSetup;
use sparsegrad::optim::Optimizer;
use sparsegrad::{AdamParams, Cpu, Error, Keep, PoolKind, Selection};
use std::path::PathBuf;

// ---- the naive reference ------------------------------------------------------------------------

fn layernorm(x: &[f64], w: &[f32], b: &[f32], h: usize, eps: f64) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    for (xr, yr) in x.chunks(h).zip(y.chunks_mut(h)) {
        let mu = xr.iter().sum::<f64>() / h as f64;
        let var = xr.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / h as f64;
        for c in 0..h {
            yr[c] = (xr[c] - mu) / (var + eps).sqrt() * w[c] as f64 + b[c] as f64;
        }
    }
    y
}

/// `x W^T + b` for `x` `(t, inp)`, `W` `(out, inp)`.
fn linear(x: &[f64], w: &[f64], b: &[f64], t: usize, out: usize, inp: usize) -> Vec<f64> {
    let mut y = vec![0.0; t * out];
    for r in 0..t {
        for o in 0..out {
            y[r * out + o] = b[o] + (0..inp).map(|i| x[r * inp + i] * w[o * inp + i]).sum::<f64>();
        }
    }
    y
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
}

/// The reference loss (mean cross-entropy) with the MLP weights of every layer and the
/// head given explicitly (those are what the finite differences perturb).
struct Reference<'a> {
    w: &'a BertWeights,
    mlp: Vec<[Vec<f64>; 2]>,
    head_w: Vec<f64>,
    head_b: Vec<f64>,
    pooling: PoolKind,
}

impl Reference<'_> {
    fn pooled(&self, ids: &[u32], lengths: &[u32], batch: usize, seq: usize) -> Vec<f64> {
        let c = &self.w.config;
        let (h, t, nh, d) = (c.hidden, batch * seq, c.heads, c.head_dim());
        let mut x = vec![0.0; t * h];
        for r in 0..t {
            for k in 0..h {
                x[r * h + k] = self.w.word_emb[ids[r] as usize * h + k] as f64
                    + self.w.pos_emb[(r % seq) * h + k] as f64
                    + self.w.type_emb[k] as f64;
            }
        }
        let eps = c.ln_eps as f64;
        let mut x = layernorm(&x, &self.w.emb_ln_w, &self.w.emb_ln_b, h, eps);
        for (l, lw) in self.w.layers.iter().enumerate() {
            let q = linear(&x, &to64(&lw.q), &to64(&lw.q_bias), t, h, h);
            let k = linear(&x, &to64(&lw.k), &to64(&lw.k_bias), t, h, h);
            let v = linear(&x, &to64(&lw.v), &to64(&lw.v_bias), t, h, h);
            let mut ctx = vec![0.0; t * h];
            for b in 0..batch {
                let n = lengths[b] as usize;
                for head in 0..nh {
                    for i in 0..seq {
                        let qi = &q[(b * seq + i) * h + head * d..][..d];
                        let scores: Vec<f64> = (0..n)
                            .map(|j| {
                                let kj = &k[(b * seq + j) * h + head * d..][..d];
                                qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()
                            })
                            .collect();
                        let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                        let z: f64 = e.iter().sum();
                        for (j, ej) in e.iter().enumerate() {
                            for dd in 0..d {
                                ctx[(b * seq + i) * h + head * d + dd] += ej / z * v[(b * seq + j) * h + head * d + dd];
                            }
                        }
                    }
                }
            }
            let o = linear(&ctx, &to64(&lw.o), &to64(&lw.o_bias), t, h, h);
            let a: Vec<f64> = x.iter().zip(&o).map(|(a, b)| a + b).collect();
            let m = layernorm(&a, &lw.attn_ln_w, &lw.attn_ln_b, h, eps);
            let pre = linear(&m, &self.mlp[l][0], &to64(&lw.inter_bias), t, c.ffn, h);
            let act: Vec<f64> = pre.iter().map(|&v| gelu(v)).collect();
            let mo = linear(&act, &self.mlp[l][1], &to64(&lw.out_bias), t, h, c.ffn);
            let s: Vec<f64> = m.iter().zip(&mo).map(|(a, b)| a + b).collect();
            x = layernorm(&s, &lw.out_ln_w, &lw.out_ln_b, h, eps);
        }
        let mut pooled = vec![0.0; batch * h];
        for b in 0..batch {
            let n = lengths[b] as usize;
            for k in 0..h {
                pooled[b * h + k] = match self.pooling {
                    PoolKind::Cls => x[b * seq * h + k],
                    PoolKind::Mean => (0..n).map(|j| x[(b * seq + j) * h + k]).sum::<f64>() / n as f64,
                };
            }
        }
        pooled
    }

    fn loss(&self, ids: &[u32], lengths: &[u32], labels: &[u32], batch: usize, seq: usize) -> f64 {
        let h = self.w.config.hidden;
        let classes = self.head_b.len();
        let logits = linear(&self.pooled(ids, lengths, batch, seq), &self.head_w, &self.head_b, batch, classes, h);
        let mut total = 0.0;
        for b in 0..batch {
            let l = &logits[b * classes..(b + 1) * classes];
            let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + l.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            total += lse - l[labels[b] as usize];
        }
        total / batch as f64
    }
}

#[test]
fn backward_matches_finite_differences_of_a_naive_reference() {
    let cfg = tiny();
    let w = BertWeights::random(&cfg, 3).unwrap();
    let (ids, lengths, labels, batch, seq) = batch_data();
    for pooling in [PoolKind::Mean, PoolKind::Cls] {
        let cpu = Cpu::new();
        let plan = BertPlan::all(&cfg, Method::Collect);
        let mut model = BertModel::<Cpu, f64>::new(
            &cpu,
            &w,
            &TrainingSetup { plan: plan.clone(), bases: None, options: TrainOptions::default() },
            &head(pooling),
        )
        .unwrap();
        let loss = model.forward(&ids, &lengths, &labels, batch, seq, 1.0).unwrap();
        model.backward().unwrap();
        let head_w = model.head().merged_weight().unwrap();
        let head_b = model.head().bias_host().unwrap().unwrap();
        let mut r = Reference {
            w: &w,
            mlp: w.layers.iter().map(|l| [to64(&l.inter), to64(&l.out)]).collect(),
            head_w: head_w.clone(),
            head_b: head_b.clone(),
            pooling,
        };
        let want = r.loss(&ids, &lengths, &labels, batch, seq);
        assert!((loss.mean() - want).abs() < 1e-10, "{pooling:?}: loss {} vs reference {want}", loss.mean());
        let hstep = 1e-5;
        // Every MLP projection of every layer (the lowest is reached through everything above).
        for l in 0..cfg.layers {
            for j in 0..2 {
                let grad = model.mlp(l).unwrap().projections()[j].linear.dense_grad_host().unwrap();
                let numeric: Vec<f64> = (0..grad.len())
                    .step_by(5)
                    .map(|e| {
                        let orig = r.mlp[l][j][e];
                        r.mlp[l][j][e] = orig + hstep;
                        let up = r.loss(&ids, &lengths, &labels, batch, seq);
                        r.mlp[l][j][e] = orig - hstep;
                        let down = r.loss(&ids, &lengths, &labels, batch, seq);
                        r.mlp[l][j][e] = orig;
                        (up - down) / (2.0 * hstep)
                    })
                    .collect();
                let analytic: Vec<f64> = grad.iter().step_by(5).copied().collect();
                assert_close(&format!("{pooling:?} layer {l} projection {j}"), &analytic, &numeric, 1e-8, 1e-5);
            }
        }
        // The head.
        let grad = model.head().dense_grad_host().unwrap();
        let numeric: Vec<f64> = (0..grad.len())
            .map(|e| {
                let orig = r.head_w[e];
                r.head_w[e] = orig + hstep;
                let up = r.loss(&ids, &lengths, &labels, batch, seq);
                r.head_w[e] = orig - hstep;
                let down = r.loss(&ids, &lengths, &labels, batch, seq);
                r.head_w[e] = orig;
                (up - down) / (2.0 * hstep)
            })
            .collect();
        assert_close(&format!("{pooling:?} head"), &grad, &numeric, 1e-8, 1e-5);
        // Padding is ignored: changing a padding token's id changes nothing.
        let mut ids2 = ids.clone();
        ids2[seq + 3] = 11;
        let pooled_a = model.embed(&ids, &lengths, batch, seq).unwrap();
        let pooled_b = model.embed(&ids2, &lengths, batch, seq).unwrap();
        assert_eq!(pooled_a, pooled_b, "{pooling:?}: a padding token leaked into the result");
        let reference = r.pooled(&ids, &lengths, batch, seq);
        assert_close(&format!("{pooling:?} pooled"), &pooled_a, &reference, 1e-12, 1e-10);
    }
}

#[test]
fn every_method_lowers_the_training_loss() {
    let cfg = tiny();
    let w = BertWeights::random(&cfg, 5).unwrap();
    let (ids, lengths, labels, batch, seq) = batch_data();
    let opts = TrainOptions {
        optimizer: Optimizer::Adam(AdamParams { lr: 1e-2, ..Default::default() }),
        ..Default::default()
    };
    let keep = Keep::Fraction(0.1);
    let bases = collect_bases(&w, &ids, &lengths, &labels, batch, seq, false);
    let methods = [
        Method::Frozen,
        Method::Full,
        Method::Lora { rank: 2, alpha: 4.0 },
        Method::MeProp { keep },
        Method::SparseGrad { keep, selection: Selection::Exact, formulation: None },
        Method::SparseGrad { keep, selection: Selection::SparseByDense { threshold: 0.0 }, formulation: None },
    ];
    // The head alone trains under Frozen: every MLP method must end below it.
    let mut head_only = f64::INFINITY;
    for method in methods {
        let cpu = Cpu::new();
        let plan = BertPlan::all(&cfg, method);
        let mut model = BertModel::<Cpu, f32>::new(
            &cpu,
            &w,
            &TrainingSetup { plan: plan.clone(), bases: Some(&bases), options: opts },
            &head(PoolKind::Mean),
        )
        .unwrap();
        let first = model.train_step(&ids, &lengths, &labels, batch, seq).unwrap().mean();
        let mut last = first;
        for _ in 0..30 {
            last = model.train_step(&ids, &lengths, &labels, batch, seq).unwrap().mean();
        }
        if method == Method::Frozen {
            assert!(last < 0.9 * first, "head only: loss {first} -> {last}");
            head_only = last;
        } else {
            assert!(last < 0.8 * head_only, "{}: loss {first} -> {last}, head only {head_only}", method.name());
        }
        let merged = model.merged_weights(&w).unwrap();
        let changed = merged.layers[1].inter != w.layers[1].inter;
        assert_eq!(changed, method != Method::Frozen, "{}: merged weights", method.name());
    }
}

#[test]
fn per_layer_bases_name_their_layer() {
    let w = BertWeights::random(&tiny(), 5).unwrap();
    let (ids, lengths, labels, batch, seq) = batch_data();
    let set = collect_bases(&w, &ids, &lengths, &labels, batch, seq, true);
    assert!(set.get("layer.1.output").is_ok());
}

#[test]
fn bad_batches_and_plans_are_clear_errors() {
    let cfg = tiny();
    let w = BertWeights::random(&cfg, 1).unwrap();
    let cpu = Cpu::new();
    let plan = BertPlan::all(&cfg, Method::Full);
    let mut m = BertModel::<Cpu, f32>::new(
        &cpu,
        &w,
        &TrainingSetup { plan: plan.clone(), bases: None, options: TrainOptions::default() },
        &head(PoolKind::Mean),
    )
    .unwrap();
    let ids = vec![1u32; 6];
    assert!(matches!(m.forward(&ids, &[3, 0], &[0, 1], 2, 3, 1.0), Err(Error::InvalidArgument { .. })));
    assert!(matches!(m.forward(&ids, &[3, 4], &[0, 1], 2, 3, 1.0), Err(Error::InvalidArgument { .. })));
    assert!(matches!(m.forward(&ids, &[3, 3], &[0, 3], 2, 3, 1.0), Err(Error::InvalidArgument { .. })));
    assert!(matches!(m.forward(&[99; 6], &[3, 3], &[0, 1], 2, 3, 1.0), Err(Error::InvalidArgument { .. })));
    assert!(matches!(m.forward(&ids, &[3, 3], &[0], 2, 3, 1.0), Err(Error::Shape { .. })));
    assert!(matches!(m.forward(&[1; 20], &[10, 10], &[0, 1], 2, 10, 1.0), Err(Error::InvalidArgument { .. })));
    assert!(matches!(m.backward(), Err(Error::InvalidArgument { .. })));
    let bad_plan = BertPlan { layers: vec![2], ..plan.clone() };
    assert!(BertModel::<Cpu, f32>::new(
        &cpu,
        &w,
        &TrainingSetup { plan: bad_plan.clone(), bases: None, options: TrainOptions::default() },
        &head(PoolKind::Mean)
    )
    .is_err());
    let sg = BertPlan::all(
        &cfg,
        Method::SparseGrad { keep: Keep::Fraction(0.1), selection: Selection::Exact, formulation: None },
    );
    let e = BertModel::<Cpu, f32>::new(
        &cpu,
        &w,
        &TrainingSetup { plan: sg.clone(), bases: None, options: TrainOptions::default() },
        &head(PoolKind::Mean),
    )
    .err();
    assert!(e.is_some_and(|e| e.to_string().contains("bases")));
}

#[test]
fn weights_round_trip_through_hf_safetensors_and_loaders_name_what_is_wrong() {
    let cfg = tiny();
    let w = BertWeights::random(&cfg, 9).unwrap();
    let dir = tempdir("roundtrip");
    w.save_hf_safetensors(&dir).unwrap();
    assert_eq!(BertWeights::from_hf_dir(&dir).unwrap(), w);
    // A task checkpoint's names (`bert.` prefix, plus a pooler and a classifier) load too.
    let file = sparsegrad::io::safetensors::SafetensorsFile::open(dir.join("model.safetensors")).unwrap();
    let mut prefixed = sparsegrad::io::safetensors::SafetensorsWriter::new();
    for name in file.names() {
        let (data, shape) = file.tensor_f32(&name).unwrap();
        prefixed.add_f32(&format!("bert.{name}"), &shape, data).unwrap();
    }
    prefixed.add_f32("bert.pooler.dense.bias", &[8], vec![0.5; 8]).unwrap();
    prefixed.add_f32("classifier.weight", &[2, 8], vec![0.5; 16]).unwrap();
    let task_dir = tempdir("prefixed");
    prefixed.write(&task_dir.join("model.safetensors")).unwrap();
    std::fs::copy(dir.join("config.json"), task_dir.join("config.json")).unwrap();
    assert_eq!(BertWeights::from_hf_dir(&task_dir).unwrap(), w);
    std::fs::remove_dir_all(&task_dir).ok();
    // A config that does not match the tensors: the first mismatched tensor is named.
    let mut cfg2 = cfg.clone();
    cfg2.ffn = 13;
    std::fs::write(dir.join("config.json"), serde_json::to_string(&cfg2.to_hf_config_json()).unwrap()).unwrap();
    let e = BertWeights::from_hf_dir(&dir).unwrap_err().to_string();
    assert!(e.contains("encoder.layer.0.intermediate.dense.weight"), "{e}");
    // A missing tensor.
    let mut w3 = w.clone();
    w3.config.layers = 3;
    w3.layers.push(w.layers[0].clone());
    std::fs::write(dir.join("config.json"), serde_json::to_string(&w3.config.to_hf_config_json()).unwrap()).unwrap();
    let e = BertWeights::from_hf_dir(&dir).unwrap_err();
    assert!(matches!(&e, Error::MissingTensor { name, .. } if name.contains("encoder.layer.2.")), "{e}");
    // A config missing a field.
    std::fs::write(dir.join("config.json"), r#"{"hidden_size": 8}"#).unwrap();
    let e = BertWeights::from_hf_dir(&dir).unwrap_err().to_string();
    assert!(e.contains("vocab_size"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sparsegrad-bert-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// all-MiniLM-L6-v2 (from scripts/fetch-assets.sh), or `SPARSEGRAD_MINILM_DIR`.
fn minilm_dir() -> Option<PathBuf> {
    let dir = common::assets::minilm_dir();
    common::assets::present(&[&dir.join("model.safetensors")]).then_some(dir)
}

#[test]
fn minilm_matches_the_reference_embeddings() {
    let Some(dir) = minilm_dir() else { return };
    let w = BertWeights::from_hf_dir(&dir).unwrap();
    assert_eq!((w.config.layers, w.config.hidden, w.config.ffn), (6, 384, 1536));
    let tok = BertTokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let cases: [(&str, &[u32], [f32; 4]); 2] = [
        (
            "This is an example sentence",
            &[101, 2023, 2003, 2019, 2742, 6251, 102],
            [0.067657, 0.063496, 0.048713, 0.079305],
        ),
        (
            "The movie was a complete waste of time.",
            &[101, 1996, 3185, 2001, 1037, 3143, 5949, 1997, 2051, 1012, 102],
            [-0.015381, 0.100195, 0.023065, 0.056971],
        ),
    ];
    for (text, ids, _) in &cases {
        assert_eq!(tok.encode(text, 128).unwrap(), *ids, "{text}");
    }
    let texts: Vec<&str> = cases.iter().map(|c| c.0).collect();
    let batch = tok.batch(&texts, 128).unwrap();
    let cpu = Cpu::new();
    let head = HeadConfig { classes: 2, pooling: PoolKind::Mean, optimizer: Optimizer::default(), seed: 0 };
    let mut m = BertModel::<Cpu, f32>::new(&cpu, &w, &TrainingSetup::default(), &head).unwrap();
    let pooled = m.embed(&batch.ids, &batch.lengths, batch.batch, batch.seq).unwrap();
    for (b, (text, _, want)) in cases.iter().enumerate() {
        let v = &pooled[b * 384..(b + 1) * 384];
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let got: Vec<f32> = v[..4].iter().map(|x| x / norm).collect();
        assert_close(&format!("embedding of {text:?}"), &got, want, 1e-4, 0.0);
    }
    // A batch of one gives the same vector as inside the padded batch.
    let single = tok.batch(&texts[..1], 128).unwrap();
    let alone = m.embed(&single.ids, &single.lengths, 1, single.seq).unwrap();
    assert_close("unpadded vs padded", &alone, &pooled[..384], 1e-5, 1e-4);
}
