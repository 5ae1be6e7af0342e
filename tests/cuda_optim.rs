//! SparseAdam on COO entries (its change per entry or stored densely) and dense AdamW on
//! CUDA against the CPU, over several steps. Both kernels use explicitly rounded f32
//! operations in the CPU's order, so the states and parameters must agree bit for bit.
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::*;
use half::bf16;
use rand::rngs::SmallRng;
use sparsegrad::backend::{AdamwJob, Coo, OptimOps, OutBuf, SparseAdamJob, SparseOps};
use sparsegrad::{AdamParams, Backend, Cpu, Error, HostCoo};

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
        for (with_param, with_half, with_delta) in
            [(true, true, true), (true, false, false), (false, false, true), (true, true, false)]
        {
            let p0 = rand_f32(&mut r, n);
            let (mut cm, mut cv, mut cp) = (up(&cpu, &vec![0.0f32; n]), up(&cpu, &vec![0.0f32; n]), up(&cpu, &p0));
            let (mut dm, mut dv, mut dp) = (up(dev, &vec![0.0f32; n]), up(dev, &vec![0.0f32; n]), up(dev, &p0));
            // The parameter's bf16 copy, rounded from it, with a poisoned tail past the matrix.
            let mut h0: Vec<bf16> = p0.iter().map(|&x| bf16::from_f32(x)).collect();
            h0.extend([bf16::NAN; 3]);
            let (mut ch, mut dh) = (up(&cpu, &h0), up(dev, &h0));
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
                    with_half.then_some(&mut ch),
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
                    with_half.then_some(&mut dh),
                    with_delta.then_some(&mut dd),
                )
                .unwrap();
                let what = format!(
                    "sparse_adam {rows}x{cols} step {step} param={with_param} half={with_half} delta={with_delta}"
                );
                // Rounding only the listed entries keeps the copy equal to the parameter rounded.
                let bits = |v: Vec<bf16>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let (dev_half, cpu_half) = (bits(down(dev, &dh, n + 3)), bits(down(&cpu, &ch, n + 3)));
                assert_same(&format!("{what}: bf16 copy"), &dev_half, &cpu_half);
                // (Without it given, the copy is left as it was.)
                let mut rounded: Vec<bf16> = down(&cpu, &cp, n).iter().map(|&x| bf16::from_f32(x)).collect();
                rounded.extend([bf16::NAN; 3]);
                let want = if with_half { bits(rounded) } else { bits(h0.clone()) };
                assert_same(&format!("{what}: bf16 copy against the parameter"), &cpu_half, &want);
                assert_bits(&format!("{what}: exp_avg"), &down(dev, &dm, n), &down(&cpu, &cm, n));
                assert_bits(&format!("{what}: exp_avg_sq"), &down(dev, &dv, n), &down(&cpu, &cv, n));
                assert_bits(&format!("{what}: param"), &down(dev, &dp, n), &down(&cpu, &cp, n));
                assert_bits(&format!("{what}: delta"), &down(dev, &dd, k + 2), &down(&cpu, &cd, k + 2));
                assert_eq!(down(dev, &dk, 2), vec![step, 0], "{what}: the device clock");
            }
        }
    }
}

/// `dev.sparse_adam_densify` against the CPU's `sparse_adam` with a per-entry change
/// followed by `coo_densify` (or its bf16 form): moments, clock and the dense change bit
/// for bit, the dense matrix poisoned before each step (every element not listed must come
/// back zero). Run with the CPU as `dev` it checks the CPU's fused op against its unfused
/// passes; with CUDA, the kernel against that CPU reference.
fn check_sparse_adam_densify<B: Backend>(dev: &B) {
    let cpu = Cpu::new();
    let mut r = rng(53);
    let hp = AdamParams { lr: 2e-3, beta1: 0.85, beta2: 0.995, eps: 1e-7, weight_decay: 0.0 };
    for &(rows, cols) in &[(1, 1), (17, 1000), (1000, 17), (129, 257), (3, 70001)] {
        let n = rows * cols;
        for half in [false, true] {
            let (mut cm, mut cv) = (up(&cpu, &vec![0.0f32; n]), up(&cpu, &vec![0.0f32; n]));
            let (mut dm, mut dv) = (up(dev, &vec![0.0f32; n]), up(dev, &vec![0.0f32; n]));
            let (mut ck, mut dk) = (cpu.alloc::<u64>(2).unwrap(), dev.alloc::<u64>(2).unwrap());
            for step in 1..=3u64 {
                // Steps 1 and 3 list entries; step 2 lists none (the clock still advances).
                let k = if step == 2 { 0 } else { (n / 9).max(1) };
                let host = random_coo(&mut r, rows, cols, k);
                let mut cc = Coo::with_capacity(&cpu, k.max(1), (rows, cols)).unwrap();
                cc.set_from_host(&cpu, &host).unwrap();
                let mut dc = Coo::with_capacity(dev, k.max(1), (rows, cols)).unwrap();
                dc.set_from_host(dev, &host).unwrap();
                let mut delta = cpu.alloc::<f32>(k.max(1)).unwrap();
                cpu.sparse_adam(&cc, &mut cm, &mut cv, &mut ck, &hp, None, None, Some(&mut delta)).unwrap();
                std::mem::swap(&mut cc.values, &mut delta);
                let what = format!("sparse_adam_densify {rows}x{cols} half={half} step {step}");
                if half {
                    let mut want = cpu.alloc::<bf16>(n).unwrap();
                    cpu.coo_densify_bf16(&cc, &mut want).unwrap();
                    let mut got = poisoned(dev, n, bf16::NAN);
                    dev.sparse_adam_densify(&dc, &mut dm, &mut dv, &mut dk, &hp, OutBuf::Half(&mut got)).unwrap();
                    let bits = |v: Vec<bf16>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_same(&format!("{what}: dense"), &bits(down(dev, &got, n)), &bits(down(&cpu, &want, n)));
                } else {
                    let mut want = cpu.alloc::<f32>(n).unwrap();
                    cpu.coo_densify(&cc, &mut want).unwrap();
                    let mut got = poisoned(dev, n, f32::NAN);
                    dev.sparse_adam_densify(&dc, &mut dm, &mut dv, &mut dk, &hp, OutBuf::Full(&mut got)).unwrap();
                    assert_bits(&format!("{what}: dense"), &down(dev, &got, n), &down(&cpu, &want, n));
                }
                assert_bits(&format!("{what}: exp_avg"), &down(dev, &dm, n), &down(&cpu, &cm, n));
                assert_bits(&format!("{what}: exp_avg_sq"), &down(dev, &dv, n), &down(&cpu, &cv, n));
                assert_eq!(down(dev, &dk, 2), vec![step, 0], "{what}: the clock");
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
            // Steps 1 and 3 also round the new parameter into a bf16 copy (tail poisoned).
            let with_half = step != 2;
            let (mut ch, mut dh) = (poisoned(&cpu, n + 1, bf16::NAN), poisoned(dev, n + 1, bf16::NAN));
            let (c_half, d_half) = (with_half.then_some(&mut ch), with_half.then_some(&mut dh));
            cpu.adamw(&mut cp, c_half, &up(&cpu, &g), &mut cm, &mut cv, n, &mut ck, &hp).unwrap();
            dev.adamw(&mut dp, d_half, &up(dev, &g), &mut dm, &mut dv, n, &mut dk, &hp).unwrap();
            assert_eq!(down(dev, &dk, 2), vec![step, 0], "adamw n={n}: the device clock");
            let what = format!("adamw n={n} step {step}");
            let bits = |v: Vec<bf16>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let (dev_half, cpu_half) = (bits(down(dev, &dh, n + 1)), bits(down(&cpu, &ch, n + 1)));
            assert_same(&format!("{what}: bf16 copy"), &dev_half, &cpu_half);
            let mut want: Vec<bf16> = down(&cpu, &cp, n).iter().map(|&x| bf16::from_f32(x)).collect();
            want.push(bf16::NAN);
            if !with_half {
                want = vec![bf16::NAN; n + 1];
            }
            assert_same(&format!("{what}: bf16 copy against the parameter"), &cpu_half, &bits(want));
            assert_bits(&format!("{what}: param"), &down(dev, &dp, n + 1), &down(&cpu, &cp, n + 1));
            assert_bits(&format!("{what}: exp_avg"), &down(dev, &dm, n + 1), &down(&cpu, &cm, n + 1));
            assert_bits(&format!("{what}: exp_avg_sq"), &down(dev, &dv, n + 1), &down(&cpu, &cv, n + 1));
        }
    }
}

/// One parameter of an AdamW batch test, on one backend: value, moments, clock, bf16 copy.
struct Param<B: Backend> {
    p: B::Buf<f32>,
    m: B::Buf<f32>,
    v: B::Buf<f32>,
    clock: B::Buf<u64>,
    half: B::Buf<bf16>,
}

impl<B: Backend> Param<B> {
    fn new(b: &B, p0: &[f32]) -> Self {
        let z = vec![0.0f32; p0.len()];
        let (p, m, v) = (up(b, p0), up(b, &z), up(b, &z));
        Param { p, m, v, clock: b.alloc::<u64>(2).unwrap(), half: poisoned(b, p0.len(), bf16::NAN) }
    }
}

/// `adamw_batch` of ragged parameters (empty ones, with and without a bf16 copy, their own
/// hyperparameters; more than the 8 one launch takes) on the device against the CPU's
/// single `adamw` calls, bit for bit over three steps; a batch with one bad job is refused
/// before anything moves.
fn check_adamw_batch<B: Backend>(dev: &B) {
    let cpu = Cpu::new();
    let mut r = rng(53);
    let lens = [0usize, 1, 17, 1000, 3, 1600, 4, 5, 6, 70, 257];
    let p0: Vec<Vec<f32>> = lens.iter().map(|&n| rand_f32(&mut r, n + 1)).collect();
    let hps: Vec<AdamParams> = (0..lens.len())
        .map(|i| AdamParams {
            lr: 1e-2 * (1 + i) as f32,
            beta1: 0.8,
            beta2: 0.99,
            eps: 1e-6,
            weight_decay: 0.01 * i as f32,
        })
        .collect();
    let mut cp: Vec<Param<Cpu>> = p0.iter().map(|p| Param::new(&cpu, p)).collect();
    let mut dp: Vec<Param<B>> = p0.iter().map(|p| Param::new(dev, p)).collect();
    for step in 1..=3u64 {
        let grads: Vec<Vec<f32>> = lens.iter().map(|&n| rand_f32(&mut r, n)).collect();
        let with_half = |i: usize| (i + step as usize) % 3 != 0;
        for (i, c) in cp.iter_mut().enumerate() {
            let half = with_half(i).then_some(&mut c.half);
            cpu.adamw(&mut c.p, half, &up(&cpu, &grads[i]), &mut c.m, &mut c.v, lens[i], &mut c.clock, &hps[i])
                .unwrap();
        }
        let dev_grads: Vec<_> = grads.iter().map(|g| up(dev, g)).collect();
        let mut jobs: Vec<AdamwJob<'_, B, f32>> = dp
            .iter_mut()
            .enumerate()
            .map(|(i, d)| AdamwJob {
                param: &mut d.p,
                param_bf16: with_half(i).then_some(&mut d.half),
                grad: &dev_grads[i],
                exp_avg: &mut d.m,
                exp_avg_sq: &mut d.v,
                len: lens[i],
                clock: &mut d.clock,
                hp: hps[i],
            })
            .collect();
        dev.adamw_batch(&mut jobs).unwrap();
        drop(jobs);
        for (i, (c, d)) in cp.iter().zip(&dp).enumerate() {
            let (n, what) = (lens[i] + 1, format!("adamw batch, job {i} (n = {}), step {step}", lens[i]));
            assert_eq!(down(dev, &d.clock, 2), vec![step, 0], "{what}: the clock");
            assert_bits(&format!("{what}: param"), &down(dev, &d.p, n), &down(&cpu, &c.p, n));
            assert_bits(&format!("{what}: exp_avg"), &down(dev, &d.m, n), &down(&cpu, &c.m, n));
            assert_bits(&format!("{what}: exp_avg_sq"), &down(dev, &d.v, n), &down(&cpu, &c.v, n));
            let bits = |v: Vec<bf16>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_same(&format!("{what}: bf16 copy"), &bits(down(dev, &d.half, n)), &bits(down(&cpu, &c.half, n)));
        }
    }
    // A short gradient in the last job: refused, no parameter or clock moves.
    let before: Vec<Vec<f32>> = dp.iter().zip(&lens).map(|(d, &n)| down(dev, &d.p, n + 1)).collect();
    let short = up(dev, &[0.5f32]);
    let grads: Vec<_> = lens.iter().map(|&n| up(dev, &vec![0.25f32; n])).collect();
    let last = lens.len() - 1;
    let mut jobs: Vec<AdamwJob<'_, B, f32>> = dp
        .iter_mut()
        .enumerate()
        .map(|(i, d)| AdamwJob {
            param: &mut d.p,
            param_bf16: None,
            grad: if i == last { &short } else { &grads[i] },
            exp_avg: &mut d.m,
            exp_avg_sq: &mut d.v,
            len: lens[i],
            clock: &mut d.clock,
            hp: hps[i],
        })
        .collect();
    let err = dev.adamw_batch(&mut jobs);
    assert!(matches!(err, Err(Error::Shape { op: "adamw", .. })), "{err:?}");
    drop(jobs);
    for (i, d) in dp.iter().enumerate() {
        assert_eq!(down(dev, &d.clock, 2), vec![3, 0], "refused batch, job {i}: the clock");
        assert_bits(&format!("refused batch, job {i}: param"), &down(dev, &d.p, lens[i] + 1), &before[i]);
    }
}

/// `sparse_adam_batch` of ragged parameters (with and without the parameter, its bf16 copy
/// and the per-entry change; empty lists; more than the 8 one launch takes) on the device
/// against the CPU's single `sparse_adam` calls, bit for bit over three steps.
fn check_sparse_adam_batch<B: Backend>(dev: &B) {
    let cpu = Cpu::new();
    let mut r = rng(54);
    let shapes =
        [(1usize, 1usize), (17, 1000), (3, 5), (1000, 17), (9, 9), (1, 40), (129, 257), (2, 2), (30, 3), (4, 4)];
    let hps: Vec<AdamParams> = (0..shapes.len())
        .map(|i| AdamParams { lr: 1e-3 * (1 + i) as f32, beta1: 0.9, beta2: 0.99, eps: 1e-7, weight_decay: 0.0 })
        .collect();
    let p0: Vec<Vec<f32>> = shapes.iter().map(|&(a, b)| rand_f32(&mut r, a * b + 1)).collect();
    let mut cp: Vec<Param<Cpu>> = p0.iter().map(|p| Param::new(&cpu, p)).collect();
    let mut dp: Vec<Param<B>> = p0.iter().map(|p| Param::new(dev, p)).collect();
    for step in 1..=3u64 {
        // Job i: its parameter unless i % 4 == 3, its bf16 copy when i % 3 == 1 (with the
        // parameter), the per-entry change when (i + step) % 2 == 0; no entry at all in job 2
        // on step 2.
        let with_param = |i: usize| i % 4 != 3;
        let with_half = |i: usize| with_param(i) && i % 3 == 1;
        let with_delta = |i: usize| (i + step as usize) % 2 == 0;
        let hosts: Vec<HostCoo<f32>> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(a, b))| random_coo(&mut r, a, b, if i == 2 && step == 2 { 0 } else { (a * b / 5).max(1) }))
            .collect();
        let mut cd: Vec<_> = hosts.iter().map(|h| poisoned(&cpu, h.values.len() + 1, f32::NAN)).collect();
        let mut dd: Vec<_> = hosts.iter().map(|h| poisoned(dev, h.values.len() + 1, f32::NAN)).collect();
        for (i, c) in cp.iter_mut().enumerate() {
            let mut coo = Coo::with_capacity(&cpu, hosts[i].values.len(), shapes[i]).unwrap();
            coo.set_from_host(&cpu, &hosts[i]).unwrap();
            let (p, h, d) = (
                with_param(i).then_some(&mut c.p),
                with_half(i).then_some(&mut c.half),
                with_delta(i).then_some(&mut cd[i]),
            );
            cpu.sparse_adam(&coo, &mut c.m, &mut c.v, &mut c.clock, &hps[i], p, h, d).unwrap();
        }
        let dev_coos: Vec<_> = hosts
            .iter()
            .zip(&shapes)
            .map(|(h, &shape)| {
                let mut coo = Coo::with_capacity(dev, h.values.len(), shape).unwrap();
                coo.set_from_host(dev, h).unwrap();
                coo
            })
            .collect();
        let mut jobs: Vec<SparseAdamJob<'_, B, f32>> = dp
            .iter_mut()
            .zip(dd.iter_mut())
            .enumerate()
            .map(|(i, (d, delta))| SparseAdamJob {
                coo: &dev_coos[i],
                exp_avg: &mut d.m,
                exp_avg_sq: &mut d.v,
                clock: &mut d.clock,
                hp: hps[i],
                param: with_param(i).then_some(&mut d.p),
                param_bf16: with_half(i).then_some(&mut d.half),
                delta: with_delta(i).then_some(delta),
            })
            .collect();
        dev.sparse_adam_batch(&mut jobs).unwrap();
        drop(jobs);
        for (i, (c, d)) in cp.iter().zip(&dp).enumerate() {
            let n = shapes[i].0 * shapes[i].1 + 1;
            let what = format!("sparse_adam batch, job {i} {:?}, step {step}", shapes[i]);
            assert_eq!(down(dev, &d.clock, 2), vec![step, 0], "{what}: the clock");
            assert_bits(&format!("{what}: param"), &down(dev, &d.p, n), &down(&cpu, &c.p, n));
            assert_bits(&format!("{what}: exp_avg"), &down(dev, &d.m, n), &down(&cpu, &c.m, n));
            assert_bits(&format!("{what}: exp_avg_sq"), &down(dev, &d.v, n), &down(&cpu, &c.v, n));
            let bits = |v: Vec<bf16>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_same(&format!("{what}: bf16 copy"), &bits(down(dev, &d.half, n)), &bits(down(&cpu, &c.half, n)));
            let k = hosts[i].values.len() + 1;
            assert_bits(&format!("{what}: delta"), &down(dev, &dd[i], k), &down(&cpu, &cd[i], k));
        }
    }
}

cuda_test!(fn sparse_adam_batch_matches_single_steps_on_the_cpu(cuda) {
    check_sparse_adam_batch(&cuda);
});

cuda_test!(fn adamw_batch_matches_single_steps_on_the_cpu(cuda) {
    check_adamw_batch(&cuda);
});

cuda_test!(fn sparse_adam_matches_cpu_bit_for_bit(cuda) {
    check_sparse_adam(&cuda);
});

cuda_test!(fn sparse_adam_densify_matches_cpu_bit_for_bit(cuda) {
    check_sparse_adam_densify(&cuda);
});

// A dense change needs distinct entries: one out of order is skipped and reported with the
// next read (as `coo_densify` reports it); a short dense buffer is refused before the launch.
cuda_test!(fn sparse_adam_densify_reports_unsorted_entries_and_refuses_short_buffers(cuda) {
    let mut coo: Coo<sparsegrad::Cuda, f32> = Coo::with_capacity(&cuda, 3, (2, 2)).unwrap();
    cuda.upload_into(&[0u32, 1, 0], &mut coo.rows).unwrap();
    cuda.upload_into(&[1u32, 0, 0], &mut coo.cols).unwrap();
    cuda.upload_into(&[0.5f32, 0.5, 0.5], &mut coo.values).unwrap();
    coo.len = 3;
    let (mut m, mut v) = (up(&cuda, &[0.0f32; 4]), up(&cuda, &[0.0f32; 4]));
    let mut clock = cuda.alloc::<u64>(2).unwrap();
    let hp = AdamParams::default();
    let mut short = cuda.alloc::<f32>(3).unwrap();
    let err = cuda.sparse_adam_densify(&coo, &mut m, &mut v, &mut clock, &hp, OutBuf::Full(&mut short));
    assert!(matches!(err, Err(Error::Shape { op: "sparse_adam_densify", .. })), "{err:?}");
    assert_eq!(down(&cuda, &clock, 2), vec![0, 0], "a refused call leaves the clock");
    let mut dense = poisoned(&cuda, 4, bf16::NAN);
    cuda.sparse_adam_densify(&coo, &mut m, &mut v, &mut clock, &hp, OutBuf::Half(&mut dense)).unwrap();
    assert!(matches!(cuda.download(&m, 4), Err(Error::InvalidArgument { op: "sparse_adam", .. })));
    // Entries 0 and 1 are in order and applied; entry 2 (before entry 1) is skipped.
    let got = down(&cuda, &dense, 4);
    assert!(got[1] != bf16::ZERO && got[2] != bf16::ZERO && got[0] == bf16::ZERO && got[3] == bf16::ZERO, "{got:?}");
});

cuda_test!(fn adamw_matches_cpu_bit_for_bit(cuda) {
    check_adamw(&cuda, big_shapes());
});

#[test]
fn harness_on_cpu() {
    check_sparse_adam(&Cpu::new());
    check_sparse_adam_densify(&Cpu::new());
    check_adamw(&Cpu::new(), false);
    check_adamw_batch(&Cpu::new());
    check_sparse_adam_batch(&Cpu::new());
}
