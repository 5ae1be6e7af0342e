//! Safetensors files, read and written with every lookup checked.
//!
//! [`SafetensorsFile`] memory-maps a file and validates its header once, at open, so a
//! truncated or corrupt file fails there ([`Error::Format`]); tensors are copied out only
//! after their name, dtype and shape are checked, and every error names the file, the
//! tensor or the metadata key at fault.
//!
//! [`SafetensorsWriter`] collects F32 and I64 tensors plus string metadata and writes them
//! through [`write_atomic`]: bytes go to a temp file in the target's directory, are
//! synced, then renamed over the target, so a reader sees the old file or the new one,
//! never half of one, and a failed write leaves nothing behind.

use crate::error::{Error, Result};
use ::safetensors::tensor::{Metadata, TensorInfo};
pub use ::safetensors::Dtype;
use ::safetensors::SafeTensors;
use memmap2::Mmap;
use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

const OP: &str = "safetensors";

/// A safetensors file opened for reading. See the module docs.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the data section: the 8-byte header length plus the header.
    data_start: usize,
    header: Metadata,
    meta: HashMap<String, String>,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.names())
            .finish_non_exhaustive()
    }
}

/// `[a, b, c]`, the way shapes appear in error messages.
pub(crate) fn fmt_shape(shape: &[usize]) -> String {
    format!("{shape:?}")
}

impl SafetensorsFile {
    /// Opens and validates `path`: it must be a regular file holding a complete safetensors
    /// header whose tensors exactly cover the rest of the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let info = file.metadata().map_err(|e| Error::io(path, e))?;
        if !info.is_file() {
            return Err(Error::format(Some(path), "not a regular file"));
        }
        if info.len() < 8 {
            return Err(Error::format(
                Some(path),
                format!("{} bytes is too short for a safetensors file (truncated?)", info.len()),
            ));
        }
        // SAFETY: the map is only read, and tensors are copied out before use. As with any
        // mmap, another process truncating the file meanwhile could fault; files written by
        // `write_atomic` are replaced by rename, never truncated in place.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (n, header) = SafeTensors::read_metadata(&mmap).map_err(|e| {
            Error::format(Some(path), format!("not a valid safetensors file (truncated or corrupt?): {e}"))
        })?;
        let meta = header.metadata().clone().unwrap_or_default();
        Ok(SafetensorsFile { path: path.to_path_buf(), mmap, data_start: 8 + n, header, meta })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.header.tensors().into_keys().collect();
        names.sort();
        names
    }

    pub fn contains(&self, name: &str) -> bool {
        self.header.info(name).is_some()
    }

    pub fn dtype(&self, name: &str) -> Option<Dtype> {
        self.header.info(name).map(|i| i.dtype)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.header.info(name).map(|i| &i.shape[..])
    }

    /// The string metadata (`__metadata__`), empty if the file has none.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.meta
    }

    /// An F32 tensor and its shape. Missing: [`Error::MissingTensor`]; another dtype:
    /// [`Error::Dtype`].
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let info = self.f32_info(name)?;
        Ok((self.decode_f32(name, info)?, info.shape.clone()))
    }

    /// [`tensor_f32`](Self::tensor_f32), or `None` when there is no tensor `name`.
    pub fn optional_tensor_f32(&self, name: &str) -> Result<Option<(Vec<f32>, Vec<usize>)>> {
        if self.contains(name) {
            self.tensor_f32(name).map(Some)
        } else {
            Ok(None)
        }
    }

    /// An I64 tensor of exactly shape `expected` (indices, counts).
    pub fn tensor_i64_shaped(&self, name: &str, expected: &[usize]) -> Result<Vec<i64>> {
        let info = self.header.info(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            context: Some(self.path.display().to_string()),
        })?;
        if info.dtype != Dtype::I64 {
            return Err(Error::Dtype {
                name: name.to_string(),
                expected: "I64".into(),
                got: format!("{:?}", info.dtype),
            });
        }
        if info.shape != expected {
            return Err(self.shape_error(name, fmt_shape(expected), &info.shape));
        }
        let bytes = self.bytes(name, info)?;
        Ok(bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect())
    }

    /// An F32 tensor of rank `rank`; the rank is checked before anything is copied.
    pub fn tensor_f32_rank(&self, name: &str, rank: usize) -> Result<(Vec<f32>, Vec<usize>)> {
        let info = self.f32_info(name)?;
        if info.shape.len() != rank {
            return Err(self.shape_error(name, format!("rank {rank}"), &info.shape));
        }
        Ok((self.decode_f32(name, info)?, info.shape.clone()))
    }

    /// An F32 tensor of exactly shape `expected` ([`Error::Shape`] otherwise, before copying).
    pub fn tensor_f32_shaped(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let info = self.f32_info(name)?;
        if info.shape != expected {
            return Err(self.shape_error(name, fmt_shape(expected), &info.shape));
        }
        self.decode_f32(name, info)
    }

    /// Streams an F32 tensor through `f` in pieces of `chunk_len` values (the last may be
    /// shorter), so a large tensor never needs a full copy in memory.
    pub fn for_each_f32_chunk(
        &self,
        name: &str,
        chunk_len: usize,
        mut f: impl FnMut(&[f32]) -> Result<()>,
    ) -> Result<()> {
        if chunk_len == 0 {
            return Err(Error::invalid(OP, "chunk length must be at least 1"));
        }
        let info = self.f32_info(name)?;
        let bytes = self.bytes(name, info)?;
        let mut buf = Vec::new();
        buf.try_reserve_exact(chunk_len.min(bytes.len() / 4))
            .map_err(|_| Error::invalid(OP, format!("cannot allocate a {chunk_len}-value buffer for `{name}`")))?;
        for piece in bytes.chunks(chunk_len.saturating_mul(4)) {
            buf.clear();
            buf.extend(piece.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
            f(&buf)?;
        }
        Ok(())
    }

    /// A metadata value, or `None`.
    pub fn optional_meta_str(&self, key: &str) -> Option<&str> {
        self.meta.get(key).map(String::as_str)
    }

    /// A metadata value; missing gives [`Error::Metadata`] naming the key and the file.
    pub fn meta_str(&self, key: &str) -> Result<&str> {
        self.optional_meta_str(key).ok_or_else(|| Error::Metadata {
            key: key.to_string(),
            msg: format!("missing from {}", self.path.display()),
        })
    }

    /// A metadata value parsed as `T` (surrounding whitespace ignored); missing or
    /// unparsable gives [`Error::Metadata`] naming the key, the value and the file.
    pub fn meta_parse<T: FromStr>(&self, key: &str) -> Result<T>
    where
        T::Err: Display,
    {
        let v = self.meta_str(key)?;
        self.parse_value(key, v)
    }

    /// [`meta_parse`](Self::meta_parse), or `None` when the key is absent.
    pub fn optional_meta_parse<T: FromStr>(&self, key: &str) -> Result<Option<T>>
    where
        T::Err: Display,
    {
        self.optional_meta_str(key).map(|v| self.parse_value(key, v)).transpose()
    }

    fn parse_value<T: FromStr>(&self, key: &str, v: &str) -> Result<T>
    where
        T::Err: Display,
    {
        v.trim().parse::<T>().map_err(|e| Error::Metadata {
            key: key.to_string(),
            msg: format!("`{v}` in {} is not a valid {}: {e}", self.path.display(), std::any::type_name::<T>()),
        })
    }

    fn f32_info(&self, name: &str) -> Result<&TensorInfo> {
        let info = self.header.info(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            context: Some(self.path.display().to_string()),
        })?;
        if info.dtype != Dtype::F32 {
            return Err(Error::Dtype {
                name: name.to_string(),
                expected: "F32".into(),
                got: format!("{:?}", info.dtype),
            });
        }
        Ok(info)
    }

    fn shape_error(&self, name: &str, expected: String, got: &[usize]) -> Error {
        Error::shape(OP, format!("tensor `{name}` in {}", self.path.display()), expected, fmt_shape(got))
    }

    fn bytes(&self, name: &str, info: &TensorInfo) -> Result<&[u8]> {
        let (s, e) = info.data_offsets;
        // The header was validated at open; this only guards against arithmetic surprises.
        self.data_start
            .checked_add(s)
            .zip(self.data_start.checked_add(e))
            .and_then(|(s, e)| self.mmap.get(s..e))
            .ok_or_else(|| Error::format(Some(&self.path), format!("tensor `{name}` lies outside the file")))
    }

    fn decode_f32(&self, name: &str, info: &TensorInfo) -> Result<Vec<f32>> {
        let bytes = self.bytes(name, info)?;
        let mut v = Vec::new();
        v.try_reserve_exact(bytes.len() / 4)
            .map_err(|_| Error::invalid(OP, format!("cannot allocate {} bytes for `{name}`", bytes.len())))?;
        v.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
        Ok(v)
    }
}

/// [`Error::NonFinite`] naming `what` if `data` holds NaN or infinity.
pub fn check_finite(what: &str, data: &[f32]) -> Result<()> {
    match data.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(first_index) => Err(Error::NonFinite {
            what: what.to_string(),
            count: data.iter().filter(|v| !v.is_finite()).count(),
            first_index,
        }),
    }
}

enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

impl Data {
    fn dtype(&self) -> Dtype {
        match self {
            Data::F32(_) => Dtype::F32,
            Data::I64(_) => Dtype::I64,
        }
    }
    fn byte_len(&self) -> usize {
        match self {
            Data::F32(v) => v.len() * 4,
            Data::I64(v) => v.len() * 8,
        }
    }
    fn write_to(&self, w: &mut dyn Write) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(1 << 16);
        match self {
            Data::F32(v) => {
                for c in v.chunks(1 << 14) {
                    buf.clear();
                    c.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
                    w.write_all(&buf)?;
                }
            }
            Data::I64(v) => {
                for c in v.chunks(1 << 13) {
                    buf.clear();
                    c.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
                    w.write_all(&buf)?;
                }
            }
        }
        Ok(())
    }
}

/// Builds a safetensors file in memory and writes it atomically. See the module docs.
#[derive(Default)]
pub struct SafetensorsWriter {
    tensors: Vec<(String, Vec<usize>, Data)>,
    names: HashSet<String>,
    meta: HashMap<String, String>,
}

impl SafetensorsWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an F32 tensor; `data.len()` must equal the product of `shape`.
    pub fn add_f32(&mut self, name: &str, shape: &[usize], data: Vec<f32>) -> Result<()> {
        self.add(name, shape, data.len(), Data::F32(data))
    }

    /// Adds an I64 tensor; `data.len()` must equal the product of `shape`.
    pub fn add_i64(&mut self, name: &str, shape: &[usize], data: Vec<i64>) -> Result<()> {
        self.add(name, shape, data.len(), Data::I64(data))
    }

    /// Sets a string metadata entry, replacing any earlier value.
    pub fn set_metadata(&mut self, key: &str, value: impl Into<String>) {
        self.meta.insert(key.to_string(), value.into());
    }

    fn add(&mut self, name: &str, shape: &[usize], len: usize, data: Data) -> Result<()> {
        if name.is_empty() || name == "__metadata__" {
            return Err(Error::invalid("SafetensorsWriter::add", format!("`{name}` is not a usable tensor name")));
        }
        if self.names.contains(name) {
            return Err(Error::invalid("SafetensorsWriter::add", format!("tensor `{name}` added twice")));
        }
        let want = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if want != Some(len) {
            return Err(Error::shape(
                "SafetensorsWriter::add",
                format!("tensor `{name}` of shape {}", fmt_shape(shape)),
                "as many values as the shape holds",
                len,
            ));
        }
        self.names.insert(name.to_string());
        self.tensors.push((name.to_string(), shape.to_vec(), data));
        Ok(())
    }

    /// Writes the file to `path` atomically ([`write_atomic`]).
    pub fn write(&self, path: &Path) -> Result<()> {
        // 8-byte dtypes first, then by name: with the header padded to 8 bytes every
        // tensor starts aligned to its element size, so readers may map it in place.
        let mut order: Vec<&(String, Vec<usize>, Data)> = self.tensors.iter().collect();
        order.sort_by(|a, b| elem_size(&b.2).cmp(&elem_size(&a.2)).then_with(|| a.0.cmp(&b.0)));
        let mut infos = Vec::with_capacity(order.len());
        let mut offset = 0usize;
        for (name, shape, data) in &order {
            let end = offset + data.byte_len();
            infos.push((
                name.clone(),
                TensorInfo { dtype: data.dtype(), shape: shape.clone(), data_offsets: (offset, end) },
            ));
            offset = end;
        }
        let meta = if self.meta.is_empty() { None } else { Some(self.meta.clone()) };
        let header = Metadata::new(meta, infos)
            .map_err(|e| Error::format(Some(path), format!("cannot build the header: {e}")))?;
        let mut header = serde_json::to_string(&header)
            .map_err(|e| Error::format(Some(path), format!("cannot encode the header: {e}")))?
            .into_bytes();
        header.resize(header.len().next_multiple_of(8), b' ');
        write_atomic(path, |w| {
            w.write_all(&(header.len() as u64).to_le_bytes())?;
            w.write_all(&header)?;
            for (_, _, data) in &order {
                data.write_to(w)?;
            }
            Ok(())
        })
    }
}

fn elem_size(d: &Data) -> usize {
    match d {
        Data::F32(_) => 4,
        Data::I64(_) => 8,
    }
}

/// Distinguishes temp files of concurrent writes from one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes a file through `write` atomically: into a new temp file beside `path`, synced,
/// then renamed over `path`. On any error the temp file is removed and `path` is left as
/// it was; I/O errors name `path` (the temp name would only confuse).
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::invalid("write_atomic", format!("{} has no file name", path.display())))?;
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
    let io = |e| Error::io(path, e);
    // create_new: never clobber (or later delete) a file this call did not create.
    let file = OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(io)?;
    let result = (|| {
        let mut w = BufWriter::with_capacity(1 << 20, file);
        write(&mut w).map_err(io)?;
        let file = w.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        drop(file);
        fs::rename(&tmp, path).map_err(io)
    })();
    if result.is_err() {
        // Best effort: the original error is the one worth reporting.
        let _ = fs::remove_file(&tmp);
    }
    result
}
