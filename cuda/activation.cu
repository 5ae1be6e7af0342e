// activation.cu: elementwise activations of the MLP blocks, forward and backward.
//
// Computes (CPU twins in src/backend/cpu/activation.rs, same formulas, same constants
// rounded to f32, same association order):
//   gelu_erf_f32, gelu_tanh_f32                 y = gelu(x)
//   gelu_erf_backward_f32, gelu_tanh_backward_f32  dx = dy * gelu'(x)
//   swiglu_f32                                  h = silu(gate) * up, silu(z) = z / (1 + exp(-z))
//   swiglu_backward_f32                         d_gate = dh * up * silu'(gate), d_up = dh * silu(gate)
//
// Launch shape: 1-D, SG_THREADS threads, 64-bit grid-stride loop over `n`; the launcher
// caps the grid (src/backend/cuda/dense.rs, `grid_1d`).
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

extern "C" __global__ void gelu_erf_f32(const float* x, float* y, u64 n) {
    SG_GRID_STRIDE(i, n) { y[i] = gelu_erf(x[i]); }
}

extern "C" __global__ void gelu_tanh_f32(const float* x, float* y, u64 n) {
    SG_GRID_STRIDE(i, n) { y[i] = gelu_tanh(x[i]); }
}

extern "C" __global__ void gelu_erf_backward_f32(const float* x, const float* dy, float* dx, u64 n) {
    SG_GRID_STRIDE(i, n) { dx[i] = dy[i] * gelu_erf_grad(x[i]); }
}

extern "C" __global__ void gelu_tanh_backward_f32(const float* x, const float* dy, float* dx, u64 n) {
    SG_GRID_STRIDE(i, n) { dx[i] = dy[i] * gelu_tanh_grad(x[i]); }
}

extern "C" __global__ void swiglu_f32(const float* gate, const float* up, float* h, u64 n) {
    SG_GRID_STRIDE(i, n) { h[i] = silu(gate[i]) * up[i]; }
}

extern "C" __global__ void swiglu_backward_f32(const float* gate, const float* up, const float* dh, float* d_gate,
                                               float* d_up, u64 n) {
    SG_GRID_STRIDE(i, n) {
        const float g = gate[i];
        const float u = up[i];
        const float d = dh[i];
        d_gate[i] = d * u * silu_grad(g);
        d_up[i] = d * silu(g);
    }
}
