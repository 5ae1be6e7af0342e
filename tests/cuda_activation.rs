//! GELU (erf and tanh forms) and SwiGLU, forward and backward, on CUDA against the CPU.
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
