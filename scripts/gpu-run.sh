#!/usr/bin/env bash
# gpu-run.sh: the one script run on a GPU machine, from the bundle scripts/gpu-bundle.sh built
# (that machine has no Rust toolchain and no network). Every part runs under its own time
# limit; a part that fails or runs out of time is recorded and the run goes on.
#
#   scripts/gpu-run.sh [--bundle DIR]              on the GPU machine (device tool: carry
#                                                  ["target/gpu-bundle"], OUT set by the tool)
#   scripts/gpu-run.sh --rehearse [--bundle DIR] [--emu DIR]
#                                                  here, on the CPU emulation of CUDA
#                                                  (target/cuda-emu), at tiny sizes, with a
#                                                  stub in place of the PyTorch peer
#
# DIR (default: this script's folder when bundle.tar.xz is beside it, else target/gpu-bundle) holds bundle.tar.xz and MANIFEST. Writes into $OUT (default
# ./gpu-run-out) exactly these 8 files (regular files; anything else of that name stops it):
#   summary.txt   mode, date, commit, command, device, driver, clocks, memory, cuBLAS, and one
#                 `part NAME rc=.. seconds=.. limit=..` line per part
#   preflight.log nvidia-smi, cuBLAS search, one smoke GEMM (a CUDA test against the CPU)
#   tests.log     every CUDA test binary's output and which tests ran on which device
#   bench.log     benches/cuda_kernels.rs, then benches/cuda_layer.rs (BERT-base, LLaMA-2-7B)
#   shape.log     examples/gpu_shape's output (CUDA-event times beside predictions)
#   shape.jsonl   one line per gpu_shape run: name, rc, seconds, its --json
#   peer.log      the PyTorch peer's output (benches/peers/gpu_peer.py)
#   peer.jsonl    the peer's figures, one line per case (stub lines in a rehearsal)
# Then scripts/gpu-report.py OUT turns them into a benches/RESULTS.md section.
#
# Parts and their limits on a GPU (seconds; the sum is 420 = 7 minutes, so a rerun on a warm
# machine still fits a 600 s call): preflight 20, tests 120, kernels 45, layer 60, shape 90,
# peer 85. A rehearsal uses longer limits (the emulator is slow) but the same parts.
# GPU_RUN_LIMITS="part=seconds,..." overrides some (recorded in summary.txt).
# Exits 0 when every part passed, 1 otherwise (after writing everything it could).
set -euo pipefail

self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
PARTS=(preflight tests kernels layer shape peer)
declare -A GPU_LIMIT=([preflight]=20 [tests]=120 [kernels]=45 [layer]=60 [shape]=90 [peer]=85)
declare -A EMU_LIMIT=([preflight]=60 [tests]=420 [kernels]=180 [layer]=180 [shape]=300 [peer]=30)
OUTPUT_FILES=(summary.txt preflight.log tests.log bench.log shape.log shape.jsonl peer.log peer.jsonl)

die() { echo "gpu-run: $*" >&2; exit 2; }

# Creates (or empties) a regular file; refuses anything else of that name.
fresh() {
    if [ -e "$1" ] || [ -L "$1" ]; then
        [ -f "$1" ] && [ ! -L "$1" ] || die "$1 exists and is not a regular file"
    fi
    : >"$1"
}

# ---- the parts (each runs as `gpu-run.sh --part NAME` under `timeout`, environment exported)

part_preflight() {
    local log="$OUT/preflight.log"
    {
        echo "== host: $(uname -srm), $(nproc) cores, $(awk '/MemTotal/{print $2 " kB"}' /proc/meminfo)"
        if [ "$MODE" = rehearse ]; then
            echo "== device: the CPU emulation of CUDA ($EMU_DIR) - emulated, not a GPU"
        else
            nvidia-smi -L || echo "nvidia-smi -L failed"
            nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu,compute_cap --format=csv ||
                echo "nvidia-smi --query-gpu failed"
        fi
        echo "== libraries: LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
        echo "cublas: ${CUBLAS_PATH:-NOT FOUND}"
        local missing=0 exe
        for exe in "$WORK"/bin/*; do
            if ldd "$exe" | grep -v -e libcuda -e libcublas | grep -q 'not found'; then
                echo "ldd: $(basename "$exe") misses a library:"
                ldd "$exe" | grep 'not found'
                missing=1
            fi
        done
        if [ "$missing" -eq 0 ]; then echo "ldd: every binary finds its libraries"; fi
        echo "== smoke GEMM: test_cuda_dense gemm_matches_cpu (cuBLAS against the CPU)"
    } >>"$log" 2>&1
    local rc=0
    if ! grep -q '^ldd: every binary' "$log"; then rc=1; fi
    local smoke=0
    SPARSEGRAD_REQUIRE_CUDA=1 "$WORK/bin/test_cuda_dense" --exact gemm_matches_cpu >>"$log" 2>&1 || smoke=$?
    echo "smoke_gemm: rc=$smoke" >>"$log"
    [ "$smoke" -eq 0 ] || rc=1
    return "$rc"
}

part_tests() {
    # Each binary stops 10 s before the part does, so that its output is still gathered.
    local dir="$WORK/tests" exe name first pids=() limit=$((PART_LIMIT >= 20 ? PART_LIMIT - 10 : (PART_LIMIT + 1) / 2))
    mkdir -p "$dir"
    for exe in "$WORK"/bin/test_cuda_*; do
        name="$(basename "$exe")"
        local args=()
        if [ "$MODE" = rehearse ]; then
            # One test per binary: the whole suite runs on the emulator in scripts/test-cuda-emu.sh.
            first="$("$exe" --list 2>/dev/null | sed -n 's/: test$//p' | head -n 1)"
            args=(--exact "$first")
        fi
        (
            rc=0
            SPARSEGRAD_CUDA_TEST_LOG="$dir/$name.ran" timeout -k 2 "$limit" "$exe" "${args[@]}" >"$dir/$name.out" 2>&1 || rc=$?
            echo "$rc" >"$dir/$name.rc"
        ) &
        pids+=($!)
    done
    local pid status=0
    for pid in "${pids[@]}"; do wait "$pid" || true; done
    for exe in "$WORK"/bin/test_cuda_*; do
        [ "$(cat "$dir/$(basename "$exe").rc" 2>/dev/null)" = 0 ] || status=1
    done
    return "$status"
}

# Gathers the test binaries' outputs into tests.log; run by the main script after the tests
# part, so that what finished is kept when the part itself ran out of time.
gather_tests() {
    local dir="$WORK/tests" exe name rc log="$OUT/tests.log"
    for exe in "$WORK"/bin/test_cuda_*; do
        name="$(basename "$exe")"
        rc="$(cat "$dir/$name.rc" 2>/dev/null || echo killed)"
        echo "===== $name rc=$rc" >>"$log"
        cat "$dir/$name.out" >>"$log" 2>/dev/null || true
        echo "----- $name devices" >>"$log"
        cat "$dir/$name.ran" >>"$log" 2>/dev/null || true
    done
}

# A bench that finds no device prints `skipped: no CUDA device` and exits 0: a failure here.
bench() {
    local name="$1" rc=0
    shift
    echo "===== $name" >>"$OUT/bench.log"
    "$@" --bench 2>&1 | tee "$WORK/$name.log" >>"$OUT/bench.log" || rc=$?
    if grep -q '^skipped: no CUDA device' "$WORK/$name.log"; then rc=1; fi
    return "$rc"
}

part_kernels() {
    bench cuda_kernels "$WORK/bin/bench_cuda_kernels"
}

part_layer() {
    # SPARSEGRAD_BENCH_MEASURE=0: Formulation::measure's calibration would not fit the limit.
    SPARSEGRAD_BENCH_MEASURE=0 bench cuda_layer "$WORK/bin/bench_cuda_layer"
}

part_shape() {
    local runs=() status=0
    if [ "$MODE" = rehearse ]; then
        runs=("tiny.sparsegrad.bf16:--dims tiny --method sparsegrad --dtype bf16 --blocks 0,2 --batch 3"
            "tiny.sparsegrad.f32:--dims tiny --method sparsegrad --dtype f32 --blocks 0,2 --batch 3"
            "tiny.full.bf16:--dims tiny --method full --dtype bf16 --blocks 0,2 --batch 3")
    else
        # SmolLM2-135M whole (30 layers; every third block from block 2 trains); a LLaMA-2-7B
        # slice (the shortest prefix of the paper's plan, every third block from 0, scaled to 32
        # layers in the prediction). Most wanted first: a part out of time loses the last.
        local d m t
        for d in smollm2-135m llama2-7b; do
            for m in sparsegrad:bf16 sparsegrad:f32 full:bf16 lora:bf16 full:f32 lora:f32; do
                t=("${m%%:*}" "${m#*:}")
                local extra=""
                [ "$d" = smollm2-135m ] && extra="--layers all"
                runs+=("$d.${t[0]}.${t[1]}:--dims $d --method ${t[0]} --dtype ${t[1]} $extra")
            done
        done
    fi
    # Each run gets at most 25 s (a rehearsal run its share), and never more than what is left
    # of the part: a run that cannot start is recorded as skipped, so the part ends on its own.
    local spec name each=$(((PART_LIMIT - 5) / ${#runs[@]})) part_t0=$SECONDS
    [ "$MODE" = rehearse ] || each=25
    for spec in "${runs[@]}"; do
        name="${spec%%:*}"
        read -r -a args <<<"${spec#*:}"
        local json="$WORK/shape-$name.json" rc=0 t0=$SECONDS left=$((PART_LIMIT - 5 - (SECONDS - part_t0)))
        rm -f "$json"
        if [ "$left" -lt 5 ]; then
            echo "===== gpu_shape $name: skipped (the part's time is spent)" >>"$OUT/shape.log"
            echo "{\"name\": \"$name\", \"rc\": null, \"skipped\": \"the part's time is spent\", \"result\": null}" >>"$OUT/shape.jsonl"
            status=1
            continue
        fi
        [ "$left" -lt "$each" ] && each=$left
        echo "===== gpu_shape $name: ${args[*]}" >>"$OUT/shape.log"
        local envs=()
        [ "$MODE" = rehearse ] && envs=(SG_EMU_PROFILE="$WORK/shape-$name.emu.jsonl")
        env "${envs[@]}" timeout -k 5 "$each" "$WORK/bin/gpu_shape" "${args[@]}" --json "$json" >>"$OUT/shape.log" 2>&1 || rc=$?
        [ "$rc" -eq 0 ] || status=1
        python3 - "$name" "$rc" "$((SECONDS - t0))" "$json" "${args[*]}" >>"$OUT/shape.jsonl" <<'EOF'
import json, os, sys
name, rc, secs, path, args = sys.argv[1:]
res = None
if os.path.isfile(path):
    with open(path) as f:
        res = json.load(f)
print(json.dumps({"name": name, "rc": int(rc), "seconds": int(secs), "args": args, "result": res}))
EOF
    done
    return "$status"
}

part_peer() {
    local args=(--shapes "$OUT/shape.jsonl" --out "$OUT/peer.jsonl")
    if [ "$MODE" = rehearse ]; then
        args+=(--stub)
    else
        args+=(--budget "$((PART_LIMIT - 20))")
    fi
    (cd "$WORK/peers" && PYTHONUNBUFFERED=1 python3 gpu_peer.py "${args[@]}") >>"$OUT/peer.log" 2>&1
}

# ---- cuBLAS on the GPU machine (the image's PyTorch brings libcublas.so.13)

find_cublas() {
    local p d
    p="$(ldconfig -p 2>/dev/null | awk '/libcublas\.so\.13 /{print $NF; exit}')"
    if [ -z "$p" ]; then
        for d in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 /usr/local/cuda*/targets/x86_64-linux/lib \
            /opt/*/.venv/lib/python3*/site-packages/nvidia/cu13/lib /opt/*/.venv/lib/python3*/site-packages/nvidia/cublas/lib \
            /usr/local/lib/python3*/dist-packages/nvidia/cu13/lib /usr/local/lib/python3*/dist-packages/nvidia/cublas/lib \
            /usr/lib/x86_64-linux-gnu; do
            [ -e "$d/libcublas.so.13" ] && { p="$d/libcublas.so.13"; break; }
        done
    fi
    if [ -z "$p" ]; then
        p="$(timeout 20 find / -xdev \( -path /proc -o -path /sys \) -prune -o -name 'libcublas.so.13*' -print 2>/dev/null | head -n1 || true)"
    fi
    echo "$p"
}

# ---- one part, re-entered under `timeout`

if [ "${1:-}" = --part ]; then
    "part_$2"
    exit $?
fi

# ---- the run

MODE=gpu
BUNDLE=""
EMU_DIR=""
while [ $# -gt 0 ]; do
    case "$1" in
        --rehearse) MODE=rehearse ;;
        --bundle) BUNDLE="${2:?--bundle DIR}"; shift ;;
        --emu) EMU_DIR="${2:?--emu DIR}"; shift ;;
        -h | --help) sed -n '2,30p' "$self"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
done
command_line="scripts/gpu-run.sh"
if [ "$MODE" = rehearse ]; then command_line+=" --rehearse"; fi
command_line+="${BUNDLE:+ --bundle $BUNDLE}"
repo="$(cd "$(dirname "$self")/.." && pwd)"
if [ -z "$BUNDLE" ]; then
    # Beside this script when it runs from the bundle, else the repository's target/gpu-bundle.
    if [ -f "$(dirname "$self")/bundle.tar.xz" ]; then BUNDLE="$(dirname "$self")"; else BUNDLE="$repo/target/gpu-bundle"; fi
fi
[ -f "$BUNDLE/bundle.tar.xz" ] || die "$BUNDLE/bundle.tar.xz not found: build it with scripts/gpu-bundle.sh"
OUT="${OUT:-$PWD/gpu-run-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
for f in "${OUTPUT_FILES[@]}"; do fresh "$OUT/$f"; done
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-run.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
summary="$OUT/summary.txt"
say() { echo "$*" | tee -a "$summary"; }

start=$SECONDS
if command -v xz >/dev/null; then
    tar -xJf "$BUNDLE/bundle.tar.xz" -C "$WORK"
else
    # No xz on the image: Python's lzma does the same.
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' "$BUNDLE/bundle.tar.xz" "$WORK"
fi
say "gpu-run: mode=$MODE"
say "info date: $(date -u +%FT%TZ)"
say "info host: $(uname -n) ($(uname -m), $(nproc) cores)"
say "info command: $command_line"
while IFS= read -r line; do say "info bundle $line"; done <"$WORK/MANIFEST"
say "info unpack_seconds: $((SECONDS - start))"

export LD_LIBRARY_PATH="$WORK/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export SPARSEGRAD_GPU_SHAPE_EXE="$WORK/bin/gpu_shape" SPARSEGRAD_REQUIRE_CUDA=1
# Many test processes share the machine: keep each one's CPU threads few.
export RUST_TEST_THREADS=4 RAYON_NUM_THREADS=2 OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=2
if [ "$MODE" = rehearse ]; then
    EMU_DIR="${EMU_DIR:-$repo/target/cuda-emu}"
    [ -e "$EMU_DIR/libcuda.so" ] || die "no emulator at $EMU_DIR (python3 cuda/emu/build.py plain target/cuda-emu)"
    EMU_DIR="$(cd "$EMU_DIR" && pwd)"
    export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$EMU_DIR"
    export SPARSEGRAD_CUDA_TEST_BIG=0 SPARSEGRAD_BENCH_TINY=1 SPARSEGRAD_BENCH_TOKENS=32 SPARSEGRAD_BENCH_ITERS=1
    export SG_EMU_SEED=1
    say "info device: emulated (CPU emulation of CUDA, $EMU_DIR) - emulated, not a GPU result"
    say "info driver: emulated"
else
    CUBLAS_PATH="$(find_cublas)"
    [ -n "$CUBLAS_PATH" ] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$(dirname "$CUBLAS_PATH")"
    say "info device: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 || echo 'nvidia-smi failed')"
    say "info driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1 || echo '?')"
    say "info memory: $(nvidia-smi --query-gpu=memory.total,memory.used --format=csv,noheader 2>/dev/null | head -n1 || echo '?')"
    say "info clocks: $(nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,clocks.mem --format=csv,noheader 2>/dev/null | head -n1 || echo '?')"
fi
export CUBLAS_PATH="${CUBLAS_PATH:-}"
if [ "$MODE" = rehearse ]; then
    say "info cublas: the emulator's (emulated)"
else
    say "info cublas: ${CUBLAS_PATH:-libcublas.so.13 NOT FOUND (every CUDA part will fail)}"
fi
export OUT WORK MODE EMU_DIR

# GPU_RUN_LIMITS="tests=90,peer=60" overrides parts' limits (seconds), e.g. to try a timeout.
declare -A OVERRIDE=()
if [ -n "${GPU_RUN_LIMITS:-}" ]; then
    IFS=, read -r -a kv <<<"$GPU_RUN_LIMITS"
    for x in "${kv[@]}"; do
        [[ "$x" =~ ^([a-z]+)=([0-9]+)$ ]] && [ -n "${GPU_LIMIT[${BASH_REMATCH[1]}]:-}" ] || die "GPU_RUN_LIMITS: bad entry '$x'"
        OVERRIDE[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
    done
    say "info limits overridden: $GPU_RUN_LIMITS"
fi

status=0
sum=0
for p in "${PARTS[@]}"; do
    if [ "$MODE" = rehearse ]; then limit=${EMU_LIMIT[$p]}; else limit=${GPU_LIMIT[$p]}; fi
    limit=${OVERRIDE[$p]:-$limit}
    sum=$((sum + limit))
    t0=$SECONDS
    rc=0
    echo "gpu-run: part $p (limit ${limit} s)" >&2
    PART_LIMIT=$limit timeout -k 5 "$limit" bash "$self" --part "$p" || rc=$?
    if [ "$p" = tests ]; then gather_tests; fi
    [ "$rc" -eq 0 ] || status=1
    note=""
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then note=" (time limit)"; fi
    say "part $p rc=$rc seconds=$((SECONDS - t0)) limit=$limit$note"
done
say "total seconds=$((SECONDS - start)) limit_sum=$sum"
if [ "$status" -eq 0 ]; then say "result: PASS"; else say "result: FAIL"; fi
exit "$status"
