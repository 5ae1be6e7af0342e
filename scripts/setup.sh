#!/usr/bin/env bash
# One-time machine set-up for sparsegrad (idempotent): OpenBLAS (BLAS + LAPACK for the
# CPU backend), a font for the example's plot, and the pinned CUDA 13.0 compiler wheels, so build.rs compiles every
# kernel even on a machine without a GPU. Prints the NVCC path to export on its last line.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need_apt=()
[ -e /usr/include/x86_64-linux-gnu/openblas-pthread/cblas.h ] || [ -e /usr/include/cblas.h ] || ls /usr/lib/*/libopenblas.so >/dev/null 2>&1 || need_apt+=(libopenblas-dev)
command -v gcc >/dev/null || need_apt+=(build-essential)
# The example's loss plot labels its axes with DejaVu Sans.
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need_apt+=(fonts-dejavu-core)
if [ ${#need_apt[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

CUDA_DIR="${SPARSEGRAD_CUDA_DIR:-$HOME/.cache/sparsegrad/cuda-13.0}"
NVCC_PATH="$CUDA_DIR/nvidia/cu13/bin/nvcc"
if [ ! -x "$NVCC_PATH" ]; then
    python3 -m pip install -q --disable-pip-version-check --target "$CUDA_DIR" \
        nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 >&2
fi
"$NVCC_PATH" --version >/dev/null
echo "$NVCC_PATH"
