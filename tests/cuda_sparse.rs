//! Sparse-by-dense ops and COO helpers on CUDA against the CPU: nonzero rows/columns (exact
//! indices and the exact threshold), row gathers for every element width, block gathers,
//! COO scatter-add, row compaction and sparse-times-dense. Outputs are poisoned first and
//! the parts an op must not write are checked to be untouched.
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::*;
use half::bf16;
use rand::rngs::SmallRng;
use rand::Rng;
use sparsegrad::backend::{Coo, SparseOps};
use sparsegrad::{Backend, Cpu, Error, HostCoo};

const SHAPES: &[(usize, usize)] =
    &[(1, 1), (1, 17), (17, 1), (17, 1000), (1000, 17), (70000, 3), (3, 1600), (129, 257)];

/// Random values, about a third of the rows and of the columns entirely zero, the rest
/// half zero; a few tiny values so relative thresholds have something to cut.
fn structured(r: &mut SmallRng, rows: usize, cols: usize) -> Vec<f32> {
    let zero_rows: Vec<bool> = (0..rows).map(|_| r.random_bool(0.33)).collect();
    let zero_cols: Vec<bool> = (0..cols).map(|_| r.random_bool(0.33)).collect();
    let mut m = vec![0.0f32; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            if !zero_rows[i] && !zero_cols[j] && r.random_bool(0.5) {
                let v = r.random_range(-1.0f32..1.0);
                m[i * cols + j] = if r.random_bool(0.1) { v * 1e-4 } else { v };
            }
        }
    }
    m
}

fn nonzero_case<B: Backend>(dev: &B, cpu: &Cpu, m: &[f32], rows: usize, cols: usize, rel: f32) {
    let what = format!("nonzero_rows_cols {rows}x{cols} rel={rel}");
    let (mut wr, mut wc) = (poisoned(cpu, rows + 2, u32::MAX), poisoned(cpu, cols + 2, u32::MAX));
    let want = cpu.nonzero_rows_cols(&up(cpu, m), rows, cols, rel, &mut wr, &mut wc).unwrap();
    let (mut gr, mut gc) = (poisoned(dev, rows + 2, u32::MAX), poisoned(dev, cols + 2, u32::MAX));
    let got = dev.nonzero_rows_cols(&up(dev, m), rows, cols, rel, &mut gr, &mut gc).unwrap();
    assert_eq!((got.n_rows, got.n_cols), (want.n_rows, want.n_cols), "{what}: counts");
    assert_eq!(
        got.abs_threshold.to_bits(),
        want.abs_threshold.to_bits(),
        "{what}: threshold {} vs {}",
        got.abs_threshold,
        want.abs_threshold
    );
    let (gr, gc) = (down(dev, &gr, rows + 2), down(dev, &gc, cols + 2));
    let (wr, wc) = (down(cpu, &wr, rows + 2), down(cpu, &wc, cols + 2));
    assert_same(&format!("{what}: rows"), &gr[..want.n_rows], &wr[..want.n_rows]);
    assert_same(&format!("{what}: cols"), &gc[..want.n_cols], &wc[..want.n_cols]);
    assert_untouched(&format!("{what}: rows tail"), &gr[want.n_rows..], u32::MAX);
    assert_untouched(&format!("{what}: cols tail"), &gc[want.n_cols..], u32::MAX);
}

fn check_nonzero<B: Backend>(dev: &B, big: bool) {
    let cpu = Cpu::new();
    let mut r = rng(31);
    let mut shapes = SHAPES.to_vec();
    shapes.extend([(0, 5), (5, 0), (0, 0)]);
    if big {
        shapes.push((5000, 3400));
    }
    for &(rows, cols) in &shapes {
        let m = structured(&mut r, rows, cols);
        for rel in [0.0, 0.3, 1.0] {
            nonzero_case(dev, &cpu, &m, rows, cols, rel);
        }
    }
    // All zeros, and non-finite entries (NaN is ignored by the max, inf dominates it).
    nonzero_case(dev, &cpu, &[0.0; 12], 3, 4, 0.5);
    let mut m = structured(&mut r, 40, 30);
    m[77] = f32::NAN;
    for rel in [0.0, 0.5] {
        nonzero_case(dev, &cpu, &m, 40, 30, rel);
    }
    m[500] = f32::NEG_INFINITY;
    for rel in [0.0, 0.5] {
        nonzero_case(dev, &cpu, &m, 40, 30, rel);
    }
    assert!(matches!(
        dev.nonzero_rows_cols(&up(dev, &[1.0f32]), 1, 1, 1.5, &mut poisoned(dev, 1, 0u32), &mut poisoned(dev, 1, 0u32)),
        Err(Error::InvalidArgument { .. })
    ));
}

fn gather_case<B: Backend, T: sparsegrad::Elem>(
    dev: &B,
    cpu: &Cpu,
    src: &[T],
    src_rows: usize,
    cols: usize,
    idx: &[u32],
    poison: T,
) {
    let n = idx.len();
    let mut want = poisoned(cpu, n * cols + 3, poison);
    cpu.gather_rows(&up(cpu, src), src_rows, cols, &up(cpu, idx), n, &mut want).unwrap();
    let mut got = poisoned(dev, n * cols + 3, poison);
    dev.gather_rows(&up(dev, src), src_rows, cols, &up(dev, idx), n, &mut got).unwrap();
    assert_same(
        &format!("gather_rows<{}> {src_rows}x{cols} n={n}", T::NAME),
        &down(dev, &got, n * cols + 3),
        &down(cpu, &want, n * cols + 3),
    );
}

fn check_gathers<B: Backend>(dev: &B) {
    let cpu = Cpu::new();
    let mut r = rng(32);
    for &(rows, cols) in SHAPES {
        let n = r.random_range(1..=rows.min(3000) + 3);
        let idx: Vec<u32> = (0..n).map(|_| r.random_range(0..rows as u32)).collect();
        let f = rand_f32(&mut r, rows * cols);
        // Bit patterns, compared exactly (NaN-free so PartialEq is exact).
        gather_case(dev, &cpu, &f, rows, cols, &idx, f32::MAX);
        let h: Vec<bf16> = f.iter().map(|&v| bf16::from_f32(v)).collect();
        gather_case(dev, &cpu, &h, rows, cols, &idx, bf16::from_bits(0x7f7f));
        let u: Vec<u32> = f.iter().map(|v| v.to_bits()).collect();
        gather_case(dev, &cpu, &u, rows, cols, &idx, u32::MAX);
        let b: Vec<u8> = u.iter().map(|&v| v as u8).collect();
        gather_case(dev, &cpu, &b, rows, cols, &idx, 0xEEu8);

        let n_rows = r.random_range(1..=rows.min(500));
        let n_cols = r.random_range(1..=cols.min(500));
        let ri = sorted_subset(&mut r, rows, n_rows);
        let ci: Vec<u32> = (0..n_cols).map(|_| r.random_range(0..cols as u32)).collect();
        for t in [0.0f32, 0.5, 2.0] {
            let len = n_rows * n_cols + 3;
            let mut want = poisoned(&cpu, len, f32::NAN);
            cpu.gather_block(&up(&cpu, &f), rows, cols, &up(&cpu, &ri), n_rows, &up(&cpu, &ci), n_cols, t, &mut want)
                .unwrap();
            let mut got = poisoned(dev, len, f32::NAN);
            dev.gather_block(&up(dev, &f), rows, cols, &up(dev, &ri), n_rows, &up(dev, &ci), n_cols, t, &mut got)
                .unwrap();
            assert_bits(
                &format!("gather_block {rows}x{cols} -> {n_rows}x{n_cols} t={t}"),
                &down(dev, &got, len),
                &down(&cpu, &want, len),
            );
        }
    }
}

/// A random sorted COO list of `k` distinct entries of a `rows x cols` matrix.
fn random_coo(r: &mut SmallRng, rows: usize, cols: usize, k: usize) -> HostCoo<f32> {
    let lin = sorted_subset(r, rows * cols, k);
    HostCoo {
        rows: lin.iter().map(|&l| l / cols as u32).collect(),
        cols: lin.iter().map(|&l| l % cols as u32).collect(),
        values: rand_f32(r, k),
        shape: (rows, cols),
    }
}

fn coo_on<B: Backend>(b: &B, host: &HostCoo<f32>, capacity: usize) -> Coo<B, f32> {
    let mut coo = Coo::with_capacity(b, capacity, host.shape).unwrap();
    coo.set_from_host(b, host).unwrap();
    coo
}

fn check_coo<B: Backend>(dev: &B) {
    let cpu = Cpu::new();
    let mut r = rng(33);
    for &(rows, cols) in SHAPES {
        for k in [1, (rows * cols / 50).max(1), rows * cols] {
            if k > 300_000 {
                continue;
            }
            let host = random_coo(&mut r, rows, cols, k);
            let (cc, dc) = (coo_on(&cpu, &host, k + 2), coo_on(dev, &host, k + 2));
            let what = format!("{rows}x{cols} k={k}");

            let dense = rand_f32(&mut r, rows * cols + 1);
            let mut want = up(&cpu, &dense);
            cpu.coo_scatter_add(&cc, 0.7, &mut want).unwrap();
            let mut got = up(dev, &dense);
            dev.coo_scatter_add(&dc, 0.7, &mut got).unwrap();
            assert_bits(
                &format!("coo_scatter_add {what}"),
                &down(dev, &got, dense.len()),
                &down(&cpu, &want, dense.len()),
            );

            let (mut wu, mut ws) = (poisoned(&cpu, rows + 3, u32::MAX), poisoned(&cpu, k + 2, u32::MAX));
            let wn = cpu.coo_compact_rows(&cc, &mut wu, &mut ws).unwrap();
            let (mut gu, mut gs) = (poisoned(dev, rows + 3, u32::MAX), poisoned(dev, k + 2, u32::MAX));
            let gn = dev.coo_compact_rows(&dc, &mut gu, &mut gs).unwrap();
            assert_eq!(gn, wn, "coo_compact_rows {what}: count");
            let (gu, gs_host) = (down(dev, &gu, rows + 3), down(dev, &gs, k + 2));
            let (wu, ws_host) = (down(&cpu, &wu, rows + 3), down(&cpu, &ws, k + 2));
            assert_same(&format!("coo_compact_rows {what}: unique rows"), &gu[..wn], &wu[..wn]);
            assert_untouched(&format!("coo_compact_rows {what}: unique rows tail"), &gu[wn..], u32::MAX);
            assert_same(&format!("coo_compact_rows {what}: slots"), &gs_host[..k], &ws_host[..k]);
            assert_untouched(&format!("coo_compact_rows {what}: slot tail"), &gs_host[k..], u32::MAX);

            let b_rows = [1, 17, 300][r.random_range(0..3)];
            let bm = rand_f32(&mut r, b_rows * cols);
            let slot_c = up(&cpu, &ws_host);
            let slot_d = up(dev, &ws_host);
            let len = b_rows * wn + 3;
            let mut want = poisoned(&cpu, len, f32::NAN);
            cpu.coo_dense_t(&cc, &slot_c, wn, &up(&cpu, &bm), b_rows, &mut want).unwrap();
            let mut got = poisoned(dev, len, f32::NAN);
            dev.coo_dense_t(&dc, &slot_d, wn, &up(dev, &bm), b_rows, &mut got).unwrap();
            let per_slot = k as f32 / wn as f32;
            let (got, want) = (down(dev, &got, len), down(&cpu, &want, len));
            assert_close(
                &format!("coo_dense_t {what} b_rows={b_rows}"),
                &got[..len - 3],
                &want[..len - 3],
                1e-6 * (per_slot + 1.0),
                1e-5,
            );
            assert_untouched_f32(&format!("coo_dense_t {what}: tail"), &got[len - 3..], f32::NAN);
        }
    }
    // Empty list: out is zeroed, compaction finds nothing.
    let host = HostCoo { rows: vec![], cols: vec![], values: vec![], shape: (4, 5) };
    let dc = coo_on(dev, &host, 2);
    let mut out = poisoned(dev, 6, f32::NAN);
    dev.coo_dense_t(&dc, &poisoned(dev, 1, 0u32), 2, &up(dev, &[1.0f32; 15]), 3, &mut out).unwrap();
    assert_bits("coo_dense_t of an empty list", &down(dev, &out, 6), &[0.0; 6]);
    assert_eq!(dev.coo_compact_rows(&dc, &mut poisoned(dev, 1, 0u32), &mut poisoned(dev, 1, 0u32)).unwrap(), 0);
}

/// Errors the CUDA backend must find on the device (the CPU finds them on the host).
fn check_coo_errors<B: Backend>(dev: &B) {
    let mut coo: Coo<B, f32> = Coo::with_capacity(dev, 4, (3, 3)).unwrap();
    dev.upload_into(&[0u32, 2, 1, 2], &mut coo.rows).unwrap();
    dev.upload_into(&[0u32, 0, 1, 2], &mut coo.cols).unwrap();
    dev.upload_into(&[1.0f32; 4], &mut coo.values).unwrap();
    coo.len = 4;
    let r = dev.coo_compact_rows(&coo, &mut poisoned(dev, 4, 0u32), &mut poisoned(dev, 4, 0u32));
    assert!(matches!(r, Err(Error::InvalidArgument { .. })), "unsorted rows: {r:?}");
    dev.upload_into(&[0u32, 1, 2, 2], &mut coo.rows).unwrap();
    let r = dev.coo_compact_rows(&coo, &mut poisoned(dev, 2, 0u32), &mut poisoned(dev, 4, 0u32));
    assert!(matches!(r, Err(Error::Shape { .. })), "unique_rows too short: {r:?}");
    dev.upload_into(&[0u32, 1, 2, 3], &mut coo.rows).unwrap();
    let r = dev.coo_compact_rows(&coo, &mut poisoned(dev, 4, 0u32), &mut poisoned(dev, 4, 0u32));
    assert!(matches!(r, Err(Error::InvalidArgument { .. })), "row outside the matrix: {r:?}");
    dev.synchronize().unwrap();
}

cuda_test!(fn nonzero_rows_cols_match_cpu_exactly(cuda) {
    check_nonzero(&cuda, big_shapes());
});

cuda_test!(fn gathers_match_cpu_exactly(cuda) {
    check_gathers(&cuda);
});

cuda_test!(fn coo_ops_match_cpu(cuda) {
    check_coo(&cuda);
    check_coo_errors(&cuda);
});

#[test]
fn harness_on_cpu() {
    let cpu = Cpu::new();
    check_nonzero(&cpu, false);
    check_gathers(&cpu);
    check_coo(&cpu);
    check_coo_errors(&cpu);
}
