// Stands in for CUDA's <mma.h> in the emulator build: nvcuda::wmma, the warp matrix
// operations, as far as sparsegrad's kernels use them: 16x16x16 tiles, bf16 matrix_a and
// matrix_b fragments (row or column major), f32 accumulators; fill_fragment,
// load_matrix_sync, store_matrix_sync and mma_sync.
//
// Every op is warp-collective, as on the GPU: each lane hands a descriptor to the scheduler
// (sg_emu::collective, cuda/emu/sg_emu.h) and the op runs once for the warp when all 32
// lanes wait at the same call; otherwise the launch fails with a message naming the op and
// its source line (divergent lanes, a lane that exited, lanes at different WMMA calls).
//
// Fragments. A real GPU spreads a tile over the 32 lanes in an unspecified layout; here
// every lane holds the whole tile (num_elements = 256, x[] in the tile's row-major order).
// Kernels may therefore only apply the same operation to every element (loops over
// num_elements), never interpret an index. To catch kernels that do anyway, mma_sync and
// store_matrix_sync fail unless every lane holds the same contents in the fragments they
// read, and fill_fragment unless every lane passes the same value.
//
// Preconditions checked as CUDA states them: the same pointer, ldm and layout in every
// lane; pointers 256-bit (32-byte) aligned; ldm a multiple of 16 bytes (8 bf16 or 4 floats).
//
// Numerics: d = c + sum_k a_ik b_kj with every bf16 product exact in f32 and the sum over k
// taken in order, rounded to f32 at each step. Tensor cores add in an unspecified order
// with their own rounding, so a GPU may differ in the last bits (tests use tolerances).
#pragma once

#include <stdint.h>
#include <string.h>

#include <type_traits>

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
template <typename Use, int M, int N, int K>
struct Dims;
template <int M, int N, int K>
struct Dims<matrix_a, M, N, K> {
    static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct Dims<matrix_b, M, N, K> {
    static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct Dims<accumulator, M, N, K> {
    static constexpr int rows = M, cols = N;
};
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
    static_assert(M == 16 && N == 16 && K == 16, "the emulator implements 16x16x16 fragments only");
    static_assert(std::is_same<Use, accumulator>::value
                      ? std::is_same<T, float>::value && std::is_same<Layout, void>::value
                      : std::is_same<T, __nv_bfloat16>::value &&
                            (std::is_same<Layout, row_major>::value || std::is_same<Layout, col_major>::value),
                  "the emulator implements bf16 matrix_a / matrix_b (row or column major) and f32 accumulators");

   public:
    using element_type = T;
    static constexpr int rows = detail::Dims<Use, M, N, K>::rows;
    static constexpr int cols = detail::Dims<Use, M, N, K>::cols;
    static constexpr bool col_major_layout = std::is_same<Layout, col_major>::value;
    enum { num_elements = rows * cols };
    T x[num_elements];
};

namespace detail {

using sg_emu::Collective;

template <typename T>
inline float widen(T v) {
    return (float)v;
}
template <>
inline float widen<__nv_bfloat16>(__nv_bfloat16 v) {
    return __bfloat162float(v);
}

// The checks every load and store makes of its arguments; nullptr when they hold.
template <typename D, typename T>
inline const char* check_args(Collective* const* lanes) {
    const D* l0 = static_cast<const D*>(lanes[0]);
    for (int i = 1; i < 32; ++i) {
        const D* li = static_cast<const D*>(lanes[i]);
        if (li->ptr != l0->ptr || li->ldm != l0->ldm || li->col != l0->col)
            return "lanes of the warp passed different pointers, ldm or layouts";
    }
    if ((uintptr_t)l0->ptr % 32 != 0) return "the pointer is not 256-bit (32-byte) aligned";
    if (l0->ldm == 0 || (l0->ldm * sizeof(T)) % 16 != 0) return "ldm is not a positive multiple of 16 bytes";
    return nullptr;
}

// Whether every lane's copy of `frag` (a member pointer of descriptor D) is the same.
template <typename D, typename F>
inline bool uniform(Collective* const* lanes, F* D::*frag) {
    const F* f0 = static_cast<const D*>(lanes[0])->*frag;
    for (int i = 1; i < 32; ++i)
        if (memcmp(static_cast<const D*>(lanes[i])->*frag, f0, sizeof(F)) != 0) return false;
    return true;
}

constexpr const char* kNotUniform =
    "the lanes hold different contents in a fragment (element access that depends on the lane relies on the "
    "fragment layout, which CUDA leaves unspecified)";

template <typename Frag>
struct Fill : Collective {
    Frag* frag;
    typename Frag::element_type value;
    static const char* resolve(Collective* const* lanes) {
        const Fill* l0 = static_cast<const Fill*>(lanes[0]);
        for (int i = 1; i < 32; ++i)
            if (memcmp(&static_cast<const Fill*>(lanes[i])->value, &l0->value, sizeof l0->value) != 0)
                return "lanes of the warp passed different fill values";
        for (int i = 0; i < 32; ++i)
            for (int e = 0; e < Frag::num_elements; ++e) static_cast<Fill*>(lanes[i])->frag->x[e] = l0->value;
        return nullptr;
    }
};

template <typename Frag>
struct Load : Collective {
    Frag* frag;
    const typename Frag::element_type* ptr;
    unsigned ldm;
    bool col;
    static const char* resolve(Collective* const* lanes) {
        using T = typename Frag::element_type;
        if (const char* err = check_args<Load, T>(lanes)) return err;
        const Load* l0 = static_cast<const Load*>(lanes[0]);
        Frag tile;
        for (int r = 0; r < Frag::rows; ++r)
            for (int c = 0; c < Frag::cols; ++c)
                tile.x[r * Frag::cols + c] = l0->col ? l0->ptr[(size_t)c * l0->ldm + r] : l0->ptr[(size_t)r * l0->ldm + c];
        for (int i = 0; i < 32; ++i) *static_cast<Load*>(lanes[i])->frag = tile;
        return nullptr;
    }
};

template <typename Frag>
struct Store : Collective {
    const Frag* frag;
    float* ptr;
    unsigned ldm;
    bool col;
    static const char* resolve(Collective* const* lanes) {
        if (const char* err = check_args<Store, float>(lanes)) return err;
        if (!uniform(lanes, &Store::frag)) return kNotUniform;
        const Store* l0 = static_cast<const Store*>(lanes[0]);
        for (int r = 0; r < Frag::rows; ++r)
            for (int c = 0; c < Frag::cols; ++c)
                (l0->col ? l0->ptr[(size_t)c * l0->ldm + r] : l0->ptr[(size_t)r * l0->ldm + c]) =
                    l0->frag->x[r * Frag::cols + c];
        return nullptr;
    }
};

template <typename Acc, typename A, typename B>
struct Mma : Collective {
    Acc* d;
    const A* a;
    const B* b;
    const Acc* c;
    static const char* resolve(Collective* const* lanes) {
        if (!uniform(lanes, &Mma::a) || !uniform(lanes, &Mma::b) || !uniform(lanes, &Mma::c)) return kNotUniform;
        const Mma* l0 = static_cast<const Mma*>(lanes[0]);
        Acc out;  // d may alias c
        for (int i = 0; i < Acc::rows; ++i)
            for (int j = 0; j < Acc::cols; ++j) {
                float acc = l0->c->x[i * Acc::cols + j];
                for (int k = 0; k < A::cols; ++k)
                    acc += widen(l0->a->x[i * A::cols + k]) * widen(l0->b->x[k * B::cols + j]);
                out.x[i * Acc::cols + j] = acc;
            }
        for (int i = 0; i < 32; ++i) *static_cast<Mma*>(lanes[i])->d = out;
        return nullptr;
    }
};

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename L>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& a, const T& v, const char* file = __builtin_FILE(),
                          int line = __builtin_LINE()) {
    detail::Fill<fragment<Use, M, N, K, T, L>> op;
    op.name = "nvcuda::wmma::fill_fragment";
    op.run = &decltype(op)::resolve;
    op.frag = &a;
    op.value = v;
    sg_emu::collective(&op, file, line);
}

// matrix_a / matrix_b: the layout is the fragment's.
template <typename Use, int M, int N, int K, typename T, typename L>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& a, const T* p, unsigned ldm,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    static_assert(!std::is_same<Use, accumulator>::value, "an accumulator load takes a layout_t");
    detail::Load<fragment<Use, M, N, K, T, L>> op;
    op.name = "nvcuda::wmma::load_matrix_sync";
    op.run = &decltype(op)::resolve;
    op.frag = &a;
    op.ptr = p;
    op.ldm = ldm;
    op.col = fragment<Use, M, N, K, T, L>::col_major_layout;
    sg_emu::collective(&op, file, line);
}

template <int M, int N, int K>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float>& a, const float* p, unsigned ldm, layout_t layout,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    detail::Load<fragment<accumulator, M, N, K, float>> op;
    op.name = "nvcuda::wmma::load_matrix_sync";
    op.run = &decltype(op)::resolve;
    op.frag = &a;
    op.ptr = p;
    op.ldm = ldm;
    op.col = layout == mem_col_major;
    sg_emu::collective(&op, file, line);
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& a, unsigned ldm,
                              layout_t layout, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    detail::Store<fragment<accumulator, M, N, K, float>> op;
    op.name = "nvcuda::wmma::store_matrix_sync";
    op.run = &decltype(op)::resolve;
    op.frag = &a;
    op.ptr = p;
    op.ldm = ldm;
    op.col = layout == mem_col_major;
    sg_emu::collective(&op, file, line);
}

template <int M, int N, int K, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d,
                     const fragment<matrix_a, M, N, K, __nv_bfloat16, LA>& a,
                     const fragment<matrix_b, M, N, K, __nv_bfloat16, LB>& b,
                     const fragment<accumulator, M, N, K, float>& c, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
    using Acc = fragment<accumulator, M, N, K, float>;
    detail::Mma<Acc, fragment<matrix_a, M, N, K, __nv_bfloat16, LA>, fragment<matrix_b, M, N, K, __nv_bfloat16, LB>>
        op;
    op.name = "nvcuda::wmma::mma_sync";
    op.run = &decltype(op)::resolve;
    op.d = &d;
    op.a = &a;
    op.b = &b;
    op.c = &c;
    sg_emu::collective(&op, file, line);
}

}  // namespace wmma
}  // namespace nvcuda
