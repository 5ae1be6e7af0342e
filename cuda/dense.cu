// dense.cu: elementwise and reduction kernels of the dense op family.
//
// Computes (CPU twins in src/backend/cpu/dense.rs, launchers in src/backend/cuda/dense.rs):
//   cast_f32_to_bf16, cast_bf16_to_f32     dst[i] = convert(src[i]) (bf16: round to nearest even)
//   cast_f32_to_bf16_x4, cast_bf16_to_f32_x4
//                                          the same for up to four (src, dst, n) pairs in one
//                                          launch (a layer's saved q, k, v and attention output)
//   add_bias_f32                           y[r, c] += bias[c]
//   bias_grad_partial_f32, bias_grad_final_f32
//                                          db[c] = beta * db[c] + sum_r g[r, c], deterministic
//                                          (fixed row chunks, fixed summation order)
//   count_nonfinite_f32                    number of NaN/inf and the minimum index of one
//   flag_nonfinite_f32                     the same, into the device health block for check
//                                          `id`, only if no earlier check failed (the first
//                                          failed check keeps its name, count and index)
//   cast_f32_to_bf16_checked, copy_f32_checked
//                                          dst[i] = bf16(src[i]) / src[i], flagging src as
//                                          flag_nonfinite_f32 does, in one pass
//   sum_f32_to_f64                         one thread sums x[0..n) in order in f64 (as the
//                                          host's `iter().sum()`), into the health block
//   axpy_f32                               y[i] += alpha * x[i]
//   scale_rows_f32                         C = beta * C on a strided (batched) matrix; the
//                                          k = 0 case of gemm (beta = 0 writes exact zeros)
//   fill_u8 / fill_u16 / fill_u32 / fill_u64
//                                          buf[i] = value (bit pattern of any element type)
//
// Launch shapes: 1-D kernels use SG_THREADS threads and a 64-bit grid-stride loop over
// the element count (in float4 steps when the buffers are 16-byte aligned, plus a scalar
// tail), with the grid capped by the launcher (never more than 2^31-1 blocks in
// x, and y/z never above 65535). add_bias_f32: block 256 along columns, grid.x =
// ceil(cols / 256), grid.y = row groups (grid-stride over rows). bias_grad_partial_f32:
// block (32, 8), grid.x = ceil(cols / 32), grid.y = row chunks (<= 1024); with one chunk it
// writes db directly, otherwise bias_grad_final_f32 (1-D over cols) sums the chunk partials
// in chunk order.
//
// Rounding: products and sums that have a CPU twin use __fmul_rn / __fadd_rn so nvcc does
// not contract them into FMAs, keeping results bit-identical to the CPU where the CPU does
// the same operations in the same order (axpy, bias add, beta scaling).
//
// Tested by tests/cuda_dense.rs (every kernel against the CPU backend on ragged shapes,
// outputs poisoned first); benchmarked by benches/cuda_kernels.rs (GB/s vs a device memcpy).
#include "common.cuh"

extern "C" __global__ void cast_f32_to_bf16(const float* __restrict__ src, __nv_bfloat16* __restrict__ dst, u64 n) {
    sg_vec4_loop(
        n, sg_aligned(src, 16) && sg_aligned(dst, 8),
        [&](u64 i) {
            const float4 v = reinterpret_cast<const float4*>(src)[i];
            __nv_bfloat162* d = reinterpret_cast<__nv_bfloat162*>(dst) + 2 * i;
            d[0] = __floats2bfloat162_rn(v.x, v.y);
            d[1] = __floats2bfloat162_rn(v.z, v.w);
        },
        [&](u64 i) { dst[i] = __float2bfloat16_rn(src[i]); });
}

extern "C" __global__ void cast_bf16_to_f32(const __nv_bfloat16* __restrict__ src, float* __restrict__ dst, u64 n) {
    sg_vec4_loop(
        n, sg_aligned(src, 8) && sg_aligned(dst, 16),
        [&](u64 i) {
            const __nv_bfloat162* s2 = reinterpret_cast<const __nv_bfloat162*>(src) + 2 * i;
            const float2 a = __bfloat1622float2(s2[0]);
            const float2 b = __bfloat1622float2(s2[1]);
            reinterpret_cast<float4*>(dst)[i] = make_float4(a.x, a.y, b.x, b.y);
        },
        [&](u64 i) { dst[i] = __bfloat162float(src[i]); });
}

// Four casts in one launch: the grid strides over each pair in turn (an empty pair costs
// nothing); the same roundings as the single casts.
template <typename S, typename D, typename Convert>
__device__ void cast_x4(const S* s0, D* d0, u64 n0, const S* s1, D* d1, u64 n1, const S* s2, D* d2, u64 n2,
                        const S* s3, D* d3, u64 n3, Convert convert) {
    const S* src[4] = {s0, s1, s2, s3};
    D* dst[4] = {d0, d1, d2, d3};
    const u64 len[4] = {n0, n1, n2, n3};
    for (int p = 0; p < 4; ++p) {
        const S* s = src[p];
        D* d = dst[p];
        sg_vec4_loop(len[p], false, [&](u64) {}, [&](u64 i) { d[i] = convert(s[i]); });
    }
}

extern "C" __global__ void cast_f32_to_bf16_x4(const float* __restrict__ s0, __nv_bfloat16* __restrict__ d0, u64 n0,
                                               const float* __restrict__ s1, __nv_bfloat16* __restrict__ d1, u64 n1,
                                               const float* __restrict__ s2, __nv_bfloat16* __restrict__ d2, u64 n2,
                                               const float* __restrict__ s3, __nv_bfloat16* __restrict__ d3, u64 n3) {
    cast_x4(s0, d0, n0, s1, d1, n1, s2, d2, n2, s3, d3, n3, [](float x) { return __float2bfloat16_rn(x); });
}

extern "C" __global__ void cast_bf16_to_f32_x4(const __nv_bfloat16* __restrict__ s0, float* __restrict__ d0, u64 n0,
                                               const __nv_bfloat16* __restrict__ s1, float* __restrict__ d1, u64 n1,
                                               const __nv_bfloat16* __restrict__ s2, float* __restrict__ d2, u64 n2,
                                               const __nv_bfloat16* __restrict__ s3, float* __restrict__ d3, u64 n3) {
    cast_x4(s0, d0, n0, s1, d1, n1, s2, d2, n2, s3, d3, n3, [](__nv_bfloat16 x) { return __bfloat162float(x); });
}

// grid.x covers columns (256 per block), grid.y strides over rows.
extern "C" __global__ void add_bias_f32(float* y, const float* bias, u64 rows, u64 cols) {
    const u64 c = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    const float b = bias[c];
    for (u64 r = blockIdx.y; r < rows; r += gridDim.y) {
        const u64 i = r * cols + c;
        y[i] = __fadd_rn(y[i], b);
    }
}

// Block (32, 8): threadIdx.x walks columns, threadIdx.y rows. Chunk blockIdx.y covers rows
// [chunk * rows_per_chunk, min((chunk + 1) * rows_per_chunk, rows)). With gridDim.y == 1 the
// sum goes straight to db (with beta); otherwise to partial[chunk * cols + c].
extern "C" __global__ void bias_grad_partial_f32(const float* g, u64 rows, u64 cols, u64 rows_per_chunk,
                                                 float* partial, float* db, float beta) {
    __shared__ float acc[8][33];
    const u64 c = (u64)blockIdx.x * 32 + threadIdx.x;
    const u64 r0 = (u64)blockIdx.y * rows_per_chunk;
    u64 r1 = r0 + rows_per_chunk;
    if (r1 > rows) r1 = rows;
    float s = 0.0f;
    if (c < cols) {
        for (u64 r = r0 + threadIdx.y; r < r1; r += 8) s = __fadd_rn(s, g[r * cols + c]);
    }
    acc[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        float t = acc[0][threadIdx.x];
#pragma unroll
        for (int k = 1; k < 8; ++k) t = __fadd_rn(t, acc[k][threadIdx.x]);
        if (gridDim.y == 1) {
            db[c] = (beta == 0.0f) ? t : __fadd_rn(__fmul_rn(beta, db[c]), t);
        } else {
            partial[(u64)blockIdx.y * cols + c] = t;
        }
    }
}

extern "C" __global__ void bias_grad_final_f32(const float* partial, u64 chunks, u64 cols, float* db, float beta) {
    SG_GRID_STRIDE(c, cols) {
        float t = 0.0f;
        for (u64 k = 0; k < chunks; ++k) t = __fadd_rn(t, partial[k * cols + c]);
        db[c] = (beta == 0.0f) ? t : __fadd_rn(__fmul_rn(beta, db[c]), t);
    }
}

// The scan the finiteness kernels share: this thread's count of NaN/inf in x[0..n), and
// in `first` the smallest index any lane of its warp saw (u64 max if none). `store4` and
// `store1` see every float4 (at index i of the float4 view) and every scalar of the tail, so
// a checked cast or copy writes its output in the same pass.
template <typename Store4, typename Store1>
static __device__ __forceinline__ void nonfinite_scan_store(const float* __restrict__ x, u64 n, bool vec, u64& count,
                                                            u64& first, Store4 store4, Store1 store1) {
    count = 0;
    first = ~0ull;
    auto see = [&](float v, u64 i) {
        if (sg_nonfinite(v)) {
            ++count;
            if (i < first) first = i;
        }
    };
    sg_vec4_loop(
        n, vec,
        [&](u64 i) {
            const float4 v = reinterpret_cast<const float4*>(x)[i];
            see(v.x, 4 * i);
            see(v.y, 4 * i + 1);
            see(v.z, 4 * i + 2);
            see(v.w, 4 * i + 3);
            store4(i, v);
        },
        [&](u64 i) {
            const float v = x[i];
            see(v, i);
            store1(i, v);
        });
    first = sg_warp_min_u64(first);
}

static __device__ __forceinline__ void nonfinite_scan(const float* __restrict__ x, u64 n, u64& count, u64& first) {
    nonfinite_scan_store(x, n, sg_aligned(x, 16), count, first, [](u64, float4) {}, [](u64, float) {});
}

// status[0] += number of non-finite entries; status[1] = min(status[1], first index).
// The launcher sets status = {0, UINT64_MAX} first.
extern "C" __global__ void count_nonfinite_f32(const float* __restrict__ x, u64 n, u64* status) {
    __shared__ u64 red[SG_THREADS / 32];
    u64 count, first;
    nonfinite_scan(x, n, count, first);
    count = sg_block_sum<u64, SG_THREADS>(count, red);
    // One atomic per warp that saw one.
    if ((threadIdx.x & 31) == 0 && first != ~0ull) atomicMin((unsigned long long*)&status[1], (unsigned long long)first);
    if (threadIdx.x == 0 && count != 0) atomicAdd((unsigned long long*)&status[0], (unsigned long long)count);
}

// health: [1] id of the first check that failed (0: none), [2] its count, [3] its first
// index (u64 max until set). Checks run in stream order, so the first one that fails takes
// the slot (atomicCAS) and later ones see another id and leave it.
extern "C" __global__ void flag_nonfinite_f32(const float* __restrict__ x, u64 n, u64 id, u64* health) {
    __shared__ u64 red[SG_THREADS / 32];
    __shared__ u64 firsts[SG_THREADS / 32];
    u64 count, first;
    nonfinite_scan(x, n, count, first);
    sg_flag_block(count, first, id, health, red, firsts);
}

// cast_f32_to_bf16 and flag_nonfinite_f32 of the same x in one pass: a layer's input or
// gradient is checked while it is rounded for its GEMMs.
extern "C" __global__ void cast_f32_to_bf16_checked(const float* __restrict__ src, __nv_bfloat16* __restrict__ dst,
                                                    u64 n, u64 id, u64* health) {
    __shared__ u64 red[SG_THREADS / 32];
    __shared__ u64 firsts[SG_THREADS / 32];
    u64 count, first;
    nonfinite_scan_store(
        src, n, sg_aligned(src, 16) && sg_aligned(dst, 8), count, first,
        [&](u64 i, float4 v) {
            __nv_bfloat162* d = reinterpret_cast<__nv_bfloat162*>(dst) + 2 * i;
            d[0] = __floats2bfloat162_rn(v.x, v.y);
            d[1] = __floats2bfloat162_rn(v.z, v.w);
        },
        [&](u64 i, float v) { dst[i] = __float2bfloat16_rn(v); });
    sg_flag_block(count, first, id, health, red, firsts);
}

// A device copy and flag_nonfinite_f32 of the same x in one pass (an f32 layer saving its
// checked input for backward).
extern "C" __global__ void copy_f32_checked(const float* __restrict__ src, float* __restrict__ dst, u64 n, u64 id,
                                            u64* health) {
    __shared__ u64 red[SG_THREADS / 32];
    __shared__ u64 firsts[SG_THREADS / 32];
    u64 count, first;
    nonfinite_scan_store(
        src, n, sg_aligned(src, 16) && sg_aligned(dst, 16), count, first,
        [&](u64 i, float4 v) { reinterpret_cast<float4*>(dst)[i] = v; }, [&](u64 i, float v) { dst[i] = v; });
    sg_flag_block(count, first, id, health, red, firsts);
}

extern "C" __global__ void sum_f32_to_f64(const float* __restrict__ x, u64 n, double* out) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double s = -0.0;  // the start of Rust's f64 `Sum`
    for (u64 i = 0; i < n; ++i) s = __dadd_rn(s, (double)x[i]);
    *out = s;
}

extern "C" __global__ void axpy_f32(float alpha, const float* __restrict__ x, float* __restrict__ y, u64 n) {
    sg_vec4_loop(
        n, sg_aligned(x, 16) && sg_aligned(y, 16),
        [&](u64 i) {
            const float4 a = reinterpret_cast<const float4*>(x)[i];
            float4 b = reinterpret_cast<float4*>(y)[i];
            b.x = __fadd_rn(b.x, __fmul_rn(alpha, a.x));
            b.y = __fadd_rn(b.y, __fmul_rn(alpha, a.y));
            b.z = __fadd_rn(b.z, __fmul_rn(alpha, a.z));
            b.w = __fadd_rn(b.w, __fmul_rn(alpha, a.w));
            reinterpret_cast<float4*>(y)[i] = b;
        },
        [&](u64 i) { y[i] = __fadd_rn(y[i], __fmul_rn(alpha, x[i])); });
}

// C[b * stride + r * ld + c] = beta == 0 ? 0 : beta * C[...] for r < rows, c < cols,
// b < batch. Grid-stride over the batch * rows * cols logical entries.
extern "C" __global__ void scale_rows_f32(float* c, u64 rows, u64 cols, u64 ld, u64 batch, u64 stride, float beta) {
    const u64 per = rows * cols;
    SG_GRID_STRIDE(i, per * batch) {
        const u64 b = i / per;
        const u64 rem = i - b * per;
        const u64 r = rem / cols;
        const u64 col = rem - r * cols;
        float* p = c + b * stride + r * ld + col;
        *p = (beta == 0.0f) ? 0.0f : __fmul_rn(beta, *p);
    }
}

#define SG_FILL(name, T)                                                    \
    extern "C" __global__ void name(T* buf, u64 n, T value) {               \
        SG_GRID_STRIDE(i, n) { buf[i] = value; }                            \
    }
SG_FILL(fill_u8, u8)
SG_FILL(fill_u16, u16)
SG_FILL(fill_u32, u32)
SG_FILL(fill_u64, u64)
