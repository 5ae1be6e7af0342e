// runtime.cpp: runs a kernel launch on the host. Blocks run one after another; the
// threads of a block are fibers (own stacks, a hand-written x86-64 context switch) that a
// scheduler resumes one at a time until each blocks at a warp intrinsic or a barrier, or
// exits. Then it resolves every warp whose 32 lanes all wait at the same intrinsic with the
// full mask, and the barrier once every thread of the block waits at the same
// __syncthreads. Anything else (lanes at different intrinsics or masks, a lane that exited,
// a barrier not reached by all threads, a deadlock) fails the launch with a message.
// Warp-collective operations with semantics of their own (the WMMA ops, sg_emu::Collective)
// resolve the same way and then run once for the warp, on the scheduler's stack.
//
// Environment: SG_EMU_SEED (default 1) shuffles the order in which the scheduler resumes
// fibers in each round and the order of the blocks (0 = in order), so code that relies on
// an unsynchronised order between threads sees different orders; SG_EMU_ABORT=1 aborts the
// process at the first failed launch (for a debugger or an ASan stack trace).
//
// Shared memory: every `__shared__` array is a static object (sg_emu.h); the generated
// registry lists them all (from the kernel objects' symbol tables) and each is filled with
// 0xff bytes (f32 NaN, all-ones integers) before every block, so a read of shared memory
// nobody wrote this block shows up in the results. Under AddressSanitizer they keep their
// redzones, so an overrun is reported.
#include "runtime.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "sg_emu.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define SG_ASAN 1
#else
#define SG_ASAN 0
#endif

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

// void sg_emu_switch(void** save_sp, void* next_sp): saves the callee-saved registers and
// the stack pointer of the caller, then resumes `next_sp`.
extern "C" void sg_emu_switch(void** save_sp, void* next_sp);
asm(R"(
.text
.globl sg_emu_switch
.hidden sg_emu_switch
.type sg_emu_switch,@function
sg_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size sg_emu_switch, .-sg_emu_switch
.section .note.GNU-stack,"",@progbits
.text
)");

namespace sg_emu {
namespace {

constexpr size_t STACK_BYTES = SG_ASAN ? 256 * 1024 : 64 * 1024;

std::vector<KernelInfo>& kernels() {
    static std::vector<KernelInfo> k;
    return k;
}
std::vector<SharedArray>& shared_arrays() {
    static std::vector<SharedArray> s;
    return s;
}

enum State { READY, AT_WARP_OP, AT_BARRIER, DONE };

struct Fiber {
    void* sp = nullptr;
    State state = READY;
    uint3 tid{};
    // The warp intrinsic (or barrier) this fiber waits at.
    int op = 0;
    unsigned mask = 0;
    uint64_t value = 0;
    unsigned arg = 0;
    unsigned size = 0;
    const char* file = "";
    int line = 0;
    uint64_t result = 0;
    void* fake_stack = nullptr;
};

const char* op_name(int op) {
    switch (op) {
        case SHFL_XOR: return "__shfl_xor_sync";
        case SHFL_UP: return "__shfl_up_sync";
        case ANY: return "__any_sync";
        case MATCH_ANY: return "__match_any_sync";
        case REDUCE_MAX: return "__reduce_max_sync";
        case SYNCWARP: return "__syncwarp";
        case COLLECTIVE: return "a warp-collective operation";
        default: return "?";
    }
}

struct Launch {
    const KernelInfo* kernel = nullptr;
    void** args = nullptr;
    std::vector<Fiber> fibers;
    Fiber* current = nullptr;
    void* sched_sp = nullptr;
    const void* sched_stack_bottom = nullptr;
    size_t sched_stack_size = 0;
    char* stacks = nullptr;
    size_t stack_slots = 0;
    std::string error;
};

Launch g;

std::string where(const Fiber& f) {
    char buf[256];
    snprintf(buf, sizeof buf, "thread (%u,%u,%u) of block (%u,%u,%u)", f.tid.x, f.tid.y, f.tid.z, blockIdx.x,
             blockIdx.y, blockIdx.z);
    return buf;
}

// The name of what a fiber waits at: an intrinsic, or the collective op's own name.
const char* wait_name(const Fiber& f) {
    if (f.op == 0) return "__syncthreads";
    if (f.op == COLLECTIVE) return reinterpret_cast<const Collective*>(f.value)->name;
    return op_name(f.op);
}

// "__shfl_xor_sync at topk.cu:123": the intrinsic (or barrier) a fiber waits at.
std::string site(const Fiber& f) {
    const char* base = strrchr(f.file, '/');
    return std::string(wait_name(f)) + " at " + (base ? base + 1 : f.file) + ":" + std::to_string(f.line);
}

void ensure_stacks(size_t n) {
    if (g.stack_slots >= n) return;
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    if (g.stacks) munmap(g.stacks, g.stack_slots * (STACK_BYTES + page));
    const size_t slot = STACK_BYTES + page;
    void* p = mmap(nullptr, n * slot, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        fprintf(stderr, "sparsegrad CUDA emulator: cannot map %zu fiber stacks\n", n);
        abort();
    }
    g.stacks = static_cast<char*>(p);
    g.stack_slots = n;
    for (size_t i = 0; i < n; ++i) mprotect(g.stacks + i * slot, page, PROT_NONE);  // overflow guard
}

char* stack_bottom(size_t i) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    return g.stacks + i * (STACK_BYTES + page) + page;
}

// Switches from the running fiber back to the scheduler.
void to_scheduler(bool finished) {
    Fiber* f = g.current;
#if SG_ASAN
    __sanitizer_start_switch_fiber(finished ? nullptr : &f->fake_stack, g.sched_stack_bottom, g.sched_stack_size);
#else
    (void)finished;
#endif
    sg_emu_switch(&f->sp, g.sched_sp);
#if SG_ASAN
    __sanitizer_finish_switch_fiber(f->fake_stack, nullptr, nullptr);
#endif
}

[[noreturn]] void fiber_main() {
#if SG_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &g.sched_stack_bottom, &g.sched_stack_size);
#endif
    g.kernel->thunk(g.args);
    g.current->state = DONE;
    to_scheduler(true);
    abort();  // a finished fiber is never resumed
}

void resume(Fiber& f, size_t slot) {
    g.current = &f;
    threadIdx = f.tid;
#if SG_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, stack_bottom(slot), STACK_BYTES);
#else
    (void)slot;
#endif
    sg_emu_switch(&g.sched_sp, f.sp);
#if SG_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

void start_fiber(Fiber& f, size_t slot) {
    char* bottom = stack_bottom(slot);
#if SG_ASAN
    __asan_unpoison_memory_region(bottom, STACK_BYTES);
#endif
    uintptr_t top = reinterpret_cast<uintptr_t>(bottom + STACK_BYTES) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;                                  // keeps fiber_main's frame 16-byte aligned
    *--sp = reinterpret_cast<void*>(&fiber_main);     // sg_emu_switch's `ret` goes here
    for (int i = 0; i < 6; ++i) *--sp = nullptr;      // rbp rbx r12 r13 r14 r15
    f.sp = sp;
    f.state = READY;
    f.fake_stack = nullptr;
}

void fail(const std::string& msg) {
    if (g.error.empty()) g.error = msg;
}

// Resolves warp `w` if its lanes all wait at one warp intrinsic; returns whether it did.
bool resolve_warp(size_t first, size_t lanes) {
    Fiber* l = &g.fibers[first];
    for (size_t i = 0; i < lanes; ++i)
        if (l[i].state != AT_WARP_OP) return false;
    const Fiber& a = l[0];
    for (size_t i = 0; i < lanes; ++i) {
        const Fiber& b = l[i];
        // A collective op (WMMA) is one instruction: every lane at the same call site.
        const bool same = b.op == a.op && b.size == a.size &&
                          (a.op != COLLECTIVE || (strcmp(wait_name(a), wait_name(b)) == 0 && a.line == b.line &&
                                                  strcmp(a.file, b.file) == 0));
        if (!same) {
            fail("lanes of one warp at different warp intrinsics: " + where(a) + " at " + site(a) + ", " + where(b) +
                 " at " + site(b));
            return false;
        }
        if (b.mask != 0xffffffffu || lanes != 32) {
            char m[64];
            snprintf(m, sizeof m, "mask 0x%08x", b.mask);
            fail(site(b) + " with " + m + " in a warp of " + std::to_string(lanes) +
                 " lanes (only full warps with mask 0xffffffff are supported): " + where(b));
            return false;
        }
    }
    switch (a.op) {
        case SHFL_XOR:
        case SHFL_UP:
            for (size_t i = 0; i < 32; ++i) {
                const unsigned width = l[i].arg >> 16;
                const unsigned v = l[i].arg & 0xffffu;
                if (width == 0 || width > 32 || (width & (width - 1)) != 0) {
                    fail(site(l[i]) + ": width " + std::to_string(width) + " is not a power of two <= 32");
                    return false;
                }
                const size_t seg = i & ~(size_t)(width - 1);
                size_t src = i;
                if (a.op == SHFL_XOR) {
                    const size_t s = i ^ v;
                    if (s >= seg && s < seg + width) src = s;
                } else if (i >= seg + v) {
                    src = i - v;
                }
                l[i].result = l[src].value;
            }
            break;
        case ANY: {
            uint64_t any = 0;
            for (size_t i = 0; i < 32; ++i) any |= l[i].value != 0;
            for (size_t i = 0; i < 32; ++i) l[i].result = any;
            break;
        }
        case MATCH_ANY: {
            // Lanes grouped by value: O(32 x distinct values), usually a handful.
            uint64_t values[32];
            uint32_t masks[32];
            size_t groups = 0;
            for (size_t i = 0; i < 32; ++i) {
                size_t g = 0;
                while (g < groups && values[g] != l[i].value) ++g;
                if (g == groups) {
                    values[groups] = l[i].value;
                    masks[groups++] = 0;
                }
                masks[g] |= 1u << i;
            }
            for (size_t i = 0; i < 32; ++i) {
                size_t g = 0;
                while (values[g] != l[i].value) ++g;
                l[i].result = masks[g];
            }
            break;
        }
        case REDUCE_MAX: {
            uint64_t mx = 0;
            for (size_t i = 0; i < 32; ++i) mx = std::max(mx, l[i].value & 0xffffffffu);
            for (size_t i = 0; i < 32; ++i) l[i].result = mx;
            break;
        }
        case SYNCWARP:
            break;
        case COLLECTIVE: {
            Collective* lanes[32];
            for (size_t i = 0; i < 32; ++i) lanes[i] = reinterpret_cast<Collective*>(l[i].value);
            if (const char* err = lanes[0]->run(lanes)) {
                fail(site(a) + ": " + err + ": " + where(a));
                return false;
            }
            break;
        }
    }
    for (size_t i = 0; i < 32; ++i) l[i].state = READY;
    return true;
}

void poison_shared() {
    for (const SharedArray& s : shared_arrays()) memset(s.addr, 0xff, s.bytes);
}

// splitmix64: the per-round shuffles need speed, not quality.
struct FastRng {
    uint64_t state;
    uint64_t next() {
        uint64_t z = (state += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
    }
};

void shuffle(std::vector<size_t>& order, FastRng& rng) {
    for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[rng.next() % i]);
}

// SG_EMU_EAGER_WARPS=1: a warp whose lanes all reached their intrinsic is resolved at once
// and run on, ahead of the warps not yet resumed this round, as far as it gets (again and
// again). That exposes a write after a warp intrinsic racing with another warp's read of
// the same shared memory before that warp's intrinsic (a missing __syncthreads), which
// the default round-by-round schedule hides.
bool eager_warps() {
    static const bool on = [] {
        const char* s = getenv("SG_EMU_EAGER_WARPS");
        return s && strcmp(s, "0") != 0;
    }();
    return on;
}

void run_warp_ahead(size_t first, size_t threads) {
    const size_t lanes = std::min<size_t>(32, threads - first);
    while (resolve_warp(first, lanes)) {
        for (size_t j = first; j < first + lanes; ++j) {
            if (g.fibers[j].state != READY) continue;
            resume(g.fibers[j], j);
            if (!g.error.empty()) return;
        }
    }
}

std::string run_block(size_t threads, FastRng* rng, std::vector<size_t>& order) {
    for (size_t i = 0; i < threads; ++i) start_fiber(g.fibers[i], i);
    poison_shared();
    bool exited_any = false;
    for (;;) {
        if (rng) shuffle(order, *rng);
        for (size_t i : order) {
            Fiber& f = g.fibers[i];
            if (f.state != READY) continue;
            resume(f, i);
            if (!g.error.empty()) return g.error;
            if (f.state == DONE) exited_any = true;
            if (eager_warps() && f.state == AT_WARP_OP) run_warp_ahead(i & ~(size_t)31, threads);
            if (!g.error.empty()) return g.error;
        }
        // Every fiber is blocked or done: resolve what can be resolved.
        bool progress = false;
        size_t done = 0, at_barrier = 0;
        for (size_t w = 0; w < threads; w += 32) {
            const size_t lanes = std::min<size_t>(32, threads - w);
            if (resolve_warp(w, lanes)) progress = true;
            if (!g.error.empty()) return g.error;
        }
        if (progress) continue;
        for (size_t i = 0; i < threads; ++i) {
            done += g.fibers[i].state == DONE;
            at_barrier += g.fibers[i].state == AT_BARRIER;
        }
        if (done == threads) return "";
        // A warp with lanes waiting at an intrinsic that the others will never reach.
        for (size_t i = 0; i < threads; ++i) {
            const Fiber& f = g.fibers[i];
            if (f.state != AT_WARP_OP) continue;
            const size_t w = i & ~(size_t)31;
            for (size_t j = w; j < std::min(threads, w + 32); ++j) {
                const Fiber& o = g.fibers[j];
                if (o.state == DONE) return site(f) + " waits for " + where(o) + ", which exited: " + where(f);
                if (o.state == AT_BARRIER)
                    return site(f) + " waits for " + where(o) + ", which is at " + site(o) + ": " + where(f);
            }
            if (threads - w < 32)
                return site(f) + " in a partial warp of " + std::to_string(threads - w) + " lanes: " + where(f);
        }
        if (at_barrier > 0) {
            const Fiber* a = nullptr;
            for (size_t i = 0; i < threads; ++i)
                if (g.fibers[i].state == AT_BARRIER) {
                    a = &g.fibers[i];
                    break;
                }
            for (size_t i = 0; i < threads; ++i) {
                const Fiber& o = g.fibers[i];
                if (o.state == AT_BARRIER && (o.line != a->line || strcmp(o.file, a->file) != 0))
                    return "threads at different __syncthreads: " + where(*a) + " at " + site(*a) + ", " + where(o) +
                           " at " + site(o);
            }
            if (done > 0 || exited_any) {
                for (size_t i = 0; i < threads; ++i)
                    if (g.fibers[i].state == DONE)
                        return site(*a) + " reached by " + std::to_string(at_barrier) + " of " +
                               std::to_string(threads) + " threads; " + where(g.fibers[i]) + " exited without it";
            }
            for (size_t i = 0; i < threads; ++i) g.fibers[i].state = READY;
            continue;
        }
        return "deadlock";
    }
}

}  // namespace

uint64_t warp_op(int op, unsigned mask, uint64_t value, unsigned arg, unsigned size, const char* file, int line) {
    Fiber* f = g.current;
    f->state = AT_WARP_OP;
    f->op = op;
    f->mask = mask;
    f->value = value;
    f->arg = arg;
    f->size = size;
    f->file = file;
    f->line = line;
    to_scheduler(false);
    return f->result;
}

void syncthreads(const char* file, int line) {
    Fiber* f = g.current;
    f->state = AT_BARRIER;
    f->op = 0;
    f->file = file;
    f->line = line;
    to_scheduler(false);
}

void register_kernels(const KernelInfo* k, size_t n) { kernels().insert(kernels().end(), k, k + n); }
void register_shared(const SharedArray* s, size_t n) { shared_arrays().insert(shared_arrays().end(), s, s + n); }

const KernelInfo* find_kernel(const char* name) {
    for (const KernelInfo& k : kernels())
        if (strcmp(k.name, name) == 0) return &k;
    return nullptr;
}
size_t kernel_count() { return kernels().size(); }
const KernelInfo* kernel_at(size_t i) { return i < kernels().size() ? &kernels()[i] : nullptr; }

std::string validate_launch(const KernelInfo& k, dim3 grid, dim3 block) {
    const size_t threads = (size_t)block.x * block.y * block.z;
    if (threads == 0 || threads > 1024 || block.z > 64 || grid.y > 65535 || grid.z > 65535 ||
        grid.x > 0x7fffffffu || grid.x == 0 || grid.y == 0 || grid.z == 0) {
        char buf[160];
        snprintf(buf, sizeof buf, "invalid launch configuration grid (%u,%u,%u) block (%u,%u,%u)", grid.x, grid.y,
                 grid.z, block.x, block.y, block.z);
        return std::string(k.name) + ": " + buf;
    }
    if (k.max_threads != 0 && threads > k.max_threads)
        return std::string(k.name) + ": block of " + std::to_string(threads) + " threads exceeds __launch_bounds__(" +
               std::to_string(k.max_threads) + ")";
    return "";
}

std::string launch(const KernelInfo& k, dim3 grid, dim3 block, void** args) {
    std::string bad = validate_launch(k, grid, block);
    if (!bad.empty()) return bad;
    const size_t threads = (size_t)block.x * block.y * block.z;
    ensure_stacks(threads);
    g.kernel = &k;
    g.args = args;
    g.error.clear();
    g.fibers.assign(threads, Fiber{});
    for (size_t i = 0; i < threads; ++i) {
        g.fibers[i].tid = uint3{(unsigned)(i % block.x), (unsigned)(i / block.x % block.y),
                                (unsigned)(i / ((size_t)block.x * block.y))};
    }
    gridDim = grid;
    blockDim = block;
    static const uint64_t seed = [] {
        const char* s = getenv("SG_EMU_SEED");
        return s ? strtoull(s, nullptr, 10) : 1ull;
    }();
    static uint64_t launches = 0;
    FastRng rng{seed * 0x9e3779b97f4a7c15ull + launches++};
    std::vector<size_t> order(threads);
    for (size_t i = 0; i < threads; ++i) order[i] = i;
    const uint64_t blocks = (uint64_t)grid.x * grid.y * grid.z;
    // Shuffled block order: a random rotation and direction keeps it O(1) per block.
    const uint64_t start = seed ? rng.next() % blocks : 0;
    const bool backwards = seed ? (rng.next() & 1) : false;
    for (uint64_t n = 0; n < blocks; ++n) {
        const uint64_t b = backwards ? (start + blocks - n) % blocks : (start + n) % blocks;
        blockIdx = uint3{(unsigned)(b % grid.x), (unsigned)(b / grid.x % grid.y), (unsigned)(b / ((uint64_t)grid.x * grid.y))};
        std::string err = run_block(threads, seed ? &rng : nullptr, order);
        if (!err.empty()) {
            g.current = nullptr;
            return std::string("kernel ") + k.name + ": " + err;
        }
    }
    g.current = nullptr;
    return "";
}

}  // namespace sg_emu
