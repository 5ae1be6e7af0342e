//! Adapters: what training changed in a set of named projections, with the optimizer
//! state to resume exactly, as one self-describing safetensors file written atomically.
//!
//! Per projection `{name}` (metadata `{name}.method`, `.shape`, `.step`, ...):
//! - SparseGrad: `{name}.indices` `[n, 2]` i64 (row, col of `Wt`), `{name}.values` (the new
//!   `Wt` entries; every other entry is the loaded weight's), `{name}.exp_avg`,
//!   `{name}.exp_avg_sq` at those entries, and the basis `basis.{group}.P` / `.Q` once
//!   per group, with its fingerprint in `{name}.basis_fingerprint`;
//! - MeProp: the same for entries of `W`; LoRA: `{name}.lora_A`, `{name}.lora_B` and
//!   their moments; Full: `{name}.weight` and its moments; Frozen: only metadata;
//! - a trained bias: `{name}.bias` and its moments.
//!
//! The base weight's fingerprint is stored too, so an adapter is never applied to
//! another model by mistake.

use crate::backend::Backend;
use crate::basis::{Basis, BasisSet};
use crate::error::{Error, Result};
use crate::io::{SafetensorsFile, SafetensorsWriter};
use crate::linear::state::{DenseParam, LayerState, SparseParam};
use crate::linear::trainable::{Method, TrainableLinear};
use crate::mlp::Projection;
use crate::scalar::fingerprint;
use crate::scalar::Real;
use std::collections::BTreeSet;
use std::path::Path;

const FORMAT: &str = "sparsegrad-adapter";
const VERSION: &str = "1";

/// One projection to save: its name in the file, the layer (a [`Linear`] or any of the
/// layer types), and the base weight it was built from (fingerprinted so loading checks it
/// is the same).
///
/// [`Linear`]: crate::linear::trainable::Linear
pub struct AdapterEntry<'a, B: Backend, F: Real> {
    pub name: &'a str,
    pub linear: &'a dyn TrainableLinear<B, F>,
    pub base_weight: &'a [F],
    /// The basis of a SparseGrad projection, stored once per group.
    pub basis: Option<&'a Basis>,
}

/// One projection to load into: a layer freshly built from `base_weight`.
pub struct AdapterTarget<'a, B: Backend, F: Real> {
    pub name: &'a str,
    pub linear: &'a mut dyn TrainableLinear<B, F>,
    pub base_weight: &'a [F],
}

fn f32s<F: Real>(v: &[F]) -> Vec<f32> {
    v.iter().map(|x| x.to_f64() as f32).collect()
}

fn from_f32s<F: Real>(v: Vec<f32>) -> Vec<F> {
    v.into_iter().map(|x| F::from_f64(x as f64)).collect()
}

fn add_dense<F: Real>(w: &mut SafetensorsWriter, key: &str, p: &DenseParam<F>, shape: &[usize]) -> Result<()> {
    w.add_f32(key, shape, f32s(&p.values))?;
    if let (Some(m), Some(v)) = (&p.exp_avg, &p.exp_avg_sq) {
        w.add_f32(&format!("{key}.exp_avg"), shape, f32s(m))?;
        w.add_f32(&format!("{key}.exp_avg_sq"), shape, f32s(v))?;
    }
    Ok(())
}

fn add_sparse<F: Real>(w: &mut SafetensorsWriter, name: &str, p: &SparseParam<F>) -> Result<()> {
    let n = p.indices.len();
    let cols = p.shape.1 as u64;
    let idx: Vec<i64> = p.indices.iter().flat_map(|&l| [(l / cols) as i64, (l % cols) as i64]).collect();
    w.add_i64(&format!("{name}.indices"), &[n, 2], idx)?;
    w.add_f32(&format!("{name}.values"), &[n], f32s(&p.values))?;
    if let (Some(m), Some(v)) = (&p.exp_avg, &p.exp_avg_sq) {
        w.add_f32(&format!("{name}.exp_avg"), &[n], f32s(m))?;
        w.add_f32(&format!("{name}.exp_avg_sq"), &[n], f32s(v))?;
    }
    Ok(())
}

/// Saves the trained state of `entries` to `path` (atomically).
pub fn save_adapter<B: Backend + Clone, F: Real>(path: &Path, entries: &[AdapterEntry<'_, B, F>]) -> Result<()> {
    let mut w = SafetensorsWriter::new();
    w.set_metadata("format", FORMAT);
    w.set_metadata("version", VERSION);
    w.set_metadata("projections", entries.iter().map(|e| e.name).collect::<Vec<_>>().join(","));
    let mut groups_written = BTreeSet::new();
    for e in entries {
        let (name, out, inp) = (e.name, e.linear.out_features(), e.linear.in_features());
        if name.is_empty() || name.contains(',') {
            return Err(Error::invalid(
                "save_adapter",
                format!("projection name `{name}` must be non-empty and without commas"),
            ));
        }
        if e.base_weight.len() != out * inp {
            return Err(Error::shape(
                "save_adapter",
                format!("base weight of `{name}`"),
                out * inp,
                e.base_weight.len(),
            ));
        }
        let state = e.linear.export_state()?;
        w.set_metadata(&format!("{name}.method"), state.method());
        w.set_metadata(&format!("{name}.shape"), format!("{out},{inp}"));
        w.set_metadata(&format!("{name}.base_fingerprint"), format!("{:016x}", fingerprint(e.base_weight)));
        let (bias, step) = match &state {
            LayerState::Frozen => (None, 0),
            LayerState::Full { weight, bias, step } => {
                add_dense(&mut w, &format!("{name}.weight"), weight, &[out, inp])?;
                (bias.as_ref(), *step)
            }
            LayerState::MeProp { weight, bias, step } => {
                add_sparse(&mut w, name, weight)?;
                (bias.as_ref(), *step)
            }
            LayerState::SparseGrad { weight_transformed, bias, step, basis_group, basis_fingerprint } => {
                add_sparse(&mut w, name, weight_transformed)?;
                w.set_metadata(&format!("{name}.basis_group"), basis_group.clone());
                w.set_metadata(&format!("{name}.basis_fingerprint"), format!("{basis_fingerprint:016x}"));
                let basis = e.basis.ok_or_else(|| {
                    Error::invalid("save_adapter", format!("`{name}` is SparseGrad: its basis must be given"))
                })?;
                if basis.fingerprint() != *basis_fingerprint {
                    return Err(Error::invalid(
                        "save_adapter",
                        format!("the basis given for `{name}` is not the one it trains in"),
                    ));
                }
                crate::basis::check_group_name(basis_group)?;
                if groups_written.insert(basis_group.clone()) {
                    w.add_f32(&format!("basis.{basis_group}.P"), &[out, out], basis.p().to_vec())?;
                    w.add_f32(&format!("basis.{basis_group}.Q"), &[inp, inp], basis.q().to_vec())?;
                }
                (bias.as_ref(), *step)
            }
            LayerState::Lora { a, b, rank, alpha, step } => {
                add_dense(&mut w, &format!("{name}.lora_A"), a, &[*rank, inp])?;
                add_dense(&mut w, &format!("{name}.lora_B"), b, &[out, *rank])?;
                w.set_metadata(&format!("{name}.lora_rank"), rank.to_string());
                w.set_metadata(&format!("{name}.lora_alpha"), alpha.to_string());
                (None, *step)
            }
        };
        if let Some(b) = bias {
            add_dense(&mut w, &format!("{name}.bias"), b, &[out])?;
        }
        w.set_metadata(&format!("{name}.step"), step.to_string());
    }
    w.write(path)
}

fn read_dense<F: Real>(f: &SafetensorsFile, key: &str, shape: &[usize]) -> Result<DenseParam<F>> {
    let values = from_f32s(f.tensor_f32_shaped(key, shape)?);
    let moment = |suffix: &str| -> Result<Option<Vec<F>>> {
        let k = format!("{key}.{suffix}");
        if f.contains(&k) {
            Ok(Some(from_f32s(f.tensor_f32_shaped(&k, shape)?)))
        } else {
            Ok(None)
        }
    };
    Ok(DenseParam { values, exp_avg: moment("exp_avg")?, exp_avg_sq: moment("exp_avg_sq")? })
}

fn read_sparse<F: Real>(f: &SafetensorsFile, name: &str, shape: (usize, usize)) -> Result<SparseParam<F>> {
    let key = format!("{name}.indices");
    let n = f
        .shape(&key)
        .and_then(|s| s.first().copied())
        .ok_or_else(|| Error::MissingTensor { name: key.clone(), context: Some(f.path().display().to_string()) })?;
    let idx = f.tensor_i64_shaped(&key, &[n, 2])?;
    let mut indices = Vec::with_capacity(n);
    for pair in idx.chunks_exact(2) {
        let (r, c) = (pair[0], pair[1]);
        if r < 0 || c < 0 || r as usize >= shape.0 || c as usize >= shape.1 {
            return Err(Error::invalid(
                "load_adapter",
                format!("`{key}` holds ({r}, {c}) outside {}x{}", shape.0, shape.1),
            ));
        }
        indices.push(r as u64 * shape.1 as u64 + c as u64);
    }
    let dense = read_dense::<F>(f, &format!("{name}.values"), &[n])?;
    let moments = |suffix: &str| -> Result<Option<Vec<F>>> {
        let k = format!("{name}.{suffix}");
        if f.contains(&k) {
            Ok(Some(from_f32s(f.tensor_f32_shaped(&k, &[n])?)))
        } else {
            Ok(None)
        }
    };
    let p = SparseParam {
        shape,
        indices,
        values: dense.values,
        exp_avg: moments("exp_avg")?,
        exp_avg_sq: moments("exp_avg_sq")?,
    };
    p.validate()?;
    Ok(p)
}

fn parse_hex(f: &SafetensorsFile, key: &str) -> Result<u64> {
    let v = f.meta_str(key)?;
    u64::from_str_radix(v, 16)
        .map_err(|e| Error::Metadata { key: key.to_string(), msg: format!("`{v}` is not a hex fingerprint: {e}") })
}

/// Loads an adapter into `targets` (layers freshly built from their base weights with
/// the same methods). Every projection is checked (method, shape, base weight, basis,
/// optimizer) before any layer is changed.
pub fn load_adapter<B: Backend + Clone, F: Real>(path: &Path, targets: &mut [AdapterTarget<'_, B, F>]) -> Result<()> {
    let f = SafetensorsFile::open(path)?;
    if f.optional_meta_str("format") != Some(FORMAT) {
        return Err(Error::format(
            Some(path),
            format!("not a {FORMAT} file (metadata `format` is {:?})", f.optional_meta_str("format")),
        ));
    }
    if f.meta_str("version")? != VERSION {
        return Err(Error::format(Some(path), format!("unsupported adapter version {}", f.meta_str("version")?)));
    }
    let mut states = Vec::with_capacity(targets.len());
    for t in targets.iter() {
        let (name, out, inp) = (t.name, t.linear.out_features(), t.linear.in_features());
        let incompatible = |msg: String| Error::Incompatible { what: format!("adapter projection `{name}`"), msg };
        let method = f.meta_str(&format!("{name}.method"))?;
        let shape = f.meta_str(&format!("{name}.shape"))?;
        if shape != format!("{out},{inp}") {
            return Err(incompatible(format!("saved for shape {shape}, the layer is {out},{inp}")));
        }
        if parse_hex(&f, &format!("{name}.base_fingerprint"))? != fingerprint(t.base_weight) {
            return Err(incompatible("saved on top of another base weight".into()));
        }
        let step: u64 = f.meta_parse(&format!("{name}.step"))?;
        let bias = |f: &SafetensorsFile| -> Result<Option<DenseParam<F>>> {
            let key = format!("{name}.bias");
            if f.contains(&key) {
                Ok(Some(read_dense(f, &key, &[out])?))
            } else {
                Ok(None)
            }
        };
        let state = match method {
            "frozen" => LayerState::Frozen,
            "full" => LayerState::Full {
                weight: read_dense(&f, &format!("{name}.weight"), &[out, inp])?,
                bias: bias(&f)?,
                step,
            },
            "meprop" => LayerState::MeProp { weight: read_sparse(&f, name, (out, inp))?, bias: bias(&f)?, step },
            "sparsegrad" => {
                let group = f.meta_str(&format!("{name}.basis_group"))?.to_string();
                let basis_fingerprint = parse_hex(&f, &format!("{name}.basis_fingerprint"))?;
                LayerState::SparseGrad {
                    weight_transformed: read_sparse(&f, name, (out, inp))?,
                    bias: bias(&f)?,
                    step,
                    basis_group: group,
                    basis_fingerprint,
                }
            }
            "lora" => {
                let rank: usize = f.meta_parse(&format!("{name}.lora_rank"))?;
                let alpha: f32 = f.meta_parse(&format!("{name}.lora_alpha"))?;
                let a = read_dense(&f, &format!("{name}.lora_A"), &[rank, inp])?;
                let b = read_dense(&f, &format!("{name}.lora_B"), &[out, rank])?;
                LayerState::Lora { a, b, rank, alpha, step }
            }
            other => {
                return Err(Error::Metadata { key: format!("{name}.method"), msg: format!("unknown method `{other}`") })
            }
        };
        states.push(state);
    }
    let name_it = |name: &str, e: Error| match e {
        Error::Incompatible { what, msg } => Error::Incompatible { what: format!("{what} (projection `{name}`)"), msg },
        other => other,
    };
    // Every projection is checked before the first one changes.
    for (t, state) in targets.iter().zip(&states) {
        t.linear.check_state(state).map_err(|e| name_it(t.name, e))?;
    }
    for (t, state) in targets.iter_mut().zip(&states) {
        t.linear.import_state(state).map_err(|e| name_it(t.name, e))?;
    }
    Ok(())
}

/// A model's planned MLP projection for its adapter: the name in the file, the projection
/// and the base weight it was built from. Both models' `save_adapter` / `load_adapter`
/// list theirs and hand them here.
pub(crate) type Planned<P, F> = (String, P, Vec<F>);

/// Saves `planned` projections; a SparseGrad projection's basis is its group's in `bases`.
pub(crate) fn save_projections<B: Backend + Clone, F: Real>(
    path: &Path,
    planned: &[Planned<&Projection<B, F>, F>],
    bases: Option<&BasisSet>,
) -> Result<()> {
    let mut entries = Vec::with_capacity(planned.len());
    for (name, p, base_weight) in planned {
        let basis = match (&p.method, bases) {
            (Method::SparseGrad { .. }, Some(b)) => Some(b.get(&p.group)?),
            _ => None,
        };
        entries.push(AdapterEntry { name, linear: &p.linear, base_weight, basis });
    }
    save_adapter(path, &entries)
}

/// Loads into `planned` projections (see [`load_adapter`]: all checked before any changes).
pub(crate) fn load_projections<B: Backend + Clone, F: Real>(
    path: &Path,
    mut planned: Vec<Planned<&mut Projection<B, F>, F>>,
) -> Result<()> {
    let mut targets: Vec<AdapterTarget<'_, B, F>> = planned
        .iter_mut()
        .map(|(name, p, base_weight)| AdapterTarget { name, linear: &mut p.linear, base_weight })
        .collect();
    load_adapter(path, &mut targets)
}

/// The bases stored in an adapter, by group.
pub fn adapter_bases(path: &Path) -> Result<Vec<Basis>> {
    let f = SafetensorsFile::open(path)?;
    let mut out = Vec::new();
    for name in f.names() {
        let Some(group) = name.strip_prefix("basis.").and_then(|n| n.strip_suffix(".P")) else { continue };
        let (p, ps) = f.tensor_f32_rank(&name, 2)?;
        let (q, qs) = f.tensor_f32_rank(&format!("basis.{group}.Q"), 2)?;
        let (o, i) = (ps[0], qs[0]);
        out.push(Basis::from_parts(group, o, i, p, q, vec![0.0; o], vec![0.0; i], 0)?);
    }
    Ok(out)
}
