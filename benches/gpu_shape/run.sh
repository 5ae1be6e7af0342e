#!/usr/bin/env bash
# The GPU shape of a training step for every method, on the emulated device (or a GPU):
# `examples/gpu_shape` for SmolLM2-135M at the llama_mlp_finetune example's CUDA defaults
# (every third block from block 2, batch 32 x 128, f32 and bf16) and for LLaMA-2-7B at the
# paper's plan (blocks 0, 3, ..., 30; up and down projections, then gate, up and down;
# 32 x 128 tokens; keep 0.002 as the paper's ~0.2%; bf16 and f32), one JSON file per run in OUT_DIR, then the table
# (benches/gpu_shape/table.py). On the emulator the 7B runs skip cuBLAS arithmetic
# (SG_EMU_GEMM_ARITHMETIC=0: counts, sizes and types are real, values are not) and do not run
# the merged update's scattered-atomic kernel (SG_EMU_SKIP_KERNELS=coo_dense_t_f32: ~5e9
# emulated atomics per projection and step; it is still validated, counted and costed).
#
#   benches/gpu_shape/run.sh OUT_DIR [methods...]     (default: sparsegrad lora meprop full)
#
# Needs the emulator (scripts/test-cuda-emu.sh plain builds target/cuda-emu; set
# SPARSEGRAD_GPU=1 to use a real GPU instead) and NVCC for the build. Slow on the emulator
# (the 7B SparseGrad runs take minutes each, and ~9 GB of host memory: run one at a time).
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:?usage: benches/gpu_shape/run.sh OUT_DIR [methods...]}"
shift
methods=("${@:-sparsegrad lora meprop full}")
read -r -a methods <<< "${methods[*]}"
mkdir -p "$out"
cargo build --release --example gpu_shape
bin=target/release/examples/gpu_shape
emu=()
if [ -e target/cuda-emu/libcuda.so ] && [ -z "${SPARSEGRAD_GPU:-}" ]; then
    emu=("LD_LIBRARY_PATH=$PWD/target/cuda-emu")
fi
run() {
    local name="$1"; shift
    echo "== $name" >&2
    local profile="$out/$name.emu.jsonl"
    rm -f "$profile"
    env "${emu[@]}" SG_EMU_PROFILE="$profile" "$@" --json "$out/$name.json" > "$out/$name.txt"
    rm -f "$profile"
}
for m in "${methods[@]}"; do
    for d in f32 bf16; do
        run "smollm2-135m.$m.$d.gate-up-down" "$bin" --dims smollm2-135m --method "$m" --dtype "$d"
        for p in up,down gate,up,down; do
            run "llama2-7b.$m.$d.${p//,/-}" env SG_EMU_GEMM_ARITHMETIC=0 SG_EMU_SKIP_KERNELS=coo_dense_t_f32 \
                "$bin" --dims llama2-7b --method "$m" --dtype "$d" --projections "$p" --keep 0.002 --run-seqs 1,2
        done
    done
done
python3 benches/gpu_shape/table.py "$out"
