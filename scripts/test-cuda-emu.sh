#!/usr/bin/env bash
# Runs every CUDA test (tests/cuda_*.rs: kernels, launchers, layers, MLP blocks, the model
# and the fine-tuning flow) against the CPU emulation of CUDA in cuda/emu, with no GPU.
#
#   scripts/test-cuda-emu.sh [plain|asan]
#
# plain: builds target/cuda-emu/{libcuda.so,libcublas.so}; asan: the same with the kernels,
# the emulator and the fake driver compiled with -fsanitize=address,undefined into
# target/cuda-emu-asan, ASan preloaded into the (uninstrumented) Rust test binaries.
# cudarc opens the fake libraries by name through LD_LIBRARY_PATH. Runs the emulator's
# self-test first, then each test binary with SPARSEGRAD_REQUIRE_CUDA=1 (a CUDA test that
# finds no device fails instead of skipping) and prints how many CUDA tests ran on the
# emulated device; fails if any failed or any `cuda_test!` did not execute.
#
# Environment: NVCC (build.rs must embed the kernels; default: scripts/setup.sh's path),
# SG_EMU_SEED (fiber/block schedule, default 1 plain / 2 asan), SPARSEGRAD_CUDA_TEST_BIG
# (the CUDA tests' size knob: 1 adds the big shapes, the default of plain; asan defaults to 0),
# SG_EMU_EAGER_WARPS (run a warp on as soon as its intrinsic resolves: default 0 plain, 1
# asan, so the two modes run different schedules).
# This is an emulation: nothing it prints is a GPU result.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-plain}"
case "$mode" in
    plain) out=target/cuda-emu; seed_default=1; big_default=1; eager_default=0 ;;
    asan) out=target/cuda-emu-asan; seed_default=2; big_default=0; eager_default=1 ;;
    *) echo "usage: $0 [plain|asan]" >&2; exit 2 ;;
esac
if [ -z "${NVCC:-}" ]; then
    NVCC="${SPARSEGRAD_CUDA_DIR:-$HOME/.cache/sparsegrad/cuda-13.0}/nvidia/cu13/bin/nvcc"
fi
[ -x "$NVCC" ] || { echo "test-cuda-emu: nvcc not found at $NVCC (run scripts/setup.sh): build.rs must embed the kernels" >&2; exit 1; }
export NVCC

python3 cuda/emu/build.py "$mode" "$out"
out="$PWD/$out"

run_env=(env "SG_EMU_SEED=${SG_EMU_SEED:-$seed_default}" "SG_EMU_EAGER_WARPS=${SG_EMU_EAGER_WARPS:-$eager_default}" "SPARSEGRAD_CUDA_TEST_BIG=${SPARSEGRAD_CUDA_TEST_BIG:-$big_default}")
if [ "$mode" = asan ]; then
    run_env+=("LD_PRELOAD=$(g++ -print-file-name=libasan.so)"
        "ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:halt_on_error=1:allocator_may_return_null=1"
        "UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1")
fi

echo "== emulator self-test ($mode)"
"${run_env[@]}" "$out/selftest"

echo "== building the CUDA test binaries"
binaries=()
while IFS= read -r line; do binaries+=("$line"); done < <(
    cargo test --release --features recipes --no-run --message-format=json --test 'cuda_*' 2>/dev/null |
        python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        print(m["target"]["name"] + " " + m["executable"])')
[ ${#binaries[@]} -gt 0 ] || { echo "test-cuda-emu: no test binaries built" >&2; cargo test --release --features recipes --no-run --test 'cuda_*'; exit 1; }

# The examples the tests run as processes, built here: under the ASan preload a test must
# not run cargo itself (rustc -vV crashes there), so the tests take them from this directory.
cargo build --release --features recipes --examples --quiet
export SPARSEGRAD_EXAMPLES_DIR="$(cd "${CARGO_TARGET_DIR:-target}/release/examples" && pwd)"

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
summary=()
for entry in "${binaries[@]}"; do
    name="${entry%% *}"
    exe="${entry#* }"
    expected=$(grep -c '^cuda_test!(' "tests/$name.rs" || true)
    echo "== $name ($mode)"
    if ! "${run_env[@]}" LD_LIBRARY_PATH="$out" SPARSEGRAD_REQUIRE_CUDA=1 SPARSEGRAD_CUDA_TEST_LOG="$log" "$exe" -q; then
        status=1
        summary+=("$name: FAILED")
        continue
    fi
    executed=$(grep -c "^$name .* executed " "$log" || true)
    device=$(grep "^$name .* executed " "$log" | head -n 1 | cut -d' ' -f4-)
    if [ "$executed" -ne "$expected" ]; then
        status=1
        summary+=("$name: only $executed of $expected CUDA tests executed")
    else
        summary+=("$name: $executed of $expected CUDA tests executed on ${device:-?}")
    fi
done
if [ "$mode" = plain ]; then
    # The GPU shape of a training step (counts on the emulated device, checked event by event
    # against the emulator's own count; predicted H100/H200 times): SmolLM2-135M at the
    # example's CUDA defaults and LLaMA-2-7B at the paper's plan (4 layers run, scaled).
    cargo build --release --example gpu_shape
    shape_dir="$(mktemp -d)"
    for spec in "smollm2-135m:--dims smollm2-135m --method sparsegrad --dtype bf16" \
        "llama2-7b:--dims llama2-7b --method sparsegrad --dtype bf16 --projections up,down --keep 0.002 --run-seqs 1,2"; do
        name="${spec%%:*}"
        read -r -a args <<< "${spec#*:}"
        echo "== gpu_shape $name (emulated counts, predicted times)"
        if ! "${run_env[@]}" LD_LIBRARY_PATH="$out" SG_EMU_PROFILE="$shape_dir/$name.jsonl" SG_EMU_GEMM_ARITHMETIC=0 \
            SG_EMU_SKIP_KERNELS=coo_dense_t_f32 \
            target/release/examples/gpu_shape "${args[@]}" --json "$shape_dir/$name.json"; then
            status=1
            summary+=("gpu_shape $name: FAILED")
        else
            summary+=("gpu_shape $name: counts agree with the emulator's")
        fi
    done
    rm -rf "$shape_dir"
fi
echo "== CUDA tests on the emulator ($mode; an emulation, not a GPU)"
printf '  %s\n' "${summary[@]}"
exit $status
