//! Tests of the basis module: Gram accumulation against a naive f64 sum, subspace recovery
//! on gradients sharing a low-rank structure, orthogonality, agreement with the direct SVD
//! of the unfoldings (values and signed vectors), streaming/merge equivalence, save/load
//! (round trip and every rejection), the sparsity report, and input validation.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sparsegrad::basis::{
    direct_svd_basis, mean_sparsity_report, sparsity_report, Basis, BasisSet, GramAccumulator, ORTHO_TOL,
};
use sparsegrad::Error;
use std::collections::HashMap;
use std::path::Path;

fn uniform(rng: &mut SmallRng, len: usize) -> Vec<f64> {
    (0..len).map(|_| rng.random_range(-1.0f64..1.0)).collect()
}

/// Row-major `(rows, r)` with orthonormal columns (modified Gram-Schmidt in f64).
fn orthonormal(rng: &mut SmallRng, rows: usize, r: usize) -> Vec<f64> {
    let mut m = uniform(rng, rows * r);
    for j in 0..r {
        for k in 0..j {
            let dot: f64 = (0..rows).map(|i| m[i * r + j] * m[i * r + k]).sum();
            (0..rows).for_each(|i| m[i * r + j] -= dot * m[i * r + k]);
        }
        let norm = (0..rows).map(|i| m[i * r + j].powi(2)).sum::<f64>().sqrt();
        (0..rows).for_each(|i| m[i * r + j] /= norm);
    }
    m
}

/// Gradients sharing a rank-r structure: `G_n = U diag(scales) A_n V^T + noise E_n`, with
/// U `(out, r)`, V `(in, r)` orthonormal and A_n, E_n uniform in [-1, 1].
struct LowRank {
    grads: Vec<f32>,
    u: Vec<f64>,
    v: Vec<f64>,
}

fn low_rank(seed: u64, n: usize, out: usize, inp: usize, scales: &[f64], noise: f64) -> LowRank {
    let mut rng = SmallRng::seed_from_u64(seed);
    let r = scales.len();
    let u = orthonormal(&mut rng, out, r);
    let v = orthonormal(&mut rng, inp, r);
    let mut grads = Vec::with_capacity(n * out * inp);
    for _ in 0..n {
        let a = uniform(&mut rng, r * r);
        // UA = U diag(s) A, (out, r)
        let mut ua = vec![0.0f64; out * r];
        for i in 0..out {
            for l in 0..r {
                ua[i * r + l] = (0..r).map(|k| u[i * r + k] * scales[k] * a[k * r + l]).sum();
            }
        }
        for i in 0..out {
            for j in 0..inp {
                let s: f64 = (0..r).map(|l| ua[i * r + l] * v[j * r + l]).sum();
                grads.push((s + noise * rng.random_range(-1.0f64..1.0)) as f32);
            }
        }
    }
    LowRank { grads, u, v }
}

/// Dense random gradients (no structure), never zero.
fn dense(seed: u64, n: usize, out: usize, inp: usize) -> Vec<f32> {
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..n * out * inp).map(|_| rng.random_range(0.01f32..1.0) * if rng.random() { 1.0 } else { -1.0 }).collect()
}

/// Elementwise `|got - want| <= atol + rtol |want|`, reporting the worst index.
fn assert_close<A: Into<f64> + Copy, B: Into<f64> + Copy>(what: &str, got: &[A], want: &[B], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let mut worst = (0usize, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g.into(), w.into());
        let excess = (g - w).abs() - (atol + rtol * w.abs());
        if excess.is_nan() || excess > worst.1 {
            worst = (i, excess);
        }
    }
    let i = worst.0;
    assert!(
        worst.1 <= 0.0,
        "{what}: worst at index {i}: got {} want {} (|diff| = {:e}, atol {atol:e}, rtol {rtol:e})",
        got[i].into(),
        want[i].into(),
        (got[i].into() - want[i].into()).abs()
    );
}

fn naive_grams(grads: &[f32], n: usize, out: usize, inp: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut go, mut gi) = (vec![0.0f64; out * out], vec![0.0f64; inp * inp]);
    for g in grads.chunks_exact(out * inp).take(n) {
        for a in 0..out {
            for b in 0..out {
                go[a * out + b] += (0..inp).map(|k| g[a * inp + k] as f64 * g[b * inp + k] as f64).sum::<f64>();
            }
        }
        for a in 0..inp {
            for b in 0..inp {
                gi[a * inp + b] += (0..out).map(|k| g[k * inp + a] as f64 * g[k * inp + b] as f64).sum::<f64>();
            }
        }
    }
    (go, gi)
}

/// max |M^T M - I| in f64, independent of the library's check.
fn orth_dev(m: &[f32], n: usize) -> f64 {
    let mut worst = 0.0f64;
    for a in 0..n {
        for b in 0..n {
            let dot: f64 = (0..n).map(|i| m[i * n + a] as f64 * m[i * n + b] as f64).sum();
            worst = worst.max((dot - if a == b { 1.0 } else { 0.0 }).abs());
        }
    }
    worst
}

/// max |B_r B_r^T - U U^T| where B_r = the first r columns of the row-major (n, n) basis.
fn projector_gap(basis: &[f32], n: usize, u: &[f64], r: usize) -> f64 {
    let mut worst = 0.0f64;
    for a in 0..n {
        for b in 0..n {
            let pb: f64 = (0..r).map(|j| basis[a * n + j] as f64 * basis[b * n + j] as f64).sum();
            let pu: f64 = (0..r).map(|j| u[a * r + j] * u[b * r + j]).sum();
            worst = worst.max((pb - pu).abs());
        }
    }
    worst
}

fn accumulate(grads: &[f32], n: usize, out: usize, inp: usize) -> GramAccumulator {
    let mut acc = GramAccumulator::new(out, inp);
    acc.add_batch(grads, n).unwrap();
    acc
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

#[test]
fn grams_match_naive_f64_sum() {
    let (n, out, inp) = (13, 40, 70);
    let g = dense(1, n, out, inp);
    let (want_o, want_i) = naive_grams(&g, n, out, inp);
    let mut one_by_one = GramAccumulator::new(out, inp);
    for gi in g.chunks_exact(out * inp) {
        one_by_one.add(gi).unwrap();
    }
    for acc in [one_by_one, accumulate(&g, n, out, inp)] {
        assert_eq!(acc.count(), n as u64);
        let (go, gi) = acc.grams().unwrap();
        // f32 products of depth <= MAX_F32_DEPTH: relative error ~1e-6 of the largest entry.
        assert_close("sum G G^T", &go, &want_o, 1e-5 * max_abs(&want_o), 1e-5);
        assert_close("sum G^T G", &gi, &want_i, 1e-5 * max_abs(&want_i), 1e-5);
    }
}

#[test]
fn chunk_boundaries_do_not_change_the_sum() {
    // in = 1700 gives 9 gradients per f32 chunk, so these batches straddle flushes.
    let (n, out, inp) = (20, 3, 1700);
    let g = dense(2, n, out, inp);
    let reference = accumulate(&g, n, out, inp).grams().unwrap();
    let (want_o, want_i) = naive_grams(&g, n, out, inp);
    assert_close("G G^T vs naive", &reference.0, &want_o, 1e-5 * max_abs(&want_o), 1e-5);
    assert_close("G^T G vs naive", &reference.1, &want_i, 1e-5 * max_abs(&want_i), 1e-5);
    let per = out * inp;
    for split in [1usize, 3, 6, 8] {
        let mut acc = GramAccumulator::new(out, inp);
        for part in g.chunks(split * per) {
            acc.add_batch(part, part.len() / per).unwrap();
        }
        assert_eq!(acc.count(), n as u64);
        let (go, gi) = acc.grams().unwrap();
        assert_close(&format!("G G^T, batches of {split}"), &go, &reference.0, 1e-6 * max_abs(&reference.0), 1e-6);
        assert_close(&format!("G^T G, batches of {split}"), &gi, &reference.1, 1e-6 * max_abs(&reference.1), 1e-6);
    }
}

#[test]
fn leading_columns_span_the_shared_subspace() {
    let (n, out, inp) = (20, 40, 70);
    let scales = [4.0, 2.5, 1.5];
    let lr = low_rank(3, n, out, inp, &scales, 1e-3);
    let b = accumulate(&lr.grads, n, out, inp).basis("up_proj").unwrap();
    let r = scales.len();
    let (gp, gq) = (projector_gap(b.p(), out, &lr.u, r), projector_gap(b.q(), inp, &lr.v, r));
    assert!(gp < 1e-3, "leading {r} columns of P miss span(U): projector gap {gp:e}");
    assert!(gq < 1e-3, "leading {r} columns of Q miss span(V): projector gap {gq:e}");
    // Past the rank only noise is left.
    assert!(b.sigma_out()[r] < 0.01 * b.sigma_out()[r - 1], "sigma_out = {:?}", &b.sigma_out()[..r + 1]);
    assert!(b.sigma_in()[r] < 0.01 * b.sigma_in()[r - 1], "sigma_in = {:?}", &b.sigma_in()[..r + 1]);
}

#[test]
fn bases_are_orthogonal_and_validate() {
    for (seed, out, inp, n) in [(4u64, 40, 70, 9), (5, 17, 33, 5), (6, 17, 33, 1)] {
        let g = dense(seed, n, out, inp);
        let b = accumulate(&g, n, out, inp).basis("g").unwrap();
        let (dp, dq) = (orth_dev(b.p(), out), orth_dev(b.q(), inp));
        assert!(dp <= 1e-5, "{out}x{inp}: max |P^T P - I| = {dp:e}");
        assert!(dq <= 1e-5, "{out}x{inp}: max |Q^T Q - I| = {dq:e}");
        b.validate().unwrap();
        assert_eq!((b.shape(), b.n_grads()), ((out, inp), n as u64));
    }
}

/// Column j: its largest-magnitude entry (first on ties) is positive.
fn assert_sign_convention(what: &str, m: &[f32], n: usize) {
    for j in 0..n {
        let mut best = (0usize, 0.0f32);
        for i in 0..n {
            if m[i * n + j].abs() > best.1 {
                best = (i, m[i * n + j].abs());
            }
        }
        assert!(m[best.0 * n + j] > 0.0, "{what}: column {j}: largest entry at row {} is negative", best.0);
    }
}

#[test]
fn agrees_with_direct_svd_of_the_unfoldings() {
    let scales = [8.0, 4.5, 2.5, 1.5];
    for (seed, out, inp, n) in [(7u64, 40, 70, 12), (8, 17, 33, 3)] {
        let lr = low_rank(seed, n, out, inp, &scales, 1e-2);
        let gram = accumulate(&lr.grads, n, out, inp).basis("g").unwrap();
        let svd = direct_svd_basis(&lr.grads, n, out, inp, "g").unwrap();
        for (name, got, want) in
            [("sigma_out", gram.sigma_out(), svd.sigma_out()), ("sigma_in", gram.sigma_in(), svd.sigma_in())]
        {
            // Measured: leading values agree to ~2e-7 sigma_1, all to ~7e-6 sigma_1 (the
            // Gram route's f32-product error ~1e-6 sigma_1^2 weighs most on small values).
            let s1 = want[0] as f64;
            assert_close(
                &format!("{out}x{inp} leading {name}"),
                &got[..scales.len()],
                &want[..scales.len()],
                2e-6 * s1,
                0.0,
            );
            assert_close(&format!("{out}x{inp} {name}"), got, want, 5e-5 * s1, 0.0);
        }
        for (name, got, want, dim) in [("P", gram.p(), svd.p(), out), ("Q", gram.q(), svd.q(), inp)] {
            assert_sign_convention(&format!("gram {name}"), got, dim);
            assert_sign_convention(&format!("svd {name}"), want, dim);
            // The leading columns have well-separated singular values: with the sign
            // convention both routes give the same vectors, not just the same lines.
            let sig = if name == "P" { svd.sigma_out() } else { svd.sigma_in() };
            for j in 0..scales.len() {
                let gap = ((sig[j].powi(2) - sig[j + 1].powi(2)) as f64).min(if j > 0 {
                    (sig[j - 1].powi(2) - sig[j].powi(2)) as f64
                } else {
                    f64::MAX
                });
                assert!(gap > 0.03 * (sig[0] as f64).powi(2), "test construction: column {j} not well separated");
                let col = |m: &[f32]| (0..dim).map(|i| m[i * dim + j]).collect::<Vec<f32>>();
                // Measured worst: 4e-7.
                assert_close(&format!("{out}x{inp} {name} column {j}"), &col(got), &col(want), 5e-6, 0.0);
            }
        }
    }
}

#[test]
fn rank_deficient_unfolding_matches_direct_svd() {
    // One 17 x 33 gradient: the mode-2 unfolding (33, 17) is tall, so Q has 16 directions
    // with singular value exactly 0 (gesdd's 'A' path) that the Gram route sees as
    // eigenvalues at the rounding level.
    let (n, out, inp) = (1, 17, 33);
    let lr = low_rank(15, n, out, inp, &[8.0, 4.5, 2.5, 1.5], 0.1);
    let gram = accumulate(&lr.grads, n, out, inp).basis("g").unwrap();
    let svd = direct_svd_basis(&lr.grads, n, out, inp, "g").unwrap();
    for b in [&gram, &svd] {
        assert!(orth_dev(b.q(), inp) <= 1e-5 && orth_dev(b.p(), out) <= 1e-5);
        assert_sign_convention("Q", b.q(), inp);
    }
    let s1 = svd.sigma_in()[0] as f64;
    assert_close("sigma_in (rank 17)", &gram.sigma_in()[..out], &svd.sigma_in()[..out], 5e-5 * s1, 0.0);
    assert!(svd.sigma_in()[out..].iter().all(|&v| v == 0.0), "gesdd tail is padded with zeros");
    // sqrt of rounding-level eigenvalues: ~sqrt(1e-7) sigma_1 at most.
    assert_close("sigma_in null space", &gram.sigma_in()[out..], &svd.sigma_in()[out..], 2e-3 * s1, 0.0);
    // The null space itself: both complete an orthonormal basis of the same complement.
    // Its error is ~(Gram rounding, 1e-6 sigma_1^2) / sigma_17^2: noise 0.1 keeps sigma_17
    // well clear (measured 1e-5); at noise 0.01 the squared gap shrinks 100x and the
    // error grows to ~1e-3, the Gram route's known limit on tiny singular values.
    let proj = |m: &[f32]| -> Vec<f64> {
        let mut pr = vec![0.0f64; inp * inp];
        for a in 0..inp {
            for c in 0..inp {
                pr[a * inp + c] = (out..inp).map(|j| m[a * inp + j] as f64 * m[c * inp + j] as f64).sum();
            }
        }
        pr
    };
    assert_close("null-space projector", &proj(gram.q()), &proj(svd.q()), 1e-4, 0.0);
}

#[test]
fn streaming_and_merge_equal_one_accumulator() {
    let (n, out, inp) = (15, 40, 70);
    let lr = low_rank(9, n, out, inp, &[3.0, 1.0], 0.05);
    let per = out * inp;
    let whole = accumulate(&lr.grads, n, out, inp);
    let mut first = GramAccumulator::new(out, inp);
    let mut second = GramAccumulator::new(out, inp);
    for (i, g) in lr.grads.chunks_exact(per).enumerate() {
        if i % 3 == 0 {
            first.add(g).unwrap()
        } else {
            second.add(g).unwrap()
        }
    }
    let mut merged = first.clone();
    merged.merge(&second).unwrap();
    merged.merge(&GramAccumulator::new(out, inp)).unwrap(); // empty: no-op
    assert_eq!(merged.count(), n as u64);
    let mut chunked = GramAccumulator::new(out, inp);
    chunked.add_batch(&lr.grads[..4 * per], 4).unwrap();
    chunked.add_batch(&lr.grads[4 * per..], n - 4).unwrap();
    let (wo, wi) = whole.grams().unwrap();
    let bw = whole.basis("g").unwrap();
    for (what, acc) in [("merged", &merged), ("chunked", &chunked)] {
        let (go, gi) = acc.grams().unwrap();
        assert_close(&format!("{what} G G^T"), &go, &wo, 1e-6 * max_abs(&wo), 1e-6);
        assert_close(&format!("{what} G^T G"), &gi, &wi, 1e-6 * max_abs(&wi), 1e-6);
        let b = acc.basis("g").unwrap();
        assert_close(
            &format!("{what} sigma_out"),
            b.sigma_out(),
            bw.sigma_out(),
            1e-5 * bw.sigma_out()[0] as f64,
            1e-4,
        );
        assert_close(&format!("{what} sigma_in"), b.sigma_in(), bw.sigma_in(), 1e-5 * bw.sigma_in()[0] as f64, 1e-4);
        assert_close(
            &format!("{what} P leading columns"),
            &b.p().chunks(out).flat_map(|r| r[..2].to_vec()).collect::<Vec<_>>(),
            &bw.p().chunks(out).flat_map(|r| r[..2].to_vec()).collect::<Vec<_>>(),
            1e-5,
            0.0,
        );
    }
    let err = merged.merge(&GramAccumulator::new(out, inp + 1)).unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    assert_eq!(merged.count(), n as u64);
}

#[test]
fn add_rejects_bad_input_and_leaves_the_accumulator_unchanged() {
    let (out, inp) = (5, 7);
    let g = dense(10, 3, out, inp);
    let mut acc = GramAccumulator::new(out, inp);
    acc.add(&g[..out * inp]).unwrap();
    let before = acc.grams().unwrap();
    let check_unchanged = |acc: &GramAccumulator| {
        assert_eq!(acc.count(), 1);
        let now = acc.grams().unwrap();
        assert!(now.0.iter().zip(&before.0).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(now.1.iter().zip(&before.1).all(|(a, b)| a.to_bits() == b.to_bits()));
    };
    let err = acc.add(&g[..out * inp - 1]).unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    check_unchanged(&acc);
    let err = acc.add_batch(&g, 2).unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    check_unchanged(&acc);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut batch = g.clone();
        batch[2 * out * inp + 4] = bad; // only the last gradient of the batch is bad
        let err = acc.add_batch(&batch, 3).unwrap_err();
        assert!(matches!(err, Error::NonFinite { first_index, .. } if first_index == 2 * out * inp + 4), "{err}");
        check_unchanged(&acc);
    }
    let mut huge = g[..out * inp].to_vec();
    huge[0] = 1e20;
    assert!(matches!(acc.add(&huge).unwrap_err(), Error::InvalidArgument { .. }));
    check_unchanged(&acc);
    acc.add_batch(&[], 0).unwrap();
    check_unchanged(&acc);
}

#[test]
fn degenerate_inputs_give_errors() {
    let empty = GramAccumulator::new(4, 6);
    assert!(matches!(empty.basis("g").unwrap_err(), Error::InvalidArgument { .. }));
    let mut zero_dim = GramAccumulator::new(0, 6);
    assert!(zero_dim.add(&[]).is_err());
    assert!(direct_svd_basis(&[1.0; 6], 0, 2, 3, "g").is_err());
    assert!(matches!(direct_svd_basis(&[1.0; 5], 1, 2, 3, "g").unwrap_err(), Error::Shape { .. }));
    let b = Basis::identity("g", 3, 4);
    b.validate().unwrap();
    assert!(matches!(Basis::check_orthogonal("g", "P", &[1.0; 8], 3, ORTHO_TOL).unwrap_err(), Error::Shape { .. }));
    let mut p = b.p().to_vec();
    p[1] = f32::NAN;
    assert!(matches!(Basis::check_orthogonal("g", "P", &p, 3, ORTHO_TOL).unwrap_err(), Error::NonFinite { .. }));
    let mut p = b.p().to_vec();
    p[0] = 1.001; // deviation 2e-3
    let err = Basis::from_parts("g", 3, 4, p, b.q().to_vec(), vec![0.0; 3], vec![0.0; 4], 0).unwrap_err();
    assert!(matches!(&err, Error::InvalidBasis { group, msg } if group == "g" && msg.contains("P")), "{err}");
    let err =
        Basis::from_parts("g", 3, 4, b.p().to_vec(), b.q().to_vec(), vec![1.0, 2.0, 0.0], vec![0.0; 4], 0).unwrap_err();
    assert!(matches!(err, Error::InvalidBasis { .. }), "ascending sigma accepted: {err}");
    let set = BasisSet::new();
    assert!(matches!(set.get("up_proj").unwrap_err(), Error::MissingTensor { name, .. } if name == "up_proj"));
}

#[test]
fn sparsity_report_shows_concentration_in_the_basis() {
    let (n, out, inp) = (16, 40, 70);
    let lr = low_rank(11, n, out, inp, &[3.0, 2.0, 1.0], 1e-2);
    let b = accumulate(&lr.grads, n, out, inp).basis("g").unwrap();
    let k = out * inp / 100; // top 1%
    let rep = sparsity_report(&lr.grads, n, &b, k).unwrap();
    assert_eq!((rep.k, rep.total), (k, out * inp));
    // Rank 3 in the basis: ~9 entries hold nearly all the energy; in the original space
    // the energy is spread over all 2800 entries.
    assert!(rep.transformed_fraction > 0.9, "{rep:?}");
    assert!(rep.transformed_fraction > 3.0 * rep.original_fraction, "{rep:?}");
    let ident = sparsity_report(&lr.grads, n, &Basis::identity("g", out, inp), k).unwrap();
    assert!((ident.transformed_fraction - ident.original_fraction).abs() < 1e-6, "{ident:?}");
    assert!((ident.original_fraction - rep.original_fraction).abs() < 1e-12);
    assert!(sparsity_report(&lr.grads, n, &b, 0).is_err());
    assert!(sparsity_report(&lr.grads, n, &b, out * inp + 1).is_err());
    assert!(matches!(sparsity_report(&lr.grads[1..], n, &b, k).unwrap_err(), Error::Shape { .. }));
    assert!(matches!(sparsity_report(&vec![0.0; out * inp], 1, &b, k).unwrap_err(), Error::InvalidArgument { .. }));
}

#[test]
fn mean_sparsity_report_weighs_each_set_equally_in_its_own_basis() {
    let (out, inp) = (40, 70);
    let a = low_rank(11, 16, out, inp, &[3.0, 2.0, 1.0], 1e-2);
    let b = low_rank(12, 4, out, inp, &[1.0, 1.0, 1.0, 1.0, 1.0], 1e-1);
    let (ba, bb) =
        (accumulate(&a.grads, 16, out, inp).basis("a").unwrap(), accumulate(&b.grads, 4, out, inp).basis("b").unwrap());
    let k = out * inp / 100;
    let ra = sparsity_report(&a.grads, 16, &ba, k).unwrap();
    let rb = sparsity_report(&b.grads, 4, &bb, k).unwrap();
    let empty: &[f32] = &[];
    let mean =
        mean_sparsity_report([(a.grads.as_slice(), &ba), (empty, &ba), (b.grads.as_slice(), &bb)], k).unwrap().unwrap();
    assert_eq!((mean.k, mean.total), (k, out * inp));
    assert!((mean.original_fraction - (ra.original_fraction + rb.original_fraction) / 2.0).abs() < 1e-12);
    assert!((mean.transformed_fraction - (ra.transformed_fraction + rb.transformed_fraction) / 2.0).abs() < 1e-12);
    assert_eq!(mean_sparsity_report([(empty, &ba)], k).unwrap(), None);
    // A set that is not whole gradients is an error, not a silent skip.
    assert!(matches!(mean_sparsity_report([(&a.grads[..10], &ba)], k).unwrap_err(), Error::Shape { .. }));
}

fn sample_set() -> BasisSet {
    let mut set = BasisSet::new();
    set.insert(accumulate(&dense(12, 6, 17, 33), 6, 17, 33).basis("model.layers.0.mlp.up_proj").unwrap());
    set.insert(accumulate(&dense(13, 4, 33, 17), 4, 33, 17).basis("down_proj").unwrap());
    set.insert(Basis::identity("gate_proj", 3, 5));
    set
}

fn dir_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn save_load_round_trip_is_bitwise_and_atomic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bases.safetensors");
    let set = sample_set();
    set.save(&path).unwrap();
    set.save(&path).unwrap(); // overwrite in place
    assert_eq!(dir_entries(dir.path()), vec!["bases.safetensors".to_string()], "temp file left behind");
    let back = BasisSet::load(&path).unwrap();
    assert_eq!(back.bases.keys().collect::<Vec<_>>(), set.bases.keys().collect::<Vec<_>>());
    for (g, want) in &set.bases {
        let got = back.get(g).unwrap();
        assert_eq!((got.shape(), got.n_grads(), got.group()), (want.shape(), want.n_grads(), want.group()));
        for (a, b) in [
            (got.p(), want.p()),
            (got.q(), want.q()),
            (got.sigma_out(), want.sigma_out()),
            (got.sigma_in(), want.sigma_in()),
        ] {
            assert!(
                a.len() == b.len() && a.iter().zip(b.iter()).all(|(x, y)| x.to_bits() == y.to_bits()),
                "group {g} differs"
            );
        }
    }
    // A failed save (missing directory) reports I/O and leaves nothing behind.
    let bad = dir.path().join("no_such_dir").join("b.safetensors");
    assert!(matches!(set.save(&bad).unwrap_err(), Error::Io { .. }));
    assert_eq!(dir_entries(dir.path()), vec!["bases.safetensors".to_string()]);
    assert!(matches!(BasisSet::load(&bad).unwrap_err(), Error::Io { .. }));
}

/// A safetensors file with the given F32/F64 tensors and metadata, written directly.
fn write_raw(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>, bool)], meta: &[(&str, &str)]) {
    use safetensors::tensor::{Dtype, TensorView};
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, d, f64)| {
            if *f64 {
                d.iter().flat_map(|&v| (v as f64).to_le_bytes()).collect()
            } else {
                d.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
        })
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _, f64), b)| {
            (name.to_string(), TensorView::new(if *f64 { Dtype::F64 } else { Dtype::F32 }, shape.clone(), b).unwrap())
        })
        .collect();
    let meta: HashMap<String, String> = meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    std::fs::write(path, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
}

#[test]
fn load_rejects_bad_files_with_the_right_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.safetensors");
    let eye = Basis::identity("g", 3, 4);
    let meta = [("format", "sparsegrad-basis"), ("version", "1"), ("g.n_grads", "7")];
    let full = |p: Vec<f32>, p_shape: Vec<usize>, f64_p: bool| {
        vec![
            ("g.P", p_shape, p, f64_p),
            ("g.Q", vec![4, 4], eye.q().to_vec(), false),
            ("g.sigma_out", vec![3], vec![0.0; 3], false),
            ("g.sigma_in", vec![4], vec![0.0; 4], false),
        ]
    };
    // Sanity: the well-formed file loads.
    write_raw(&path, &full(eye.p().to_vec(), vec![3, 3], false), &meta);
    assert_eq!(BasisSet::load(&path).unwrap().get("g").unwrap().n_grads(), 7);

    let mut missing = full(eye.p().to_vec(), vec![3, 3], false);
    missing.remove(1);
    write_raw(&path, &missing, &meta);
    assert!(matches!(BasisSet::load(&path).unwrap_err(), Error::MissingTensor { name, .. } if name == "g.Q"));

    write_raw(&path, &full(vec![0.5; 12], vec![3, 4], false), &meta);
    assert!(matches!(BasisSet::load(&path).unwrap_err(), Error::Shape { .. }));

    let mut short_sigma = full(eye.p().to_vec(), vec![3, 3], false);
    short_sigma[2] = ("g.sigma_out", vec![2], vec![0.0; 2], false);
    write_raw(&path, &short_sigma, &meta);
    assert!(matches!(BasisSet::load(&path).unwrap_err(), Error::Shape { .. }));

    write_raw(&path, &full(eye.p().to_vec(), vec![3, 3], true), &meta);
    assert!(matches!(BasisSet::load(&path).unwrap_err(), Error::Dtype { name, .. } if name == "g.P"));

    let mut skewed = eye.p().to_vec();
    skewed[1] = 0.3;
    write_raw(&path, &full(skewed, vec![3, 3], false), &meta);
    assert!(matches!(BasisSet::load(&path).unwrap_err(), Error::InvalidBasis { group, .. } if group == "g"));

    write_raw(&path, &full(eye.p().to_vec(), vec![3, 3], false), &meta[..2]);
    assert!(matches!(BasisSet::load(&path).unwrap_err(), Error::Metadata { key, .. } if key == "g.n_grads"));
    write_raw(&path, &full(eye.p().to_vec(), vec![3, 3], false), &meta[1..]);
    assert!(matches!(BasisSet::load(&path).unwrap_err(), Error::Metadata { key, .. } if key == "format"));

    let mut extra = full(eye.p().to_vec(), vec![3, 3], false);
    extra.push(("g.R", vec![1], vec![1.0], false));
    write_raw(&path, &extra, &meta);
    assert!(matches!(BasisSet::load(&path).unwrap_err(), Error::Format { .. }));

    // A basis that is saved fine but is not orthogonal is caught on load.
    let mut bad = sample_set();
    let good = bad.get("down_proj").unwrap().clone();
    let (o, i) = good.shape();
    let scaled = good.p().iter().map(|v| v * 1.01).collect();
    let (q, so, si) = (good.q().to_vec(), good.sigma_out().to_vec(), good.sigma_in().to_vec());
    bad.insert(Basis::from_parts_unchecked("down_proj", o, i, scaled, q, so, si, good.n_grads()));
    bad.save(&path).unwrap();
    assert!(matches!(BasisSet::load(&path).unwrap_err(), Error::InvalidBasis { group, .. } if group == "down_proj"));

    // Truncated anywhere: in the data, in the header, inside the length prefix.
    sample_set().save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    for keep in [bytes.len() - 1, bytes.len() / 2, 40, 7, 0] {
        std::fs::write(&path, &bytes[..keep]).unwrap();
        assert!(matches!(BasisSet::load(&path).unwrap_err(), Error::Format { .. }), "truncated to {keep} bytes");
    }
    let mut rng = SmallRng::seed_from_u64(14);
    for len in [8usize, 100, 5000] {
        let garbage: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        std::fs::write(&path, &garbage).unwrap();
        assert!(matches!(BasisSet::load(&path).unwrap_err(), Error::Format { .. }), "{len} garbage bytes");
    }
    // A plausible header length followed by non-JSON.
    let mut fake = 16u64.to_le_bytes().to_vec();
    fake.extend_from_slice(b"not json at all!");
    std::fs::write(&path, &fake).unwrap();
    assert!(matches!(BasisSet::load(&path).unwrap_err(), Error::Format { .. }));
}

#[test]
fn reflection_bases_are_orthogonal_and_oversized_ones_are_errors() {
    let b = Basis::reflection("r", 37, 12, 5).unwrap();
    assert_eq!(b.shape(), (37, 12));
    // The full O(n^3) check, not only the quick one the constructor runs.
    Basis::from_parts("r", 37, 12, b.p().to_vec(), b.q().to_vec(), vec![1.0; 37], vec![1.0; 12], 1).unwrap();
    assert_ne!(Basis::reflection("r", 37, 12, 6).unwrap().fingerprint(), b.fingerprint());
    let e = Basis::reflection("r", usize::MAX / 2, 3, 1).unwrap_err().to_string();
    assert!(e.contains("overflows"), "{e}");
}

#[test]
fn group_names_that_would_break_files_or_output_are_refused() {
    let mut acc = GramAccumulator::new(3, 2);
    acc.add(&[0.5, -1.0, 0.25, 2.0, -0.75, 1.5]).unwrap();
    for (name, needle) in [
        ("", "empty"),
        ("up\nproj", "`up\\nproj` holds a control character"),
        ("a\0b", "control character"),
        ("__metadata__x", "`__metadata__x` starts with `__metadata__`"),
    ] {
        let e = acc.basis(name).unwrap_err().to_string();
        assert!(e.contains(needle), "{name:?}: {e}");
    }
    // Dots, slashes and spaces are fine (per-layer groups are named `layers.3.up`).
    for name in ["layers.3.up", "a/b", "up proj", "metadata__"] {
        acc.basis(name).unwrap();
    }
    // A basis renamed after the fact cannot be saved under a bad name either.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.safetensors");
    let mut set = BasisSet::new();
    set.insert(acc.basis("up").unwrap().with_group("__metadata__"));
    let e = set.save(&path).unwrap_err().to_string();
    assert!(e.contains("safetensors reserves"), "{e}");
    assert!(!path.exists(), "nothing is written");
}

#[test]
fn all_zero_gradients_have_no_basis_and_the_refusal_names_the_group() {
    let mut acc = GramAccumulator::new(4, 3);
    for _ in 0..3 {
        acc.add(&[0.0; 12]).unwrap();
    }
    match acc.basis("down_proj") {
        Err(Error::InvalidBasis { group, msg }) => {
            assert_eq!(group, "down_proj");
            assert!(msg.contains("all 3 gradients added are zero"), "{msg}");
        }
        other => panic!("expected InvalidBasis, got {:?}", other.map(|b| b.group().to_string())),
    }
    // One nonzero gradient among zeros is a basis.
    let mut g = vec![0.0; 12];
    g[5] = 1e-3;
    acc.add(&g).unwrap();
    acc.basis("down_proj").unwrap().validate().unwrap();
}
