// activation.cu: elementwise activations of the MLP blocks, forward and backward.
//
// Computes (CPU twins in src/backend/cpu/activation.rs, same formulas, same constants
// rounded to f32, same association order):
//   gelu_erf_f32, gelu_tanh_f32                 y = gelu(x)
//   gelu_erf_backward_f32, gelu_tanh_backward_f32  dx = dy * gelu'(x)
//   swiglu_f32                                  h = silu(gate) * up, silu(z) = z / (1 + exp(-z))
//   swiglu_backward_f32                         d_gate = dh * up * silu'(gate), d_up = dh * silu(gate)
//   swiglu_save_bf16_f32                        swiglu_f32, also storing gate and up rounded to bf16
//                                               (what a bf16 model saves for the backward)
//   swiglu_backward_bf16_f32                    swiglu_backward_f32 on gate and up saved in bf16
//   swiglu_backward_checked_f32                 swiglu_backward_f32, also checking d_gate and d_up
//                                               for NaN/inf as one check `id` (count over both,
//                                               first = smallest element index in either), the
//                                               check of the gate and up projections' output
//                                               gradients folded into the pass that makes them
//   swiglu_backward_bf16_checked                swiglu_backward_bf16_f32 writing d_gate and d_up
//                                               rounded to bf16 over the saved gate and up (each
//                                               element read before it is written, by the same
//                                               thread), checked as above: the bf16 GEMM operands
//                                               of both projections' backward in one pass
//
// Launch shape: 1-D, SG_THREADS threads, 64-bit grid-stride loop over `n` (float4 steps
// when the buffers are 16-byte aligned, then a scalar tail); the launcher caps the grid (src/backend/cuda/dense.rs, `grid_1d`).
//
// erff / tanhf / expf are CUDA's accurate versions (no fast math), which differ from the
// CPU's libm by a few ulp: tests/cuda_activation.rs compares with a relative tolerance.
// Benchmarked (GB/s) by benches/cuda_kernels.rs.
#include "common.cuh"

#define SG_SQRT_2_OVER_PI 0.7978845608028654f
#define SG_GELU_TANH_C 0.044715f
#define SG_FRAC_1_SQRT_2 0.7071067811865476f
#define SG_FRAC_1_SQRT_2PI 0.3989422804014327f

__device__ __forceinline__ float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * SG_FRAC_1_SQRT_2)); }

__device__ __forceinline__ float gelu_tanh(float x) {
    const float inner = SG_SQRT_2_OVER_PI * (x + SG_GELU_TANH_C * x * x * x);
    return 0.5f * x * (1.0f + tanhf(inner));
}

__device__ __forceinline__ float gelu_erf_grad(float x) {
    const float cdf = 0.5f * (1.0f + erff(x * SG_FRAC_1_SQRT_2));
    const float pdf = SG_FRAC_1_SQRT_2PI * expf(-(0.5f * x * x));
    return cdf + x * pdf;
}

__device__ __forceinline__ float gelu_tanh_grad(float x) {
    const float th = tanhf(SG_SQRT_2_OVER_PI * (x + SG_GELU_TANH_C * x * x * x));
    const float d_inner = SG_SQRT_2_OVER_PI * (1.0f + 3.0f * SG_GELU_TANH_C * x * x);
    return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * d_inner;
}

__device__ __forceinline__ float silu(float z) { return z / (1.0f + expf(-z)); }

__device__ __forceinline__ float silu_grad(float z) {
    const float s = 1.0f / (1.0f + expf(-z));
    return s * (1.0f + z * (1.0f - s));
}

// (d_gate, d_up) of one element: dh * up * silu'(gate), dh * silu(gate). Every scalar path
// of the SwiGLU backwards computes it here (the float4 path writes the same products).
__device__ __forceinline__ float2 swiglu_grads(float g, float u, float d) {
    return make_float2(d * u * silu_grad(g), d * silu(g));
}

#define SG_F4 reinterpret_cast<const float4*>
#define SG_F4_MUT reinterpret_cast<float4*>

// y = f(x)
#define SG_UNARY(name, f)                                                                                \
    extern "C" __global__ void name(const float* __restrict__ x, float* __restrict__ y, u64 n) {        \
        sg_vec4_loop(                                                                                    \
            n, sg_aligned(x, 16) && sg_aligned(y, 16),                                                   \
            [&](u64 i) {                                                                                 \
                const float4 v = SG_F4(x)[i];                                                            \
                SG_F4_MUT(y)[i] = make_float4(f(v.x), f(v.y), f(v.z), f(v.w));                           \
            },                                                                                           \
            [&](u64 i) { y[i] = f(x[i]); });                                                             \
    }

// z = f(a, b)
#define SG_BINARY(name, f)                                                                                        \
    extern "C" __global__ void name(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ z, \
                                    u64 n) {                                                                      \
        sg_vec4_loop(                                                                                             \
            n, sg_aligned(a, 16) && sg_aligned(b, 16) && sg_aligned(z, 16),                                       \
            [&](u64 i) {                                                                                          \
                const float4 u = SG_F4(a)[i];                                                                     \
                const float4 v = SG_F4(b)[i];                                                                     \
                SG_F4_MUT(z)[i] = make_float4(f(u.x, v.x), f(u.y, v.y), f(u.z, v.z), f(u.w, v.w));                \
            },                                                                                                    \
            [&](u64 i) { z[i] = f(a[i], b[i]); });                                                                \
    }

__device__ __forceinline__ float gelu_erf_bwd(float x, float dy) { return dy * gelu_erf_grad(x); }
__device__ __forceinline__ float gelu_tanh_bwd(float x, float dy) { return dy * gelu_tanh_grad(x); }
__device__ __forceinline__ float swiglu_fwd(float g, float u) { return silu(g) * u; }

SG_UNARY(gelu_erf_f32, gelu_erf)
SG_UNARY(gelu_tanh_f32, gelu_tanh)
SG_BINARY(gelu_erf_backward_f32, gelu_erf_bwd)
SG_BINARY(gelu_tanh_backward_f32, gelu_tanh_bwd)
SG_BINARY(swiglu_f32, swiglu_fwd)

extern "C" __global__ void swiglu_backward_f32(const float* __restrict__ gate, const float* __restrict__ up,
                                               const float* __restrict__ dh, float* __restrict__ d_gate,
                                               float* __restrict__ d_up, u64 n) {
    const bool vec = sg_aligned(gate, 16) && sg_aligned(up, 16) && sg_aligned(dh, 16) && sg_aligned(d_gate, 16) &&
                     sg_aligned(d_up, 16);
    sg_vec4_loop(
        n, vec,
        [&](u64 i) {
            const float4 g = SG_F4(gate)[i];
            const float4 u = SG_F4(up)[i];
            const float4 d = SG_F4(dh)[i];
            SG_F4_MUT(d_gate)[i] = make_float4(d.x * u.x * silu_grad(g.x), d.y * u.y * silu_grad(g.y),
                                               d.z * u.z * silu_grad(g.z), d.w * u.w * silu_grad(g.w));
            SG_F4_MUT(d_up)[i] = make_float4(d.x * silu(g.x), d.y * silu(g.y), d.z * silu(g.z), d.w * silu(g.w));
        },
        [&](u64 i) {
            const float2 gr = swiglu_grads(gate[i], up[i], dh[i]);
            d_gate[i] = gr.x;
            d_up[i] = gr.y;
        });
}

// One pass instead of swiglu_f32 and two casts: the same h, and the same roundings as
// cast_f32_to_bf16 (round to nearest even).
extern "C" __global__ void swiglu_save_bf16_f32(const float* __restrict__ gate, const float* __restrict__ up,
                                                float* __restrict__ h, __nv_bfloat16* __restrict__ gate_half,
                                                __nv_bfloat16* __restrict__ up_half, u64 n) {
    sg_vec4_loop(
        n, false, [&](u64) {},
        [&](u64 i) {
            const float g = gate[i];
            const float u = up[i];
            h[i] = swiglu_fwd(g, u);
            gate_half[i] = __float2bfloat16_rn(g);
            up_half[i] = __float2bfloat16_rn(u);
        });
}

// swiglu_backward_f32 on gate and up widened from bf16 (exact), so equal to two casts back
// and swiglu_backward_f32, in one pass.
extern "C" __global__ void swiglu_backward_bf16_f32(const __nv_bfloat16* __restrict__ gate_half,
                                                    const __nv_bfloat16* __restrict__ up_half,
                                                    const float* __restrict__ dh, float* __restrict__ d_gate,
                                                    float* __restrict__ d_up, u64 n) {
    sg_vec4_loop(
        n, false, [&](u64) {},
        [&](u64 i) {
            const float2 gr = swiglu_grads(__bfloat162float(gate_half[i]), __bfloat162float(up_half[i]), dh[i]);
            d_gate[i] = gr.x;
            d_up[i] = gr.y;
        });
}

// The grid-stride loop of the checked SwiGLU backwards: `load(i)` gives (gate, up) of
// element i, `store(i, grads)` writes (d_gate, d_up); both outputs are counted as one check
// `id` (see the header). `red` and `firsts` are the kernel's SG_THREADS / 32 shared words.
template <typename Load, typename Store>
__device__ __forceinline__ void swiglu_backward_checked_loop(const float* __restrict__ dh, u64 n, u64 id, u64* health,
                                                             u64* red, u64* firsts, Load load, Store store) {
    u64 count = 0, first = ~0ull;
    SG_GRID_STRIDE(i, n) {
        const float2 gu = load(i);
        const float2 gr = swiglu_grads(gu.x, gu.y, dh[i]);
        store(i, gr);
        const u64 bad = (u64)sg_nonfinite(gr.x) + (u64)sg_nonfinite(gr.y);
        count += bad;
        if (bad != 0 && i < first) first = i;
    }
    sg_flag_block(count, sg_warp_min_u64(first), id, health, red, firsts);
}

// swiglu_backward_f32 with the finiteness check of both outputs (see the header).
extern "C" __global__ void swiglu_backward_checked_f32(const float* __restrict__ gate, const float* __restrict__ up,
                                                       const float* __restrict__ dh, float* __restrict__ d_gate,
                                                       float* __restrict__ d_up, u64 n, u64 id, u64* health) {
    __shared__ u64 red[SG_THREADS / 32];
    __shared__ u64 firsts[SG_THREADS / 32];
    swiglu_backward_checked_loop(
        dh, n, id, health, red, firsts, [&](u64 i) { return make_float2(gate[i], up[i]); },
        [&](u64 i, float2 gr) {
            d_gate[i] = gr.x;
            d_up[i] = gr.y;
        });
}

// swiglu_backward_bf16_f32 into the bf16 saves themselves, rounded, with the check (see the
// header). Not __restrict__: gate_half and up_half are read and then written in place.
extern "C" __global__ void swiglu_backward_bf16_checked(__nv_bfloat16* gate_half, __nv_bfloat16* up_half,
                                                        const float* __restrict__ dh, u64 n, u64 id, u64* health) {
    __shared__ u64 red[SG_THREADS / 32];
    __shared__ u64 firsts[SG_THREADS / 32];
    swiglu_backward_checked_loop(
        dh, n, id, health, red, firsts,
        [&](u64 i) { return make_float2(__bfloat162float(gate_half[i]), __bfloat162float(up_half[i])); },
        [&](u64 i, float2 gr) {
            gate_half[i] = __float2bfloat16_rn(gr.x);
            up_half[i] = __float2bfloat16_rn(gr.y);
        });
}
