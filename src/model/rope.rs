//! RoPE frequency scaling for long contexts: which rescaling of the rotary inverse
//! frequencies `theta^(-2i / head_dim)` a model was trained with, read from a Hugging Face
//! `config.json` (`rope_scaling`, or transformers 5's `rope_parameters`) and checked
//! against GGUF metadata, and applied where the RoPE tables are built
//! ([`rope_tables`]).
//!
//! Only the `llama3` type (LLaMA-3.1 / 3.2) is implemented, as in Meta's `apply_scaling`
//! and transformers' `_compute_llama3_parameters`: with `L = original_max_position_embeddings`
//! and the wavelength `w = 2 pi / inv_freq`,
//! - `w < L / high_freq_factor` (short wavelengths): unchanged;
//! - `w > L / low_freq_factor` (long wavelengths): divided by `factor`;
//! - otherwise, with `s = (L / w - low_freq_factor) / (high_freq_factor - low_freq_factor)`:
//!   `(1 - s) inv_freq / factor + s inv_freq` (a smooth interpolation).
//!
//! The attention scale is unchanged by `llama3`. Any other type is rejected with an error
//! naming it, so a model with a scaling this crate does not compute never loads silently.

use crate::error::{Error, Result};
use crate::scalar::Real;
use serde_json::Value;

/// A RoPE frequency rescaling. `None` in [`crate::model::config::LlamaConfig`] means the
/// plain frequencies (HF `rope_scaling: null` or `rope_type: "default"`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// `rope_type: "llama3"` (see the module docs).
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
}

impl RopeScaling {
    /// The HF name of the type (`rope_type`).
    pub fn type_name(&self) -> &'static str {
        match self {
            RopeScaling::Llama3 { .. } => "llama3",
        }
    }

    /// The scaled inverse frequency of one rotary pair whose unscaled inverse frequency is
    /// `inv_freq` (positive), in f64.
    pub fn scale_inv_freq(&self, inv_freq: f64) -> f64 {
        match *self {
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let old = original_max_position_embeddings as f64;
                let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
                if wavelen < old / high_freq_factor {
                    inv_freq
                } else if wavelen > old / low_freq_factor {
                    inv_freq / factor
                } else {
                    let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
                }
            }
        }
    }

    /// Checks the numbers: every factor finite and positive, `low_freq_factor <
    /// high_freq_factor` (the interpolation divides by their difference), and a positive
    /// original context length.
    pub fn validate(&self) -> Result<()> {
        self.problem().map_or(Ok(()), |msg| Err(Error::invalid("rope_scaling", msg)))
    }

    /// What [`validate`](Self::validate) rejects, in words.
    fn problem(&self) -> Option<String> {
        match *self {
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                for (name, v) in
                    [("factor", factor), ("low_freq_factor", low_freq_factor), ("high_freq_factor", high_freq_factor)]
                {
                    if !(v.is_finite() && v > 0.0) {
                        return Some(format!("llama3 {name} ({v}) must be finite and positive"));
                    }
                }
                if low_freq_factor >= high_freq_factor {
                    return Some(format!(
                        "llama3 low_freq_factor ({low_freq_factor}) must be below high_freq_factor ({high_freq_factor})"
                    ));
                }
                if original_max_position_embeddings == 0 {
                    return Some("llama3 original_max_position_embeddings must be positive".into());
                }
                None
            }
        }
    }

    /// Parses an HF `rope_scaling` (or `rope_parameters`) object; `key` names it in errors.
    /// `null`, or a `rope_type` of `"default"`, is no scaling. The type is `rope_type`, or
    /// the older `type` (both present must agree). A `rope_theta` inside the object (as in
    /// `rope_parameters`) is ignored here.
    pub fn from_hf_json(key: &str, v: &Value) -> Result<Option<RopeScaling>> {
        let meta = |msg: String| Error::Metadata { key: key.to_string(), msg };
        let obj = match v {
            Value::Null => return Ok(None),
            Value::Object(o) => o,
            other => return Err(meta(format!("expected an object or null, found {other}"))),
        };
        let name_of = |k: &str| -> Result<Option<&str>> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.as_str())),
                Some(other) => Err(meta(format!("`{k}` must be a string, found {other}"))),
            }
        };
        let ty = match (name_of("rope_type")?, name_of("type")?) {
            (Some(a), Some(b)) if a != b => {
                return Err(meta(format!("`rope_type` (`{a}`) and `type` (`{b}`) disagree")));
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => return Err(meta("has no `rope_type` (or `type`)".into())),
        };
        let float = |k: &str| -> Result<f64> {
            match obj.get(k) {
                Some(v) => v.as_f64().ok_or_else(|| meta(format!("llama3 `{k}` must be a number, found {v}"))),
                None => Err(meta(format!("llama3 scaling needs `{k}`"))),
            }
        };
        let scaling = match ty {
            "default" => return Ok(None),
            "llama3" => RopeScaling::Llama3 {
                factor: float("factor")?,
                low_freq_factor: float("low_freq_factor")?,
                high_freq_factor: float("high_freq_factor")?,
                original_max_position_embeddings: match obj.get("original_max_position_embeddings") {
                    Some(v) => v.as_u64().and_then(|u| usize::try_from(u).ok()).ok_or_else(|| {
                        meta(format!(
                            "llama3 `original_max_position_embeddings` must be an unsigned integer, found {v}"
                        ))
                    })?,
                    None => return Err(meta("llama3 scaling needs `original_max_position_embeddings`".into())),
                },
            },
            other => {
                return Err(meta(format!(
                    "RoPE scaling type `{other}` is not supported (only `llama3`; `default` or null for none)"
                )))
            }
        };
        match scaling.problem() {
            Some(msg) => Err(meta(msg)),
            None => Ok(Some(scaling)),
        }
    }

    /// The HF `rope_scaling` object that [`from_hf_json`](Self::from_hf_json) reads back.
    pub fn to_hf_json(&self) -> Value {
        match *self {
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                serde_json::json!({
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings,
                })
            }
        }
    }
}

/// What GGUF metadata says of RoPE scaling, for a `llama`-architecture file: always no
/// scaling this crate computes, or an error. llama.cpp's keys are
/// `<arch>.rope.scaling.type` (`none`, `linear`, `yarn`, `longrope`; llama.cpp reads a
/// missing type as `linear`) with `<arch>.rope.scaling.factor` (older files:
/// `<arch>.rope.scale_linear`); a factor of 0 or 1 means none. LLaMA-3.1's `llama3`
/// scaling is stored by llama.cpp's converter as a per-frequency tensor `rope_freqs.weight`
/// instead, which this crate does not read: such files are rejected too, pointing at the
/// HF checkpoint whose `config.json` carries the scaling.
pub fn check_gguf_rope_scaling(f: &crate::io::gguf::GgufFile, arch: &str) -> Result<()> {
    let type_key = format!("{arch}.rope.scaling.type");
    let ty = f.optional_str(&type_key)?;
    let factor_key = [format!("{arch}.rope.scaling.factor"), format!("{arch}.rope.scale_linear")]
        .into_iter()
        .find(|k| f.contains_key(k));
    let factor = match &factor_key {
        Some(k) => Some(f.get_f32(k)?),
        None => None,
    };
    match ty {
        Some("none") => {}
        Some(other) if other != "linear" => {
            return Err(Error::Metadata {
                key: type_key,
                msg: format!("RoPE scaling type `{other}` is not supported (only `llama3`, from an HF config.json)"),
            })
        }
        // `linear`, written or implied: harmless only with a factor of 0 (unset) or 1.
        _ => {
            if let (Some(k), Some(v)) = (&factor_key, factor) {
                if v != 0.0 && v != 1.0 {
                    return Err(Error::Metadata {
                        key: k.clone(),
                        msg: format!("linear RoPE scaling (factor {v}) is not supported (only `llama3`)"),
                    });
                }
            }
        }
    }
    if f.contains_tensor("rope_freqs.weight") {
        return Err(Error::Metadata {
            key: "rope_freqs.weight".into(),
            msg: "per-frequency RoPE factors (llama.cpp's form of LLaMA-3.1 `llama3` scaling) are not read from \
                  GGUF; load the Hugging Face checkpoint, whose config.json carries `rope_scaling`"
                .into(),
        });
    }
    Ok(())
}

/// RoPE tables `(positions, head_dim / 2)`: `cos`, `sin` of `p * inv_freq[i]` with
/// `inv_freq[i] = theta^(-2i / head_dim)`, rescaled by `scaling` when given (LLaMA-3.1's
/// `llama3`, see [`RopeScaling`]), computed in f64 so every backend rotates by the same angles.
pub fn rope_tables<F: Real>(
    positions: usize,
    head_dim: usize,
    theta: f32,
    scaling: Option<&RopeScaling>,
) -> (Vec<F>, Vec<F>) {
    let half = head_dim / 2;
    let inv_freqs: Vec<f64> = (0..half)
        .map(|i| {
            let inv_freq = (theta as f64).powf(-2.0 * i as f64 / head_dim as f64);
            scaling.map_or(inv_freq, |s| s.scale_inv_freq(inv_freq))
        })
        .collect();
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for p in 0..positions {
        for &inv_freq in &inv_freqs {
            let angle = p as f64 * inv_freq;
            cos.push(F::from_f64(angle.cos()));
            sin.push(F::from_f64(angle.sin()));
        }
    }
    (cos, sin)
}
