#!/usr/bin/env bash
# cuda/emu/mutants.sh: do the CUDA tests notice a broken kernel? Each mutant changes one
# line of a copy of cuda/ (a dropped barrier, a wrong shuffle offset, an index off by one,
# a wrong constant), rebuilds the emulator from the copy and runs the CUDA test binary
# that covers it (small shapes): that run must FAIL. Prints one line per mutant; exits
# non-zero if any mutant survives. Not part of CI (a minute or two per mutant on 2 cores).
# Arguments, if any, name the files whose mutants run (e.g. `cuda/emu/mutants.sh optim.cu`).
set -euo pipefail
cd "$(dirname "$0")/../.."
export NVCC="${NVCC:-$HOME/.cache/sparsegrad/cuda-13.0/nvidia/cu13/bin/nvcc}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

declare -A exe
while read -r name path; do exe[$name]="$path"; done < <(
    cargo test --release --features recipes --no-run --message-format=json --test 'cuda_*' 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])')

# file | exact text | replacement | test binary (\n: a line break)
mutants=(
    'common.cuh|for (u32 o = 16; o > 0; o >>= 1) v += __shfl_xor_sync|for (u32 o = 8; o > 0; o >>= 1) v += __shfl_xor_sync|cuda_dense'
    'common.cuh|        if (lane >= o) v += n;|        if (lane > o) v += n;|cuda_sparse'
    'common.cuh|    if (lane == 31) smem[warp] = inc;\n    __syncthreads();|    if (lane == 31) smem[warp] = inc;|cuda_sparse'
    'dense.cu|    if (c >= cols) return;|    if (c > cols) return;|cuda_dense'
    'topk.cu|lane == (u32)(__ffs(peers) - 1)|lane == (u32)(__ffs(peers) % 32)|cuda_topk'
    'sparse.cu|        s_val[q] = values[e];\n    }\n    __syncthreads();|        s_val[q] = values[e];\n    }|cuda_sparse'
    'optim.cu|__fmul_rn(__fmul_rn(one_minus_b2, g), g)|__fmul_rn(__fmul_rn(one_minus_b1, g), g)|cuda_optim'
    'transformer.cu|m = fmaxf(m, smem[w]);\n        __syncthreads();|m = fmaxf(m, smem[w]);|cuda_transformer'
    'attention.cuh|(causal ? i + 1 : n_b)|(causal ? i : n_b)|cuda_attention'
    'attention.cu|o[rr][u] = o[rr][u] * alpha[rr] + acc;|o[rr][u] = o[rr][u] + acc;|cuda_attention'
    'attention.cu|        __syncthreads();\n        float sc[4]|        float sc[4]|cuda_attention'
    'attention.cu|dss[ej][i] = scale * p * (dp - sd[i]);|dss[ej][i] = scale * p * dp;|cuda_attention'
    'attention.cu|qt < n_t; ++qt) {|qt + 1 < n_t; ++qt) {|cuda_attention'
    'attention.cu|acc += dout[base + c] * out[base + c];|acc += dout[base + c];|cuda_attention'
    'attention_wmma.cu|mt = fmaxf(mt, __shfl_xor_sync(ATT_FULL, mt, 1));|(void)0;|cuda_attention'
    'attention_wmma.cu|wmma::mma_sync(adv[n], ap, f, adv[n]);|wmma::mma_sync(adv[n], ads, f, adv[n]);|cuda_attention'
    'attention_wmma.cu|const bool in = r0 + r < s.T && c < s.D;|const bool in = r0 + r < s.T;|cuda_attention'
    'attention_wmma.cu|(causal && k0 > w0 + 15)) continue;|(causal && k0 >= w0)) continue;|cuda_attention'
    'attention_wmma.cu|qt < n_t; ++qt) {|qt + 1 < n_t; ++qt) {|cuda_attention'
)
survived=0
for m in "${mutants[@]}"; do
    IFS='|' read -r file from to test <<<"$m"
    if [ $# -gt 0 ] && [[ " $* " != *" $file "* ]]; then continue; fi
    rm -rf "$work/cuda" && cp -r cuda "$work/cuda"
    python3 - "$work/cuda/$file" "$from" "$to" <<'PY'
import sys
path, old, new = (a.replace("\\n", "\n") for a in sys.argv[1:])
text = open(path).read()
assert text.count(old) >= 1, "mutant text not found in " + path + ": " + old
open(path, "w").write(text.replace(old, new, 1))
PY
    SG_EMU_KERNEL_DIR="$work/cuda" python3 cuda/emu/build.py plain "$work/emu" >/dev/null
    label="$file: ${from//\\n/ } -> ${to//\\n/ }"
    if SG_EMU_EAGER_WARPS=1 LD_LIBRARY_PATH="$work/emu" SPARSEGRAD_REQUIRE_CUDA=1 SPARSEGRAD_CUDA_TEST_BIG=0 "${exe[$test]}" -q >"$work/out.txt" 2>&1; then
        echo "SURVIVED  $label ($test passed)"
        survived=1
    else
        echo "killed    $label ($test: $(grep -m1 -E 'panicked|emulator:' "$work/out.txt" | cut -c1-160))"
    fi
done
exit $survived
