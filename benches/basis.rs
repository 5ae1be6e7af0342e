//! Benchmark: the basis of one layer group from N gradients of 768 x 3072 (BERT-base
//! `up_proj` shape), computed two ways on the same seeded low-rank + noise gradients:
//!
//! - streaming: `GramAccumulator::add` per gradient, then `basis` (two `dsyevd`);
//! - direct: `direct_svd_basis`, i.e. `sgesdd` of both unfoldings of the stacked tensor,
//!   as the official code does.
//!
//! Prints wall and CPU times, the bytes of the buffers each method holds (counted from buffer
//! sizes and LAPACK's workspace sizes, see `main`), the process peak RSS after each phase,
//! and how far the two results are apart.
//!
//! Run: `OPENBLAS_CORETYPE=Haswell cargo bench --bench basis` (SkylakeX where the CPU has
//! avx512f). Environment: `SPARSEGRAD_BENCH_N` (gradients, default 360),
//! `SPARSEGRAD_BENCH_SVD_N` (gradients for the direct side, default N; smaller values
//! time the SVD on the first SVD_N gradients only), `SPARSEGRAD_BENCH_SKIP_SVD=1`.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use sparsegrad::basis::{direct_svd_basis, direct_svd_bytes, eigensolve_bytes, Basis, GramAccumulator};
use std::time::Instant;

const OUT: usize = 768;
const INP: usize = 3072;
const RANK: usize = 32;
const NOISE: f32 = 0.05;

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn mb(bytes: usize) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// `G_n = U diag(1/(1+k)) A_n V^T + NOISE E_n`, U, V, A_n, E_n uniform in [-1, 1].
fn gradients(n: usize) -> Vec<f32> {
    let mut rng = SmallRng::seed_from_u64(2024);
    let mut u: Vec<f32> = (0..OUT * RANK).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let v: Vec<f32> = (0..INP * RANK).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    for (i, x) in u.iter_mut().enumerate() {
        *x /= 1.0 + (i % RANK) as f32;
    }
    let per = OUT * INP;
    let mut grads = vec![0.0f32; n * per];
    grads.par_chunks_mut(per).enumerate().for_each(|(k, g)| {
        let mut rng = SmallRng::seed_from_u64(7 + k as u64);
        let a: Vec<f32> = (0..RANK * RANK).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let mut ua = vec![0.0f32; OUT * RANK];
        let (o, i, r) = (OUT as i32, INP as i32, RANK as i32);
        // SAFETY: u (OUT, RANK), a (RANK, RANK), ua (OUT, RANK), v (INP, RANK), g (OUT, INP),
        // all row-major with the leading dimensions given.
        unsafe {
            cblas::sgemm(
                cblas::Layout::RowMajor,
                cblas::Transpose::None,
                cblas::Transpose::None,
                o,
                r,
                r,
                1.0,
                &u,
                r,
                &a,
                r,
                0.0,
                &mut ua,
                r,
            );
            cblas::sgemm(
                cblas::Layout::RowMajor,
                cblas::Transpose::None,
                cblas::Transpose::Ordinary,
                o,
                i,
                r,
                1.0,
                &ua,
                r,
                &v,
                r,
                0.0,
                g,
                i,
            );
        }
        g.iter_mut().for_each(|x| *x += NOISE * rng.random_range(-1.0f32..1.0));
    });
    grads
}

/// CPU seconds (user + system, all threads) this process has used: under contention from
/// other processes it is a steadier measure than wall time.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest.split_whitespace().skip(11).take(2).filter_map(|v| v.parse().ok()).collect();
    // Linux reports clock ticks, 100 per second on every common configuration.
    f.iter().sum::<f64>() / 100.0
}

fn peak_rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM"))
                .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_else(|| "n/a".into())
}

fn syevd_bytes(n: usize) -> usize {
    eigensolve_bytes(n).expect("workspace query")
}

fn gesdd_bytes(m: usize, cols: usize) -> usize {
    direct_svd_bytes(m, cols).expect("workspace query")
}

fn basis_bytes(b: &Basis) -> usize {
    (b.p().len() + b.q().len() + b.sigma_out().len() + b.sigma_in().len()) * 4
}

fn main() {
    let n = env_usize("SPARSEGRAD_BENCH_N", 360).max(1);
    let svd_n = env_usize("SPARSEGRAD_BENCH_SVD_N", n).clamp(1, n);
    let skip_svd = std::env::var("SPARSEGRAD_BENCH_SKIP_SVD").is_ok_and(|v| v == "1");
    let per = OUT * INP;
    println!("basis bench: {n} gradients of {OUT} x {INP}, rank {RANK} + noise {NOISE}");
    println!("OPENBLAS_CORETYPE = {}", std::env::var("OPENBLAS_CORETYPE").unwrap_or_else(|_| "(unset)".into()));
    let t = Instant::now();
    let grads = gradients(n);
    println!(
        "generated {} of gradients in {:.1} s (peak RSS {})",
        mb(grads.len() * 4),
        t.elapsed().as_secs_f64(),
        peak_rss()
    );

    // Streaming: one gradient at a time, as in training.
    let (t, c0) = (Instant::now(), cpu_seconds());
    let mut acc = GramAccumulator::new(OUT, INP);
    for g in grads.chunks_exact(per) {
        acc.add(g).expect("add");
    }
    let t_acc = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let gram = acc.basis("bench").expect("basis");
    let t_eig = t.elapsed().as_secs_f64();
    let cpu_gram = cpu_seconds() - c0;
    let eig_peak = syevd_bytes(OUT).max(syevd_bytes(INP));
    let gram_mem = acc.memory_bytes() + eig_peak + basis_bytes(&gram);
    println!("\n## streaming Gram + eigensolve");
    println!("accumulate ({n} x add): {t_acc:.2} s ({:.1} ms/gradient)", 1e3 * t_acc / n as f64);
    println!("eigensolve (dsyevd {OUT} + {INP}): {t_eig:.2} s");
    println!("total: {:.2} s wall, {cpu_gram:.1} s CPU", t_acc + t_eig);
    println!(
        "memory: {} = accumulator {} (f64 Grams + f32 scratch) + largest dsyevd {} (f64 matrix + workspace) \
         + output basis {}; independent of N, plus the one {} gradient being added",
        mb(gram_mem),
        mb(acc.memory_bytes()),
        mb(eig_peak),
        mb(basis_bytes(&gram)),
        mb(per * 4)
    );
    println!(
        "process peak RSS so far: {} (includes the stacked tensor the bench keeps for the direct side)",
        peak_rss()
    );
    drop(acc);

    if skip_svd {
        return;
    }
    let (t, c0) = (Instant::now(), cpu_seconds());
    let svd = direct_svd_basis(&grads[..svd_n * per], svd_n, OUT, INP, "bench").expect("direct svd");
    let t_svd = t.elapsed().as_secs_f64();
    let cpu_svd = cpu_seconds() - c0;
    let tensor = svd_n * per * 4;
    let ws = gesdd_bytes(OUT, INP * svd_n).max(gesdd_bytes(INP, OUT * svd_n));
    let svd_mem = 2 * tensor + ws + basis_bytes(&svd);
    println!("\n## direct SVD (sgesdd of both unfoldings), {svd_n} gradients");
    println!("time: {t_svd:.2} s wall, {cpu_svd:.1} s CPU");
    println!(
        "memory: {} = stacked tensor {} + destroyed unfolding copy {} + largest sgesdd U/s/work {} + output basis {}",
        mb(svd_mem),
        mb(tensor),
        mb(tensor),
        mb(ws),
        mb(basis_bytes(&svd))
    );
    println!("process peak RSS: {}", peak_rss());

    if svd_n == n {
        let rel = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max) / b[0];
        let col_diff = |a: &[f32], b: &[f32], dim: usize, cols: usize| {
            (0..dim)
                .flat_map(|i| (0..cols).map(move |j| (i, j)))
                .map(|(i, j)| (a[i * dim + j] - b[i * dim + j]).abs())
                .fold(0.0f32, f32::max)
        };
        println!("\n## agreement");
        println!(
            "max |sigma_gram - sigma_svd| / sigma_1: out {:.2e}, in {:.2e}",
            rel(gram.sigma_out(), svd.sigma_out()),
            rel(gram.sigma_in(), svd.sigma_in())
        );
        println!(
            "max |column difference| over the leading {RANK} columns: P {:.2e}, Q {:.2e}",
            col_diff(gram.p(), svd.p(), OUT, RANK),
            col_diff(gram.q(), svd.q(), INP, RANK)
        );
    }
    println!(
        "\nspeedup (direct / streaming): {:.1}x wall, {:.1}x CPU; memory ratio: {:.1}x",
        t_svd / (t_acc + t_eig),
        cpu_svd / cpu_gram,
        svd_mem as f64 / gram_mem as f64
    );
}
