// selftest.cpp: the emulator's own tests (built by cuda/emu/build.py, run by
// scripts/test-cuda-emu.sh). Every intrinsic the kernels use against hand-computed results,
// then deliberately broken kernels that the emulator must report:
//   - a missing __syncthreads before reading shared memory another warp wrote (seen as the
//     0xff poison: NaN, under the shuffled schedule),
//   - __syncthreads in a divergent branch (two call sites; or some threads exit),
//   - a shuffle by half the warp (the other lanes exit; or a partial mask),
//   - lanes of one warp at different intrinsics,
//   - a block larger than __launch_bounds__,
//   - WMMA (nvcuda::wmma) ops reached by part of a warp, at two call sites, with a lane-
//     dependent fragment element, or from a misaligned pointer,
//   - an out-of-bounds global write and a shared-memory overrun (AddressSanitizer build
//     only: a child process must die with an ASan report naming the kernel).
// Exits non-zero if any check fails.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <string>
#include <vector>

#include <mma.h>

#include "runtime.h"

static int failures = 0;
static int checks = 0;

static void check(bool ok, const std::string& what) {
    ++checks;
    if (!ok) {
        ++failures;
        printf("FAIL %s\n", what.c_str());
    }
}

template <typename... A>
static std::string run(const char* name, void (*f)(A...), void (*thunk)(void**), dim3 grid, dim3 block,
                       std::vector<void*> args, unsigned bounds = 0) {
    (void)f;
    sg_emu::KernelInfo k{name, "selftest", thunk, bounds};
    return sg_emu::launch(k, grid, block, args.data());
}
#define LAUNCH(fn, grid, block, ...) run(#fn, &fn, SG_EMU_THUNK(fn), grid, block, {__VA_ARGS__})
#define LAUNCH_BOUNDED(fn, bounds, grid, block, ...) run(#fn, &fn, SG_EMU_THUNK(fn), grid, block, {__VA_ARGS__}, bounds)

// ---- intrinsics -----------------------------------------------------------------------------

extern "C" __global__ void k_shuffles(float* f_xor, unsigned* u_xor, unsigned long long* q_xor, float* f_up,
                                      unsigned* u_up, unsigned long long* q_up) {
    const unsigned t = threadIdx.x, lane = t & 31;
    const float fv = 1.5f * t;
    const unsigned uv = 1000u + t;
    const unsigned long long qv = (1ull << 40) + t;
    for (int o = 1, s = 0; o < 32; o <<= 1, ++s) {
        f_xor[s * 64 + t] = __shfl_xor_sync(0xffffffffu, fv, o);
        u_xor[s * 64 + t] = __shfl_xor_sync(0xffffffffu, uv, o);
        q_xor[s * 64 + t] = __shfl_xor_sync(0xffffffffu, qv, o);
        f_up[s * 64 + t] = __shfl_up_sync(0xffffffffu, fv, (unsigned)o);
        u_up[s * 64 + t] = __shfl_up_sync(0xffffffffu, uv, (unsigned)o);
        q_up[s * 64 + t] = __shfl_up_sync(0xffffffffu, qv, (unsigned)o);
    }
    // width 8: shuffles stay inside groups of 8 lanes
    u_xor[5 * 64 + t] = __shfl_xor_sync(0xffffffffu, uv, 9, 8);
    u_up[5 * 64 + t] = __shfl_up_sync(0xffffffffu, uv, 3u, 8);
    (void)lane;
}

extern "C" __global__ void k_votes(int* any_one, int* any_none, unsigned* match, unsigned long long* match64,
                                   unsigned* rmax, int* pop, int* ffs) {
    const unsigned t = threadIdx.x, lane = t & 31;
    any_one[t] = __any_sync(0xffffffffu, lane == 7 && t < 32);
    any_none[t] = __any_sync(0xffffffffu, false);
    match[t] = __match_any_sync(0xffffffffu, lane % 3u);
    match64[t] = __match_any_sync(0xffffffffu, (unsigned long long)(lane / 8) << 40);
    rmax[t] = __reduce_max_sync(0xffffffffu, (lane * 7919u + t) % 101u);
    __syncwarp();
    pop[t] = __popc(t * 2654435761u);
    ffs[t] = __ffs((int)(t << 3));
}

extern "C" __global__ void k_atomics(float* gf, unsigned* gu, unsigned long long* gq, unsigned* out) {
    __shared__ float sf;
    __shared__ unsigned su, sor, smax;
    __shared__ unsigned long long sq, smin;
    const unsigned t = threadIdx.x;
    if (t == 0) {
        sf = 0.0f;
        su = 0;
        sq = 0;
        sor = 0;
        smax = 0;
        smin = ~0ull;
    }
    __syncthreads();
    atomicAdd(&sf, 0.5f);
    atomicAdd(&su, 2u);
    atomicAdd(&sq, 1ull << 33);
    atomicOr(&sor, 1u << (t % 32));
    atomicMax(&smax, t * 3u);
    atomicMin(&smin, 5000ull - t);
    atomicAdd(gf, 1.0f);
    atomicAdd(gu, t);
    atomicAdd(gq, 3ull);
    atomicOr(&gu[1], 1u << (t % 7));
    atomicMax(&gu[2], t);
    atomicMin(&gq[1], 100ull + t);
    __syncthreads();
    if (t == 0) {
        out[0] = (unsigned)sf;
        out[1] = su;
        out[2] = (unsigned)(sq >> 33);
        out[3] = sor;
        out[4] = smax;
        out[5] = (unsigned)smin;
    }
}

// Indices: a 3-D grid of 3-D blocks; each thread writes its linear global id once.
extern "C" __global__ void k_indices(unsigned* out, unsigned* dims) {
    const unsigned bx = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const unsigned tx = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const unsigned id = bx * (blockDim.x * blockDim.y * blockDim.z) + tx;
    out[id] += id + 1;
    if (id == 0) {
        dims[0] = gridDim.x, dims[1] = gridDim.y, dims[2] = gridDim.z;
        dims[3] = blockDim.x, dims[4] = blockDim.y, dims[5] = blockDim.z;
    }
}

// Barriers: thread t reads what thread 255 - t wrote, twice with different data.
extern "C" __global__ void k_barrier(unsigned* out) {
    __shared__ unsigned s[256];
    const unsigned t = threadIdx.x;
    s[t] = t * 10u;
    __syncthreads();
    unsigned a = s[255 - t];
    __syncthreads();
    s[t] = a + 1u;
    __syncthreads();
    out[t] = s[(t + 1) % 256];
}

extern "C" __global__ void k_shared_poison(float* out, unsigned* out_u) {
    __shared__ float f[4];
    __shared__ unsigned u[4];
    out[threadIdx.x] = f[threadIdx.x];
    out_u[threadIdx.x] = u[threadIdx.x];
    __syncthreads();
    if (threadIdx.x == 0) f[0] = 1.0f, u[0] = 1u;  // poisoned again before the next block
}

extern "C" __global__ void k_bf16(const float* in, unsigned short* out, float* back, unsigned n) {
    for (unsigned i = threadIdx.x; i < n; i += blockDim.x) {
        out[i] = __float2bfloat16_rn(in[i]).__x;
        __nv_bfloat162 two = __floats2bfloat162_rn(in[i], -in[i]);
        const float2 f2 = __bfloat1622float2(two);
        back[i] = f2.x == __bfloat162float(__float2bfloat16_rn(in[i])) ? f2.y : 12345.0f;
    }
}

// WMMA: warp 0 computes d = a b + c with a row-major, b column-major, c loaded row-major,
// staged through shared memory, and stores d row-major; warp 1 uses a row-major b, loads c
// column-major from global memory, doubles every element (a layout-independent op) and
// stores column-major; both also store a filled fragment (7.5 everywhere).
extern "C" __global__ void k_wmma(const __nv_bfloat16* a, const __nv_bfloat16* b_col, const __nv_bfloat16* b_row,
                                  const float* c, float* d0, float* d1, float* filled) {
    using namespace nvcuda;
    __shared__ __align__(32) __nv_bfloat16 sa[256];
    __shared__ __align__(32) __nv_bfloat16 sb[256];
    __shared__ __align__(32) float sc[256];
    const unsigned t = threadIdx.x, warp = t / 32;
    for (unsigned i = t; i < 256; i += blockDim.x) sa[i] = a[i], sb[i] = b_col[i], sc[i] = c[i];
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::load_matrix_sync(fa, sa, 16);
    if (warp == 0) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, sb, 16);
        wmma::load_matrix_sync(acc, sc, 16, wmma::mem_row_major);
        wmma::mma_sync(acc, fa, fb, acc);
        wmma::store_matrix_sync(d0, acc, 16, wmma::mem_row_major);
    } else {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, b_row, 16);
        wmma::load_matrix_sync(acc, c, 16, wmma::mem_col_major);
        wmma::mma_sync(acc, fa, fb, acc);
        for (int i = 0; i < acc.num_elements; ++i) acc.x[i] *= 2.0f;
        wmma::store_matrix_sync(d1, acc, 16, wmma::mem_col_major);
    }
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> f;
    wmma::fill_fragment(f, 7.5f);
    wmma::store_matrix_sync(filled + warp * 256, f, 16, wmma::mem_row_major);
}

// ---- broken kernels ---------------------------------------------------------------------------

// Warp w reads the value lane 0 of warp w + 1 wrote, with no barrier in between.
extern "C" __global__ void broken_missing_barrier(float* out) {
    __shared__ float s[8];
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) s[warp] = (float)warp + 1.0f;
    out[threadIdx.x] = s[(warp + 1) % 8];
}

extern "C" __global__ void broken_barrier_two_sites(float* out) {
    if (threadIdx.x < 128) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1.0f;
}

extern "C" __global__ void broken_barrier_some_exit(float* out) {
    if (threadIdx.x >= 96) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

extern "C" __global__ void broken_half_warp_shuffle(float* out) {
    const unsigned lane = threadIdx.x % 32;
    if (lane >= 16) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (float)lane, 1);
}

extern "C" __global__ void broken_partial_mask(float* out) {
    const unsigned lane = threadIdx.x % 32;
    float v = (float)lane;
    if (lane < 16) v = __shfl_xor_sync(0x0000ffffu, v, 1);
    __syncwarp();
    out[threadIdx.x] = v;
}

extern "C" __global__ void broken_mixed_intrinsics(float* out) {
    const unsigned lane = threadIdx.x % 32;
    float v = (float)lane;
    if (lane < 16) {
        v = __shfl_xor_sync(0xffffffffu, v, 1);
    } else {
        v = (float)__any_sync(0xffffffffu, v > 20.0f);
    }
    out[threadIdx.x] = v;
}

extern "C" __global__ void broken_oob_write(float* out, unsigned long long n) {
    const unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i] = 1.0f;  // should be i < n
}

// Thread t writes s[t + 1]: the last thread one past the end of the shared array.
extern "C" __global__ void broken_shared_overrun(float* out) {
    __shared__ float s[64];
    float* p = s;  // through a pointer, as the kernels' helpers take their shared memory
    p[threadIdx.x + 1] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = s[threadIdx.x];
}

// Lanes 16..31 exit before the warp's mma_sync.
extern "C" __global__ void broken_wmma_half_warp(const __nv_bfloat16* a, float* d) {
    using namespace nvcuda;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::load_matrix_sync(fa, a, 16);
    wmma::load_matrix_sync(fb, a, 16);
    wmma::fill_fragment(acc, 0.0f);
    if (threadIdx.x % 32 >= 16) return;
    wmma::mma_sync(acc, fa, fb, acc);
    wmma::store_matrix_sync(d, acc, 16, wmma::mem_row_major);
}

// Each lane writes its lane id into element 0: meaningful only with a known layout.
extern "C" __global__ void broken_wmma_lane_element(float* d) {
    using namespace nvcuda;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 1.0f);
    acc.x[0] = (float)(threadIdx.x % 32);
    wmma::store_matrix_sync(d, acc, 16, wmma::mem_row_major);
}

// The same load from two call sites (lanes split by parity).
extern "C" __global__ void broken_wmma_two_sites(const __nv_bfloat16* a, float* d) {
    using namespace nvcuda;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
    if (threadIdx.x % 2) {
        wmma::load_matrix_sync(fa, a, 16);
    } else {
        wmma::load_matrix_sync(fa, a, 16);
    }
    d[threadIdx.x] = __bfloat162float(fa.x[0]);
}

// A load from an address 2 bytes past a 32-byte boundary.
extern "C" __global__ void broken_wmma_misaligned(const __nv_bfloat16* a, float* d) {
    using namespace nvcuda;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, a + 1, 16);
    d[threadIdx.x] = __bfloat162float(fa.x[0]);
}

static bool contains(const std::string& s, const char* what) { return s.find(what) != std::string::npos; }

static void expect_error(const std::string& err, const char* kernel, const char* what, const char* label) {
    check(contains(err, kernel) && contains(err, what),
          std::string(label) + ": expected an error naming " + kernel + " and " + what + ", got \"" + err + "\"");
    if (!err.empty()) printf("  caught %s: %s\n", label, err.c_str());
}

static int oob_child(const char* which) {
    const unsigned long long n = 1000;
    float* out = static_cast<float*>(malloc(n * sizeof(float)));
    void* a0 = &out;
    void* a1 = (void*)&n;
    std::string err = strcmp(which, "global") == 0
                          ? LAUNCH(broken_oob_write, (dim3{4, 1, 1}), (dim3{256, 1, 1}), a0, a1)
                          : LAUNCH(broken_shared_overrun, (dim3{1, 1, 1}), (dim3{64, 1, 1}), a0);
    free(out);
    printf("child finished without a report: %s\n", err.c_str());
    return 0;
}

int main(int argc, char** argv) {
    if (argc > 2 && strcmp(argv[1], "--oob-child") == 0) return oob_child(argv[2]);

    {  // shuffles
        std::vector<float> fx(6 * 64), fu(5 * 64);
        std::vector<unsigned> ux(6 * 64), uu(6 * 64);
        std::vector<unsigned long long> qx(5 * 64), qu(5 * 64);
        float *p0 = fx.data(), *p3 = fu.data();
        unsigned *p1 = ux.data(), *p4 = uu.data();
        unsigned long long *p2 = qx.data(), *p5 = qu.data();
        std::string err = LAUNCH(k_shuffles, (dim3{1, 1, 1}), (dim3{64, 1, 1}), &p0, &p1, &p2, &p3, &p4, &p5);
        check(err.empty(), "k_shuffles ran: " + err);
        bool ok = true;
        for (int s = 0, o = 1; s < 5; ++s, o <<= 1)
            for (unsigned t = 0; t < 64; ++t) {
                const unsigned lane = t & 31, w = t & ~31u;
                const unsigned x = w + (lane ^ o), u = lane >= (unsigned)o ? t - o : t;
                ok &= fx[s * 64 + t] == 1.5f * x && ux[s * 64 + t] == 1000u + x && qx[s * 64 + t] == (1ull << 40) + x;
                ok &= fu[s * 64 + t] == 1.5f * u && uu[s * 64 + t] == 1000u + u && qu[s * 64 + t] == (1ull << 40) + u;
            }
        check(ok, "__shfl_xor_sync / __shfl_up_sync on f32, u32, u64 for offsets 1..16");
        ok = true;
        for (unsigned t = 0; t < 64; ++t) {
            const unsigned seg = t & ~7u, l = t & 7u;
            const unsigned x = (l ^ 9u) < 8 ? seg + (l ^ 9u) : t;
            const unsigned u = l >= 3 ? t - 3 : t;
            ok &= ux[5 * 64 + t] == 1000u + x && uu[5 * 64 + t] == 1000u + u;
        }
        check(ok, "shuffles with width 8");
    }
    {  // votes, match, reduce, popc, ffs
        const unsigned n = 64;
        std::vector<int> a1(n), a0(n), pop(n), ffs(n);
        std::vector<unsigned> m(n), rmax(n);
        std::vector<unsigned long long> m64(n);
        int *p0 = a1.data(), *p1 = a0.data(), *p5 = pop.data(), *p6 = ffs.data();
        unsigned *p2 = m.data(), *p4 = rmax.data();
        unsigned long long* p3 = m64.data();
        std::string err = LAUNCH(k_votes, (dim3{1, 1, 1}), (dim3{n, 1, 1}), &p0, &p1, &p2, &p3, &p4, &p5, &p6);
        check(err.empty(), "k_votes ran: " + err);
        bool any_ok = true, match_ok = true, max_ok = true, bits_ok = true;
        for (unsigned t = 0; t < n; ++t) {
            const unsigned lane = t & 31;
            any_ok &= a1[t] == (t < 32 ? 1 : 0) && a0[t] == 0;
            unsigned want = 0, want64 = 0, mx = 0;
            for (unsigned j = 0; j < 32; ++j) {
                if (j % 3 == lane % 3) want |= 1u << j;
                if (j / 8 == lane / 8) want64 |= 1u << j;
                mx = std::max(mx, (j * 7919u + (t & ~31u) + j) % 101u);
            }
            match_ok &= m[t] == want && m64[t] == want64;
            max_ok &= rmax[t] == mx;
            bits_ok &= pop[t] == __builtin_popcount(t * 2654435761u) && ffs[t] == (t == 0 ? 0 : __builtin_ctz(t) + 4);
        }
        check(any_ok, "__any_sync");
        check(match_ok, "__match_any_sync on u32 and u64");
        check(max_ok, "__reduce_max_sync");
        check(bits_ok, "__popc / __ffs");
    }
    {  // atomics on shared and global memory
        float gf = 0.0f;
        unsigned gu[3] = {0, 0, 0};
        unsigned long long gq[2] = {0, ~0ull};
        unsigned out[6] = {};
        float* p0 = &gf;
        unsigned *p1 = gu, *p3 = out;
        unsigned long long* p2 = gq;
        std::string err = LAUNCH(k_atomics, (dim3{2, 1, 1}), (dim3{256, 1, 1}), &p0, &p1, &p2, &p3);
        check(err.empty(), "k_atomics ran: " + err);
        check(out[0] == 128 && out[1] == 512 && out[2] == 256 && out[3] == 0xffffffffu && out[4] == 765 &&
                  out[5] == 4745,
              "shared atomicAdd f32/u32/u64, atomicOr, atomicMax, atomicMin");
        check(gf == 512.0f && gu[0] == 2 * (255 * 256 / 2) && gu[1] == 0x7f && gu[2] == 255 && gq[0] == 3 * 512 &&
                  gq[1] == 100,
              "global atomicAdd f32/u32/u64, atomicOr, atomicMax, atomicMin");
    }
    {  // indices
        const dim3 grid{3, 2, 2}, block{4, 8, 2};
        const unsigned total = 3 * 2 * 2 * 4 * 8 * 2;
        std::vector<unsigned> out(total, 0), dims(6, 0);
        unsigned *p0 = out.data(), *p1 = dims.data();
        std::string err = LAUNCH(k_indices, grid, block, &p0, &p1);
        check(err.empty(), "k_indices ran: " + err);
        bool ok = true;
        for (unsigned i = 0; i < total; ++i) ok &= out[i] == i + 1;
        check(ok, "threadIdx / blockIdx cover a 3-D grid of 3-D blocks exactly once");
        check(dims[0] == 3 && dims[1] == 2 && dims[2] == 2 && dims[3] == 4 && dims[4] == 8 && dims[5] == 2,
              "gridDim / blockDim");
    }
    {  // barriers
        std::vector<unsigned> out(256);
        unsigned* p0 = out.data();
        std::string err = LAUNCH(k_barrier, (dim3{1, 1, 1}), (dim3{256, 1, 1}), &p0);
        check(err.empty(), "k_barrier ran: " + err);
        bool ok = true;
        for (unsigned t = 0; t < 256; ++t) ok &= out[t] == (255 - (t + 1) % 256) * 10u + 1u;
        check(ok, "__syncthreads orders shared memory between warps");
    }
    {  // shared memory poisoned before every block
        std::vector<float> f(8);
        std::vector<unsigned> u(8);
        float* p0 = f.data();
        unsigned* p1 = u.data();
        std::string err = LAUNCH(k_shared_poison, (dim3{2, 1, 1}), (dim3{4, 1, 1}), &p0, &p1);
        check(err.empty(), "k_shared_poison ran: " + err);
        bool ok = true;
        for (int i = 0; i < 4; ++i) ok &= f[i] != f[i] && u[i] == 0xffffffffu;
        check(ok, "__shared__ reads before any write see the poison (NaN / 0xffffffff) in every block");
    }
    {  // bf16 conversions
        auto fb = [](unsigned b) {
            float f;
            memcpy(&f, &b, 4);
            return f;
        };
        const std::vector<std::pair<float, unsigned short>> cases = {
            {1.0f, 0x3f80},          {fb(0x3f808000u), 0x3f80}, {fb(0x3f818000u), 0x3f82}, {fb(0x3f808001u), 0x3f81},
            {fb(0x3f80ffffu), 0x3f81}, {-0.0f, 0x8000},         {fb(0x7f800000u), 0x7f80}, {fb(0xff800000u), 0xff80},
            {fb(0x7f7fffffu), 0x7f80}, {fb(0x7fc00001u), 0x7fff}, {fb(0xffc00000u), 0x7fff}, {fb(0x00018000u), 0x0002},
            {fb(0x00008000u), 0x0000}, {fb(0x80017fffu), 0x8001},
        };
        const unsigned n = (unsigned)cases.size();
        std::vector<float> in(n), back(n);
        std::vector<unsigned short> out(n);
        for (unsigned i = 0; i < n; ++i) in[i] = cases[i].first;
        float *p0 = in.data(), *p2 = back.data();
        unsigned short* p1 = out.data();
        std::string err = LAUNCH(k_bf16, (dim3{1, 1, 1}), (dim3{32, 1, 1}), &p0, &p1, &p2, (void*)&n);
        check(err.empty(), "k_bf16 ran: " + err);
        for (unsigned i = 0; i < n; ++i) {
            char buf[96];
            snprintf(buf, sizeof buf, "bf16 of 0x%08x = 0x%04x (want 0x%04x)", __float_as_uint(in[i]), out[i],
                     cases[i].second);
            check(out[i] == cases[i].second, buf);
        }
    }

    {  // WMMA: small integers and halves, so every product and sum is exact in any order
        auto* a = static_cast<__nv_bfloat16*>(aligned_alloc(64, 256 * 2));
        auto* b_col = static_cast<__nv_bfloat16*>(aligned_alloc(64, 256 * 2));
        auto* b_row = static_cast<__nv_bfloat16*>(aligned_alloc(64, 256 * 2));
        auto* c = static_cast<float*>(aligned_alloc(64, 256 * 4));
        auto* d0 = static_cast<float*>(aligned_alloc(64, 256 * 4));
        auto* d1 = static_cast<float*>(aligned_alloc(64, 256 * 4));
        auto* filled = static_cast<float*>(aligned_alloc(64, 512 * 4));
        float fa[256], fb[256], fc[256];
        for (int i = 0; i < 16; ++i)
            for (int j = 0; j < 16; ++j) {
                fa[i * 16 + j] = (float)((i * 3 + j * 5) % 7) - 3.0f;   // a(i, j)
                fb[i * 16 + j] = (float)((i * 7 + j) % 5) * 0.5f - 1.0f;  // b(k = i, n = j)
                fc[i * 16 + j] = (float)(i - j);                          // c(i, j)
            }
        for (int i = 0; i < 16; ++i)
            for (int j = 0; j < 16; ++j) {
                a[i * 16 + j] = __float2bfloat16_rn(fa[i * 16 + j]);
                b_row[i * 16 + j] = __float2bfloat16_rn(fb[i * 16 + j]);
                b_col[j * 16 + i] = __float2bfloat16_rn(fb[i * 16 + j]);
                c[j * 16 + i] = fc[i * 16 + j];  // column-major for warp 1
            }
        std::vector<float> want(256);
        for (int i = 0; i < 16; ++i)
            for (int j = 0; j < 16; ++j) {
                float s = fc[i * 16 + j];
                for (int k = 0; k < 16; ++k) s += fa[i * 16 + k] * fb[k * 16 + j];
                want[i * 16 + j] = s;
            }
        // Warp 0 reads c row-major from the same buffer, so it sees c^T: its own expectation.
        std::vector<float> want0(256);
        for (int i = 0; i < 16; ++i)
            for (int j = 0; j < 16; ++j) {
                float s = fc[j * 16 + i];
                for (int k = 0; k < 16; ++k) s += fa[i * 16 + k] * fb[k * 16 + j];
                want0[i * 16 + j] = s;
            }
        for (int i = 0; i < 256; ++i) d0[i] = d1[i] = -1e30f;
        for (int i = 0; i < 512; ++i) filled[i] = 0.0f;
        void *p0 = a, *p1 = b_col, *p2 = b_row, *p3 = c, *p4 = d0, *p5 = d1, *p6 = filled;
        std::string err =
            LAUNCH(k_wmma, (dim3{1, 1, 1}), (dim3{64, 1, 1}), &p0, &p1, &p2, &p3, &p4, &p5, &p6);
        check(err.empty(), "k_wmma ran: " + err);
        bool ok0 = true, ok1 = true, okf = true;
        for (int i = 0; i < 16; ++i)
            for (int j = 0; j < 16; ++j) {
                ok0 &= d0[i * 16 + j] == want0[i * 16 + j];
                ok1 &= d1[j * 16 + i] == 2.0f * want[i * 16 + j];
            }
        for (int i = 0; i < 512; ++i) okf &= filled[i] == 7.5f;
        check(ok0, "wmma: shared-memory loads (a row-major, b column-major, c row-major), mma_sync, row-major store");
        check(ok1, "wmma: global loads (b row-major, c column-major), x[i] over num_elements, column-major store");
        check(okf, "wmma: fill_fragment");
        {
            std::vector<float> dd(256 * 4, 0.0f);
            float* pd = dd.data();
            void* pa = a;
            expect_error(LAUNCH(broken_wmma_half_warp, (dim3{1, 1, 1}), (dim3{32, 1, 1}), &pa, &pd),
                         "broken_wmma_half_warp", "nvcuda::wmma::mma_sync", "WMMA by half the warp");
            expect_error(LAUNCH(broken_wmma_lane_element, (dim3{1, 1, 1}), (dim3{32, 1, 1}), &pd),
                         "broken_wmma_lane_element", "different contents", "WMMA fragment element set per lane");
            expect_error(LAUNCH(broken_wmma_two_sites, (dim3{1, 1, 1}), (dim3{32, 1, 1}), &pa, &pd),
                         "broken_wmma_two_sites", "different warp intrinsics", "WMMA load at two call sites");
            expect_error(LAUNCH(broken_wmma_misaligned, (dim3{1, 1, 1}), (dim3{32, 1, 1}), &pa, &pd),
                         "broken_wmma_misaligned", "aligned", "WMMA load from a misaligned pointer");
        }
        for (void* p : {(void*)a, (void*)b_col, (void*)b_row, (void*)c, (void*)d0, (void*)d1, (void*)filled}) free(p);
    }

    // ---- broken kernels must be reported ----
    {
        std::vector<float> out(256, 0.0f);
        float* p0 = out.data();
        std::string err = LAUNCH(broken_missing_barrier, (dim3{1, 1, 1}), (dim3{256, 1, 1}), &p0);
        int poisoned = 0;
        for (float v : out) poisoned += v != v;
        check(err.empty() && poisoned > 0,
              "missing __syncthreads: some reads must see the poison under the shuffled schedule (" +
                  std::to_string(poisoned) + " of 256 did)");
        printf("  caught missing __syncthreads: %d of 256 reads saw poisoned shared memory\n", poisoned);
    }
    std::vector<float> out(256, 0.0f);
    float* p0 = out.data();
    expect_error(LAUNCH(broken_barrier_two_sites, (dim3{1, 1, 1}), (dim3{256, 1, 1}), &p0), "broken_barrier_two_sites",
                 "__syncthreads", "__syncthreads in a divergent branch");
    expect_error(LAUNCH(broken_barrier_some_exit, (dim3{1, 1, 1}), (dim3{256, 1, 1}), &p0), "broken_barrier_some_exit",
                 "__syncthreads", "__syncthreads skipped by exited threads");
    expect_error(LAUNCH(broken_half_warp_shuffle, (dim3{1, 1, 1}), (dim3{64, 1, 1}), &p0), "broken_half_warp_shuffle",
                 "__shfl_xor_sync", "shuffle by half the warp");
    expect_error(LAUNCH(broken_partial_mask, (dim3{1, 1, 1}), (dim3{64, 1, 1}), &p0), "broken_partial_mask",
                 "__shfl_xor_sync", "shuffle with a partial mask");
    expect_error(LAUNCH(broken_mixed_intrinsics, (dim3{1, 1, 1}), (dim3{32, 1, 1}), &p0), "broken_mixed_intrinsics",
                 "__any_sync", "lanes at different intrinsics");
    expect_error(LAUNCH_BOUNDED(k_barrier, 128, (dim3{1, 1, 1}), (dim3{256, 1, 1}), &p0), "k_barrier",
                 "__launch_bounds__", "block above __launch_bounds__");
#if defined(__SANITIZE_ADDRESS__)
    for (const char* which : {"global", "shared"}) {
        const bool global = strcmp(which, "global") == 0;
        const char* report = global ? "heap-buffer-overflow" : "global-buffer-overflow";
        const char* kernel = global ? "broken_oob_write" : "broken_shared_overrun";
        std::string cmd = "UBSAN_OPTIONS=print_stacktrace=1 " + std::string(argv[0]) + " --oob-child " + which + " 2>&1";
        FILE* p = popen(cmd.c_str(), "r");
        std::string text;
        char buf[4096];
        size_t got;
        while (p && (got = fread(buf, 1, sizeof buf, p)) > 0) text.append(buf, got);
        const int status = p ? pclose(p) : -1;
        // UBSan's bounds / object-size checks may see the shared overrun before ASan does:
        // then the report names the source line (selftest.cpp:NNN) instead of the kernel.
        const bool caught = contains(text, report) ? contains(text, kernel)
                                                   : !global && contains(text, "runtime error") &&
                                                         contains(text, "selftest.cpp:");
        check(status != 0 && caught,
              std::string("out-of-bounds ") + which + " write: the child must die with an ASan " + report +
                  " report naming " + kernel);
        printf("  caught out-of-bounds %s write: %s\n", which,
               caught ? text.substr(0, text.find('\n')).c_str() : "NOT caught");
    }
#else
    printf("  out-of-bounds global and shared writes: checked by the AddressSanitizer build (scripts/test-cuda-emu.sh asan)\n");
#endif
    printf("emulator self-test: %d checks, %d failed\n", checks, failures);
    return failures ? 1 : 0;
}
