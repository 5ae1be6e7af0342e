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
