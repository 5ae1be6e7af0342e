//! The CPU backend's ops against the plain reference code of tests/common/reference.rs and
//! formulas written out here: GEMM, top-k selection,
//! SparseAdam and AdamW (PyTorch formulas computed by hand), nonzero detection, gathers,
//! COO helpers, activations (finite differences).

mod common;

use common::*;
use rand::Rng;
use sparsegrad::backend::{Coo, DenseOps, Gemm, IndexMaps, OptimOps, OutBuf, SparseOps, TopkOps};
use sparsegrad::{AdamParams, Backend, Cpu, GeluKind, HostCoo};

fn topk(cpu: &Cpu, m: &[f32], rows: usize, cols: usize, k: usize) -> sparsegrad::Result<HostCoo<f32>> {
    let buf = cpu.upload(m)?;
    let mut ws = cpu.topk_workspace(rows * cols)?;
    let mut out = Coo::with_capacity(cpu, k, (rows, cols))?;
    let maps = IndexMaps { row_map: None, col_map: None, full_shape: (rows, cols) };
    cpu.topk_coo(&buf, rows, cols, k, &maps, &mut ws, &mut out)?;
    out.to_host(cpu)
}

#[test]
fn topk_keeps_exactly_k_largest_sorted_with_ties_to_the_lower_index() {
    let cpu = Cpu::new();
    let mut r = rng(1);
    for (rows, cols) in [(1usize, 1usize), (17, 33), (40, 25), (1, 1000), (64, 64)] {
        let n = rows * cols;
        // Quantised values make many exact ties (and zeros).
        let m: Vec<f32> = (0..n).map(|_| (r.random_range(-8i32..=8) as f32) * 0.25).collect();
        for k in [1, 2, n / 3, n / 2, n.saturating_sub(1), n].into_iter().filter(|&k| k >= 1 && k <= n) {
            let got = topk(&cpu, &m, rows, cols, k).unwrap();
            assert_eq!(got.len(), k);
            got.validate().unwrap();
            let lin: Vec<usize> = got.linear_indices().into_iter().map(|v| v as usize).collect();
            assert_eq!(lin, reference::topk_indices(&m, k), "{rows}x{cols} k={k}");
            for (e, &l) in lin.iter().enumerate() {
                assert_eq!(got.values[e], m[l]);
            }
        }
    }
}

#[test]
fn topk_on_large_matrices_with_ties_across_chunks() {
    // Large enough that every one of the CPU op's 64 chunks holds many entries and the
    // threshold's histogram bin holds candidates from several chunks.
    let cpu = Cpu::new();
    let mut r = rng(21);
    let (rows, cols) = (300usize, 701usize);
    let n = rows * cols;
    let smooth: Vec<f32> = (0..n).map(|_| r.random_range(-1.0f32..1.0) * r.random_range(0.0f32..1.0)).collect();
    // Five magnitudes only: the k-th largest is tied with thousands of entries.
    let tied: Vec<f32> = (0..n).map(|_| [0.0f32, 0.5, -0.5, 1.0, 2.0, -3.0][r.random_range(0..6usize)]).collect();
    for (name, m) in [("smooth", &smooth), ("tied", &tied)] {
        for k in [1, n / 100, n / 10, n / 3, n - 5] {
            let got = topk(&cpu, m, rows, cols, k).unwrap();
            got.validate().unwrap();
            let lin: Vec<usize> = got.linear_indices().into_iter().map(|v| v as usize).collect();
            assert_eq!(lin, reference::topk_indices(m, k), "{name} k={k}");
            assert!(lin.iter().zip(&got.values).all(|(&l, &v)| v == m[l]), "{name} k={k}: values");
        }
    }
}

#[test]
fn topk_with_maps_treats_the_outside_as_zeros() {
    let cpu = Cpu::new();
    let mut r = rng(2);
    let (full_r, full_c) = (12usize, 9usize);
    let row_map: Vec<u32> = vec![1, 4, 5, 10];
    let col_map: Vec<u32> = vec![0, 2, 3, 8];
    let mut block: Vec<f32> = rand_vec(&mut r, 16);
    block[5] = 0.0;
    let mut dense = vec![0.0f32; full_r * full_c];
    for i in 0..4 {
        for j in 0..4 {
            dense[row_map[i] as usize * full_c + col_map[j] as usize] = block[i * 4 + j];
        }
    }
    let b = cpu.upload(&block).unwrap();
    let (rm, cm) = (cpu.upload(&row_map).unwrap(), cpu.upload(&col_map).unwrap());
    let mut ws = cpu.topk_workspace(16).unwrap();
    for k in [1, 5, 15, 16, 20, 60, full_r * full_c] {
        let mut out = Coo::with_capacity(&cpu, k, (full_r, full_c)).unwrap();
        let maps = IndexMaps { row_map: Some(&rm), col_map: Some(&cm), full_shape: (full_r, full_c) };
        cpu.topk_coo(&b, 4, 4, k, &maps, &mut ws, &mut out).unwrap();
        let got = out.to_host(&cpu).unwrap();
        let expect = topk(&cpu, &dense, full_r, full_c, k).unwrap();
        assert_eq!(got, expect, "k = {k}");
        assert_eq!(
            got.linear_indices().into_iter().map(|v| v as usize).collect::<Vec<_>>(),
            reference::topk_indices(&dense, k)
        );
    }
}

#[test]
fn topk_rejects_nan_and_bad_k() {
    let cpu = Cpu::new();
    let mut m = vec![1.0f32; 12];
    assert!(matches!(topk(&cpu, &m, 3, 4, 13), Err(sparsegrad::Error::InvalidArgument { .. })));
    m[5] = f32::NAN;
    assert!(matches!(topk(&cpu, &m, 3, 4, 2), Err(sparsegrad::Error::NonFinite { first_index: 5, .. })));
    m[5] = f32::NEG_INFINITY;
    assert!(matches!(topk(&cpu, &m, 3, 4, 2), Err(sparsegrad::Error::NonFinite { .. })));
}

/// PyTorch's SparseAdam, written out by hand in f64 over several steps.
#[test]
fn sparse_adam_matches_the_pytorch_formula_and_touches_only_listed_entries() {
    let cpu = Cpu::new();
    let (rows, cols) = (5usize, 7usize);
    let hp = AdamParams { lr: 0.05, beta1: 0.8, beta2: 0.95, eps: 1e-6, weight_decay: 0.3 };
    let mut r = rng(3);
    let p0 = rand_vec(&mut r, rows * cols);
    let mut p = cpu.upload(&p0).unwrap();
    let mut m = cpu.alloc::<f32>(rows * cols).unwrap();
    let mut v = cpu.alloc::<f32>(rows * cols).unwrap();
    let (mut pr, mut mr, mut vr) = (to64(&p0), vec![0.0f64; rows * cols], vec![0.0f64; rows * cols]);
    let mut touched = vec![false; rows * cols];
    let mut clock = cpu.alloc::<u64>(2).unwrap();
    // The bf16 compute copy, rounded from the parameter: kept so by rounding only the
    // listed entries.
    let mut half = cpu.upload(&p0.iter().map(|&x| half::bf16::from_f32(x)).collect::<Vec<_>>()).unwrap();
    for step in 1..=4u64 {
        // A different sorted entry set each step.
        let mut lin: Vec<usize> = (0..rows * cols).filter(|_| r.random_bool(0.3)).collect();
        lin.dedup();
        let vals = rand_vec(&mut r, lin.len());
        let host = HostCoo {
            rows: lin.iter().map(|&l| (l / cols) as u32).collect(),
            cols: lin.iter().map(|&l| (l % cols) as u32).collect(),
            values: vals.clone(),
            shape: (rows, cols),
        };
        let mut coo = Coo::with_capacity(&cpu, lin.len().max(1), (rows, cols)).unwrap();
        coo.set_from_host(&cpu, &host).unwrap();
        let mut delta = cpu.alloc::<f32>(lin.len().max(1)).unwrap();
        cpu.sparse_adam(&coo, &mut m, &mut v, &mut clock, &hp, Some(&mut p), Some(&mut half), Some(&mut delta))
            .unwrap();
        assert_eq!(clock[0], step, "the clock counts the steps");
        for (i, (&h, &x)) in half.iter().zip(p.iter()).enumerate() {
            assert_eq!(h.to_bits(), half::bf16::from_f32(x).to_bits(), "bf16 copy at {i}, step {step}");
        }
        let (b1, b2) = (hp.beta1 as f64, hp.beta2 as f64);
        let step_size = hp.lr as f64 * (1.0 - b2.powi(step as i32)).sqrt() / (1.0 - b1.powi(step as i32));
        for (e, &l) in lin.iter().enumerate() {
            let g = vals[e] as f64;
            mr[l] = b1 * mr[l] + (1.0 - b1) * g;
            vr[l] = b2 * vr[l] + (1.0 - b2) * g * g;
            let change = -step_size * mr[l] / (vr[l].sqrt() + hp.eps as f64);
            pr[l] += change;
            touched[l] = true;
            assert!((delta[e] as f64 - change).abs() < 1e-6 * (1.0 + change.abs()), "delta at step {step}");
        }
        assert_close(&format!("param step {step}"), &p, &pr, 1e-6, 1e-5);
        assert_close(&format!("exp_avg step {step}"), &m, &mr, 1e-7, 1e-5);
        assert_close(&format!("exp_avg_sq step {step}"), &v, &vr, 1e-7, 1e-5);
    }
    for l in (0..rows * cols).filter(|&l| !touched[l]) {
        assert_eq!(p[l], p0[l], "untouched param {l} changed");
        assert_eq!((m[l], v[l]), (0.0, 0.0), "untouched state {l} changed");
    }
    // A bf16 copy without its parameter, or a short one, is refused before anything moves.
    let host = HostCoo { rows: vec![0u32], cols: vec![1u32], values: vec![0.5f32], shape: (rows, cols) };
    let mut coo = Coo::with_capacity(&cpu, 1, (rows, cols)).unwrap();
    coo.set_from_host(&cpu, &host).unwrap();
    let before = (m.to_vec(), v.to_vec(), clock.to_vec(), p.to_vec());
    let err = cpu.sparse_adam(&coo, &mut m, &mut v, &mut clock, &hp, None, Some(&mut half), None);
    assert!(matches!(err, Err(sparsegrad::Error::InvalidArgument { op: "sparse_adam", .. })), "{err:?}");
    let mut short = cpu.alloc::<half::bf16>(rows * cols - 1).unwrap();
    let err = cpu.sparse_adam(&coo, &mut m, &mut v, &mut clock, &hp, Some(&mut p), Some(&mut short), None);
    assert!(matches!(err, Err(sparsegrad::Error::Shape { op: "sparse_adam", .. })), "{err:?}");
    assert_eq!((m.to_vec(), v.to_vec(), clock.to_vec(), p.to_vec()), before, "a refused step changed state");
}

/// The fused dense form refuses what `coo_densify` refuses (entries out of order or
/// repeated, outside the matrix) and a short buffer, before changing anything.
#[test]
fn sparse_adam_densify_refuses_unsorted_entries_and_short_buffers_with_state_unchanged() {
    let cpu = Cpu::new();
    let hp = AdamParams::default();
    let (mut m, mut v) = (cpu.upload(&[0.25f32; 4]).unwrap(), cpu.upload(&[0.5f32; 4]).unwrap());
    let mut clock = cpu.alloc::<u64>(2).unwrap();
    let mut dense = cpu.upload(&[7.0f32; 4]).unwrap();
    for (rows, cols, what) in [
        (vec![0u32, 1, 0], vec![1u32, 0, 0], "out of order"),
        (vec![1, 1], vec![0, 0], "repeated"),
        (vec![0, 2], vec![0, 0], "outside"),
    ] {
        // Written around `set_from_host`, which refuses such lists itself.
        let mut coo = Coo::with_capacity(&cpu, rows.len(), (2, 2)).unwrap();
        cpu.upload_into(&rows, &mut coo.rows).unwrap();
        cpu.upload_into(&cols, &mut coo.cols).unwrap();
        cpu.upload_into(&vec![0.5f32; rows.len()], &mut coo.values).unwrap();
        coo.len = rows.len();
        let err = cpu.sparse_adam_densify(&coo, &mut m, &mut v, &mut clock, &hp, OutBuf::Full(&mut dense));
        assert!(
            matches!(err, Err(sparsegrad::Error::InvalidArgument { op: "sparse_adam_densify", .. })),
            "{what}: {err:?}"
        );
    }
    let host = HostCoo { rows: vec![0u32], cols: vec![1u32], values: vec![0.5f32], shape: (2, 2) };
    let mut coo = Coo::with_capacity(&cpu, 1, (2, 2)).unwrap();
    coo.set_from_host(&cpu, &host).unwrap();
    let mut short = cpu.alloc::<half::bf16>(3).unwrap();
    let err = cpu.sparse_adam_densify(&coo, &mut m, &mut v, &mut clock, &hp, OutBuf::Half(&mut short));
    assert!(matches!(err, Err(sparsegrad::Error::Shape { op: "sparse_adam_densify", .. })), "{err:?}");
    assert_eq!((&m[..], &v[..], &clock[..]), (&[0.25f32; 4][..], &[0.5f32; 4][..], &[0u64, 0][..]));
    assert_eq!(&dense[..], &[7.0f32; 4][..], "a refused call leaves the dense buffer");
}

#[test]
fn adamw_matches_the_pytorch_formula() {
    let cpu = Cpu::new();
    let n = 37;
    let hp = AdamParams { lr: 0.01, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 };
    let mut r = rng(4);
    let p0 = rand_vec(&mut r, n);
    let mut p = cpu.upload(&p0).unwrap();
    let (mut m, mut v) = (cpu.alloc::<f32>(n).unwrap(), cpu.alloc::<f32>(n).unwrap());
    let (mut pr, mut mr, mut vr) = (to64(&p0), vec![0.0; n], vec![0.0; n]);
    let mut clock = cpu.alloc::<u64>(2).unwrap();
    let mut half = cpu.alloc::<half::bf16>(n).unwrap();
    for step in 1..=5 {
        let g = rand_vec(&mut r, n);
        // Every other step also rounds the new parameter into its bf16 copy.
        let with_half = step % 2 == 1;
        cpu.adamw(&mut p, with_half.then_some(&mut half), &cpu.upload(&g).unwrap(), &mut m, &mut v, n, &mut clock, &hp)
            .unwrap();
        if with_half {
            for i in 0..n {
                assert_eq!(half[i].to_bits(), half::bf16::from_f32(p[i]).to_bits(), "bf16 copy at {i}, step {step}");
            }
        }
        let (b1, b2, lr) = (hp.beta1 as f64, hp.beta2 as f64, hp.lr as f64);
        for i in 0..n {
            pr[i] *= 1.0 - lr * hp.weight_decay as f64;
            mr[i] = b1 * mr[i] + (1.0 - b1) * g[i] as f64;
            vr[i] = b2 * vr[i] + (1.0 - b2) * (g[i] as f64).powi(2);
            let mhat = mr[i] / (1.0 - b1.powi(step));
            let vhat = vr[i] / (1.0 - b2.powi(step));
            // PyTorch puts eps after dividing sqrt(v) by sqrt(bias_correction2).
            pr[i] -= lr * mhat / (vhat.sqrt() + hp.eps as f64);
        }
        assert_close(&format!("adamw step {step}"), &p, &pr, 1e-6, 1e-5);
    }
    let (before, mut short) = ((p.to_vec(), clock.to_vec()), cpu.alloc::<half::bf16>(n - 1).unwrap());
    let err = cpu.adamw(&mut p, Some(&mut short), &cpu.alloc(n).unwrap(), &mut m, &mut v, n, &mut clock, &hp);
    assert!(matches!(err, Err(sparsegrad::Error::Shape { op: "adamw", .. })), "{err:?}");
    assert_eq!((p.to_vec(), clock.to_vec()), before, "a refused step changed state");
}

#[test]
fn gemm_all_transposes_offsets_batches_alpha_beta() {
    let cpu = Cpu::new();
    let mut r = rng(5);
    for (m, n, k) in [(1usize, 1usize, 1usize), (17, 5, 33), (9, 16, 1), (4, 7, 0)] {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let mut spec = Gemm::new(ta, tb, m, n, k).alpha(0.75).beta(0.5);
            spec.lda += 2;
            spec.ldb += 1;
            spec.ldc += 3;
            spec.offset_a = 3;
            spec.offset_b = 1;
            spec.offset_c = 2;
            spec.batch = 3;
            let (ra, ca) = if ta { (k, m) } else { (m, k) };
            let (rb, cb) = if tb { (n, k) } else { (k, n) };
            spec.stride_a = ra * spec.lda + 4;
            spec.stride_b = rb * spec.ldb + 2;
            spec.stride_c = m * spec.ldc + 1;
            let _ = (ca, cb);
            let (la, lb, lc) = spec.required_lens();
            let (a, b, c0) = (rand_vec(&mut r, la + 5), rand_vec(&mut r, lb + 5), rand_vec(&mut r, lc + 5));
            let mut c = cpu.upload(&c0).unwrap();
            cpu.gemm(&spec, &cpu.upload(&a).unwrap(), &cpu.upload(&b).unwrap(), &mut c).unwrap();
            let mut c_ref = to64(&c0);
            reference::gemm(&spec, &to64(&a), &to64(&b), &mut c_ref);
            assert_close(&format!("gemm {m}x{n}x{k} ta={ta} tb={tb}"), &c, &c_ref, 1e-5, 1e-5);
        }
    }
    let spec = Gemm::nn(4, 4, 4);
    let short = cpu.alloc::<f32>(15).unwrap();
    let mut c = cpu.alloc::<f32>(16).unwrap();
    assert!(matches!(cpu.gemm(&spec, &short, &short, &mut c), Err(sparsegrad::Error::Shape { .. })));
}

#[test]
fn nonzero_rows_cols_and_gathers() {
    let cpu = Cpu::new();
    let (rows, cols) = (6usize, 5usize);
    let mut m = vec![0.0f32; rows * cols];
    m[cols + 2] = 0.5;
    m[3 * cols] = -2.0;
    m[3 * cols + 4] = 0.1;
    m[5 * cols + 2] = 1.0;
    let mb = cpu.upload(&m).unwrap();
    let (mut ri, mut ci) = (cpu.alloc::<u32>(rows).unwrap(), cpu.alloc::<u32>(cols).unwrap());
    let nz = cpu.nonzero_rows_cols(&mb, rows, cols, 0.0, &mut ri, &mut ci).unwrap();
    assert_eq!((nz.n_rows, nz.n_cols, nz.abs_threshold), (3, 3, 0.0));
    assert_eq!((&ri[..3], &ci[..3]), (&[1, 3, 5][..], &[0, 2, 4][..]));
    // threshold 0.25 * max|m| = 0.5: the 0.1 entry no longer counts.
    let nz = cpu.nonzero_rows_cols(&mb, rows, cols, 0.25, &mut ri, &mut ci).unwrap();
    assert_eq!((nz.n_rows, nz.n_cols, nz.abs_threshold), (3, 2, 0.5));
    assert_eq!(&ci[..2], &[0, 2]);
    let mut block = cpu.upload(&[f32::NAN; 6]).unwrap();
    cpu.gather_block(&mb, rows, cols, &ri, 3, &ci, 2, 0.5, &mut block).unwrap();
    assert_eq!(&block[..], &[0.0, 0.5, -2.0, 0.0, 0.0, 1.0]);
    let mut g = cpu.upload(&vec![f32::NAN; 3 * cols]).unwrap();
    cpu.gather_rows(&mb, rows, cols, &ri, 3, &mut g).unwrap();
    assert_eq!(&g[cols..2 * cols], &m[3 * cols..4 * cols]);
    let bad = cpu.upload(&[9u32]).unwrap();
    assert!(cpu.gather_rows(&mb, rows, cols, &bad, 1, &mut g).is_err());
}

#[test]
fn coo_scatter_compact_and_sparse_times_dense() {
    let cpu = Cpu::new();
    let (rows, cols, b_rows) = (5usize, 4usize, 3usize);
    let host = HostCoo {
        rows: vec![0, 0, 2, 4, 4],
        cols: vec![1, 3, 0, 2, 3],
        values: vec![1.0f32, -2.0, 0.5, 3.0, 4.0],
        shape: (rows, cols),
    };
    let mut coo = Coo::with_capacity(&cpu, 5, (rows, cols)).unwrap();
    coo.set_from_host(&cpu, &host).unwrap();
    let mut dense = cpu.upload(&vec![1.0f32; rows * cols]).unwrap();
    cpu.coo_scatter_add(&coo, 2.0, &mut dense).unwrap();
    assert_eq!(dense[1], 3.0);
    assert_eq!(dense[4 * cols + 3], 9.0);
    let (mut uniq, mut slot) = (cpu.alloc::<u32>(5).unwrap(), cpu.alloc::<u32>(5).unwrap());
    let n = cpu.coo_compact_rows(&coo, &mut uniq, &mut slot).unwrap();
    assert_eq!((n, &uniq[..3], &slot[..]), (3, &[0u32, 2, 4][..], &[0u32, 0, 1, 2, 2][..]));
    let mut r = rng(6);
    let b = rand_vec(&mut r, b_rows * cols);
    let mut out = cpu.upload(&vec![f32::NAN; b_rows * n]).unwrap();
    cpu.coo_dense_t(&coo, &slot, n, &cpu.upload(&b).unwrap(), b_rows, &mut out).unwrap();
    // out = B D^T with D the row-compacted (3, cols) matrix.
    let mut d = vec![0.0f64; n * cols];
    for e in 0..5 {
        d[slot[e] as usize * cols + host.cols[e] as usize] = host.values[e] as f64;
    }
    let expect = matmul(&to64(&b), &transpose(&d, n, cols), b_rows, cols, n);
    assert_close("coo_dense_t", &out, &expect, 1e-6, 1e-6);
    let unsorted = HostCoo { rows: vec![2, 1], cols: vec![0, 0], values: vec![1.0f32, 1.0], shape: (rows, cols) };
    assert!(coo.set_from_host(&cpu, &unsorted).is_err());
}

#[test]
fn coo_dense_t_on_ragged_random_shapes() {
    // Row counts on both sides of the CPU op's 16-row blocks, slots with several entries.
    let cpu = Cpu::new();
    let mut r = rng(17);
    for (rows, cols, b_rows, k) in
        [(7usize, 5usize, 1usize, 9usize), (40, 33, 16, 120), (90, 61, 37, 700), (3, 70, 53, 2)]
    {
        let mut picked: Vec<usize> =
            (0..rows * cols).filter(|_| r.random_bool(k as f64 / (rows * cols) as f64)).collect();
        picked.truncate(k.max(1));
        if picked.is_empty() {
            picked.push(0);
        }
        let host = HostCoo {
            rows: picked.iter().map(|&p| (p / cols) as u32).collect(),
            cols: picked.iter().map(|&p| (p % cols) as u32).collect(),
            values: picked.iter().map(|_| r.random_range(-1.0f32..1.0)).collect(),
            shape: (rows, cols),
        };
        let len = host.values.len();
        let mut coo = Coo::with_capacity(&cpu, len, (rows, cols)).unwrap();
        coo.set_from_host(&cpu, &host).unwrap();
        let (mut uniq, mut slot) = (cpu.alloc::<u32>(len).unwrap(), cpu.alloc::<u32>(len).unwrap());
        let n = cpu.coo_compact_rows(&coo, &mut uniq, &mut slot).unwrap();
        let b = rand_vec(&mut r, b_rows * cols);
        let mut out = cpu.upload(&vec![f32::NAN; b_rows * n + 3]).unwrap();
        cpu.coo_dense_t(&coo, &slot, n, &cpu.upload(&b).unwrap(), b_rows, &mut out).unwrap();
        let mut d = vec![0.0f64; n * cols];
        for e in 0..len {
            d[slot[e] as usize * cols + host.cols[e] as usize] = host.values[e] as f64;
        }
        let expect = matmul(&to64(&b), &transpose(&d, n, cols), b_rows, cols, n);
        assert_close(&format!("coo_dense_t {rows}x{cols} b_rows {b_rows}"), &out[..b_rows * n], &expect, 1e-5, 1e-5);
        assert!(out[b_rows * n..].iter().all(|v| v.is_nan()), "coo_dense_t wrote past its output");
        // In list order from zero, per output element: the plain row loop's sums, exactly.
        let slots: Vec<u32> = (0..len).map(|e| slot[e]).collect();
        let plain = reference::coo_dense_t(&host.values, &host.cols, &slots, &b, b_rows, cols, n);
        assert_eq!(&out[..b_rows * n], &plain[..], "sorted slots");
        // Slots in any order (here reversed, so not ascending): the same sums, permuted.
        let mut rev = cpu.alloc::<u32>(len).unwrap();
        for e in 0..len {
            rev[e] = (n - 1) as u32 - slot[e];
        }
        let mut out_rev = cpu.upload(&vec![f32::NAN; b_rows * n]).unwrap();
        cpu.coo_dense_t(&coo, &rev, n, &cpu.upload(&b).unwrap(), b_rows, &mut out_rev).unwrap();
        for i in 0..b_rows {
            for s in 0..n {
                assert_eq!(out_rev[i * n + (n - 1 - s)], out[i * n + s], "reversed slots, row {i} slot {s}");
            }
        }
        // Interleaved slots (each entry's column, as the merged update by columns passes
        // them): the row loop's sums in list order, exactly.
        let mut by_col = cpu.upload(&vec![f32::NAN; b_rows * cols]).unwrap();
        let col_slots = cpu.upload(&host.cols).unwrap();
        cpu.coo_dense_t(&coo, &col_slots, cols, &cpu.upload(&b).unwrap(), b_rows, &mut by_col).unwrap();
        let plain = reference::coo_dense_t(&host.values, &host.cols, &host.cols, &b, b_rows, cols, cols);
        assert_eq!(&by_col[..b_rows * cols], &plain[..], "column slots");
    }
}

#[test]
fn activations_match_finite_differences() {
    let cpu = Cpu::new();
    let mut r = rng(7);
    let n = 200;
    let x: Vec<f64> = (0..n).map(|_| r.random_range(-6.0..6.0)).collect();
    let up = rand_vec64(&mut r, n);
    let dy = vec![1.0f64; n];
    let (xb, upb, dyb) = (cpu.upload(&x).unwrap(), cpu.upload(&up).unwrap(), cpu.upload(&dy).unwrap());
    let h = 1e-6;
    let eval = |f: &dyn Fn(&sparsegrad::backend::cpu::CpuBuf<f64>, &mut sparsegrad::backend::cpu::CpuBuf<f64>),
                xs: &[f64]| {
        let mut y = cpu.alloc::<f64>(n).unwrap();
        f(&cpu.upload(xs).unwrap(), &mut y);
        y.to_vec()
    };
    let xp: Vec<f64> = x.iter().map(|v| v + h).collect();
    let xm: Vec<f64> = x.iter().map(|v| v - h).collect();
    for kind in [GeluKind::Erf, GeluKind::Tanh] {
        let f = |xs: &sparsegrad::backend::cpu::CpuBuf<f64>, y: &mut sparsegrad::backend::cpu::CpuBuf<f64>| {
            cpu.gelu(xs, y, n, kind).unwrap()
        };
        let (yp, ym) = (eval(&f, &xp), eval(&f, &xm));
        let mut dx = cpu.alloc::<f64>(n).unwrap();
        cpu.gelu_backward(&xb, &dyb, &mut dx, n, kind).unwrap();
        let fd: Vec<f64> = yp.iter().zip(&ym).map(|(a, b)| (a - b) / (2.0 * h)).collect();
        assert_close(&format!("gelu {kind:?}'"), &dx, &fd, 1e-7, 1e-6);
    }
    let y0 = eval(&|xs, y| cpu.gelu(xs, y, n, GeluKind::Erf).unwrap(), &x);
    let expect: Vec<f64> = x.iter().map(|&v| 0.5 * v * (1.0 + libm::erf(v / 2f64.sqrt()))).collect();
    assert_close("gelu erf", &y0, &expect, 1e-12, 1e-12);
    let f = |xs: &sparsegrad::backend::cpu::CpuBuf<f64>, y: &mut sparsegrad::backend::cpu::CpuBuf<f64>| {
        cpu.swiglu(xs, &upb, y, n).unwrap()
    };
    let (yp, ym) = (eval(&f, &xp), eval(&f, &xm));
    let (mut dg, mut du) = (cpu.alloc::<f64>(n).unwrap(), cpu.alloc::<f64>(n).unwrap());
    cpu.swiglu_backward(&xb, &upb, &dyb, &mut dg, &mut du, n).unwrap();
    let fd: Vec<f64> = yp.iter().zip(&ym).map(|(a, b)| (a - b) / (2.0 * h)).collect();
    assert_close("swiglu d_gate", &dg, &fd, 1e-7, 1e-6);
    let silu: Vec<f64> = x.iter().map(|&v| v / (1.0 + (-v).exp())).collect();
    assert_close("swiglu d_up", &du, &silu, 1e-12, 1e-12);
}
