//! The transformer ops (RMSNorm, with the residual add folded in, and its backward, RoPE
//! both ways, causal softmax and its backward, masked cross-entropy) on CUDA against the CPU, on seeded random ragged shapes
//! covering every row-group size of cuda/transformer.cu (a warp per row up to 1024 columns,
//! a 256-thread block up to 16384, a 1024-thread block beyond). Outputs are poisoned (NaN)
//! and longer than needed; the tails must stay untouched.
//!
//! Each result is compared twice, elementwise `|a - b| <= atol + rtol |b|` with the worst
//! index reported:
//! - with the f32 CPU twin (the specification as it runs). RoPE is compared bit for bit
//!   (both sides round every product and sum the same way). Ops with row sums differ by
//!   the summation order (a tree here, sequential on the CPU) and by expf/logf vs libm
//!   (<= 2 ulp); the f32 CPU's own error grows with the row length: measured against f64 on
//!   these input ranges, its cross-entropy gradient is off by up to 5.5e-5 relative at a
//!   49152 vocabulary (the lse of a sequential f32 sum of 49152 terms), its softmax by
//!   3e-6 at t = 1500 and its RMSNorm by 2e-6 at 20000 columns, hence the row-length terms;
//! - with the CPU twin run in f64 on the same (f32) inputs, i.e. the exact answer, which
//!   the device must hit to ~1e-5 relative whatever the row length (tree sums: error
//!   ~log2(n) ulp; arguments of exp rounded to f32: up to 1e-6 relative for |arg| <= 24).
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::*;
use half::bf16;
use rand::Rng;
use sparsegrad::backend::{DenseOps, OutBuf, TransformerOps};
use sparsegrad::{Backend, Cpu, Error, Real};

#[derive(Clone, Copy, Debug)]
struct Tol {
    atol: f32,
    rtol: f32,
}

const fn tol(atol: f32, rtol: f32) -> Tol {
    Tol { atol, rtol }
}

/// `got` against the f32 CPU result and (if given) the f64 one.
fn compare(what: &str, got: &[f32], want32: &[f32], want64: Option<&[f64]>, t32: Tol, t64: Tol) {
    assert_close(&format!("{what} (vs CPU f32)"), got, want32, t32.atol, t32.rtol);
    if let Some(w) = want64 {
        let w: Vec<f32> = w.iter().map(|&v| v as f32).collect();
        assert_close(&format!("{what} (vs CPU f64)"), got, &w, t64.atol, t64.rtol);
    }
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Downloads `len` elements and splits them into the output and the tail past it.
fn down_split<B: Backend>(dev: &B, buf: &B::Buf<f32>, n: usize, len: usize) -> (Vec<f32>, Vec<f32>) {
    let mut v = down(dev, buf, len);
    let tail = v.split_off(n);
    (v, tail)
}

/// Length of the poisoned tail after every output.
const TAIL: usize = 3;

// ---- the CPU twin, generic over the precision ------------------------------------------------

fn cpu_rmsnorm<F: Real>(cpu: &Cpu, x: &[F], w: &[F], rows: usize, cols: usize, eps: f32) -> (Vec<F>, Vec<F>) {
    let (mut y, mut inv) = (cpu.alloc(rows * cols).unwrap(), cpu.alloc(rows).unwrap());
    cpu.rmsnorm(&cpu.upload(x).unwrap(), &cpu.upload(w).unwrap(), &mut y, &mut inv, rows, cols, eps).unwrap();
    (cpu.download(&y, rows * cols).unwrap(), cpu.download(&inv, rows).unwrap())
}

#[allow(clippy::too_many_arguments)]
fn cpu_rmsnorm_backward<F: Real>(cpu: &Cpu, x: &[F], w: &[F], inv: &[F], dy: &[F], rows: usize, cols: usize) -> Vec<F> {
    let mut dx = cpu.alloc(rows * cols).unwrap();
    let (x, w, inv, dy) =
        (cpu.upload(x).unwrap(), cpu.upload(w).unwrap(), cpu.upload(inv).unwrap(), cpu.upload(dy).unwrap());
    cpu.rmsnorm_backward(&x, &w, &inv, &dy, &mut dx, rows, cols).unwrap();
    cpu.download(&dx, rows * cols).unwrap()
}

fn cpu_softmax<F: Real>(cpu: &Cpu, s: &[F], mats: usize, t: usize, scale: f32) -> Vec<F> {
    let mut b = cpu.upload(s).unwrap();
    cpu.softmax_causal(&mut b, mats, t, scale).unwrap();
    cpu.download(&b, s.len()).unwrap()
}

fn cpu_softmax_backward<F: Real>(cpu: &Cpu, p: &[F], dp: &[F], mats: usize, t: usize, scale: f32) -> Vec<F> {
    let mut ds = cpu.alloc(p.len()).unwrap();
    cpu.softmax_causal_backward(&cpu.upload(p).unwrap(), &cpu.upload(dp).unwrap(), &mut ds, mats, t, scale).unwrap();
    cpu.download(&ds, p.len()).unwrap()
}

#[allow(clippy::too_many_arguments)]
fn cpu_cross_entropy<F: Real>(
    cpu: &Cpu,
    logits: &[F],
    targets: &[u32],
    mask: &[F],
    rows: usize,
    vocab: usize,
    grad_scale: F,
) -> (Vec<F>, Vec<F>) {
    let (mut l, mut losses) = (cpu.upload(logits).unwrap(), cpu.alloc(rows).unwrap());
    cpu.cross_entropy(
        &mut l,
        &cpu.upload(targets).unwrap(),
        &cpu.upload(mask).unwrap(),
        rows,
        vocab,
        grad_scale,
        &mut losses,
    )
    .unwrap();
    (cpu.download(&losses, rows).unwrap(), cpu.download(&l, rows * vocab).unwrap())
}

/// Shapes `(rows, cols)` of the row ops; `big` adds the wide ones (256- and 1024-thread
/// groups) and the 1000-row cases of wide rows.
fn row_shapes(widths: &[usize], big: bool) -> Vec<(usize, usize)> {
    let mut shapes = Vec::new();
    for &cols in widths {
        for rows in [1, 17, 1000] {
            if rows * cols <= if big { 50_000_000 } else { 600_000 } {
                shapes.push((rows, cols));
            }
        }
    }
    shapes
}

// ---- RMSNorm ----------------------------------------------------------------------------------

const RMS_Y: (Tol, Tol) = (tol(1e-6, 1e-5), tol(1e-6, 5e-6));
const RMS_INV: (Tol, Tol) = (tol(0.0, 1e-5), tol(0.0, 5e-6));
const RMS_DX: (Tol, Tol) = (tol(2e-6, 1e-5), tol(2e-6, 5e-6));

fn check_rmsnorm<B: Backend>(dev: &B, big: bool) {
    let cpu = Cpu::new();
    let mut r = rng(100);
    // The fused ops' extra inputs come from their own stream, so the plain ops see the same
    // inputs whatever is added here.
    let mut extra = rng(101);
    let widths: &[usize] = if big { &[1, 33, 576, 1024, 1025, 4096, 20000] } else { &[1, 33, 576, 1025] };
    for (rows, cols) in row_shapes(widths, big) {
        let n = rows * cols;
        let mut x = rand_range(&mut r, n, -2.0, 2.0);
        // A row of large values and a row of zeros (inv_rms = 1 / sqrt(eps)).
        if rows > 2 {
            x[cols..2 * cols].iter_mut().for_each(|v| *v *= 1000.0);
            x[2 * cols..3 * cols].fill(0.0);
        }
        let w = rand_range(&mut r, cols, -1.5, 1.5);
        let dy = rand_range(&mut r, n, -1.0, 1.0);
        let eps = if cols % 2 == 0 { 1e-5 } else { 1e-6 };
        let what = format!("rmsnorm {rows}x{cols}");

        let (y32, inv32) = cpu_rmsnorm(&cpu, &x, &w, rows, cols, eps);
        let (y64, inv64) = cpu_rmsnorm(&cpu, &to64(&x), &to64(&w), rows, cols, eps);
        let (xd, wd) = (up(dev, &x), up(dev, &w));
        let (mut yd, mut invd) = (poisoned(dev, n + TAIL, f32::NAN), poisoned(dev, rows + TAIL, f32::NAN));
        dev.rmsnorm(&xd, &wd, &mut yd, &mut invd, rows, cols, eps).unwrap();
        let (y, y_tail) = down_split(dev, &yd, n, n + TAIL);
        let (inv, inv_tail) = down_split(dev, &invd, rows, rows + TAIL);
        compare(&format!("{what}: y"), &y, &y32, Some(&y64), RMS_Y.0, RMS_Y.1);
        compare(&format!("{what}: inv_rms"), &inv, &inv32, Some(&inv64), RMS_INV.0, RMS_INV.1);
        assert_untouched_f32(&format!("{what}: y tail"), &y_tail, f32::NAN);
        assert_untouched_f32(&format!("{what}: inv_rms tail"), &inv_tail, f32::NAN);

        // Only the bf16 rounding of y: the device's own norm then cast, bit for bit, with the
        // same inv_rms; on the CPU the same against the CPU's norm.
        let mut yh = poisoned(dev, n + TAIL, bf16::from_f32(7.0));
        let mut invh = poisoned(dev, rows, f32::NAN);
        dev.rmsnorm_to_bf16(&xd, &wd, &mut yh, &mut invh, rows, cols, eps).unwrap();
        let mut cast = poisoned(dev, n, bf16::ZERO);
        dev.cast_to_bf16(&up(dev, &y), &mut cast, n).unwrap();
        let bits = |v: Vec<bf16>| v.iter().map(|h| h.to_bits()).collect::<Vec<u16>>();
        let got = bits(down(dev, &yh, n + TAIL));
        assert_eq!(&got[..n], &bits(down(dev, &cast, n))[..], "{what}: rmsnorm_to_bf16 vs norm + cast");
        assert!(got[n..].iter().all(|&h| h == bf16::from_f32(7.0).to_bits()), "{what}: rmsnorm_to_bf16 tail");
        assert_bits(&format!("{what}: rmsnorm_to_bf16 inv_rms"), &down(dev, &invh, rows), &inv);
        let (mut yc, mut ic) = (poisoned(&cpu, n, bf16::ZERO), poisoned(&cpu, rows, f32::NAN));
        cpu.rmsnorm_to_bf16(&up(&cpu, &x), &up(&cpu, &w), &mut yc, &mut ic, rows, cols, eps).unwrap();
        let want: Vec<u16> = y32.iter().map(|v| bf16::from_f32(*v).to_bits()).collect();
        assert_eq!(bits(down(&cpu, &yc, n)), want, "{what}: CPU rmsnorm_to_bf16 vs norm + cast");
        assert_bits(&format!("{what}: CPU rmsnorm_to_bf16 inv_rms"), &down(&cpu, &ic, rows), &inv32);

        // The residual added first (and x saved): each backend against its own passes, then
        // the device's norm against the CPU's.
        let branch = rand_range(&mut extra, n, -2.0, 2.0);
        let what = format!("add_rmsnorm {rows}x{cols}");
        let (x_dev, y_dev) = check_add_rmsnorm(dev, &what, &x, &branch, &w, (rows, cols), eps);
        let (x_cpu, y_cpu) = check_add_rmsnorm(&cpu, &format!("CPU {what}"), &x, &branch, &w, (rows, cols), eps);
        assert_bits(&format!("{what}: the residual sum, device vs CPU"), &x_dev, &x_cpu);
        compare(&format!("{what}: y"), &y_dev, &y_cpu, None, RMS_Y.0, RMS_Y.1);

        // The backward takes the f32 CPU's inv_rms on every side, so the inputs are identical.
        let what = format!("rmsnorm_backward {rows}x{cols}");
        let dx32 = cpu_rmsnorm_backward(&cpu, &x, &w, &inv32, &dy, rows, cols);
        let dx64 = cpu_rmsnorm_backward(&cpu, &to64(&x), &to64(&w), &to64(&inv32), &to64(&dy), rows, cols);
        let mut dxd = poisoned(dev, n + TAIL, f32::NAN);
        dev.rmsnorm_backward(&xd, &wd, &up(dev, &inv32), &up(dev, &dy), &mut dxd, rows, cols).unwrap();
        let (dx, dx_tail) = down_split(dev, &dxd, n, n + TAIL);
        compare(&what, &dx, &dx32, Some(&dx64), RMS_DX.0, RMS_DX.1);
        assert_untouched_f32(&format!("{what}: tail"), &dx_tail, f32::NAN);

        // Added into a residual gradient: bit-identical, on each backend, to the backward
        // into scratch followed by axpy with alpha 1 (the two passes it replaces).
        let what = format!("rmsnorm_backward_add {rows}x{cols}");
        let mut acc = rand_f32(&mut r, n);
        acc.extend([f32::NAN; TAIL]);
        let (invd, dyd) = (up(dev, &inv32), up(dev, &dy));
        let mut fused = up(dev, &acc);
        let mut fused_half = poisoned(dev, n + TAIL, bf16::from_f32(7.0));
        dev.rmsnorm_backward_add(&xd, &wd, &invd, &dyd, None, &mut fused, Some(&mut fused_half), rows, cols).unwrap();
        let mut two_pass = up(dev, &acc);
        dev.axpy(1.0, &dxd, &mut two_pass, n).unwrap();
        let mut two_half = poisoned(dev, n, bf16::ZERO);
        dev.cast_to_bf16(&two_pass, &mut two_half, n).unwrap();
        let (fused, fused_tail) = down_split(dev, &fused, n, n + TAIL);
        assert_bits(&format!("{what}: device, fused vs two passes"), &fused, &down(dev, &two_pass, n));
        assert_untouched_f32(&format!("{what}: tail"), &fused_tail, f32::NAN);
        // The bf16 copy: the cast of the result, bit for bit, nothing written past it.
        let got_half: Vec<u16> = down(dev, &fused_half, n + TAIL).iter().map(|h| h.to_bits()).collect();
        let want_half: Vec<u16> = down(dev, &two_half, n).iter().map(|h| h.to_bits()).collect();
        assert_eq!(&got_half[..n], &want_half[..], "{what}: bf16 copy vs cast");
        assert!(got_half[n..].iter().all(|&h| h == bf16::from_f32(7.0).to_bits()), "{what}: bf16 copy tail");
        let (xc, wc, ic, dyc) = (up(&cpu, &x), up(&cpu, &w), up(&cpu, &inv32), up(&cpu, &dy));
        let mut cpu_fused = up(&cpu, &acc);
        let mut cpu_half = poisoned(&cpu, n, bf16::ZERO);
        cpu.rmsnorm_backward_add(&xc, &wc, &ic, &dyc, None, &mut cpu_fused, Some(&mut cpu_half), rows, cols).unwrap();
        let cpu_half: Vec<u16> = down(&cpu, &cpu_half, n).iter().map(|h| h.to_bits()).collect();
        let cpu_cast: Vec<u16> = down(&cpu, &cpu_fused, n).iter().map(|v| bf16::from_f32(*v).to_bits()).collect();
        assert_eq!(cpu_half, cpu_cast, "{what}: CPU bf16 copy vs cast");
        let mut cpu_two = up(&cpu, &acc);
        cpu.axpy(1.0, &up(&cpu, &dx32), &mut cpu_two, n).unwrap();
        assert_bits(&format!("{what}: CPU, fused vs two passes"), &down(&cpu, &cpu_fused, n), &down(&cpu, &cpu_two, n));
        let want: Vec<f64> = acc[..n].iter().zip(&dx64).map(|(&a, &d)| a as f64 + d).collect();
        compare(&what, &fused, &down(&cpu, &cpu_fused, n), Some(&want), RMS_DX.0, RMS_DX.1);

        // The output gradient in two parts (the MLP's gate and up halves): bit-identical, on
        // each backend, to adding them with axpy first; the device against the CPU.
        let what = format!("rmsnorm_backward_add, two parts, {rows}x{cols}");
        let dy2 = rand_range(&mut extra, n, -1.0, 1.0);
        let (got_dev, want_dev) = backward_add_two_parts(dev, [&x, &w, &inv32, &dy, &dy2, &acc], rows, cols);
        assert_bits(&format!("{what}: device, fused vs axpy first"), &got_dev, &want_dev);
        let (got_cpu, want_cpu) = backward_add_two_parts(&cpu, [&x, &w, &inv32, &dy, &dy2, &acc], rows, cols);
        assert_bits(&format!("{what}: CPU, fused vs axpy first"), &got_cpu, &want_cpu);
        compare(&what, &got_dev, &got_cpu, None, RMS_DX.0, RMS_DX.1);
    }
}

/// `add_rmsnorm` on `be` against the passes it replaces on `be` (`axpy` with alpha 1, a
/// copy, `rmsnorm` and for a bf16 output `cast_to_bf16`), bit for bit, with and without the
/// residual and the saved copy, every output poisoned and longer than needed (tails must stay
/// untouched). Returns the new `x` and the f32 output of the call with both.
fn check_add_rmsnorm<B: Backend>(
    be: &B,
    what: &str,
    x: &[f32],
    branch: &[f32],
    w: &[f32],
    (rows, cols): (usize, usize),
    eps: f32,
) -> (Vec<f32>, Vec<f32>) {
    let n = rows * cols;
    let bits = |v: Vec<bf16>| v.iter().map(|h| h.to_bits()).collect::<Vec<u16>>();
    let (bd, wd) = (up(be, branch), up(be, w));
    let mut result = None;
    for (with_branch, with_save, half) in
        [(true, true, false), (true, true, true), (true, false, false), (false, true, true), (false, false, false)]
    {
        let what = format!("{what} branch={with_branch} save={with_save} half={half}");
        // The passes it replaces.
        let mut x_ref = up(be, x);
        if with_branch {
            be.axpy(1.0, &bd, &mut x_ref, n).unwrap();
        }
        let (mut y_ref, mut inv_ref) = (poisoned(be, n, 0.0f32), poisoned(be, rows, 0.0f32));
        be.rmsnorm(&x_ref, &wd, &mut y_ref, &mut inv_ref, rows, cols, eps).unwrap();
        let mut half_ref = poisoned(be, n, bf16::ZERO);
        be.cast_to_bf16(&y_ref, &mut half_ref, n).unwrap();
        // The fused op.
        let mut xt = x.to_vec();
        xt.extend([f32::NAN; TAIL]);
        let mut xf = up(be, &xt);
        let mut save = poisoned(be, n + TAIL, f32::NAN);
        let mut y = poisoned(be, n + TAIL, f32::NAN);
        let mut yh = poisoned(be, n + TAIL, bf16::from_f32(7.0));
        let mut inv = poisoned(be, rows + TAIL, f32::NAN);
        let out = if half { OutBuf::Half(&mut yh) } else { OutBuf::Full(&mut y) };
        let (b, s) = (with_branch.then_some(&bd), with_save.then_some(&mut save));
        be.add_rmsnorm(&mut xf, b, s, &wd, out, &mut inv, rows, cols, eps).unwrap();
        let (x_new, x_tail) = down_split(be, &xf, n, n + TAIL);
        assert_bits(&format!("{what}: x"), &x_new, &down(be, &x_ref, n));
        assert_untouched_f32(&format!("{what}: x tail"), &x_tail, f32::NAN);
        let (saved, saved_tail) = down_split(be, &save, n, n + TAIL);
        if with_save {
            assert_bits(&format!("{what}: x_save"), &saved, &x_new);
            assert_untouched_f32(&format!("{what}: x_save tail"), &saved_tail, f32::NAN);
        } else {
            assert_untouched_f32(&format!("{what}: x_save not given"), &down(be, &save, n + TAIL), f32::NAN);
        }
        let (inv_got, inv_tail) = down_split(be, &inv, rows, rows + TAIL);
        assert_bits(&format!("{what}: inv_rms"), &inv_got, &down(be, &inv_ref, rows));
        assert_untouched_f32(&format!("{what}: inv_rms tail"), &inv_tail, f32::NAN);
        let got_half = bits(down(be, &yh, n + TAIL));
        if half {
            assert_eq!(&got_half[..n], &bits(down(be, &half_ref, n))[..], "{what}: bf16 y vs norm + cast");
            assert_untouched_f32(&format!("{what}: no f32 y"), &down(be, &y, n + TAIL), f32::NAN);
        } else {
            let (y_got, y_tail) = down_split(be, &y, n, n + TAIL);
            assert_bits(&format!("{what}: y"), &y_got, &down(be, &y_ref, n));
            assert_untouched_f32(&format!("{what}: y tail"), &y_tail, f32::NAN);
            if with_branch && with_save {
                result = Some((x_new, y_got));
            }
        }
        let seven = bf16::from_f32(7.0).to_bits();
        assert!(got_half[if half { n } else { 0 }..].iter().all(|&h| h == seven), "{what}: bf16 output tail");
    }
    result.unwrap()
}

/// `rmsnorm_backward_add` with the output gradient in two parts (`dy`, `dy2`) into `acc`,
/// and the same with `dy2` added into `dy` by `axpy` first, both on `be`: (fused, axpy first).
fn backward_add_two_parts<B: Backend>(
    be: &B,
    [x, w, inv, dy, dy2, acc]: [&[f32]; 6],
    rows: usize,
    cols: usize,
) -> (Vec<f32>, Vec<f32>) {
    let n = rows * cols;
    let (xd, wd, id, dyd, dy2d) = (up(be, x), up(be, w), up(be, inv), up(be, dy), up(be, dy2));
    let mut fused = up(be, &acc[..n]);
    be.rmsnorm_backward_add(&xd, &wd, &id, &dyd, Some(&dy2d), &mut fused, None, rows, cols).unwrap();
    let mut dy_sum = up(be, dy);
    be.axpy(1.0, &dy2d, &mut dy_sum, n).unwrap();
    let mut first = up(be, &acc[..n]);
    be.rmsnorm_backward_add(&xd, &wd, &id, &dy_sum, None, &mut first, None, rows, cols).unwrap();
    (down(be, &fused, n), down(be, &first, n))
}

// ---- RoPE -------------------------------------------------------------------------------------

fn rope_tables(seq_len: usize, head_dim: usize) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let angle = |p: usize, i: usize| p as f64 * 10000f64.powf(-2.0 * i as f64 / head_dim as f64);
    let cos = (0..seq_len * half).map(|k| angle(k / half, k % half).cos() as f32).collect();
    let sin = (0..seq_len * half).map(|k| angle(k / half, k % half).sin() as f32).collect();
    (cos, sin)
}

fn check_rope<B: Backend>(dev: &B, big: bool) {
    let cpu = Cpu::new();
    let mut r = rng(200);
    let mut shapes: Vec<(usize, usize, usize)> = Vec::new();
    for tokens in [1, 17, 1000] {
        for (heads, head_dim) in [(9, 64), (3, 64), (2, 8), (1, 2)] {
            shapes.push((tokens, heads, head_dim));
        }
    }
    if big {
        shapes.push((4096, 32, 128));
    }
    for (tokens, heads, head_dim) in shapes {
        let n = tokens * heads * head_dim;
        for seq_len in [tokens, 7, 128] {
            let (cos, sin) = rope_tables(seq_len, head_dim);
            let (cc, sc, cd, sd) = (up(&cpu, &cos), up(&cpu, &sin), up(dev, &cos), up(dev, &sin));
            let mut x = rand_f32(&mut r, n);
            x.extend([f32::NAN; TAIL]);
            for inverse in [false, true] {
                let what = format!("rope {tokens}x{heads}x{head_dim} seq_len {seq_len} inverse {inverse}");
                let mut want = up(&cpu, &x);
                cpu.rope(&mut want, tokens, heads, head_dim, seq_len, &cc, &sc, inverse).unwrap();
                let mut got = up(dev, &x);
                dev.rope(&mut got, tokens, heads, head_dim, seq_len, &cd, &sd, inverse).unwrap();
                let (got, tail) = down_split(dev, &got, n, n + TAIL);
                assert_bits(&what, &got, &down(&cpu, &want, n));
                assert_untouched_f32(&format!("{what}: tail"), &tail, f32::NAN);

                // Queries and keys in one launch: bit-identical to two rope calls, the keys
                // with their own head count (grouped-query attention), tails untouched.
                let k_heads = heads.div_ceil(3);
                let nk = tokens * k_heads * head_dim;
                let mut kx = rand_f32(&mut r, nk);
                kx.extend([f32::NAN; TAIL]);
                let (mut q_got, mut k_got) = (up(dev, &x), up(dev, &kx));
                let poison = bf16::from_f32(7.0);
                let (mut qh, mut kh) = (poisoned(dev, n + TAIL, poison), poisoned(dev, nk + TAIL, poison));
                let halves = Some((&mut qh, &mut kh));
                dev.rope_qk(
                    &mut q_got, heads, &mut k_got, k_heads, tokens, head_dim, seq_len, &cd, &sd, inverse, halves,
                )
                .unwrap();
                // The bf16 copies: the cast of each rotated tensor, nothing written past them.
                for (what_half, half, full, len) in [("queries", &qh, &q_got, n), ("keys", &kh, &k_got, nk)] {
                    let mut cast = poisoned(dev, len, bf16::ZERO);
                    dev.cast_to_bf16(full, &mut cast, len).unwrap();
                    let got: Vec<u16> = down(dev, half, len + TAIL).iter().map(|h| h.to_bits()).collect();
                    let want: Vec<u16> = down(dev, &cast, len).iter().map(|h| h.to_bits()).collect();
                    assert_eq!(&got[..len], &want[..], "{what}: rope_qk bf16 {what_half} vs cast");
                    assert!(got[len..].iter().all(|&h| h == poison.to_bits()), "{what}: rope_qk bf16 {what_half} tail");
                }
                let mut k_want = up(&cpu, &kx);
                cpu.rope(&mut k_want, tokens, k_heads, head_dim, seq_len, &cc, &sc, inverse).unwrap();
                let (q_got, q_tail) = down_split(dev, &q_got, n, n + TAIL);
                let (k_got, k_tail) = down_split(dev, &k_got, nk, nk + TAIL);
                assert_bits(&format!("{what}: rope_qk queries"), &q_got, &down(&cpu, &want, n));
                assert_bits(&format!("{what}: rope_qk keys ({k_heads} heads)"), &k_got, &down(&cpu, &k_want, nk));
                assert_untouched_f32(&format!("{what}: rope_qk query tail"), &q_tail, f32::NAN);
                assert_untouched_f32(&format!("{what}: rope_qk key tail"), &k_tail, f32::NAN);
                let (mut q_cpu, mut k_cpu) = (up(&cpu, &x), up(&cpu, &kx));
                cpu.rope_qk(&mut q_cpu, heads, &mut k_cpu, k_heads, tokens, head_dim, seq_len, &cc, &sc, inverse, None)
                    .unwrap();
                assert_bits(&format!("{what}: CPU rope_qk queries"), &down(&cpu, &q_cpu, n), &down(&cpu, &want, n));
                assert_bits(&format!("{what}: CPU rope_qk keys"), &down(&cpu, &k_cpu, nk), &down(&cpu, &k_want, nk));
            }
        }
    }
}

// ---- causal softmax ---------------------------------------------------------------------------

const SOFTMAX_P: (Tol, Tol) = (tol(1e-10, 2e-5), tol(1e-10, 1e-5));

/// `ds` is `scale p (dp - dot)`: its absolute error is up to `|scale| |error of dot|` (p ~ 1),
/// and dot (|dp| <= 1, sum of p = 1) carries the error of its sum: measured for the
/// sequential f32 CPU, about 5e-8 sqrt(t) (3e-6 at t = 4000); a tree sum does better.
fn softmax_ds_tol(scale: f32, t: usize) -> (Tol, Tol) {
    let sqrt_t = (t as f32).sqrt();
    (tol(scale.abs() * (2e-7 + 1e-7 * sqrt_t), 1e-5), tol(scale.abs() * (3e-7 + 5e-8 * sqrt_t), 1e-5))
}

fn check_softmax<B: Backend>(dev: &B, big: bool) {
    let cpu = Cpu::new();
    let mut r = rng(300);
    let mut shapes = vec![(1, 1), (3, 1), (1, 17), (9, 17), (1, 128), (3, 128), (2, 300)];
    if big {
        // 256-thread rows, and (t > 16384) 1024-thread rows: 268M entries, f32 reference only.
        shapes.extend([(2, 1500), (1, 16385)]);
    }
    for (mats, t) in shapes {
        let n = mats * t * t;
        let with_f64 = n <= 10_000_000;
        let scales: &[f32] = if t > 16384 { &[0.125] } else { &[0.125, 1.0, -0.7] };
        for &scale in scales {
            let what = format!("softmax_causal {mats}x{t}x{t} scale {scale}");
            let mut s = rand_range(&mut r, n, -4.0, 4.0);
            for row in 0..mats * t {
                let i = row % t;
                let k = r.random_range(0..=i);
                // An outlier (exp(100) overflows f32: only the max subtraction copes) and NaN
                // above the diagonal (never read: every output there must be exactly 0).
                s[row * t + k] += 100.0;
                s[row * t + i + 1..(row + 1) * t].fill(f32::NAN);
            }
            let p32 = cpu_softmax(&cpu, &s, mats, t, scale);
            let p64 = with_f64.then(|| cpu_softmax(&cpu, &to64(&s), mats, t, scale));
            s.extend([f32::NAN; TAIL]);
            let mut sd = up(dev, &s);
            dev.softmax_causal(&mut sd, mats, t, scale).unwrap();
            let (p, tail) = down_split(dev, &sd, n, n + TAIL);
            compare(&what, &p, &p32, p64.as_deref(), SOFTMAX_P.0, SOFTMAX_P.1);
            assert_untouched_f32(&format!("{what}: tail"), &tail, f32::NAN);
            for row in 0..mats * t {
                let i = row % t;
                if let Some(j) = p[row * t + i + 1..(row + 1) * t].iter().position(|&v| v.to_bits() != 0) {
                    panic!(
                        "{what}: row {row} entry {} above the diagonal is {:e}, not +0",
                        i + 1 + j,
                        p[row * t + i + 1 + j]
                    );
                }
            }

            // Backward at the CPU's p (identical inputs on every side).
            let what = format!("softmax_causal_backward {mats}x{t}x{t} scale {scale}");
            let dp = rand_f32(&mut r, n);
            let ds32 = cpu_softmax_backward(&cpu, &p32, &dp, mats, t, scale);
            let ds64 = with_f64.then(|| cpu_softmax_backward(&cpu, &to64(&p32), &to64(&dp), mats, t, scale));
            let mut dsd = poisoned(dev, n + TAIL, f32::NAN);
            dev.softmax_causal_backward(&up(dev, &p32), &up(dev, &dp), &mut dsd, mats, t, scale).unwrap();
            let (ds, tail) = down_split(dev, &dsd, n, n + TAIL);
            let (t32, t64) = softmax_ds_tol(scale, t);
            compare(&what, &ds, &ds32, ds64.as_deref(), t32, t64);
            assert_untouched_f32(&format!("{what}: tail"), &tail, f32::NAN);
        }
    }
}

// ---- cross-entropy -----------------------------------------------------------------------------

/// Loss tolerances: the f32 CPU's lse carries the error of a sequential sum of `vocab` terms.
fn ce_loss_tol(vocab: usize) -> (Tol, Tol) {
    (tol(1e-5, 1e-6 + 2e-10 * vocab as f32), tol(5e-6, 1e-6))
}

/// Gradient tolerances: relative to the entries, plus an absolute floor of 2e-6 |g| for the
/// target entry `g (p - 1)` when p is close to 1 (and for entries that underflow).
fn ce_grad_tol(vocab: usize, g_max: f32) -> (Tol, Tol) {
    (tol(2e-6 * g_max, 6e-6 + 4e-9 * vocab as f32), tol(2e-6 * g_max, 1e-5))
}

fn check_cross_entropy<B: Backend>(dev: &B, big: bool) {
    let cpu = Cpu::new();
    let mut r = rng(400);
    let widths: &[usize] = if big { &[1, 33, 576, 5000, 49152] } else { &[1, 33, 576, 5000] };
    for (rows, vocab) in row_shapes(widths, big) {
        let n = rows * vocab;
        let what = format!("cross_entropy {rows}x{vocab}");
        let mut logits = rand_range(&mut r, n, -8.0, 8.0);
        let mut targets: Vec<u32> = (0..rows).map(|_| r.random_range(0..vocab as u32)).collect();
        // About 20% of the rows masked out (some with a target outside the vocabulary, which
        // is then ignored), some weighted; one row with a dominant logit (p ~ 1 at the target).
        let mask: Vec<f32> = (0..rows)
            .map(|i| {
                if i > 0 && r.random_bool(0.2) {
                    0.0
                } else if i % 5 == 3 {
                    0.5
                } else {
                    1.0
                }
            })
            .collect();
        for i in 0..rows {
            if mask[i] == 0.0 && r.random_bool(0.5) {
                targets[i] = if r.random_bool(0.5) { u32::MAX } else { vocab as u32 };
            }
        }
        if rows > 1 {
            logits[vocab + targets[1] as usize % vocab] += 100.0;
        }
        let kept = mask.iter().filter(|&&m| m != 0.0).count().max(1);
        let grad_scale = 1.0 / kept as f32;

        let (loss32, grad32) = cpu_cross_entropy(&cpu, &logits, &targets, &mask, rows, vocab, grad_scale);
        let (loss64, grad64) =
            cpu_cross_entropy(&cpu, &to64(&logits), &targets, &to64(&mask), rows, vocab, grad_scale as f64);
        logits.extend([f32::NAN; TAIL]);
        let mut ld = up(dev, &logits);
        let mut lossd = poisoned(dev, rows + TAIL, f32::NAN);
        dev.cross_entropy(&mut ld, &up(dev, &targets), &up(dev, &mask), rows, vocab, grad_scale, &mut lossd).unwrap();
        let (grad, grad_tail) = down_split(dev, &ld, n, n + TAIL);
        let (loss, loss_tail) = down_split(dev, &lossd, rows, rows + TAIL);
        let (l32, l64) = ce_loss_tol(vocab);
        compare(&format!("{what}: losses"), &loss, &loss32, Some(&loss64), l32, l64);
        let (g32, g64) = ce_grad_tol(vocab, grad_scale);
        compare(&format!("{what}: gradient"), &grad, &grad32, Some(&grad64), g32, g64);
        assert_untouched_f32(&format!("{what}: logits tail"), &grad_tail, f32::NAN);
        assert_untouched_f32(&format!("{what}: losses tail"), &loss_tail, f32::NAN);
        for i in (0..rows).filter(|&i| mask[i] == 0.0) {
            assert_eq!(loss[i].to_bits(), 0, "{what}: masked row {i} has loss {}", loss[i]);
            assert!(
                grad[i * vocab..(i + 1) * vocab].iter().all(|g| g.to_bits() == 0),
                "{what}: masked row {i} has a gradient"
            );
        }
    }
}

/// A masked-in row whose target is outside the vocabulary is an error: at once on the CPU,
/// at the next synchronization on CUDA (reported once); masked out, it is ignored.
fn check_cross_entropy_errors<B: Backend>(dev: &B) {
    let logits = [0.1f32, 0.2, 0.3, 0.4, 0.5, 0.6];
    let mut l = up(dev, &logits);
    let mut losses = poisoned(dev, 2, f32::NAN);
    let targets = up(dev, &[0u32, 3]);
    let r = dev
        .cross_entropy(&mut l, &targets, &up(dev, &[1.0f32, 0.5]), 2, 3, 1.0, &mut losses)
        .and_then(|()| dev.synchronize());
    assert!(matches!(r, Err(Error::InvalidArgument { .. })), "target 3 of a 3-token vocabulary: {r:?}");
    dev.synchronize().expect("the error is reported once");
    let mut l = up(dev, &logits);
    dev.cross_entropy(&mut l, &targets, &up(dev, &[1.0f32, 0.0]), 2, 3, 1.0, &mut losses).unwrap();
    dev.synchronize().expect("a masked-out row's target is not checked");
    assert_eq!(down(dev, &losses, 2)[1].to_bits(), 0);
    assert_bits("masked row gradient", &down(dev, &l, 6)[3..], &[0.0; 3]);
    let mut l = up(dev, &logits);
    let r = dev
        .cross_entropy(&mut l, &up(dev, &[u32::MAX, 0]), &up(dev, &[-1.0f32, 0.0]), 2, 3, 1.0, &mut losses)
        .and_then(|()| dev.synchronize());
    assert!(matches!(r, Err(Error::InvalidArgument { .. })), "target u32::MAX with a negative weight: {r:?}");
    dev.synchronize().unwrap();
}

/// Bad shapes and arguments fail the same way on every backend, before anything runs.
fn check_shape_errors<B: Backend>(dev: &B) {
    let b = |n: usize| poisoned(dev, n, 1.0f32);
    let (mut y, mut inv) = (b(12), b(3));
    assert!(matches!(dev.rmsnorm(&b(11), &b(4), &mut y, &mut inv, 3, 4, 1e-5), Err(Error::Shape { .. })));
    assert!(matches!(dev.rmsnorm(&b(12), &b(4), &mut y, &mut b(2), 3, 4, 1e-5), Err(Error::Shape { .. })));
    assert!(matches!(dev.rmsnorm(&b(12), &b(4), &mut y, &mut inv, 3, 0, 1e-5), Err(Error::InvalidArgument { .. })));
    // add_rmsnorm checks every buffer before it changes x: short branch, x_save and output.
    let mut x = up(dev, &[1.5f32; 12]);
    let (mut save, mut yh) = (b(11), poisoned(dev, 11, bf16::ZERO));
    let r = dev.add_rmsnorm(&mut x, Some(&b(11)), None, &b(4), OutBuf::Full(&mut y), &mut inv, 3, 4, 1e-5);
    assert!(matches!(r, Err(Error::Shape { op: "add_rmsnorm", .. })), "short branch: {r:?}");
    let r = dev.add_rmsnorm(&mut x, Some(&b(12)), Some(&mut save), &b(4), OutBuf::Full(&mut y), &mut inv, 3, 4, 1e-5);
    assert!(matches!(r, Err(Error::Shape { op: "add_rmsnorm", .. })), "short x_save: {r:?}");
    let r = dev.add_rmsnorm(&mut x, Some(&b(12)), None, &b(4), OutBuf::Half(&mut yh), &mut inv, 3, 4, 1e-5);
    assert!(matches!(r, Err(Error::Shape { op: "add_rmsnorm", .. })), "short output: {r:?}");
    assert_eq!(down(dev, &x, 12), vec![1.5f32; 12], "x unchanged by refused calls");
    let mut dx = b(12);
    assert!(matches!(dev.rmsnorm_backward(&b(12), &b(3), &b(3), &b(12), &mut dx, 3, 4), Err(Error::Shape { .. })));
    let r = dev.rmsnorm_backward_add(&b(12), &b(4), &b(3), &b(12), Some(&b(11)), &mut dx, None, 3, 4);
    assert!(matches!(r, Err(Error::Shape { op: "rmsnorm_backward_add", .. })), "short dy2: {r:?}");
    assert!(matches!(
        dev.rmsnorm_backward(&b(12), &b(4), &b(3), &b(12), &mut dx, 3, 0),
        Err(Error::InvalidArgument { .. })
    ));
    let (c, s) = (b(16), b(16));
    let mut x = b(64);
    assert!(matches!(dev.rope(&mut x, 4, 2, 7, 4, &c, &s, false), Err(Error::InvalidArgument { .. })));
    assert!(matches!(dev.rope(&mut x, 4, 2, 8, 0, &c, &s, false), Err(Error::InvalidArgument { .. })));
    assert!(matches!(dev.rope(&mut x, 5, 2, 8, 4, &c, &s, false), Err(Error::Shape { .. })));
    assert!(matches!(dev.rope(&mut x, 4, 2, 8, 5, &c, &s, true), Err(Error::Shape { .. })));
    // rope_qk checks both tensors before it launches anything: a short key buffer leaves the
    // queries as they were.
    let (mut q, mut k) = (up(dev, &[1.5f32; 64]), up(dev, &[1.5f32; 31]));
    assert!(matches!(dev.rope_qk(&mut q, 2, &mut k, 1, 4, 8, 4, &c, &s, false, None), Err(Error::Shape { .. })));
    assert_eq!(down(dev, &q, 64), vec![1.5f32; 64]);
    // So are the bf16 copies: one too short for the keys.
    let mut k = up(dev, &[1.5f32; 32]);
    let (mut qh, mut kh) = (poisoned(dev, 64, bf16::ZERO), poisoned(dev, 31, bf16::ZERO));
    let r = dev.rope_qk(&mut q, 2, &mut k, 1, 4, 8, 4, &c, &s, false, Some((&mut qh, &mut kh)));
    assert!(matches!(r, Err(Error::Shape { .. })), "short k_half: {r:?}");
    assert_eq!(down(dev, &q, 64), vec![1.5f32; 64]);
    let mut sm = b(17);
    assert!(matches!(dev.softmax_causal(&mut sm, 2, 3, 1.0), Err(Error::Shape { .. })));
    let mut ds = b(18);
    assert!(matches!(dev.softmax_causal_backward(&b(18), &b(17), &mut ds, 2, 3, 1.0), Err(Error::Shape { .. })));
    let (mut l, mut losses) = (b(6), b(2));
    let t = up(dev, &[0u32, 0]);
    assert!(matches!(dev.cross_entropy(&mut l, &t, &b(1), 2, 3, 1.0, &mut losses), Err(Error::Shape { .. })));
    assert!(matches!(dev.cross_entropy(&mut l, &t, &b(2), 2, 4, 1.0, &mut losses), Err(Error::Shape { .. })));
    assert!(matches!(dev.cross_entropy(&mut l, &t, &b(2), 2, 0, 1.0, &mut losses), Err(Error::InvalidArgument { .. })));
    // Nothing to do is fine.
    dev.rmsnorm(&b(0), &b(4), &mut y, &mut inv, 0, 4, 1e-5).unwrap();
    dev.rope(&mut x, 0, 2, 8, 4, &c, &s, false).unwrap();
    dev.softmax_causal(&mut sm, 0, 3, 1.0).unwrap();
    dev.softmax_causal(&mut sm, 3, 0, 1.0).unwrap();
    dev.cross_entropy(&mut l, &t, &b(2), 0, 3, 1.0, &mut losses).unwrap();
    assert_bits("untouched by rejected calls", &down(dev, &x, 64), &[1.0; 64]);
    dev.synchronize().unwrap();
}

fn check_all<B: Backend>(dev: &B, big: bool) {
    check_rmsnorm(dev, big);
    check_rope(dev, big);
    check_softmax(dev, big);
    check_cross_entropy(dev, big);
    check_cross_entropy_errors(dev);
    check_shape_errors(dev);
}

cuda_test!(fn rmsnorm_matches_cpu(cuda) {
    check_rmsnorm(&cuda, big_shapes());
});

cuda_test!(fn rope_matches_cpu_bit_for_bit(cuda) {
    check_rope(&cuda, big_shapes());
});

cuda_test!(fn softmax_causal_matches_cpu(cuda) {
    check_softmax(&cuda, big_shapes());
});

cuda_test!(fn cross_entropy_matches_cpu(cuda) {
    check_cross_entropy(&cuda, big_shapes());
    check_cross_entropy_errors(&cuda);
});

cuda_test!(fn transformer_ops_reject_bad_arguments_like_the_cpu(cuda) {
    check_shape_errors(&cuda);
    // f64 is CPU-only.
    let b = |n: usize| cuda.upload(&vec![1.0f64; n]).unwrap();
    let (mut y, mut inv) = (b(4), b(2));
    assert!(matches!(cuda.rmsnorm(&b(4), &b(2), &mut y, &mut inv, 2, 2, 1e-5), Err(Error::UnsupportedDtype { .. })));
    assert!(matches!(cuda.softmax_causal(&mut y, 1, 2, 1.0), Err(Error::UnsupportedDtype { .. })));
    let mut losses = b(2);
    let t = cuda.upload(&[0u32, 1]).unwrap();
    assert!(matches!(
        cuda.cross_entropy(&mut y, &t, &b(2), 2, 2, 1.0, &mut losses),
        Err(Error::UnsupportedDtype { .. })
    ));
});

#[test]
fn harness_on_cpu() {
    check_all(&Cpu::new(), false);
}
