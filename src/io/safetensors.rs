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

use super::fs::{escape, write_atomic};
use crate::error::{ensure_finite, Error, Result};
use ::safetensors::tensor::{Metadata, TensorInfo};
pub use ::safetensors::Dtype;
use ::safetensors::SafeTensors;
use memmap2::Mmap;
use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

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
        let file = super::fs::open_regular(path)?;
        let info = file.metadata().map_err(|e| Error::io(path, e))?;
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
        let (n, header) = read_header(&mmap, Some(path))?;
        let meta = header.metadata().clone().unwrap_or_default();
        Ok(SafetensorsFile { path: path.to_path_buf(), mmap, data_start: 8 + n, header, meta })
    }

    /// Every tensor name with its dtype, shape and raw little-endian bytes.
    pub fn raw_tensors(&self) -> Vec<(String, Dtype, Vec<usize>, &[u8])> {
        let mut out = Vec::new();
        for name in self.names() {
            if let Some(info) = self.header.info(&name) {
                if let Ok(b) = self.bytes(&name, info) {
                    out.push((name, info.dtype, info.shape.clone(), b));
                }
            }
        }
        out
    }

    /// Tensor `name` of exactly shape `expected`, stored as F32, F16 or BF16, as f32.
    pub fn tensor_float_shaped(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let info = self.header.info(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            context: Some(self.path.display().to_string()),
        })?;
        if info.shape != expected {
            return Err(self.shape_error(name, fmt_shape(expected), &info.shape));
        }
        let bytes = self.bytes(name, info)?;
        let mut v = Vec::new();
        let n = info.shape.iter().product::<usize>();
        v.try_reserve_exact(n).map_err(|_| Error::OutOfMemory {
            what: format!("tensor `{name}` of {}", self.path.display()),
            bytes: (n as u128) * 4,
        })?;
        let two = |f: fn(u16) -> f32, v: &mut Vec<f32>| {
            v.extend(bytes.chunks_exact(2).map(|b| f(u16::from_le_bytes([b[0], b[1]]))))
        };
        match info.dtype {
            Dtype::F32 => v.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
            Dtype::F16 => two(|b| half::f16::from_bits(b).to_f32(), &mut v),
            Dtype::BF16 => two(|b| half::bf16::from_bits(b).to_f32(), &mut v),
            other => {
                return Err(Error::Dtype {
                    name: name.to_string(),
                    expected: "F32, F16 or BF16".into(),
                    got: format!("{other:?}"),
                })
            }
        }
        Ok(v)
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
            .map_err(|_| Error::OutOfMemory { what: format!("tensor `{name}`"), bytes: bytes.len() as u128 })?;
        v.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
        Ok(v)
    }
}

/// [`Error::NonFinite`] naming `what` if `data` holds NaN or infinity.
pub fn check_finite(what: &str, data: &[f32]) -> Result<()> {
    ensure_finite(what, data.iter().copied())
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

/// Most bytes a safetensors header may hold (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: usize = 100 << 20;

/// Parses and validates the header of the safetensors bytes `buf`: no key twice (tensor
/// or metadata), every tensor's byte range matching its dtype and shape, the ranges
/// tiling the data section exactly. Errors name the file and the tensor at fault.
pub(crate) fn read_header(buf: &[u8], path: Option<&Path>) -> Result<(usize, Metadata)> {
    let bad = |msg: String| Error::format(path, msg);
    let len_bytes: [u8; 8] = buf
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad(format!("{} bytes is too short for a safetensors file (truncated?)", buf.len())))?;
    let n = u64::from_le_bytes(len_bytes);
    let n = usize::try_from(n).ok().filter(|&n| n <= MAX_HEADER_BYTES && n <= buf.len() - 8).ok_or_else(|| {
        bad(format!("header length {n} is past the end of the {}-byte file (truncated or not safetensors?)", buf.len()))
    })?;
    let text =
        std::str::from_utf8(&buf[8..8 + n]).map_err(|_| bad("header is not UTF-8 (not a safetensors file?)".into()))?;
    let json = super::json::parse_unique_text(text).map_err(|e| bad(format!("invalid header: {e}")))?;
    let obj = json.as_object().ok_or_else(|| bad("header is not a JSON object".into()))?;
    let data_len = buf.len() - 8 - n;
    let mut ranges: Vec<(usize, usize, String)> = Vec::new();
    for (name, v) in obj {
        if name == "__metadata__" {
            let ok = v.as_object().is_some_and(|m| m.values().all(|x| x.is_string()));
            if !ok {
                return Err(bad("`__metadata__` must map names to strings".into()));
            }
            continue;
        }
        let tname = escape(name, 200);
        // The format's entries hold exactly these three fields; serde would drop any other
        // silently, so a misspelt or foreign field would go unnoticed.
        if let Some(extra) =
            v.as_object().and_then(|o| o.keys().find(|k| !matches!(k.as_str(), "dtype" | "shape" | "data_offsets")))
        {
            return Err(bad(format!(
                "tensor `{tname}`: unknown field `{}` in its entry (a tensor entry holds dtype, shape and data_offsets only)",
                escape(extra, 100)
            )));
        }
        let info: TensorInfo = serde_json::from_value(v.clone())
            .map_err(|e| bad(format!("tensor `{tname}`: invalid entry (dtype, shape, data_offsets): {e}")))?;
        let (s, e) = info.data_offsets;
        let numel = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let bits = numel.and_then(|n| n.checked_mul(info.dtype.bitsize()));
        let want = bits.filter(|b| b % 8 == 0).map(|b| b / 8);
        match want {
            Some(w) if e >= s && e - s == w => {}
            _ => {
                return Err(bad(format!(
                    "tensor `{tname}`: dtype {:?} and shape {:?} do not match data_offsets [{s}, {e}]",
                    info.dtype, info.shape
                )))
            }
        }
        if e > data_len {
            return Err(bad(format!(
                "tensor `{tname}`: data_offsets [{s}, {e}] run past the {data_len}-byte data section (truncated?)"
            )));
        }
        ranges.push((s, e, tname));
    }
    ranges.sort();
    let mut at = 0usize;
    for (s, e, name) in &ranges {
        if *s != at {
            let what = if *s < at { "overlaps the tensor before it" } else { "leaves a gap before it" };
            return Err(bad(format!("tensor `{name}`: data_offsets [{s}, {e}] {what}")));
        }
        at = *e;
    }
    if at != data_len {
        return Err(bad(format!("the tensors cover {at} bytes of the {data_len}-byte data section")));
    }
    // The checks above are stricter than the crate's; its parse gives the typed header.
    let (n2, header) = SafeTensors::read_metadata(buf)
        .map_err(|e| bad(format!("not a valid safetensors file (truncated or corrupt?): {e}")))?;
    Ok((n2, header))
}
