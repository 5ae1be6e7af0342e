//! GGUF files (llama.cpp's model format, versions 2 and 3), read-only.
//!
//! [`GgufFile`] memory-maps a file (or takes a byte buffer), parses and checks the whole
//! header once, at open: magic, version, every metadata key/value (all GGUF value types,
//! arrays included), the tensor table, `general.alignment` (default 32) and the bounds of
//! the data section and of every tensor in it. Every length, count and offset is checked
//! against the file size with overflow-safe arithmetic before anything is allocated or
//! read, so a truncated or corrupt file gives [`Error::Format`], never a panic or a huge
//! allocation.
//!
//! Metadata is read through typed getters that name the key on absence or a wrong type
//! ([`Error::Metadata`]). Tensors come out as f32 in row-major order, dequantised from
//! F32, F16, BF16, Q8_0, Q4_0 or Q4_1; other ggml types are parsed (their bounds are
//! checked) but refused by [`GgufFile::tensor_f32`] with a clear "unsupported ggml type".
//!
//! Shapes: GGUF lists dimensions fastest first (`ne[0]` is the contiguous one), the
//! reverse of row-major shapes; [`TensorInfo::ne`] keeps GGUF's order and
//! [`GgufFile::tensor_f32`] returns the row-major shape (`ne` reversed). A linear weight
//! `(out, in)` thus has `ne = [in, out]` and comes back as `(out, in)`.

mod parse;
mod types;

pub use parse::{GgufArray, GgufValue, TensorInfo};
pub use types::GgmlType;

use crate::error::{Error, Result};
use memmap2::Mmap;
use parse::Header;
use std::path::{Path, PathBuf};

enum Storage {
    Mmap(Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file. See the module docs.
pub struct GgufFile {
    path: Option<PathBuf>,
    storage: Storage,
    header: Header,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.header.version)
            .field("metadata", &self.header.metadata.len())
            .field("tensors", &self.header.tensors.len())
            .finish_non_exhaustive()
    }
}

impl GgufFile {
    /// Memory-maps and parses the file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = crate::io::fs::open_regular(path)?;
        // SAFETY: the map is only read, and every read is bounds-checked against its
        // length. As with any mmap, another process truncating the file meanwhile could
        // fault; model files are not rewritten in place.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let header = parse::parse_header(&mmap, Some(path))?;
        Ok(GgufFile { path: Some(path.to_path_buf()), storage: Storage::Mmap(mmap), header })
    }

    /// Parses a GGUF file held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        let header = parse::parse_header(&bytes, None)?;
        Ok(GgufFile { path: None, storage: Storage::Owned(bytes), header })
    }

    /// [`from_bytes`](Self::from_bytes) on a copy of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        Self::from_bytes(bytes.to_vec())
    }

    /// The file's path, `None` for one parsed from memory.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.header.version
    }

    /// Alignment of tensor data (`general.alignment`, default 32).
    pub fn alignment(&self) -> usize {
        self.header.alignment
    }

    /// Absolute byte offset of the data section. Public but hidden: the parser's layout,
    /// read by tests/gguf.rs and the fuzzer's seeds, not part of the API.
    #[doc(hidden)]
    pub fn data_offset(&self) -> usize {
        self.header.data_start
    }

    // ---- metadata ----

    /// All metadata key/values, in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.header.metadata
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.header.meta_index.get(key).and_then(|&i| self.header.metadata.get(i)).map(|kv| &kv.1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.header.meta_index.contains_key(key)
    }

    fn where_(&self) -> String {
        self.path.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default()
    }

    fn missing(&self, key: &str) -> Error {
        Error::Metadata { key: key.to_string(), msg: format!("missing{}", self.where_()) }
    }

    fn wrong(&self, key: &str, expected: &str, v: &GgufValue) -> Error {
        Error::Metadata {
            key: key.to_string(),
            msg: format!("expected {expected}, found {}{}", v.type_name(), self.where_()),
        }
    }

    fn require(&self, key: &str) -> Result<&GgufValue> {
        self.get(key).ok_or_else(|| self.missing(key))
    }

    /// Any integer value that fits in `T` (writers differ in the integer width they use
    /// for counts, so a u64 or i32 holding a small value is accepted where u32 is asked).
    fn int<T: TryFrom<i128>>(&self, key: &str, expected: &str) -> Result<T> {
        let v = self.require(key)?;
        let i = v.as_i128().ok_or_else(|| self.wrong(key, expected, v))?;
        T::try_from(i).map_err(|_| Error::Metadata {
            key: key.to_string(),
            msg: format!("value {i} does not fit in {expected}{}", self.where_()),
        })
    }

    /// An integer metadata value as u32 (any integer type whose value fits).
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        self.int(key, "u32")
    }

    /// An integer metadata value as u64 (any integer type whose value fits).
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.int(key, "u64")
    }

    /// An integer metadata value as i64 (any integer type whose value fits).
    pub fn get_i64(&self, key: &str) -> Result<i64> {
        self.int(key, "i64")
    }

    /// A float metadata value (f32, or f64 rounded to f32).
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        match self.require(key)? {
            GgufValue::F32(x) => Ok(*x),
            GgufValue::F64(x) => Ok(*x as f32),
            v => Err(self.wrong(key, "f32", v)),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        match self.require(key)? {
            GgufValue::Bool(b) => Ok(*b),
            v => Err(self.wrong(key, "bool", v)),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        match self.require(key)? {
            GgufValue::String(s) => Ok(s),
            v => Err(self.wrong(key, "string", v)),
        }
    }

    pub fn get_str_array(&self, key: &str) -> Result<&[String]> {
        match self.require(key)? {
            GgufValue::Array(GgufArray::String(a)) => Ok(a),
            v => Err(self.wrong(key, "array of string", v)),
        }
    }

    pub fn get_i32_array(&self, key: &str) -> Result<&[i32]> {
        match self.require(key)? {
            GgufValue::Array(GgufArray::I32(a)) => Ok(a),
            v => Err(self.wrong(key, "array of i32", v)),
        }
    }

    pub fn get_f32_array(&self, key: &str) -> Result<&[f32]> {
        match self.require(key)? {
            GgufValue::Array(GgufArray::F32(a)) => Ok(a),
            v => Err(self.wrong(key, "array of f32", v)),
        }
    }

    /// `f(key)` when `key` is present, `None` when it is absent; a wrong type is an error.
    fn optional<'a, T>(&'a self, key: &str, f: impl FnOnce(&'a Self, &str) -> Result<T>) -> Result<Option<T>> {
        if self.contains_key(key) {
            f(self, key).map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn optional_u32(&self, key: &str) -> Result<Option<u32>> {
        self.optional(key, Self::get_u32)
    }

    pub fn optional_u64(&self, key: &str) -> Result<Option<u64>> {
        self.optional(key, Self::get_u64)
    }

    pub fn optional_f32(&self, key: &str) -> Result<Option<f32>> {
        self.optional(key, Self::get_f32)
    }

    pub fn optional_bool(&self, key: &str) -> Result<Option<bool>> {
        self.optional(key, Self::get_bool)
    }

    pub fn optional_str(&self, key: &str) -> Result<Option<&str>> {
        self.optional(key, Self::get_str)
    }

    /// `general.architecture` (`"llama"`).
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    // ---- tensors ----

    /// The tensor table, in file order.
    pub fn tensor_infos(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    /// The table entry of tensor `name`, if present.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.header.tensor_index.get(name).and_then(|&i| self.header.tensors.get(i))
    }

    pub fn contains_tensor(&self, name: &str) -> bool {
        self.header.tensor_index.contains_key(name)
    }

    fn require_tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor_info(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            context: Some(self.path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "GGUF data".into())),
        })
    }

    /// The raw (still quantised) bytes of tensor `name`.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.require_tensor(name)?;
        self.info_bytes(info)
    }

    fn info_bytes(&self, info: &TensorInfo) -> Result<&[u8]> {
        // Bounds were checked at parse time; this only refuses to index should they not hold.
        self.header
            .data_start
            .checked_add(info.offset)
            .and_then(|s| Some(s..s.checked_add(info.n_bytes)?))
            .and_then(|r| self.storage.bytes().get(r))
            .ok_or_else(|| Error::format(self.path(), format!("GGUF: tensor `{}` lies outside the file", info.name)))
    }

    /// Tensor `name` dequantised to f32, row-major, with its row-major shape (GGUF's `ne`
    /// reversed). Missing: [`Error::MissingTensor`]; a ggml type that cannot be
    /// dequantised: [`Error::Dtype`] ("unsupported ggml type").
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let info = self.require_tensor(name)?;
        Ok((self.dequantize(info)?, info.shape()))
    }

    /// Tensor `name` as f32, checking before any work that its row-major shape is
    /// `expected` ([`Error::Shape`] naming the tensor otherwise).
    pub fn tensor_f32_shaped(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let info = self.require_tensor(name)?;
        let shape = info.shape();
        if shape != expected {
            return Err(Error::shape(
                "gguf",
                format!("tensor `{name}`{}", self.where_()),
                format!("{expected:?}"),
                format!("{shape:?}"),
            ));
        }
        self.dequantize(info)
    }

    fn dequantize(&self, info: &TensorInfo) -> Result<Vec<f32>> {
        if !info.ggml_type.can_dequantize() {
            // Refuse before allocating the output.
            return types::dequantize(info.ggml_type, &info.name, &[], &mut []).map(|_| Vec::new());
        }
        let bytes = self.info_bytes(info)?;
        let mut out = Vec::new();
        out.try_reserve_exact(info.n_elements).map_err(|_| {
            Error::invalid("gguf", format!("cannot allocate {} f32 values for tensor `{}`", info.n_elements, info.name))
        })?;
        out.resize(info.n_elements, 0.0);
        types::dequantize(info.ggml_type, &info.name, bytes, &mut out)?;
        Ok(out)
    }
}
