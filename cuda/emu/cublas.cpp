// cublas.cpp: a libcublas.so for the emulator: handle create/destroy/stream, and the GEMMs
// sparsegrad calls (cublasGemmEx, cublasGemmStridedBatchedEx with f32 or bf16 A/B, f32 C
// and CUBLAS_COMPUTE_32F, bf16 A/B with bf16 C and CUBLAS_COMPUTE_32F (the f32 result of
// alpha op(A) op(B) + beta C, C widened exactly, rounded to bf16 to nearest even once, as
// cuBLAS's epilogue does), or f32 A/B with CUBLAS_COMPUTE_32F_FAST_TF32; cublasSgemm_v2 and
// cublasSgemmStridedBatched), column-major like cuBLAS, computed by OpenBLAS's cblas_sgemm
// (bf16 operands widened to f32 exactly first; under FAST_TF32, A and B rounded to TF32 first:
// 10 explicit mantissa bits, round to nearest even, as the tensor cores take them, then the
// f32 product, so the emulated result carries TF32's input rounding), and the symmetric
// rank-k update cublasSsyrk_v2 (cblas_ssyrk: only the `uplo` triangle of C is read or
// written). Arguments are validated as cuBLAS does (CUBLAS_STATUS_INVALID_VALUE), and every
// element an operand may touch must lie inside one live device allocation (checked through
// libcuda.so's sgemu_check_range), so a launcher's wrong leading dimension or offset fails
// here instead of reading the neighbouring buffer. Any other cublas* entry point cudarc
// knows is a generated stub (stubs_cublas.cpp) that prints its name and fails. Every GEMM or
// SYRK that passes validation is counted by the emulated device's profiler (profile.h), with
// the handle's math mode (cublasSetMathMode).
//
// SG_EMU_GEMM_ARITHMETIC=0 applies to SYRK as to the GEMMs (only C's triangle gets the
// stand-in values).
//
// SG_EMU_GEMM_ARITHMETIC=0 skips the products (for shape runs of large models, e.g. the
// `gpu_shape` example at LLaMA-7B dimensions): every call is still validated, range-checked
// and counted, and C receives a deterministic pattern of small finite values (so the kernels
// after it run on plausible data) instead of the product. Results are then meaningless;
// counts, sizes and types are not. Never set for correctness tests.
#include <cblas.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <string>
#include <vector>

#define SG_EXPORT extern "C" __attribute__((visibility("default")))

extern "C" int sgemu_check_range(const char* op, unsigned long long p, size_t bytes);
extern "C" void sgemu_lock();
extern "C" void sgemu_unlock();
extern "C" void sgemu_profile_blas(const char* routine, int m, int n, int k, int batch, int a_type, int b_type,
                                   int c_type, int compute, int math);
extern "C" void sgemu_profile_captured(int on);
extern "C" int sgemu_stream_capturing(void* stream);
extern "C" int sgemu_capture_host_node(void* stream, int (*fn)(void*), void* data, void (*destroy)(void*));

namespace {
enum : int { OK = 0, NOT_INITIALIZED = 1, INVALID_VALUE = 7, EXECUTION_FAILED = 13, NOT_SUPPORTED = 15 };
enum : int { R_32F = 0, R_16BF = 14 };
enum : int { COMPUTE_32F = 68, COMPUTE_32F_FAST_TF32 = 77 };

struct Handle {
    void* stream = nullptr;
    int math = 0;  // cublasMath_t, CUBLAS_DEFAULT_MATH
};

int fail(int status, const std::string& msg) {
    fprintf(stderr, "sparsegrad CUDA emulator (cuBLAS): %s\n", msg.c_str());
    return status;
}

size_t elem_size(int type) { return type == R_32F ? 4 : 2; }

bool arithmetic() {
    static const bool on = [] {
        const char* v = getenv("SG_EMU_GEMM_ARITHMETIC");
        return !(v && strcmp(v, "0") == 0);
    }();
    return on;
}

// The stand-in for a product when arithmetic is off: small finite values in [-1/16, 1/16),
// a hash of the element index and a per-call counter, added when beta != 0.
void pattern(float* c, int m, int n, int ldc, float beta) {
    static uint64_t call = 0;
    ++call;
    for (int col = 0; col < n; ++col) {
        float* cc = c + (size_t)col * ldc;
        for (int r = 0; r < m; ++r) {
            uint64_t h = ((uint64_t)col * 0x9E3779B97F4A7C15ull) ^ ((uint64_t)r + call * 0xBF58476D1CE4E5B9ull);
            h ^= h >> 31;
            h *= 0x94D049BB133111EBull;
            h ^= h >> 29;
            const float v = ((float)(h & 0xffff) / 65536.0f - 0.5f) * 0.125f;
            cc[r] = beta == 0.0f ? v : beta * cc[r] + v;
        }
    }
}

// Bytes spanned by a column-major rows x cols operand with leading dimension ld.
size_t span(int rows, int cols, int ld, size_t elem) {
    if (rows == 0 || cols == 0) return 0;
    return ((size_t)(cols - 1) * (size_t)ld + (size_t)rows) * elem;
}

// `x` rounded to TF32 (1 sign, 8 exponent, 10 explicit mantissa bits) to nearest even, kept
// in an f32: the 13 low mantissa bits cleared. Infinities and NaNs pass unchanged (a NaN
// keeps its upper payload bits and quiet bit); a finite value may round up to infinity.
float round_tf32(float x) {
    uint32_t bits;
    memcpy(&bits, &x, 4);
    if ((bits & 0x7f800000u) != 0x7f800000u) {
        bits += 0x0fffu + ((bits >> 13) & 1u);
        bits &= ~0x1fffu;
    }
    memcpy(&x, &bits, 4);
    return x;
}

// An f32 copy of a column-major rows x cols operand (ld kept) of type `type`, each element
// rounded to TF32 when `tf32`.
const float* as_f32(const void* p, int type, int rows, int cols, int ld, bool tf32, std::vector<float>& tmp) {
    const size_t n = span(rows, cols, ld, 1);
    if (type == R_32F) {
        if (!tf32) return static_cast<const float*>(p);
        tmp.resize(n);
        const float* f = static_cast<const float*>(p);
        for (int c = 0; c < cols; ++c)
            for (int r = 0; r < rows; ++r) {
                const size_t i = (size_t)c * ld + r;
                tmp[i] = round_tf32(f[i]);
            }
        return tmp.data();
    }
    tmp.resize(n);
    const uint16_t* h = static_cast<const uint16_t*>(p);
    for (int c = 0; c < cols; ++c) {
        for (int r = 0; r < rows; ++r) {
            const size_t i = (size_t)c * ld + r;
            const uint32_t bits = (uint32_t)h[i] << 16;
            memcpy(&tmp[i], &bits, 4);
        }
    }
    return tmp.data();
}

// One cuBLAS call's arguments, validated; copied into a graph node when captured.
struct GemmCall {
    const char* op;
    int ta, tb, m, n, k;
    float alpha, beta;
    const void* a;
    int a_type, lda;
    long long sa;
    const void* b;
    int b_type, ldb;
    long long sb;
    void* c;
    int c_type, ldc;
    long long sc;
    int batch;
    bool tf32;  // CUBLAS_COMPUTE_32F_FAST_TF32: A and B rounded to TF32
};

// `x` rounded to bf16 to nearest even (NaN kept quiet), as its 16 stored bits.
uint16_t to_bf16(float x) {
    uint32_t bits;
    memcpy(&bits, &x, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

// Runs a validated call: every operand range-checked against the live allocations, then the
// products (or the stand-in pattern when arithmetic is off). A bf16 C is computed in an f32
// copy (read from C only when beta != 0) and rounded back once.
int compute(const GemmCall& g) {
    if (g.m == 0 || g.n == 0 || g.batch == 0) return OK;
    const int a_rows = g.ta ? g.k : g.m, a_cols = g.ta ? g.m : g.k;
    const int b_rows = g.tb ? g.n : g.k, b_cols = g.tb ? g.k : g.n;
    const size_t es = elem_size(g.a_type);
    sgemu_lock();
    int status = OK;
    std::vector<float> ta_tmp, tb_tmp, c_tmp;
    const size_t ces = elem_size(g.c_type);
    for (int i = 0; i < g.batch && status == OK; ++i) {
        const char* ai = static_cast<const char*>(g.a) + (ptrdiff_t)(g.sa * i) * (ptrdiff_t)es;
        const char* bi = static_cast<const char*>(g.b) + (ptrdiff_t)(g.sb * i) * (ptrdiff_t)es;
        char* c_dev = static_cast<char*>(g.c) + (ptrdiff_t)(g.sc * i) * (ptrdiff_t)ces;
        if ((g.k > 0 && (sgemu_check_range(g.op, (uintptr_t)ai, span(a_rows, a_cols, g.lda, es)) ||
                         sgemu_check_range(g.op, (uintptr_t)bi, span(b_rows, b_cols, g.ldb, es)))) ||
            sgemu_check_range(g.op, (uintptr_t)c_dev, span(g.m, g.n, g.ldc, ces))) {
            status = fail(INVALID_VALUE, std::string(g.op) + ": an operand of batch entry " + std::to_string(i) +
                                             " reaches outside its device allocation");
            break;
        }
        float* ci = reinterpret_cast<float*>(c_dev);
        const bool c_half = g.c_type == R_16BF;
        if (c_half) {  // an f32 working copy of C (its old values only when they are read)
            c_tmp.assign(span(g.m, g.n, g.ldc, 1), 0.0f);
            if (g.beta != 0.0f) as_f32(c_dev, R_16BF, g.m, g.n, g.ldc, false, c_tmp);
            ci = c_tmp.data();
        }
        // Rounds the working copy back into a bf16 C (only its m x n elements).
        auto store = [&] {
            if (!c_half) return;
            uint16_t* h = reinterpret_cast<uint16_t*>(c_dev);
            for (int col = 0; col < g.n; ++col)
                for (int r = 0; r < g.m; ++r) h[(size_t)col * g.ldc + r] = to_bf16(ci[(size_t)col * g.ldc + r]);
        };
        if (g.k == 0) {  // C = beta C (cuBLAS does not read C when beta == 0)
            for (int col = 0; col < g.n; ++col)
                for (int r = 0; r < g.m; ++r) {
                    float& x = ci[(size_t)col * g.ldc + r];
                    x = g.beta == 0.0f ? 0.0f : g.beta * x;
                }
            store();
            continue;
        }
        if (!arithmetic()) {
            pattern(ci, g.m, g.n, g.ldc, g.beta);
            store();
            continue;
        }
        const float* af = as_f32(ai, g.a_type, a_rows, a_cols, g.lda, g.tf32, ta_tmp);
        const float* bf = as_f32(bi, g.b_type, b_rows, b_cols, g.ldb, g.tf32, tb_tmp);
        if (g.beta == 0.0f) {  // cuBLAS never reads C with beta == 0: NaN/inf in C must not leak
            for (int col = 0; col < g.n; ++col) memset(ci + (size_t)col * g.ldc, 0, (size_t)g.m * 4);
        }
        cblas_sgemm(CblasColMajor, g.ta ? CblasTrans : CblasNoTrans, g.tb ? CblasTrans : CblasNoTrans, g.m, g.n, g.k,
                    g.alpha, af, g.lda, bf, g.ldb, g.beta, ci, g.ldc);
        store();
    }
    sgemu_unlock();
    return status;
}

int replay(void* call) { return compute(*static_cast<GemmCall*>(call)); }
void destroy(void* call) { delete static_cast<GemmCall*>(call); }

int gemm(const char* op, void* handle, int ta, int tb, int m, int n, int k, const void* alpha, const void* a,
         int a_type, int lda, long long sa, const void* b, int b_type, int ldb, long long sb, const void* beta, void* c,
         int c_type, int ldc, long long sc, int batch, int compute_type) {
    if (!handle) return fail(NOT_INITIALIZED, std::string(op) + ": null handle");
    if ((ta != 0 && ta != 1) || (tb != 0 && tb != 1))
        return fail(NOT_SUPPORTED, std::string(op) + ": only CUBLAS_OP_N / CUBLAS_OP_T are emulated");
    const bool tf32 = compute_type == COMPUTE_32F_FAST_TF32;
    const bool c_ok = c_type == R_32F || (c_type == R_16BF && a_type == R_16BF && compute_type == COMPUTE_32F);
    if (a_type != b_type || (a_type != R_32F && a_type != R_16BF) || !c_ok ||
        (compute_type != COMPUTE_32F && !(tf32 && a_type == R_32F)))
        return fail(NOT_SUPPORTED, std::string(op) +
                                       ": only f32 or bf16 A/B with f32 C and CUBLAS_COMPUTE_32F, bf16 A/B with bf16 C "
                                       "and CUBLAS_COMPUTE_32F, or f32 A/B with CUBLAS_COMPUTE_32F_FAST_TF32, are "
                                       "emulated");
    const int a_rows = ta ? k : m;
    const int b_rows = tb ? n : k;
    if (m < 0 || n < 0 || k < 0 || batch < 0 || lda < (a_rows > 1 ? a_rows : 1) || ldb < (b_rows > 1 ? b_rows : 1) ||
        ldc < (m > 1 ? m : 1)) {
        char buf[200];
        snprintf(buf, sizeof buf, "%s: invalid value m=%d n=%d k=%d lda=%d ldb=%d ldc=%d batch=%d", op, m, n, k, lda,
                 ldb, ldc, batch);
        return fail(INVALID_VALUE, buf);
    }
    Handle* h = static_cast<Handle*>(handle);
    const GemmCall call{op, ta, tb, m, n, k, *static_cast<const float*>(alpha), *static_cast<const float*>(beta),
                        a, a_type, lda, sa, b, b_type, ldb, sb, c, c_type, ldc, sc, batch, tf32};
    if (sgemu_stream_capturing(h->stream)) {
        // Captured: counted as such, run by the graph launch (alpha and beta copied now, as
        // cuBLAS reads host scalars when the call is made).
        sgemu_profile_captured(1);
        sgemu_profile_blas(op, m, n, k, batch, a_type, b_type, c_type, compute_type, h->math);
        sgemu_profile_captured(0);
        return sgemu_capture_host_node(h->stream, replay, new GemmCall(call), destroy) == 0 ? OK : EXECUTION_FAILED;
    }
    sgemu_profile_blas(op, m, n, k, batch, a_type, b_type, c_type, compute_type, h->math);
    return compute(call);
}

// One cublasSsyrk_v2 call: C = alpha op(A) op(A)^T + beta C on the `lower` (else upper)
// triangle of the column-major n x n C; op(A) is n x k (A stored n x k when !trans, k x n
// when trans).
struct SyrkCall {
    int lower, trans, n, k;
    float alpha, beta;
    const float* a;
    int lda;
    float* c;
    int ldc;
};

// Runs a validated SYRK: A and C range-checked, then the update of C's triangle (the other
// triangle is never touched, as in cuBLAS).
int compute_syrk(const SyrkCall& s) {
    if (s.n == 0) return OK;
    const char* op = "cublasSsyrk_v2";
    sgemu_lock();
    int status = OK;
    const int a_rows = s.trans ? s.k : s.n, a_cols = s.trans ? s.n : s.k;
    if ((s.k > 0 && sgemu_check_range(op, (uintptr_t)s.a, span(a_rows, a_cols, s.lda, 4))) ||
        sgemu_check_range(op, (uintptr_t)s.c, span(s.n, s.n, s.ldc, 4))) {
        status = fail(INVALID_VALUE, std::string(op) + ": an operand reaches outside its device allocation");
    } else if (s.k == 0 || !arithmetic()) {
        // k = 0: C = beta C (not read when beta == 0). Arithmetic off: a small finite stand-in.
        static uint64_t call = 0;
        ++call;
        for (int col = 0; col < s.n; ++col) {
            const int r0 = s.lower ? col : 0, r1 = s.lower ? s.n : col + 1;
            for (int r = r0; r < r1; ++r) {
                float& x = s.c[(size_t)col * s.ldc + r];
                float v = 0.0f;
                if (s.k > 0) {
                    const uint64_t h = ((uint64_t)col * 0x9E3779B97F4A7C15ull) ^ ((uint64_t)r + call * 0xBF58476D1CE4E5B9ull);
                    v = ((float)((h ^ (h >> 29)) & 0xffff) / 65536.0f - 0.5f) * 0.125f;
                }
                x = s.beta == 0.0f ? v : s.beta * x + v;
            }
        }
    } else {
        if (s.beta == 0.0f) {  // never read C with beta == 0: NaN/inf there must not leak
            for (int col = 0; col < s.n; ++col) {
                const int r0 = s.lower ? col : 0, r1 = s.lower ? s.n : col + 1;
                memset(s.c + (size_t)col * s.ldc + r0, 0, (size_t)(r1 - r0) * 4);
            }
        }
        cblas_ssyrk(CblasColMajor, s.lower ? CblasLower : CblasUpper, s.trans ? CblasTrans : CblasNoTrans, s.n, s.k,
                    s.alpha, s.a, s.lda, s.beta, s.c, s.ldc);
    }
    sgemu_unlock();
    return status;
}

int replay_syrk(void* call) { return compute_syrk(*static_cast<SyrkCall*>(call)); }
void destroy_syrk(void* call) { delete static_cast<SyrkCall*>(call); }
}  // namespace

SG_EXPORT int cublasCreate_v2(void** handle) {
    if (!handle) return INVALID_VALUE;
    *handle = new Handle;
    return OK;
}
SG_EXPORT int cublasDestroy_v2(void* handle) {
    if (!handle) return NOT_INITIALIZED;
    delete static_cast<Handle*>(handle);
    return OK;
}
SG_EXPORT int cublasSetStream_v2(void* handle, void* stream) {
    if (!handle) return NOT_INITIALIZED;
    static_cast<Handle*>(handle)->stream = stream;
    return OK;
}
SG_EXPORT int cublasGetStream_v2(void* handle, void** stream) {
    if (!handle) return NOT_INITIALIZED;
    *stream = static_cast<Handle*>(handle)->stream;
    return OK;
}
SG_EXPORT int cublasSetMathMode(void* handle, int mode) {
    if (!handle) return NOT_INITIALIZED;
    const int base = mode & ~16;  // CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION may be or-ed in
    if (base < 0 || base > 3) return fail(INVALID_VALUE, "cublasSetMathMode: mode " + std::to_string(mode));
    static_cast<Handle*>(handle)->math = mode;
    return OK;
}
SG_EXPORT int cublasGetMathMode(void* handle, int* mode) {
    if (!handle || !mode) return handle ? INVALID_VALUE : NOT_INITIALIZED;
    *mode = static_cast<Handle*>(handle)->math;
    return OK;
}
SG_EXPORT int cublasGemmEx(void* h, int ta, int tb, int m, int n, int k, const void* alpha, const void* a, int at,
                           int lda, const void* b, int bt, int ldb, const void* beta, void* c, int ct, int ldc,
                           int compute, int /*algo*/) {
    return gemm("cublasGemmEx", h, ta, tb, m, n, k, alpha, a, at, lda, 0, b, bt, ldb, 0, beta, c, ct, ldc, 0, 1, compute);
}
SG_EXPORT int cublasGemmStridedBatchedEx(void* h, int ta, int tb, int m, int n, int k, const void* alpha,
                                         const void* a, int at, int lda, long long sa, const void* b, int bt, int ldb,
                                         long long sb, const void* beta, void* c, int ct, int ldc, long long sc,
                                         int batch, int compute, int /*algo*/) {
    return gemm("cublasGemmStridedBatchedEx", h, ta, tb, m, n, k, alpha, a, at, lda, sa, b, bt, ldb, sb, beta, c, ct,
                ldc, sc, batch, compute);
}
SG_EXPORT int cublasSgemm_v2(void* h, int ta, int tb, int m, int n, int k, const float* alpha, const float* a, int lda,
                             const float* b, int ldb, const float* beta, float* c, int ldc) {
    return gemm("cublasSgemm", h, ta, tb, m, n, k, alpha, a, R_32F, lda, 0, b, R_32F, ldb, 0, beta, c, R_32F, ldc, 0, 1,
                COMPUTE_32F);
}
SG_EXPORT int cublasSgemmStridedBatched(void* h, int ta, int tb, int m, int n, int k, const float* alpha,
                                        const float* a, int lda, long long sa, const float* b, int ldb, long long sb,
                                        const float* beta, float* c, int ldc, long long sc, int batch) {
    return gemm("cublasSgemmStridedBatched", h, ta, tb, m, n, k, alpha, a, R_32F, lda, sa, b, R_32F, ldb, sb, beta, c,
                R_32F, ldc, sc, batch, COMPUTE_32F);
}
SG_EXPORT int cublasSsyrk_v2(void* handle, int uplo, int trans, int n, int k, const float* alpha, const float* a,
                             int lda, const float* beta, float* c, int ldc) {
    const char* op = "cublasSsyrk_v2";
    if (!handle) return fail(NOT_INITIALIZED, std::string(op) + ": null handle");
    // cublasFillMode_t: 0 lower, 1 upper (2, full, is not valid here); cublasOperation_t: N or T.
    if ((uplo != 0 && uplo != 1) || (trans != 0 && trans != 1))
        return fail(INVALID_VALUE, std::string(op) + ": uplo " + std::to_string(uplo) + ", trans " + std::to_string(trans));
    const int a_rows = trans ? k : n;
    if (n < 0 || k < 0 || lda < (a_rows > 1 ? a_rows : 1) || ldc < (n > 1 ? n : 1) || !alpha || !beta) {
        char buf[160];
        snprintf(buf, sizeof buf, "%s: invalid value n=%d k=%d lda=%d ldc=%d", op, n, k, lda, ldc);
        return fail(INVALID_VALUE, buf);
    }
    Handle* h = static_cast<Handle*>(handle);
    const SyrkCall call{uplo == 0, trans, n, k, *alpha, *beta, a, lda, c, ldc};
    if (sgemu_stream_capturing(h->stream)) {
        sgemu_profile_captured(1);
        sgemu_profile_blas(op, n, n, k, 1, R_32F, R_32F, R_32F, COMPUTE_32F, h->math);
        sgemu_profile_captured(0);
        return sgemu_capture_host_node(h->stream, replay_syrk, new SyrkCall(call), destroy_syrk) == 0 ? OK
                                                                                                  : EXECUTION_FAILED;
    }
    sgemu_profile_blas(op, n, n, k, 1, R_32F, R_32F, R_32F, COMPUTE_32F, h->math);
    return compute_syrk(call);
}
