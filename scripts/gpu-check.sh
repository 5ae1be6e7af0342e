#!/usr/bin/env bash
# gpu-check.sh: build the CUDA test and benchmark binaries on a machine without a GPU, then
# run them on a GPU machine that has no Rust toolchain.
#
#   scripts/gpu-check.sh build   (here; no GPU needed)
#       Builds tests/cuda_*.rs and benches/cuda_{kernels,layer}.rs in release with the kernels
#       (nvcc from $NVCC, default /opt/cuda13/nvidia/cu13/bin/nvcc) and OpenBLAS linked
#       statically (SPARSEGRAD_OPENBLAS_STATIC=1; needs libgfortran.a: installs
#       libgfortran-12-dev with apt-get when `gcc -print-file-name=libgfortran.a` finds none),
#       in target/gpu-check. Copies the executables, stripped, into .gpu/bin (.gpu/ is added
#       to .git/info/exclude), checks with ldd that none needs libopenblas, and packs them
#       into .gpu/bins.tar.xz (what travels; the device tool carries at most 64 MiB).
#
#   scripts/gpu-check.sh run     (on the GPU machine, in the repository root, with .gpu
#                                 carried: device tool `run` with carry [".gpu"] and the
#                                 command `bash scripts/gpu-check.sh run`)
#       Unpacks the binaries, finds cuBLAS (libcublas.so.13: ldconfig, CUDA folders, the
#       nvidia-cublas Python wheel) and puts its folder on LD_LIBRARY_PATH, runs every test
#       binary and then the benchmark, each under a time limit. Writes into $OUT (or
#       ./gpu-check-out when OUT is unset): tests.log (all test output, --nocapture),
#       bench.log, and summary.txt (device, cuBLAS found, per-binary result lines, number
#       of tests skipped for want of a device, overall PASS/FAIL). Exits non-zero on failure.
#
# Environment: GPU_CHECK_TEST_TIMEOUT (seconds per test binary, default 300),
# GPU_CHECK_BENCH_TIMEOUT (default 240), GPU_CHECK_SKIP_BENCH=1 to run the tests only,
# GPU_CHECK_FILTER (passed to each test binary as a name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

GPU_DIR=.gpu

build() {
    export NVCC="${NVCC:-/opt/cuda13/nvidia/cu13/bin/nvcc}"
    [ -x "$NVCC" ] || { echo "gpu-check: nvcc not found at $NVCC (set NVCC)" >&2; exit 1; }
    local gf
    gf="$(gcc -print-file-name=libgfortran.a)"
    if [ "${gf#/}" = "$gf" ]; then
        echo "gpu-check: installing libgfortran-12-dev (static OpenBLAS needs libgfortran.a)" >&2
        apt-get install -y -q libgfortran-12-dev >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q libgfortran-12-dev >/dev/null; }
    fi
    export SPARSEGRAD_OPENBLAS_STATIC=1
    export CARGO_TARGET_DIR=target/gpu-check
    mkdir -p .git/info
    grep -qxF "/$GPU_DIR/" .git/info/exclude 2>/dev/null || echo "/$GPU_DIR/" >>.git/info/exclude
    rm -rf "$GPU_DIR" && mkdir -p "$GPU_DIR/bin"
    local list="$GPU_DIR/executables.txt"
    {
        cargo test --release --features recipes --no-run --message-format=json --test 'cuda_*'
        cargo bench --no-run --message-format=json --bench cuda_kernels --bench cuda_layer
    } | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    target = msg.get("target", {})
    if (msg.get("reason") == "compiler-artifact" and msg.get("executable")
            and target.get("name", "").startswith("cuda_")
            and set(target.get("kind", [])) & {"test", "bench"}):
        print(target["name"], msg["executable"])
' >"$list"
    [ -s "$list" ] || { echo "gpu-check: no executables were built" >&2; exit 1; }
    while read -r name exe; do
        cp "$exe" "$GPU_DIR/bin/$name"
        strip "$GPU_DIR/bin/$name"
        if ldd "$GPU_DIR/bin/$name" | grep -q openblas; then
            echo "gpu-check: $name still needs a shared libopenblas" >&2
            exit 1
        fi
    done <"$list"
    (cd "$GPU_DIR" && tar -cJf bins.tar.xz bin && rm -rf bin)
    echo "gpu-check: built $(wc -l <"$list") executables:"
    cut -d' ' -f1 "$list" | sed 's/^/  /'
    ls -l "$GPU_DIR/bins.tar.xz"
    local size
    size=$(stat -c %s "$GPU_DIR/bins.tar.xz")
    [ "$size" -lt $((60 * 1024 * 1024)) ] || { echo "gpu-check: $GPU_DIR/bins.tar.xz is over 60 MiB" >&2; exit 1; }
    echo "gpu-check: on the GPU machine run: bash scripts/gpu-check.sh run   (carry .gpu)"
}

find_cublas() {
    local p
    p="$(ldconfig -p 2>/dev/null | awk '/libcublas\.so\.13 /{print $NF; exit}')"
    if [ -z "$p" ]; then
        for d in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 /usr/local/cuda*/targets/x86_64-linux/lib \
            /usr/lib/x86_64-linux-gnu /opt/*/.venv/lib/python3*/site-packages/nvidia/cu13/lib \
            /opt/*/.venv/lib/python3*/site-packages/nvidia/cublas/lib /usr/local/lib/python3*/dist-packages/nvidia/cu13/lib \
            /usr/local/lib/python3*/dist-packages/nvidia/cublas/lib; do
            [ -e "$d/libcublas.so.13" ] && { p="$d/libcublas.so.13"; break; }
        done
    fi
    if [ -z "$p" ]; then
        p="$(find / -xdev \( -path /proc -o -path /sys \) -prune -o -name 'libcublas.so.13*' -print 2>/dev/null | head -n1 || true)"
    fi
    echo "$p"
}

run() {
    local out="${OUT:-$PWD/gpu-check-out}"
    mkdir -p "$out"
    local summary="$out/summary.txt" tests_log="$out/tests.log" bench_log="$out/bench.log"
    : >"$summary"
    : >"$tests_log"
    [ -f "$GPU_DIR/bins.tar.xz" ] || { echo "gpu-check: $GPU_DIR/bins.tar.xz missing: run 'scripts/gpu-check.sh build' here and carry .gpu" | tee -a "$summary"; exit 1; }
    local work
    work="$(mktemp -d)"
    tar -xJf "$GPU_DIR/bins.tar.xz" -C "$work"
    {
        echo "gpu-check on $(hostname) at $(date -u +%FT%TZ)"
        nvidia-smi -L 2>&1 || echo "nvidia-smi failed"
    } >>"$summary"
    local cublas
    cublas="$(find_cublas)"
    if [ -n "$cublas" ]; then
        export LD_LIBRARY_PATH="$(dirname "$cublas")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "cuBLAS: $cublas" >>"$summary"
    else
        echo "cuBLAS: libcublas.so.13 NOT FOUND (every CUDA test will skip)" >>"$summary"
    fi
    local status=0 t_timeout="${GPU_CHECK_TEST_TIMEOUT:-300}" filter="${GPU_CHECK_FILTER:-}"
    for exe in "$work"/bin/cuda_*; do
        local name
        name="$(basename "$exe")"
        [ "$name" = cuda_kernels ] && continue
        echo "===== $name" >>"$tests_log"
        local rc=0
        # shellcheck disable=SC2086
        timeout "$t_timeout" "$exe" --nocapture $filter >>"$tests_log" 2>&1 || rc=$?
        local line
        line="$(sed -n "/^===== $name\$/,\$p" "$tests_log" | grep -E '^test result:' | tail -n1 || true)"
        echo "$name: rc=$rc ${line:-no result line (crashed or timed out)}" >>"$summary"
        [ "$rc" -eq 0 ] || status=1
    done
    local skips
    skips=$(grep -c '^skipped: no CUDA device' "$tests_log" || true)
    echo "tests skipped for want of a device: $skips" >>"$summary"
    [ "$skips" -eq 0 ] || status=1
    if [ "${GPU_CHECK_SKIP_BENCH:-0}" != 1 ]; then
        : >"$bench_log"
        for bench in cuda_kernels cuda_layer; do
            [ -x "$work/bin/$bench" ] || continue
            local rc=0
            echo "===== $bench" >>"$bench_log"
            timeout "${GPU_CHECK_BENCH_TIMEOUT:-240}" "$work/bin/$bench" --bench >>"$bench_log" 2>&1 || rc=$?
            echo "$bench bench: rc=$rc" >>"$summary"
            [ "$rc" -eq 0 ] || status=1
        done
    fi
    if [ "$status" -eq 0 ]; then echo "PASS" >>"$summary"; else echo "FAIL" >>"$summary"; fi
    rm -rf "$work"
    cat "$summary"
    return "$status"
}

case "${1:-}" in
    build) build ;;
    run) run ;;
    *)
        sed -n '2,31p' "$0"
        exit 2
        ;;
esac
