//! Save and load of a [`BasisSet`] as one safetensors file: per group the F32 tensors
//! `{group}.P` `[out, out]`, `{group}.Q` `[in, in]`, `{group}.sigma_out` `[out]`,
//! `{group}.sigma_in` `[in]`; metadata `format = sparsegrad-basis`, `version = 1`,
//! `{group}.n_grads = N`. Reads and writes go through [`crate::io`] (memory-mapped, checked
//! reads; atomic writes); loads validate everything before use.

use super::{Basis, BasisSet};
use crate::error::{Error, Result};
use crate::io::{SafetensorsFile, SafetensorsWriter};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// Value of the `format` metadata key.
pub const FORMAT: &str = "sparsegrad-basis";
/// Value of the `version` metadata key this build writes and reads.
pub const VERSION: &str = "1";
const SUFFIXES: [&str; 4] = ["P", "Q", "sigma_out", "sigma_in"];

impl BasisSet {
    /// Writes the set to `path` (see the module docs for the layout) atomically
    /// ([`crate::io::fs::write_atomic`]). Checks shapes and finiteness (orthogonality is
    /// checked on load).
    pub fn save(&self, path: &Path) -> Result<()> {
        let op = "BasisSet::save";
        let mut w = SafetensorsWriter::new();
        w.set_metadata("format", FORMAT);
        w.set_metadata("version", VERSION);
        for (key, b) in &self.bases {
            if key != &b.group {
                return Err(Error::invalid(op, format!("basis stored under key `{key}` names group `{}`", b.group)));
            }
            super::check_group_name(&b.group)?;
            b.check_shapes(op)?;
            let g = &b.group;
            for (suffix, shape, data) in [
                ("P", vec![b.out, b.out], &b.p),
                ("Q", vec![b.inp, b.inp], &b.q),
                ("sigma_out", vec![b.out], &b.sigma_out),
                ("sigma_in", vec![b.inp], &b.sigma_in),
            ] {
                crate::io::check_finite(&format!("basis `{g}` {suffix}"), data)?;
                w.add_f32(&format!("{g}.{suffix}"), &shape, data.clone())?;
            }
            w.set_metadata(&format!("{g}.n_grads"), b.n_grads.to_string());
        }
        w.write(path)
    }

    /// Reads a set written by [`save`](Self::save). Rejects files that are truncated,
    /// corrupt or not safetensors ([`Error::Format`]), lack the format metadata or a
    /// group's `n_grads` ([`Error::Metadata`]), miss a tensor ([`Error::MissingTensor`]),
    /// hold a non-F32 tensor ([`Error::Dtype`]) or inconsistent shapes ([`Error::Shape`]),
    /// and bases failing [`Basis::validate`] ([`Error::InvalidBasis`], [`Error::NonFinite`]).
    pub fn load(path: &Path) -> Result<BasisSet> {
        let f = SafetensorsFile::open(path)?;
        let meta = f.metadata();
        check_meta(meta, "format", FORMAT)?;
        check_meta(meta, "version", VERSION)?;
        let mut groups = BTreeSet::new();
        for name in f.names() {
            match name.rsplit_once('.') {
                Some((g, s)) if !g.is_empty() && SUFFIXES.contains(&s) => groups.insert(g.to_string()),
                _ => return Err(Error::format(Some(path), format!("unexpected tensor `{name}` in a basis file"))),
            };
        }
        let mut set = BasisSet::new();
        for g in groups {
            let tensor = |suffix: &str, rank: usize| -> Result<(Vec<usize>, Vec<f32>)> {
                let name = format!("{g}.{suffix}");
                let (data, shape) = f.tensor_f32_rank(&name, rank)?;
                if rank == 2 && shape[0] != shape[1] {
                    return Err(Error::shape("BasisSet::load", name, "[n, n] (square)", format!("{shape:?}")));
                }
                Ok((shape, data))
            };
            let (p_shape, p) = tensor("P", 2)?;
            let (q_shape, q) = tensor("Q", 2)?;
            let (so_shape, sigma_out) = tensor("sigma_out", 1)?;
            let (si_shape, sigma_in) = tensor("sigma_in", 1)?;
            let (out, inp) = (p_shape[0], q_shape[0]);
            for (name, shape, n, m) in [("sigma_out", so_shape, out, "P"), ("sigma_in", si_shape, inp, "Q")] {
                if shape[0] != n {
                    return Err(Error::shape(
                        "BasisSet::load",
                        format!("{g}.{name}"),
                        format!("[{n}] ({m} is [{n}, {n}])"),
                        format!("{shape:?}"),
                    ));
                }
            }
            let key = format!("{g}.n_grads");
            let n_grads = meta
                .get(&key)
                .ok_or_else(|| Error::Metadata { key: key.clone(), msg: "missing".into() })?
                .parse::<u64>()
                .map_err(|e| Error::Metadata { key: key.clone(), msg: format!("not a count: {e}") })?;
            set.insert(Basis::from_parts(&g, out, inp, p, q, sigma_out, sigma_in, n_grads)?);
        }
        Ok(set)
    }
}

fn check_meta(meta: &HashMap<String, String>, key: &str, want: &str) -> Result<()> {
    match meta.get(key) {
        Some(v) if v == want => Ok(()),
        Some(v) => Err(Error::Metadata {
            key: key.into(),
            msg: format!("`{v}`, expected `{want}` (not a basis file of this version)"),
        }),
        None => Err(Error::Metadata {
            key: key.into(),
            msg: format!("missing (expected `{want}`: not a sparsegrad basis file)"),
        }),
    }
}
