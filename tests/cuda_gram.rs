//! The preliminary phase's Gram accumulation on CUDA against the CPU: the
//! `gram_accumulate` op (cuBLAS SSYRK) against its OpenBLAS twin on seeded ragged shapes
//! with poisoned lower triangles and tails, the device accumulator against the host
//! `GramAccumulator` (sums and bases), non-finite gradients, the op's validator, and the
//! ledger: adding a gradient is two SYRKs and nothing else (no copy), the bases one
//! download per group. Each check also runs on the CPU backend (the harness, and the device
//! route's CPU twin). tests/cuda_gram_emulator.rs holds the ledger to the emulated cuBLAS.
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::*;
use rand::Rng;
use sparsegrad::backend::DenseOps;
use sparsegrad::perf::{BlasRoutine, CopyDir, ElemType, EventKind};
use sparsegrad::{Backend, Cpu, DeviceGramAccumulator, Error, GramAccumulator, GramSet, ProfileOptions};

const SHAPES: &[(usize, usize)] = &[(1, 1), (1, 17), (17, 1), (33, 70), (70, 33), (129, 257), (300, 40)];

/// A value that must survive untouched.
const SENTINEL: f32 = 1e30;

fn shapes(big: bool) -> Vec<(usize, usize)> {
    let mut s = SHAPES.to_vec();
    if big {
        s.push((1000, 1600));
    }
    s
}

/// `grams` of `(out, in)` with random upper triangles, SENTINEL lower triangles and a
/// SENTINEL tail of 5 entries.
fn poisoned_grams(r: &mut rand::rngs::SmallRng, out: usize, inp: usize) -> Vec<f32> {
    let mut v = Vec::new();
    for n in [out, inp] {
        for row in 0..n {
            for col in 0..n {
                v.push(if col >= row { r.random_range(-1.0f32..1.0) } else { SENTINEL });
            }
        }
    }
    v.extend([SENTINEL; 5]);
    v
}

fn check_op<B: Backend>(dev: &B, big: bool) {
    let cpu = Cpu::new();
    let mut r = rng(31);
    for (out, inp) in shapes(big) {
        let g = rand_f32(&mut r, out * inp + 3);
        let grams = poisoned_grams(&mut r, out, inp);
        let mut want = up(&cpu, &grams);
        cpu.gram_accumulate(&up(&cpu, &g), out, inp, &mut want).unwrap();
        let mut got = up(dev, &grams);
        dev.gram_accumulate(&up(dev, &g), out, inp, &mut got).unwrap();
        let (got, want) = (down(dev, &got, grams.len()), down(&cpu, &want, grams.len()));
        let what = format!("gram_accumulate ({out}, {inp}) on {}", dev.name());
        // Untouched: every lower-triangle entry and the tail, bit for bit.
        let untouched: Vec<usize> = (0..grams.len()).filter(|&i| grams[i] == SENTINEL).collect();
        let pick = |v: &[f32]| untouched.iter().map(|&i| v[i]).collect::<Vec<_>>();
        assert_bits(&format!("{what}: lower triangles and tail"), &pick(&got), &pick(&grams));
        // Updated: each dot product has depth in (g g^T) or out (g^T g) of values in [-1, 1).
        let depth = out.max(inp) as f32;
        assert_close(&what, &got, &want, 4e-7 * depth + 1e-6, 1e-5);
        // And it changed what it had to: the diagonal gained each row's sum of squares.
        let row0: f32 = g[..inp].iter().map(|v| v * v).sum();
        assert!((got[0] - grams[0] - row0).abs() <= 1e-5 * row0.max(1.0), "{what}: diagonal (0, 0)");
    }
}

fn check_validator<B: Backend>(dev: &B) {
    let (out, inp) = (4, 6);
    let mut grams = dev.alloc::<f32>(out * out + inp * inp).unwrap();
    let short_g = dev.alloc::<f32>(out * inp - 1).unwrap();
    assert!(matches!(dev.gram_accumulate(&short_g, out, inp, &mut grams), Err(Error::Shape { .. })));
    let g = dev.alloc::<f32>(out * inp).unwrap();
    let mut short = dev.alloc::<f32>(out * out + inp * inp - 1).unwrap();
    assert!(matches!(dev.gram_accumulate(&g, out, inp, &mut short), Err(Error::Shape { .. })));
    let err = dev.gram_accumulate(&g, 1 << 31, 0, &mut grams).unwrap_err();
    assert!(err.to_string().contains("32-bit"), "{err}");
    assert!(dev.gram_accumulate(&g, usize::MAX, 2, &mut grams).is_err());
    // Empty shapes do nothing.
    dev.gram_accumulate(&g, 0, inp, &mut grams).unwrap();
    assert!(down(dev, &grams, out * out + inp * inp).iter().all(|&v| v == 0.0));
}

fn check_accumulator<B: Backend + Clone>(dev: &B, big: bool) {
    let mut r = rng(37);
    for (s, (out, inp)) in shapes(big).into_iter().enumerate() {
        let n = [1, 3, 7][s % 3];
        let mut acc = DeviceGramAccumulator::<B>::new(dev, out, inp);
        let mut host = GramAccumulator::new(out, inp);
        for _ in 0..n {
            let g = rand_f32(&mut r, out * inp);
            acc.add(&up(dev, &g)).unwrap();
            host.add(&g).unwrap();
        }
        assert_eq!((acc.count(), acc.shape()), (n as u64, (out, inp)));
        assert_eq!(acc.memory_bytes(), (out * out + inp * inp) * 4);
        let (got, want) = (acc.to_host().unwrap(), host);
        assert_eq!(got.count(), n as u64);
        let ((go, gi), (wo, wi)) = (got.grams().unwrap(), want.grams().unwrap());
        let what = format!("device Grams ({out}, {inp}) x {n} on {}", dev.name());
        let tol = 1e-6 * (n * out.max(inp)) as f32;
        let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
        assert_close(&format!("{what}: (out, out)"), &f(&go), &f(&wo), tol, 1e-5);
        assert_close(&format!("{what}: (in, in)"), &f(&gi), &f(&wi), tol, 1e-5);
    }
}

/// `n` gradients `sum_j s_j c_nj u_j w_j^T + noise` with `s_j = 2^-j`: both Grams have
/// well-separated leading eigenvalues, so their eigenvectors are well defined.
fn structured(r: &mut rand::rngs::SmallRng, out: usize, inp: usize, n: usize) -> Vec<Vec<f32>> {
    let rank = 6;
    let u: Vec<Vec<f32>> = (0..rank).map(|_| rand_f32(r, out)).collect();
    let w: Vec<Vec<f32>> = (0..rank).map(|_| rand_f32(r, inp)).collect();
    (0..n)
        .map(|_| {
            let c: Vec<f32> = (0..rank).map(|j| r.random_range(0.5f32..1.5) * 0.5f32.powi(j as i32)).collect();
            let mut g = rand_range(r, out * inp, -1e-4, 1e-4);
            for j in 0..rank {
                for (o, &uo) in u[j].iter().enumerate() {
                    for (i, &wi) in w[j].iter().enumerate() {
                        g[o * inp + i] += c[j] * uo * wi;
                    }
                }
            }
            g
        })
        .collect()
}

fn check_basis<B: Backend + Clone>(dev: &B) {
    let mut r = rng(41);
    for (out, inp) in [(40, 24), (24, 70), (129, 65)] {
        let grads = structured(&mut r, out, inp, 9);
        let mut set = GramSet::<B>::with_route(dev, true);
        let mut host = GramAccumulator::new(out, inp);
        for g in &grads {
            set.add("up", &up(dev, g), out, inp).unwrap();
            host.add(g).unwrap();
        }
        let ((got, timing), want) = (set.basis("up").unwrap(), host.basis("up").unwrap());
        got.validate().unwrap();
        assert!(timing.download_seconds > 0.0 && timing.eigensolve_seconds > 0.0);
        assert_eq!((got.shape(), got.n_grads()), ((out, inp), 9));
        let what = format!("basis ({out}, {inp}) on {}", dev.name());
        for (side, n, (gs, ws), (gm, wm)) in [
            ("P", out, (got.sigma_out(), want.sigma_out()), (got.p(), want.p())),
            ("Q", inp, (got.sigma_in(), want.sigma_in()), (got.q(), want.q())),
        ] {
            // Singular values that hold energy agree; so do the leading vectors whose
            // eigenvalues are at least 2x from their neighbours (sign fixed by convention).
            let lead: Vec<f32> = gs.iter().zip(ws).filter(|(_, &w)| w >= 1e-2 * ws[0]).map(|(&g, _)| g).collect();
            assert_close(&format!("{what}: sigma of {side}"), &lead, &ws[..lead.len()], 0.0, 1e-4);
            let lambda = |j: usize| (ws[j] as f64).powi(2);
            for j in 0..lead.len().min(5) {
                let separated = (j == 0 || lambda(j - 1) >= 2.0 * lambda(j)) && lambda(j) >= 2.0 * lambda(j + 1);
                if separated {
                    let col = |m: &[f32]| (0..n).map(|i| m[i * n + j]).collect::<Vec<_>>();
                    assert_close(&format!("{what}: column {j} of {side}"), &col(gm), &col(wm), 1e-4, 1e-3);
                }
            }
            assert!(lead.len() >= 3, "{what}: the test spectrum has too few leading values in {side}");
        }
    }
}

fn check_nonfinite<B: Backend + Clone>(dev: &B) {
    let (out, inp) = (6, 9);
    for bad in [f32::NAN, f32::INFINITY, 1e25] {
        let mut acc = DeviceGramAccumulator::<B>::new(dev, out, inp);
        let mut g = rand_f32(&mut rng(43), out * inp);
        g[out * inp - 1] = bad;
        acc.add(&up(dev, &g)).unwrap();
        let err = acc.to_host().unwrap_err();
        assert!(matches!(err, Error::NonFinite { .. }), "{bad} on {}: {err}", dev.name());
    }
}

cuda_test!(fn gram_accumulate_matches_the_cpu_and_leaves_the_lower_triangles(cuda) {
    check_op(&cuda, big_shapes());
    check_validator(&cuda);
});

cuda_test!(fn device_grams_match_the_host_accumulator(cuda) {
    check_accumulator(&cuda, big_shapes());
    check_nonfinite(&cuda);
});

cuda_test!(fn device_bases_equal_the_host_bases(cuda) {
    assert!(GramSet::<sparsegrad::Cuda>::new(&cuda).on_device());
    check_basis(&cuda);
});

cuda_test!(fn adding_a_gradient_is_two_syrks_and_no_copy(cuda) {
    let (out, inp) = (33, 70);
    let mut r = rng(47);
    let mut acc = DeviceGramAccumulator::<sparsegrad::Cuda>::new(&cuda, out, inp);
    let grads: Vec<_> = (0..3).map(|_| up(&cuda, &rand_f32(&mut r, out * inp))).collect();
    acc.add(&grads[0]).unwrap(); // allocates the Grams, outside the window
    cuda.profile_begin(ProfileOptions::default()).unwrap();
    acc.add(&grads[1]).unwrap();
    acc.add(&grads[2]).unwrap();
    let events = cuda.profile_end().unwrap();
    let dims: Vec<(u64, u64, u64)> = events
        .iter()
        .map(|e| match e.kind {
            EventKind::Gemm {
                routine: BlasRoutine::Syrk,
                m,
                n,
                k,
                batch: 1,
                operands: ElemType::F32,
                output: ElemType::F32,
                accumulate: true,
                ..
            } => (m, n, k),
            ref other => panic!("adding a gradient made {other:?}"),
        })
        .collect();
    let (o, i) = (out as u64, inp as u64);
    assert_eq!(dims, [(o, o, i), (i, i, o), (o, o, i), (i, i, o)]);
    cuda.profile_begin(ProfileOptions::default()).unwrap();
    let host = acc.to_host().unwrap();
    let events = cuda.profile_end().unwrap();
    let copies: Vec<_> = events.iter().filter_map(|e| match e.kind {
        EventKind::Copy { dir, bytes, .. } => Some((dir, bytes)),
        _ => None,
    }).collect();
    // One download of both Grams, then the backend's read of its device health block (8 u64
    // words: the error bits and the first failed finiteness check; every download checks it).
    assert_eq!(copies, [(CopyDir::DeviceToHost, (o * o + i * i) * 4), (CopyDir::DeviceToHost, 64)]);
    assert!(events.iter().all(|e| !e.is_launch()), "no device work in the download");
    assert_eq!(host.count(), 3);
});

#[test]
fn harness_on_cpu() {
    let cpu = Cpu::new();
    check_op(&cpu, false);
    check_validator(&cpu);
    check_accumulator(&cpu, false);
    check_nonfinite(&cpu);
    check_basis(&cpu);
}
