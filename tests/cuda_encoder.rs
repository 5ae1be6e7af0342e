//! The encoder ops (LayerNorm, its input and parameter gradients, the padding-masked
//! softmax and its backward, mean / [CLS] pooling and its backward) on CUDA against the CPU
//! (whose ops are checked by finite differences in tests/cpu_encoder_ops.rs) on seeded
//! random ragged shapes (rows 1, 17, 1000; widths 1, 17, 384, 1600; sequence lengths
//! 1 .. t, some 0 and some past t). Outputs are poisoned (NaN) and longer than needed; the tails must stay untouched.
//!
//! Each CUDA result is compared elementwise, `|a - b| <= atol + rtol |b|` with the worst
//! index reported, with the f32 CPU twin and (for the row ops) with the CPU twin run in f64
//! on the same f32 inputs. The row sums differ by order (warp trees on the device, f64 on
//! the CPU) and expf vs libm (<= 2 ulp), hence ~1e-5 relative; pooling and the parameter
//! gradients sum in the CPU's order and rounding and must match bit for bit.
#![cfg(feature = "cuda")]

mod common;
mod cuda_common;

use common::encoder::*;
use cuda_common::*;
use rand::Rng;
use sparsegrad::backend::EncoderOps;
use sparsegrad::{Backend, Cpu, Error, PoolKind};

const TAIL: usize = 3;

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn compare(what: &str, got: &[f32], want32: &[f32], want64: Option<&[f64]>, atol: f32, rtol: f32) {
    assert_close(&format!("{what} (vs CPU f32)"), got, want32, atol, rtol);
    if let Some(w) = want64 {
        let w: Vec<f32> = w.iter().map(|&v| v as f32).collect();
        assert_close(&format!("{what} (vs CPU f64)"), got, &w, atol, rtol);
    }
}

fn down_split<B: Backend>(dev: &B, buf: &B::Buf<f32>, n: usize) -> (Vec<f32>, Vec<f32>) {
    let mut v = down(dev, buf, n + TAIL);
    let tail = v.split_off(n);
    (v, tail)
}

// ---- CUDA against the CPU ------------------------------------------------------------------

fn row_shapes(big: bool) -> Vec<(usize, usize)> {
    let mut shapes = Vec::new();
    for cols in [1, 17, 384, 1600] {
        for rows in [1, 17, 1000] {
            if rows * cols <= if big { 2_000_000 } else { 40_000 } {
                shapes.push((rows, cols));
            }
        }
    }
    shapes
}

fn check_layernorm<B: Backend>(dev: &B, big: bool) {
    let cpu = Cpu::new();
    let mut r = rng(100);
    for (rows, cols) in row_shapes(big) {
        let n = rows * cols;
        let mut x = rand_range(&mut r, n, -2.0, 2.0);
        // A row with an offset (cancellation in x - mean) and a constant row (var = 0).
        if rows > 2 {
            x[cols..2 * cols].iter_mut().for_each(|v| *v += 30.0);
            x[2 * cols..3 * cols].fill(0.25);
        }
        let w = rand_range(&mut r, cols, -1.5, 1.5);
        let b = rand_f32(&mut r, cols);
        let dy = rand_f32(&mut r, n);
        let eps = if cols % 2 == 0 { 1e-12 } else { 1e-5 };
        let what = format!("layernorm {rows}x{cols}");
        let (y32, m32, r32) = cpu_layernorm(&cpu, &x, &w, &b, rows, cols, eps);
        let (y64, m64, r64) = cpu_layernorm(&cpu, &to64(&x), &to64(&w), &to64(&b), rows, cols, eps);
        let (xd, wd, bd) = (up(dev, &x), up(dev, &w), up(dev, &b));
        let (mut yd, mut md, mut rd) = (
            poisoned(dev, n + TAIL, f32::NAN),
            poisoned(dev, rows + TAIL, f32::NAN),
            poisoned(dev, rows + TAIL, f32::NAN),
        );
        dev.layernorm(&xd, &wd, &bd, &mut yd, &mut md, &mut rd, rows, cols, eps).unwrap();
        let (y, yt) = down_split(dev, &yd, n);
        let (m, mt) = down_split(dev, &md, rows);
        let (rs, rt) = down_split(dev, &rd, rows);
        // The offset row's x - mean carries the f32 rounding of x and of the mean, and the
        // device sums the mean in another order than the CPU twin (a warp tree): an error of
        // about ulp(30) = 2e-6 times rstd |w| <= 1.5 against the f32 twin as against f64.
        // (The emulator measured 4.2e-6 at 17x384; 2e-6 was too tight.)
        compare(&format!("{what}: y"), &y, &y32, Some(&y64), 1e-5, 1e-5);
        compare(&format!("{what}: mean"), &m, &m32, Some(&m64), 1e-6, 1e-5);
        // rstd of a constant row is 1 / sqrt(eps): relative comparison only.
        compare(&format!("{what}: rstd"), &rs, &r32, Some(&r64), 0.0, 2e-5);
        for (name, tail) in [("y", yt), ("mean", mt), ("rstd", rt)] {
            assert_untouched_f32(&format!("{what}: {name} tail"), &tail, f32::NAN);
        }

        // Backward at the f32 CPU's statistics (identical inputs on every side).
        let what = format!("layernorm_backward {rows}x{cols}");
        let (dx32, dw32, db32) = cpu_layernorm_backward(&cpu, &x, &w, &m32, &r32, &dy, rows, cols);
        let (dx64, _, _) =
            cpu_layernorm_backward(&cpu, &to64(&x), &to64(&w), &to64(&m32), &to64(&r32), &to64(&dy), rows, cols);
        let (md, rd, dyd) = (up(dev, &m32), up(dev, &r32), up(dev, &dy));
        let mut dxd = poisoned(dev, n + TAIL, f32::NAN);
        dev.layernorm_backward(&xd, &wd, &md, &rd, &dyd, &mut dxd, rows, cols).unwrap();
        let (dx, dxt) = down_split(dev, &dxd, n);
        // dx = rstd (w dy - mean(w dy) - xhat mean(w dy xhat)): the two row means are summed
        // in another order on the device, an error of order sqrt(cols) ulp(max |w dy|) that
        // rstd multiplies (1e6 for the constant row at eps = 1e-12; the emulator measured
        // 1.9e-3 there at 17x1600). So each row gets an absolute term proportional to its
        // own rstd, plus the relative term.
        for row in 0..rows {
            let span = row * cols..(row + 1) * cols;
            let scale = span.clone().map(|i| (w[i - row * cols] * dy[i]).abs()).fold(0f32, f32::max);
            let atol = 4.0 * f32::EPSILON * r32[row] * (cols as f32).sqrt() * scale;
            let row64 = &dx64[span.clone()];
            compare(&format!("{what} row {row}"), &dx[span.clone()], &dx32[span], Some(row64), atol, 2e-5);
        }
        assert_untouched_f32(&format!("{what}: tail"), &dxt, f32::NAN);
        let (mut dwd, mut dbd) = (poisoned(dev, cols + TAIL, f32::NAN), poisoned(dev, cols + TAIL, f32::NAN));
        dev.layernorm_param_grads(&xd, &md, &rd, &dyd, &mut dwd, &mut dbd, rows, cols, 0.0).unwrap();
        let (dw, dwt) = down_split(dev, &dwd, cols);
        let (db, dbt) = down_split(dev, &dbd, cols);
        assert_bits(&format!("layernorm_param_grads {rows}x{cols}: dw"), &dw, &dw32);
        assert_bits(&format!("layernorm_param_grads {rows}x{cols}: db"), &db, &db32);
        assert_untouched_f32("dw tail", &dwt, f32::NAN);
        assert_untouched_f32("db tail", &dbt, f32::NAN);
        // beta = 1 accumulates onto what is there.
        dev.layernorm_param_grads(&xd, &md, &rd, &dyd, &mut dwd, &mut dbd, rows, cols, 1.0).unwrap();
        let twice: Vec<f32> = dw32.iter().map(|v| v + v).collect();
        assert_bits(&format!("layernorm_param_grads {rows}x{cols}: dw, beta 1"), &down(dev, &dwd, cols), &twice);
    }
}

fn softmax_shapes(big: bool) -> Vec<(usize, usize, usize)> {
    // (batch, heads, t)
    let mut s = vec![(1, 1, 1), (3, 2, 17), (2, 12, 7), (1, 3, 128)];
    if big {
        s.extend([(8, 12, 64), (2, 4, 512), (1, 1, 1000)]);
    }
    s
}

fn check_softmax<B: Backend>(dev: &B, big: bool) {
    let cpu = Cpu::new();
    let mut r = rng(200);
    for (batch, heads, t) in softmax_shapes(big) {
        let (mats, n) = (batch * heads, batch * heads * t * t);
        let lengths = rand_lengths(&mut r, batch, t);
        for scale in [0.125f32, 1.0, -0.7] {
            let what = format!("softmax_masked {batch}x{heads}x{t}x{t} scale {scale}");
            let mut s = rand_range(&mut r, n, -4.0, 4.0);
            for row in 0..mats * t {
                let live = (lengths[row / t / heads] as usize).min(t);
                if live > 0 {
                    // An outlier (exp(100) overflows f32: only the max subtraction copes).
                    let k = r.random_range(0..live);
                    s[row * t + k] += 100.0;
                }
                // NaN on the padding keys: never read, every output there must be exactly 0.
                s[row * t + live..(row + 1) * t].fill(f32::NAN);
            }
            let p32 = cpu_softmax(&cpu, &s, &lengths, mats, heads, t, scale);
            let p64 = cpu_softmax(&cpu, &to64(&s), &lengths, mats, heads, t, scale);
            s.extend([f32::NAN; TAIL]);
            let ld = up(dev, &lengths);
            let mut sd = up(dev, &s);
            dev.softmax_masked(&mut sd, &ld, mats, heads, t, scale).unwrap();
            let (p, tail) = down_split(dev, &sd, n);
            compare(&what, &p, &p32, Some(&p64), 1e-10, 2e-5);
            assert_untouched_f32(&format!("{what}: tail"), &tail, f32::NAN);
            for row in 0..mats * t {
                let live = (lengths[row / t / heads] as usize).min(t);
                if let Some(j) = p[row * t + live..(row + 1) * t].iter().position(|&v| v.to_bits() != 0) {
                    panic!("{what}: row {row} padding key {} is {:e}, not +0", live + j, p[row * t + live + j]);
                }
            }

            let what = format!("softmax_masked_backward {batch}x{heads}x{t}x{t} scale {scale}");
            let dp = rand_f32(&mut r, n);
            let ds32 = cpu_softmax_backward(&cpu, &p32, &dp, &lengths, mats, heads, t, scale);
            let ds64 = cpu_softmax_backward(&cpu, &to64(&p32), &to64(&dp), &lengths, mats, heads, t, scale);
            let mut dsd = poisoned(dev, n + TAIL, f32::NAN);
            dev.softmax_masked_backward(&up(dev, &p32), &up(dev, &dp), &mut dsd, &ld, mats, heads, t, scale).unwrap();
            let (ds, tail) = down_split(dev, &dsd, n);
            let atol = scale.abs() * (3e-7 + 1e-7 * (t as f32).sqrt());
            compare(&what, &ds, &ds32, Some(&ds64), atol, 1e-5);
            assert_untouched_f32(&format!("{what}: tail"), &tail, f32::NAN);
        }
    }
}

fn check_pool<B: Backend>(dev: &B, big: bool) {
    let cpu = Cpu::new();
    let mut r = rng(300);
    let mut shapes = vec![(1, 1, 1), (17, 5, 17), (3, 17, 384), (7, 9, 1)];
    if big {
        shapes.extend([(1000, 17, 17), (32, 128, 1600), (7, 1000, 17)]);
    }
    for (batch, t, cols) in shapes {
        let lengths = rand_lengths(&mut r, batch, t);
        let x = rand_f32(&mut r, batch * t * cols);
        let dout = rand_f32(&mut r, batch * cols);
        let (xd, ld, dd) = (up(dev, &x), up(dev, &lengths), up(dev, &dout));
        for kind in [PoolKind::Mean, PoolKind::Cls] {
            let what = format!("pool_rows {kind:?} {batch}x{t}x{cols}");
            let want = cpu_pool(&cpu, &x, &lengths, batch, t, cols, kind);
            let mut od = poisoned(dev, batch * cols + TAIL, f32::NAN);
            dev.pool_rows(&xd, &ld, &mut od, batch, t, cols, kind).unwrap();
            let (got, tail) = down_split(dev, &od, batch * cols);
            assert_bits(&what, &got, &want);
            assert_untouched_f32(&format!("{what}: tail"), &tail, f32::NAN);

            let what = format!("pool_rows_backward {kind:?} {batch}x{t}x{cols}");
            let want = cpu_pool_backward(&cpu, &dout, &lengths, batch, t, cols, kind);
            let mut dxd = poisoned(dev, batch * t * cols + TAIL, f32::NAN);
            dev.pool_rows_backward(&dd, &ld, &mut dxd, batch, t, cols, kind).unwrap();
            let (got, tail) = down_split(dev, &dxd, batch * t * cols);
            assert_bits(&what, &got, &want);
            assert_untouched_f32(&format!("{what}: tail"), &tail, f32::NAN);
        }
    }
}

/// Bad shapes and arguments fail the same way on every backend, before anything runs.
fn check_shape_errors<B: Backend>(dev: &B) {
    let b = |n: usize| poisoned(dev, n, 1.0f32);
    let l = |n: usize| up(dev, &vec![2u32; n]);
    let (mut y, mut m, mut rs) = (b(12), b(3), b(3));
    assert!(matches!(
        dev.layernorm(&b(11), &b(4), &b(4), &mut y, &mut m, &mut rs, 3, 4, 1e-5),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        dev.layernorm(&b(12), &b(4), &b(3), &mut y, &mut m, &mut rs, 3, 4, 1e-5),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        dev.layernorm(&b(12), &b(4), &b(4), &mut y, &mut m, &mut b(2), 3, 4, 1e-5),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        dev.layernorm(&b(12), &b(4), &b(4), &mut y, &mut m, &mut rs, 3, 0, 1e-5),
        Err(Error::InvalidArgument { .. })
    ));
    let mut dx = b(12);
    assert!(matches!(
        dev.layernorm_backward(&b(12), &b(4), &b(3), &b(3), &b(11), &mut dx, 3, 4),
        Err(Error::Shape { .. })
    ));
    let (mut dw, mut db) = (b(4), b(3));
    assert!(matches!(
        dev.layernorm_param_grads(&b(12), &b(3), &b(3), &b(12), &mut dw, &mut db, 3, 4, 0.0),
        Err(Error::Shape { .. })
    ));
    let mut s = b(2 * 3 * 9);
    assert!(matches!(dev.softmax_masked(&mut s, &l(1), 3, 2, 3, 1.0), Err(Error::InvalidArgument { .. })));
    assert!(matches!(dev.softmax_masked(&mut s, &l(1), 2, 2, 6, 1.0), Err(Error::Shape { .. })));
    assert!(matches!(dev.softmax_masked(&mut s, &l(0), 2, 2, 3, 1.0), Err(Error::Shape { .. })));
    let mut ds = b(18);
    assert!(matches!(
        dev.softmax_masked_backward(&b(18), &b(17), &mut ds, &l(1), 2, 2, 3, 1.0),
        Err(Error::Shape { .. })
    ));
    let mut out = b(6);
    assert!(matches!(dev.pool_rows(&b(23), &l(2), &mut out, 2, 4, 3, PoolKind::Mean), Err(Error::Shape { .. })));
    assert!(matches!(dev.pool_rows(&b(24), &l(1), &mut out, 2, 4, 3, PoolKind::Cls), Err(Error::Shape { .. })));
    let mut dxp = b(23);
    assert!(matches!(
        dev.pool_rows_backward(&b(6), &l(2), &mut dxp, 2, 4, 3, PoolKind::Mean),
        Err(Error::Shape { .. })
    ));
    // Nothing to do is fine.
    dev.layernorm(&b(0), &b(4), &b(4), &mut y, &mut m, &mut rs, 0, 4, 1e-5).unwrap();
    dev.softmax_masked(&mut s, &l(0), 0, 2, 3, 1.0).unwrap();
    dev.pool_rows(&b(0), &l(0), &mut out, 0, 4, 3, PoolKind::Mean).unwrap();
    assert_bits("untouched by rejected calls", &down(dev, &s, 18), &[1.0; 18]);
    assert_bits("untouched by rejected calls", &down(dev, &y, 12), &[1.0; 12]);
    dev.synchronize().unwrap();
}

fn check_all<B: Backend>(dev: &B, big: bool) {
    check_layernorm(dev, big);
    check_softmax(dev, big);
    check_pool(dev, big);
    check_shape_errors(dev);
}

cuda_test!(fn layernorm_matches_cpu(cuda) {
    check_layernorm(&cuda, big_shapes());
});

cuda_test!(fn softmax_masked_matches_cpu(cuda) {
    check_softmax(&cuda, big_shapes());
});

cuda_test!(fn pooling_matches_cpu_bit_for_bit(cuda) {
    check_pool(&cuda, big_shapes());
});

cuda_test!(fn encoder_ops_reject_bad_arguments_like_the_cpu(cuda) {
    check_shape_errors(&cuda);
    // f64 is CPU-only.
    let b = |n: usize| cuda.upload(&vec![1.0f64; n]).unwrap();
    let (mut y, mut m, mut rs) = (b(4), b(2), b(2));
    assert!(matches!(
        cuda.layernorm(&b(4), &b(2), &b(2), &mut y, &mut m, &mut rs, 2, 2, 1e-5),
        Err(Error::UnsupportedDtype { .. })
    ));
    let l = cuda.upload(&[1u32]).unwrap();
    assert!(matches!(cuda.softmax_masked(&mut y, &l, 1, 1, 2, 1.0), Err(Error::UnsupportedDtype { .. })));
    assert!(matches!(cuda.pool_rows(&b(2), &l, &mut m, 1, 1, 2, PoolKind::Mean), Err(Error::UnsupportedDtype { .. })));
});

#[test]
fn harness_on_cpu() {
    check_all(&Cpu::new(), false);
}
