//! Top-k by magnitude into COO on CUDA against the CPU specification: the selected
//! entries, their order, restored indices and values must be identical (ties to the lower
//! linear index, zero fill when k exceeds the nonzeros, index maps, NaN/inf rejected with
//! the same count and first index). Output buffers are poisoned and their tails checked.
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::*;
use rand::rngs::SmallRng;
use rand::Rng;
use sparsegrad::backend::{Coo, IndexMaps, TopkJob, TopkOps};
use sparsegrad::{Backend, Cpu, Error};

const SHAPES: &[(usize, usize)] =
    &[(1, 1), (1, 17), (17, 1), (17, 1000), (1000, 17), (70000, 3), (3, 1600), (129, 257)];

/// Reads a whole COO buffer set (capacity entries) to the host.
fn read_all<B: Backend>(b: &B, coo: &Coo<B, f32>) -> (Vec<u32>, Vec<u32>, Vec<f32>) {
    (down(b, &coo.rows, coo.capacity), down(b, &coo.cols, coo.capacity), down(b, &coo.values, coo.capacity))
}

fn poisoned_coo<B: Backend>(b: &B, capacity: usize, shape: (usize, usize)) -> Coo<B, f32> {
    let mut coo = Coo::with_capacity(b, capacity, shape).unwrap();
    b.fill(&mut coo.rows, capacity, u32::MAX).unwrap();
    b.fill(&mut coo.cols, capacity, u32::MAX).unwrap();
    b.fill(&mut coo.values, capacity, f32::NAN).unwrap();
    coo
}

struct Case<'a> {
    m: &'a [f32],
    rows: usize,
    cols: usize,
    k: usize,
    row_map: Option<&'a [u32]>,
    col_map: Option<&'a [u32]>,
    full: (usize, usize),
}

impl Case<'_> {
    fn plain(m: &[f32], rows: usize, cols: usize, k: usize) -> Case<'_> {
        Case { m, rows, cols, k, row_map: None, col_map: None, full: (rows, cols) }
    }

    /// Runs the case on both backends and compares; returns the CPU's result kind.
    fn check<B: Backend>(
        &self,
        dev: &B,
        dev_ws: &mut B::TopkWorkspace,
        cpu: &Cpu,
        cpu_ws: &mut <Cpu as TopkOps>::TopkWorkspace,
    ) {
        let what = format!(
            "topk {}x{} k={} maps=({}, {}) full={:?}",
            self.rows,
            self.cols,
            self.k,
            self.row_map.is_some(),
            self.col_map.is_some(),
            self.full
        );
        let cap = self.k + 3;
        let (want, want_out) = run(cpu, cpu_ws, self, cap);
        let (got, got_out) = run(dev, dev_ws, self, cap);
        match (&want, &got) {
            (Ok(()), Ok(())) => {}
            (
                Err(Error::NonFinite { count: wc, first_index: wf, .. }),
                Err(Error::NonFinite { count: gc, first_index: gf, .. }),
            ) => {
                assert_eq!((gc, gf), (wc, wf), "{what}: NonFinite details");
                return;
            }
            (Err(Error::InvalidArgument { .. }), Err(Error::InvalidArgument { .. }))
            | (Err(Error::Shape { .. }), Err(Error::Shape { .. })) => return,
            _ => panic!("{what}: results differ: cpu {want:?}, cuda {got:?}"),
        }
        let (w, g) = (want_out.unwrap(), got_out.unwrap());
        assert_eq!(g.0, w.0, "{what}: len");
        assert_eq!(g.1, w.1, "{what}: shape");
        let len = w.0;
        let ((wr, wc, wv), (gr, gc, gv)) = (w.2, g.2);
        assert_same(&format!("{what}: rows"), &gr[..len], &wr[..len]);
        assert_same(&format!("{what}: cols"), &gc[..len], &wc[..len]);
        assert_bits(&format!("{what}: values"), &gv[..len], &wv[..len]);
        assert_untouched(&format!("{what}: rows tail"), &gr[len..], u32::MAX);
        assert_untouched(&format!("{what}: cols tail"), &gc[len..], u32::MAX);
        assert_untouched_f32(&format!("{what}: values tail"), &gv[len..], f32::NAN);
    }
}

type Out = (usize, (usize, usize), (Vec<u32>, Vec<u32>, Vec<f32>));

fn run<B: Backend>(
    b: &B,
    ws: &mut B::TopkWorkspace,
    c: &Case<'_>,
    cap: usize,
) -> (sparsegrad::Result<()>, Option<Out>) {
    let m = up(b, c.m);
    let rm = c.row_map.map(|v| up(b, v));
    let cm = c.col_map.map(|v| up(b, v));
    let maps = IndexMaps { row_map: rm.as_ref(), col_map: cm.as_ref(), full_shape: c.full };
    let mut out = poisoned_coo(b, cap, (0, 0));
    // CUDA reports a bad map or a non-finite value at the next synchronisation (the top-k
    // reads nothing back), the CPU at once: both must fail the same way by then.
    let r = b.topk_coo(&m, c.rows, c.cols, c.k, &maps, ws, &mut out).and_then(|_| b.synchronize());
    let o = r.is_ok().then(|| (out.len, out.shape, read_all(b, &out)));
    (r, o)
}

/// Values of few magnitudes (many ties, both signs) and zeros.
fn tied(r: &mut SmallRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.random_range(-4i32..=4) as f32 * 0.25).collect()
}

/// Values spanning many binades, subnormals included, so every radix digit matters.
fn wide(r: &mut SmallRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| match r.random_range(0..10) {
            0 => 0.0,
            1 => f32::from_bits(r.random_range(1..0x0080_0000u32)) * if r.random_bool(0.5) { -1.0 } else { 1.0 },
            _ => r.random_range(-1.0f32..1.0) * 2f32.powi(r.random_range(-60..60)),
        })
        .collect()
}

fn check_topk<B: Backend>(dev: &B, big: bool) {
    let cpu = Cpu::new();
    let mut r = rng(41);
    let max_len = if big { 4100 * 4096 } else { 70000 * 3 };
    let mut dws = dev.topk_workspace(max_len).unwrap();
    let mut cws = cpu.topk_workspace(max_len).unwrap();
    let mut shapes = SHAPES.to_vec();
    if big {
        shapes.push((4100, 4096));
    }
    for &(rows, cols) in &shapes {
        let n = rows * cols;
        let gens: [fn(&mut SmallRng, usize) -> Vec<f32>; 3] = [|r, n| rand_sparse(r, n, 0.3), tied, wide];
        for (g, gen) in gens.iter().enumerate() {
            if n > 1_000_000 && g > 0 {
                continue;
            }
            let m = gen(&mut r, n);
            let nnz = m.iter().filter(|&&v| v != 0.0).count();
            let mut ks = vec![0, 1, 7.min(n), (n / 100).max(1), nnz, (nnz + 5).min(n), n];
            ks.dedup();
            for k in ks {
                Case::plain(&m, rows, cols, k).check(dev, &mut dws, &cpu, &mut cws);
            }
            // Through maps, into a larger full matrix (entries outside the block are zero).
            if n <= 300_000 {
                let full = (rows * 2 + 1, cols + 5);
                let rmap = sorted_subset(&mut r, full.0, rows);
                let cmap = sorted_subset(&mut r, full.1, cols);
                for k in [1, nnz.max(1), nnz + 5, full.0 * full.1] {
                    let c = Case { m: &m, rows, cols, k, row_map: Some(&rmap), col_map: Some(&cmap), full };
                    c.check(dev, &mut dws, &cpu, &mut cws);
                }
                let full_r = (rows + 3, cols);
                let rmap = sorted_subset(&mut r, full_r.0, rows);
                let c = Case { m: &m, rows, cols, k: nnz + 2, row_map: Some(&rmap), col_map: None, full: full_r };
                c.check(dev, &mut dws, &cpu, &mut cws);
            }
        }
    }
    // Nothing but zeros: the whole selection is zero fill.
    let z = vec![0.0f32; 60];
    for k in [1, 13, 60] {
        Case::plain(&z, 6, 10, k).check(dev, &mut dws, &cpu, &mut cws);
    }
    // Negative zeros are not kept: they fill as +0, as every missing index does (the fill
    // range reads the matrix at indices it writes, directly and through the maps).
    let mut signed: Vec<f32> = (0..60).map(|i| if i % 3 == 0 { -0.0 } else { 0.0 }).collect();
    signed[17] = -1.5;
    signed[44] = 2.0;
    for k in [3, 41, 60] {
        Case::plain(&signed, 6, 10, k).check(dev, &mut dws, &cpu, &mut cws);
    }
    let (rmap, cmap) = ([1u32, 2, 4, 7, 8, 9], [0u32, 1, 3, 4, 5, 6, 8, 9, 10, 12]);
    let c = Case { m: &signed, rows: 6, cols: 10, k: 50, row_map: Some(&rmap), col_map: Some(&cmap), full: (10, 13) };
    c.check(dev, &mut dws, &cpu, &mut cws);
    // Non-finite input: same error, same count and first index.
    let mut m = rand_f32(&mut r, 1000);
    m[700] = f32::NAN;
    m[301] = f32::NEG_INFINITY;
    m[999] = f32::INFINITY;
    Case::plain(&m, 10, 100, 5).check(dev, &mut dws, &cpu, &mut cws);
    Case::plain(&m, 10, 100, 0).check(dev, &mut dws, &cpu, &mut cws);
    // Invalid maps and arguments are rejected by both.
    let m = rand_f32(&mut r, 12);
    let bad = [0u32, 2, 2];
    Case { m: &m, rows: 3, cols: 4, k: 2, row_map: Some(&bad), col_map: None, full: (5, 4) }
        .check(dev, &mut dws, &cpu, &mut cws);
    let high = [0u32, 2, 5];
    Case { m: &m, rows: 3, cols: 4, k: 2, row_map: Some(&high), col_map: None, full: (5, 4) }
        .check(dev, &mut dws, &cpu, &mut cws);
    Case::plain(&m, 3, 4, 13).check(dev, &mut dws, &cpu, &mut cws);
    let mut small = dev.topk_workspace(4).unwrap();
    let mut out = poisoned_coo(dev, 4, (3, 4));
    let mb = up(dev, &m);
    let maps = IndexMaps { row_map: None, col_map: None, full_shape: (3, 4) };
    assert!(
        matches!(dev.topk_coo(&mb, 3, 4, 2, &maps, &mut small, &mut out), Err(Error::InvalidArgument { .. })),
        "workspace too small"
    );
}

cuda_test!(fn topk_matches_cpu_exactly(cuda) {
    check_topk(&cuda, big_shapes());
});

#[test]
fn harness_on_cpu() {
    check_topk(&Cpu::new(), false);
}

/// One selection of a batch: a matrix with its shape, k and maps (into a larger full
/// matrix or none).
struct Job {
    m: Vec<f32>,
    rows: usize,
    cols: usize,
    k: usize,
    row_map: Option<Vec<u32>>,
    col_map: Option<Vec<u32>>,
    full: (usize, usize),
}

impl Job {
    /// A ragged job: shapes from one entry to a few tiles, k from 0 to past the nonzeros
    /// (the fill path), maps on a third of them.
    fn random(r: &mut SmallRng) -> Job {
        let (rows, cols) =
            [(1, 1), (1, 17), (17, 1000), (1000, 17), (3, 1600), (129, 257), (9, 2300)][r.random_range(0..7)];
        let n = rows * cols;
        let m = if r.random_bool(0.5) { rand_sparse(r, n, 0.6) } else { tied(r, n) };
        let nnz = m.iter().filter(|&&v| v != 0.0).count();
        let (row_map, col_map, full) = if r.random_bool(0.33) {
            let full = (rows * 2 + 1, cols + 3);
            (Some(sorted_subset(r, full.0, rows)), Some(sorted_subset(r, full.1, cols)), full)
        } else {
            (None, None, (rows, cols))
        };
        let k = match r.random_range(0..6) {
            0 => 0,
            1 => 1,
            2 => (n / 100).max(1),
            3 => nnz.max(1),
            4 => (nnz + 3).min(full.0 * full.1),
            _ => r.random_range(1..=n),
        };
        Job { m, rows, cols, k, row_map, col_map, full }
    }
}

/// Runs `jobs` as one `topk_coo_batch` (each output poisoned, with room for k + 3) and reads
/// every output back after a synchronisation.
fn run_batch<B: Backend>(b: &B, jobs: &[Job], ws: &mut [B::TopkWorkspace]) -> (sparsegrad::Result<()>, Vec<Out>) {
    let ms: Vec<_> = jobs.iter().map(|j| up(b, &j.m)).collect();
    let rms: Vec<_> = jobs.iter().map(|j| j.row_map.as_ref().map(|v| up(b, v))).collect();
    let cms: Vec<_> = jobs.iter().map(|j| j.col_map.as_ref().map(|v| up(b, v))).collect();
    let mut outs: Vec<_> = jobs.iter().map(|j| poisoned_coo(b, j.k + 3, (0, 0))).collect();
    let mut batch: Vec<TopkJob<'_, B, f32>> = jobs
        .iter()
        .zip(&ms)
        .zip(rms.iter().zip(&cms))
        .zip(ws.iter_mut().zip(outs.iter_mut()))
        .map(|(((j, m), (rm, cm)), (ws, out))| TopkJob {
            m,
            rows: j.rows,
            cols: j.cols,
            k: j.k,
            maps: IndexMaps { row_map: rm.as_ref(), col_map: cm.as_ref(), full_shape: j.full },
            ws,
            out,
        })
        .collect();
    let r = b.topk_coo_batch(&mut batch).and_then(|_| b.synchronize());
    drop(batch);
    (r, outs.iter().map(|o| (o.len, o.shape, read_all(b, o))).collect())
}

/// Each output of a batch, bit for bit as the CPU's single selection of that job, tails
/// untouched.
fn assert_batch_matches(what: &str, jobs: &[Job], got: &[Out]) {
    let cpu = Cpu::new();
    for (i, (j, g)) in jobs.iter().zip(got).enumerate() {
        let mut ws = cpu.topk_workspace(j.m.len()).unwrap();
        let c = Case {
            m: &j.m,
            rows: j.rows,
            cols: j.cols,
            k: j.k,
            row_map: j.row_map.as_deref(),
            col_map: j.col_map.as_deref(),
            full: j.full,
        };
        let (r, w) = run(&cpu, &mut ws, &c, j.k + 3);
        r.unwrap();
        let w = w.unwrap();
        let what = format!("{what}, job {i}: {}x{} k={} maps={}", j.rows, j.cols, j.k, j.row_map.is_some());
        assert_eq!((g.0, g.1), (w.0, w.1), "{what}: len and shape");
        let len = w.0;
        assert_same(&format!("{what}: rows"), &g.2 .0[..len], &w.2 .0[..len]);
        assert_same(&format!("{what}: cols"), &g.2 .1[..len], &w.2 .1[..len]);
        assert_bits(&format!("{what}: values"), &g.2 .2[..len], &w.2 .2[..len]);
        assert_untouched(&format!("{what}: rows tail"), &g.2 .0[len..], u32::MAX);
        assert_untouched_f32(&format!("{what}: values tail"), &g.2 .2[len..], f32::NAN);
    }
}

fn check_batches<B: Backend>(dev: &B) {
    let mut r = rng(97);
    let mut ws: Vec<_> = (0..7).map(|_| dev.topk_workspace(129 * 257).unwrap()).collect();
    // Batches of 1 to 7 jobs: more than a launch takes (4) run in groups.
    for trial in 0..14 {
        let count = 1 + trial % 7;
        let jobs: Vec<Job> = (0..count).map(|_| Job::random(&mut r)).collect();
        let (res, got) = run_batch(dev, &jobs, &mut ws[..count]);
        res.unwrap_or_else(|e| panic!("batch {trial} of {count}: {e}"));
        assert_batch_matches(&format!("batch {trial} of {count}"), &jobs, &got);
    }
    // A small job beside a large one, its workspace only as large as it needs: the blocks
    // past its own tiles must not read its workspace's tile words.
    let mut small_ws = [dev.topk_workspace(17).unwrap(), dev.topk_workspace(129 * 257).unwrap()];
    for k in [5, 17] {
        let mut jobs: Vec<Job> = (0..2).map(|_| Job::random(&mut r)).collect();
        let m0 = rand_sparse(&mut r, 17, 0.5);
        jobs[0] = Job { m: m0, rows: 1, cols: 17, k, row_map: None, col_map: None, full: (1, 17) };
        let m1 = rand_sparse(&mut r, 129 * 257, 0.3);
        jobs[1] = Job { m: m1, rows: 129, cols: 257, k: 400, row_map: None, col_map: None, full: (129, 257) };
        let (res, got) = run_batch(dev, &jobs, &mut small_ws);
        res.unwrap();
        assert_batch_matches(&format!("small beside large, k = {k}"), &jobs, &got);
    }
    // A non-finite matrix in one job of three: named by its place, counted as alone.
    let mut jobs: Vec<Job> = (0..3).map(|_| Job::random(&mut r)).collect();
    for j in &mut jobs {
        j.k = j.k.max(1);
    }
    let n1 = jobs[1].m.len();
    jobs[1].m[n1 / 2] = f32::NAN;
    jobs[1].m[n1 - 1] = f32::INFINITY;
    let want_one = if n1 == 1 { (1, 0) } else { (2, n1 / 2) };
    match run_batch(dev, &jobs, &mut ws[..3]).0 {
        Err(Error::NonFinite { what, count, first_index }) => {
            assert_eq!((count, first_index), want_one, "{what}");
            assert!(what.contains("matrix 1 of 3 passed to top-k selection"), "{what}");
        }
        other => panic!("a NaN in job 1 of 3: {other:?}"),
    }
    // In two jobs: one of them is reported, with its own count and first index.
    let n0 = jobs[0].m.len();
    jobs[0].m[0] = f32::NEG_INFINITY;
    match run_batch(dev, &jobs, &mut ws[..3]).0 {
        Err(Error::NonFinite { what, count, first_index }) => {
            let reported = if what.contains("matrix 0 of 3") { (1, 0) } else { want_one };
            assert_eq!((count, first_index), reported, "{what} (job 0 holds {n0} entries)");
        }
        other => panic!("non-finite entries in jobs 0 and 1 of 3: {other:?}"),
    }
    // A job that cannot run stops the batch before anything runs: every output untouched.
    let mut jobs: Vec<Job> = (0..3).map(|_| Job::random(&mut r)).collect();
    jobs[2].k = jobs[2].full.0 * jobs[2].full.1 + 1;
    let (res, got) = run_batch(dev, &jobs, &mut ws[..3]);
    assert!(matches!(res, Err(Error::InvalidArgument { .. })), "{res:?}");
    for (i, g) in got.iter().enumerate() {
        assert_untouched(&format!("refused batch, job {i}: rows"), &g.2 .0, u32::MAX);
    }
    // The workspaces serve a good batch after the failed ones.
    let jobs: Vec<Job> = (0..4).map(|_| Job::random(&mut r)).collect();
    let (res, got) = run_batch(dev, &jobs, &mut ws[..4]);
    res.unwrap();
    assert_batch_matches("batch after errors", &jobs, &got);
}

cuda_test!(fn topk_batches_match_single_selections(cuda) {
    check_batches(&cuda);
});

#[test]
fn batch_harness_on_cpu() {
    check_batches(&Cpu::new());
}
