// profile.cpp: the emulated device's counters (see profile.h): one JSON line per event
// inside a cuProfilerStart / cuProfilerStop window, then the window's totals.
#include "profile.h"

#include <stdio.h>
#include <stdlib.h>

#include <mutex>
#include <string>

namespace {

std::mutex& mu() {
    static std::mutex m;
    return m;
}

struct Totals {
    uint64_t launches = 0, blas = 0, syncs = 0, blocking_copies = 0, memsets = 0, allocs = 0, frees = 0;
    uint64_t graph_launches = 0, captured = 0;
    uint64_t bytes[3] = {0, 0, 0};  // htod, dtoh, dtod
    uint64_t peak = 0;
};

struct State {
    bool active = false;
    bool captured = false;   // events now go into a capture
    bool suspended = false;  // a graph launch is running its nodes
    uint64_t window = 0;  // 1 for the first window
    uint64_t live = 0;    // device bytes allocated now (always kept)
    Totals t;
    FILE* out = nullptr;
    bool opened = false;
};

State& st() {
    static State s;
    return s;
}

// The output file, opened (append) on first use; null when SG_EMU_PROFILE is unset.
FILE* out() {
    State& s = st();
    if (!s.opened) {
        s.opened = true;
        const char* path = getenv("SG_EMU_PROFILE");
        if (path && *path) {
            s.out = fopen(path, "a");
            if (!s.out) fprintf(stderr, "sparsegrad CUDA emulator: cannot open SG_EMU_PROFILE file %s\n", path);
        }
    }
    return s.out;
}

void line(const std::string& body) {
    FILE* f = out();
    if (!f) return;
    fprintf(f, "{\"window\":%llu,%s%s}\n", (unsigned long long)st().window, body.c_str(),
            st().captured ? ",\"captured\":true" : "");
}

// Whether an event is counted now: inside a window, not inside a graph launch.
bool counting() { return st().active && !st().suspended; }

const char* type_name(int t) {
    switch (t) {
        case 0: return "f32";
        case 14: return "bf16";
        case 2: return "f16";
        default: return "other";
    }
}

const char* compute_name(int c) {
    switch (c) {
        case 68: return "32F";
        case 74: return "32F_FAST_16F";
        case 75: return "32F_FAST_16BF";
        case 77: return "32F_FAST_TF32";
        case 69: return "32F_PEDANTIC";
        default: return "other";
    }
}

const char* math_name(int m) {
    switch (m & 0xf) {  // without CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION (16)
        case 0: return "default";
        case 1: return "tensor_op";
        case 2: return "pedantic";
        case 3: return "tf32";
        default: return "other";
    }
}

const char* sync_name(int k) {
    switch (k) {
        case SG_SYNC_STREAM: return "stream";
        case SG_SYNC_CONTEXT: return "context";
        default: return "event";
    }
}

const char* dir_name(int d) {
    switch (d) {
        case SG_COPY_HTOD: return "htod";
        case SG_COPY_DTOH: return "dtoh";
        default: return "dtod";
    }
}

std::string u(uint64_t v) { return std::to_string((unsigned long long)v); }

}  // namespace

SG_PROFILE_EXPORT void sgemu_profile_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                            unsigned by, unsigned bz, unsigned shared_bytes) {
    std::lock_guard<std::mutex> g(mu());
    if (!counting()) return;
    if (st().captured) ++st().t.captured; else ++st().t.launches;
    line("\"ev\":\"launch\",\"name\":\"" + std::string(name) + "\",\"grid\":[" + u(gx) + "," + u(gy) + "," + u(gz) +
         "],\"block\":[" + u(bx) + "," + u(by) + "," + u(bz) + "],\"smem\":" + u(shared_bytes));
}

SG_PROFILE_EXPORT void sgemu_profile_blas(const char* routine, int m, int n, int k, int batch, int a_type, int b_type,
                                          int c_type, int compute, int math) {
    std::lock_guard<std::mutex> g(mu());
    if (!counting()) return;
    if (st().captured) ++st().t.captured; else ++st().t.blas;
    line("\"ev\":\"blas\",\"routine\":\"" + std::string(routine) + "\",\"m\":" + std::to_string(m) +
         ",\"n\":" + std::to_string(n) + ",\"k\":" + std::to_string(k) + ",\"batch\":" + std::to_string(batch) +
         ",\"a\":\"" + type_name(a_type) + "\",\"b\":\"" + type_name(b_type) + "\",\"c\":\"" + type_name(c_type) +
         "\",\"compute\":\"" + compute_name(compute) + "\",\"math\":\"" + math_name(math) + "\"");
}

SG_PROFILE_EXPORT void sgemu_profile_sync(int kind) {
    std::lock_guard<std::mutex> g(mu());
    if (!counting()) return;
    ++st().t.syncs;
    line(std::string("\"ev\":\"sync\",\"what\":\"") + sync_name(kind) + "\"");
}

SG_PROFILE_EXPORT void sgemu_profile_copy(int dir, size_t bytes, int blocking) {
    std::lock_guard<std::mutex> g(mu());
    if (!counting()) return;
    if (st().captured) ++st().t.captured; else st().t.bytes[dir >= 0 && dir <= 2 ? dir : 2] += bytes;
    if (blocking) ++st().t.blocking_copies;
    line(std::string("\"ev\":\"copy\",\"dir\":\"") + dir_name(dir) + "\",\"bytes\":" + u(bytes) +
         ",\"blocking\":" + (blocking ? "true" : "false"));
}

SG_PROFILE_EXPORT void sgemu_profile_memset(size_t bytes) {
    std::lock_guard<std::mutex> g(mu());
    if (!counting()) return;
    if (st().captured) ++st().t.captured; else ++st().t.memsets;
    line("\"ev\":\"memset\",\"bytes\":" + u(bytes));
}

SG_PROFILE_EXPORT void sgemu_profile_alloc(size_t bytes) {
    std::lock_guard<std::mutex> g(mu());
    State& s = st();
    s.live += bytes;
    if (!s.active) return;
    ++s.t.allocs;
    if (s.live > s.t.peak) s.t.peak = s.live;
    line("\"ev\":\"alloc\",\"bytes\":" + u(bytes) + ",\"live\":" + u(s.live));
}

SG_PROFILE_EXPORT void sgemu_profile_free(size_t bytes) {
    std::lock_guard<std::mutex> g(mu());
    State& s = st();
    s.live = s.live >= bytes ? s.live - bytes : 0;
    if (!s.active) return;
    ++s.t.frees;
    line("\"ev\":\"free\",\"bytes\":" + u(bytes) + ",\"live\":" + u(s.live));
}

SG_PROFILE_EXPORT void sgemu_profile_captured(int on) {
    std::lock_guard<std::mutex> g(mu());
    st().captured = on != 0;
}

SG_PROFILE_EXPORT void sgemu_profile_graph_launch(size_t nodes) {
    std::lock_guard<std::mutex> g(mu());
    if (!counting()) return;
    ++st().t.graph_launches;
    line("\"ev\":\"graph_launch\",\"nodes\":" + u(nodes));
}

SG_PROFILE_EXPORT void sgemu_profile_suspend(int on) {
    std::lock_guard<std::mutex> g(mu());
    st().suspended = on != 0;
}

SG_PROFILE_EXPORT int sgemu_profile_start() {
    std::lock_guard<std::mutex> g(mu());
    State& s = st();
    if (s.active) return 1;
    s.active = true;
    ++s.window;
    s.t = Totals{};
    s.t.peak = s.live;
    line("\"ev\":\"start\",\"live\":" + u(s.live));
    return 0;
}

SG_PROFILE_EXPORT int sgemu_profile_stop() {
    std::lock_guard<std::mutex> g(mu());
    State& s = st();
    if (!s.active) return 1;
    const Totals& t = s.t;
    line("\"ev\":\"stop\",\"launches\":" + u(t.launches) + ",\"blas\":" + u(t.blas) + ",\"syncs\":" + u(t.syncs) +
         ",\"blocking_copies\":" + u(t.blocking_copies) + ",\"memsets\":" + u(t.memsets) + ",\"allocs\":" +
         u(t.allocs) + ",\"frees\":" + u(t.frees) + ",\"htod_bytes\":" + u(t.bytes[0]) + ",\"dtoh_bytes\":" +
         u(t.bytes[1]) + ",\"dtod_bytes\":" + u(t.bytes[2]) + ",\"graph_launches\":" + u(t.graph_launches) +
         ",\"captured\":" + u(t.captured) + ",\"live\":" + u(s.live) + ",\"peak\":" + u(t.peak));
    if (FILE* f = out()) fflush(f);
    s.active = false;
    return 0;
}
