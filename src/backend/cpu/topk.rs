//! CPU top-k by magnitude into COO: the specification the CUDA kernels reproduce.
//!
//! 1. Radix select on `abs_key` (the magnitude's float bits, monotone in |v|), 8 bits per
//!    pass from the top: the threshold key `thr` is the k-th largest key.
//! 2. Stable compaction in linear order: every entry with key > thr, then the first
//!    `k - count(key > thr)` entries with key == thr (ties go to the lower index).
//! 3. When k exceeds the number of nonzero entries, the selection includes zeros: all
//!    nonzero entries are kept, and the zeros are the lowest full linear indices not
//!    already taken (entries outside the block are zero too), merged in order.
//!
//! Block indices are restored through the (strictly increasing) row and column maps,
//! so block order is full linear order.

use crate::backend::cpu::{Cpu, CpuBuf};
use crate::backend::{Coo, IndexMaps};
use crate::error::{check_len, Error, Result};
use crate::scalar::Real;
use rayon::prelude::*;

/// Scratch reused across calls.
pub struct CpuTopkWorkspace {
    max_len: usize,
    chunks: Vec<ChunkCounts>,
    fill: Vec<u64>,
}

#[derive(Clone, Copy, Default)]
struct ChunkCounts {
    gt: usize,
    eq: usize,
}

const CHUNKS: usize = 64;
const DIGIT_BITS: u32 = 8;
const BINS: usize = 1 << DIGIT_BITS;

impl CpuTopkWorkspace {
    pub(super) fn new(max_len: usize) -> Self {
        CpuTopkWorkspace { max_len, chunks: vec![ChunkCounts::default(); CHUNKS], fill: Vec::new() }
    }
}

/// Checks a map is strictly increasing and bounded; returns its first `n` entries.
fn check_map<'a>(what: &str, map: Option<&'a CpuBuf<u32>>, n: usize, full: usize) -> Result<Option<&'a [u32]>> {
    let Some(map) = map else {
        if n != full {
            return Err(Error::shape("topk_coo", format!("{what} (no map given)"), full, n));
        }
        return Ok(None);
    };
    check_len("topk_coo", what, map.len(), n)?;
    let map = &map[..n];
    if map.windows(2).any(|w| w[0] >= w[1]) || map.last().is_some_and(|&l| l as usize >= full) {
        return Err(Error::invalid("topk_coo", format!("{what} must be strictly increasing and below {full}")));
    }
    Ok(Some(map))
}

/// The k-th largest key (k >= 1, k <= n) by radix select.
fn radix_select<F: Real>(m: &[F], k: usize) -> u64 {
    let key_bits = (std::mem::size_of::<F>() * 8) as u32;
    let (mut prefix, mut mask, mut remaining) = (0u64, 0u64, k);
    let mut shift = key_bits;
    while shift > 0 {
        shift -= DIGIT_BITS;
        let hist = m
            .par_chunks(1 << 16)
            .fold(
                || [0usize; BINS],
                |mut h, chunk| {
                    for &v in chunk {
                        let key = v.abs_key();
                        if key & mask == prefix {
                            h[((key >> shift) & (BINS as u64 - 1)) as usize] += 1;
                        }
                    }
                    h
                },
            )
            .reduce(
                || [0usize; BINS],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                    a
                },
            );
        let mut above = 0usize;
        for bin in (0..BINS).rev() {
            if above + hist[bin] >= remaining {
                remaining -= above;
                prefix |= (bin as u64) << shift;
                mask |= (BINS as u64 - 1) << shift;
                break;
            }
            above += hist[bin];
        }
    }
    prefix
}

#[allow(clippy::too_many_arguments)]
pub(super) fn topk_coo<F: Real>(
    m: &CpuBuf<F>,
    rows: usize,
    cols: usize,
    k: usize,
    maps: &IndexMaps<'_, Cpu>,
    ws: &mut CpuTopkWorkspace,
    out: &mut Coo<Cpu, F>,
) -> Result<()> {
    let n = rows * cols;
    check_len("topk_coo", "m", m.len(), n)?;
    let (full_rows, full_cols) = maps.full_shape;
    let row_map = check_map("row_map", maps.row_map, rows, full_rows)?;
    let col_map = check_map("col_map", maps.col_map, cols, full_cols)?;
    let full_len = full_rows * full_cols;
    if k > full_len {
        return Err(Error::invalid(
            "topk_coo",
            format!("k = {k} exceeds the {full_len} entries of a {full_rows}x{full_cols} matrix"),
        ));
    }
    if n > ws.max_len {
        return Err(Error::invalid("topk_coo", format!("{n} entries exceed the workspace size {}", ws.max_len)));
    }
    check_len(
        "topk_coo",
        "out (capacity)",
        out.capacity.min(out.values.len()).min(out.rows.len()).min(out.cols.len()),
        k,
    )?;
    let m = &m[..n];
    let nonfinite = m.par_iter().filter(|v| !v.is_finite()).count();
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
    let nnz = m.par_iter().filter(|&&v| v != F::ZERO).count();
    let (thr, take_eq) = if k <= nnz {
        let thr = radix_select(m, k);
        let n_gt = m.par_iter().filter(|v| v.abs_key() > thr).count();
        (thr, k - n_gt)
    } else {
        (0, 0)
    };
    let n_kept = compact(m, cols, thr, take_eq, row_map, col_map, ws, out);
    if n_kept < k {
        fill_zeros(k, n_kept, full_cols, ws, out);
    }
    out.len = k;
    Ok(())
}

/// Writes entries with key > thr and the first `take_eq` with key == thr (key > 0 always),
/// in linear order, restored to full indices. Returns how many were written.
#[allow(clippy::too_many_arguments)]
fn compact<F: Real>(
    m: &[F],
    cols: usize,
    thr: u64,
    take_eq: usize,
    row_map: Option<&[u32]>,
    col_map: Option<&[u32]>,
    ws: &mut CpuTopkWorkspace,
    out: &mut Coo<Cpu, F>,
) -> usize {
    let n = m.len();
    let chunk_len = n.div_ceil(CHUNKS).max(1);
    let eligible_eq = thr > 0;
    ws.chunks.par_iter_mut().enumerate().for_each(|(c, counts)| {
        let range = (c * chunk_len).min(n)..((c + 1) * chunk_len).min(n);
        let (mut gt, mut eq) = (0, 0);
        for &v in &m[range] {
            let key = v.abs_key();
            if key > thr {
                gt += 1;
            } else if eligible_eq && key == thr {
                eq += 1;
            }
        }
        *counts = ChunkCounts { gt, eq };
    });
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
