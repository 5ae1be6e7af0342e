//! The streaming loader (`LlamaCheckpoint`, `LlamaSource`): a model built from bf16 HF
//! shards read one tensor at a time equals one built from the whole model loaded first,
//! in f32 and bf16; building it holds about one tensor beyond what the model keeps (where
//! loading the weights first holds all of them); the merged model is written one tensor at
//! a time and equals `merged_weights`; a tensor that cannot be read stops the save with its
//! error and leaves the old file as it was.

mod common;

use sparsegrad::model::weights::{save_hf_safetensors, LlamaCheckpoint, LlamaSource, Tensor};
use sparsegrad::{
    Cpu, Error, LlamaConfig, LlamaModel, LlamaWeights, Method, MlpPlan, Optimizer, Precision, TokenBatch, TrainOptions,
    TrainingSetup,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Live and peak heap bytes of the whole process.
struct Tracking;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// The allocator's counts are process-wide: every test here runs alone.
static SERIAL: Mutex<()> = Mutex::new(());

fn grew(n: usize) {
    let live = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        grew(l.size());
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        grew(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new >= l.size() {
            grew(new - l.size());
        } else {
            LIVE.fetch_sub(l.size() - new, Ordering::Relaxed);
        }
        System.realloc(p, l, new)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        System.dealloc(p, l)
    }
}

#[global_allocator]
static GLOBAL: Tracking = Tracking;

/// Runs `f`; returns its result, the heap bytes it left live and the most it held above
/// the start at any moment.
fn heap_during<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    let start = LIVE.load(Ordering::Relaxed);
    PEAK.store(start, Ordering::Relaxed);
    let r = f();
    let end = LIVE.load(Ordering::Relaxed);
    (r, end.saturating_sub(start), PEAK.load(Ordering::Relaxed) - start)
}

/// Many layers of small tensors, so the whole model is many times its largest tensor.
fn config() -> LlamaConfig {
    LlamaConfig {
        hidden: 64,
        ffn: 96,
        layers: 24,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        rope_theta: 10_000.0,
        rope_scaling: None,
        rms_eps: 1e-6,
        vocab: 200,
        tied_embeddings: false,
        max_seq: 64,
        bos: Some(1),
        eos: Some(2),
    }
}

/// `w` written as three bf16 shards with an index, as HF publishes large models; returns
/// the weights as the shards hold them (rounded to bf16).
fn bf16_shards(w: &LlamaWeights, dir: &Path) -> LlamaWeights {
    let c = &w.config;
    let round = |v: &[f32]| v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect::<Vec<f32>>();
    let tensors: Vec<Tensor> = Tensor::all(c).collect();
    let mut map = BTreeMap::new();
    for (s, chunk) in tensors.chunks(tensors.len().div_ceil(3)).enumerate() {
        let file = format!("model-{:05}-of-00003.safetensors", s + 1);
        let data: Vec<(String, Vec<usize>, Vec<u8>)> = chunk
            .iter()
            .map(|&t| {
                let v = w.tensor(t).unwrap();
                let bytes = v.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect();
                (t.hf_name(), t.shape(c), bytes)
            })
            .collect();
        let views = data.iter().map(|(n, s, b)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), b).unwrap())
        });
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        map.extend(chunk.iter().map(|t| (t.hf_name(), file.clone())));
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_string(&c.to_hf_config_json()).unwrap()).unwrap();
    let mut rounded = w.clone();
    common::for_each_tensor_mut(&mut rounded, |v| *v = round(v));
    rounded
}

/// The bytes of the whole model and of its largest tensor, in f32.
fn f32_bytes(c: &LlamaConfig) -> (usize, usize) {
    let bytes: Vec<usize> = Tensor::all(c).map(|t| t.shape(c).iter().product::<usize>() * 4).collect();
    (bytes.iter().sum(), bytes.iter().copied().max().unwrap_or(0))
}

fn batch_tokens(c: &LlamaConfig, n: usize) -> (Vec<u32>, Vec<u32>, Vec<f32>) {
    let v = c.vocab as u32;
    (
        (0..n as u32).map(|i| (i * 37 + 11) % v).collect(),
        (0..n as u32).map(|i| (i * 53 + 5) % v).collect(),
        vec![1.0; n],
    )
}

fn setup(precision: Precision) -> TrainingSetup<'static, MlpPlan> {
    TrainingSetup {
        plan: MlpPlan { layers: vec![3, 17], methods: [Method::Full; 3] },
        bases: None,
        options: TrainOptions { optimizer: Optimizer::Sgd { lr: 0.05 }, precision, ..Default::default() },
    }
}

#[test]
fn a_model_built_from_bf16_shards_equals_one_built_from_the_loaded_weights() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let w = bf16_shards(&LlamaWeights::random(&config(), 5).unwrap(), dir.path());
    let ckpt = LlamaCheckpoint::open(dir.path()).unwrap();
    assert_eq!(ckpt.config(), &w.config);
    ckpt.verify().unwrap();
    assert!(ckpt.gguf().is_none());
    assert_eq!(LlamaWeights::from_source(&ckpt).unwrap(), w);
    assert_eq!(LlamaWeights::from_hf_dir(dir.path()).unwrap(), w);
    let cpu = Cpu::new();
    let (ids, targets, mask) = batch_tokens(&w.config, 24);
    for precision in [Precision::Full, Precision::Bf16] {
        let mut from_ckpt = LlamaModel::<Cpu, f32>::new(&cpu, &ckpt, &setup(precision), 16).unwrap();
        let mut from_weights = LlamaModel::<Cpu, f32>::new(&cpu, &w, &setup(precision), 16).unwrap();
        let batch = TokenBatch { ids: &ids, targets: &targets, mask: &mask, batch: 2, seq: 12 };
        for _ in 0..2 {
            let (a, b) = (from_ckpt.train_step(&batch).unwrap(), from_weights.train_step(&batch).unwrap());
            assert_eq!(a.mean().to_bits(), b.mean().to_bits(), "{precision:?}");
        }
        assert_eq!(from_ckpt.logits(&ids[..9]).unwrap(), from_weights.logits(&ids[..9]).unwrap(), "{precision:?}");
    }
}

#[test]
fn building_from_a_checkpoint_holds_one_tensor_at_a_time_on_the_host() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let w = bf16_shards(&LlamaWeights::random(&config(), 6).unwrap(), dir.path());
    let c = &w.config;
    let (whole, largest) = f32_bytes(c);
    let cpu = Cpu::new();
    // Frozen and bf16: what the model keeps is mostly bf16 weights, half the f32 bytes.
    let frozen = TrainingSetup {
        options: TrainOptions { precision: Precision::Bf16, ..Default::default() },
        ..Default::default()
    };
    let ckpt = LlamaCheckpoint::open(dir.path()).unwrap();
    let (model, kept, peak) = heap_during(|| LlamaModel::<Cpu, f32>::new(&cpu, &ckpt, &frozen, 16).unwrap());
    let transient = peak - kept;
    println!(
        "whole model f32 {whole} B, largest tensor {largest} B; from the checkpoint: kept {kept} B, peak {peak} B"
    );
    // One tensor's f32 read and its copy, plus the bf16 staging of an upload.
    assert!(kept < whole, "the model keeps bf16 weights and the checkpoint caches nothing");
    assert!(transient <= 3 * largest, "building held {transient} B beyond what it kept (largest tensor {largest} B)");
    drop(model);
    // Loading the weights first holds the whole model in f32 beside the one being built.
    let fresh = Cpu::new();
    let ((_, model), kept_w, peak_w) = heap_during(|| {
        let loaded = LlamaWeights::from_hf_dir(dir.path()).unwrap();
        let m = LlamaModel::<Cpu, f32>::new(&fresh, &loaded, &frozen, 16).unwrap();
        (loaded, m)
    });
    println!("loading first: peak {peak_w} B");
    assert!(peak_w >= kept + whole, "loading first peaked at {peak_w} B, streaming at {peak} B");
    assert!(kept_w >= kept + whole);
    drop(model);
}

#[test]
fn the_merged_model_is_written_one_tensor_at_a_time_and_equals_merged_weights() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let w = bf16_shards(&LlamaWeights::random(&config(), 7).unwrap(), dir.path());
    let ckpt = LlamaCheckpoint::open(dir.path()).unwrap();
    let cpu = Cpu::new();
    let mut model = LlamaModel::<Cpu, f32>::new(&cpu, &ckpt, &setup(Precision::Full), 16).unwrap();
    let (ids, targets, mask) = batch_tokens(&w.config, 24);
    model.train_step(&TokenBatch { ids: &ids, targets: &targets, mask: &mask, batch: 2, seq: 12 }).unwrap();
    let expect = model.merged_weights(&w).unwrap();
    assert_ne!(expect.layers[3].up, w.layers[3].up, "the step changed the trained projections");
    assert_eq!(expect.layers[4], w.layers[4], "and nothing else");
    let out = tempfile::tempdir().unwrap();
    let c = &w.config;
    let (whole, largest) = f32_bytes(c);
    let (saved, _, peak) = heap_during(|| save_hf_safetensors(&model.merged(&ckpt), out.path()));
    saved.unwrap();
    println!("saving the merged model peaked {peak} B above the start (whole model f32 {whole} B)");
    // The file writer's 1 MiB buffer, one tensor read from the device and its bytes.
    assert!(peak <= (1 << 20) + 4 * largest, "saving held {peak} B (largest tensor {largest} B)");
    assert!(peak < whole / 2);
    assert_eq!(LlamaWeights::from_hf_dir(out.path()).unwrap(), expect);
}

/// A source whose one tensor cannot be read.
struct Failing<'a>(&'a LlamaWeights, Tensor);

impl LlamaSource for Failing<'_> {
    fn config(&self) -> &LlamaConfig {
        &self.0.config
    }
    fn tensor(&self, t: Tensor) -> sparsegrad::error::Result<Cow<'_, [f32]>> {
        if t == self.1 {
            return Err(Error::NonFinite {
                what: format!("tensor `{}` (test)", t.hf_name()),
                count: 1,
                first_index: 0,
            });
        }
        self.0.tensor(t)
    }
}

#[test]
fn a_tensor_that_cannot_be_read_stops_the_save_and_keeps_the_old_file() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let w = LlamaWeights::random(&config(), 8).unwrap();
    let out = tempfile::tempdir().unwrap();
    save_hf_safetensors(&w, out.path()).unwrap();
    let before = std::fs::read(out.path().join("model.safetensors")).unwrap();
    let other = LlamaWeights::random(&config(), 9).unwrap();
    let err =
        save_hf_safetensors(&Failing(&other, Tensor::Layer(5, sparsegrad::model::weights::Field::Down)), out.path())
            .unwrap_err();
    assert!(err.to_string().contains("model.layers.5.mlp.down_proj.weight"), "{err}");
    assert_eq!(std::fs::read(out.path().join("model.safetensors")).unwrap(), before);
    let names: Vec<_> = std::fs::read_dir(out.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 2, "no temporary file is left behind: {names:?}");
    // A source whose tensor has the wrong length is refused the same way.
    let mut short = other.clone();
    short.layers[2].q.pop();
    assert!(matches!(save_hf_safetensors(&short, out.path()), Err(Error::Shape { .. })));
    assert_eq!(std::fs::read(out.path().join("model.safetensors")).unwrap(), before);
}
