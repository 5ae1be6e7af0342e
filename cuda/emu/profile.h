// profile.h: the emulated device's counters, kept by the fake driver (driver.cpp) and the
// fake cuBLAS (cublas.cpp) at every entry point sparsegrad reaches: kernel launches (name,
// grid, block, dynamic shared bytes), cuBLAS calls (routine, m, n, k, batch, operand,
// output and compute types, math mode), host-blocking synchronisations, copies (bytes each
// way, blocking or not), memsets, allocations and frees, and live and peak device bytes.
//
// Counting runs between cuProfilerStart and cuProfilerStop (real driver entry points, so
// the same window serves `nsys --capture-range=cudaProfilerApi` on a GPU). Each counted
// event is written as one JSON line to the file named by SG_EMU_PROFILE (appended; nothing
// is written when it is unset), followed at cuProfilerStop by a `stop` line with the
// window's totals. These counts are independent of the library's own ledger
// (src/perf): tests compare the two.
#pragma once

#include <stddef.h>
#include <stdint.h>

#define SG_PROFILE_EXPORT extern "C" __attribute__((visibility("default")))

// Kinds of host-blocking synchronisation.
enum SgSync : int { SG_SYNC_STREAM = 0, SG_SYNC_CONTEXT = 1, SG_SYNC_EVENT = 2 };
// Copy directions.
enum SgCopy : int { SG_COPY_HTOD = 0, SG_COPY_DTOH = 1, SG_COPY_DTOD = 2 };

SG_PROFILE_EXPORT void sgemu_profile_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                            unsigned by, unsigned bz, unsigned shared_bytes);
// Types are cudaDataType codes (0 = f32, 14 = bf16), compute a cublasComputeType_t code,
// math a cublasMath_t code.
SG_PROFILE_EXPORT void sgemu_profile_blas(const char* routine, int m, int n, int k, int batch, int a_type, int b_type,
                                          int c_type, int compute, int math);
SG_PROFILE_EXPORT void sgemu_profile_sync(int kind);
// `blocking`: the host waited for the device (a synchronous copy, or a device-to-host copy
// into pageable memory).
SG_PROFILE_EXPORT void sgemu_profile_copy(int dir, size_t bytes, int blocking);
SG_PROFILE_EXPORT void sgemu_profile_memset(size_t bytes);
// Allocation bookkeeping runs always (live bytes are needed when a window opens); events are
// written only inside a window.
SG_PROFILE_EXPORT void sgemu_profile_alloc(size_t bytes);
SG_PROFILE_EXPORT void sgemu_profile_free(size_t bytes);
// Events recorded into a stream capture (graph.cpp) are written with "captured": true
// (they run later, in a graph launch) between captured(1) and captured(0).
SG_PROFILE_EXPORT void sgemu_profile_captured(int on);
// A graph launch of `nodes` nodes: one event; the nodes it runs are not counted again
// (suspend(1) ... suspend(0) around them).
SG_PROFILE_EXPORT void sgemu_profile_graph_launch(size_t nodes);
SG_PROFILE_EXPORT void sgemu_profile_suspend(int on);
// Opens / closes a counting window; 0 on success.
SG_PROFILE_EXPORT int sgemu_profile_start();
SG_PROFILE_EXPORT int sgemu_profile_stop();
