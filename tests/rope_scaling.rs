//! RoPE frequency scaling (`rope_scaling`): the `llama3` type of LLaMA-3.1/3.2 parsed from
//! an HF `config.json` (and transformers 5's `rope_parameters`), every other type and every
//! bad number rejected with an error naming it, GGUF scaling keys and llama.cpp's
//! `rope_freqs.weight` rejected, and the RoPE tables checked against Meta's `apply_scaling`
//! transcribed here separately, against values computed by hand, and inside the model.

use serde_json::json;
use sparsegrad::io::gguf::GgufFile;
use sparsegrad::model::config::{LlamaConfig, RopeScaling};
use sparsegrad::model::llama::LlamaModel;
use sparsegrad::model::rope::rope_tables;
use sparsegrad::model::weights::LlamaWeights;
use sparsegrad::model::TrainingSetup;
use sparsegrad::{Cpu, Error};
use std::f64::consts::PI;

/// LLaMA-3.1-8B's `rope_scaling` (its config.json on the Hugging Face hub).
const LLAMA31: RopeScaling = RopeScaling::Llama3 {
    factor: 8.0,
    low_freq_factor: 1.0,
    high_freq_factor: 4.0,
    original_max_position_embeddings: 8192,
};

/// Meta's `apply_scaling` (llama-models, `llama3/model.py` of LLaMA 3.1), transcribed
/// line by line in f64 from the published code, independently of the crate's version.
fn meta_apply_scaling(
    freqs: &[f64],
    scale_factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    old_context_len: f64,
) -> Vec<f64> {
    let low_freq_wavelen = old_context_len / low_freq_factor;
    let high_freq_wavelen = old_context_len / high_freq_factor;
    let mut new_freqs = Vec::new();
    for &freq in freqs {
        let wavelen = 2.0 * PI / freq;
        if wavelen < high_freq_wavelen {
            new_freqs.push(freq);
        } else if wavelen > low_freq_wavelen {
            new_freqs.push(freq / scale_factor);
        } else {
            assert!(low_freq_wavelen != high_freq_wavelen);
            let smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
            new_freqs.push((1.0 - smooth) * freq / scale_factor + smooth * freq);
        }
    }
    new_freqs
}

/// `1 / theta^(2i / dim)` for `i < dim / 2` (Meta's `precompute_freqs_cis`).
fn base_freqs(dim: usize, theta: f64) -> Vec<f64> {
    (0..dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / dim as f64)).collect()
}

fn config(scaling: Option<RopeScaling>) -> LlamaConfig {
    LlamaConfig {
        hidden: 16,
        ffn: 24,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 4,
        rope_theta: 10000.0,
        rope_scaling: scaling,
        rms_eps: 1e-5,
        vocab: 37,
        tied_embeddings: false,
        max_seq: 64,
        bos: Some(1),
        eos: Some(2),
    }
}

// ---------------------------------------------------------------------------------------
// The tables.

#[test]
fn tables_follow_meta_apply_scaling_at_every_position() {
    // LLaMA-3.1-8B: head_dim 128, theta 500000; positions past the original 8192 too.
    let (dim, theta) = (128, 500_000.0);
    let want = meta_apply_scaling(&base_freqs(dim, theta), 8.0, 1.0, 4.0, 8192.0);
    let positions = 20_000;
    let (cos, sin) = rope_tables::<f64>(positions, dim, theta as f32, Some(&LLAMA31));
    assert_eq!((cos.len(), sin.len()), (positions * dim / 2, positions * dim / 2));
    for p in (0..positions).step_by(97).chain([1, 8191, 8192, positions - 1]) {
        for (i, &f) in want.iter().enumerate() {
            let (s, c) = (p as f64 * f).sin_cos();
            let k = p * dim / 2 + i;
            assert!(
                (cos[k] - c).abs() <= 1e-9 && (sin[k] - s).abs() <= 1e-9,
                "p {p} i {i}: {} {} vs {c} {s}",
                cos[k],
                sin[k]
            );
        }
    }
    // Each band is hit: unchanged, interpolated and divided pairs all occur.
    let base = base_freqs(dim, theta);
    let kept = want.iter().zip(&base).filter(|(w, b)| w == b).count();
    let divided = want.iter().zip(&base).filter(|(w, b)| (*w * 8.0 - *b).abs() <= 1e-18).count();
    assert!(kept > 0 && divided > 0 && kept + divided < dim / 2, "kept {kept}, divided {divided}");
}

#[test]
fn tables_match_values_computed_by_hand() {
    // theta 500000, head_dim 128, the LLaMA-3.1 numbers; angle at position 1 = inv_freq.
    let (cos, sin) = rope_tables::<f64>(2, 128, 500_000.0, Some(&LLAMA31));
    let angle = |i: usize| sin[64 + i].atan2(cos[64 + i]);
    // i = 0: inv_freq 1, wavelength 2 pi < 8192 / 4: unchanged.
    assert!((angle(0) - 1.0).abs() < 1e-15);
    // i = 28: 500000^(-28/64) = 3.211445994752591e-3, wavelength 1956.5 < 2048: unchanged.
    assert!((angle(28) - 3.211_445_994_752_591e-3).abs() < 1e-15);
    // i = 32: 500000^(-1/2) = 1/sqrt(500000) = 1.414213562373095e-3, wavelength
    // 2 pi sqrt(500000) = 4442.883 in (2048, 8192): smooth = (8192 / 4442.883 - 1) / 3 =
    // 0.2812826, scaled = inv (0.7187174 / 8 + 0.2812826) = 5.248461609929546e-4.
    assert!((angle(32) - 5.248_461_609_929_546e-4).abs() < 1e-15);
    // i = 63: 500000^(-126/128) = 2.455140791131609e-6, wavelength 2.56e6 > 8192: / 8.
    assert!((angle(63) - 3.068_925_988_914_511e-7).abs() < 1e-18);
    // Position 0 is the identity rotation whatever the scaling.
    assert!(cos[..64].iter().all(|&c| c == 1.0) && sin[..64].iter().all(|&s| s == 0.0));
}

#[test]
fn no_scaling_and_the_identity_scaling_give_the_plain_tables() {
    let plain = rope_tables::<f64>(300, 64, 10_000.0, None);
    for p in [0usize, 1, 299] {
        for (i, f) in base_freqs(64, 10_000.0).into_iter().enumerate() {
            let (s, c) = (p as f64 * f).sin_cos();
            assert!((plain.0[p * 32 + i] - c).abs() < 1e-12 && (plain.1[p * 32 + i] - s).abs() < 1e-12);
        }
    }
    // factor 1 leaves every band unchanged: (1 - s) f + s f = f.
    let identity = RopeScaling::Llama3 {
        factor: 1.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 64,
    };
    let same = rope_tables::<f64>(300, 64, 10_000.0, Some(&identity));
    for (a, b) in plain.0.iter().zip(&same.0).chain(plain.1.iter().zip(&same.1)) {
        assert!((a - b).abs() < 1e-12);
    }
}

#[test]
fn the_model_rotates_by_the_scaled_frequencies() {
    // head_dim 4, theta 1e4: inverse frequencies 1 (wavelength 6.3 < 64 / 4: kept) and
    // 1e-2 (wavelength 628 > 64: divided by 4), exactly the plain frequencies of theta
    // 1e4 * 4^2 = 160000. So the scaled model must equal the unscaled one at that theta.
    let scaling = RopeScaling::Llama3 {
        factor: 4.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 64,
    };
    let w = LlamaWeights::random(&config(Some(scaling)), 5).unwrap();
    let mut plain_cfg = w.clone();
    plain_cfg.config.rope_scaling = None;
    let mut shifted = plain_cfg.clone();
    shifted.config.rope_theta = 160_000.0;
    let cpu = Cpu::new();
    let ids: Vec<u32> = (0..40).map(|i| (i * 7 % 37) as u32).collect();
    let logits = |w: &LlamaWeights| {
        let mut m = LlamaModel::<Cpu, f64>::new(&cpu, w, &TrainingSetup::default(), 64).unwrap();
        m.logits(&ids).unwrap()
    };
    let (scaled, plain, equivalent) = (logits(&w), logits(&plain_cfg), logits(&shifted));
    let worst = scaled.iter().zip(&equivalent).fold(0.0f64, |a, (x, y)| a.max((x - y).abs()));
    assert!(worst < 1e-9, "scaled vs theta 160000: {worst:e}");
    let moved = scaled.iter().zip(&plain).fold(0.0f64, |a, (x, y)| a.max((x - y).abs()));
    assert!(moved > 1e-4, "the scaling changed nothing ({moved:e})");
}

// ---------------------------------------------------------------------------------------
// config.json.

fn write_config(extra: serde_json::Value) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.json");
    let mut v = json!({
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "vocab_size": 100, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072
    });
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    std::fs::write(&p, v.to_string()).unwrap();
    (dir, p)
}

fn load(extra: serde_json::Value) -> Result<LlamaConfig, Error> {
    let (_dir, p) = write_config(extra);
    LlamaConfig::from_hf_config_json(&p)
}

#[test]
fn hf_llama3_scaling_parses_and_round_trips() {
    // LLaMA-3.1-8B's config.json entry, verbatim.
    let c = load(json!({ "rope_scaling": {
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3"
    }}))
    .unwrap();
    assert_eq!(c.rope_scaling, Some(LLAMA31));
    assert_eq!(c.rope_theta, 500_000.0);
    // Written back and read again.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.json");
    std::fs::write(&p, c.to_hf_config_json().to_string()).unwrap();
    assert_eq!(LlamaConfig::from_hf_config_json(&p).unwrap(), c);
    // The older `type` key; integer-valued factors.
    let c = load(json!({ "rope_scaling": {
        "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
        "original_max_position_embeddings": 8192, "type": "llama3"
    }}))
    .unwrap();
    assert_eq!(c.rope_scaling, Some(LLAMA31));
    // transformers 5: `rope_parameters`, which carries rope_theta.
    let mut params = LLAMA31.to_hf_json();
    params["rope_theta"] = json!(250000.0);
    let c = load(json!({ "rope_theta": null, "rope_parameters": params })).unwrap();
    assert_eq!((c.rope_scaling, c.rope_theta), (Some(LLAMA31), 250_000.0));
}

#[test]
fn null_absent_and_default_mean_no_scaling() {
    assert_eq!(load(json!({})).unwrap().rope_scaling, None);
    assert_eq!(load(json!({ "rope_scaling": null })).unwrap().rope_scaling, None);
    assert_eq!(load(json!({ "rope_scaling": { "rope_type": "default" } })).unwrap().rope_scaling, None);
    let c =
        load(json!({ "rope_theta": null, "rope_parameters": { "rope_type": "default", "rope_theta": 1e6 } })).unwrap();
    assert_eq!((c.rope_scaling, c.rope_theta), (None, 1e6));
    assert_eq!(LlamaConfig { rope_scaling: None, ..config(None) }.to_hf_config_json()["rope_scaling"], json!(null));
}

/// The error's text, after checking it is a metadata error for `key`.
fn metadata_err(r: Result<LlamaConfig, Error>, key: &str) -> String {
    match r {
        Err(e @ Error::Metadata { .. }) => {
            let Error::Metadata { key: k, .. } = &e else { unreachable!() };
            assert_eq!(k, key, "{e}");
            e.to_string()
        }
        other => panic!("expected a metadata error for `{key}`, got {other:?}"),
    }
}

#[test]
fn other_rope_types_are_rejected_by_name() {
    for ty in ["linear", "dynamic", "yarn", "longrope", "llama4", "su"] {
        for key in ["rope_type", "type"] {
            let msg = metadata_err(load(json!({ "rope_scaling": { key: ty, "factor": 2.0 } })), "rope_scaling");
            assert!(msg.contains(&format!("`{ty}`")) && msg.contains("not supported"), "{msg}");
        }
        let msg =
            metadata_err(load(json!({ "rope_parameters": { "rope_type": ty, "factor": 2.0 } })), "rope_parameters");
        assert!(msg.contains(&format!("`{ty}`")), "{msg}");
    }
    let msg = metadata_err(load(json!({ "rope_scaling": { "factor": 2.0 } })), "rope_scaling");
    assert!(msg.contains("no `rope_type`"), "{msg}");
    let msg =
        metadata_err(load(json!({ "rope_scaling": { "rope_type": "llama3", "type": "linear" } })), "rope_scaling");
    assert!(msg.contains("disagree"), "{msg}");
    let msg = metadata_err(load(json!({ "rope_scaling": "llama3" })), "rope_scaling");
    assert!(msg.contains("expected an object"), "{msg}");
    let msg = metadata_err(load(json!({ "rope_scaling": { "rope_type": 3 } })), "rope_scaling");
    assert!(msg.contains("must be a string"), "{msg}");
}

#[test]
fn bad_llama3_numbers_are_clear_errors() {
    let with = |k: &str, v: serde_json::Value| {
        let mut s = LLAMA31.to_hf_json();
        if v.is_null() {
            s.as_object_mut().unwrap().remove(k);
        } else {
            s[k] = v;
        }
        load(json!({ "rope_scaling": s }))
    };
    let cases: &[(&str, serde_json::Value, &str)] = &[
        ("factor", json!(0.0), "factor (0) must be finite and positive"),
        ("factor", json!(-8.0), "factor (-8) must be finite and positive"),
        ("low_freq_factor", json!(0.0), "low_freq_factor (0) must be finite and positive"),
        ("high_freq_factor", json!(-1.0), "high_freq_factor (-1) must be finite and positive"),
        ("high_freq_factor", json!(1.0), "low_freq_factor (1) must be below high_freq_factor (1)"),
        ("low_freq_factor", json!(5.0), "low_freq_factor (5) must be below high_freq_factor (4)"),
        ("original_max_position_embeddings", json!(0), "original_max_position_embeddings must be positive"),
        ("original_max_position_embeddings", json!(8192.5), "must be an unsigned integer"),
        ("original_max_position_embeddings", json!(-1), "must be an unsigned integer"),
        ("factor", json!("8"), "`factor` must be a number"),
        ("factor", json!(null), "needs `factor`"),
        ("high_freq_factor", json!(null), "needs `high_freq_factor`"),
        ("original_max_position_embeddings", json!(null), "needs `original_max_position_embeddings`"),
    ];
    for (k, v, needle) in cases {
        let msg = metadata_err(with(k, v.clone()), "rope_scaling");
        assert!(msg.contains(needle), "{k} = {v}: {msg}");
        assert!(msg.contains("config.json"), "the error names the file: {msg}");
    }
    // rope_theta at the top and inside rope_parameters must agree.
    let mut params = LLAMA31.to_hf_json();
    params["rope_theta"] = json!(1e6);
    let msg = metadata_err(load(json!({ "rope_parameters": params })), "rope_theta");
    assert!(msg.contains("disagrees"), "{msg}");
    // A config built in code is validated too (non-finite values cannot come from JSON).
    for bad in [f64::NAN, f64::INFINITY] {
        let s = RopeScaling::Llama3 {
            factor: bad,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let err = config(Some(s)).validate().unwrap_err();
        assert!(err.to_string().contains("factor") && err.to_string().contains("finite"), "{err}");
    }
    assert!(config(Some(LLAMA31)).validate().is_ok());
}

// ---------------------------------------------------------------------------------------
// GGUF.

fn gstr(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}
fn u32v(v: u32) -> Vec<u8> {
    [4u32.to_le_bytes(), v.to_le_bytes()].concat()
}
fn f32v(v: f32) -> Vec<u8> {
    [6u32.to_le_bytes(), v.to_le_bytes()].concat()
}
fn strv(s: &str) -> Vec<u8> {
    [8u32.to_le_bytes().to_vec(), gstr(s)].concat()
}

/// A GGUF v3 file with a tiny llama config in its metadata plus `extra` keys, and
/// `tensors` (F32, 1-D) of the given lengths.
fn gguf(extra: &[(&str, Vec<u8>)], tensors: &[(&str, usize)]) -> GgufFile {
    let mut meta: Vec<(&str, Vec<u8>)> = vec![
        ("general.architecture", strv("llama")),
        ("llama.embedding_length", u32v(16)),
        ("llama.feed_forward_length", u32v(24)),
        ("llama.block_count", u32v(2)),
        ("llama.attention.head_count", u32v(4)),
        ("llama.rope.freq_base", f32v(500_000.0)),
        ("llama.attention.layer_norm_rms_epsilon", f32v(1e-5)),
        ("llama.context_length", u32v(128)),
        ("llama.vocab_size", u32v(37)),
    ];
    meta.extend(extra.iter().cloned());
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (k, v) in &meta {
        b.extend(gstr(k));
        b.extend_from_slice(v);
    }
    let mut off = 0u64;
    for &(name, len) in tensors {
        b.extend(gstr(name));
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&(len as u64).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&off.to_le_bytes());
        off = (off + 4 * len as u64).next_multiple_of(32);
    }
    b.resize(b.len().next_multiple_of(32) + off as usize, 0);
    GgufFile::from_bytes(b).unwrap()
}

fn gguf_err(f: &GgufFile, key: &str) -> String {
    match LlamaConfig::from_gguf(f) {
        Err(e @ Error::Metadata { .. }) => {
            assert!(matches!(&e, Error::Metadata { key: k, .. } if k == key), "{e}");
            e.to_string()
        }
        other => panic!("expected a metadata error for `{key}`, got {other:?}"),
    }
}

#[test]
fn gguf_without_scaling_loads_and_any_scaling_is_rejected_by_name() {
    let plain = LlamaConfig::from_gguf(&gguf(&[], &[])).unwrap();
    assert_eq!((plain.rope_scaling, plain.rope_theta), (None, 500_000.0));
    for ok in [
        vec![("llama.rope.scaling.type", strv("none"))],
        vec![("llama.rope.scaling.type", strv("none")), ("llama.rope.scaling.factor", f32v(8.0))],
        vec![("llama.rope.scaling.type", strv("linear")), ("llama.rope.scaling.factor", f32v(1.0))],
        vec![("llama.rope.scaling.factor", f32v(0.0))],
        vec![("llama.rope.scale_linear", f32v(1.0))],
    ] {
        assert_eq!(LlamaConfig::from_gguf(&gguf(&ok, &[])).unwrap(), plain);
    }
    for ty in ["yarn", "longrope", "llama3"] {
        let msg = gguf_err(&gguf(&[("llama.rope.scaling.type", strv(ty))], &[]), "llama.rope.scaling.type");
        assert!(msg.contains(&format!("`{ty}`")) && msg.contains("not supported"), "{msg}");
    }
    let linear = [("llama.rope.scaling.type", strv("linear")), ("llama.rope.scaling.factor", f32v(4.0))];
    let msg = gguf_err(&gguf(&linear, &[]), "llama.rope.scaling.factor");
    assert!(msg.contains("linear RoPE scaling (factor 4)"), "{msg}");
    // llama.cpp reads a factor without a type as linear; the old key too.
    let msg = gguf_err(&gguf(&[("llama.rope.scaling.factor", f32v(2.0))], &[]), "llama.rope.scaling.factor");
    assert!(msg.contains("factor 2"), "{msg}");
    let msg = gguf_err(&gguf(&[("llama.rope.scale_linear", f32v(2.0))], &[]), "llama.rope.scale_linear");
    assert!(msg.contains("factor 2"), "{msg}");
    // A mistyped type key is an error, not ignored.
    assert!(LlamaConfig::from_gguf(&gguf(&[("llama.rope.scaling.type", u32v(1))], &[])).is_err());
    // LLaMA-3.1 as llama.cpp converts it: per-frequency factors in `rope_freqs.weight`.
    let msg = gguf_err(&gguf(&[], &[("rope_freqs.weight", 2)]), "rope_freqs.weight");
    assert!(msg.contains("LLaMA-3.1") && msg.contains("config.json"), "{msg}");
}
