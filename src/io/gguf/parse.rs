//! Parsing of a GGUF header: magic, version, metadata key/values and the tensor table,
//! then the placement of the aligned data section and of every tensor inside it.
//!
//! Everything is read through [`Cursor`], which checks each read against the bytes that
//! remain. Counts (array lengths, numbers of keys and tensors) are checked *before* any
//! allocation: `count * smallest possible encoded size` must fit in what remains, so a
//! corrupt count fails with an error instead of asking for terabytes. Nested arrays are
//! limited in depth, so a crafted file cannot overflow the stack.

use super::types::GgmlType;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::Path;

/// GGUF's `GGML_MAX_DIMS`.
pub(crate) const MAX_DIMS: usize = 4;
/// Arrays of arrays deeper than this are rejected (ggml itself writes none).
const MAX_ARRAY_DEPTH: usize = 4;
/// `general.alignment` when the file does not set it.
pub(crate) const DEFAULT_ALIGNMENT: usize = 32;

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(GgufArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array: GGUF arrays hold one element type, so they are stored typed.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<GgufArray>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

/// GGUF value type names, indexed by the type id of the file format.
const TYPE_NAMES: [&str; 13] =
    ["u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64"];
const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;

/// Smallest encoded size of a value of type `t`: fixed-size types take their size, a
/// string at least its 8-byte length, an array at least its type and count.
fn min_size(t: u32) -> usize {
    match t {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        TYPE_STRING => 8,
        TYPE_ARRAY => 12,
        _ => 8,
    }
}

impl GgufValue {
    /// The GGUF type name (`"u32"`, `"array of string"`), for error messages.
    pub fn type_name(&self) -> String {
        match self {
            GgufValue::U8(_) => "u8".into(),
            GgufValue::I8(_) => "i8".into(),
            GgufValue::U16(_) => "u16".into(),
            GgufValue::I16(_) => "i16".into(),
            GgufValue::U32(_) => "u32".into(),
            GgufValue::I32(_) => "i32".into(),
            GgufValue::F32(_) => "f32".into(),
            GgufValue::Bool(_) => "bool".into(),
            GgufValue::String(_) => "string".into(),
            GgufValue::Array(a) => a.type_name(),
            GgufValue::U64(_) => "u64".into(),
            GgufValue::I64(_) => "i64".into(),
            GgufValue::F64(_) => "f64".into(),
        }
    }

    /// The value as an integer, if it is one of the integer types.
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(v) => v.into(),
            GgufValue::I8(v) => v.into(),
            GgufValue::U16(v) => v.into(),
            GgufValue::I16(v) => v.into(),
            GgufValue::U32(v) => v.into(),
            GgufValue::I32(v) => v.into(),
            GgufValue::U64(v) => v.into(),
            GgufValue::I64(v) => v.into(),
            _ => return None,
        })
    }
}

impl GgufArray {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::String(v) => v.len(),
            GgufArray::Array(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `"array of <element type>"`.
    pub fn type_name(&self) -> String {
        let elem = match self {
            GgufArray::Array(v) => {
                return format!("array of {}", v.first().map(|a| a.type_name()).unwrap_or_else(|| "array".into()))
            }
            GgufArray::U8(_) => 0,
            GgufArray::I8(_) => 1,
            GgufArray::U16(_) => 2,
            GgufArray::I16(_) => 3,
            GgufArray::U32(_) => 4,
            GgufArray::I32(_) => 5,
            GgufArray::F32(_) => 6,
            GgufArray::Bool(_) => 7,
            GgufArray::String(_) => 8,
            GgufArray::U64(_) => 10,
            GgufArray::I64(_) => 11,
            GgufArray::F64(_) => 12,
        };
        format!("array of {}", TYPE_NAMES[elem])
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in GGUF order: `ne[0]` varies fastest (for a weight `(out, in)`,
    /// `ne = [in, out]`).
    pub ne: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section (a multiple of the alignment).
    pub offset: usize,
    pub n_elements: usize,
    pub n_bytes: usize,
}

impl TensorInfo {
    /// The shape in row-major order (slowest dimension first): `ne` reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.ne.iter().rev().copied().collect()
    }
}

/// A parsed header with every tensor placed inside the buffer it came from.
#[derive(Debug)]
pub(crate) struct Header {
    pub version: u32,
    pub metadata: Vec<(String, GgufValue)>,
    pub meta_index: HashMap<String, usize>,
    pub tensors: Vec<TensorInfo>,
    pub tensor_index: HashMap<String, usize>,
    pub alignment: usize,
    /// Absolute offset of the data section (which runs to the end of the buffer).
    pub data_start: usize,
}

/// Bounds-checked little-endian reader over the whole file.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: Option<&'a Path>,
}

impl<'a> Cursor<'a> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::format(self.path, format!("GGUF: {} (at byte {})", msg.into(), self.pos))
    }

    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        match self.pos.checked_add(n).and_then(|end| self.buf.get(self.pos..end)) {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => {
                Err(self.err(format!("{what} needs {n} bytes but only {} remain (truncated file?)", self.remaining())))
            }
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A u64 count of items each at least `min_item` bytes long, checked against what remains.
    fn count(&mut self, what: &str, min_item: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let fits = usize::try_from(n).ok().and_then(|n| n.checked_mul(min_item)).is_some_and(|b| b <= self.remaining());
        if !fits {
            return Err(self.err(format!(
                "{what} is {n}, but {n} items of at least {min_item} bytes cannot fit in the {} bytes that remain (corrupt count?)",
                self.remaining()
            )));
        }
        Ok(n as usize)
    }

    /// A GGUF string (u64 length + bytes).
    fn bytes_str(&mut self, what: &str) -> Result<&'a [u8]> {
        let n = self.u64(what)?;
        match usize::try_from(n) {
            Ok(n) if n <= self.remaining() => self.take(n, what),
            _ => Err(self
                .err(format!("{what} claims {n} bytes but only {} remain (truncated or corrupt)", self.remaining()))),
        }
    }

    /// A string that must be UTF-8 (keys and tensor names: they are looked up by name).
    fn name(&mut self, what: &str) -> Result<String> {
        let at = self.pos;
        let b = self.bytes_str(what)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| Error::format(self.path, format!("GGUF: {what} at byte {at} is not valid UTF-8")))
    }

    /// `n` fixed-size elements decoded by `f`; `n` was already checked by [`count`].
    fn vec<T, const N: usize>(&mut self, n: usize, what: &str, f: impl Fn([u8; N]) -> T) -> Result<Vec<T>> {
        let len = n.checked_mul(N).ok_or_else(|| self.err(format!("{what}: {n} elements overflow")))?;
        let bytes = self.take(len, what)?;
        Ok(bytes
            .chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                f(a)
            })
            .collect())
    }

    fn bool(&mut self, what: &str) -> Result<bool> {
        match self.array::<1>(what)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.err(format!("{what}: bool byte {b} is neither 0 nor 1"))),
        }
    }

    fn value_type(&mut self, what: &str) -> Result<u32> {
        let t = self.u32(what)?;
        if t as usize >= TYPE_NAMES.len() {
            return Err(self.err(format!("{what}: unknown GGUF value type {t}")));
        }
        Ok(t)
    }

    fn value(&mut self, t: u32, key: &str, depth: usize) -> Result<GgufValue> {
        let what = &format!("value of `{key}`");
        Ok(match t {
            0 => GgufValue::U8(self.array::<1>(what)?[0]),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(what)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array(what)?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => GgufValue::Bool(self.bool(what)?),
            TYPE_STRING => GgufValue::String(String::from_utf8_lossy(self.bytes_str(what)?).into_owned()),
            TYPE_ARRAY => GgufValue::Array(self.array_value(key, depth)?),
            10 => GgufValue::U64(u64::from_le_bytes(self.array(what)?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            _ => return Err(self.err(format!("{what}: unknown GGUF value type {t}"))),
        })
    }

    fn array_value(&mut self, key: &str, depth: usize) -> Result<GgufArray> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(self.err(format!("`{key}`: arrays nested deeper than {MAX_ARRAY_DEPTH} levels")));
        }
        let what = &format!("elements of array `{key}`");
        let t = self.value_type(&format!("element type of array `{key}`"))?;
        let n = self.count(&format!("length of array `{key}`"), min_size(t))?;
        Ok(match t {
            0 => GgufArray::U8(self.take(n, what)?.to_vec()),
            1 => GgufArray::I8(self.vec(n, what, i8::from_le_bytes)?),
            2 => GgufArray::U16(self.vec(n, what, u16::from_le_bytes)?),
            3 => GgufArray::I16(self.vec(n, what, i16::from_le_bytes)?),
            4 => GgufArray::U32(self.vec(n, what, u32::from_le_bytes)?),
            5 => GgufArray::I32(self.vec(n, what, i32::from_le_bytes)?),
            6 => GgufArray::F32(self.vec(n, what, f32::from_le_bytes)?),
            7 => GgufArray::Bool((0..n).map(|_| self.bool(what)).collect::<Result<_>>()?),
            TYPE_STRING => GgufArray::String(
                (0..n)
                    .map(|_| self.bytes_str(what).map(|b| String::from_utf8_lossy(b).into_owned()))
                    .collect::<Result<_>>()?,
            ),
            TYPE_ARRAY => GgufArray::Array((0..n).map(|_| self.array_value(key, depth + 1)).collect::<Result<_>>()?),
            10 => GgufArray::U64(self.vec(n, what, u64::from_le_bytes)?),
            11 => GgufArray::I64(self.vec(n, what, i64::from_le_bytes)?),
            12 => GgufArray::F64(self.vec(n, what, f64::from_le_bytes)?),
            _ => return Err(self.err(format!("{what}: unknown GGUF value type {t}"))),
        })
    }

    fn tensor_info(&mut self) -> Result<(String, Vec<usize>, GgmlType, u64)> {
        let name = self.name("tensor name")?;
        let n_dims = self.u32(&format!("number of dimensions of tensor `{name}`"))? as usize;
        if n_dims > MAX_DIMS {
            return Err(self.err(format!("tensor `{name}` has {n_dims} dimensions; GGUF allows at most {MAX_DIMS}")));
        }
        let mut ne = Vec::with_capacity(n_dims);
        for d in 0..n_dims {
            let v = self.u64(&format!("dimension {d} of tensor `{name}`"))?;
            // ggml keeps dimensions as int64_t; larger values are corrupt, not huge.
            let v = usize::try_from(v)
                .ok()
                .filter(|&v| v as u64 <= i64::MAX as u64)
                .ok_or_else(|| self.err(format!("dimension {d} of tensor `{name}` is {v}, beyond any real tensor")))?;
            ne.push(v);
        }
        let id = self.u32(&format!("ggml type of tensor `{name}`"))?;
        let ty =
            GgmlType::from_id(id).ok_or_else(|| self.err(format!("tensor `{name}` has unknown ggml type id {id}")))?;
        let offset = self.u64(&format!("data offset of tensor `{name}`"))?;
        Ok((name, ne, ty, offset))
    }
}

/// Parses the header of the GGUF file held in `buf` and places every tensor in it.
/// `path` only labels errors.
pub(crate) fn parse_header(buf: &[u8], path: Option<&Path>) -> Result<Header> {
    let mut c = Cursor { buf, pos: 0, path };
    let magic = c.array::<4>("magic")?;
    if &magic != b"GGUF" {
        return Err(c.err(format!("magic is {magic:02x?}, not \"GGUF\" (not a GGUF file)")));
    }
    let version = c.u32("version")?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(
                c.err("version 1 (32-bit counts) is not supported; reconvert the model with a current llama.cpp")
            )
        }
        v if v.swap_bytes() <= 3 => {
            return Err(c.err(format!("big-endian GGUF (version {}) is not supported", v.swap_bytes())))
        }
        v => return Err(c.err(format!("unsupported version {v} (expected 2 or 3)"))),
    }
    // Smallest tensor-table entry: name length, n_dims, one dimension, type, offset.
    let n_tensors = c.count("tensor count", 8 + 4 + 8 + 4 + 8)?;
    // Smallest key/value: key length, value type, one-byte value.
    let n_kv = c.count("metadata key/value count", 8 + 4 + 1)?;

    let mut metadata = Vec::new();
    let mut meta_index = HashMap::new();
    for _ in 0..n_kv {
        let key = c.name("metadata key")?;
        let t = c.value_type(&format!("type of `{key}`"))?;
        let value = c.value(t, &key, 0)?;
        if meta_index.insert(key.clone(), metadata.len()).is_some() {
            return Err(c.err(format!("metadata key `{key}` appears twice")));
        }
        metadata.push((key, value));
    }

    let alignment = match meta_index
        .get("general.alignment")
        .and_then(|&i| metadata.get(i))
        .map(|kv: &(String, GgufValue)| &kv.1)
    {
        None => DEFAULT_ALIGNMENT,
        Some(GgufValue::U32(a)) if *a != 0 && a.is_power_of_two() => *a as usize,
        Some(v) => {
            return Err(Error::Metadata {
                key: "general.alignment".into(),
                msg: format!(
                    "must be a u32 power of two, got {v:?}{}",
                    path.map(|p| format!(" in {}", p.display())).unwrap_or_default()
                ),
            })
        }
    };

    let mut raw = Vec::new();
    let mut tensor_index = HashMap::new();
    for _ in 0..n_tensors {
        let info = c.tensor_info()?;
        if tensor_index.insert(info.0.clone(), raw.len()).is_some() {
            return Err(c.err(format!("tensor `{}` appears twice in the tensor table", info.0)));
        }
        raw.push(info);
    }

    // The data section starts at the first aligned offset after the tensor table.
    let data_start = c.pos.checked_next_multiple_of(alignment).ok_or_else(|| c.err("data section offset overflows"))?;
    let data_len = buf.len().saturating_sub(data_start);
    if n_tensors > 0 && data_start > buf.len() {
        return Err(c.err(format!(
            "data section would start at byte {data_start}, past the end of the {}-byte file (truncated?)",
            buf.len()
        )));
    }

    let mut tensors = Vec::with_capacity(raw.len());
    for (name, ne, ty, offset) in raw {
        let bad = |msg: String| Error::format(path, format!("GGUF: tensor `{name}`: {msg}"));
        let n_elements = ne
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad(format!("dimensions {ne:?} overflow")))?;
        let bs = ty.block_size();
        // A tensor without dimensions is a scalar: one element.
        let ne0 = ne.first().copied().unwrap_or(1);
        if ne0 % bs != 0 {
            return Err(bad(format!("first dimension {ne0} is not a multiple of the {ty} block size {bs}")));
        }
        let n_bytes = (n_elements / bs)
            .checked_mul(ty.type_size())
            .ok_or_else(|| bad(format!("byte size of {ne:?} {ty} overflows")))?;
        let off = usize::try_from(offset).map_err(|_| bad(format!("data offset {offset} overflows")))?;
        if off % alignment != 0 {
            return Err(bad(format!("data offset {off} is not a multiple of the alignment {alignment}")));
        }
        if off.checked_add(n_bytes).is_none_or(|end| end > data_len) {
            return Err(bad(format!(
                "{n_bytes} bytes at data offset {off} run past the end of the {data_len}-byte data section (truncated file or corrupt offset)"
            )));
        }
        tensors.push(TensorInfo { name, ne, ggml_type: ty, offset: off, n_elements, n_bytes });
    }
    // Two tensors sharing bytes would silently alias each other's weights.
    let mut placed: Vec<&TensorInfo> = tensors.iter().filter(|t| t.n_bytes > 0).collect();
    placed.sort_by_key(|t| t.offset);
    for pair in placed.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if b.offset < a.offset + a.n_bytes {
            return Err(Error::format(
                path,
                format!(
                    "GGUF: tensor `{}` (bytes {}..{} of the data section) overlaps tensor `{}` (bytes {}..{})",
                    b.name,
                    b.offset,
                    b.offset + b.n_bytes,
                    a.name,
                    a.offset,
                    a.offset + a.n_bytes
                ),
            ));
        }
    }
    Ok(Header { version, metadata, meta_index, tensors, tensor_index, alignment, data_start })
}
