// graph.h: stream capture and CUDA graphs on the emulated device (graph.cpp).
//
// cuStreamBeginCapture_v2 on a stream (never the legacy NULL stream, as on a GPU) makes the
// kernel launches, device copies, memsets and cuBLAS calls queued on it nodes of a graph
// instead of running them; cuStreamEndCapture returns the graph, cuGraphInstantiateWithFlags
// an executable copy, and cuGraphLaunch runs its nodes in capture order. Kernel arguments
// are copied at capture (by the sizes the kernel registry records), as cuLaunchKernel does
// on a GPU. What a capture cannot hold fails loudly and invalidates the capture, as on a
// GPU: a synchronisation, an allocation or free, a copy between the device and pageable host
// memory. cuStreamEndCapture then returns CUDA_ERROR_STREAM_CAPTURE_INVALIDATED with the
// reason printed.
#pragma once

#include <stddef.h>
#include <stdint.h>

struct dim3;
namespace sg_emu {
struct KernelInfo;
}

namespace sg_graph {

// Whether `stream` is being captured (the NULL stream never is), and whether any stream is.
bool capturing(void* stream);
bool any_capture();

// Record a node into the capture of `stream` (which must be capturing). 0 on success.
int record_kernel(void* stream, const sg_emu::KernelInfo* k, dim3 grid, dim3 block, unsigned smem, void** params);
// `dir`: SG_COPY_* (profile.h). Host memory must be page-locked (the caller checked).
int record_copy(void* stream, int dir, void* dst, const void* src, size_t bytes);
int record_memset(void* stream, uintptr_t dst, unsigned char value, size_t bytes);

// A call a capture cannot hold, made while a capture is open: invalidates every open
// capture (global capture mode) and returns CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED.
int refuse(const char* what);

}  // namespace sg_graph

// For the fake cuBLAS: whether its stream is capturing, and a host-function node (the call
// with its arguments copied) that replays it. `destroy` frees `data` with the graph.
extern "C" __attribute__((visibility("default"))) int sgemu_stream_capturing(void* stream);
extern "C" __attribute__((visibility("default"))) int sgemu_capture_host_node(void* stream, int (*fn)(void*),
                                                                               void* data, void (*destroy)(void*));
