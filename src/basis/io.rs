//! Save and load of a [`BasisSet`] as one safetensors file: per group the F32 tensors
//! `{group}.P` `[out, out]`, `{group}.Q` `[in, in]`, `{group}.sigma_out` `[out]`,
//! `{group}.sigma_in` `[in]`; metadata `format = sparsegrad-basis`, `version = 1`,
//! `{group}.n_grads = N`. Writes are atomic; loads validate everything before use.

use super::{Basis, BasisSet};
use crate::error::{Error, Result};
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use safetensors::SafeTensors;
use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Value of the `format` metadata key.
pub const FORMAT: &str = "sparsegrad-basis";
/// Value of the `version` metadata key this build writes and reads.
pub const VERSION: &str = "1";
const SUFFIXES: [&str; 4] = ["P", "Q", "sigma_out", "sigma_in"];

/// Distinguishes temp files of concurrent saves from one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl BasisSet {
    /// Writes the set to `path` (see the module docs for the layout). Atomic: the bytes go
    /// to a temp file in the same directory, are synced, then renamed over `path`, so a
    /// reader sees the old file or the new one, never a half-written one; on error the temp
    /// file is removed. Checks shapes and finiteness (orthogonality is checked on load).
    pub fn save(&self, path: &Path) -> Result<()> {
        let op = "BasisSet::save";
        let mut entries: Vec<(String, Vec<usize>, &[f32])> = Vec::with_capacity(4 * self.bases.len());
        let mut meta = HashMap::from([("format".to_string(), FORMAT.to_string()), ("version".to_string(), VERSION.to_string())]);
        for (key, b) in &self.bases {
            if key != &b.group {
                return Err(Error::invalid(op, format!("basis stored under key `{key}` names group `{}`", b.group)));
            }
            if b.group.is_empty() {
                return Err(Error::invalid(op, "empty group name"));
            }
            b.check_shapes(op)?;
            let g = &b.group;
            for (suffix, shape, data) in [
                ("P", vec![b.out, b.out], &b.p[..]),
                ("Q", vec![b.inp, b.inp], &b.q[..]),
                ("sigma_out", vec![b.out], &b.sigma_out[..]),
                ("sigma_in", vec![b.inp], &b.sigma_in[..]),
            ] {
                if let Some(first_index) = data.iter().position(|v| !v.is_finite()) {
                    let count = data.iter().filter(|v| !v.is_finite()).count();
                    return Err(Error::NonFinite { what: format!("basis `{g}` {suffix}"), count, first_index });
                }
                entries.push((format!("{g}.{suffix}"), shape, data));
            }
            meta.insert(format!("{g}.n_grads"), b.n_grads.to_string());
        }
        let mut infos = Vec::with_capacity(entries.len());
        let mut offset = 0usize;
        for (name, shape, data) in &entries {
            let end = offset + data.len() * 4;
            infos.push((name.clone(), TensorInfo { dtype: Dtype::F32, shape: shape.clone(), data_offsets: (offset, end) }));
            offset = end;
        }
        let metadata =
            Metadata::new(Some(meta), infos).map_err(|e| Error::format(Some(path), format!("cannot build the header: {e}")))?;
        let mut header = serde_json::to_string(&metadata)
            .map_err(|e| Error::format(Some(path), format!("cannot encode the header: {e}")))?
            .into_bytes();
        // safetensors pads the header to 8 bytes so the data that follows is aligned.
        header.resize(header.len().next_multiple_of(8), b' ');

        let file_name = path.file_name().ok_or_else(|| Error::invalid(op, format!("{} has no file name", path.display())))?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let tmp = dir.join(format!(
            ".{}.tmp-{}-{}",
            file_name.to_string_lossy(),
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let result = write_file(&tmp, &header, &entries).and_then(|()| fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
        if result.is_err() {
            // Best effort: the original error is the one worth reporting.
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Reads a set written by [`save`](Self::save). Rejects files that are truncated,
    /// corrupt or not safetensors ([`Error::Format`]), lack the format metadata or a
    /// group's `n_grads` ([`Error::Metadata`]), miss a tensor ([`Error::MissingTensor`]),
    /// hold a non-F32 tensor ([`Error::Dtype`]) or inconsistent shapes ([`Error::Shape`]),
    /// and bases failing [`Basis::validate`] ([`Error::InvalidBasis`], [`Error::NonFinite`]).
    pub fn load(path: &Path) -> Result<BasisSet> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 8 {
            return Err(Error::format(Some(path), format!("{len} bytes is too short for a safetensors header (truncated?)")));
        }
        // SAFETY: the map is read-only and every tensor is copied out before it is dropped.
        // As with any mmap, another process truncating the file meanwhile could fault;
        // bases are written by rename, never truncated in place, so our own saves cannot.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (n, metadata) = SafeTensors::read_metadata(&mmap)
            .map_err(|e| Error::format(Some(path), format!("not a valid (complete) safetensors file: {e}")))?;
        let data = mmap.get(8 + n..).ok_or_else(|| Error::format(Some(path), "header runs past the end of the file"))?;
        let meta = metadata.metadata().clone().unwrap_or_default();
        check_meta(&meta, "format", FORMAT)?;
        check_meta(&meta, "version", VERSION)?;

        let infos = metadata.tensors();
        let mut groups = BTreeSet::new();
        for name in infos.keys() {
            match name.rsplit_once('.') {
                Some((g, s)) if !g.is_empty() && SUFFIXES.contains(&s) => groups.insert(g.to_string()),
                _ => return Err(Error::format(Some(path), format!("unexpected tensor `{name}` in a basis file"))),
            };
        }
        let mut set = BasisSet::new();
        for g in groups {
            let tensor = |suffix: &str, want_rank: usize| -> Result<(Vec<usize>, Vec<f32>)> {
                let name = format!("{g}.{suffix}");
                let info = infos
                    .get(&name)
                    .ok_or_else(|| Error::MissingTensor { name: name.clone(), context: Some(path.display().to_string()) })?;
                if info.dtype != Dtype::F32 {
                    return Err(Error::Dtype { name, expected: "F32".into(), got: format!("{:?}", info.dtype) });
                }
                if info.shape.len() != want_rank || (want_rank == 2 && info.shape[0] != info.shape[1]) {
                    let want = if want_rank == 2 { "[n, n] (square)" } else { "[n]" };
                    return Err(Error::shape("BasisSet::load", name, want, format!("{:?}", info.shape)));
                }
                let (s, e) = info.data_offsets;
                let bytes =
                    data.get(s..e).ok_or_else(|| Error::format(Some(path), format!("tensor `{name}` lies outside the file")))?;
                Ok((info.shape.clone(), bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()))
            };
            let (p_shape, p) = tensor("P", 2)?;
            let (q_shape, q) = tensor("Q", 2)?;
            let (so_shape, sigma_out) = tensor("sigma_out", 1)?;
            let (si_shape, sigma_in) = tensor("sigma_in", 1)?;
            let (out, inp) = (p_shape[0], q_shape[0]);
            if so_shape[0] != out {
                return Err(Error::shape(
                    "BasisSet::load",
                    format!("{g}.sigma_out"),
                    format!("[{out}] (P is [{out}, {out}])"),
                    format!("{so_shape:?}"),
                ));
            }
            if si_shape[0] != inp {
                return Err(Error::shape(
                    "BasisSet::load",
                    format!("{g}.sigma_in"),
                    format!("[{inp}] (Q is [{inp}, {inp}])"),
                    format!("{si_shape:?}"),
                ));
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
        Some(v) => {
            Err(Error::Metadata { key: key.into(), msg: format!("`{v}`, expected `{want}` (not a basis file of this version)") })
        }
        None => {
            Err(Error::Metadata { key: key.into(), msg: format!("missing (expected `{want}`: not a sparsegrad basis file)") })
        }
    }
}

/// Writes header and tensors to a new file at `tmp` and syncs it to disk.
fn write_file(tmp: &Path, header: &[u8], entries: &[(String, Vec<usize>, &[f32])]) -> Result<()> {
    let io = |e| Error::io(tmp, e);
    let file = OpenOptions::new().write(true).create_new(true).open(tmp).map_err(io)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(header).map_err(io)?;
    let mut buf = Vec::with_capacity(1 << 16);
    for (_, _, data) in entries {
        for chunk in data.chunks(1 << 14) {
            buf.clear();
            chunk.iter().for_each(|v| buf.extend_from_slice(&v.to_le_bytes()));
            w.write_all(&buf).map_err(io)?;
        }
    }
    let file = w.into_inner().map_err(|e| Error::io(tmp, e.into_error()))?;
    file.sync_all().map_err(io)
}
