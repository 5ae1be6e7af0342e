#!/usr/bin/env bash
# The main job: set up the machine, fetch the model and corpus (scripts/fetch-assets.sh),
# then fine-tune SmolLM2-135M's MLP blocks with SparseGrad on the CPU
# (examples/llama_mlp_finetune; about three minutes with the defaults on 2 cores).
# Extra arguments are passed to the example, e.g. `--compare` or `--device cuda`.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="$(scripts/setup.sh | tail -n 1)"
export NVCC
if grep -q avx512f /proc/cpuinfo 2>/dev/null; then coretype=SkylakeX; else coretype=Haswell; fi
export OPENBLAS_CORETYPE="${OPENBLAS_CORETYPE:-$coretype}"
scripts/fetch-assets.sh >/dev/null
cargo run --release --features recipes --example llama_mlp_finetune -- "$@"
