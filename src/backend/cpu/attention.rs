//! CPU attention (the twin of cuda/attention.cu): the unfused path it replaced, run one
//! (sequence, KV head) at a time with per-call scratch instead of a kept `(batch, heads,
//! seq, seq)` probability buffer.
//!
//! For each sequence `b` and KV head `g`, over the group's query heads at once:
//! forward `S = Q K^T` (one strided-batched sgemm/dgemm), the softmax of each row (the
//! row kernel of `softmax_causal` / `softmax_masked`, whose max and sum are saved as the
//! statistics), `O = P V`; backward `S = Q K^T` again, `P` recomputed from the statistics
//! (the same operations on the same scores, so the same bits as the forward's), `dP = dO
//! V^T`, `dS` by the softmax backward's row kernel, `dV = sum_h P_h^T dO_h`, `dQ = dS K`,
//! `dK = sum_h dS_h^T Q_h`. Every product is the GEMM the unfused path issued, with the
//! same shapes, strides and accumulation order, so results are bit-identical to it.
//!
//! Scratch: `group * seq * seq` entries for `P` (forward), three of those (`P`, `dP`, `dS`)
//! in the backward, allocated per call (counted in the backend's memory statistics) and
//! freed on return; [`Precision::Bf16`] adds the rounded copies of its inputs.

use super::encoder::live;
use super::softmax::{softmax_backward_row, softmax_row, softmax_row_from_stats};
use super::{Cpu, CpuBuf};
use crate::backend::ops::attention::*;
use crate::backend::{Backend, DenseOps, Gemm, Precision};
use crate::error::Result;
use crate::scalar::Real;
use rayon::prelude::*;

/// Live keys of query `i` of sequence `b` (`seq` tokens).
fn live_keys(lengths: Option<&[u32]>, b: usize, i: usize, seq: usize) -> usize {
    match lengths {
        None => i + 1,
        Some(lengths) => live(lengths, b, seq),
    }
}

/// `x` itself, or under bf16 its rounding (`round` holds the copy).
fn operand<'a, F: Real>(
    be: &Cpu,
    x: &'a CpuBuf<F>,
    len: usize,
    precision: Precision,
    round: &'a mut Option<CpuBuf<F>>,
) -> Result<&'a CpuBuf<F>> {
    if precision == Precision::Full {
        return Ok(x);
    }
    let mut r = be.alloc::<F>(len)?;
    r[..len].par_iter_mut().zip(&x[..len]).for_each(|(r, &v)| *r = F::from_bf16(v.to_bf16()));
    Ok(round.insert(r))
}

/// Rounds `p` to bf16 in place under [`Precision::Bf16`].
fn round_in_place<F: Real>(p: &mut [F], precision: Precision) {
    if precision == Precision::Bf16 {
        p.par_iter_mut().for_each(|v| *v = F::from_bf16(v.to_bf16()));
    }
}

/// The unfused path's products for sequence `b` and KV head `g`: `oq` is the offset of
/// the group's first query head in `q`/`out`, `okv` that of the KV head in `k`/`v`.
struct Products {
    t: usize,
    d: usize,
    group: usize,
    q_dim: usize,
    kv_dim: usize,
    oq: usize,
    okv: usize,
}

impl Products {
    fn new(s: &AttentionShape, b: usize, g: usize) -> Self {
        let (t, d) = (s.seq, s.head_dim);
        Products {
            t,
            d,
            group: s.group(),
            q_dim: s.q_dim(),
            kv_dim: s.kv_dim(),
            oq: b * t * s.q_dim() + g * s.group() * d,
            okv: b * t * s.kv_dim() + g * d,
        }
    }
    /// `S_h = Q_h K^T` (or `dP_h = dO_h V^T`) for the group's heads, into a `(group, t, t)`
    /// scratch.
    fn scores(&self) -> Gemm {
        let mut spec = Gemm::nt(self.t, self.t, self.d);
        (spec.lda, spec.ldb, spec.ldc) = (self.q_dim, self.kv_dim, self.t);
        (spec.offset_a, spec.offset_b, spec.offset_c) = (self.oq, self.okv, 0);
        (spec.batch, spec.stride_a, spec.stride_b, spec.stride_c) = (self.group, self.d, 0, self.t * self.t);
        spec
    }
    /// `O_h = P_h V` (or `dQ_h = dS_h K`) from the scratch.
    fn apply(&self) -> Gemm {
        let mut spec = Gemm::nn(self.t, self.d, self.t);
        (spec.lda, spec.ldb, spec.ldc) = (self.t, self.kv_dim, self.q_dim);
        (spec.offset_a, spec.offset_b, spec.offset_c) = (0, self.okv, self.oq);
        (spec.batch, spec.stride_a, spec.stride_b, spec.stride_c) = (self.group, self.t * self.t, 0, self.d);
        spec
    }
    /// `dV (+)= P_j^T dO_j` (or `dK (+)= dS_j^T Q_j`) for head `j` of the group: the heads share
    /// their KV head, so the first overwrites and the others accumulate.
    fn reduce(&self, j: usize) -> Gemm {
        let mut spec = Gemm::tn(self.t, self.d, self.t).beta(if j == 0 { 0.0 } else { 1.0 });
        (spec.lda, spec.ldb, spec.ldc) = (self.t, self.q_dim, self.kv_dim);
        (spec.offset_a, spec.offset_b, spec.offset_c) = (j * self.t * self.t, self.oq + j * self.d, self.okv);
        spec
    }
}

impl AttentionOps for Cpu {
    fn attention_forward<F: Real>(
        &self,
        shape: &AttentionShape,
        mask: AttentionMask<'_, Self>,
        precision: Precision,
        q: &CpuBuf<F>,
        k: &CpuBuf<F>,
        v: &CpuBuf<F>,
        out: &mut CpuBuf<F>,
        stats: &mut CpuBuf<F>,
    ) -> Result<()> {
        let n = check_attention_forward(self, shape, mask, [q, k, v, out, stats])?;
        if n.rows == 0 {
            return Ok(());
        }
        let (mut rq, mut rk, mut rv) = (None, None, None);
        let q = operand(self, q, n.q, precision, &mut rq)?;
        let k = operand(self, k, n.kv, precision, &mut rk)?;
        let v = operand(self, v, n.kv, precision, &mut rv)?;
        let lengths = match mask {
            AttentionMask::Causal => None,
            AttentionMask::Padding(l) => Some(&l[..shape.batch]),
        };
        let (t, group) = (shape.seq, shape.group());
        let scale = F::from_f64(shape.scale() as f64);
        let mut p = self.alloc::<F>(group * t * t)?;
        let (max, sum) = stats[..2 * n.rows].split_at_mut(n.rows);
        for b in 0..shape.batch {
            for g in 0..shape.kv_heads {
                let prod = Products::new(shape, b, g);
                self.gemm(&prod.scores(), q, k, &mut p)?;
                let r0 = (b * shape.heads + g * group) * t;
                p[..group * t * t]
                    .par_chunks_mut(t)
                    .zip(max[r0..r0 + group * t].par_iter_mut().zip(&mut sum[r0..r0 + group * t]))
                    .enumerate()
                    .for_each(|(row, (p, (m, l)))| {
                        (*m, *l) = softmax_row(p, live_keys(lengths, b, row % t, t), scale);
                    });
                round_in_place(&mut p[..group * t * t], precision);
                self.gemm(&prod.apply(), &p, v, out)?;
            }
        }
        Ok(())
    }

    fn attention_backward<F: Real>(
        &self,
        shape: &AttentionShape,
        mask: AttentionMask<'_, Self>,
        precision: Precision,
        q: &CpuBuf<F>,
        k: &CpuBuf<F>,
        v: &CpuBuf<F>,
        out: &CpuBuf<F>,
        stats: &CpuBuf<F>,
        dout: &CpuBuf<F>,
        grads: AttentionGrads<'_, Self, F>,
    ) -> Result<()> {
        // `out` is validated but not read: D_i = dO_i . out_i is summed here as sum_j p_ij dp_ij
        // (the softmax backward's own sum), as the unfused path did.
        let bufs = [q, k, v, out, stats, dout, &*grads.dq, &*grads.dk, &*grads.dv];
        let n = check_attention_backward(self, shape, mask, bufs, grads.dv_half.as_deref())?;
        if n.rows == 0 {
            return Ok(());
        }
        let (mut rq, mut rk, mut rv, mut rdo) = (None, None, None, None);
        let q = operand(self, q, n.q, precision, &mut rq)?;
        let k = operand(self, k, n.kv, precision, &mut rk)?;
        let v = operand(self, v, n.kv, precision, &mut rv)?;
        let dout = operand(self, dout, n.q, precision, &mut rdo)?;
        let AttentionGrads { dq, dk, dv, dv_half } = grads;
        let lengths = match mask {
            AttentionMask::Causal => None,
            AttentionMask::Padding(l) => Some(&l[..shape.batch]),
        };
        let (t, group) = (shape.seq, shape.group());
        let len = group * t * t;
        let scale = F::from_f64(shape.scale() as f64);
        let (mut p, mut dp, mut ds) = (self.alloc::<F>(len)?, self.alloc::<F>(len)?, self.alloc::<F>(len)?);
        let (max, sum) = stats[..2 * n.rows].split_at(n.rows);
        for b in 0..shape.batch {
            for g in 0..shape.kv_heads {
                let prod = Products::new(shape, b, g);
                let r0 = (b * shape.heads + g * group) * t;
                self.gemm(&prod.scores(), q, k, &mut p)?;
                p[..len].par_chunks_mut(t).enumerate().for_each(|(row, p)| {
                    let r = r0 + row;
                    softmax_row_from_stats(p, live_keys(lengths, b, row % t, t), scale, max[r], sum[r]);
                });
                self.gemm(&prod.scores(), dout, v, &mut dp)?;
                ds[..len].par_chunks_mut(t).enumerate().for_each(|(row, ds)| {
                    let (p, dp) = (&p[row * t..row * t + t], &dp[row * t..row * t + t]);
                    softmax_backward_row(p, dp, ds, live_keys(lengths, b, row % t, t), scale);
                });
                round_in_place(&mut p[..len], precision);
                round_in_place(&mut ds[..len], precision);
                for j in 0..group {
                    self.gemm(&prod.reduce(j), &p, dout, dv)?;
                }
                self.gemm(&prod.apply(), &ds, k, dq)?;
                for j in 0..group {
                    self.gemm(&prod.reduce(j), &ds, q, dk)?;
                }
            }
        }
        match dv_half {
            Some(h) => self.cast_to_bf16(dv, h, n.kv),
            None => Ok(()),
        }
    }
}
