//! Launchers of cuda/dense.cu (casts, bias add and gradient, finiteness count, axpy, fill)
//! and cuda/activation.cu (GELU, SwiGLU). Same checks as the CPU twins in
//! src/backend/cpu/{dense,activation}.rs.

use super::{checked_mul, kargs, require_f32, Cuda, CudaBuf};
use crate::backend::GeluKind;
use crate::error::{check_len, Result};
use crate::scalar::{Elem, Real};
use cudarc::driver::LaunchConfig;
use half::bf16;

/// Blocks per multiprocessor of the memory-bound grid-stride kernels.
const PER_SM: u32 = 16;

pub(super) fn fill<T: Elem>(cuda: &Cuda, buf: &mut CudaBuf<T>, len: usize, value: T) -> Result<()> {
    check_len("fill", "buffer", buf.len, len)?;
    if len == 0 {
        return Ok(());
    }
    let (p, n) = (buf.ptr_mut(), len as u64);
    let cfg = cuda.grid_1d(len, PER_SM);
    // SAFETY (all arms): `transmute_copy` reads exactly size_of::<T>() bytes of a Copy value
    // into an integer of that size; fill_uN(T* buf, u64 n, T value) writes buf[..n], and
    // `buf` holds at least `len` = n elements (checked above).
    match std::mem::size_of::<T>() {
        1 => {
            let v: u8 = unsafe { std::mem::transmute_copy(&value) };
            unsafe { cuda.launch("dense", "fill_u8", cfg, &mut kargs![p, n, v]) }
        }
        2 => {
            let v: u16 = unsafe { std::mem::transmute_copy(&value) };
            unsafe { cuda.launch("dense", "fill_u16", cfg, &mut kargs![p, n, v]) }
        }
        4 => {
            let v: u32 = unsafe { std::mem::transmute_copy(&value) };
            unsafe { cuda.launch("dense", "fill_u32", cfg, &mut kargs![p, n, v]) }
        }
        8 => {
            let v: u64 = unsafe { std::mem::transmute_copy(&value) };
            unsafe { cuda.launch("dense", "fill_u64", cfg, &mut kargs![p, n, v]) }
        }
        _ => Err(crate::Error::UnsupportedDtype { op: "fill", dtype: T::NAME, backend: "cuda" }),
    }
}

pub(super) fn cast_to_bf16<F: Real>(cuda: &Cuda, src: &CudaBuf<F>, dst: &mut CudaBuf<bf16>, len: usize) -> Result<()> {
    require_f32::<F>("cast_to_bf16")?;
    check_len("cast_to_bf16", "source", src.len, len)?;
    check_len("cast_to_bf16", "destination", dst.len, len)?;
    if len == 0 {
        return Ok(());
    }
    let (s, d, n) = (src.ptr(), dst.ptr_mut(), len as u64);
    // SAFETY: cast_f32_to_bf16(const float* src, bf16* dst, u64 n); both hold >= n elements.
    unsafe { cuda.launch("dense", "cast_f32_to_bf16", cuda.grid_1d(len, PER_SM), &mut kargs![s, d, n]) }
}

pub(super) fn cast_from_bf16<F: Real>(
    cuda: &Cuda,
    src: &CudaBuf<bf16>,
    dst: &mut CudaBuf<F>,
    len: usize,
) -> Result<()> {
    require_f32::<F>("cast_from_bf16")?;
    check_len("cast_from_bf16", "source", src.len, len)?;
    check_len("cast_from_bf16", "destination", dst.len, len)?;
    if len == 0 {
        return Ok(());
    }
    let (s, d, n) = (src.ptr(), dst.ptr_mut(), len as u64);
    // SAFETY: cast_bf16_to_f32(const bf16* src, float* dst, u64 n); both hold >= n elements.
    unsafe { cuda.launch("dense", "cast_bf16_to_f32", cuda.grid_1d(len, PER_SM), &mut kargs![s, d, n]) }
}

pub(super) fn add_bias<F: Real>(
    cuda: &Cuda,
    y: &mut CudaBuf<F>,
    bias: &CudaBuf<F>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    require_f32::<F>("add_bias")?;
    check_len("add_bias", "y", y.len, checked_mul("add_bias", rows, cols)?)?;
    check_len("add_bias", "bias", bias.len, cols)?;
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    // The kernel does not stride over columns: grid.x must cover them all.
    let cfg = cuda.grid_2d(rows, cols, 256, i32::MAX as u32);
    let (yp, bp, r, c) = (y.ptr_mut(), bias.ptr(), rows as u64, cols as u64);
    // SAFETY: add_bias_f32(float* y, const float* bias, u64 rows, u64 cols); y holds
    // rows * cols and bias cols elements; grid.x * 256 >= cols.
    unsafe { cuda.launch("dense", "add_bias_f32", cfg, &mut kargs![yp, bp, r, c]) }
}

pub(super) fn bias_grad<F: Real>(
    cuda: &Cuda,
    g: &CudaBuf<F>,
    rows: usize,
    cols: usize,
    db: &mut CudaBuf<F>,
    beta: F,
) -> Result<()> {
    require_f32::<F>("bias_grad")?;
    check_len("bias_grad", "g", g.len, checked_mul("bias_grad", rows, cols)?)?;
    check_len("bias_grad", "db", db.len, cols)?;
    if cols == 0 {
        return Ok(());
    }
    let gx = cols.div_ceil(32);
    let max_chunks = rows.div_ceil(64).clamp(1, 1024);
    let wanted = (cuda.sm_count as usize * 8).div_ceil(gx).clamp(1, max_chunks);
    let rows_per_chunk = rows.div_ceil(wanted).max(1);
    let chunks = rows.div_ceil(rows_per_chunk).max(1);
    let beta = beta.to_f64() as f32;
    let (gp, dbp) = (g.ptr(), db.ptr_mut());
    let (r, c, rpc) = (rows as u64, cols as u64, rows_per_chunk as u64);
    let cfg = LaunchConfig { grid_dim: (gx as u32, chunks as u32, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 };
    let mut scratch = cuda.lock_scratch();
    let partial = if chunks == 1 { 0u64 } else { cuda.arena(&mut scratch, (chunks * cols).div_ceil(2))? };
    // SAFETY: bias_grad_partial_f32(const float* g, u64 rows, u64 cols, u64 rows_per_chunk,
    // float* partial, float* db, float beta): g holds rows * cols, db cols elements; with
    // more than one chunk `partial` holds chunks * cols floats (arena sized above), with one
    // chunk it is not touched. chunks <= 1024 fits grid.y.
    unsafe { cuda.launch("dense", "bias_grad_partial_f32", cfg, &mut kargs![gp, r, c, rpc, partial, dbp, beta]) }?;
    if chunks > 1 {
        let k = chunks as u64;
        // SAFETY: bias_grad_final_f32(const float* partial, u64 chunks, u64 cols, float* db,
        // float beta): partial holds chunks * cols floats, db cols.
        unsafe {
            cuda.launch(
                "dense",
                "bias_grad_final_f32",
                cuda.grid_1d(cols, PER_SM),
                &mut kargs![partial, k, c, dbp, beta],
            )
        }?;
    }
    Ok(())
}

pub(super) fn count_nonfinite<F: Real>(cuda: &Cuda, x: &CudaBuf<F>, len: usize) -> Result<(usize, usize)> {
    require_f32::<F>("count_nonfinite")?;
    check_len("count_nonfinite", "x", x.len, len)?;
    if len == 0 {
        return Ok((0, 0));
    }
    let scratch = cuda.lock_scratch();
    let status = scratch.status.ptr();
    let (one, none) = (1u64, u64::MAX);
    let first_slot = status + 8;
    cuda.memset_zero(status, 8)?;
    // SAFETY: fill_u64(u64* buf, u64 n, u64 value) on status[1..2] (16 status words).
    unsafe { cuda.launch("dense", "fill_u64", cuda.grid_1d(1, 1), &mut kargs![first_slot, one, none]) }?;
    let (xp, n) = (x.ptr(), len as u64);
    // SAFETY: count_nonfinite_f32(const float* x, u64 n, u64* status): x holds n elements,
    // status two words.
    unsafe { cuda.launch("dense", "count_nonfinite_f32", cuda.grid_1d(len, PER_SM), &mut kargs![xp, n, status]) }?;
    let mut out = [0u64; 2];
    cuda.read_device(status, &mut out)?;
    let count = out[0] as usize;
    Ok((count, if count == 0 { 0 } else { out[1] as usize }))
}

pub(super) fn axpy<F: Real>(cuda: &Cuda, alpha: F, x: &CudaBuf<F>, y: &mut CudaBuf<F>, len: usize) -> Result<()> {
    require_f32::<F>("axpy")?;
    check_len("axpy", "x", x.len, len)?;
    check_len("axpy", "y", y.len, len)?;
    if len == 0 {
        return Ok(());
    }
    let (a, xp, yp, n) = (alpha.to_f64() as f32, x.ptr(), y.ptr_mut(), len as u64);
    // SAFETY: axpy_f32(float alpha, const float* x, float* y, u64 n); x, y hold >= n.
    unsafe { cuda.launch("dense", "axpy_f32", cuda.grid_1d(len, PER_SM), &mut kargs![a, xp, yp, n]) }
}

/// `C = beta C` on the (batched, strided) `rows x cols` matrix at `c` (the k = 0 product).
#[allow(clippy::too_many_arguments)]
pub(super) fn scale_rows(
    cuda: &Cuda,
    c: u64,
    rows: usize,
    cols: usize,
    ld: usize,
    batch: usize,
    stride: usize,
    beta: f32,
) -> Result<()> {
    let total = checked_mul("gemm", checked_mul("gemm", rows, cols)?, batch)?;
    if total == 0 {
        return Ok(());
    }
    let (r, n, l, b, s) = (rows as u64, cols as u64, ld as u64, batch as u64, stride as u64);
    // SAFETY: scale_rows_f32(float* c, u64 rows, u64 cols, u64 ld, u64 batch, u64 stride,
    // float beta) touches c[b * stride + r * ld + col] for r < rows, col < cols, b < batch,
    // all inside C by `Gemm::validate`, which the caller ran.
    unsafe { cuda.launch("dense", "scale_rows_f32", cuda.grid_1d(total, PER_SM), &mut kargs![c, r, n, l, b, s, beta]) }
}

pub(super) fn gelu<F: Real>(cuda: &Cuda, x: &CudaBuf<F>, y: &mut CudaBuf<F>, len: usize, kind: GeluKind) -> Result<()> {
    require_f32::<F>("gelu")?;
    check_len("gelu", "x", x.len, len)?;
    check_len("gelu", "y", y.len, len)?;
    if len == 0 {
        return Ok(());
    }
    let name = match kind {
        GeluKind::Erf => "gelu_erf_f32",
        GeluKind::Tanh => "gelu_tanh_f32",
    };
    let (xp, yp, n) = (x.ptr(), y.ptr_mut(), len as u64);
    // SAFETY: gelu_*_f32(const float* x, float* y, u64 n); both hold >= n elements.
    unsafe { cuda.launch("activation", name, cuda.grid_1d(len, PER_SM), &mut kargs![xp, yp, n]) }
}

pub(super) fn gelu_backward<F: Real>(
    cuda: &Cuda,
    x: &CudaBuf<F>,
    dy: &CudaBuf<F>,
    dx: &mut CudaBuf<F>,
    len: usize,
    kind: GeluKind,
) -> Result<()> {
    require_f32::<F>("gelu_backward")?;
    check_len("gelu_backward", "x", x.len, len)?;
    check_len("gelu_backward", "dy", dy.len, len)?;
    check_len("gelu_backward", "dx", dx.len, len)?;
    if len == 0 {
        return Ok(());
    }
    let name = match kind {
        GeluKind::Erf => "gelu_erf_backward_f32",
        GeluKind::Tanh => "gelu_tanh_backward_f32",
    };
    let (xp, dyp, dxp, n) = (x.ptr(), dy.ptr(), dx.ptr_mut(), len as u64);
    // SAFETY: gelu_*_backward_f32(const float* x, const float* dy, float* dx, u64 n); all
    // three hold >= n elements.
    unsafe { cuda.launch("activation", name, cuda.grid_1d(len, PER_SM), &mut kargs![xp, dyp, dxp, n]) }
}

pub(super) fn swiglu<F: Real>(
    cuda: &Cuda,
    gate: &CudaBuf<F>,
    up: &CudaBuf<F>,
    h: &mut CudaBuf<F>,
    len: usize,
) -> Result<()> {
    require_f32::<F>("swiglu")?;
    check_len("swiglu", "gate", gate.len, len)?;
    check_len("swiglu", "up", up.len, len)?;
    check_len("swiglu", "h", h.len, len)?;
    if len == 0 {
        return Ok(());
    }
    let (gp, up, hp, n) = (gate.ptr(), up.ptr(), h.ptr_mut(), len as u64);
    // SAFETY: swiglu_f32(const float* gate, const float* up, float* h, u64 n); all >= n.
    unsafe { cuda.launch("activation", "swiglu_f32", cuda.grid_1d(len, PER_SM), &mut kargs![gp, up, hp, n]) }
}

pub(super) fn swiglu_backward<F: Real>(
    cuda: &Cuda,
    gate: &CudaBuf<F>,
    up: &CudaBuf<F>,
    dh: &CudaBuf<F>,
    d_gate: &mut CudaBuf<F>,
    d_up: &mut CudaBuf<F>,
    len: usize,
) -> Result<()> {
    require_f32::<F>("swiglu_backward")?;
    for (what, l) in [("gate", gate.len), ("up", up.len), ("dh", dh.len), ("d_gate", d_gate.len), ("d_up", d_up.len)] {
        check_len("swiglu_backward", what, l, len)?;
    }
    if len == 0 {
        return Ok(());
    }
    let (gp, upp, dhp, dgp, dup, n) = (gate.ptr(), up.ptr(), dh.ptr(), d_gate.ptr_mut(), d_up.ptr_mut(), len as u64);
    // SAFETY: swiglu_backward_f32(const float* gate, const float* up, const float* dh,
    // float* d_gate, float* d_up, u64 n); all five hold >= n elements.
    unsafe {
        cuda.launch(
            "activation",
            "swiglu_backward_f32",
            cuda.grid_1d(len, PER_SM),
            &mut kargs![gp, upp, dhp, dgp, dup, n],
        )
    }
}
