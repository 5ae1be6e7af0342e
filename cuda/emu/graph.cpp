// graph.cpp: stream capture and CUDA graphs on the emulated device (see graph.h).
#include "graph.h"

#include <stdio.h>
#include <string.h>

#include <map>
#include <thread>
#include <memory>
#include <string>
#include <vector>

#include "profile.h"
#include "runtime.h"
#include "sg_emu.h"

#define SG_EXPORT extern "C" __attribute__((visibility("default")))

extern "C" int sgemu_check_range(const char* op, unsigned long long p, size_t bytes);
extern "C" int sgemu_kernel_skipped(const char* name);
extern "C" void sgemu_lock();
extern "C" void sgemu_unlock();

namespace {

enum : int {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900,
    CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901,
    CUDA_ERROR_ILLEGAL_STATE = 401,
};

struct Node {
    enum Kind { KERNEL, COPY, MEMSET, HOST } kind;
    // KERNEL
    const sg_emu::KernelInfo* k = nullptr;
    dim3 grid{1, 1, 1}, block{1, 1, 1};
    std::vector<std::vector<uint64_t>> args;  // one 8-byte-aligned copy per parameter
    // COPY / MEMSET
    int dir = 0;
    void* dst = nullptr;
    const void* src = nullptr;
    size_t bytes = 0;
    unsigned char value = 0;
    // HOST
    int (*fn)(void*) = nullptr;
    std::shared_ptr<void> data;
};

struct Graph {
    std::vector<Node> nodes;
};

struct Capture {
    Graph* graph;
    bool invalid = false;
    std::string why;
    // CUstreamCaptureMode: 0 global (unsafe calls of any thread invalidate it), 1 thread-local
    // (only the capturing thread's), 2 relaxed (none).
    int mode = 0;
    std::thread::id thread;
};

std::map<void*, Capture>& captures() {
    static std::map<void*, Capture> c;
    return c;
}

struct Lock {
    Lock() { sgemu_lock(); }
    ~Lock() { sgemu_unlock(); }
};

int fail(int code, const std::string& msg) {
    fprintf(stderr, "sparsegrad CUDA emulator: %s\n", msg.c_str());
    return code;
}

Capture* capture_of(void* stream) {
    if (!stream) return nullptr;
    auto it = captures().find(stream);
    return it == captures().end() ? nullptr : &it->second;
}

int run_node(const Node& n) {
    switch (n.kind) {
        case Node::KERNEL: {
            std::vector<void*> ptrs;
            for (const auto& a : n.args) ptrs.push_back(const_cast<uint64_t*>(a.data()));
            std::string err = sgemu_kernel_skipped(n.k->name) ? sg_emu::validate_launch(*n.k, n.grid, n.block)
                                                                : sg_emu::launch(*n.k, n.grid, n.block, ptrs.data());
            return err.empty() ? CUDA_SUCCESS : fail(CUDA_ERROR_LAUNCH_FAILED, "graph node: " + err);
        }
        case Node::COPY: {
            const bool dst_dev = n.dir != SG_COPY_DTOH, src_dev = n.dir != SG_COPY_HTOD;
            if ((dst_dev && sgemu_check_range("graph copy node", (uintptr_t)n.dst, n.bytes)) ||
                (src_dev && sgemu_check_range("graph copy node", (uintptr_t)n.src, n.bytes)))
                return CUDA_ERROR_INVALID_VALUE;
            if (n.bytes) memmove(n.dst, n.src, n.bytes);
            return CUDA_SUCCESS;
        }
        case Node::MEMSET:
            if (sgemu_check_range("graph memset node", (uintptr_t)n.dst, n.bytes)) return CUDA_ERROR_INVALID_VALUE;
            memset(n.dst, n.value, n.bytes);
            return CUDA_SUCCESS;
        case Node::HOST:
            return n.fn(n.data.get()) == 0 ? CUDA_SUCCESS : fail(CUDA_ERROR_LAUNCH_FAILED, "graph node: a captured cuBLAS call failed");
    }
    return CUDA_ERROR_INVALID_VALUE;
}

}  // namespace

namespace sg_graph {

bool capturing(void* stream) {
    Lock l;
    return capture_of(stream) != nullptr;
}

// Whether an unsafe call (allocation, free, synchronisation) from this thread falls under
// an open capture's mode, as the driver decides it.
bool any_capture() {
    Lock l;
    for (auto& [stream, c] : captures()) {
        if (c.mode == 0 || (c.mode == 1 && c.thread == std::this_thread::get_id())) return true;
    }
    return false;
}

int record_kernel(void* stream, const sg_emu::KernelInfo* k, dim3 grid, dim3 block, unsigned smem, void** params) {
    Lock l;
    Capture* c = capture_of(stream);
    if (!c) return CUDA_ERROR_INVALID_VALUE;
    Node n{Node::KERNEL};
    n.k = k;
    n.grid = grid;
    n.block = block;
    for (unsigned i = 0; i < k->n_params; ++i) {
        std::vector<uint64_t> v((k->param_sizes[i] + 7) / 8 + 1);
        memcpy(v.data(), params[i], k->param_sizes[i]);
        n.args.push_back(std::move(v));
    }
    sgemu_profile_captured(1);
    sgemu_profile_launch(k->name, grid.x, grid.y, grid.z, block.x, block.y, block.z, smem);
    sgemu_profile_captured(0);
    c->graph->nodes.push_back(std::move(n));
    return CUDA_SUCCESS;
}

int record_copy(void* stream, int dir, void* dst, const void* src, size_t bytes) {
    Lock l;
    Capture* c = capture_of(stream);
    if (!c) return CUDA_ERROR_INVALID_VALUE;
    Node n{Node::COPY};
    n.dir = dir;
    n.dst = dst;
    n.src = src;
    n.bytes = bytes;
    sgemu_profile_captured(1);
    sgemu_profile_copy(dir, bytes, 0);
    sgemu_profile_captured(0);
    c->graph->nodes.push_back(std::move(n));
    return CUDA_SUCCESS;
}

int record_memset(void* stream, uintptr_t dst, unsigned char value, size_t bytes) {
    Lock l;
    Capture* c = capture_of(stream);
    if (!c) return CUDA_ERROR_INVALID_VALUE;
    Node n{Node::MEMSET};
    n.dst = (void*)dst;
    n.value = value;
    n.bytes = bytes;
    sgemu_profile_captured(1);
    sgemu_profile_memset(bytes);
    sgemu_profile_captured(0);
    c->graph->nodes.push_back(std::move(n));
    return CUDA_SUCCESS;
}

int refuse(const char* what) {
    Lock l;
    for (auto& kv : captures()) {
        const Capture& c = kv.second;
        const bool applies = c.mode == 0 || (c.mode == 1 && c.thread == std::this_thread::get_id());
        if (applies && !c.invalid) {
            kv.second.invalid = true;
            kv.second.why = what;
        }
    }
    return fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
                std::string(what) + " while a stream is being captured: not capturable (the capture is invalidated)");
}

}  // namespace sg_graph

SG_EXPORT int sgemu_stream_capturing(void* stream) { return sg_graph::capturing(stream) ? 1 : 0; }

SG_EXPORT int sgemu_capture_host_node(void* stream, int (*fn)(void*), void* data, void (*destroy)(void*)) {
    Lock l;
    Capture* c = capture_of(stream);
    if (!c || !fn) return CUDA_ERROR_INVALID_VALUE;
    Node n{Node::HOST};
    n.fn = fn;
    n.data = std::shared_ptr<void>(data, destroy);
    c->graph->nodes.push_back(std::move(n));
    return CUDA_SUCCESS;
}

SG_EXPORT int cuStreamBeginCapture_v2(void* stream, int mode) {
    Lock l;
    if (!stream)
        return fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuStreamBeginCapture on the legacy NULL stream (not capturable)");
    if (capture_of(stream)) return fail(CUDA_ERROR_ILLEGAL_STATE, "cuStreamBeginCapture on a stream already capturing");
    if (mode < 0 || mode > 2) return fail(CUDA_ERROR_INVALID_VALUE, "cuStreamBeginCapture: unknown capture mode");
    Capture c{new Graph};
    c.mode = mode;
    c.thread = std::this_thread::get_id();
    captures()[stream] = c;
    return CUDA_SUCCESS;
}

SG_EXPORT int cuStreamEndCapture(void* stream, void** graph) {
    Lock l;
    Capture* c = capture_of(stream);
    if (!c || !graph) return fail(CUDA_ERROR_ILLEGAL_STATE, "cuStreamEndCapture on a stream that is not capturing");
    Capture done = *c;
    captures().erase(stream);
    if (done.invalid) {
        delete done.graph;
        *graph = nullptr;
        return fail(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, "cuStreamEndCapture: the capture was invalidated by " + done.why);
    }
    *graph = done.graph;
    return CUDA_SUCCESS;
}

// CUstreamCaptureStatus: 0 none, 1 active, 2 invalidated.
SG_EXPORT int cuStreamIsCapturing(void* stream, int* status) {
    Lock l;
    if (!status) return CUDA_ERROR_INVALID_VALUE;
    Capture* c = capture_of(stream);
    *status = c ? (c->invalid ? 2 : 1) : 0;
    return CUDA_SUCCESS;
}

SG_EXPORT int cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long /*flags*/) {
    if (!exec || !graph) return CUDA_ERROR_INVALID_VALUE;
    *exec = new Graph(*static_cast<Graph*>(graph));
    return CUDA_SUCCESS;
}

SG_EXPORT int cuGraphLaunch(void* exec, void* stream) {
    if (!exec) return CUDA_ERROR_INVALID_HANDLE;
    if (sg_graph::capturing(stream)) return sg_graph::refuse("cuGraphLaunch into a capturing stream");
    Lock l;
    const Graph& g = *static_cast<Graph*>(exec);
    sgemu_profile_graph_launch(g.nodes.size());
    sgemu_profile_suspend(1);
    int status = CUDA_SUCCESS;
    for (const Node& n : g.nodes) {
        status = run_node(n);
        if (status != CUDA_SUCCESS) break;
    }
    sgemu_profile_suspend(0);
    return status;
}

SG_EXPORT int cuGraphUpload(void* exec, void*) { return exec ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE; }

SG_EXPORT int cuGraphExecDestroy(void* exec) {
    delete static_cast<Graph*>(exec);
    return CUDA_SUCCESS;
}

SG_EXPORT int cuGraphDestroy(void* graph) {
    delete static_cast<Graph*>(graph);
    return CUDA_SUCCESS;
}
