//! GGUF reader: hand-built files (a small writer below) with F32/F16/BF16/Q8_0/Q4_0/Q4_1
//! tensors whose dequantised values are worked out by hand, metadata of every value type,
//! every truncation and a catalogue of corrupt fields, a byte-mutation property test that
//! also bounds the largest allocation parsing may make, and checks on the real SmolLM2 file
//! when scripts/fetch-assets.sh has fetched it.

mod common;

use proptest::prelude::*;
use sparsegrad::io::gguf::{GgmlType, GgufArray, GgufFile, GgufValue};
use sparsegrad::model::config::LlamaConfig;
use sparsegrad::model::weights::LlamaWeights;
use sparsegrad::Error;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::PathBuf;

// ---------------------------------------------------------------------------------------
// Allocation tracking: the largest single allocation made on this thread while tracking.

struct Tracking;

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
    static MAX_ALLOC: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = TRACK.try_with(|t| {
        if t.get() {
            let _ = MAX_ALLOC.try_with(|m| m.set(m.get().max(size)));
        }
    });
}

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        note(new);
        System.realloc(p, l, new)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static GLOBAL: Tracking = Tracking;

/// Runs `f`, returning its result and the largest allocation it made on this thread.
fn max_alloc_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    MAX_ALLOC.with(|m| m.set(0));
    TRACK.with(|t| t.set(true));
    let r = f();
    TRACK.with(|t| t.set(false));
    (r, MAX_ALLOC.with(|m| m.get()))
}

// ---------------------------------------------------------------------------------------
// A minimal GGUF writer.

const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STR: u32 = 8;
const T_ARR: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

fn gstr(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

/// An encoded array value: element type, count, then the encoded elements.
fn garr(elem: u32, count: u64, elems: &[u8]) -> Vec<u8> {
    let mut v = elem.to_le_bytes().to_vec();
    v.extend_from_slice(&count.to_le_bytes());
    v.extend_from_slice(elems);
    v
}

struct Tensor {
    name: String,
    ne: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
}

/// Where fields landed in the built file, for the corruption tests.
#[derive(Default, Debug)]
struct Layout_ {
    tensor_count: usize,
    kv_count: usize,
    /// Per key: position of its value type, and of its value.
    kv_type: Vec<usize>,
    kv_value: Vec<usize>,
    /// Per tensor: position of n_dims, of ne[0], of the ggml type and of the offset.
    n_dims: Vec<usize>,
    ne0: Vec<usize>,
    ty: Vec<usize>,
    offset: Vec<usize>,
    data_start: usize,
}

#[derive(Default)]
struct Builder {
    version: u32,
    alignment: usize,
    kvs: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<Tensor>,
}

impl Builder {
    fn new() -> Self {
        Builder { version: 3, alignment: 32, ..Default::default() }
    }
    fn kv(mut self, key: &str, ty: u32, value: Vec<u8>) -> Self {
        self.kvs.push((key.into(), ty, value));
        self
    }
    fn tensor(mut self, name: &str, ne: &[u64], ty: u32, data: Vec<u8>) -> Self {
        self.tensors.push(Tensor { name: name.into(), ne: ne.to_vec(), ty, data });
        self
    }
    /// The file, with tensor data packed at aligned offsets and nothing after the last one.
    fn build(&self) -> (Vec<u8>, Layout_) {
        let mut b = Vec::new();
        let mut lay = Layout_::default();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&self.version.to_le_bytes());
        lay.tensor_count = b.len();
        b.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        lay.kv_count = b.len();
        b.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for (k, t, v) in &self.kvs {
            b.extend_from_slice(&gstr(k));
            lay.kv_type.push(b.len());
            b.extend_from_slice(&t.to_le_bytes());
            lay.kv_value.push(b.len());
            b.extend_from_slice(v);
        }
        let mut off = 0usize;
        let mut offsets = Vec::new();
        for t in &self.tensors {
            b.extend_from_slice(&gstr(&t.name));
            lay.n_dims.push(b.len());
            b.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
            lay.ne0.push(b.len());
            t.ne.iter().for_each(|d| b.extend_from_slice(&d.to_le_bytes()));
            lay.ty.push(b.len());
            b.extend_from_slice(&t.ty.to_le_bytes());
            lay.offset.push(b.len());
            b.extend_from_slice(&(off as u64).to_le_bytes());
            offsets.push(off);
            off = (off + t.data.len()).next_multiple_of(self.alignment);
        }
        if !self.tensors.is_empty() {
            b.resize(b.len().next_multiple_of(self.alignment), 0);
        }
        lay.data_start = b.len();
        for (t, o) in self.tensors.iter().zip(offsets) {
            b.resize(lay.data_start + o, 0);
            b.extend_from_slice(&t.data);
        }
        (b, lay)
    }
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

// Hand-made tensor data. f16 bit patterns: 0.5 = 0x3800, -1.25 = 0xBD00, 2.0 = 0x4000,
// 65504 = 0x7BFF, 0.25 = 0x3400, -1.0 = 0xBC00. bf16: 1.0 = 0x3F80, -2.5 = 0xC020,
// 0.15625 = 0x3E20.

fn le16(v: &[u16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Two Q8_0 blocks: d = 0.5 then d = 2.0; q = j - 16 (first) and 15 - j (second).
fn q8_0_data() -> (Vec<u8>, Vec<f32>) {
    let mut b = Vec::new();
    let mut want = Vec::new();
    for (d_bits, d, f) in [(0x3800u16, 0.5f32, (|j: i32| j - 16) as fn(i32) -> i32), (0x4000, 2.0, |j| 15 - j)] {
        b.extend_from_slice(&d_bits.to_le_bytes());
        for j in 0..32 {
            b.push(f(j) as i8 as u8);
            want.push(f(j) as f32 * d);
        }
    }
    (b, want)
}

/// One Q4_1 block: d = 0.25, m = -1.0; byte j holds low nibble j (element j) and high
/// nibble 15 - j (element j + 16).
fn q4_1_data() -> (Vec<u8>, Vec<f32>) {
    let mut b = le16(&[0x3400, 0xBC00]);
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let mut want: Vec<f32> = (0..16).map(|j| j as f32 * 0.25 - 1.0).collect();
    want.extend((0..16).map(|j| (15 - j) as f32 * 0.25 - 1.0));
    (b, want)
}

/// One Q4_0 block: d = 2.0; byte j holds low nibble j and high nibble (j + 3) % 16; y = d (q - 8).
fn q4_0_data() -> (Vec<u8>, Vec<f32>) {
    let mut b = le16(&[0x4000]);
    b.extend((0..16u8).map(|j| j | (((j + 3) % 16) << 4)));
    let mut want: Vec<f32> = (0..16).map(|j| (j as f32 - 8.0) * 2.0).collect();
    want.extend((0..16).map(|j| (((j + 3) % 16) as f32 - 8.0) * 2.0));
    (b, want)
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A file with one tensor of each supported type and metadata of every value type.
fn full_builder() -> Builder {
    let nested = {
        let mut inner = Vec::new();
        inner.extend(garr(T_U16, 2, &le16(&[7, 8])));
        inner.extend(garr(T_U16, 1, &le16(&[9])));
        garr(T_ARR, 2, &inner)
    };
    Builder::new()
        .kv("general.architecture", T_STR, gstr("llama"))
        .kv("k.u8", T_U8, vec![200])
        .kv("k.i8", T_I8, vec![(-5i8) as u8])
        .kv("k.u16", T_U16, 60000u16.to_le_bytes().to_vec())
        .kv("k.i16", T_I16, (-30000i16).to_le_bytes().to_vec())
        .kv("k.u32", T_U32, 4_000_000_000u32.to_le_bytes().to_vec())
        .kv("k.i32", T_I32, (-7i32).to_le_bytes().to_vec())
        .kv("k.f32", T_F32, 1.5f32.to_le_bytes().to_vec())
        .kv("k.bool", T_BOOL, vec![1])
        .kv("k.str", T_STR, gstr("héllo"))
        .kv("k.u64", T_U64, (1u64 << 40).to_le_bytes().to_vec())
        .kv("k.i64", T_I64, (-(1i64 << 40)).to_le_bytes().to_vec())
        .kv("k.f64", T_F64, 0.1f64.to_le_bytes().to_vec())
        .kv("k.arr_i32", T_ARR, garr(T_I32, 3, &[1i32, -2, 3].iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>()))
        .kv("k.arr_str", T_ARR, garr(T_STR, 2, &[gstr("a b"), gstr("")].concat()))
        .kv("k.arr_u8", T_ARR, garr(T_U8, 0, &[]))
        .kv("k.arr_nested", T_ARR, nested)
        .tensor("f32", &[3, 2], 0, f32s(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
        .tensor("f16", &[4], 1, le16(&[0x3800, 0xBD00, 0x4000, 0x7BFF]))
        .tensor("bf16", &[3], 30, le16(&[0x3F80, 0xC020, 0x3E20]))
        .tensor("q8_0", &[32, 2], 8, q8_0_data().0)
        .tensor("q4_1", &[32], 3, q4_1_data().0)
        .tensor("q4_0", &[32, 1], 2, q4_0_data().0)
        .tensor("q6_k", &[256], 14, vec![0u8; 210])
}

fn full_file() -> Vec<u8> {
    full_builder().build().0
}

fn assert_format_err<T: std::fmt::Debug>(r: Result<T, Error>, needle: &str) {
    match r {
        Err(Error::Format { msg, .. }) => assert!(msg.contains(needle), "message `{msg}` lacks `{needle}`"),
        other => panic!("expected a Format error containing `{needle}`, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------

#[test]
fn dequantises_every_supported_type_by_hand() {
    let f = GgufFile::from_bytes(full_file()).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.data_offset() % 32, 0);

    let (v, s) = f.tensor_f32("f32").unwrap();
    assert_eq!((v, s), (vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], vec![2, 3]), "ne [3, 2] is row-major (2, 3)");
    assert_eq!(f.tensor_info("f32").unwrap().ne, vec![3, 2]);
    assert_eq!(f.tensor_f32("f16").unwrap(), (vec![0.5, -1.25, 2.0, 65504.0], vec![4]));
    assert_eq!(f.tensor_f32("bf16").unwrap(), (vec![1.0, -2.5, 0.15625], vec![3]));

    let (v, s) = f.tensor_f32("q8_0").unwrap();
    assert_eq!(s, vec![2, 32]);
    assert_eq!(v, q8_0_data().1);
    assert_eq!((v[0], v[31], v[32], v[63]), (-8.0, 7.5, 30.0, -32.0));

    let (v, s) = f.tensor_f32("q4_1").unwrap();
    assert_eq!(s, vec![32]);
    assert_eq!(v, q4_1_data().1);
    // Low nibbles are elements 0..16, high nibbles 16..32.
    assert_eq!((v[0], v[15], v[16], v[31]), (-1.0, 2.75, 2.75, -1.0));

    let (v, s) = f.tensor_f32("q4_0").unwrap();
    assert_eq!(s, vec![1, 32]);
    assert_eq!(v, q4_0_data().1);
    assert_eq!((v[0], v[16], v[31]), (-16.0, -10.0, -12.0));

    assert_eq!(f.tensor_f32_shaped("q8_0", &[2, 32]).unwrap().len(), 64);
    assert!(matches!(f.tensor_f32_shaped("q8_0", &[32, 2]), Err(Error::Shape { .. })));
}

#[test]
fn unsupported_and_missing_tensors_are_clear_errors() {
    let f = GgufFile::from_bytes(full_file()).unwrap();
    let info = f.tensor_info("q6_k").unwrap();
    assert_eq!((info.ggml_type, info.n_bytes, info.n_elements), (GgmlType::Q6_K, 210, 256));
    let err = f.tensor_f32("q6_k").unwrap_err();
    assert!(matches!(err, Error::Dtype { .. }), "{err:?}");
    assert!(err.to_string().contains("unsupported ggml type Q6_K"), "{err}");
    assert_eq!(f.tensor_bytes("q6_k").unwrap().len(), 210);
    let err = f.tensor_f32("nope").unwrap_err();
    assert!(matches!(&err, Error::MissingTensor { name, .. } if name == "nope"), "{err:?}");
}

#[test]
fn metadata_of_every_type() {
    let f = GgufFile::from_bytes(full_file()).unwrap();
    assert_eq!(f.metadata().len(), 17);
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.get("k.u8"), Some(&GgufValue::U8(200)));
    assert_eq!(f.get("k.i8"), Some(&GgufValue::I8(-5)));
    assert_eq!(f.get("k.u16"), Some(&GgufValue::U16(60000)));
    assert_eq!(f.get("k.i16"), Some(&GgufValue::I16(-30000)));
    assert_eq!(f.get("k.i32"), Some(&GgufValue::I32(-7)));
    assert_eq!(f.get("k.i64"), Some(&GgufValue::I64(-(1 << 40))));
    assert_eq!(f.get("k.f64"), Some(&GgufValue::F64(0.1)));
    assert_eq!(f.get_u32("k.u32").unwrap(), 4_000_000_000);
    assert_eq!(f.get_u32("k.u8").unwrap(), 200, "small integers of any width are accepted");
    assert_eq!(f.get_u64("k.u64").unwrap(), 1 << 40);
    assert_eq!(f.get_i64("k.i32").unwrap(), -7);
    assert_eq!(f.get_f32("k.f32").unwrap(), 1.5);
    assert_eq!(f.get_f32("k.f64").unwrap(), 0.1f32);
    assert!(f.get_bool("k.bool").unwrap());
    assert_eq!(f.get_str("k.str").unwrap(), "héllo");
    assert_eq!(f.get_i32_array("k.arr_i32").unwrap(), &[1, -2, 3]);
    assert_eq!(f.get_str_array("k.arr_str").unwrap(), &["a b".to_string(), String::new()]);
    assert_eq!(f.get("k.arr_u8"), Some(&GgufValue::Array(GgufArray::U8(vec![]))));
    assert_eq!(
        f.get("k.arr_nested"),
        Some(&GgufValue::Array(GgufArray::Array(vec![GgufArray::U16(vec![7, 8]), GgufArray::U16(vec![9])])))
    );
    assert_eq!(f.optional_u32("absent").unwrap(), None);
    assert_eq!(f.optional_str("k.str").unwrap(), Some("héllo"));

    let meta_err = |r: Result<_, Error>, key: &str, needle: &str| match r {
        Err(Error::Metadata { key: k, msg }) => {
            assert_eq!(k, key);
            assert!(msg.contains(needle), "`{msg}` lacks `{needle}`");
        }
        other => panic!("expected a Metadata error for {key}, got {other:?}"),
    };
    meta_err(f.get_u32("absent").map(|_| ()), "absent", "missing");
    meta_err(f.get_u32("k.i32").map(|_| ()), "k.i32", "does not fit in u32");
    meta_err(f.get_u32("k.u64").map(|_| ()), "k.u64", "does not fit in u32");
    meta_err(f.get_str("k.u32").map(|_| ()), "k.u32", "expected string, found u32");
    meta_err(f.get_f32("k.str").map(|_| ()), "k.str", "expected f32, found string");
    meta_err(f.get_i32_array("k.arr_str").map(|_| ()), "k.arr_str", "expected array of i32, found array of string");
    meta_err(f.get_str_array("k.arr_i32").map(|_| ()), "k.arr_i32", "found array of i32");
    meta_err(f.optional_bool("k.u8").map(|_| ()), "k.u8", "expected bool");
}

#[test]
fn version_2_alignment_and_empty_files_parse() {
    let mut b = Builder::new().kv("general.alignment", T_U32, 64u32.to_le_bytes().to_vec());
    b.version = 2;
    b.alignment = 64;
    let b = b.tensor("a", &[3], 0, f32s(&[1.0, 2.0, 3.0])).tensor("b", &[2], 0, f32s(&[4.0, 5.0]));
    let (bytes, lay) = b.build();
    let f = GgufFile::parse(&bytes).unwrap();
    assert_eq!((f.version(), f.alignment(), f.data_offset()), (2, 64, lay.data_start));
    assert_eq!(lay.data_start % 64, 0);
    assert_eq!(f.tensor_info("b").unwrap().offset, 64);
    assert_eq!(f.tensor_f32("b").unwrap().0, vec![4.0, 5.0]);
    // No tensors, no metadata: just the 24-byte header.
    let f = GgufFile::parse(&Builder::new().build().0).unwrap();
    assert!(f.tensor_infos().is_empty() && f.metadata().is_empty());
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = full_file();
    for n in 0..bytes.len() {
        let r = GgufFile::parse(&bytes[..n]);
        assert!(matches!(r, Err(Error::Format { .. })), "prefix of {n} bytes: {r:?}");
    }
    assert!(GgufFile::parse(&bytes).is_ok());
}

#[test]
fn corrupt_header_fields() {
    let (good, lay) = full_builder().build();
    let corrupt = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        GgufFile::from_bytes(b)
    };
    assert_format_err(corrupt(&|b| b[0] = b'X'), "not a GGUF file");
    assert_format_err(corrupt(&|b| put_u32(b, 4, 1)), "version 1");
    assert_format_err(corrupt(&|b| put_u32(b, 4, 7)), "unsupported version 7");
    assert_format_err(corrupt(&|b| put_u32(b, 4, 3u32.swap_bytes())), "big-endian");
    assert_format_err(corrupt(&|b| put_u64(b, lay.tensor_count, u64::MAX)), "tensor count");
    assert_format_err(corrupt(&|b| put_u64(b, lay.kv_count, 1 << 60)), "key/value count");
    // Key 0's string length, just before its value type, claims far more than the file.
    let key_len_at = lay.kv_type[0] - 8 - "general.architecture".len();
    assert_format_err(corrupt(&|b| put_u64(b, key_len_at, u64::MAX / 2)), "remain");
    assert_format_err(corrupt(&|b| put_u32(b, lay.kv_type[1], 13)), "unknown GGUF value type 13");
    // k.bool is key 8; a bool byte must be 0 or 1.
    assert_format_err(corrupt(&|b| b[lay.kv_value[8]] = 2), "neither 0 nor 1");
    // k.arr_i32 is key 13: its count (after the element type) claims 2^62 elements.
    assert_format_err(corrupt(&|b| put_u64(b, lay.kv_value[13] + 4, 1 << 62)), "cannot fit");
    // k.arr_str's first string length is enormous.
    assert_format_err(corrupt(&|b| put_u64(b, lay.kv_value[14] + 12, u64::MAX)), "remain");
    // The second key renamed to the first: a duplicate.
    let dup = {
        let b = Builder::new().kv("a", T_U8, vec![1]).kv("a", T_U8, vec![2]);
        GgufFile::parse(&b.build().0)
    };
    assert_format_err(dup, "appears twice");
    let bad_utf8 = GgufFile::parse(
        &Builder::new()
            .kv("\u{7f}", T_U8, vec![1])
            .build()
            .0
            .iter()
            .map(|&c| if c == 0x7f { 0xff } else { c })
            .collect::<Vec<_>>(),
    );
    assert_format_err(bad_utf8, "not valid UTF-8");
}

#[test]
fn corrupt_tensor_fields() {
    let (good, lay) = full_builder().build();
    let corrupt = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        GgufFile::from_bytes(b)
    };
    // Tensor 0 is "f32" (ne [3, 2]), 3 is "q8_0" (ne [32, 2]).
    assert_format_err(corrupt(&|b| put_u32(b, lay.n_dims[0], 5)), "at most 4");
    assert_format_err(corrupt(&|b| put_u64(b, lay.ne0[0], 1 << 63)), "beyond any real tensor");
    assert_format_err(
        corrupt(&|b| {
            put_u64(b, lay.ne0[0], 1 << 40);
            put_u64(b, lay.ne0[0] + 8, 1 << 40);
        }),
        "overflow",
    );
    assert_format_err(corrupt(&|b| put_u64(b, lay.ne0[3], 33)), "not a multiple of the Q8_0 block size 32");
    assert_format_err(corrupt(&|b| put_u32(b, lay.ty[0], 4)), "unknown ggml type id 4");
    assert_format_err(corrupt(&|b| put_u32(b, lay.ty[0], 99)), "unknown ggml type id 99");
    assert_format_err(corrupt(&|b| put_u64(b, lay.offset[1], 8)), "not a multiple of the alignment");
    assert_format_err(corrupt(&|b| put_u64(b, lay.offset[1], 1 << 20)), "run past the end");
    assert_format_err(corrupt(&|b| put_u64(b, lay.offset[1], u64::MAX - 31)), "run past the end");
    // A tensor larger than its data: the Q6_K tensor (6) claims 1000 blocks, not one.
    assert_format_err(corrupt(&|b| put_u64(b, lay.ne0[6], 256 * 1000)), "run past the end");
    let dup = Builder::new().tensor("t", &[1], 0, f32s(&[1.0])).tensor("t", &[1], 0, f32s(&[2.0]));
    assert_format_err(GgufFile::parse(&dup.build().0), "appears twice");
}

#[test]
fn bad_alignment_is_a_metadata_error() {
    for v in [0u32, 3, 48] {
        let b = Builder::new().kv("general.alignment", T_U32, v.to_le_bytes().to_vec());
        assert!(
            matches!(GgufFile::parse(&b.build().0), Err(Error::Metadata { key, .. }) if key == "general.alignment"),
            "alignment {v}"
        );
    }
    let b = Builder::new().kv("general.alignment", T_U64, 32u64.to_le_bytes().to_vec());
    assert!(matches!(GgufFile::parse(&b.build().0), Err(Error::Metadata { .. })));
}

#[test]
fn deep_nesting_is_refused_without_overflowing_the_stack() {
    // 100k levels of array-of-array would overflow the stack of a naive recursive parser.
    let mut v = garr(T_U8, 0, &[]);
    for _ in 0..100_000 {
        v = garr(T_ARR, 1, &v);
    }
    assert_format_err(GgufFile::parse(&Builder::new().kv("deep", T_ARR, v).build().0), "nested deeper");
}

#[test]
fn from_path_and_io_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    std::fs::write(&p, full_file()).unwrap();
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.path(), Some(p.as_path()));
    assert_eq!(f.tensor_f32("q4_1").unwrap().0, q4_1_data().1);
    std::fs::write(&p, &full_file()[..100]).unwrap();
    let err = GgufFile::open(&p).unwrap_err();
    assert!(err.to_string().contains("m.gguf"), "errors name the file: {err}");
    assert!(matches!(GgufFile::open(dir.path().join("absent.gguf")), Err(Error::Io { .. })));
    assert!(matches!(GgufFile::open(dir.path()), Err(Error::Format { .. } | Error::Io { .. })));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random byte changes and truncations never panic, and parsing plus dequantising
    /// never allocates more than a small multiple of the file size.
    #[test]
    fn mutated_files_never_panic_or_allocate_absurdly(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        wide in proptest::option::of((any::<prop::sample::Index>(), any::<u64>())),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let mut b = full_file();
        for (i, v) in &edits {
            let i = i.index(b.len());
            b[i] = *v;
        }
        // Whole 8-byte values hit counts, lengths and offsets far more often than single bytes.
        if let Some((i, v)) = wide {
            let i = i.index(b.len() - 8);
            b[i..i + 8].copy_from_slice(&v.to_le_bytes());
        }
        if let Some(c) = cut {
            b.truncate(c.index(b.len()));
        }
        let len = b.len();
        let (_, max) = max_alloc_during(|| {
            if let Ok(f) = GgufFile::parse(&b) {
                for t in f.tensor_infos() {
                    let _ = f.tensor_f32(&t.name);
                }
                let _ = LlamaConfig::from_gguf(&f);
            }
        });
        prop_assert!(max <= 16 * len + (1 << 20), "largest allocation {max} bytes for a {len}-byte file");
    }
}

// ---------------------------------------------------------------------------------------
// The real model, when fetched.

fn real_model() -> Option<PathBuf> {
    let p = common::assets::path(common::assets::SMOLLM_GGUF);
    common::assets::present(&[&p]).then_some(p)
}

#[test]
fn real_smollm2_config_and_tensors() {
    let Some(path) = real_model() else { return };
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version(), 3);
    let c = LlamaConfig::from_gguf(&f).unwrap();
    let want = LlamaConfig {
        hidden: 576,
        ffn: 1536,
        layers: 30,
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        rope_theta: 100_000.0,
        rope_scaling: None,
        rms_eps: 1e-5,
        vocab: 49152,
        tied_embeddings: true,
        max_seq: 8192,
        bos: Some(1),
        eos: Some(2),
    };
    assert_eq!(c, want);
    assert_eq!(f.tensor_infos().len(), 2 + 30 * 9);
    assert_eq!(f.tensor_info("token_embd.weight").unwrap().ggml_type, GgmlType::Q8_0);
    assert!(!f.contains_tensor("output.weight"));
    for i in 0..30 {
        let norm = format!("blk.{i}.attn_norm.weight");
        let info = f.tensor_info(&norm).unwrap();
        assert_eq!((info.ggml_type, info.shape()), (GgmlType::F32, vec![576]));
        // F32 tensors come back exactly as stored.
        let raw: Vec<f32> =
            f.tensor_bytes(&norm).unwrap().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(f.tensor_f32(&norm).unwrap().0, raw);
        for (name, shape) in [
            ("attn_q", [576, 576]),
            ("attn_k", [192, 576]),
            ("attn_v", [192, 576]),
            ("attn_output", [576, 576]),
            ("ffn_gate", [1536, 576]),
            ("ffn_up", [1536, 576]),
            ("ffn_down", [576, 1536]),
        ] {
            let info = f.tensor_info(&format!("blk.{i}.{name}.weight")).unwrap();
            assert_eq!((info.ggml_type, info.shape()), (GgmlType::Q4_1, shape.to_vec()), "blk.{i}.{name}");
        }
    }
    let w = LlamaWeights::from_gguf(&f).unwrap();
    assert_eq!(w.layers.len(), 30);
    assert_eq!(w.embed.len(), 49152 * 576);
    assert!(w.lm_head.is_none());
    assert_eq!(w.final_norm, f.tensor_f32("output_norm.weight").unwrap().0);
    for l in &w.layers {
        assert!(l.gate.iter().chain(&l.q).chain(&w.embed).all(|x| x.is_finite()));
    }
    // Un-permuting only reorders rows of Q: the multiset of row sums is unchanged.
    let mut a: Vec<f32> = f.tensor_f32("blk.0.attn_q.weight").unwrap().0.chunks(576).map(|r| r.iter().sum()).collect();
    let mut b: Vec<f32> = w.layers[0].q.chunks(576).map(|r| r.iter().sum()).collect();
    a.sort_by(f32::total_cmp);
    b.sort_by(f32::total_cmp);
    assert_eq!(a, b);
}
