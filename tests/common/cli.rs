//! Shared by the command-line tests: safetensors inputs built here, the `sparsegrad`
//! binary run as a process, and the check every failing run must pass (non-zero exit,
//! one `error:` line naming the problem, the directory untouched).

use super::{rand_vec, random_orthogonal, rng, to32};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;
use std::process::{Command, Output};

// ---------------------------------------------------------------- files and processes

pub type Entry = (String, Dtype, Vec<usize>, Vec<u8>);

pub fn f32_entry(name: &str, shape: &[usize], v: &[f32]) -> Entry {
    (name.to_string(), Dtype::F32, shape.to_vec(), v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

pub fn write_st(path: &Path, tensors: &[Entry], meta: &[(String, String)]) {
    let views: Vec<(String, TensorView<'_>)> =
        tensors.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).expect("view"))).collect();
    let meta: HashMap<String, String> = meta.iter().cloned().collect();
    let bytes = safetensors::serialize(views, if meta.is_empty() { None } else { Some(meta) }).expect("serialize");
    fs::write(path, bytes).expect("write input");
}

/// Tensors (dtype, shape, raw bytes) and metadata of a file.
pub struct StFile {
    pub tensors: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
    pub meta: HashMap<String, String>,
}

impl StFile {
    pub fn read(path: &Path) -> StFile {
        let bytes = fs::read(path).expect("read output");
        let st = SafeTensors::deserialize(&bytes).expect("valid safetensors");
        let tensors =
            st.tensors().into_iter().map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect();
        let (_, header) = SafeTensors::read_metadata(&bytes).expect("header");
        StFile { tensors, meta: header.metadata().clone().unwrap_or_default() }
    }
    pub fn f32(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let (d, s, b) = self.tensors.get(name).unwrap_or_else(|| panic!("output lacks `{name}`"));
        assert_eq!(*d, Dtype::F32, "{name} dtype");
        (s.clone(), b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
    }
    pub fn i64(&self, name: &str) -> (Vec<usize>, Vec<i64>) {
        let (d, s, b) = self.tensors.get(name).unwrap_or_else(|| panic!("output lacks `{name}`"));
        assert_eq!(*d, Dtype::I64, "{name} dtype");
        (s.clone(), b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect())
    }
}

pub fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sparsegrad")).args(args).output().expect("spawn sparsegrad")
}

pub fn run_ok(args: &[&str]) -> Output {
    let o = run(args);
    assert!(o.status.success(), "sparsegrad {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    o
}

/// Names and contents of every file in `dir`.
pub fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .expect("list dir")
        .map(|e| {
            let e = e.unwrap();
            let bytes = if e.path().is_file() { fs::read(e.path()).unwrap() } else { b"<dir>".to_vec() };
            (e.file_name().to_string_lossy().into_owned(), bytes)
        })
        .collect()
}

/// Runs a command that must fail: non-zero exit, exactly one `error: ` line on stderr
/// containing every needle, nothing changed in `dir`.
pub fn expect_failure(dir: &Path, args: &[&str], needles: &[&str]) {
    let before = snapshot(dir);
    let o = run(args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "sparsegrad {args:?} succeeded; expected an error containing {needles:?}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "stderr must be exactly one line for {args:?}, got: {stderr:?}");
    assert!(lines[0].starts_with("error: "), "stderr must start with `error: `: {stderr:?}");
    for n in needles {
        assert!(lines[0].contains(n), "error for {args:?} should mention {n:?}: {stderr:?}");
    }
    assert_eq!(snapshot(dir), before, "directory changed by failing {args:?} ({stderr:?})");
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

// ---------------------------------------------------------------- step inputs

pub struct StepInputs {
    pub out: usize,
    pub inp: usize,
    pub t: usize,
    pub w: Vec<f32>,
    pub b: Option<Vec<f32>>,
    pub p: Vec<f32>,
    pub q: Vec<f32>,
    pub x: Vec<f32>,
    pub g: Vec<f32>,
    pub meta: Vec<(String, String)>,
}

impl StepInputs {
    pub fn new(seed: u64, out: usize, inp: usize, t: usize, bias: bool) -> Self {
        let mut r = rng(seed);
        let w = rand_vec(&mut r, out * inp);
        let b = bias.then(|| rand_vec(&mut r, out));
        let p = to32(&random_orthogonal(&mut r, out));
        let q = to32(&random_orthogonal(&mut r, inp));
        let x = rand_vec(&mut r, t * inp);
        let g = rand_vec(&mut r, t * out);
        let mut me = StepInputs { out, inp, t, w, b, p, q, x, g, meta: Vec::new() };
        for (k, v) in [
            ("keep", "3"),
            ("selection", "exact"),
            ("lr", "0.05"),
            ("beta1", "0.9"),
            ("beta2", "0.999"),
            ("eps", "1e-8"),
            ("steps", "1"),
        ] {
            me.set(k, v);
        }
        me
    }

    pub fn set(&mut self, key: &str, value: &str) -> &mut Self {
        self.meta.retain(|(k, _)| k != key);
        self.meta.push((key.to_string(), value.to_string()));
        self
    }

    pub fn unset(&mut self, key: &str) -> &mut Self {
        self.meta.retain(|(k, _)| k != key);
        self
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.meta.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub fn entries(&self) -> Vec<Entry> {
        let (o, i, t) = (self.out, self.inp, self.t);
        let mut e = vec![
            f32_entry("weight", &[o, i], &self.w),
            f32_entry("P", &[o, o], &self.p),
            f32_entry("Q", &[i, i], &self.q),
            f32_entry("x", &[t, i], &self.x),
            f32_entry("grad_y", &[t, o], &self.g),
        ];
        if let Some(b) = &self.b {
            e.push(f32_entry("bias", &[o], b));
        }
        e
    }

    pub fn write(&self, path: &Path) {
        write_st(path, &self.entries(), &self.meta);
    }

    /// Writes the inputs after `edit` changed the tensor list.
    pub fn write_with(&self, path: &Path, edit: impl FnOnce(&mut Vec<Entry>)) {
        let mut e = self.entries();
        edit(&mut e);
        write_st(path, &e, &self.meta);
    }
}

/// Rewrites the JSON header of the safetensors file at `path` with `edit` (the data
/// section is kept, so offsets stay valid unless `edit` changes them): inputs the
/// `safetensors` writer would never produce.
pub fn edit_header(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let bytes = fs::read(path).expect("read input");
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("header JSON");
    edit(&mut header);
    let mut h = serde_json::to_vec(&header).unwrap();
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend_from_slice(&bytes[8 + n..]);
    fs::write(path, out).expect("write input");
}
