// driver.cpp: a libcuda.so for the emulator, exporting the CUDA driver entry points that
// cudarc (dynamic loading) calls for sparsegrad; every other cu* entry point cudarc knows is
// a generated stub (stubs_driver.cpp) that prints its name and fails.
//
// One device, "sparsegrad CPU emulation of CUDA (sm_90)", with SG_EMU_SM_COUNT (default
// 4) multiprocessors, so launchers size their grids small. Device memory is exact-size host
// memory (posix_memalign, 256-byte aligned like cudaMalloc), so AddressSanitizer sees an
// access one past the end of any buffer; copies and memsets are checked against the live
// allocations. Everything is synchronous: a stream or event is only a handle, a launch runs
// to completion inside cuLaunchKernel, under one process-wide lock, unless the stream is
// being captured (graph.cpp: the launch becomes a graph node). The emulated device's
// counters (profile.cpp) see every entry point below. cuModuleLoadData accepts
// the embedded fatbin and resolves kernels by name in the registry of every `extern "C"
// __global__` of cuda/*.cu that appears in that image.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <chrono>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "graph.h"
#include "profile.h"
#include "runtime.h"
#include "sg_emu.h"

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;

enum : int {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
};

#define SG_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

std::recursive_mutex& lock() {
    static std::recursive_mutex m;
    return m;
}

struct Module {
    std::vector<const sg_emu::KernelInfo*> kernels;
};
struct Event {
    std::chrono::steady_clock::time_point t{};
    bool recorded = false;
};

std::map<uintptr_t, size_t>& allocations() {
    static std::map<uintptr_t, size_t> a;
    return a;
}
// Page-locked host allocations (cuMemAllocHost / cuMemHostAlloc): a device-to-host copy
// into one does not block the host on a GPU, one into pageable memory does.
std::map<uintptr_t, size_t>& pinned() {
    static std::map<uintptr_t, size_t> a;
    return a;
}
bool is_pinned(const void* h, size_t bytes) {
    auto& a = pinned();
    auto it = a.upper_bound((uintptr_t)h);
    if (it == a.begin()) return false;
    --it;
    const uintptr_t p = (uintptr_t)h;
    return p >= it->first && p - it->first <= it->second && bytes <= it->second - (p - it->first);
}
std::string& last_error() {
    static std::string e;
    return e;
}
int g_initialized = 0;
int g_primary_refs = 0;
char g_context_tag;  // the primary context's handle is its address
thread_local void* t_current = nullptr;

CUresult report(CUresult code, const std::string& msg) {
    last_error() = msg;
    fprintf(stderr, "sparsegrad CUDA emulator: %s\n", msg.c_str());
    if (getenv("SG_EMU_ABORT") && code == CUDA_ERROR_LAUNCH_FAILED) abort();
    return code;
}

// SG_EMU_SKIP_KERNELS: comma-separated kernel names whose launches are validated and counted
// but not run (shape runs of large models, where one kernel dominates the emulator's time;
// the outputs of such a launch are left as they were).
bool skipped(const char* name) {
    static const std::string list = [] {
        const char* v = getenv("SG_EMU_SKIP_KERNELS");
        return v ? "," + std::string(v) + "," : std::string();
    }();
    return !list.empty() && list.find("," + std::string(name) + ",") != std::string::npos;
}

unsigned sm_count() {
    const char* s = getenv("SG_EMU_SM_COUNT");
    const long v = s ? strtol(s, nullptr, 10) : 4;
    return v >= 1 && v <= 1024 ? (unsigned)v : 4;
}

// Whether [p, p + bytes) lies inside one live allocation.
bool in_allocation(uintptr_t p, size_t bytes) {
    auto& a = allocations();
    auto it = a.upper_bound(p);
    if (it == a.begin()) return false;
    --it;
    return p >= it->first && p - it->first <= it->second && bytes <= it->second - (p - it->first);
}

CUresult check_range(const char* op, CUdeviceptr p, size_t bytes) {
    if (bytes == 0 || in_allocation((uintptr_t)p, bytes)) return CUDA_SUCCESS;
    char buf[160];
    snprintf(buf, sizeof buf, "%s: device range 0x%llx + %zu bytes is not inside one live allocation", op, p, bytes);
    return report(CUDA_ERROR_INVALID_VALUE, buf);
}

CUresult alloc(CUdeviceptr* out, size_t bytes) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    if (sg_graph::any_capture()) return sg_graph::refuse("a device allocation");
    if (bytes == 0) return report(CUDA_ERROR_INVALID_VALUE, "cuMemAlloc of 0 bytes");
    void* p = nullptr;
    if (posix_memalign(&p, 256, bytes) != 0) return CUDA_ERROR_OUT_OF_MEMORY;
    std::lock_guard<std::recursive_mutex> g(lock());
    allocations()[(uintptr_t)p] = bytes;
    sgemu_profile_alloc(bytes);
    *out = (CUdeviceptr)(uintptr_t)p;
    return CUDA_SUCCESS;
}

CUresult release(CUdeviceptr p) {
    if (sg_graph::any_capture()) return sg_graph::refuse("a device free");
    std::lock_guard<std::recursive_mutex> g(lock());
    auto it = allocations().find((uintptr_t)p);
    if (it == allocations().end()) {
        char buf[96];
        snprintf(buf, sizeof buf, "cuMemFree of 0x%llx, which is not a live allocation", p);
        return report(CUDA_ERROR_INVALID_VALUE, buf);
    }
    sgemu_profile_free(it->second);
    allocations().erase(it);
    free((void*)(uintptr_t)p);
    return CUDA_SUCCESS;
}

CUresult copy(const char* op, void* dst, const void* src, size_t bytes, bool dst_dev, bool src_dev) {
    std::lock_guard<std::recursive_mutex> g(lock());
    if (dst_dev) {
        if (CUresult r = check_range(op, (CUdeviceptr)(uintptr_t)dst, bytes)) return r;
    }
    if (src_dev) {
        if (CUresult r = check_range(op, (CUdeviceptr)(uintptr_t)src, bytes)) return r;
    }
    if (bytes) memmove(dst, src, bytes);
    return CUDA_SUCCESS;
}

}  // namespace

// For the fake cuBLAS (and the self-tests): checks a device range, the last message.
SG_EXPORT int sgemu_kernel_skipped(const char* name) { return skipped(name) ? 1 : 0; }
SG_EXPORT int sgemu_check_range(const char* op, unsigned long long p, size_t bytes) {
    std::lock_guard<std::recursive_mutex> g(lock());
    return check_range(op, p, bytes);
}
SG_EXPORT const char* sgemu_last_error() { return last_error().c_str(); }
SG_EXPORT void sgemu_lock() { lock().lock(); }
SG_EXPORT void sgemu_unlock() { lock().unlock(); }

SG_EXPORT CUresult cuInit(unsigned flags) {
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    g_initialized = 1;
    return CUDA_SUCCESS;
}
SG_EXPORT CUresult cuDriverGetVersion(int* v) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = 13000;
    return CUDA_SUCCESS;
}
SG_EXPORT CUresult cuDeviceGetCount(int* n) {
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!n) return CUDA_ERROR_INVALID_VALUE;
    *n = 1;
    return CUDA_SUCCESS;
}
SG_EXPORT CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!d) return CUDA_ERROR_INVALID_VALUE;
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *d = 0;
    return CUDA_SUCCESS;
}
SG_EXPORT CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    snprintf(name, (size_t)len, "sparsegrad CPU emulation of CUDA (sm_90)");
    return CUDA_SUCCESS;
}
SG_EXPORT CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice d) {
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = (size_t)16 << 30;
    return CUDA_SUCCESS;
}
SG_EXPORT CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    *free_b = (size_t)16 << 30;
    *total = (size_t)16 << 30;
    return CUDA_SUCCESS;
}
SG_EXPORT CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice d) {
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    switch (attr) {
        case 1: *v = 1024; break;                    // MAX_THREADS_PER_BLOCK
        case 2: *v = 1024; break;                    // MAX_BLOCK_DIM_X
        case 3: *v = 1024; break;                    // MAX_BLOCK_DIM_Y
        case 4: *v = 64; break;                      // MAX_BLOCK_DIM_Z
        case 5: *v = 0x7fffffff; break;              // MAX_GRID_DIM_X
        case 6: case 7: *v = 65535; break;           // MAX_GRID_DIM_Y / Z
        case 8: *v = 48 * 1024; break;               // MAX_SHARED_MEMORY_PER_BLOCK
        case 10: *v = 32; break;                     // WARP_SIZE
        case 16: *v = (int)sm_count(); break;        // MULTIPROCESSOR_COUNT
        case 75: *v = 9; break;                      // COMPUTE_CAPABILITY_MAJOR
        case 76: *v = 0; break;                      // COMPUTE_CAPABILITY_MINOR
        case 115: *v = 1; break;                     // MEMORY_POOLS_SUPPORTED (stream-ordered alloc, as on an H100)
        default: {
            char buf[80];
            snprintf(buf, sizeof buf, "cuDeviceGetAttribute: attribute %d is not emulated", attr);
            return report(CUDA_ERROR_INVALID_VALUE, buf);
        }
    }
    return CUDA_SUCCESS;
}
SG_EXPORT CUresult cuDevicePrimaryCtxRetain(void** ctx, CUdevice d) {
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    std::lock_guard<std::recursive_mutex> g(lock());
    ++g_primary_refs;
    *ctx = &g_context_tag;
    return CUDA_SUCCESS;
}
SG_EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    std::lock_guard<std::recursive_mutex> g(lock());
    if (g_primary_refs == 0) return report(CUDA_ERROR_INVALID_VALUE, "cuDevicePrimaryCtxRelease without a retain");
    --g_primary_refs;
    return CUDA_SUCCESS;
}
SG_EXPORT CUresult cuCtxGetCurrent(void** ctx) {
    *ctx = t_current;
    return CUDA_SUCCESS;
}
SG_EXPORT CUresult cuCtxSetCurrent(void* ctx) {
    if (ctx && ctx != &g_context_tag) return CUDA_ERROR_INVALID_HANDLE;
    t_current = ctx;
    return CUDA_SUCCESS;
}
SG_EXPORT CUresult cuCtxSynchronize() {
    if (!t_current) return report(CUDA_ERROR_INVALID_VALUE, "cuCtxSynchronize without a current context");
    if (sg_graph::any_capture()) return sg_graph::refuse("cuCtxSynchronize");
    sgemu_profile_sync(SG_SYNC_CONTEXT);
    return CUDA_SUCCESS;
}

SG_EXPORT CUresult cuStreamCreate(void** s, unsigned) {
    *s = new char;
    return CUDA_SUCCESS;
}
SG_EXPORT CUresult cuStreamDestroy_v2(void* s) {
    delete static_cast<char*>(s);
    return CUDA_SUCCESS;
}
SG_EXPORT CUresult cuStreamSynchronize(void*) {
    if (sg_graph::any_capture()) return sg_graph::refuse("cuStreamSynchronize");
    sgemu_profile_sync(SG_SYNC_STREAM);
    return CUDA_SUCCESS;
}
SG_EXPORT CUresult cuStreamWaitEvent(void*, void*, unsigned) { return CUDA_SUCCESS; }

SG_EXPORT CUresult cuEventCreate(void** e, unsigned) {
    *e = new Event;
    return CUDA_SUCCESS;
}
SG_EXPORT CUresult cuEventDestroy_v2(void* e) {
    delete static_cast<Event*>(e);
    return CUDA_SUCCESS;
}
SG_EXPORT CUresult cuEventRecord(void* e, void*) {
    auto* ev = static_cast<Event*>(e);
    ev->t = std::chrono::steady_clock::now();
    ev->recorded = true;
    return CUDA_SUCCESS;
}
SG_EXPORT CUresult cuEventSynchronize(void*) {
    if (sg_graph::any_capture()) return sg_graph::refuse("cuEventSynchronize");
    sgemu_profile_sync(SG_SYNC_EVENT);
    return CUDA_SUCCESS;
}
SG_EXPORT CUresult cuEventQuery(void*) { return CUDA_SUCCESS; }
// Host wall time between the records: NOT device time (there is no device).
SG_EXPORT CUresult cuEventElapsedTime_v2(float* ms, void* a, void* b) {
    auto* s = static_cast<Event*>(a);
    auto* e = static_cast<Event*>(b);
    if (!s->recorded || !e->recorded) return report(CUDA_ERROR_INVALID_HANDLE, "cuEventElapsedTime on an event never recorded");
    *ms = std::chrono::duration<float, std::milli>(e->t - s->t).count();
    return CUDA_SUCCESS;
}
SG_EXPORT CUresult cuEventElapsedTime(float* ms, void* a, void* b) { return cuEventElapsedTime_v2(ms, a, b); }

SG_EXPORT CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) { return alloc(p, bytes); }
SG_EXPORT CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void*) { return alloc(p, bytes); }
SG_EXPORT CUresult cuMemFree_v2(CUdeviceptr p) { return release(p); }
SG_EXPORT CUresult cuMemFreeAsync(CUdeviceptr p, void*) { return release(p); }

namespace {
CUresult memset_d8(CUdeviceptr p, unsigned char v, size_t n) {
    std::lock_guard<std::recursive_mutex> g(lock());
    if (CUresult r = check_range("cuMemsetD8", p, n)) return r;
    sgemu_profile_memset(n);
    memset((void*)(uintptr_t)p, v, n);
    return CUDA_SUCCESS;
}
// A call that is not stream-ordered (no stream argument) cannot be captured.
CUresult refuse_unordered(const char* what) {
    return sg_graph::any_capture() ? sg_graph::refuse(what) : CUDA_SUCCESS;
}
// An asynchronous copy on `stream`: recorded into its capture (page-locked host memory
// only, as on a GPU), else run now.
CUresult copy_async(void* stream, int dir, void* dst, const void* src, size_t n, const char* op) {
    if (sg_graph::capturing(stream)) {
        const void* host = dir == SG_COPY_HTOD ? src : dst;
        bool pinned_host;
        {
            std::lock_guard<std::recursive_mutex> g(lock());
            pinned_host = dir == SG_COPY_DTOD || is_pinned(host, n);
        }
        if (!pinned_host) return sg_graph::refuse("a copy between the device and pageable host memory");
        return sg_graph::record_copy(stream, dir, dst, src, n);
    }
    bool blocking = false;
    if (dir == SG_COPY_DTOH) {
        std::lock_guard<std::recursive_mutex> g(lock());
        blocking = !is_pinned(dst, n);
    }
    sgemu_profile_copy(dir, n, blocking ? 1 : 0);
    return copy(op, dst, src, n, dir != SG_COPY_DTOH, dir != SG_COPY_HTOD);
}
}  // namespace

SG_EXPORT CUresult cuMemsetD8_v2(CUdeviceptr p, unsigned char v, size_t n) {
    if (CUresult r = refuse_unordered("cuMemsetD8")) return r;
    return memset_d8(p, v, n);
}
SG_EXPORT CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, void* stream) {
    if (sg_graph::capturing(stream)) {
        if (CUresult r = check_range("cuMemsetD8Async", p, n)) return r;
        return sg_graph::record_memset(stream, (uintptr_t)p, v, n);
    }
    return memset_d8(p, v, n);
}
// Synchronous copies block the host; so does an asynchronous device-to-host copy into
// pageable memory (the driver stages it). Host-to-device copies from pageable memory are
// staged and return early: not counted as blocking.
SG_EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* h, size_t n) {
    if (CUresult r = refuse_unordered("cuMemcpyHtoD")) return r;
    sgemu_profile_copy(SG_COPY_HTOD, n, 1);
    return copy("cuMemcpyHtoD", (void*)(uintptr_t)d, h, n, true, false);
}
SG_EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* h, size_t n, void* stream) {
    return copy_async(stream, SG_COPY_HTOD, (void*)(uintptr_t)d, h, n, "cuMemcpyHtoDAsync");
}
SG_EXPORT CUresult cuMemcpyDtoH_v2(void* h, CUdeviceptr d, size_t n) {
    if (CUresult r = refuse_unordered("cuMemcpyDtoH")) return r;
    sgemu_profile_copy(SG_COPY_DTOH, n, 1);
    return copy("cuMemcpyDtoH", h, (const void*)(uintptr_t)d, n, false, true);
}
SG_EXPORT CUresult cuMemcpyDtoHAsync_v2(void* h, CUdeviceptr d, size_t n, void* stream) {
    return copy_async(stream, SG_COPY_DTOH, h, (const void*)(uintptr_t)d, n, "cuMemcpyDtoHAsync");
}
SG_EXPORT CUresult cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t n) {
    if (CUresult r = refuse_unordered("cuMemcpyDtoD")) return r;
    sgemu_profile_copy(SG_COPY_DTOD, n, 1);
    return copy("cuMemcpyDtoD", (void*)(uintptr_t)d, (const void*)(uintptr_t)s, n, true, true);
}
SG_EXPORT CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, void* stream) {
    return copy_async(stream, SG_COPY_DTOD, (void*)(uintptr_t)d, (const void*)(uintptr_t)s, n, "cuMemcpyDtoDAsync");
}
// Page-locked host memory: ordinary host memory here, remembered so copies into it count
// as non-blocking and can be captured.
SG_EXPORT CUresult cuMemAllocHost_v2(void** p, size_t bytes) {
    if (CUresult r = refuse_unordered("cuMemAllocHost")) return r;
    if (!p || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    void* m = nullptr;
    if (posix_memalign(&m, 4096, bytes) != 0) return CUDA_ERROR_OUT_OF_MEMORY;
    std::lock_guard<std::recursive_mutex> g(lock());
    pinned()[(uintptr_t)m] = bytes;
    *p = m;
    return CUDA_SUCCESS;
}
SG_EXPORT CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) { return cuMemAllocHost_v2(p, bytes); }
SG_EXPORT CUresult cuMemFreeHost(void* p) {
    std::lock_guard<std::recursive_mutex> g(lock());
    auto it = pinned().find((uintptr_t)p);
    if (it == pinned().end()) return report(CUDA_ERROR_INVALID_VALUE, "cuMemFreeHost of memory cuMemAllocHost did not return");
    pinned().erase(it);
    free(p);
    return CUDA_SUCCESS;
}
// The counting window (profile.h); on a GPU the same calls bound nsys's capture range.
SG_EXPORT CUresult cuProfilerStart() {
    return sgemu_profile_start() == 0 ? CUDA_SUCCESS : report(CUDA_ERROR_INVALID_VALUE, "cuProfilerStart inside a window");
}
SG_EXPORT CUresult cuProfilerStop() {
    return sgemu_profile_stop() == 0 ? CUDA_SUCCESS : report(CUDA_ERROR_INVALID_VALUE, "cuProfilerStop outside a window");
}

// A fatbin starts with the magic 0xBA55ED50; the module holds every registered kernel whose
// name appears NUL-terminated in the image (fatbins built by build.rs are uncompressed).
SG_EXPORT CUresult cuModuleLoadData(void** module, const void* image) {
    if (!module || !image) return CUDA_ERROR_INVALID_VALUE;
    uint32_t magic;
    memcpy(&magic, image, 4);
    if (magic != 0xBA55ED50u) return report(CUDA_ERROR_INVALID_IMAGE, "cuModuleLoadData: not a fatbin image");
    uint64_t size;
    memcpy(&size, static_cast<const char*>(image) + 8, 8);  // fatbin header: magic, version, header size, payload size
    uint16_t header;
    memcpy(&header, static_cast<const char*>(image) + 6, 2);
    const size_t total = header + size;
    auto* m = new Module;
    const char* bytes = static_cast<const char*>(image);
    for (size_t i = 0; i < sg_emu::kernel_count(); ++i) {
        const sg_emu::KernelInfo* k = sg_emu::kernel_at(i);
        const size_t n = strlen(k->name) + 1;  // with its NUL
        for (size_t off = 0; off + n <= total; ++off) {
            if (bytes[off] == k->name[0] && memcmp(bytes + off, k->name, n) == 0 && (off == 0 || bytes[off - 1] == 0)) {
                m->kernels.push_back(k);
                break;
            }
        }
    }
    if (m->kernels.empty()) {
        delete m;
        return report(CUDA_ERROR_INVALID_IMAGE, "cuModuleLoadData: the image names no kernel of cuda/*.cu");
    }
    *module = m;
    return CUDA_SUCCESS;
}
SG_EXPORT CUresult cuModuleUnload(void* module) {
    delete static_cast<Module*>(module);
    return CUDA_SUCCESS;
}
SG_EXPORT CUresult cuModuleGetFunction(void** f, void* module, const char* name) {
    auto* m = static_cast<Module*>(module);
    if (!m || !f || !name) return CUDA_ERROR_INVALID_VALUE;
    for (const sg_emu::KernelInfo* k : m->kernels) {
        if (strcmp(k->name, name) == 0) {
            *f = const_cast<sg_emu::KernelInfo*>(k);
            return CUDA_SUCCESS;
        }
    }
    return report(CUDA_ERROR_NOT_FOUND, std::string("cuModuleGetFunction: no kernel ") + name + " in this module");
}
SG_EXPORT CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                  unsigned bz, unsigned shared_bytes, void* stream, void** params, void** extra) {
    if (!f) return CUDA_ERROR_INVALID_HANDLE;
    const auto* k = static_cast<const sg_emu::KernelInfo*>(f);
    if (extra) return report(CUDA_ERROR_NOT_SUPPORTED, std::string(k->name) + ": cuLaunchKernel `extra` is not emulated");
    if (shared_bytes) return report(CUDA_ERROR_NOT_SUPPORTED, std::string(k->name) + ": dynamic shared memory is not emulated");
    if (sg_graph::capturing(stream))
        return sg_graph::record_kernel(stream, k, dim3{gx, gy, gz}, dim3{bx, by, bz}, shared_bytes, params);
    std::lock_guard<std::recursive_mutex> g(lock());
    sgemu_profile_launch(k->name, gx, gy, gz, bx, by, bz, shared_bytes);
    std::string err = skipped(k->name) ? sg_emu::validate_launch(*k, dim3{gx, gy, gz}, dim3{bx, by, bz})
                                       : sg_emu::launch(*k, dim3{gx, gy, gz}, dim3{bx, by, bz}, params);
    if (!err.empty()) return report(CUDA_ERROR_LAUNCH_FAILED, err);
    return CUDA_SUCCESS;
}

SG_EXPORT CUresult cuFuncGetAttribute(int* v, int attr, void* f) {
    const auto* k = static_cast<const sg_emu::KernelInfo*>(f);
    if (attr == 0) {  // MAX_THREADS_PER_BLOCK
        *v = k->max_threads ? (int)k->max_threads : 1024;
        return CUDA_SUCCESS;
    }
    return report(CUDA_ERROR_NOT_SUPPORTED, "cuFuncGetAttribute: attribute " + std::to_string(attr) + " is not emulated");
}

SG_EXPORT CUresult cuGetErrorString(CUresult e, const char** s) {
    switch (e) {
        case CUDA_SUCCESS: *s = "no error"; break;
        case CUDA_ERROR_LAUNCH_FAILED: *s = "emulated kernel failed (see the emulator's message on stderr)"; break;
        case CUDA_ERROR_INVALID_VALUE: *s = "invalid argument"; break;
        case CUDA_ERROR_NOT_SUPPORTED: *s = "operation not supported by the sparsegrad CUDA emulator"; break;
        default: *s = "error (sparsegrad CUDA emulator)"; break;
    }
    return CUDA_SUCCESS;
}
SG_EXPORT CUresult cuGetErrorName(CUresult e, const char** s) {
    switch (e) {
        case CUDA_SUCCESS: *s = "CUDA_SUCCESS"; break;
        case CUDA_ERROR_LAUNCH_FAILED: *s = "CUDA_ERROR_LAUNCH_FAILED"; break;
        case CUDA_ERROR_INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case CUDA_ERROR_NOT_SUPPORTED: *s = "CUDA_ERROR_NOT_SUPPORTED"; break;
        default: *s = "CUDA_ERROR_UNKNOWN"; break;
    }
    return CUDA_SUCCESS;
}
