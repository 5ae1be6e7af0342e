//! CPU top-k by magnitude into COO: the specification the CUDA kernels reproduce.
//!
//! 1. Radix select on `abs_key` (the magnitude's float bits, monotone in |v|): the
//!    threshold key `thr` is the k-th largest key. One pass over the matrix histograms the
//!    top 12 bits per chunk (and counts non-finite and nonzero entries), a second copies
//!    the keys of the one bin holding the k-th largest, and the rest of the select runs
//!    on those candidates only; the per-chunk histograms and candidates then give each
//!    chunk's output offset without another pass.
//! 2. Stable compaction in linear order: every entry with key > thr, then the first
//!    `k - count(key > thr)` entries with key == thr (ties go to the lower index).
//! 3. When k exceeds the number of nonzero entries, the selection includes zeros: all
//!    nonzero entries are kept, and the zeros are the lowest full linear indices not
//!    already taken (entries outside the block are zero too), merged in order.
//!
//! Block indices are restored through the (strictly increasing) row and column maps,
//! so block order is full linear order.

use super::{Cpu, CpuBuf};
use crate::backend::ops::topk::*;
use crate::backend::{Coo, IndexMaps};
use crate::error::{Error, Result};
use crate::scalar::Real;
use rayon::prelude::*;

/// Scratch reused across calls; the candidate buffers grow to the largest threshold bin
/// seen and are kept.
pub struct CpuTopkWorkspace {
    max_len: usize,
    /// `CHUNKS` histograms of the top `TOP_BITS` key bits, one per chunk of the matrix.
    hist: Vec<u32>,
    chunks: Vec<ChunkCounts>,
    /// Keys of the threshold bin, chunk after chunk (`cand_start[c]..cand_start[c + 1]`).
    cand: Vec<u64>,
    cand_start: Vec<usize>,
    /// A copy of `cand` the select reorders.
    select: Vec<u64>,
    fill: Vec<u64>,
}

#[derive(Clone, Copy, Default)]
struct ChunkCounts {
    gt: usize,
    eq: usize,
    nonfinite: usize,
    nonzero: usize,
}

const CHUNKS: usize = 64;
const TOP_BITS: u32 = 12;
const BINS: usize = 1 << TOP_BITS;

impl CpuTopkWorkspace {
    fn new(max_len: usize) -> Self {
        CpuTopkWorkspace {
            max_len,
            hist: vec![0; CHUNKS * BINS],
            chunks: vec![ChunkCounts::default(); CHUNKS],
            cand: Vec::new(),
            cand_start: vec![0; CHUNKS + 1],
            select: Vec::new(),
            fill: Vec::new(),
        }
    }
}

/// The first `n` entries of a map (its length already checked), which must be strictly
/// increasing and below `full` (the host reads them).
fn map_entries<'a>(what: &str, map: Option<&'a CpuBuf<u32>>, n: usize, full: usize) -> Result<Option<&'a [u32]>> {
    let Some(map) = map else {
        return Ok(None);
    };
    let map = &map[..n];
    if map.windows(2).any(|w| w[0] >= w[1]) || map.last().is_some_and(|&l| l as usize >= full) {
        return Err(Error::invalid("topk_coo", format!("{what} must be strictly increasing and below {full}")));
    }
    Ok(Some(map))
}

fn key_shift<F: Real>() -> u32 {
    (std::mem::size_of::<F>() * 8) as u32 - TOP_BITS
}

/// Pass 1: per chunk, the histogram of the top key bits and the non-finite and nonzero counts.
fn histogram<F: Real>(m: &[F], chunk_len: usize, ws: &mut CpuTopkWorkspace) {
    let shift = key_shift::<F>();
    ws.hist.par_chunks_mut(BINS).zip(ws.chunks.par_iter_mut()).enumerate().for_each(|(c, (hist, counts))| {
        hist.fill(0);
        let range = (c * chunk_len).min(m.len())..((c + 1) * chunk_len).min(m.len());
        let (mut nonfinite, mut nonzero) = (0, 0);
        for &v in &m[range] {
            nonfinite += usize::from(!v.is_finite());
            nonzero += usize::from(v != F::ZERO);
            hist[(v.abs_key() >> shift) as usize & (BINS - 1)] += 1;
        }
        *counts = ChunkCounts { gt: 0, eq: 0, nonfinite, nonzero };
    });
}

/// The k-th largest key (1 <= k <= n) from the histograms and a pass over the matrix that
/// copies the keys of the threshold bin; fills each chunk's `gt` and `eq` counts against it.
fn select_threshold<F: Real>(m: &[F], chunk_len: usize, k: usize, ws: &mut CpuTopkWorkspace) -> u64 {
    let shift = key_shift::<F>();
    let (mut above, mut bin) = (0usize, 0usize);
    for b in (0..BINS).rev() {
        let count: usize = (0..CHUNKS).map(|c| ws.hist[c * BINS + b] as usize).sum();
        if above + count >= k {
            bin = b;
            break;
        }
        above += count;
    }
    // Candidate offsets per chunk, then every chunk copies its keys of `bin` in parallel.
    ws.cand_start[0] = 0;
    for c in 0..CHUNKS {
        ws.cand_start[c + 1] = ws.cand_start[c] + ws.hist[c * BINS + bin] as usize;
    }
    let total = ws.cand_start[CHUNKS];
    if ws.cand.len() < total {
        ws.cand.resize(total, 0);
        ws.select.resize(total, 0);
    }
    let mut parts = Vec::with_capacity(CHUNKS);
    let mut rest: &mut [u64] = &mut ws.cand[..total];
    for c in 0..CHUNKS {
        let (part, tail) = rest.split_at_mut(ws.cand_start[c + 1] - ws.cand_start[c]);
        parts.push((c, part));
        rest = tail;
    }
    parts.into_par_iter().for_each(|(c, part)| {
        let range = (c * chunk_len).min(m.len())..((c + 1) * chunk_len).min(m.len());
        let mut w = 0;
        for &v in &m[range] {
            let key = v.abs_key();
            if (key >> shift) as usize & (BINS - 1) == bin {
                part[w] = key;
                w += 1;
            }
        }
    });
    // The (k - above)-th largest candidate is the threshold.
    let select = &mut ws.select[..total];
    select.copy_from_slice(&ws.cand[..total]);
    let rank = k - above - 1;
    let (_, &mut thr, _) = select.select_nth_unstable_by(rank, |a, b| b.cmp(a));
    for c in 0..CHUNKS {
        let higher: usize = ws.hist[c * BINS + bin + 1..(c + 1) * BINS].iter().map(|&h| h as usize).sum();
        let keys = &ws.cand[ws.cand_start[c]..ws.cand_start[c + 1]];
        ws.chunks[c].gt = higher + keys.iter().filter(|&&key| key > thr).count();
        ws.chunks[c].eq = keys.iter().filter(|&&key| key == thr).count();
    }
    thr
}

impl TopkOps for Cpu {
    type TopkWorkspace = CpuTopkWorkspace;

    fn topk_workspace(&self, max_len: usize) -> Result<CpuTopkWorkspace> {
        check_topk_workspace(max_len)?;
        Ok(CpuTopkWorkspace::new(max_len))
    }

    fn topk_coo<F: Real>(
        &self,
        m: &CpuBuf<F>,
        rows: usize,
        cols: usize,
        k: usize,
        maps: &IndexMaps<'_, Cpu>,
        ws: &mut CpuTopkWorkspace,
        out: &mut Coo<Cpu, F>,
    ) -> Result<()> {
        let n = check_topk_coo(self, m, rows, cols, k, maps, ws.max_len, out)?;
        let (full_rows, full_cols) = maps.full_shape;
        let row_map = map_entries("row_map", maps.row_map, rows, full_rows)?;
        let col_map = map_entries("col_map", maps.col_map, cols, full_cols)?;
        let m = &m[..n];
        let chunk_len = n.div_ceil(CHUNKS).max(1);
        histogram(m, chunk_len, ws);
        let nonfinite: usize = ws.chunks.iter().map(|c| c.nonfinite).sum();
        if nonfinite > 0 {
            let first = m.iter().position(|v| !v.is_finite()).unwrap_or(0);
            return Err(Error::NonFinite {
                what: "matrix passed to top-k selection".into(),
                count: nonfinite,
                first_index: first,
            });
        }
        out.shape = maps.full_shape;
        out.len = 0;
        if k == 0 {
            return Ok(());
        }
        let nnz: usize = ws.chunks.iter().map(|c| c.nonzero).sum();
        let (thr, take_eq) = if k <= nnz {
            let thr = select_threshold(m, chunk_len, k, ws);
            let n_gt: usize = ws.chunks.iter().map(|c| c.gt).sum();
            (thr, k - n_gt)
        } else {
            // Every nonzero entry is kept (key > 0), no tie at the threshold.
            for counts in ws.chunks.iter_mut() {
                (counts.gt, counts.eq) = (counts.nonzero, 0);
            }
            (0, 0)
        };
        let n_kept = compact(m, cols, chunk_len, thr, take_eq, row_map, col_map, ws, out);
        if n_kept < k {
            fill_zeros(k, n_kept, full_cols, ws, out);
        }
        out.len = k;
        Ok(())
    }

    fn topk_coo_batch<F: Real>(&self, jobs: &mut [TopkJob<'_, Cpu, F>]) -> Result<()> {
        for j in jobs.iter() {
            check_topk_coo(self, j.m, j.rows, j.cols, j.k, &j.maps, j.ws.max_len, j.out)?;
        }
        let count = jobs.len();
        for (i, j) in jobs.iter_mut().enumerate() {
            self.topk_coo(j.m, j.rows, j.cols, j.k, &j.maps, j.ws, j.out).map_err(|e| match e {
                Error::NonFinite { count: c, first_index, .. } => {
                    Error::NonFinite { what: topk_matrix_name(i, count), count: c, first_index }
                }
                e => e,
            })?;
        }
        Ok(())
    }
}

/// Writes entries with key > thr and the first `take_eq` with key == thr (key > 0 always),
/// in linear order, restored to full indices, from the per-chunk counts in `ws.chunks`.
/// Returns how many were written.
#[allow(clippy::too_many_arguments)]
fn compact<F: Real>(
    m: &[F],
    cols: usize,
    chunk_len: usize,
    thr: u64,
    take_eq: usize,
    row_map: Option<&[u32]>,
    col_map: Option<&[u32]>,
    ws: &mut CpuTopkWorkspace,
    out: &mut Coo<Cpu, F>,
) -> usize {
    let n = m.len();
    let eligible_eq = thr > 0;
    // Output offset and tie quota per chunk, in chunk order: lower indices first.
    let mut starts = [(0usize, 0usize); CHUNKS];
    let (mut written, mut eq_left) = (0usize, take_eq);
    for (c, counts) in ws.chunks.iter().enumerate() {
        let quota = counts.eq.min(eq_left);
        eq_left -= quota;
        starts[c] = (written, quota);
        written += counts.gt + quota;
    }
    let total = written;
    let mut rows_out: &mut [u32] = &mut out.rows[..total];
    let mut cols_out: &mut [u32] = &mut out.cols[..total];
    let mut vals_out: &mut [F] = &mut out.values[..total];
    let mut jobs = Vec::with_capacity(CHUNKS);
    for (c, counts) in ws.chunks.iter().enumerate() {
        let len = counts.gt + starts[c].1;
        let (r, rest_r) = rows_out.split_at_mut(len);
        let (cc, rest_c) = cols_out.split_at_mut(len);
        let (v, rest_v) = vals_out.split_at_mut(len);
        rows_out = rest_r;
        cols_out = rest_c;
        vals_out = rest_v;
        jobs.push((c, starts[c].1, r, cc, v));
    }
    jobs.into_par_iter().for_each(|(c, quota, r_out, c_out, v_out)| {
        let start = (c * chunk_len).min(n);
        let end = ((c + 1) * chunk_len).min(n);
        let (mut w, mut eq_taken) = (0usize, 0usize);
        for (i, &v) in m.iter().enumerate().take(end).skip(start) {
            let key = v.abs_key();
            let take = key > thr || (eligible_eq && key == thr && eq_taken < quota);
            if !take {
                continue;
            }
            if key == thr {
                eq_taken += 1;
            }
            let (bi, bj) = (i / cols, i % cols);
            r_out[w] = row_map.map_or(bi as u32, |map| map[bi]);
            c_out[w] = col_map.map_or(bj as u32, |map| map[bj]);
            v_out[w] = v;
            w += 1;
        }
    });
    total
}

/// `out[..n_kept]` holds every nonzero entry; adds the `k - n_kept` lowest full linear
/// indices not among them, as zeros, and merges both lists in linear order.
fn fill_zeros<F: Real>(k: usize, n_kept: usize, full_cols: usize, ws: &mut CpuTopkWorkspace, out: &mut Coo<Cpu, F>) {
    let lin = |r: u32, c: u32| r as u64 * full_cols as u64 + c as u64;
    let need = k - n_kept;
    ws.fill.clear();
    let (mut next, mut p) = (0u64, 0usize);
    while ws.fill.len() < need {
        while p < n_kept && lin(out.rows[p], out.cols[p]) < next {
            p += 1;
        }
        if p < n_kept && lin(out.rows[p], out.cols[p]) == next {
            p += 1;
        } else {
            ws.fill.push(next);
        }
        next += 1;
    }
    // Merge from the back so the kept entries can stay in place.
    let (mut i, mut j, mut w) = (n_kept, need, k);
    while j > 0 {
        w -= 1;
        let take_kept = i > 0 && lin(out.rows[i - 1], out.cols[i - 1]) > ws.fill[j - 1];
        if take_kept {
            i -= 1;
            out.rows[w] = out.rows[i];
            out.cols[w] = out.cols[i];
            out.values[w] = out.values[i];
        } else {
            j -= 1;
            out.rows[w] = (ws.fill[j] / full_cols as u64) as u32;
            out.cols[w] = (ws.fill[j] % full_cols as u64) as u32;
            out.values[w] = F::ZERO;
        }
    }
}
