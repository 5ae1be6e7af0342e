//! SparseAdam on COO entries and dense AdamW on CUDA against the CPU, over several steps.
//! Both kernels use explicitly rounded f32 operations in the CPU's order, so the states and
//! parameters must agree bit for bit.
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::*;
use rand::rngs::SmallRng;
use sparsegrad::backend::{Coo, OptimOps};
use sparsegrad::{AdamParams, Backend, Cpu, HostCoo};

fn random_coo(r: &mut SmallRng, rows: usize, cols: usize, k: usize) -> HostCoo<f32> {
    let lin = sorted_subset(r, rows * cols, k);
    HostCoo {
        rows: lin.iter().map(|&l| l / cols as u32).collect(),
        cols: lin.iter().map(|&l| l % cols as u32).collect(),
        values: rand_f32(r, k),
        shape: (rows, cols),
    }
}

fn check_sparse_adam<B: Backend>(dev: &B) {
    let cpu = Cpu::new();
    let mut r = rng(51);
    let hp = AdamParams { lr: 3e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
    for &(rows, cols) in &[(1, 1), (17, 1000), (1000, 17), (70000, 3), (129, 257)] {
        let n = rows * cols;
        for (with_param, with_delta) in [(true, true), (true, false), (false, true)] {
            let p0 = rand_f32(&mut r, n);
            let (mut cm, mut cv, mut cp) = (up(&cpu, &vec![0.0f32; n]), up(&cpu, &vec![0.0f32; n]), up(&cpu, &p0));
            let (mut dm, mut dv, mut dp) = (up(dev, &vec![0.0f32; n]), up(dev, &vec![0.0f32; n]), up(dev, &p0));
            let (mut ck, mut dk) = (cpu.alloc::<u64>(2).unwrap(), dev.alloc::<u64>(2).unwrap());
            for step in 1..=4u64 {
                let k = (n / 7).max(1);
                let host = random_coo(&mut r, rows, cols, k);
                let mut cc = Coo::with_capacity(&cpu, k, (rows, cols)).unwrap();
                cc.set_from_host(&cpu, &host).unwrap();
                let mut dc = Coo::with_capacity(dev, k, (rows, cols)).unwrap();
                dc.set_from_host(dev, &host).unwrap();
                let (mut cd, mut dd) = (poisoned(&cpu, k + 2, f32::NAN), poisoned(dev, k + 2, f32::NAN));
                cpu.sparse_adam(
                    &cc,
                    &mut cm,
                    &mut cv,
                    &mut ck,
                    &hp,
                    with_param.then_some(&mut cp),
                    with_delta.then_some(&mut cd),
                )
                .unwrap();
                dev.sparse_adam(
                    &dc,
                    &mut dm,
                    &mut dv,
                    &mut dk,
                    &hp,
                    with_param.then_some(&mut dp),
                    with_delta.then_some(&mut dd),
                )
                .unwrap();
                let what = format!("sparse_adam {rows}x{cols} step {step} param={with_param} delta={with_delta}");
                assert_bits(&format!("{what}: exp_avg"), &down(dev, &dm, n), &down(&cpu, &cm, n));
                assert_bits(&format!("{what}: exp_avg_sq"), &down(dev, &dv, n), &down(&cpu, &cv, n));
                assert_bits(&format!("{what}: param"), &down(dev, &dp, n), &down(&cpu, &cp, n));
                assert_bits(&format!("{what}: delta"), &down(dev, &dd, k + 2), &down(&cpu, &cd, k + 2));
                assert_eq!(down(dev, &dk, 2), vec![step, 0], "{what}: the device clock");
            }
        }
    }
}

fn check_adamw<B: Backend>(dev: &B, big: bool) {
    let cpu = Cpu::new();
    let mut r = rng(52);
    let hp = AdamParams { lr: 1e-2, beta1: 0.8, beta2: 0.99, eps: 1e-6, weight_decay: 0.05 };
    let mut sizes = vec![1, 17, 1000, 1600];
    if big {
        sizes.push(BIG);
    }
    for &n in &sizes {
        let p0 = rand_f32(&mut r, n + 1);
        let (mut cp, mut cm, mut cv) = (up(&cpu, &p0), up(&cpu, &vec![0.0f32; n + 1]), up(&cpu, &vec![0.0f32; n + 1]));
        let (mut dp, mut dm, mut dv) = (up(dev, &p0), up(dev, &vec![0.0f32; n + 1]), up(dev, &vec![0.0f32; n + 1]));
        let (mut ck, mut dk) = (cpu.alloc::<u64>(2).unwrap(), dev.alloc::<u64>(2).unwrap());
        for step in 1..=3u64 {
            let g = rand_f32(&mut r, n);
            cpu.adamw(&mut cp, &up(&cpu, &g), &mut cm, &mut cv, n, &mut ck, &hp).unwrap();
            dev.adamw(&mut dp, &up(dev, &g), &mut dm, &mut dv, n, &mut dk, &hp).unwrap();
            assert_eq!(down(dev, &dk, 2), vec![step, 0], "adamw n={n}: the device clock");
            let what = format!("adamw n={n} step {step}");
            assert_bits(&format!("{what}: param"), &down(dev, &dp, n + 1), &down(&cpu, &cp, n + 1));
            assert_bits(&format!("{what}: exp_avg"), &down(dev, &dm, n + 1), &down(&cpu, &cm, n + 1));
            assert_bits(&format!("{what}: exp_avg_sq"), &down(dev, &dv, n + 1), &down(&cpu, &cv, n + 1));
        }
    }
}

cuda_test!(fn sparse_adam_matches_cpu_bit_for_bit(cuda) {
    check_sparse_adam(&cuda);
});

cuda_test!(fn adamw_matches_cpu_bit_for_bit(cuda) {
    check_adamw(&cuda, big_shapes());
});

#[test]
fn harness_on_cpu() {
    check_sparse_adam(&Cpu::new());
    check_adamw(&Cpu::new(), false);
}
