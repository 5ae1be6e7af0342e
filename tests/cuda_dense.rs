//! Dense ops on CUDA against the CPU backend: GEMM (f32 and bf16 operands, f32 and bf16 output; all transpose
//! combinations, offsets, leading dimensions, batches, alpha/beta, k = 0), casts, bias add
//! and gradient, the non-finite count and axpy, the checked cast and copy. Outputs are poisoned before each op.
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::*;
use half::bf16;
use rand::rngs::SmallRng;
use rand::Rng;
use sparsegrad::backend::{DenseOps, Gemm};
use sparsegrad::{Backend, Cpu};

const SHAPES: &[(usize, usize)] =
    &[(1, 1), (1, 17), (17, 1), (17, 1000), (1000, 17), (70000, 3), (3, 1600), (129, 257)];

/// A value that must survive untouched (finite, so no BLAS propagates it by accident).
const SENTINEL: f32 = 1e30;

fn gemm_specs() -> Vec<Gemm> {
    let mut specs = Vec::new();
    for &(m, n, k) in &[(1, 1, 1), (17, 5, 3), (33, 17, 1000), (1000, 17, 33), (64, 1600, 7), (5, 7, 0), (2, 3, 1)] {
        for ta in [false, true] {
            for tb in [false, true] {
                for (alpha, beta) in [(1.0, 0.0), (0.5, -1.25)] {
                    specs.push(Gemm::new(ta, tb, m, n, k).alpha(alpha).beta(beta));
                }
            }
        }
    }
    // Sub-matrices: offsets, padded leading dimensions, strided batches.
    for ta in [false, true] {
        for tb in [false, true] {
            for (alpha, beta) in [(1.0, 0.0), (-0.75, 0.5)] {
                let (m, n, k) = (9, 13, 11);
                let mut g = Gemm::new(ta, tb, m, n, k).alpha(alpha).beta(beta);
                g.lda += 3;
                g.ldb += 2;
                g.ldc += 5;
                g.offset_a = 4;
                g.offset_b = 1;
                g.offset_c = 7;
                g.batch = 3;
                let (ra, rb) = (if ta { k } else { m }, if tb { n } else { k });
                g.stride_a = ra * g.lda + 5;
                g.stride_b = rb * g.ldb + 2;
                g.stride_c = m * g.ldc + 3;
                specs.push(g);
            }
        }
    }
    let mut zero_k = Gemm::nn(4, 6, 0).beta(0.0);
    zero_k.batch = 2;
    zero_k.stride_c = 24;
    specs.push(zero_k);
    // Gemm::new derives lda/ldb = k for k = 0, which `validate` rejects (it wants >= 1).
    for g in &mut specs {
        g.lda = g.lda.max(1);
        g.ldb = g.ldb.max(1);
    }
    specs
}

fn inputs(r: &mut SmallRng, spec: &Gemm) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (la, lb, lc) = spec.required_lens();
    let a = rand_f32(r, la + 3);
    let b = rand_f32(r, lb + 2);
    let c = if spec.beta == 0.0 { vec![SENTINEL; lc + 5] } else { rand_f32(r, lc + 5) };
    (a, b, c)
}

fn gemm_tolerance(spec: &Gemm) -> f32 {
    2e-6 * (spec.k as f32 + 1.0)
}

fn check_gemm<B: Backend>(dev: &B) {
    let cpu = Cpu::new();
    let mut r = rng(11);
    for spec in gemm_specs() {
        let (a, b, c) = inputs(&mut r, &spec);
        let mut want = up(&cpu, &c);
        cpu.gemm(&spec, &up(&cpu, &a), &up(&cpu, &b), &mut want).unwrap();
        let mut got = up(dev, &c);
        dev.gemm(&spec, &up(dev, &a), &up(dev, &b), &mut got).unwrap();
        assert_close(&format!("gemm {spec:?}"), &down(dev, &got, c.len()), &want, gemm_tolerance(&spec), 1e-5);
    }
}

fn check_gemm_bf16<B: Backend>(dev: &B) {
    let cpu = Cpu::new();
    let mut r = rng(12);
    for spec in gemm_specs() {
        let (a, b, c) = inputs(&mut r, &spec);
        let a: Vec<bf16> = a.iter().map(|&v| bf16::from_f32(v)).collect();
        let b: Vec<bf16> = b.iter().map(|&v| bf16::from_f32(v)).collect();
        let mut want = up(&cpu, &c);
        cpu.gemm_bf16(&spec, &up(&cpu, &a), &up(&cpu, &b), &mut want).unwrap();
        let mut got = up(dev, &c);
        dev.gemm_bf16(&spec, &up(dev, &a), &up(dev, &b), &mut got).unwrap();
        assert_close(&format!("gemm_bf16 {spec:?}"), &down(dev, &got, c.len()), &want, gemm_tolerance(&spec), 1e-5);
    }
}

/// bf16 operands into a bf16 C: the f32 product rounded once, so each element is within
/// the f32 GEMM's tolerance plus one bf16 ulp (2^-7 relative) of the CPU's; elements
/// the product does not write keep their bits; k = 0 is refused on both.
fn check_gemm_bf16_out<B: Backend>(dev: &B) {
    let cpu = Cpu::new();
    let mut r = rng(14);
    let half = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<bf16>>();
    let wide = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
    for spec in gemm_specs() {
        let (a, b, c) = inputs(&mut r, &spec);
        let (a, b, c) = (half(&a), half(&b), half(&c));
        let mut want = up(&cpu, &c);
        let cpu_run = cpu.gemm_bf16_out(&spec, &up(&cpu, &a), &up(&cpu, &b), &mut want);
        let mut got = up(dev, &c);
        let dev_run = dev.gemm_bf16_out(&spec, &up(dev, &a), &up(dev, &b), &mut got);
        if spec.k == 0 {
            let e = dev_run.unwrap_err().to_string();
            assert!(cpu_run.is_err() && e.contains("gemm_bf16_out") && e.contains("k = 0"), "{e}");
            continue;
        }
        cpu_run.unwrap();
        dev_run.unwrap();
        let (g, w) = (wide(&down(dev, &got, c.len())), wide(&down(&cpu, &want, c.len())));
        assert_close(&format!("gemm_bf16_out {spec:?}"), &g, &w, gemm_tolerance(&spec), 2f32.powi(-7));
        let (_, _, lc) = spec.required_lens();
        assert_eq!(&g[lc..], &wide(&c)[lc..], "gemm_bf16_out {spec:?}: past C's last element");
    }
}

/// Random finite values over many magnitudes, plus exact round-to-nearest-even ties.
fn cast_inputs(r: &mut SmallRng, n: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n).map(|_| r.random_range(-1.0f32..1.0) * 10f32.powi(r.random_range(-30..30))).collect();
    let ties = [0x3f80_8000u32, 0x3f81_8000, 0xbf80_8000, 0x4049_0fdb, 0x0000_8000, 0x7f7f_ffff, 0x0001_0000];
    for (i, &t) in ties.iter().enumerate().take(n) {
        v[i] = f32::from_bits(t);
    }
    if n > 8 {
        v[7] = 0.0;
        v[8] = -0.0;
    }
    v
}

fn check_casts<B: Backend>(dev: &B, big: bool) {
    let cpu = Cpu::new();
    let mut r = rng(13);
    let mut sizes = vec![1, 17, 1000, 1600];
    if big {
        sizes.push(BIG);
    }
    for &n in &sizes {
        let x = cast_inputs(&mut r, n);
        let mut want = poisoned(&cpu, n + 3, bf16::from_bits(0xffff));
        cpu.cast_to_bf16(&up(&cpu, &x), &mut want, n).unwrap();
        let mut got = poisoned(dev, n + 3, bf16::from_bits(0xffff));
        dev.cast_to_bf16(&up(dev, &x), &mut got, n).unwrap();
        let (g, w) = (down(dev, &got, n + 3), down(&cpu, &want, n + 3));
        let bits = |v: &[bf16]| v.iter().map(|h| h.to_bits()).collect::<Vec<u16>>();
        assert_same(&format!("cast_to_bf16 n={n}"), &bits(&g), &bits(&w));

        let h: Vec<bf16> = (0..n)
            .map(|_| bf16::from_bits(r.random_range(0..0x7f80u16) | if r.random_bool(0.5) { 0x8000 } else { 0 }))
            .collect();
        let mut want = poisoned(&cpu, n + 3, f32::NAN);
        cpu.cast_from_bf16(&up(&cpu, &h), &mut want, n).unwrap();
        let mut got = poisoned(dev, n + 3, f32::NAN);
        dev.cast_from_bf16(&up(dev, &h), &mut got, n).unwrap();
        assert_bits(&format!("cast_from_bf16 n={n}"), &down(dev, &got, n + 3), &down(&cpu, &want, n + 3));
    }
}

/// The four-pair casts equal four single casts bit for bit (ragged lengths, an empty pair,
/// poisoned tails left alone); a short buffer is refused naming its pair.
fn check_casts_x4<B: Backend>(dev: &B) {
    let mut r = rng(17);
    for lens in [[1usize, 17, 0, 1000], [4099, 3, 70_001, 5], [0, 0, 0, 0], [64, 64, 64, 64]] {
        let xs: Vec<Vec<f32>> = lens.iter().map(|&n| cast_inputs(&mut r, n)).collect();
        let srcs: Vec<B::Buf<f32>> = xs.iter().map(|x| up(dev, x)).collect();
        let mut one: Vec<B::Buf<bf16>> = lens.iter().map(|&n| poisoned(dev, n + 3, bf16::from_bits(0xffff))).collect();
        for p in 0..4 {
            dev.cast_to_bf16(&srcs[p], &mut one[p], lens[p]).unwrap();
        }
        let mut four: Vec<B::Buf<bf16>> = lens.iter().map(|&n| poisoned(dev, n + 3, bf16::from_bits(0xffff))).collect();
        let [a, b, c, d] = &mut four[..] else { unreachable!() };
        dev.cast_to_bf16_x4([&srcs[0], &srcs[1], &srcs[2], &srcs[3]], [a, b, c, d], lens).unwrap();
        let bits = |v: &[bf16]| v.iter().map(|h| h.to_bits()).collect::<Vec<u16>>();
        for p in 0..4 {
            let (g, w) = (down(dev, &four[p], lens[p] + 3), down(dev, &one[p], lens[p] + 3));
            assert_same(&format!("cast_to_bf16_x4 pair {p} of {lens:?}"), &bits(&g), &bits(&w));
        }
        // Back to f32 from the rounded values.
        let mut one_f: Vec<B::Buf<f32>> = lens.iter().map(|&n| poisoned(dev, n + 3, f32::NAN)).collect();
        for p in 0..4 {
            dev.cast_from_bf16(&one[p], &mut one_f[p], lens[p]).unwrap();
        }
        let mut four_f: Vec<B::Buf<f32>> = lens.iter().map(|&n| poisoned(dev, n + 3, f32::NAN)).collect();
        let [a, b, c, d] = &mut four_f[..] else { unreachable!() };
        dev.cast_from_bf16_x4([&one[0], &one[1], &one[2], &one[3]], [a, b, c, d], lens).unwrap();
        for p in 0..4 {
            let (g, w) = (down(dev, &four_f[p], lens[p] + 3), down(dev, &one_f[p], lens[p] + 3));
            assert_bits(&format!("cast_from_bf16_x4 pair {p} of {lens:?}"), &g, &w);
        }
    }
    let src: Vec<B::Buf<f32>> = (0..4).map(|_| up(dev, &[1.0f32; 8])).collect();
    let mut dst: Vec<B::Buf<bf16>> = (0..4).map(|p| dev.alloc(if p == 2 { 7 } else { 8 }).unwrap()).collect();
    let [a, b, c, d] = &mut dst[..] else { unreachable!() };
    let e = dev.cast_to_bf16_x4([&src[0], &src[1], &src[2], &src[3]], [a, b, c, d], [8; 4]).unwrap_err().to_string();
    assert!(e.contains("pair 2"), "{e}");
}

fn check_bias<B: Backend>(dev: &B) {
    let cpu = Cpu::new();
    let mut r = rng(14);
    for &(rows, cols) in SHAPES.iter().chain(&[(0, 5), (5, 0)]) {
        let y = rand_f32(&mut r, rows * cols + 2);
        let bias = rand_f32(&mut r, cols);
        let mut want = up(&cpu, &y);
        cpu.add_bias(&mut want, &up(&cpu, &bias), rows, cols).unwrap();
        let mut got = up(dev, &y);
        dev.add_bias(&mut got, &up(dev, &bias), rows, cols).unwrap();
        assert_bits(&format!("add_bias {rows}x{cols}"), &down(dev, &got, y.len()), &down(&cpu, &want, y.len()));

        let g = up(&cpu, &y);
        let gd = up(dev, &y);
        let atol = 1e-6 * (rows as f32 + 1.0);
        // beta = 0 must not read db (poisoned with NaN), beta != 0 accumulates.
        let mut want = poisoned(&cpu, cols + 1, f32::NAN);
        cpu.bias_grad(&g, rows, cols, &mut want, 0.0).unwrap();
        let mut got = poisoned(dev, cols + 1, f32::NAN);
        dev.bias_grad(&gd, rows, cols, &mut got, 0.0).unwrap();
        assert_close(
            &format!("bias_grad beta=0 {rows}x{cols}"),
            &down(dev, &got, cols + 1),
            &down(&cpu, &want, cols + 1),
            atol,
            1e-5,
        );
        let db = rand_f32(&mut r, cols + 1);
        let mut want = up(&cpu, &db);
        cpu.bias_grad(&g, rows, cols, &mut want, 0.5).unwrap();
        let mut got = up(dev, &db);
        dev.bias_grad(&gd, rows, cols, &mut got, 0.5).unwrap();
        assert_close(
            &format!("bias_grad beta=0.5 {rows}x{cols}"),
            &down(dev, &got, cols + 1),
            &down(&cpu, &want, cols + 1),
            atol,
            1e-5,
        );
    }
}

fn check_nonfinite_and_axpy<B: Backend>(dev: &B, big: bool) {
    let cpu = Cpu::new();
    let mut r = rng(15);
    let mut sizes = vec![1, 17, 1000, 1600];
    if big {
        sizes.push(BIG);
    }
    for &n in &sizes {
        let mut x = rand_f32(&mut r, n);
        assert_eq!(dev.count_nonfinite(&up(dev, &x), n).unwrap(), (0, 0), "no non-finite values, n={n}");
        let spots = [n - 1, n / 2, n / 3, n.saturating_sub(2)];
        for (i, &p) in spots.iter().enumerate() {
            x[p] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN][i];
        }
        let want = cpu.count_nonfinite(&up(&cpu, &x), n).unwrap();
        assert_eq!(dev.count_nonfinite(&up(dev, &x), n).unwrap(), want, "count_nonfinite n={n}");
        // Only the first n - 1 entries: the last NaN is out of range.
        let want = cpu.count_nonfinite(&up(&cpu, &x), n - 1).unwrap();
        assert_eq!(dev.count_nonfinite(&up(dev, &x), n - 1).unwrap(), want, "count_nonfinite prefix n={n}");

        let x = rand_f32(&mut r, n);
        let y = rand_f32(&mut r, n + 1);
        let mut want = up(&cpu, &y);
        cpu.axpy(-0.3, &up(&cpu, &x), &mut want, n).unwrap();
        let mut got = up(dev, &y);
        dev.axpy(-0.3, &up(dev, &x), &mut got, n).unwrap();
        assert_bits(&format!("axpy n={n}"), &down(dev, &got, n + 1), &down(&cpu, &want, n + 1));
    }
}

/// The checked cast and copy write what the plain cast and copy write (poisoned tails left
/// alone) and report a non-finite source as `assert_finite` does: its name, count and first
/// index, by the next synchronisation (CUDA) or at once with the output untouched (CPU).
fn check_checked_casts<B: Backend>(dev: &B, big: bool) {
    let cpu = Cpu::new();
    let mut r = rng(19);
    let mut sizes = vec![1, 2, 17, 1000, 1601];
    if big {
        sizes.push(BIG);
    }
    let bits = |v: &[bf16]| v.iter().map(|h| h.to_bits()).collect::<Vec<u16>>();
    for &n in &sizes {
        let mut x = cast_inputs(&mut r, n);
        let mut want = poisoned(&cpu, n + 3, bf16::from_bits(0xffff));
        cpu.cast_to_bf16(&up(&cpu, &x), &mut want, n).unwrap();
        let mut got = poisoned(dev, n + 3, bf16::from_bits(0xffff));
        dev.cast_to_bf16_checked(&up(dev, &x), &mut got, n, "x").unwrap();
        let mut copied = poisoned(dev, n + 3, SENTINEL);
        dev.copy_checked(&up(dev, &x), &mut copied, n, "x").unwrap();
        dev.synchronize().unwrap();
        assert_same(
            &format!("cast_to_bf16_checked n={n}"),
            &bits(&down(dev, &got, n + 3)),
            &bits(&down(&cpu, &want, n + 3)),
        );
        let mut x_tail = x.clone();
        x_tail.extend([SENTINEL; 3]);
        assert_bits(&format!("copy_checked n={n}"), &down(dev, &copied, n + 3), &x_tail);

        // Non-finite entries at ragged spots (the last one out of range when n > 1).
        let spots = [n / 3, n / 2, n - 1];
        for (i, &p) in spots.iter().enumerate() {
            x[p] = [f32::INFINITY, f32::NAN, f32::NEG_INFINITY][i];
        }
        let len = if n > 1 { n - 1 } else { n };
        let (count, first) = cpu.count_nonfinite(&up(&cpu, &x), len).unwrap();
        for (op, name) in [("cast", "layer input x"), ("copy", "output gradient grad_y")] {
            let mut half = poisoned(dev, n, bf16::from_bits(0xffff));
            let mut full = poisoned(dev, n, SENTINEL);
            let run = match op {
                "cast" => dev.cast_to_bf16_checked(&up(dev, &x), &mut half, len, name),
                _ => dev.copy_checked(&up(dev, &x), &mut full, len, name),
            };
            let err = run.and_then(|()| dev.synchronize()).unwrap_err();
            match err {
                sparsegrad::Error::NonFinite { what, count: c, first_index: f } => {
                    assert!(what.ends_with(name), "{op} n={n}: {what}");
                    assert_eq!((c, f), (count, first), "{op} n={n}");
                }
                other => panic!("{op} n={n}: {other}"),
            }
            if !dev.defers_finite_checks() {
                assert!(down(dev, &half, n).iter().all(|h| h.to_bits() == 0xffff), "{op} n={n}: written");
                assert!(down(dev, &full, n).iter().all(|&v| v == SENTINEL), "{op} n={n}: written");
            }
            // The error is reported once: the backend works on.
            dev.synchronize().unwrap();
        }
    }
    // A short buffer is refused naming it.
    let x = up(dev, &[1.0f32; 8]);
    let mut short = poisoned(dev, 4, bf16::from_bits(0));
    let e = dev.cast_to_bf16_checked(&x, &mut short, 8, "x").unwrap_err().to_string();
    assert!(e.contains("cast_to_bf16_checked") && e.contains("destination"), "{e}");
    let mut short = poisoned(dev, 4, 0.0f32);
    let e = dev.copy_checked(&x, &mut short, 8, "x").unwrap_err().to_string();
    assert!(e.contains("copy_checked") && e.contains("destination"), "{e}");
}

cuda_test!(fn gemm_matches_cpu(cuda) {
    check_gemm(&cuda);
});

cuda_test!(fn gemm_bf16_matches_cpu_on_the_same_rounded_inputs(cuda) {
    check_gemm_bf16(&cuda);
});

cuda_test!(fn gemm_bf16_out_matches_cpu_within_one_rounding(cuda) {
    check_gemm_bf16_out(&cuda);
});

cuda_test!(fn casts_match_cpu_bit_for_bit(cuda) {
    check_casts(&cuda, big_shapes());
});

cuda_test!(fn four_pair_casts_equal_single_casts(cuda) {
    check_casts_x4(&cuda);
});

cuda_test!(fn checked_casts_and_copies_match_cpu_and_report_non_finite_sources(cuda) {
    check_checked_casts(&cuda, big_shapes());
});

cuda_test!(fn bias_add_and_gradient_match_cpu(cuda) {
    check_bias(&cuda);
});

cuda_test!(fn nonfinite_count_and_axpy_match_cpu(cuda) {
    check_nonfinite_and_axpy(&cuda, big_shapes());
});

#[test]
fn harness_on_cpu() {
    let cpu = Cpu::new();
    check_gemm(&cpu);
    check_gemm_bf16(&cpu);
    check_gemm_bf16_out(&cpu);
    check_casts(&cpu, false);
    check_casts_x4(&cpu);
    check_checked_casts(&cpu, false);
    check_bias(&cpu);
    check_nonfinite_and_axpy(&cpu, false);
}
