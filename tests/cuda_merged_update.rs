//! The merged update's kernels without atomics (issue 18, item 5) on CUDA against the CPU:
//! `coo_densify` (f32 and bf16) and `coo_mm` (with its row starts), on seeded random ragged
//! shapes. Both must equal the CPU twin bit for bit (plain stores; one fixed summation
//! order, no FMA contraction), and the CPU twin must match a plain f64 reference within
//! f32 rounding. Outputs are poisoned first; the parts an op must not write are checked to be
//! untouched. Bad lists (unsorted, duplicate, out of range) are errors on both backends (on
//! CUDA at the next synchronization).
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::*;
use half::bf16;
use rand::rngs::SmallRng;
use rand::Rng;
use sparsegrad::backend::Coo;
use sparsegrad::backend::SparseOps;
use sparsegrad::{Backend, Cpu, Error, HostCoo};

/// `(rows, cols, b_cols)`: ones, primes, a row count past one full grid of row blocks,
/// columns past one block of 256 threads, and a matrix with a single column.
const SHAPES: &[(usize, usize, usize)] =
    &[(1, 1, 1), (1, 17, 3), (17, 1, 300), (33, 65, 257), (1000, 17, 5), (129, 257, 1), (3, 1600, 17)];

/// A random sorted COO list of `k` distinct entries of a `rows x cols` matrix; with
/// `heavy_row`, about half the entries in one row (a long run).
fn random_coo(r: &mut SmallRng, rows: usize, cols: usize, k: usize, heavy_row: bool) -> HostCoo<f32> {
    let mut lin = sorted_subset(r, rows * cols, k);
    if heavy_row && rows > 1 {
        let row = r.random_range(0..rows) as u32;
        let mut in_row: Vec<u32> = (0..cols as u32).map(|c| row * cols as u32 + c).collect();
        in_row.truncate(k / 2);
        lin.truncate(k - in_row.len());
        lin.extend(in_row);
        lin.sort_unstable();
        lin.dedup();
    }
    HostCoo {
        rows: lin.iter().map(|&l| l / cols as u32).collect(),
        cols: lin.iter().map(|&l| l % cols as u32).collect(),
        values: rand_f32(r, lin.len()),
        shape: (rows, cols),
    }
}

fn coo_on<B: Backend>(b: &B, host: &HostCoo<f32>) -> Coo<B, f32> {
    let mut coo = Coo::with_capacity(b, host.len() + 2, host.shape).unwrap();
    coo.set_from_host(b, host).unwrap();
    coo
}

fn check_densify<B: Backend>(dev: &B) {
    let cpu = Cpu::new();
    let mut r = rng(61);
    for &(rows, cols, _) in SHAPES {
        let n = rows * cols;
        for k in [0, 1, (n / 7).max(1), n] {
            let host = random_coo(&mut r, rows, cols, k, false);
            let what = format!("coo_densify {rows}x{cols} k={k}");
            let (cc, dc) = (coo_on(&cpu, &host), coo_on(dev, &host));
            let mut reference = vec![0.0f32; n];
            for e in 0..host.len() {
                reference[host.rows[e] as usize * cols + host.cols[e] as usize] = host.values[e];
            }
            let (mut want, mut got) = (poisoned(&cpu, n + 3, f32::NAN), poisoned(dev, n + 3, f32::NAN));
            cpu.coo_densify(&cc, &mut want).unwrap();
            dev.coo_densify(&dc, &mut got).unwrap();
            let (want, got) = (down(&cpu, &want, n + 3), down(dev, &got, n + 3));
            assert_bits(&format!("{what}: cpu vs reference"), &want[..n], &reference);
            assert_bits(&format!("{what}: cuda vs cpu"), &got[..n], &want[..n]);
            assert_untouched_f32(&format!("{what}: tail"), &got[n..], f32::NAN);

            let poison = bf16::from_f32(7.0);
            let (mut want, mut got) = (poisoned(&cpu, n + 3, poison), poisoned(dev, n + 3, poison));
            cpu.coo_densify_bf16(&cc, &mut want).unwrap();
            dev.coo_densify_bf16(&dc, &mut got).unwrap();
            let (want, got) = (down(&cpu, &want, n + 3), down(dev, &got, n + 3));
            let rounded: Vec<bf16> = reference.iter().map(|&v| bf16::from_f32(v)).collect();
            assert_same(&format!("{what} bf16: cpu vs reference"), &want[..n], &rounded);
            assert_same(&format!("{what} bf16: cuda vs cpu"), &got[..n], &want[..n]);
            assert_untouched(&format!("{what} bf16: tail"), &got[n..], poison);
        }
    }
}

fn check_coo_mm<B: Backend>(dev: &B) {
    let cpu = Cpu::new();
    let mut r = rng(62);
    for &(rows, cols, b_cols) in SHAPES {
        let n = rows * cols;
        for (k, heavy) in [(0, false), (1, false), ((n / 5).max(1), false), ((n / 3).max(2), true), (n, false)] {
            let host = random_coo(&mut r, rows, cols, k.min(n), heavy);
            let what = format!("coo_mm {rows}x{cols} k={} b_cols={b_cols}", host.len());
            let b = rand_f32(&mut r, cols * b_cols);
            // The plain reference in f64: out = D B.
            let mut reference = vec![0.0f64; rows * b_cols];
            let mut abs = vec![0.0f64; rows * b_cols];
            for e in 0..host.len() {
                let (i, c, v) = (host.rows[e] as usize, host.cols[e] as usize, host.values[e] as f64);
                for j in 0..b_cols {
                    reference[i * b_cols + j] += v * b[c * b_cols + j] as f64;
                    abs[i * b_cols + j] += (v * b[c * b_cols + j] as f64).abs();
                }
            }
            let (cc, dc) = (coo_on(&cpu, &host), coo_on(dev, &host));
            let len = rows * b_cols;
            let (mut ws, mut gs) = (poisoned(&cpu, rows + 3, u32::MAX), poisoned(dev, rows + 3, u32::MAX));
            let (mut want, mut got) = (poisoned(&cpu, len + 3, f32::NAN), poisoned(dev, len + 3, f32::NAN));
            cpu.coo_mm(&cc, &mut ws, &up(&cpu, &b), b_cols, &mut want).unwrap();
            dev.coo_mm(&dc, &mut gs, &up(dev, &b), b_cols, &mut got).unwrap();
            let (want, got) = (down(&cpu, &want, len + 3), down(dev, &got, len + 3));
            // f32 sums of at most `run` products: each output within run * 2^-24 of the sum of
            // its products' magnitudes (plus one rounding of each product), a bound on the
            // f32 error of any summation order.
            let run = (0..rows).map(|i| host.rows.iter().filter(|&&x| x as usize == i).count()).max().unwrap_or(0);
            let bound = (run as f64 + 1.0) * f32::EPSILON as f64 / 2.0;
            for (i, (&w, (&x, &a))) in want[..len].iter().zip(reference.iter().zip(&abs)).enumerate() {
                assert!((w as f64 - x).abs() <= bound * a + 1e-30, "{what}: cpu[{i}] = {w}, f64 reference {x}");
            }
            assert_bits(&format!("{what}: cuda vs cpu"), &got[..len], &want[..len]);
            assert_untouched_f32(&format!("{what}: tail"), &got[len..], f32::NAN);
            let (ws, gs) = (down(&cpu, &ws, rows + 3), down(dev, &gs, rows + 3));
            let starts: Vec<u32> =
                (0..=rows).map(|i| host.rows.iter().filter(|&&x| (x as usize) < i).count() as u32).collect();
            assert_same(&format!("{what}: cpu row starts"), &ws[..=rows], &starts);
            assert_same(&format!("{what}: cuda row starts"), &gs[..=rows], &starts);
            assert_untouched(&format!("{what}: row starts tail"), &gs[rows + 1..], u32::MAX);
        }
    }
}

/// A 3 x 3 COO with the given entries (values 1).
fn coo_3x3<B: Backend>(dev: &B, rows: &[u32], cols: &[u32]) -> Coo<B, f32> {
    let mut coo: Coo<B, f32> = Coo::with_capacity(dev, rows.len(), (3, 3)).unwrap();
    dev.upload_into(rows, &mut coo.rows).unwrap();
    dev.upload_into(cols, &mut coo.cols).unwrap();
    dev.upload_into(&vec![1.0f32; rows.len()], &mut coo.values).unwrap();
    coo.len = rows.len();
    coo
}

/// Unsorted, duplicate and out-of-range entries are errors (the CPU's at once, CUDA's at the
/// next synchronization, naming the op); short buffers fail the shared validator.
fn check_errors<B: Backend>(dev: &B) {
    let bad: [(&[u32], &[u32], &str); 3] = [
        (&[0, 2, 1], &[0, 0, 1], "unsorted"),
        (&[0, 1, 1], &[0, 2, 2], "duplicate"),
        (&[0, 1, 3], &[0, 0, 0], "row outside the matrix"),
    ];
    for (rows, cols, what) in bad {
        let coo = coo_3x3(dev, rows, cols);
        let r = dev.coo_densify(&coo, &mut poisoned(dev, 9, 0.0f32)).and_then(|_| dev.synchronize());
        assert!(matches!(&r, Err(Error::InvalidArgument { op, .. }) if op.contains("coo_densify")), "{what}: {r:?}");
        let r = dev.coo_densify_bf16(&coo, &mut poisoned(dev, 9, bf16::ZERO)).and_then(|_| dev.synchronize());
        assert!(matches!(&r, Err(Error::InvalidArgument { op, .. }) if op.contains("coo_densify")), "{what}: {r:?}");
        let b = up(dev, &[1.0f32; 6]);
        let r = dev
            .coo_mm(&coo, &mut poisoned(dev, 4, 0u32), &b, 2, &mut poisoned(dev, 6, 0.0f32))
            .and_then(|_| dev.synchronize());
        assert!(matches!(&r, Err(Error::InvalidArgument { op, .. }) if *op == "coo_mm"), "{what}: {r:?}");
    }
    let coo = coo_3x3(dev, &[0, 1], &[0, 1]);
    let r = dev.coo_densify(&coo, &mut poisoned(dev, 8, 0.0f32));
    assert!(matches!(r, Err(Error::Shape { .. })), "dense too short: {r:?}");
    let b = up(dev, &[1.0f32; 6]);
    let r = dev.coo_mm(&coo, &mut poisoned(dev, 3, 0u32), &b, 2, &mut poisoned(dev, 6, 0.0f32));
    assert!(matches!(r, Err(Error::Shape { .. })), "row starts too short: {r:?}");
    let r = dev.coo_mm(&coo, &mut poisoned(dev, 4, 0u32), &b, 3, &mut poisoned(dev, 9, 0.0f32));
    assert!(matches!(r, Err(Error::Shape { .. })), "b too short: {r:?}");
    dev.synchronize().unwrap();
}

cuda_test!(fn coo_densify_matches_cpu_exactly(cuda) {
    check_densify(&cuda);
});

cuda_test!(fn coo_mm_matches_cpu_exactly(cuda) {
    check_coo_mm(&cuda);
});

cuda_test!(fn merged_update_ops_report_bad_lists(cuda) {
    check_errors(&cuda);
});

#[test]
fn harness_on_cpu() {
    let cpu = Cpu::new();
    check_densify(&cpu);
    check_coo_mm(&cpu);
    check_errors(&cpu);
}
