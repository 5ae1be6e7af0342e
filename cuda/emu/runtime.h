// runtime.h: the host side of the emulator: the kernel registry (filled by the generated
// cuda/emu/*_registry.cpp files), launches, shared-memory bookkeeping and the last error.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <string>
#include <utility>

struct dim3;

namespace sg_emu {

using Thunk = void (*)(void** args);

struct KernelInfo {
    const char* name;
    const char* source;       // the .cu file it comes from ("dense", ...)
    Thunk thunk;              // unpacks cuLaunchKernel's void** with the kernel's signature
    unsigned max_threads;     // __launch_bounds__, 0 when none
    const size_t* param_sizes;  // sizeof each parameter, in order (a graph copies the values)
    unsigned n_params;
};

struct SharedArray {
    void* addr;
    size_t bytes;
};

// Called by the generated registry files' static initialisers.
void register_kernels(const KernelInfo* kernels, size_t n);
void register_shared(const SharedArray* arrays, size_t n);

const KernelInfo* find_kernel(const char* name);
size_t kernel_count();
const KernelInfo* kernel_at(size_t i);

// Checks a launch configuration as the driver does (empty string if valid).
std::string validate_launch(const KernelInfo& k, dim3 grid, dim3 block);

// Runs every block of the grid; returns an empty string on success, else what went wrong
// (naming the kernel and, for barrier and warp misuse, the intrinsic and source line).
std::string launch(const KernelInfo& k, dim3 grid, dim3 block, void** args);

// The argument unpacking: f(*(A0*)args[0], *(A1*)args[1], ...).
template <typename... A, size_t... I>
inline void call_unpacked(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}
template <typename... A>
struct ThunkOf {
    template <void (*F)(A...)>
    static void run(void** args) {
        call_unpacked(F, args, std::index_sequence_for<A...>{});
    }
};
template <typename... A>
constexpr ThunkOf<A...> thunk_of(void (*)(A...)) {
    return {};
}
template <typename... A>
struct ParamSizesOf {
    static constexpr size_t sizes[sizeof...(A) + 1] = {sizeof(A)..., 0};
    static constexpr unsigned count = sizeof...(A);
};
template <typename... A>
constexpr ParamSizesOf<A...> param_sizes_of(void (*)(A...)) {
    return {};
}

}  // namespace sg_emu

// A registry entry for kernel `fn` (used by the generated files).
#define SG_EMU_THUNK(fn) (&decltype(::sg_emu::thunk_of(&fn))::template run<&fn>)
#define SG_EMU_PARAM_SIZES(fn) (decltype(::sg_emu::param_sizes_of(&fn))::sizes)
#define SG_EMU_PARAM_COUNT(fn) (decltype(::sg_emu::param_sizes_of(&fn))::count)
