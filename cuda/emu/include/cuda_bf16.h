// Stands in for CUDA's cuda_bf16.h in the emulator build: the bf16 types and conversions
// come from cuda/emu/sg_emu.h, which the build force-includes before every kernel file.
#pragma once
#include "../sg_emu.h"
