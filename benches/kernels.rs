//! Criterion microbenchmarks of the backend kernels a SparseGrad step is built from: top-k
//! select, nonzero flags + compaction, gathers, COO scatter / compaction / sparse-times-dense,
//! SparseAdam and AdamW, and the transformer ops, on the CPU and (with the `cuda` feature
//! and a device) on CUDA, where each sample is timed by CUDA events through `iter_custom`.
//!
//! Every benchmark declares its traffic or flops as a criterion `Throughput` (bytes each op
//! must at least read and write, or its flops), and after it a line prints the achieved
//! rate as a share of this machine's copy bandwidth (a large `copy`, read + write counted)
//! or sgemm rate (2048^3 on the CPU, 8192^3 on CUDA), both measured at the start of the run.
//!
//! Run: `OPENBLAS_CORETYPE=Haswell cargo bench --bench kernels` (filter as usual:
//! `cargo bench --bench kernels -- topk`). Shapes: BERT-base's up-projection on the CPU
//! (out 3072, in 768, T 512), LLaMA-2 7B's MLP on CUDA (11008, 4096, T 2048).

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sparsegrad::backend::{Coo, Gemm, IndexMaps};
use sparsegrad::{AdamParams, Backend, Cpu, GeluKind, HostCoo, Result};
use std::cell::Cell;
use std::time::{Duration, Instant};

/// Wall time of `iters` calls of `f` on a backend, measured the way that backend needs.
trait Timed: Backend {
    fn run_iters(&self, iters: u64, f: &mut dyn FnMut() -> Result<()>) -> Duration;
}

impl Timed for Cpu {
    fn run_iters(&self, iters: u64, f: &mut dyn FnMut() -> Result<()>) -> Duration {
        let t = Instant::now();
        for _ in 0..iters {
            f().expect("benchmarked call");
        }
        t.elapsed()
    }
}

#[cfg(feature = "cuda")]
impl Timed for sparsegrad::Cuda {
    fn run_iters(&self, iters: u64, f: &mut dyn FnMut() -> Result<()>) -> Duration {
        let ((), ms) = self
            .time_ms(|| {
                for _ in 0..iters {
                    f()?;
                }
                Ok(())
            })
            .expect("timed calls");
        Duration::from_secs_f64(ms as f64 * 1e-3)
    }
}

struct Shapes {
    out: usize,
    inp: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    vocab: usize,
}

/// The machine's reference rates, measured once per backend.
struct Reference {
    copy_bytes_per_s: f64,
    sgemm_flops: f64,
}

enum Work {
    Bytes(f64),
    Flops(f64),
}

struct Suite<'a, B: Timed> {
    be: &'a B,
    reference: Reference,
    label: &'static str,
}

impl<B: Timed> Suite<'_, B> {
    /// One criterion benchmark of `f`, then its rate against the reference.
    fn bench(
        &self,
        group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
        name: &str,
        work: Work,
        mut f: impl FnMut() -> Result<()>,
    ) {
        let (total, calls) = (Cell::new(Duration::ZERO), Cell::new(0u64));
        group.throughput(match work {
            Work::Bytes(b) => Throughput::Bytes(b as u64),
            Work::Flops(f) => Throughput::Elements(f as u64),
        });
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let d = self.be.run_iters(iters, &mut f);
                total.set(total.get() + d);
                calls.set(calls.get() + iters);
                d
            })
        });
        if calls.get() == 0 {
            return; // filtered out on the command line: nothing was timed
        }
        let per_call = total.get().as_secs_f64() / calls.get() as f64;
        match work {
            Work::Bytes(b) => {
                let rate = b / per_call;
                println!(
                    "    {} {name}: {:.2} GB/s = {:.1}% of copy bandwidth ({:.2} GB/s)",
                    self.label,
                    rate / 1e9,
                    100.0 * rate / self.reference.copy_bytes_per_s,
                    self.reference.copy_bytes_per_s / 1e9
                );
            }
            Work::Flops(f) => {
                let rate = f / per_call;
                println!(
                    "    {} {name}: {:.1} GFLOP/s = {:.1}% of sgemm ({:.1} GFLOP/s); criterion's elem/s are FLOP/s",
                    self.label,
                    rate / 1e9,
                    100.0 * rate / self.reference.sgemm_flops,
                    self.reference.sgemm_flops / 1e9
                );
            }
        }
    }
}

fn rand_vec(r: &mut SmallRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
}

fn measure_reference<B: Timed>(be: &B, copy_len: usize, gemm_n: usize) -> Reference {
    let src = be.upload(&vec![1.0f32; copy_len]).expect("upload");
    let mut dst = be.alloc::<f32>(copy_len).expect("alloc");
    let mut copy = || be.copy(&src, &mut dst, copy_len);
    be.run_iters(1, &mut copy);
    let d = be.run_iters(5, &mut copy);
    let copy_bytes_per_s = 5.0 * 8.0 * copy_len as f64 / d.as_secs_f64();
    let mut r = SmallRng::seed_from_u64(1);
    let a = be.upload(&rand_vec(&mut r, gemm_n * gemm_n)).expect("upload");
    let mut c = be.alloc::<f32>(gemm_n * gemm_n).expect("alloc");
    let spec = Gemm::nn(gemm_n, gemm_n, gemm_n);
    let mut mm = || be.gemm(&spec, &a, &a, &mut c);
    be.run_iters(1, &mut mm);
    let d = be.run_iters(3, &mut mm);
    let sgemm_flops = 3.0 * 2.0 * (gemm_n as f64).powi(3) / d.as_secs_f64();
    Reference { copy_bytes_per_s, sgemm_flops }
}

fn run_suite<B: Timed>(c: &mut Criterion, be: &B, label: &'static str, s: &Shapes, reference: Reference) {
    println!(
        "{label}: copy {:.2} GB/s (read + write), sgemm {:.1} GFLOP/s; OPENBLAS_CORETYPE={}",
        reference.copy_bytes_per_s / 1e9,
        reference.sgemm_flops / 1e9,
        std::env::var("OPENBLAS_CORETYPE").unwrap_or_else(|_| "(unset)".into())
    );
    let suite = Suite { be, reference, label };
    let mut r = SmallRng::seed_from_u64(7);
    let (out, inp, t) = (s.out, s.inp, s.tokens);
    let big = out * inp;
    let bigf = big as f64;
    let up = |v: &[f32]| be.upload(v).expect("upload");
    let zeros = |n: usize| be.alloc::<f32>(n).expect("alloc");

    // ---- top-k select ----
    let mut g = c.benchmark_group(format!("{label}/topk"));
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    let mut ws = be.topk_workspace(big).expect("workspace");
    let m = up(&rand_vec(&mut r, big));
    for &(rows, cols) in &[(out, inp), (256, 256)] {
        let n = rows * cols;
        let k = (n / 100).max(1);
        let mut coo: Coo<B, f32> = Coo::with_capacity(be, k, (rows, cols)).expect("coo");
        let maps = IndexMaps { row_map: None, col_map: None, full_shape: (rows, cols) };
        suite.bench(&mut g, &format!("topk_coo {rows}x{cols} k=1% (5 reads)"), Work::Bytes(20.0 * n as f64), || {
            be.topk_coo(&m, rows, cols, k, &maps, &mut ws, &mut coo)
        });
    }
    g.finish();

    // ---- sparse-by-dense: nonzero flags + compaction, gathers ----
    let mut g = c.benchmark_group(format!("{label}/sparse_by_dense"));
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    let gt_host: Vec<f32> = {
        let zr: Vec<bool> = (0..t).map(|_| r.random_bool(0.3)).collect();
        let zc: Vec<bool> = (0..out).map(|_| r.random_bool(0.3)).collect();
        (0..t * out).map(|i| if zr[i / out] || zc[i % out] { 0.0 } else { r.random_range(-1.0f32..1.0) }).collect()
    };
    let gt = up(&gt_host);
    let (mut ri, mut ci) = (be.alloc::<u32>(t).expect("alloc"), be.alloc::<u32>(out).expect("alloc"));
    let block = be.nonzero_rows_cols(&gt, t, out, 0.0, &mut ri, &mut ci).expect("nonzero");
    suite.bench(&mut g, &format!("nonzero_rows_cols {t}x{out}"), Work::Bytes(4.0 * (t * out) as f64), || {
        be.nonzero_rows_cols(&gt, t, out, 0.0, &mut ri, &mut ci).map(|_| ())
    });
    let (nr, nc) = (block.n_rows, block.n_cols);
    let mut gblock = zeros(nr * nc);
    suite.bench(&mut g, &format!("gather_block {nr}x{nc}"), Work::Bytes(8.0 * (nr * nc) as f64), || {
        be.gather_block(&gt, t, out, &ri, nr, &ci, nc, 0.0, &mut gblock)
    });
    let xt = up(&rand_vec(&mut r, t * inp));
    let mut xrows = zeros(nr * inp);
    suite.bench(&mut g, &format!("gather_rows {nr} of {t} rows x {inp}"), Work::Bytes(8.0 * (nr * inp) as f64), || {
        be.gather_rows(&xt, t, inp, &ri, nr, &mut xrows)
    });
    g.finish();

    // ---- COO: scatter, row compaction, sparse-times-dense ----
    let mut g = c.benchmark_group(format!("{label}/coo"));
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    let mut lin: Vec<u64> = (0..big / 100).map(|_| r.random_range(0..big as u64)).collect();
    lin.sort_unstable();
    lin.dedup();
    let k = lin.len();
    let host = HostCoo {
        rows: lin.iter().map(|&l| (l / inp as u64) as u32).collect(),
        cols: lin.iter().map(|&l| (l % inp as u64) as u32).collect(),
        values: rand_vec(&mut r, k),
        shape: (out, inp),
    };
    let mut coo: Coo<B, f32> = Coo::with_capacity(be, k, (out, inp)).expect("coo");
    coo.set_from_host(be, &host).expect("coo upload");
    let mut dense = up(&rand_vec(&mut r, big));
    // index pair + value read, the dense entry read and written: 20 bytes per entry.
    suite.bench(&mut g, &format!("coo_scatter_add k={k}"), Work::Bytes(20.0 * k as f64), || {
        be.coo_scatter_add(&coo, 0.5, &mut dense)
    });
    let (mut ur, mut slot) = (be.alloc::<u32>(out).expect("alloc"), be.alloc::<u32>(k).expect("alloc"));
    let n_slots = be.coo_compact_rows(&coo, &mut ur, &mut slot).expect("compact");
    suite.bench(&mut g, &format!("coo_compact_rows k={k}"), Work::Bytes(12.0 * k as f64), || {
        be.coo_compact_rows(&coo, &mut ur, &mut slot).map(|_| ())
    });
    let q = up(&rand_vec(&mut r, inp * inp));
    let mut dq = zeros(inp * n_slots);
    suite.bench(
        &mut g,
        &format!("coo_dense_t Q {inp}x{inp}, {n_slots} slots"),
        Work::Flops(2.0 * inp as f64 * k as f64),
        || be.coo_dense_t(&coo, &slot, n_slots, &q, inp, &mut dq),
    );
    g.finish();

    // ---- optimizers ----
    let mut g = c.benchmark_group(format!("{label}/optim"));
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    let hp = AdamParams::default();
    let mut clock = be.alloc::<u64>(2).unwrap();
    let (mut m1, mut v1, mut delta, mut param) = (zeros(big), zeros(big), zeros(k), up(&rand_vec(&mut r, big)));
    // per entry: index + value (12 B), m, v and the parameter read and written (24 B), delta written (4 B).
    suite.bench(&mut g, &format!("sparse_adam k={k}"), Work::Bytes(40.0 * k as f64), || {
        be.sparse_adam(&coo, &mut m1, &mut v1, &mut clock, &hp, Some(&mut param), None, Some(&mut delta))
    });
    let grad = up(&rand_vec(&mut r, big));
    suite.bench(&mut g, &format!("adamw {big}"), Work::Bytes(28.0 * bigf), || {
        be.adamw(&mut param, None, &grad, &mut m1, &mut v1, big, &mut clock, &hp)
    });
    g.finish();

    // ---- transformer ops and activations ----
    let mut g = c.benchmark_group(format!("{label}/transformer"));
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    let hidden = s.heads * s.head_dim;
    let hid = t * hidden;
    let xs = up(&rand_vec(&mut r, hid));
    let wn = up(&rand_vec(&mut r, hidden));
    let (mut yn, mut dxn, mut inv) = (zeros(hid), zeros(hid), zeros(t));
    suite.bench(&mut g, &format!("rmsnorm {t}x{hidden} (2 reads)"), Work::Bytes(12.0 * hid as f64), || {
        be.rmsnorm(&xs, &wn, &mut yn, &mut inv, t, hidden, 1e-5)
    });
    suite.bench(&mut g, &format!("rmsnorm_backward {t}x{hidden}"), Work::Bytes(12.0 * hid as f64), || {
        be.rmsnorm_backward(&xs, &wn, &inv, &yn, &mut dxn, t, hidden)
    });
    let half = s.head_dim / 2;
    let angles: Vec<f32> = (0..t * half)
        .map(|k| (k / half) as f32 * 10000f32.powf(-2.0 * (k % half) as f32 / s.head_dim as f32))
        .collect();
    let cos = up(&angles.iter().map(|a| a.cos()).collect::<Vec<_>>());
    let sin = up(&angles.iter().map(|a| a.sin()).collect::<Vec<_>>());
    suite.bench(
        &mut g,
        &format!("rope {t} tokens x {} heads (in place)", s.heads),
        Work::Bytes(8.0 * hid as f64),
        || be.rope(&mut yn, t, s.heads, s.head_dim, t, &cos, &sin, false),
    );
    let seq = t.min(512);
    let n_att = s.heads * seq * seq;
    let tri = (s.heads * seq * (seq + 1) / 2) as f64;
    let mut sc = up(&rand_vec(&mut r, n_att));
    suite.bench(
        &mut g,
        &format!("softmax_causal {}x{seq}x{seq}", s.heads),
        Work::Bytes(4.0 * (tri + n_att as f64)),
        || be.softmax_causal(&mut sc, s.heads, seq, 0.088),
    );
    let dp = up(&rand_vec(&mut r, n_att));
    let mut ds = zeros(n_att);
    suite.bench(&mut g, "softmax_causal_backward", Work::Bytes(4.0 * (2.0 * tri + n_att as f64)), || {
        be.softmax_causal_backward(&sc, &dp, &mut ds, s.heads, seq, 0.088)
    });
    let rows = t.min(256);
    let n_ce = rows * s.vocab;
    let mut logits = up(&rand_vec(&mut r, n_ce));
    let targets = be.upload(&(0..rows).map(|_| r.random_range(0..s.vocab as u32)).collect::<Vec<_>>()).expect("upload");
    let mask = up(&vec![1.0; rows]);
    let mut losses = zeros(rows);
    suite.bench(&mut g, &format!("cross_entropy {rows}x{}", s.vocab), Work::Bytes(8.0 * n_ce as f64), || {
        be.cross_entropy(&mut logits, &targets, &mask, rows, s.vocab, 1.0 / rows as f32, &mut losses)
    });
    let act = t * out;
    let (a1, a2) = (up(&rand_vec(&mut r, act)), up(&rand_vec(&mut r, act)));
    let (mut h1, mut h2) = (zeros(act), zeros(act));
    suite.bench(&mut g, &format!("swiglu {act}"), Work::Bytes(12.0 * act as f64), || be.swiglu(&a1, &a2, &mut h1, act));
    suite.bench(&mut g, &format!("swiglu_backward {act}"), Work::Bytes(20.0 * act as f64), || {
        be.swiglu_backward(&a1, &a2, &a1, &mut h1, &mut h2, act)
    });
    suite.bench(&mut g, &format!("gelu erf {act}"), Work::Bytes(8.0 * act as f64), || {
        be.gelu(&a1, &mut h1, act, GeluKind::Erf)
    });
    g.finish();

    // ---- the layer's GEMMs ----
    let mut g = c.benchmark_group(format!("{label}/gemm"));
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    let w = up(&rand_vec(&mut r, big));
    let gy = up(&rand_vec(&mut r, t * out));
    let (mut y, mut dx, mut dw) = (zeros(t * out), zeros(t * inp), zeros(big));
    let f = 2.0 * (t * out * inp) as f64;
    suite.bench(&mut g, "sgemm y = x W^T", Work::Flops(f), || be.gemm(&Gemm::nt(t, out, inp), &xt, &w, &mut y));
    suite.bench(&mut g, "sgemm dx = g W", Work::Flops(f), || be.gemm(&Gemm::nn(t, inp, out), &gy, &w, &mut dx));
    suite.bench(&mut g, "sgemm dW = g^T x", Work::Flops(f), || be.gemm(&Gemm::tn(out, inp, t), &gy, &xt, &mut dw));
    // Would one GEMM for a SwiGLU block's gate and up projections (stacked weights) beat
    // two? SmolLM2-135M's shapes at the example's 8 x 32 tokens; the same flops either way.
    let (st, sh, sf) = (256usize, 576usize, 1536usize);
    let sx = up(&rand_vec(&mut r, st * sh));
    let (wg, wu, wgu) =
        (up(&rand_vec(&mut r, sf * sh)), up(&rand_vec(&mut r, sf * sh)), up(&rand_vec(&mut r, 2 * sf * sh)));
    let (mut yg, mut yu, mut ygu) = (zeros(st * sf), zeros(st * sf), zeros(2 * st * sf));
    let f2 = 2.0 * 2.0 * (st * sf * sh) as f64;
    suite.bench(&mut g, "sgemm gate, up as two GEMMs (256x576 -> 2 x 1536)", Work::Flops(f2), || {
        be.gemm(&Gemm::nt(st, sf, sh), &sx, &wg, &mut yg)?;
        be.gemm(&Gemm::nt(st, sf, sh), &sx, &wu, &mut yu)
    });
    suite.bench(&mut g, "sgemm gate+up as one GEMM (256x576 -> 3072)", Work::Flops(f2), || {
        be.gemm(&Gemm::nt(st, 2 * sf, sh), &sx, &wgu, &mut ygu)
    });
    g.finish();
}

fn cpu_benches(c: &mut Criterion) {
    let cpu = Cpu::new();
    let reference = measure_reference(&cpu, 32 << 20, 2048);
    let shapes = Shapes { out: 3072, inp: 768, tokens: 512, heads: 12, head_dim: 64, vocab: 49152 };
    run_suite(c, &cpu, "cpu", &shapes, reference);
}

#[cfg(feature = "cuda")]
fn cuda_benches(c: &mut Criterion) {
    let cuda = match sparsegrad::Cuda::new(0) {
        Ok(d) => d,
        Err(e) => {
            println!("cuda: skipped, no CUDA device ({e})");
            return;
        }
    };
    let reference = measure_reference(&cuda, 256 << 20, 8192);
    let shapes = Shapes { out: 11008, inp: 4096, tokens: 2048, heads: 32, head_dim: 128, vocab: 49152 };
    run_suite(c, &cuda, "cuda", &shapes, reference);
}

#[cfg(not(feature = "cuda"))]
fn cuda_benches(_: &mut Criterion) {
    println!("cuda: skipped, built without the `cuda` feature");
}

criterion_group!(benches, cpu_benches, cuda_benches);
criterion_main!(benches);
