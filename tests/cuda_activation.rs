//! GELU (erf and tanh forms) and SwiGLU, forward and backward (and the bf16-saving SwiGLU
//! pair of bf16 models), on CUDA against the CPU.
//! CUDA's erff/tanhf/expf differ from libm's by a few ulp, hence the tolerances.
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::*;
use sparsegrad::backend::DenseOps;
use sparsegrad::{Backend, Cpu, GeluKind};

const ATOL: f32 = 2e-6;
const RTOL: f32 = 1e-5;

fn inputs(n: usize, seed: u64) -> Vec<f32> {
    let mut r = rng(seed);
    let mut x = rand_range(&mut r, n, -6.0, 6.0);
    let extremes = [0.0, -0.0, 20.0, -20.0, 100.0, -100.0, 1e-30, -1e-30, 88.0, -88.0, 1e4, -1e4];
    for (i, &e) in extremes.iter().enumerate().take(n) {
        x[i] = e;
    }
    x
}

fn check_activations<B: Backend>(dev: &B, big: bool) {
    let cpu = Cpu::new();
    let mut sizes = vec![1, 17, 1000, 1600];
    if big {
        sizes.push(BIG);
    }
    for &n in &sizes {
        let x = inputs(n, 20 + n as u64);
        let dy = inputs(n, 21 + n as u64);
        let (xc, dyc, xd, dyd) = (up(&cpu, &x), up(&cpu, &dy), up(dev, &x), up(dev, &dy));
        for kind in [GeluKind::Erf, GeluKind::Tanh] {
            let mut want = poisoned(&cpu, n + 1, f32::NAN);
            cpu.gelu(&xc, &mut want, n, kind).unwrap();
            let mut got = poisoned(dev, n + 1, f32::NAN);
            dev.gelu(&xd, &mut got, n, kind).unwrap();
            assert_close(
                &format!("gelu {kind:?} n={n}"),
                &down(dev, &got, n + 1),
                &down(&cpu, &want, n + 1),
                ATOL,
                RTOL,
            );

            let mut want = poisoned(&cpu, n + 1, f32::NAN);
            cpu.gelu_backward(&xc, &dyc, &mut want, n, kind).unwrap();
            let mut got = poisoned(dev, n + 1, f32::NAN);
            dev.gelu_backward(&xd, &dyd, &mut got, n, kind).unwrap();
            assert_close(
                &format!("gelu_backward {kind:?} n={n}"),
                &down(dev, &got, n + 1),
                &down(&cpu, &want, n + 1),
                ATOL,
                RTOL,
            );
        }
        let mut want = poisoned(&cpu, n + 1, f32::NAN);
        cpu.swiglu(&xc, &dyc, &mut want, n).unwrap();
        let mut got = poisoned(dev, n + 1, f32::NAN);
        dev.swiglu(&xd, &dyd, &mut got, n).unwrap();
        assert_close(&format!("swiglu n={n}"), &down(dev, &got, n + 1), &down(&cpu, &want, n + 1), ATOL, RTOL);

        let dh = inputs(n, 22 + n as u64);
        let dhc = up(&cpu, &dh);
        let dhd = up(dev, &dh);
        let (mut wg, mut wu) = (poisoned(&cpu, n + 1, f32::NAN), poisoned(&cpu, n + 1, f32::NAN));
        cpu.swiglu_backward(&xc, &dyc, &dhc, &mut wg, &mut wu, n).unwrap();
        let (mut gg, mut gu) = (poisoned(dev, n + 1, f32::NAN), poisoned(dev, n + 1, f32::NAN));
        dev.swiglu_backward(&xd, &dyd, &dhd, &mut gg, &mut gu, n).unwrap();
        // Products of three inputs up to 1e4: scale the absolute tolerance.
        assert_close(
            &format!("swiglu_backward d_gate n={n}"),
            &down(dev, &gg, n + 1),
            &down(&cpu, &wg, n + 1),
            5.0 * ATOL,
            4.0 * RTOL,
        );
        assert_close(
            &format!("swiglu_backward d_up n={n}"),
            &down(dev, &gu, n + 1),
            &down(&cpu, &wu, n + 1),
            5.0 * ATOL,
            4.0 * RTOL,
        );
    }
}

cuda_test!(fn activations_match_cpu(cuda) {
    check_activations(&cuda, big_shapes());
});

#[test]
fn harness_on_cpu() {
    check_activations(&Cpu::new(), false);
}

/// The bf16-saving SwiGLU equals `swiglu` plus two casts, and its backward equals two casts
/// back plus `swiglu_backward`, bit for bit on one backend; the device's equal the CPU's
/// (roundings bit for bit, the activations within the tolerance of `check_activations`).
fn check_bf16_saving_swiglu<B: Backend>(dev: &B, sizes: &[usize]) {
    let cpu = Cpu::new();
    for &n in sizes {
        let (g, u, dh) = (inputs(n, 40 + n as u64), inputs(n, 41 + n as u64), inputs(n, 42 + n as u64));
        let fused = |be: &B| {
            let (gd, ud, dhd) = (be.upload(&g).unwrap(), be.upload(&u).unwrap(), be.upload(&dh).unwrap());
            let mut h = be.upload(&vec![f32::NAN; n + 1]).unwrap();
            let (mut gh, mut uh) = (be.alloc::<half::bf16>(n + 1).unwrap(), be.alloc::<half::bf16>(n + 1).unwrap());
            be.swiglu_save_bf16(&gd, &ud, &mut h, &mut gh, &mut uh, n).unwrap();
            let (mut dg, mut du) =
                (be.upload(&vec![f32::NAN; n + 1]).unwrap(), be.upload(&vec![f32::NAN; n + 1]).unwrap());
            be.swiglu_backward_bf16(&gh, &uh, &dhd, &mut dg, &mut du, n).unwrap();
            let d = |b: &B::Buf<f32>| be.download(b, n).unwrap();
            let dh16 = |b: &B::Buf<half::bf16>| be.download(b, n).unwrap();
            (d(&h), dh16(&gh), dh16(&uh), d(&dg), d(&du))
        };
        let unfused = |be: &B| {
            let (gd, ud, dhd) = (be.upload(&g).unwrap(), be.upload(&u).unwrap(), be.upload(&dh).unwrap());
            let mut h = be.alloc::<f32>(n).unwrap();
            be.swiglu(&gd, &ud, &mut h, n).unwrap();
            let (mut gh, mut uh) = (be.alloc::<half::bf16>(n).unwrap(), be.alloc::<half::bf16>(n).unwrap());
            be.cast_to_bf16(&gd, &mut gh, n).unwrap();
            be.cast_to_bf16(&ud, &mut uh, n).unwrap();
            let (mut gw, mut uw) = (be.alloc::<f32>(n).unwrap(), be.alloc::<f32>(n).unwrap());
            be.cast_from_bf16(&gh, &mut gw, n).unwrap();
            be.cast_from_bf16(&uh, &mut uw, n).unwrap();
            let (mut dg, mut du) = (be.alloc::<f32>(n).unwrap(), be.alloc::<f32>(n).unwrap());
            be.swiglu_backward(&gw, &uw, &dhd, &mut dg, &mut du, n).unwrap();
            let d = |b: &B::Buf<f32>| be.download(b, n).unwrap();
            let dh16 = |b: &B::Buf<half::bf16>| be.download(b, n).unwrap();
            (d(&h), dh16(&gh), dh16(&uh), d(&dg), d(&du))
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let (a, b) = (fused(dev), unfused(dev));
        assert_eq!(bits(&a.0), bits(&b.0), "h n={n}");
        assert_eq!((&a.1, &a.2), (&b.1, &b.2), "bf16 roundings n={n}");
        assert_eq!(bits(&a.3), bits(&b.3), "d_gate n={n}");
        assert_eq!(bits(&a.4), bits(&b.4), "d_up n={n}");
        // Against the CPU twin.
        let c = {
            let (gd, ud, dhd) = (cpu.upload(&g).unwrap(), cpu.upload(&u).unwrap(), cpu.upload(&dh).unwrap());
            let mut h = cpu.alloc::<f32>(n).unwrap();
            let (mut gh, mut uh) = (cpu.alloc::<half::bf16>(n).unwrap(), cpu.alloc::<half::bf16>(n).unwrap());
            cpu.swiglu_save_bf16(&gd, &ud, &mut h, &mut gh, &mut uh, n).unwrap();
            let (mut dg, mut du) = (cpu.alloc::<f32>(n).unwrap(), cpu.alloc::<f32>(n).unwrap());
            cpu.swiglu_backward_bf16(&gh, &uh, &dhd, &mut dg, &mut du, n).unwrap();
            (h.to_vec(), gh.to_vec(), uh.to_vec(), dg.to_vec(), du.to_vec())
        };
        assert_eq!((&a.1, &a.2), (&c.1, &c.2), "bf16 roundings vs CPU n={n}");
        assert_close(&format!("swiglu_save_bf16 n={n}"), &a.0, &c.0, ATOL, RTOL);
        assert_close(&format!("swiglu_backward_bf16 d_gate n={n}"), &a.3, &c.3, 5.0 * ATOL, 4.0 * RTOL);
        assert_close(&format!("swiglu_backward_bf16 d_up n={n}"), &a.4, &c.4, 5.0 * ATOL, 4.0 * RTOL);
    }
    // Short buffers are refused, naming the buffer.
    let (x, mut y) = (dev.alloc::<f32>(4).unwrap(), dev.alloc::<f32>(4).unwrap());
    let (mut gh, mut uh) = (dev.alloc::<half::bf16>(3).unwrap(), dev.alloc::<half::bf16>(4).unwrap());
    let e = dev.swiglu_save_bf16(&x, &x, &mut y, &mut gh, &mut uh, 4).unwrap_err().to_string();
    assert!(e.contains("gate_half"), "{e}");
}

cuda_test!(fn bf16_saving_swiglu_matches_the_unfused_ops_and_the_cpu(cuda) {
    check_bf16_saving_swiglu(&cuda, &[0, 1, 3, 5, 1000, 4099, 70_001]);
});

#[test]
fn bf16_saving_swiglu_harness_on_cpu() {
    check_bf16_saving_swiglu(&Cpu::new(), &[0, 1, 5, 1003]);
}

/// The SwiGLU backward with its outputs' finiteness check folded in: the f32 form equals
/// `swiglu_backward` and the bf16 form (written over the saves) equals
/// `swiglu_backward_bf16` then two `cast_to_bf16`, bit for bit on one backend, the tails
/// untouched; both match the CPU's (the activations within `check_activations`' tolerance,
/// the bf16 outputs within one more bf16 rounding, 2^-8 relative). Non-finite outputs are
/// one check over both: the count over both, the first index the smallest in either.
fn check_checked_swiglu_backward<B: Backend>(dev: &B, sizes: &[usize]) {
    let cpu = Cpu::new();
    let bits16 = |v: &[half::bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let widen = |v: &[half::bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
    for &n in sizes {
        let (g, u, dh) = (inputs(n, 50 + n as u64), inputs(n, 51 + n as u64), inputs(n, 52 + n as u64));
        let run = |be: &B| {
            let (gd, ud, dhd) = (be.upload(&g).unwrap(), be.upload(&u).unwrap(), be.upload(&dh).unwrap());
            let poison = || be.upload(&vec![f32::NAN; n + 1]).unwrap();
            let (mut dg, mut du, mut dg2, mut du2) = (poison(), poison(), poison(), poison());
            be.swiglu_backward_checked(&gd, &ud, &dhd, &mut dg, &mut du, n, "grads").unwrap();
            be.swiglu_backward(&gd, &ud, &dhd, &mut dg2, &mut du2, n).unwrap();
            // The saves, with a tail the op must leave.
            let mut saves: Vec<half::bf16> = g.iter().map(|&x| half::bf16::from_f32(x)).collect();
            saves.push(half::bf16::from_bits(0x7fc1));
            let mut up_saves: Vec<half::bf16> = u.iter().map(|&x| half::bf16::from_f32(x)).collect();
            up_saves.push(half::bf16::from_bits(0x7fc1));
            let (mut gh, mut uh) = (be.upload(&saves).unwrap(), be.upload(&up_saves).unwrap());
            let (mut wg, mut wu) = (be.alloc::<f32>(n).unwrap(), be.alloc::<f32>(n).unwrap());
            be.swiglu_backward_bf16(&gh, &uh, &dhd, &mut wg, &mut wu, n).unwrap();
            let (mut cg, mut cu) = (be.upload(&saves).unwrap(), be.upload(&up_saves).unwrap());
            be.cast_to_bf16(&wg, &mut cg, n).unwrap();
            be.cast_to_bf16(&wu, &mut cu, n).unwrap();
            be.swiglu_backward_bf16_in_place(&mut gh, &mut uh, &dhd, n, "grads").unwrap();
            be.synchronize().unwrap();
            let d = |b: &B::Buf<f32>| be.download(b, n + 1).unwrap();
            let h = |b: &B::Buf<half::bf16>| be.download(b, n + 1).unwrap();
            ((d(&dg), d(&du), d(&dg2), d(&du2)), (h(&gh), h(&uh), h(&cg), h(&cu)))
        };
        let ((dg, du, dg2, du2), (gh, uh, cg, cu)) = run(dev);
        assert_bits(&format!("swiglu_backward_checked d_gate n={n}"), &dg, &dg2);
        assert_bits(&format!("swiglu_backward_checked d_up n={n}"), &du, &du2);
        assert_same(&format!("swiglu_backward_bf16_in_place d_gate n={n}"), &bits16(&gh), &bits16(&cg));
        assert_same(&format!("swiglu_backward_bf16_in_place d_up n={n}"), &bits16(&uh), &bits16(&cu));
        let (cdg, cdu, cgh, cuh) = run_on_cpu(&cpu, &g, &u, &dh, n);
        assert_close(&format!("swiglu_backward_checked d_gate vs CPU n={n}"), &dg[..n], &cdg, ATOL, RTOL);
        assert_close(&format!("swiglu_backward_checked d_up vs CPU n={n}"), &du[..n], &cdu, ATOL, RTOL);
        let (a, b) = (widen(&gh[..n]), widen(&cgh[..n]));
        assert_close(&format!("bf16 in place d_gate vs CPU n={n}"), &a, &b, 5.0 * ATOL, 8e-3);
        let (a, b) = (widen(&uh[..n]), widen(&cuh[..n]));
        assert_close(&format!("bf16 in place d_up vs CPU n={n}"), &a, &b, 5.0 * ATOL, 8e-3);
    }
    // NaN and infinity in dh: both outputs go bad at those spots (u and silu(g) are nonzero
    // away from the first 12 extremes), so the one check counts 4, first at the smaller spot.
    let n = 1000;
    let (g, u, mut dh) = (inputs(n, 60), inputs(n, 61), inputs(n, 62));
    dh[700] = f32::NAN;
    dh[300] = f32::INFINITY;
    let (gd, ud, dhd) = (dev.upload(&g).unwrap(), dev.upload(&u).unwrap(), dev.upload(&dh).unwrap());
    let expect = |res: sparsegrad::Result<()>, what: &str| match res.and_then(|()| dev.synchronize()) {
        Err(sparsegrad::Error::NonFinite { what: name, count, first_index }) => {
            assert!(name.ends_with("grads"), "{what}: {name}");
            assert_eq!((count, first_index), (4, 300), "{what}");
        }
        other => panic!("{what}: {other:?}"),
    };
    let (mut dg, mut du) = (dev.alloc::<f32>(n).unwrap(), dev.alloc::<f32>(n).unwrap());
    expect(dev.swiglu_backward_checked(&gd, &ud, &dhd, &mut dg, &mut du, n, "grads"), "f32");
    let saves = |v: &[f32]| dev.upload(&v.iter().map(|&x| half::bf16::from_f32(x)).collect::<Vec<_>>()).unwrap();
    let (mut gh, mut uh) = (saves(&g), saves(&u));
    expect(dev.swiglu_backward_bf16_in_place(&mut gh, &mut uh, &dhd, n, "grads"), "bf16");
    if !dev.defers_finite_checks() {
        let kept = |b: &B::Buf<half::bf16>, v: &[f32]| {
            dev.download(b, n).unwrap().iter().zip(v).all(|(h, &x)| *h == half::bf16::from_f32(x))
        };
        assert!(kept(&gh, &g) && kept(&uh, &u), "a failed in-place backward changed the saves");
    }
    dev.synchronize().unwrap();
    // Short buffers are refused, naming the buffer.
    let mut short = dev.alloc::<half::bf16>(n - 1).unwrap();
    let e = dev.swiglu_backward_bf16_in_place(&mut gh, &mut short, &dhd, n, "grads").unwrap_err().to_string();
    assert!(e.contains("up_half"), "{e}");
    let mut short = dev.alloc::<f32>(n - 1).unwrap();
    let e = dev.swiglu_backward_checked(&gd, &ud, &dhd, &mut dg, &mut short, n, "grads").unwrap_err().to_string();
    assert!(e.contains("d_up"), "{e}");
}

/// The CPU's outputs of the two checked backwards: f32 `(d_gate, d_up)`, then the bf16 pair.
fn run_on_cpu(
    cpu: &Cpu,
    g: &[f32],
    u: &[f32],
    dh: &[f32],
    n: usize,
) -> (Vec<f32>, Vec<f32>, Vec<half::bf16>, Vec<half::bf16>) {
    let (gd, ud, dhd) = (cpu.upload(g).unwrap(), cpu.upload(u).unwrap(), cpu.upload(dh).unwrap());
    let (mut dg, mut du) = (cpu.alloc::<f32>(n).unwrap(), cpu.alloc::<f32>(n).unwrap());
    cpu.swiglu_backward_checked(&gd, &ud, &dhd, &mut dg, &mut du, n, "grads").unwrap();
    let half = |v: &[f32]| cpu.upload(&v.iter().map(|&x| half::bf16::from_f32(x)).collect::<Vec<_>>()).unwrap();
    let (mut gh, mut uh) = (half(g), half(u));
    cpu.swiglu_backward_bf16_in_place(&mut gh, &mut uh, &dhd, n, "grads").unwrap();
    (dg.to_vec(), du.to_vec(), gh.to_vec(), uh.to_vec())
}

cuda_test!(fn checked_swiglu_backward_matches_the_unfused_ops_and_the_cpu(cuda) {
    check_checked_swiglu_backward(&cuda, &[0, 1, 3, 5, 1000, 4099, 70_001]);
});

#[test]
fn checked_swiglu_backward_harness_on_cpu() {
    check_checked_swiglu_backward(&Cpu::new(), &[0, 1, 5, 1003]);
}
