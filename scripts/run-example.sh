#!/usr/bin/env bash
# The main job: set up the machine, then run the example on the CPU.
# Extra arguments are passed to the example.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="$(scripts/setup.sh | tail -n 1)"
export NVCC
if grep -q avx512f /proc/cpuinfo 2>/dev/null; then coretype=SkylakeX; else coretype=Haswell; fi
export OPENBLAS_CORETYPE="${OPENBLAS_CORETYPE:-$coretype}"
cargo run --release --example synthetic_sparsegrad -- "$@"
