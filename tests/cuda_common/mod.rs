//! Helpers of the CUDA-vs-CPU tests (tests/cuda_*.rs).
//!
//! Every check is written once, generic over the backend under test, and compares it with
//! the CPU backend (the specification) on the same seeded inputs. The `#[test]`s run each
//! check on CUDA (skipping with `skipped: no CUDA device` when there is none) and, with
//! small shapes, on the CPU itself: that run validates the harness (poisoning, index
//! bookkeeping, comparisons) on machines without a GPU.
#![allow(dead_code)]

pub mod plan;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sparsegrad::backend::cuda::kernels_available;
use sparsegrad::{Backend, Cuda, Elem};

/// Set (to anything) to make a CUDA test that finds no device fail instead of skipping:
/// scripts/test-cuda-emu.sh sets it, so an emulator that did not load is an error.
pub const REQUIRE_ENV: &str = "SPARSEGRAD_REQUIRE_CUDA";
/// When set, every CUDA test appends `<test binary> <test> executed|skipped <device>` to
/// this file (scripts/test-cuda-emu.sh counts the lines per binary).
pub const LOG_ENV: &str = "SPARSEGRAD_CUDA_TEST_LOG";

/// `cuda_test!(fn name(cuda) { ... })`: a `#[test]` whose body runs with `cuda`, the CUDA
/// backend on device 0. Without a device it prints `skipped: no CUDA device (why)` and
/// returns, or fails when `SPARSEGRAD_REQUIRE_CUDA` is set; either way the outcome is logged
/// (see [`LOG_ENV`]) and printed with the device name, so an emulated run is never mistaken
/// for a GPU run.
macro_rules! cuda_test {
    ($(#[$meta:meta])* fn $name:ident($cuda:ident) $body:block) => {
        $(#[$meta])*
        #[test]
        fn $name() {
            let Some($cuda) = crate::cuda_common::cuda_for_test(env!("CARGO_CRATE_NAME"), stringify!($name)) else {
                return;
            };
            let device = $cuda.device_name().to_string();
            $body
            crate::cuda_common::record(env!("CARGO_CRATE_NAME"), stringify!($name), "executed", &device);
        }
    };
}
pub(crate) use cuda_test;

/// Whether the CUDA tests add their big shapes (more than one full grid, 1024-thread row
/// groups, a 16M-entry top-k): yes unless `SPARSEGRAD_CUDA_TEST_BIG=0` (the size knob that
/// keeps the AddressSanitizer run of the emulator short; the ragged small shapes always run).
pub fn big_shapes() -> bool {
    std::env::var("SPARSEGRAD_CUDA_TEST_BIG").map_or(true, |v| v != "0")
}

/// The backend for a [`cuda_test!`], or `None` after logging the skip (panics instead when
/// [`REQUIRE_ENV`] is set).
pub fn cuda_for_test(binary: &str, test: &str) -> Option<Cuda> {
    match Cuda::new(0) {
        Ok(cuda) => Some(cuda),
        Err(e) => {
            if std::env::var_os(REQUIRE_ENV).is_some() {
                panic!("{test}: {REQUIRE_ENV} is set but there is no usable CUDA device: {e}");
            }
            record(binary, test, "skipped", &format!("no CUDA device ({e})"));
            None
        }
    }
}

/// Prints (and, with [`LOG_ENV`], appends to the log) the outcome of one CUDA test.
pub fn record(binary: &str, test: &str, outcome: &str, device: &str) {
    if outcome == "skipped" {
        println!("skipped: {device}");
    } else {
        println!("{test}: {outcome} on {device}");
    }
    if let Some(path) = std::env::var_os(LOG_ENV) {
        use std::io::Write;
        let line = format!("{binary} {test} {outcome} {device}\n");
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path);
        file.and_then(|mut f| f.write_all(line.as_bytes())).expect("append to the CUDA test log");
    }
}

/// Whether a CUDA driver and at least one device are present (independently of
/// [`Cuda::new`], for the test that checks it).
pub fn device_present() -> bool {
    // SAFETY: only probes whether the driver library can be opened.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return false;
    }
    std::panic::catch_unwind(|| {
        cudarc::driver::result::init().is_ok() && cudarc::driver::result::device::get_count().is_ok_and(|n| n > 0)
    })
    .unwrap_or(false)
}

pub fn kernels() -> bool {
    kernels_available()
}

pub fn rng(seed: u64) -> SmallRng {
    SmallRng::seed_from_u64(seed)
}

/// Uniform values in [-1, 1).
pub fn rand_f32(rng: &mut SmallRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Uniform values in [lo, hi).
pub fn rand_range(rng: &mut SmallRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// Random values with about `zero_frac` of them exactly zero.
pub fn rand_sparse(rng: &mut SmallRng, n: usize, zero_frac: f64) -> Vec<f32> {
    (0..n).map(|_| if rng.random_bool(zero_frac) { 0.0 } else { rng.random_range(-1.0f32..1.0) }).collect()
}

/// `count` distinct sorted values below `bound` (count <= bound).
pub fn sorted_subset(rng: &mut SmallRng, bound: usize, count: usize) -> Vec<u32> {
    assert!(count <= bound);
    let mut picked = vec![false; bound];
    let mut left = count;
    // Floyd-free simple approach: walk and pick with the right probability.
    for (i, p) in picked.iter_mut().enumerate() {
        let remaining = bound - i;
        if left > 0 && rng.random_range(0..remaining) < left {
            *p = true;
            left -= 1;
        }
    }
    picked.iter().enumerate().filter(|(_, &p)| p).map(|(i, _)| i as u32).collect()
}

pub fn up<B: Backend, T: Elem>(b: &B, host: &[T]) -> B::Buf<T> {
    b.upload(host).expect("upload")
}

pub fn down<B: Backend, T: Elem>(b: &B, buf: &B::Buf<T>, len: usize) -> Vec<T> {
    b.download(buf, len).expect("download")
}

/// A buffer of `len` elements, every one set to `poison`.
pub fn poisoned<B: Backend, T: Elem>(b: &B, len: usize, poison: T) -> B::Buf<T> {
    let mut buf = b.alloc(len).expect("alloc");
    b.fill(&mut buf, len, poison).expect("fill");
    buf
}

/// Elementwise `|got - want| <= atol + rtol |want|` (NaN must match NaN); panics with the
/// worst index.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let mut worst: Option<(usize, f64)> = None;
    let mut failures = 0usize;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let excess = if w.is_nan() || g.is_nan() {
            if w.is_nan() && g.is_nan() {
                continue;
            }
            f64::INFINITY
        } else if w.is_infinite() || g.is_infinite() {
            if g == w {
                continue;
            }
            f64::INFINITY
        } else {
            (g as f64 - w as f64).abs() - (atol as f64 + rtol as f64 * (w as f64).abs())
        };
        if excess > 0.0 {
            failures += 1;
            if worst.is_none_or(|(_, e)| excess > e) {
                worst = Some((i, excess));
            }
        }
    }
    if let Some((i, _)) = worst {
        panic!(
            "{what}: {failures} of {} entries outside atol {atol} + rtol {rtol}; worst at index {i}: got {:e}, want {:e} \
             (|diff| = {:e})",
            got.len(),
            got[i],
            want[i],
            (got[i] as f64 - want[i] as f64).abs()
        );
    }
}

/// Bit-for-bit equality of f32 slices; panics with the first differing index.
pub fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if let Some(i) = got.iter().zip(want).position(|(g, w)| g.to_bits() != w.to_bits()) {
        let count = got.iter().zip(want).filter(|(g, w)| g.to_bits() != w.to_bits()).count();
        panic!(
            "{what}: {count} of {} entries differ; first at index {i}: got {:e}, want {:e}",
            got.len(),
            got[i],
            want[i]
        );
    }
}

/// Exact equality; panics with the first differing index.
pub fn assert_same<T: PartialEq + std::fmt::Debug>(what: &str, got: &[T], want: &[T]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if let Some(i) = got.iter().zip(want).position(|(g, w)| g != w) {
        let count = got.iter().zip(want).filter(|(g, w)| g != w).count();
        panic!(
            "{what}: {count} of {} entries differ; first at index {i}: got {:?}, want {:?}",
            got.len(),
            got[i],
            want[i]
        );
    }
}

/// Checks that `tail` (the part of an output the op must not write) still holds `poison`.
pub fn assert_untouched<T: PartialEq + std::fmt::Debug + Copy>(what: &str, tail: &[T], poison: T) {
    if let Some(i) = tail.iter().position(|&v| v != poison) {
        panic!("{what}: entry {i} past the output was written ({:?})", tail[i]);
    }
}

/// Like [`assert_untouched`] for an f32 NaN poison (compared by bits).
pub fn assert_untouched_f32(what: &str, tail: &[f32], poison: f32) {
    if let Some(i) = tail.iter().position(|v| v.to_bits() != poison.to_bits()) {
        panic!("{what}: entry {i} past the output was written ({:e})", tail[i]);
    }
}

/// A size that needs more than one full grid of 65535 blocks of 256 threads.
pub const BIG: usize = 65535 * 256 + 4099;

/// The small LLaMA of the model-level CUDA tests: 3 layers, hidden 48, ffn 80, 6 heads over
/// 2 KV heads of 8 (grouped-query attention), vocabulary 97, 64 positions.
pub fn small_llama_config(tied_embeddings: bool) -> sparsegrad::model::config::LlamaConfig {
    sparsegrad::model::config::LlamaConfig {
        hidden: 48,
        ffn: 80,
        layers: 3,
        heads: 6,
        kv_heads: 2,
        head_dim: 8,
        rope_theta: 10000.0,
        rope_scaling: None,
        rms_eps: 1e-5,
        vocab: 97,
        tied_embeddings,
        max_seq: 64,
        bos: Some(1),
        eos: Some(2),
    }
}
