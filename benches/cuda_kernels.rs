//! Speed of every CUDA kernel family against what the device can do in the same run.
//!
//! Memory-bound kernels report achieved GB/s (bytes each op must read and write at least)
//! and the ratio to the device's measured copy bandwidth (a device-to-device memcpy of
//! 1 GiB, read + write counted). GEMMs report TFLOP/s and the ratio to cuBLAS's own
//! 8192^3 sgemm / bf16 peak measured here. Times are CUDA-event times per call, after
//! warm-up, averaged over several calls; ops that return host values (counts, top-k's
//! error check) include their one host round trip.
//!
//! Shapes follow LLaMA-2 7B's MLP: out = 11008, in = 4096, T = 2048 tokens, k = 1%; the
//! transformer ops use its 32 heads of 128 and a 49152-token vocabulary (SmolLM2's), plus a
//! 576-wide RMSNorm (SmolLM2-135M's hidden size: the warp-per-row kernels). The fused
//! attention runs LLaMA-2 7B's heads (32 x 128, causal, 2048 tokens) and BERT-base's
//! (12 x 64, padding mask, 32 sequences of 128), f32 and bf16, forward and backward, in
//! TFLOP/s of the products a non-fused attention would do (forward 2, backward 4 products of
//! `seq x seq x head_dim` per head, halved under the causal mask; the recomputation of the
//! scores in the backward is not counted) against the GEMM peaks of this run.
//! Run: `cargo bench --bench cuda_kernels` (prints `skipped: no CUDA device` without one).

use half::bf16;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sparsegrad::backend::cuda::CudaBuf;
use sparsegrad::backend::{
    AttentionGrads, AttentionMask, AttentionOps, AttentionShape, Coo, DenseOps, Gemm, IndexMaps, OptimOps, OutBuf,
    SparseOps, TopkOps, TransformerOps,
};
use sparsegrad::{AdamParams, Backend, Cuda, GeluKind, HostCoo, Precision, Result};

// The shapes are const generic parameters of `run` (LLaMA-2 7B's by default; `tiny()` picks
// a rehearsal set small enough for the emulated device).

/// `SPARSEGRAD_BENCH_TINY=1`: every shape shrunk (96 x 64 layer, 48 tokens, 4 heads of 16, a
/// 256-token vocabulary, 128^3 GEMM peaks, a 256 KiB copy) so the whole bench runs in seconds
/// on the CPU emulation of CUDA (scripts/gpu-run.sh --rehearse). Its figures are not GPU
/// results.
fn tiny() -> bool {
    std::env::var("SPARSEGRAD_BENCH_TINY").as_deref() == Ok("1")
}

struct Bench {
    cuda: Cuda,
    copy_gbs: f64,
    sgemm_tflops: f64,
    bf16_tflops: f64,
}

/// Mean milliseconds per call of `f`, after `warmup` calls.
fn time(cuda: &Cuda, warmup: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> f64 {
    for _ in 0..warmup {
        f().expect("warm-up call");
    }
    cuda.synchronize().expect("synchronize");
    let ((), ms) = cuda
        .time_ms(|| {
            for _ in 0..iters {
                f()?;
            }
            Ok(())
        })
        .expect("timed calls");
    ms as f64 / iters as f64
}

impl Bench {
    fn mem(&self, name: &str, bytes: f64, ms: f64) {
        let gbs = bytes / (ms * 1e-3) / 1e9;
        println!("{name:<44} {:>10.1} us {:>9.1} GB/s {:>6.1}% of copy", ms * 1e3, gbs, 100.0 * gbs / self.copy_gbs);
    }
    fn flops(&self, name: &str, flops: f64, ms: f64, peak: f64) {
        let tf = flops / (ms * 1e-3) / 1e12;
        println!("{name:<44} {:>10.1} us {:>9.2} TFLOP/s {:>5.1}% of peak", ms * 1e3, tf, 100.0 * tf / peak);
    }
}

fn rand_vec(r: &mut SmallRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
}

fn buf(cuda: &Cuda, host: &[f32]) -> CudaBuf<f32> {
    cuda.upload(host).expect("upload")
}

fn zeros<T: sparsegrad::Elem>(cuda: &Cuda, n: usize) -> CudaBuf<T> {
    cuda.alloc(n).expect("alloc")
}

fn gemm_peak(cuda: &Cuda, r: &mut SmallRng) -> (f64, f64) {
    let n = if tiny() { 128 } else { 8192 };
    let a = buf(cuda, &rand_vec(r, n * n));
    let b = buf(cuda, &rand_vec(r, n * n));
    let mut c = zeros::<f32>(cuda, n * n);
    let spec = Gemm::nn(n, n, n);
    let flops = 2.0 * (n as f64).powi(3);
    let ms = time(cuda, 2, 5, || cuda.gemm(&spec, &a, &b, &mut c));
    let sgemm = flops / (ms * 1e-3) / 1e12;
    let mut ah = zeros::<bf16>(cuda, n * n);
    let mut bh = zeros::<bf16>(cuda, n * n);
    cuda.cast_to_bf16(&a, &mut ah, n * n).unwrap();
    cuda.cast_to_bf16(&b, &mut bh, n * n).unwrap();
    let ms = time(cuda, 3, 10, || cuda.gemm_bf16(&spec, &ah, &bh, &mut c));
    (sgemm, flops / (ms * 1e-3) / 1e12)
}

/// The merged update of an up projection, `W += P D Q^T` with `P` `(OUT, OUT)`, `Q` `(IN, IN)`
/// and `D` the COO change (`k` = 1%): the by-columns order the CPU keeps (`coo_dense_t` of
/// `D^T` against `P`, one atomic add per entry and row of `P`, then `(P D) Q^T`) against the
/// GPU's (a) Dense (`D` stored densely, two GEMMs; f32, TF32, bf16) and (b) Runs (`E = D Q^T`
/// by row runs, one GEMM), each beside the roofline model's prediction for this device.
fn merged_update_by_columns<const OUT: usize, const IN: usize>(
    b: &Bench,
    coo: &Coo<Cuda, f32>,
    host: &HostCoo<f32>,
    r: &mut SmallRng,
) {
    use sparsegrad::perf::roofline::H100_SXM;
    use sparsegrad::{GemmMode, MergedUpdate, Precision};
    let cuda = &b.cuda;
    let k = host.len();
    println!("\n-- merged update W += P D Q^T, up projection {OUT} x {IN}, k = {k} (measured / predicted)");
    let model = cuda.device_model().unwrap_or(H100_SXM);
    let show = |name: &str, ms: f64, update: MergedUpdate, mode: GemmMode| {
        let predicted = 1e3 * update.price(OUT, IN, k, mode, &model);
        println!("{name:<44} {:>10.1} us measured {:>10.1} us predicted ({})", ms * 1e3, predicted * 1e3, model.name);
    };
    let p = buf(cuda, &rand_vec(r, OUT * OUT));
    let q = buf(cuda, &rand_vec(r, IN * IN));
    let mut w = buf(cuda, &rand_vec(r, OUT * IN));
    let mut scratch = zeros::<f32>(cuda, OUT * IN);
    let mut e = zeros::<f32>(cuda, OUT * IN);
    let f32_mode = GemmMode::of(Precision::Full, false);
    // Today's CPU order on the GPU: D^T as COO (rows = columns of D), P D by columns.
    let mut dt: Coo<Cuda, f32> = Coo::with_capacity(cuda, k, (IN, OUT)).unwrap();
    cuda.copy(&coo.cols, &mut dt.rows, k).unwrap();
    cuda.copy(&coo.rows, &mut dt.cols, k).unwrap();
    cuda.copy(&coo.values, &mut dt.values, k).unwrap();
    dt.len = k;
    let ms = time(cuda, 1, 3, || {
        cuda.coo_dense_t(&dt, &coo.cols, IN, &p, OUT, &mut scratch)?;
        cuda.gemm(&Gemm::nt(OUT, IN, IN).beta(1.0), &scratch, &q, &mut w)
    });
    show("by columns, coo_dense_t (atomics) + GEMM", ms, MergedUpdate::SparseColumns, f32_mode);
    let dense = |cuda: &Cuda, d: &mut CudaBuf<f32>, e: &mut CudaBuf<f32>, w: &mut CudaBuf<f32>| -> Result<()> {
        cuda.coo_densify(coo, d)?;
        cuda.gemm(&Gemm::nt(OUT, IN, IN), d, &q, e)?;
        cuda.gemm(&Gemm::nn(OUT, IN, OUT).beta(1.0), &p, e, w)
    };
    let ms = time(cuda, 2, 5, || dense(cuda, &mut scratch, &mut e, &mut w));
    show("(a) Dense, f32", ms, MergedUpdate::Dense, f32_mode);
    cuda.set_tf32(true);
    let ms = time(cuda, 2, 5, || dense(cuda, &mut scratch, &mut e, &mut w));
    cuda.set_tf32(false);
    show("(a) Dense, TF32", ms, MergedUpdate::Dense, GemmMode::of(Precision::Full, true));
    let (mut ph, mut qh, mut dh) =
        (zeros::<bf16>(cuda, OUT * OUT), zeros::<bf16>(cuda, IN * IN), zeros::<bf16>(cuda, OUT * IN));
    cuda.cast_to_bf16(&p, &mut ph, OUT * OUT).unwrap();
    cuda.cast_to_bf16(&q, &mut qh, IN * IN).unwrap();
    let ms = time(cuda, 2, 5, || {
        cuda.coo_densify_bf16(coo, &mut dh)?;
        cuda.gemm_bf16(&Gemm::nt(OUT, IN, IN), &dh, &qh, &mut e)?;
        cuda.cast_to_bf16(&e, &mut dh, OUT * IN)?;
        cuda.gemm_bf16(&Gemm::nn(OUT, IN, OUT).beta(1.0), &ph, &dh, &mut w)
    });
    show("(a) Dense, bf16", ms, MergedUpdate::Dense, GemmMode::of(Precision::Bf16, false));
    // (b): Q^T is what coo_mm gathers rows of (a random matrix stands in for it here).
    let mut starts = zeros::<u32>(cuda, OUT + 1);
    let ms = time(cuda, 2, 5, || {
        cuda.coo_mm(coo, &mut starts, &q, IN, &mut e)?;
        cuda.gemm(&Gemm::nn(OUT, IN, OUT).beta(1.0), &p, &e, &mut w)
    });
    show("(b) Runs, f32", ms, MergedUpdate::Runs, f32_mode);
}

fn main() {
    let cuda = match Cuda::new(0) {
        Ok(c) => c,
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            return;
        }
    };
    if tiny() {
        println!("SPARSEGRAD_BENCH_TINY=1: rehearsal shapes, not the LLaMA-2 7B ones");
        run::<96, 64, 48, 4, 16, 256>(cuda);
    } else {
        run::<11008, 4096, 2048, 32, 128, 49152>(cuda);
    }
}

fn run<
    const OUT: usize,
    const IN: usize,
    const T: usize,
    const HEADS: usize,
    const HEAD_DIM: usize,
    const VOCAB: usize,
>(
    cuda: Cuda,
) {
    println!(
        "device: {} ({} SMs, compute capability {:?})",
        cuda.device_name(),
        cuda.sm_count(),
        cuda.compute_capability()
    );
    let mut r = SmallRng::seed_from_u64(7);

    // Reference points of this run.
    let copy_len = if tiny() { 1 << 16 } else { 256 << 20 }; // 1 GiB of f32
    let src = zeros::<f32>(&cuda, copy_len);
    let mut dst = zeros::<f32>(&cuda, copy_len);
    let ms = time(&cuda, 2, 10, || cuda.copy(&src, &mut dst, copy_len));
    let copy_gbs = 2.0 * 4.0 * copy_len as f64 / (ms * 1e-3) / 1e9;
    drop((src, dst));
    let (sgemm_tflops, bf16_tflops) = gemm_peak(&cuda, &mut r);
    let gemm_n = if tiny() { 128 } else { 8192 };
    println!("device copy: {copy_gbs:.0} GB/s (read + write); cuBLAS {gemm_n}^3: sgemm {sgemm_tflops:.1} TFLOP/s, bf16 {bf16_tflops:.1} TFLOP/s");
    let b = Bench { cuda, copy_gbs, sgemm_tflops, bf16_tflops };
    let cuda = &b.cuda;

    let big = OUT * IN;
    let bigf = big as f64;
    let x = buf(cuda, &rand_vec(&mut r, big));
    let y0 = rand_vec(&mut r, big);
    let mut y = buf(cuda, &y0);
    let mut z = zeros::<f32>(cuda, big);
    let mut w = zeros::<f32>(cuda, big);
    let mut h = zeros::<bf16>(cuda, big);

    println!("\n-- dense ({OUT} x {IN} = {big} entries unless noted)");
    b.mem("cast_to_bf16", 6.0 * bigf, time(cuda, 3, 20, || cuda.cast_to_bf16(&x, &mut h, big)));
    b.mem("cast_from_bf16", 6.0 * bigf, time(cuda, 3, 20, || cuda.cast_from_bf16(&h, &mut z, big)));
    // The staging passes of a layer's input and output gradient, each with its finiteness check.
    b.mem(
        "cast_to_bf16_checked",
        6.0 * bigf,
        time(cuda, 3, 20, || cuda.cast_to_bf16_checked(&x, &mut h, big, "bench x")),
    );
    b.mem("copy_checked", 8.0 * bigf, time(cuda, 3, 20, || cuda.copy_checked(&x, &mut z, big, "bench x")));
    b.mem("axpy", 12.0 * bigf, time(cuda, 3, 20, || cuda.axpy(1e-3, &x, &mut y, big)));
    let bias = buf(cuda, &rand_vec(&mut r, OUT));
    let gy = T * OUT;
    b.mem(
        &format!("add_bias ({T} x {OUT})"),
        8.0 * gy as f64,
        time(cuda, 3, 20, || cuda.add_bias(&mut y, &bias, T, OUT)),
    );
    let mut db = zeros::<f32>(cuda, OUT);
    b.mem(
        &format!("bias_grad ({T} x {OUT})"),
        4.0 * gy as f64,
        time(cuda, 3, 20, || cuda.bias_grad(&x, T, OUT, &mut db, 0.0)),
    );
    b.mem("count_nonfinite (+ host read)", 4.0 * bigf, time(cuda, 3, 20, || cuda.count_nonfinite(&x, big).map(|_| ())));

    println!("\n-- activations");
    for kind in [GeluKind::Erf, GeluKind::Tanh] {
        b.mem(&format!("gelu {kind:?}"), 8.0 * bigf, time(cuda, 3, 20, || cuda.gelu(&x, &mut z, big, kind)));
        b.mem(
            &format!("gelu_backward {kind:?}"),
            12.0 * bigf,
            time(cuda, 3, 20, || cuda.gelu_backward(&x, &y, &mut z, big, kind)),
        );
    }
    b.mem("swiglu", 12.0 * bigf, time(cuda, 3, 20, || cuda.swiglu(&x, &y, &mut z, big)));
    b.mem("swiglu_backward", 20.0 * bigf, time(cuda, 3, 20, || cuda.swiglu_backward(&x, &y, &x, &mut z, &mut w, big)));
    b.mem(
        "swiglu_backward_checked",
        20.0 * bigf,
        time(cuda, 3, 20, || cuda.swiglu_backward_checked(&x, &y, &x, &mut z, &mut w, big, "bench")),
    );
    // Over the bf16 saves, rounded in place: 2-byte gate and up read and written, dh read.
    let (mut gate_half, mut up_half) = (zeros::<bf16>(cuda, big), zeros::<bf16>(cuda, big));
    b.mem(
        "swiglu_backward_bf16_in_place",
        12.0 * bigf,
        time(cuda, 3, 20, || cuda.swiglu_backward_bf16_in_place(&mut gate_half, &mut up_half, &x, big, "bench")),
    );

    println!("\n-- transformer ops (T = {T}, hidden {IN} = {HEADS} heads x {HEAD_DIM}, vocab {VOCAB})");
    let hid = T * IN;
    let xs = buf(cuda, &rand_vec(&mut r, hid));
    // At least 576 entries: the 576-wide rows below use it too (the tiny shapes are narrower).
    let wn = buf(cuda, &rand_vec(&mut r, IN.max(576)));
    let (mut yn, mut dxn, mut inv) =
        (zeros::<f32>(cuda, hid), zeros::<f32>(cuda, hid), zeros::<f32>(cuda, T.max(hid / 576)));
    b.mem(
        &format!("rmsnorm ({T} x {IN}, 2 reads)"),
        8.0 * hid as f64,
        time(cuda, 3, 20, || cuda.rmsnorm(&xs, &wn, &mut yn, &mut inv, T, IN, 1e-5)),
    );
    b.mem(
        "rmsnorm_backward (2 reads)",
        12.0 * hid as f64,
        time(cuda, 3, 20, || cuda.rmsnorm_backward(&xs, &wn, &inv, &yn, &mut dxn, T, IN)),
    );
    // The residual add, the saved copy of x and the norm in one pass (bf16 output): x and
    // the branch read, x and its copy written, y written in bf16.
    let (mut xr, mut xsave, mut yh) =
        (buf(cuda, &rand_vec(&mut r, hid)), zeros::<f32>(cuda, hid), zeros::<bf16>(cuda, hid));
    b.mem(
        &format!("add_rmsnorm ({T} x {IN}, residual + copy, bf16 out)"),
        18.0 * hid as f64,
        time(cuda, 3, 20, || {
            // 23 timed and warm-up adds of values in [-1, 1): x stays far from overflow.
            cuda.add_rmsnorm(&mut xr, Some(&xs), Some(&mut xsave), &wn, OutBuf::Half(&mut yh), &mut inv, T, IN, 1e-5)
        }),
    );
    let narrow = hid / 576;
    b.mem(
        &format!("rmsnorm ({narrow} x 576, 2 reads)"),
        8.0 * (narrow * 576) as f64,
        time(cuda, 3, 20, || cuda.rmsnorm(&xs, &wn, &mut yn, &mut inv, narrow, 576, 1e-5)),
    );
    b.mem(
        "rmsnorm_backward (576 wide)",
        12.0 * (narrow * 576) as f64,
        time(cuda, 3, 20, || cuda.rmsnorm_backward(&xs, &wn, &inv, &yn, &mut dxn, narrow, 576)),
    );
    let half = HEAD_DIM / 2;
    let angles: Vec<f32> =
        (0..T * half).map(|k| (k / half) as f32 * 10000f32.powf(-2.0 * (k % half) as f32 / HEAD_DIM as f32)).collect();
    let cos = buf(cuda, &angles.iter().map(|a| a.cos()).collect::<Vec<_>>());
    let sin = buf(cuda, &angles.iter().map(|a| a.sin()).collect::<Vec<_>>());
    b.mem(
        "rope (in place)",
        8.0 * hid as f64,
        time(cuda, 3, 20, || cuda.rope(&mut yn, T, HEADS, HEAD_DIM, T, &cos, &sin, false)),
    );
    // One sequence of T tokens: HEADS causal (T, T) score matrices. The op must read the lower
    // triangle and write the whole matrix.
    let n_att = HEADS * T * T;
    let tri = (HEADS * T * (T + 1) / 2) as f64;
    let mut sc = buf(cuda, &rand_vec(&mut r, n_att));
    b.mem(
        &format!("softmax_causal ({HEADS} x {T} x {T}, 3 reads)"),
        4.0 * (tri + n_att as f64),
        time(cuda, 3, 20, || cuda.softmax_causal(&mut sc, HEADS, T, 0.088)),
    );
    let dp = buf(cuda, &rand_vec(&mut r, n_att));
    let mut ds = zeros::<f32>(cuda, n_att);
    b.mem(
        "softmax_causal_backward (2 reads)",
        4.0 * (2.0 * tri + n_att as f64),
        time(cuda, 3, 20, || cuda.softmax_causal_backward(&sc, &dp, &mut ds, HEADS, T, 0.088)),
    );
    drop((sc, dp, ds));
    let n_ce = T * VOCAB;
    let mut logits = buf(cuda, &rand_vec(&mut r, n_ce).iter().map(|v| 8.0 * v).collect::<Vec<_>>());
    let targets = cuda.upload(&(0..T).map(|_| r.random_range(0..VOCAB as u32)).collect::<Vec<_>>()).unwrap();
    let mask = buf(cuda, &vec![1.0; T]);
    let mut losses = zeros::<f32>(cuda, T);
    // In place: after the first call the logits are gradients, which costs the same.
    b.mem(
        &format!("cross_entropy ({T} x {VOCAB}, 3 reads)"),
        8.0 * n_ce as f64,
        time(cuda, 3, 20, || cuda.cross_entropy(&mut logits, &targets, &mask, T, VOCAB, 1.0 / T as f32, &mut losses)),
    );
    drop((logits, xs, yn, dxn));
    attention::<T, HEADS, HEAD_DIM>(&b, &mut r);

    println!("\n-- sparse-by-dense (gt: {T} x {OUT}, 30% of rows and columns zero)");
    let gt_host: Vec<f32> = {
        let zr: Vec<bool> = (0..T).map(|_| r.random_bool(0.3)).collect();
        let zc: Vec<bool> = (0..OUT).map(|_| r.random_bool(0.3)).collect();
        (0..T * OUT).map(|i| if zr[i / OUT] || zc[i % OUT] { 0.0 } else { r.random_range(-1.0f32..1.0) }).collect()
    };
    let gt = buf(cuda, &gt_host);
    let (mut ri, mut ci) = (zeros::<u32>(cuda, T), zeros::<u32>(cuda, OUT));
    let mut block = cuda.nonzero_rows_cols(&gt, T, OUT, 0.0, &mut ri, &mut ci).unwrap();
    b.mem(
        "nonzero_rows_cols (2 reads, + host read)",
        8.0 * gy as f64,
        time(cuda, 3, 20, || {
            block = cuda.nonzero_rows_cols(&gt, T, OUT, 0.0, &mut ri, &mut ci)?;
            Ok(())
        }),
    );
    let (nr, nc) = (block.n_rows, block.n_cols);
    let mut gblock = zeros::<f32>(cuda, nr * nc);
    b.mem(
        &format!("gather_block ({nr} x {nc})"),
        8.0 * (nr * nc) as f64,
        time(cuda, 3, 20, || cuda.gather_block(&gt, T, OUT, &ri, nr, &ci, nc, 0.0, &mut gblock)),
    );
    let xt = buf(cuda, &rand_vec(&mut r, T * IN));
    let mut xrows = zeros::<f32>(cuda, nr * IN);
    b.mem(
        &format!("gather_rows f32 ({nr} of {T} rows x {IN})"),
        8.0 * (nr * IN) as f64,
        time(cuda, 3, 20, || cuda.gather_rows(&xt, T, IN, &ri, nr, &mut xrows)),
    );
    let mut xth = zeros::<bf16>(cuda, T * IN);
    cuda.cast_to_bf16(&xt, &mut xth, T * IN).unwrap();
    let mut xrows_h = zeros::<bf16>(cuda, nr * IN);
    b.mem(
        &format!("gather_rows bf16 ({nr} of {T} rows x {IN})"),
        4.0 * (nr * IN) as f64,
        time(cuda, 3, 20, || cuda.gather_rows(&xth, T, IN, &ri, nr, &mut xrows_h)),
    );

    println!("\n-- top-k (k = 1%)");
    let mut ws = cuda.topk_workspace(big).unwrap();
    let small = if tiny() { [(32, 32), (8, 8)] } else { [(1024, 1024), (64, 64)] };
    for &(rows, cols) in &[(OUT, IN), small[0], small[1]] {
        let n = rows * cols;
        let m = if n == big { buf(cuda, &y0) } else { buf(cuda, &rand_vec(&mut r, n)) };
        let k = (n / 100).max(1);
        let mut out: Coo<Cuda, f32> = Coo::with_capacity(cuda, k, (rows, cols)).unwrap();
        let maps = IndexMaps { row_map: None, col_map: None, full_shape: (rows, cols) };
        let ms = time(cuda, 3, 20, || cuda.topk_coo(&m, rows, cols, k, &maps, &mut ws, &mut out));
        b.mem(&format!("topk_coo {rows} x {cols}, k = {k} (5 reads)"), 5.0 * 4.0 * n as f64, ms);
    }

    println!("\n-- COO (k = 1% of {OUT} x {IN})");
    let k = big / 100;
    let mut lin: Vec<u64> = (0..k).map(|_| r.random_range(0..big as u64)).collect();
    lin.sort_unstable();
    lin.dedup();
    let k = lin.len();
    let host = HostCoo {
        rows: lin.iter().map(|&l| (l / IN as u64) as u32).collect(),
        cols: lin.iter().map(|&l| (l % IN as u64) as u32).collect(),
        values: rand_vec(&mut r, k),
        shape: (OUT, IN),
    };
    let mut coo: Coo<Cuda, f32> = Coo::with_capacity(cuda, k, (OUT, IN)).unwrap();
    coo.set_from_host(cuda, &host).unwrap();
    b.mem("coo_scatter_add", 20.0 * k as f64, time(cuda, 3, 20, || cuda.coo_scatter_add(&coo, 0.5, &mut y)));
    let (mut ur, mut slot) = (zeros::<u32>(cuda, OUT), zeros::<u32>(cuda, k));
    let mut n_slots = 0;
    b.mem(
        "coo_compact_rows (+ host read)",
        12.0 * k as f64,
        time(cuda, 3, 20, || {
            n_slots = cuda.coo_compact_rows(&coo, &mut ur, &mut slot)?;
            Ok(())
        }),
    );
    let q = buf(cuda, &rand_vec(&mut r, IN * IN));
    let mut dq = zeros::<f32>(cuda, IN * n_slots);
    let ms = time(cuda, 2, 5, || cuda.coo_dense_t(&coo, &slot, n_slots, &q, IN, &mut dq));
    b.flops(&format!("coo_dense_t (Q {IN} x {IN}, {n_slots} slots)"), 2.0 * IN as f64 * k as f64, ms, b.sgemm_tflops);

    merged_update_by_columns::<OUT, IN>(&b, &coo, &host, &mut r);

    println!("\n-- optimizers");
    let hp = AdamParams::default();
    let mut clock = zeros::<u64>(cuda, 2);
    let (mut m1, mut v1, mut delta) = (zeros::<f32>(cuda, big), zeros::<f32>(cuda, big), zeros::<f32>(cuda, k));
    b.mem(
        &format!("sparse_adam ({k} entries)"),
        40.0 * k as f64,
        time(cuda, 3, 20, || {
            cuda.sparse_adam(&coo, &mut m1, &mut v1, &mut clock, &hp, Some(&mut z), None, Some(&mut delta))
        }),
    );
    let mut dense_half = zeros::<bf16>(cuda, big);
    b.mem(
        &format!("sparse_adam_densify ({k} entries, bf16 {OUT} x {IN} change)"),
        36.0 * k as f64 + 2.0 * bigf,
        time(cuda, 3, 20, || {
            cuda.sparse_adam_densify(&coo, &mut m1, &mut v1, &mut clock, &hp, OutBuf::Half(&mut dense_half))
        }),
    );
    b.mem(
        "adamw",
        28.0 * bigf,
        time(cuda, 3, 20, || cuda.adamw(&mut w, None, &x, &mut m1, &mut v1, big, &mut clock, &hp)),
    );
    // The bf16 training path: the optimizer also writes the weight's bf16 compute copy.
    let mut w_half = zeros::<bf16>(cuda, big);
    b.mem(
        "adamw + bf16 copy",
        30.0 * bigf,
        time(cuda, 3, 20, || cuda.adamw(&mut w, Some(&mut w_half), &x, &mut m1, &mut v1, big, &mut clock, &hp)),
    );

    println!("\n-- GEMMs of the layer (T = {T}, out = {OUT}, in = {IN})");
    let wgt = buf(cuda, &rand_vec(&mut r, OUT * IN));
    let g = buf(cuda, &rand_vec(&mut r, T * OUT));
    let mut yo = zeros::<f32>(cuda, T * OUT);
    let mut dx = zeros::<f32>(cuda, T * IN);
    let mut dw = zeros::<f32>(cuda, OUT * IN);
    let f = 2.0 * (T * OUT * IN) as f64;
    b.flops(
        "sgemm y = x W^T",
        f,
        time(cuda, 2, 10, || cuda.gemm(&Gemm::nt(T, OUT, IN), &xt, &wgt, &mut yo)),
        b.sgemm_tflops,
    );
    b.flops(
        "sgemm dx = g W",
        f,
        time(cuda, 2, 10, || cuda.gemm(&Gemm::nn(T, IN, OUT), &g, &wgt, &mut dx)),
        b.sgemm_tflops,
    );
    b.flops(
        "sgemm dW = g^T x",
        f,
        time(cuda, 2, 10, || cuda.gemm(&Gemm::tn(OUT, IN, T), &g, &xt, &mut dw)),
        b.sgemm_tflops,
    );
    let mut wh = zeros::<bf16>(cuda, OUT * IN);
    cuda.cast_to_bf16(&wgt, &mut wh, OUT * IN).unwrap();
    b.flops(
        "bf16 gemm y = x W^T (f32 out)",
        f,
        time(cuda, 2, 10, || cuda.gemm_bf16(&Gemm::nt(T, OUT, IN), &xth, &wh, &mut yo)),
        b.bf16_tflops,
    );
    cuda.synchronize().expect("final synchronize");
}

/// The fused attention (cuda/attention.cu, cuda/attention_wmma.cu): forward and backward at
/// LLaMA-2 7B's and BERT-base's head structure, both precisions.
fn attention<const T: usize, const HEADS: usize, const HEAD_DIM: usize>(b: &Bench, r: &mut SmallRng) {
    let cuda = &b.cuda;
    let shapes = [
        (
            "LLaMA-2 7B, causal",
            AttentionShape { batch: 1, seq: T, heads: HEADS, kv_heads: HEADS, head_dim: HEAD_DIM },
            true,
        ),
        (
            "BERT-base, padding",
            if tiny() {
                AttentionShape { batch: 2, seq: 16, heads: 2, kv_heads: 2, head_dim: 16 }
            } else {
                AttentionShape { batch: 32, seq: 128, heads: 12, kv_heads: 12, head_dim: 64 }
            },
            false,
        ),
    ];
    for (label, s, causal) in shapes {
        println!("\n-- fused attention, {label}: {s:?}");
        let (nq, nkv) = (s.batch * s.seq * s.q_dim(), s.batch * s.seq * s.kv_dim());
        let (q, k, v) = (buf(cuda, &rand_vec(r, nq)), buf(cuda, &rand_vec(r, nkv)), buf(cuda, &rand_vec(r, nkv)));
        let dout = buf(cuda, &rand_vec(r, nq));
        // Padding: lengths from a quarter of the sequence to all of it.
        let lens: Vec<u32> = (0..s.batch).map(|i| (s.seq / 4 + i * 3 * s.seq / 4 / s.batch.max(1)) as u32).collect();
        let lengths = cuda.upload(&lens).expect("upload");
        let mask = if causal { AttentionMask::Causal } else { AttentionMask::Padding(&lengths) };
        let (mut out, mut stats) = (zeros::<f32>(cuda, nq), zeros::<f32>(cuda, s.stats_len()));
        let (mut dq, mut dk, mut dv) = (zeros::<f32>(cuda, nq), zeros::<f32>(cuda, nkv), zeros::<f32>(cuda, nkv));
        // Products of a non-fused attention, per (query, live key) pair.
        let pairs: f64 = if causal {
            (s.batch * s.heads) as f64 * (s.seq * (s.seq + 1) / 2) as f64
        } else {
            s.heads as f64 * lens.iter().map(|&n| (s.seq * n as usize) as f64).sum::<f64>()
        };
        let per_pair = 2.0 * s.head_dim as f64;
        for (precision, peak) in [(Precision::Full, b.sgemm_tflops), (Precision::Bf16, b.bf16_tflops)] {
            let fwd =
                time(cuda, 2, 10, || cuda.attention_forward(&s, mask, precision, &q, &k, &v, &mut out, &mut stats));
            b.flops(&format!("attention_forward {precision:?} (1 launch)"), 2.0 * per_pair * pairs, fwd, peak);
            let bwd = time(cuda, 2, 10, || {
                let grads = AttentionGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv, dv_half: None };
                cuda.attention_backward(&s, mask, precision, &q, &k, &v, &out, &stats, &dout, grads)
            });
            b.flops(&format!("attention_backward {precision:?} (3 launches)"), 4.0 * per_pair * pairs, bwd, peak);
        }
    }
}
