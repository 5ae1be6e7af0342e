//! The one row-major GEMM helper over cuBLAS, for f32 and for bf16 operands.
//!
//! cuBLAS is column-major. A row-major `(r, c)` matrix with leading dimension `ld`, read
//! column-major, is its `(c, r)` transpose with the same `ld`. So the row-major product
//! `C = op(A) op(B)` is computed as the column-major `C^T = op(B)^T op(A)^T`: B goes first,
//! `m` and `n` swap, each operand keeps its own transpose flag and leading dimension, and
//! offsets and batch strides are unchanged. Everything accumulates in f32 with the handle's
//! default math mode; bf16 operands use `cublasGemmEx` / `cublasGemmStridedBatchedEx` with
//! `CUDA_R_16BF` inputs and an f32 `C` (`CUBLAS_COMPUTE_32F`: tensor cores), or a bf16 `C`
//! (`gemm_bf16_out`: the f32 result rounded once in cuBLAS's epilogue). f32 operands
//! use `CUBLAS_COMPUTE_32F` (exact f32 on FP32 cores, the default, as PyTorch's) or, after
//! [`Cuda::set_tf32`], `CUBLAS_COMPUTE_32F_FAST_TF32` (A and B rounded to TF32, 10 explicit
//! mantissa bits, on tensor cores; f32 accumulation) unless the product asks for exact f32
//! ([`Gemm::exact_f32`]). The ledger records the compute type.
//! `k = 0` is handled by a kernel (`C = beta C`, exact zeros when `beta = 0`), as on the CPU.
//!
//! [`crate::backend::DenseOps::gemm`], `gemm_bf16` and `gemm_bf16_out` for CUDA (dense.rs)
//! are the launchers here, after the op's shared validator; so is `gram_accumulate`, two
//! `cublasSsyrk_v2` calls (f32, `beta = 1`): a row-major `(out, in)` `g` is the column-major
//! `(in, out)` `g^T`, so `g g^T` is `op = T` with `n = out, k = in` and `g^T g` is `op = N`
//! with `n = in, k = out`, both with `lda = in`; a row-major upper triangle is the
//! column-major lower one (`CUBLAS_FILL_MODE_LOWER`).

use super::{cuda_err, dense, require_f32, Cuda, CudaBuf};
use crate::backend::ops::dense::{check_gemm, check_gemm_bf16_out, check_gram_accumulate};
use crate::backend::Gemm;
use crate::error::{Error, Result};
use crate::perf::{BlasRoutine, ElemType, EventKind, GemmCompute};
use crate::scalar::Real;
use cudarc::cublas::sys::{cublasComputeType_t, cublasFillMode_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use half::bf16;
use std::ffi::c_void;

impl Cuda {
    /// Lets every later f32 GEMM of this backend (and its clones) run on TF32 tensor cores
    /// (`CUBLAS_COMPUTE_32F_FAST_TF32`), or restores exact f32 (`false`, the default). bf16
    /// GEMMs are unaffected. Set it before building layers: SparseGrad layers price their
    /// formulation at the rates in effect when they are built.
    pub fn set_tf32(&self, on: bool) {
        self.tf32.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether f32 GEMMs run with TF32 ([`Cuda::set_tf32`]).
    pub fn tf32_enabled(&self) -> bool {
        self.tf32.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// [`crate::backend::DenseOps::gemm`].
pub(super) fn gemm<F: Real>(
    cuda: &Cuda,
    spec: &Gemm,
    a: &CudaBuf<F>,
    b: &CudaBuf<F>,
    c: &mut CudaBuf<F>,
) -> Result<()> {
    require_f32::<F>("gemm")?;
    check_gemm(cuda, spec, a, b, c)?;
    run(cuda, spec, a.ptr(), b.ptr(), c.ptr_mut(), ElemType::F32, ElemType::F32)
}

/// [`crate::backend::DenseOps::gemm_bf16`].
pub(super) fn gemm_bf16<F: Real>(
    cuda: &Cuda,
    spec: &Gemm,
    a: &CudaBuf<bf16>,
    b: &CudaBuf<bf16>,
    c: &mut CudaBuf<F>,
) -> Result<()> {
    require_f32::<F>("gemm_bf16")?;
    check_gemm(cuda, spec, a, b, c)?;
    run(cuda, spec, a.ptr(), b.ptr(), c.ptr_mut(), ElemType::Bf16, ElemType::F32)
}

/// [`crate::backend::DenseOps::gemm_bf16_out`].
pub(super) fn gemm_bf16_out(
    cuda: &Cuda,
    spec: &Gemm,
    a: &CudaBuf<bf16>,
    b: &CudaBuf<bf16>,
    c: &mut CudaBuf<bf16>,
) -> Result<()> {
    check_gemm_bf16_out(cuda, spec, a, b, c)?;
    run(cuda, spec, a.ptr(), b.ptr(), c.ptr_mut(), ElemType::Bf16, ElemType::Bf16)
}

/// [`crate::backend::DenseOps::gram_accumulate`]: `cublasSsyrk_v2` twice (see the module docs).
pub(super) fn gram_accumulate<F: Real>(
    cuda: &Cuda,
    g: &CudaBuf<F>,
    out: usize,
    inp: usize,
    grams: &mut CudaBuf<F>,
) -> Result<()> {
    require_f32::<F>("gram_accumulate")?;
    check_gram_accumulate(cuda, g, out, inp, grams)?;
    if out == 0 || inp == 0 {
        return Ok(());
    }
    let (a, c) = (g.ptr(), grams.ptr_mut());
    // (n, k, op, C) of g g^T and g^T g; C of the second starts after the (out, out) Gram.
    let in_offset = (out * out * std::mem::size_of::<f32>()) as u64;
    for (n, k, trans, c) in [(out, inp, true, c), (inp, out, false, c + in_offset)] {
        syrk(cuda, n, k, trans, a, dim(inp)?, c)?;
    }
    Ok(())
}

/// Column-major `C = op(A) op(A)^T + C` on the lower triangle of the `(n, n)` f32 matrix at
/// `c` (`ldc = n`); `op(A)` is `(n, k)`, A stored `(k, n)` when `trans`, with `lda`.
fn syrk(cuda: &Cuda, n: usize, k: usize, trans: bool, a: u64, lda: i32, c: u64) -> Result<()> {
    let (n_i, k_i) = (dim(n)?, dim(k)?);
    let (alpha, beta) = (1.0f32, 1.0f32);
    cuda.bind()?;
    let blas = cuda.blas.lock().unwrap_or_else(|p| p.into_inner());
    let handle = *blas.handle();
    let event = EventKind::Gemm {
        routine: BlasRoutine::Syrk,
        m: n as u64,
        n: n as u64,
        k: k as u64,
        batch: 1,
        operands: ElemType::F32,
        output: ElemType::F32,
        compute: GemmCompute::F32,
        accumulate: true,
    };
    let timer = cuda.profiler.start_timer(&cuda.ctx, &cuda.stream)?;
    // SAFETY: `check_gram_accumulate` checked that g holds out * in f32 (A: (k, n) or (n, k)
    // column-major with lda = in >= its rows) and grams out^2 + in^2, so C (n, n) with
    // ldc = n at its offset lies inside; alpha/beta point to host f32 (pointer mode host);
    // the handle's stream is the backend's stream.
    let status = unsafe {
        cudarc::cublas::sys::cublasSsyrk_v2(
            handle,
            cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
            op(trans),
            n_i,
            k_i,
            &alpha,
            a as *const f32,
            lda,
            &beta,
            c as *mut f32,
            n_i,
        )
    };
    status.result().map_err(cuda_err("gram_accumulate"))?;
    cuda.profiler.record_launch(event, timer, &cuda.stream)
}

/// cuBLAS's data type for an element type, and its size in bytes.
fn cuda_type(t: ElemType) -> (cudaDataType, usize) {
    match t {
        ElemType::F32 => (cudaDataType::CUDA_R_32F, std::mem::size_of::<f32>()),
        ElemType::Bf16 => (cudaDataType::CUDA_R_16BF, std::mem::size_of::<bf16>()),
    }
}

fn dim(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid("gemm", format!("dimension {v} exceeds cuBLAS's 32-bit limit")))
}

fn stride(v: usize) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::invalid("gemm", format!("stride {v} exceeds cuBLAS's 64-bit limit")))
}

fn op(trans: bool) -> cublasOperation_t {
    if trans {
        cublasOperation_t::CUBLAS_OP_T
    } else {
        cublasOperation_t::CUBLAS_OP_N
    }
}

/// `a`, `b`, `c`: base addresses of buffers that `spec.validate` accepted; `operands` is the
/// A/B element type, `output` C's (bf16 only with bf16 operands).
fn run(cuda: &Cuda, spec: &Gemm, a: u64, b: u64, c: u64, operands: ElemType, output: ElemType) -> Result<()> {
    let (ab_type, ab_size) = cuda_type(operands);
    if spec.m == 0 || spec.n == 0 || spec.batch == 0 {
        return Ok(());
    }
    let (c_type, c_size) = cuda_type(output);
    let c = c + (spec.offset_c * c_size) as u64;
    // k = 0 is C = beta C by our kernel (exact zeros for beta = 0); f32 C only (checked by
    // `check_gemm_bf16_out`).
    if spec.k == 0 {
        return dense::scale_rows(cuda, c, spec.m, spec.n, spec.ldc, spec.batch, spec.stride_c, spec.beta);
    }
    let a = a + (spec.offset_a * ab_size) as u64;
    let b = b + (spec.offset_b * ab_size) as u64;
    let (m, n, k) = (dim(spec.m)?, dim(spec.n)?, dim(spec.k)?);
    let (lda, ldb, ldc) = (dim(spec.lda)?, dim(spec.ldb)?, dim(spec.ldc)?);
    let (alpha, beta) = (spec.alpha, spec.beta);
    let alpha_p = &alpha as *const f32 as *const c_void;
    let beta_p = &beta as *const f32 as *const c_void;
    let gemm_compute = if operands == ElemType::F32 && cuda.tf32_enabled() && !spec.exact_f32 {
        GemmCompute::F32FastTf32
    } else {
        GemmCompute::F32
    };
    let compute = match gemm_compute {
        GemmCompute::F32 => cublasComputeType_t::CUBLAS_COMPUTE_32F,
        GemmCompute::F32FastTf32 => cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
    };
    let algo = cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
    cuda.bind()?;
    let blas = cuda.blas.lock().unwrap_or_else(|p| p.into_inner());
    let handle = *blas.handle();
    // The ledger records the call as cuBLAS receives it (column-major: m and n swapped).
    let event = EventKind::Gemm {
        routine: BlasRoutine::Gemm,
        m: spec.n as u64,
        n: spec.m as u64,
        k: spec.k as u64,
        batch: spec.batch as u64,
        operands,
        output,
        compute: gemm_compute,
        accumulate: spec.beta != 0.0,
    };
    let timer = cuda.profiler.start_timer(&cuda.ctx, &cuda.stream)?;
    let status = if spec.batch == 1 {
        // SAFETY: column-major C^T (n x m, ldc) = op(B)^T (n x k, ldb) op(A)^T (k x m, lda):
        // `Gemm::validate` checked the leading dimensions and that every element this product
        // touches lies inside the three buffers; alpha/beta point to host f32 (pointer mode
        // host, the default); the handle's stream is the backend's stream.
        unsafe {
            cudarc::cublas::sys::cublasGemmEx(
                handle,
                op(spec.trans_b),
                op(spec.trans_a),
                n,
                m,
                k,
                alpha_p,
                b as *const c_void,
                ab_type,
                ldb,
                a as *const c_void,
                ab_type,
                lda,
                beta_p,
                c as *mut c_void,
                c_type,
                ldc,
                compute,
                algo,
            )
        }
    } else {
        let batch = dim(spec.batch)?;
        let (sa, sb, sc) = (stride(spec.stride_a)?, stride(spec.stride_b)?, stride(spec.stride_c)?);
        // SAFETY: as above, for each of the `batch` products at the given element strides
        // (all inside the buffers by `Gemm::validate`).
        unsafe {
            cudarc::cublas::sys::cublasGemmStridedBatchedEx(
                handle,
                op(spec.trans_b),
                op(spec.trans_a),
                n,
                m,
                k,
                alpha_p,
                b as *const c_void,
                ab_type,
                ldb,
                sb,
                a as *const c_void,
                ab_type,
                lda,
                sa,
                beta_p,
                c as *mut c_void,
                c_type,
                ldc,
                sc,
                batch,
                compute,
                algo,
            )
        }
    };
    status.result().map_err(cuda_err("gemm"))?;
    cuda.profiler.record_launch(event, timer, &cuda.stream)
}
