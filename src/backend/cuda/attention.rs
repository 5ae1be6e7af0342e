//! [`AttentionOps`] for CUDA: the launchers of the fused attention kernels, each after the
//! op's shared validator: cuda/attention.cu (the f32 path and the backward's delta pre-pass)
//! and cuda/attention_wmma.cu (bf16 on tensor cores, one kernel per head dim padded to 32,
//! 64, 96 or 128). A forward is one launch, a backward three (delta, dk/dv, dq), whatever the
//! batch and the heads. The backward's delta (one f32 per query row) lives in the backend's
//! arena for the duration of the op.
//!
//! Limits of these kernels (errors, not silent fallbacks): `head_dim <= 128`; bf16 needs a
//! device of compute capability 8.0 or later; batch, sequence length and heads below 2^31.

use super::consts::{ATT_BF16_FWD_ROWS, ATT_BF16_TILE, ATT_DMAX, ATT_F32_ROWS};
use super::{kargs, kernel, require_f32, Cuda, CudaBuf};
use crate::backend::ops::attention::*;
use crate::backend::Precision;
use crate::error::{Error, Result};
use crate::perf::KernelCost;
use crate::scalar::Real;
use cudarc::driver::LaunchConfig;

// Costs (see `kernel!`), args [batch, seq, heads, kv_heads, head_dim, causal]: the compulsory
// traffic (each input read once, each output written once; the kernels re-read K and V per
// tile from L2) and the products' flops over the (query, key) pairs the mask keeps (causal:
// t (t + 1) / 2 per head; a padding mask is priced at t^2, its lengths being data).
/// Query-key pairs per head.
fn pairs(a: &[u64]) -> u64 {
    if a[5] == 1 {
        a[1] * (a[1] + 1) / 2
    } else {
        a[1] * a[1]
    }
}
/// Elements of q (and out, dout, dq): batch * seq * heads * head_dim.
fn q_elems(a: &[u64]) -> u64 {
    a[0] * a[1] * a[2] * a[4]
}
/// Elements of k (and v, dk, dv): batch * seq * kv_heads * head_dim.
fn kv_elems(a: &[u64]) -> u64 {
    a[0] * a[1] * a[3] * a[4]
}
/// Query rows: batch * heads * seq (the stats hold two f32 per row, delta one).
fn rows(a: &[u64]) -> u64 {
    a[0] * a[2] * a[1]
}
/// (bytes, flops) of a forward, either precision: q, k, v read, out and the stats written;
/// S = Q K^T and O = P V.
fn forward_cost(a: &[u64]) -> (u64, u64) {
    (4 * (2 * q_elems(a) + 2 * kv_elems(a) + 2 * rows(a)), 4 * a[0] * a[2] * pairs(a) * a[4])
}
/// The dk/dv kernel: q, dout, k, v, stats, delta read; dk, dv written (and dv in bf16 when
/// `a[6]` is 1); S, dV += P^T dO, dP, dK += dS^T Q.
fn dkdv_cost(a: &[u64]) -> (u64, u64) {
    let bytes = 4 * (2 * q_elems(a) + 4 * kv_elems(a) + 3 * rows(a)) + 2 * a.get(6).copied().unwrap_or(0) * kv_elems(a);
    (bytes, 8 * a[0] * a[2] * pairs(a) * a[4])
}
/// The dq kernel: q, dout, k, v, stats, delta read; dq written; S, dP, dQ = dS K.
fn dq_cost(a: &[u64]) -> (u64, u64) {
    (4 * (3 * q_elems(a) + 2 * kv_elems(a) + 3 * rows(a)), 6 * a[0] * a[2] * pairs(a) * a[4])
}
kernel!(
    /// See `forward_cost`.
    FORWARD_F32 = "attention" / "attention_forward_f32", Attention, |a| forward_cost(a)
);
kernel!(
    /// out and dout read, delta written: one dot product per query row.
    BACKWARD_DOT = "attention" / "attention_backward_dot_f32", Attention,
    |a| (4 * (2 * q_elems(a) + rows(a)), 2 * q_elems(a))
);
kernel!(
    /// See `dkdv_cost`.
    DKDV_F32 = "attention" / "attention_backward_dkdv_f32", Attention, |a| dkdv_cost(a)
);
kernel!(
    /// See `dq_cost`.
    DQ_F32 = "attention" / "attention_backward_dq_f32", Attention, |a| dq_cost(a)
);
kernel!(
    /// As the f32 forward, on bf16 tensor cores, per padded head dim.
    FORWARD_BF16 = "attention_wmma"
        / ["attention_forward_bf16_d32", "attention_forward_bf16_d64", "attention_forward_bf16_d96", "attention_forward_bf16_d128"],
    Attention, tensor_cores, |a| forward_cost(a)
);
kernel!(
    /// As the f32 dk/dv kernel, on bf16 tensor cores.
    DKDV_BF16 = "attention_wmma"
        / [
            "attention_backward_dkdv_bf16_d32",
            "attention_backward_dkdv_bf16_d64",
            "attention_backward_dkdv_bf16_d96",
            "attention_backward_dkdv_bf16_d128"
        ],
    Attention, tensor_cores, |a| dkdv_cost(a)
);
kernel!(
    /// As the f32 dq kernel, on bf16 tensor cores.
    DQ_BF16 = "attention_wmma"
        / [
            "attention_backward_dq_bf16_d32",
            "attention_backward_dq_bf16_d64",
            "attention_backward_dq_bf16_d96",
            "attention_backward_dq_bf16_d128"
        ],
    Attention, tensor_cores, |a| dq_cost(a)
);

/// Blocks of the delta pre-pass per multiprocessor (the kernel strides over rows).
const DOT_BLOCKS_PER_SM: usize = 32;

/// The kernels of one call: the forward, dk/dv and dq kernels, with the rows per block and
/// the threads of each.
struct Kernels {
    forward: (&'static KernelCost, usize, u32),
    dkdv: (&'static KernelCost, usize, u32),
    dq: (&'static KernelCost, usize, u32),
}

impl Kernels {
    fn pick(cuda: &Cuda, op: &'static str, s: &AttentionShape, precision: Precision) -> Result<Kernels> {
        if s.head_dim > ATT_DMAX {
            return Err(Error::invalid(
                op,
                format!("head_dim {} exceeds the {ATT_DMAX} the CUDA attention kernels take", s.head_dim),
            ));
        }
        if [s.batch, s.seq, s.heads, s.kv_heads].iter().any(|&v| v >= 1 << 31) {
            return Err(Error::invalid(op, format!("{s:?} exceeds the 2^31 limit of the CUDA attention kernels")));
        }
        if precision == Precision::Full {
            let rows = ATT_F32_ROWS;
            return Ok(Kernels {
                forward: (&FORWARD_F32, rows, 128),
                dkdv: (&DKDV_F32, rows, 128),
                dq: (&DQ_F32, rows, 128),
            });
        }
        if cuda.compute_capability.0 < 8 {
            let (major, minor) = cuda.compute_capability;
            return Err(Error::invalid(
                op,
                format!("bf16 attention runs on bf16 tensor cores (compute capability 8.0+); this device is {major}.{minor}"),
            ));
        }
        // Head dims padded to 32, 64, 96 or 128 (head_dim <= ATT_DMAX = 128, checked above).
        let variant = (s.head_dim.div_ceil(32).max(1) - 1).min(3);
        Ok(Kernels {
            forward: (&FORWARD_BF16[variant], ATT_BF16_FWD_ROWS, 128),
            dkdv: (&DKDV_BF16[variant], ATT_BF16_TILE, 64),
            dq: (&DQ_BF16[variant], ATT_BF16_TILE, 64),
        })
    }
}

/// One block per tile of `rows` positions of each (sequence, head) pair, `heads` being
/// query heads or KV heads; grid.x holds them all (tile fastest).
fn tile_config(
    op: &'static str,
    s: &AttentionShape,
    heads: usize,
    (_, rows, threads): (&KernelCost, usize, u32),
) -> Result<LaunchConfig> {
    let blocks = s
        .seq
        .div_ceil(rows)
        .checked_mul(heads)
        .and_then(|v| v.checked_mul(s.batch))
        .filter(|&v| v <= i32::MAX as usize)
        .ok_or_else(|| Error::invalid(op, format!("{s:?} needs more than 2^31 blocks")))?;
    Ok(LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 })
}

/// The kernels' mask arguments: `causal` (1 or 0) and the lengths' address (0 when causal).
fn mask_args(mask: AttentionMask<'_, Cuda>) -> (u32, u64) {
    match mask {
        AttentionMask::Causal => (1, 0),
        AttentionMask::Padding(lengths) => (0, lengths.ptr()),
    }
}

impl AttentionOps for Cuda {
    fn attention_forward<F: Real>(
        &self,
        shape: &AttentionShape,
        mask: AttentionMask<'_, Self>,
        precision: Precision,
        q: &CudaBuf<F>,
        k: &CudaBuf<F>,
        v: &CudaBuf<F>,
        out: &mut CudaBuf<F>,
        stats: &mut CudaBuf<F>,
    ) -> Result<()> {
        const OP: &str = "attention_forward";
        require_f32::<F>(OP)?;
        let n = check_attention_forward(self, shape, mask, [q, k, v, out, stats])?;
        if n.rows == 0 {
            return Ok(());
        }
        let kern = Kernels::pick(self, OP, shape, precision)?;
        let cfg = tile_config(OP, shape, shape.heads, kern.forward)?;
        let (causal, lp) = mask_args(mask);
        let (qp, kp, vp, op, sp) = (q.ptr(), k.ptr(), v.ptr(), out.ptr_mut(), stats.ptr_mut());
        let s = shape;
        let (b, t, h, kvh, d) = (s.batch as u32, s.seq as u32, s.heads as u32, s.kv_heads as u32, s.head_dim as u32);
        let scale = s.scale();
        let sizes = [s.batch, s.seq, s.heads, s.kv_heads, s.head_dim, causal as usize].map(|v| v as u64);
        // SAFETY: attention_forward_*(const float* q, const float* k, const float* v, float* out,
        // float* stats, const u32* lengths, u32 batch, u32 seq, u32 heads, u32 kv_heads,
        // u32 head_dim, float scale, u32 causal): q and out hold batch * seq * heads * head_dim,
        // k and v batch * seq * kv_heads * head_dim, stats 2 * batch * heads * seq and (padding)
        // lengths batch elements (checked above); head_dim <= 128 and the sizes fit u32
        // (Kernels::pick); one block per tile of `rows` queries per (sequence, head) with the
        // threads the kernel's launch bounds name (`kern.forward`); out and stats are distinct
        // from the inputs (&mut).
        unsafe {
            self.launch(
                kern.forward.0,
                cfg,
                &mut kargs![qp, kp, vp, op, sp, lp, b, t, h, kvh, d, scale, causal],
                &sizes,
            )
        }
    }

    fn attention_backward<F: Real>(
        &self,
        shape: &AttentionShape,
        mask: AttentionMask<'_, Self>,
        precision: Precision,
        q: &CudaBuf<F>,
        k: &CudaBuf<F>,
        v: &CudaBuf<F>,
        out: &CudaBuf<F>,
        stats: &CudaBuf<F>,
        dout: &CudaBuf<F>,
        grads: AttentionGrads<'_, Self, F>,
    ) -> Result<()> {
        const OP: &str = "attention_backward";
        require_f32::<F>(OP)?;
        let bufs = [q, k, v, out, stats, dout, &*grads.dq, &*grads.dk, &*grads.dv];
        let n = check_attention_backward(self, shape, mask, bufs, grads.dv_half.as_deref())?;
        if n.rows == 0 {
            return Ok(());
        }
        let kern = Kernels::pick(self, OP, shape, precision)?;
        let dkdv_cfg = tile_config(OP, shape, shape.kv_heads, kern.dkdv)?;
        let dq_cfg = tile_config(OP, shape, shape.heads, kern.dq)?;
        let (causal, lp) = mask_args(mask);
        let AttentionGrads { dq, dk, dv, dv_half } = grads;
        let (qp, kp, vp, outp, sp, dop) = (q.ptr(), k.ptr(), v.ptr(), out.ptr(), stats.ptr(), dout.ptr());
        let (dqp, dkp, dvp) = (dq.ptr_mut(), dk.ptr_mut(), dv.ptr_mut());
        let dvh = dv_half.map_or(0u64, |h| h.ptr_mut());
        let s = shape;
        let (b, t, h, kvh, d) = (s.batch as u32, s.seq as u32, s.heads as u32, s.kv_heads as u32, s.head_dim as u32);
        let scale = s.scale();
        let sizes = [s.batch, s.seq, s.heads, s.kv_heads, s.head_dim, causal as usize].map(|v| v as u64);
        // The arena holds delta (one f32 per query row) until the three kernels have run: the
        // scratch lock is held to the end of the op.
        let mut scratch = self.lock_scratch();
        let delta = self.arena(&mut scratch, super::attention_backward_arena_words(n.rows))?;
        let blocks = n.rows.div_ceil(8).clamp(1, self.sm_count as usize * DOT_BLOCKS_PER_SM) as u32;
        let dot_cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: attention_backward_dot_f32(const float* out, const float* dout, float* delta,
        // u32 batch, u32 seq, u32 heads, u32 head_dim): out and dout hold batch * seq * heads *
        // head_dim elements (checked above), delta (the arena) rows f32s; one warp per row,
        // striding, 256 threads as the launch bounds.
        unsafe { self.launch(&BACKWARD_DOT, dot_cfg, &mut kargs![outp, dop, delta, b, t, h, d], &sizes)? };
        // SAFETY: attention_backward_dkdv_*(const float* q, const float* k, const float* v,
        // const float* stats, const float* delta, const float* dout, float* dk, float* dv,
        // bf16* dv_half, const u32* lengths, u32 batch, u32 seq, u32 heads, u32 kv_heads,
        // u32 head_dim, float scale, u32 causal): the lengths as in the forward (checked
        // above), delta as written just before, dv_half null or as long as dv (checked above);
        // one block per tile of keys per (sequence, KV head), the threads of the kernel's
        // launch bounds; dk, dv and dv_half are distinct outputs (&mut).
        let [sb, st, sh, skv, sd, sc] = sizes;
        unsafe {
            self.launch(
                kern.dkdv.0,
                dkdv_cfg,
                &mut kargs![qp, kp, vp, sp, delta, dop, dkp, dvp, dvh, lp, b, t, h, kvh, d, scale, causal],
                &[sb, st, sh, skv, sd, sc, u64::from(dvh != 0)],
            )?
        };
        // SAFETY: attention_backward_dq_*(const float* q, const float* k, const float* v,
        // const float* stats, const float* delta, const float* dout, float* dq, const u32* lengths,
        // u32 batch, u32 seq, u32 heads, u32 kv_heads, u32 head_dim, float scale, u32 causal):
        // as above, one block per tile of queries per (sequence, head); dq is distinct (&mut).
        unsafe {
            self.launch(
                kern.dq.0,
                dq_cfg,
                &mut kargs![qp, kp, vp, sp, delta, dop, dqp, lp, b, t, h, kvh, d, scale, causal],
                &sizes,
            )
        }
    }
}
