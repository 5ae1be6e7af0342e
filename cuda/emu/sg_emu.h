// sg_emu.h: the CUDA device language, as far as sparsegrad's kernels use it, for g++.
//
// `cuda/*.cu` compile unchanged as C++17 with `-include cuda/emu/sg_emu.h` (and
// `-Icuda/emu/include`, whose cuda_bf16.h is empty): every block of a launch runs on the
// host, its threads as cooperative fibers (cuda/emu/runtime.cpp). Thread indices are
// globals that the scheduler sets before it resumes a fiber; warp intrinsics and
// __syncthreads hand control back to the scheduler, which resolves a warp intrinsic when
// all 32 lanes of the warp have reached it and a barrier when every thread of the block has,
// and aborts the launch with a message otherwise (divergent lanes, a partial mask, an
// exited lane, a deadlock). Since the fibers of one launch share one OS thread and launches
// are serialised, atomics are plain read-modify-writes.
//
// Warp matrix operations (nvcuda::wmma, include/mma.h) are warp-collective operations of
// the same scheduler (sg_emu::collective below): each runs once per warp, when all 32 lanes
// have reached the same call.
//
// Numerics: `__f*_rn` are the plain IEEE f32 operations (the build uses -ffp-contract=off,
// so nothing is fused), bf16 conversions round to nearest even bit-exactly (NaN becomes
// the canonical 0x7fff, as cvt.rn.bf16.f32 does), expf/logf/erff/tanhf come from the host
// libm and may differ from CUDA's by a few ulp.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>
#include <utility>

#ifndef SG_EMU_PREPROCESS_ONLY  // the registry generator sees the kernels' own keywords
#define __global__
#define __launch_bounds__(...)
#endif
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
// One static object per kernel-local array: the fake driver serialises launches and
// poisons every such array before each block (see runtime.cpp, "shared memory").
#define __shared__ static

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

// Set by the scheduler for the fiber it resumes (threadIdx) and for the block (the rest).
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;

namespace sg_emu {
enum WarpOp : int { SHFL_XOR = 1, SHFL_UP, ANY, MATCH_ANY, REDUCE_MAX, SYNCWARP, COLLECTIVE };
// Blocks the calling fiber until its warp resolves `op`; returns this lane's result.
uint64_t warp_op(int op, unsigned mask, uint64_t value, unsigned arg, unsigned size, const char* file, int line);
void syncthreads(const char* file, int line);

// A warp-collective operation with semantics of its own (the WMMA ops of include/mma.h).
// Each lane passes its descriptor (the op's arguments and where its result goes); when all
// 32 lanes of the warp wait at the same call site of the same op, the scheduler calls
// `run` once with the descriptors in lane order, then resumes the lanes. `run` returns
// nullptr, or a message (in static storage) that fails the launch.
struct Collective {
    const char* name;
    const char* (*run)(Collective* const* lanes);
};
inline void collective(Collective* op, const char* file, int line) {
    (void)warp_op(COLLECTIVE, 0xffffffffu, (uint64_t)(uintptr_t)op, 0, sizeof(void*), file, line);
}

template <typename T>
inline uint64_t bits_of(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp value type");
    uint64_t b = 0;
    memcpy(&b, &v, sizeof(T));
    return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
    T v;
    memcpy(&v, &b, sizeof(T));
    return v;
}
template <typename T>
inline T shfl_xor(const char* file, int line, unsigned mask, T v, int lane_mask, int width = 32) {
    return from_bits<T>(warp_op(SHFL_XOR, mask, bits_of(v), (unsigned)lane_mask | ((unsigned)width << 16), sizeof(T),
                                file, line));
}
template <typename T>
inline T shfl_up(const char* file, int line, unsigned mask, T v, unsigned delta, int width = 32) {
    return from_bits<T>(
        warp_op(SHFL_UP, mask, bits_of(v), delta | ((unsigned)width << 16), sizeof(T), file, line));
}
template <typename T>
inline unsigned match_any(const char* file, int line, unsigned mask, T v) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "__match_any_sync takes 32- or 64-bit values");
    return (unsigned)warp_op(MATCH_ANY, mask, bits_of(v), 0, sizeof(T), file, line);
}
}  // namespace sg_emu

#define __syncthreads() ::sg_emu::syncthreads(__FILE__, __LINE__)
// A device-wide memory fence: the emulator's blocks share one address space, so a full
// compiler and hardware fence orders this thread's writes before its later atomics.
#define __threadfence() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define __syncwarp(...) ((void)::sg_emu::warp_op(::sg_emu::SYNCWARP, (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 0xffffffffu, 0, 0, 0, __FILE__, __LINE__))
#define __shfl_xor_sync(...) ::sg_emu::shfl_xor(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::sg_emu::shfl_up(__FILE__, __LINE__, __VA_ARGS__)
#define __match_any_sync(mask, v) ::sg_emu::match_any(__FILE__, __LINE__, mask, v)
#define __any_sync(mask, pred) \
    ((int)::sg_emu::warp_op(::sg_emu::ANY, mask, (pred) ? 1u : 0u, 0, 4, __FILE__, __LINE__))
#define __reduce_max_sync(mask, v) \
    ((unsigned)::sg_emu::warp_op(::sg_emu::REDUCE_MAX, mask, (unsigned)(v), 0, 4, __FILE__, __LINE__))

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __float_as_uint(float f) { return sg_emu::bits_of(f) & 0xffffffffu; }
inline float __uint_as_float(unsigned u) { return sg_emu::from_bits<float>(u); }
// A load that bypasses L1 (cache-global); the emulator has one coherent memory.
template <typename T>
inline T __ldcg(const T* p) { return *p; }

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double a) { return sqrt(a); }

inline unsigned atomicAdd(unsigned* p, unsigned v) { unsigned o = *p; *p = o + v; return o; }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    unsigned long long o = *p;
    *p = o + v;
    return o;
}
inline float atomicAdd(float* p, float v) { float o = *p; *p = o + v; return o; }
inline unsigned atomicOr(unsigned* p, unsigned v) { unsigned o = *p; *p = o | v; return o; }
inline unsigned long long atomicOr(unsigned long long* p, unsigned long long v) {
    unsigned long long o = *p;
    *p = o | v;
    return o;
}
inline unsigned atomicMax(unsigned* p, unsigned v) { unsigned o = *p; *p = o > v ? o : v; return o; }
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
    unsigned long long o = *p;
    *p = o < v ? o : v;
    return o;
}
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long compare, unsigned long long v) {
    unsigned long long o = *p;
    if (o == compare) *p = v;
    return o;
}

// ---- bf16 ----------------------------------------------------------------------------------
struct __nv_bfloat16 {
    unsigned short __x;
};
struct __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    const uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fff};  // canonical NaN
    const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);            // round to nearest even
    return __nv_bfloat16{(unsigned short)(rounded >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((uint32_t)h.__x << 16); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return float2{__bfloat162float(h.x), __bfloat162float(h.y)}; }
