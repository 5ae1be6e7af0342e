#!/usr/bin/env bash
# gpu-bundle.sh: build, here (no GPU needed), the one bundle that travels to a GPU machine with
# no Rust toolchain: every CUDA test binary (tests/cuda_*.rs), the CUDA benches
# (benches/cuda_kernels.rs, benches/cuda_layer.rs), the gpu_shape example, one shared
# OpenBLAS (libopenblas + libgfortran + libquadmath, the only libraries they need beyond
# glibc and the two CUDA libraries the GPU image provides), the PyTorch peer
# (benches/peers/gpu_peer.py, official_sparsegrad.py) and scripts/gpu-run.sh.
#
#   scripts/gpu-bundle.sh [--no-rehearse]
#       Kernels for sm_90 machine code + compute_90 PTX (SPARSEGRAD_CUDA_ARCHS, see build.rs),
#       built in target/gpu-bundle-build (seeded from target/release when that exists, so
#       only sparsegrad itself recompiles); the bundle lands in target/gpu-bundle:
#       bundle.tar.xz (stripped binaries, lib/, peers/, MANIFEST), MANIFEST (a copy) and
#       gpu-run.sh (a copy). Fails if target/gpu-bundle is 48 MiB or more, if `ldd` finds a
#       binary missing any library but libcuda/libcublas (cudarc opens those two with dlopen at
#       run time: they are not even linked), or, unless --no-rehearse, if the bundle does not
#       run end to end on the emulated device (scripts/gpu-run.sh --rehearse).
#   scripts/gpu-bundle.sh --from-release [--out DIR]
#       The CI rehearsal's bundle: the binaries that scripts/test.sh already built in
#       target/release (default kernel archs), same packing and checks, into DIR (default
#       target/gpu-bundle-rehearse); no rehearsal run (the caller runs it).
#
# Then on the GPU machine (device tool `run`, carry ["target/gpu-bundle"]):
#   bash target/gpu-bundle/gpu-run.sh --bundle target/gpu-bundle      (writes into $OUT)
# Environment: NVCC (as build.rs; default scripts/setup.sh's path), GPU_BUNDLE_MAX_MIB (48).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

from_release=0
rehearse=1
dest=""
while [ $# -gt 0 ]; do
    case "$1" in
        --from-release) from_release=1 ;;
        --no-rehearse) rehearse=0 ;;
        --out) dest="${2:?--out DIR}"; shift ;;
        -h | --help) sed -n '2,29p' "$0"; exit 0 ;;
        *) echo "gpu-bundle: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
max_mib="${GPU_BUNDLE_MAX_MIB:-48}"

if [ -z "${NVCC:-}" ]; then
    NVCC="${SPARSEGRAD_CUDA_DIR:-$HOME/.cache/sparsegrad/cuda-13.0}/nvidia/cu13/bin/nvcc"
fi
[ -x "$NVCC" ] || { echo "gpu-bundle: nvcc not found at $NVCC (run scripts/setup.sh): the bundle needs the kernels" >&2; exit 1; }
export NVCC

if [ "$from_release" = 1 ]; then
    dest="${dest:-target/gpu-bundle-rehearse}"
    archs="default (build.rs: sm_80,sm_90,compute_90)"
    unset CARGO_TARGET_DIR SPARSEGRAD_CUDA_ARCHS
else
    dest="${dest:-target/gpu-bundle}"
    export SPARSEGRAD_CUDA_ARCHS=sm_90,compute_90
    archs="$SPARSEGRAD_CUDA_ARCHS"
    export CARGO_TARGET_DIR=target/gpu-bundle-build
    if [ ! -d "$CARGO_TARGET_DIR" ] && [ -d target/release ]; then
        # Dependencies built with the same flags are reused; only sparsegrad recompiles.
        mkdir -p "$CARGO_TARGET_DIR"
        cp -a --reflink=auto target/release "$CARGO_TARGET_DIR/release"
    fi
fi
case "$dest" in target/*) ;; *) echo "gpu-bundle: --out must be under target/ (it is replaced)" >&2; exit 2 ;; esac

echo "gpu-bundle: building (kernels: $archs)" >&2
list="$(mktemp)"
stage="$(mktemp -d)"
trap 'rm -rf "$list" "$stage"' EXIT
{
    cargo test --release --features recipes --no-run --message-format=json --test 'cuda_*'
    cargo build --release --features recipes --message-format=json --bench cuda_kernels --bench cuda_layer --example gpu_shape
} | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target", {})
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    kind = set(t.get("kind", []))
    name = t.get("name", "")
    if "test" in kind and name.startswith("cuda_"):
        print("test_" + name, m["executable"])
    elif "bench" in kind and name in ("cuda_kernels", "cuda_layer"):
        print("bench_" + name, m["executable"])
    elif "example" in kind and name == "gpu_shape":
        print(name, m["executable"])
' | sort -u >"$list"
expected_tests=$(find tests -maxdepth 1 -name 'cuda_*.rs' | wc -l)
got_tests=$(grep -c '^test_' "$list" || true)
[ "$got_tests" -eq "$expected_tests" ] || { echo "gpu-bundle: built $got_tests CUDA test binaries, expected $expected_tests" >&2; exit 1; }
for want in bench_cuda_kernels bench_cuda_layer gpu_shape; do
    grep -q "^$want " "$list" || { echo "gpu-bundle: $want was not built" >&2; exit 1; }
done

mkdir -p "$stage/bin" "$stage/lib" "$stage/peers"
while read -r name exe; do
    cp "$exe" "$stage/bin/$name"
    strip --strip-debug --strip-unneeded "$stage/bin/$name"
done <"$list"

# The libraries the binaries need beyond glibc and the CUDA libraries: one copy each.
system='^(linux-vdso|libc|libm|libgcc_s|libpthread|libdl|librt|ld-linux-x86-64|libstdc\+\+)\.so'
for exe in "$stage"/bin/*; do
    ldd "$exe" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}'
done | sort -u | while read -r soname path; do
    if [[ "$soname" =~ $system ]] || [[ "$soname" =~ ^libcu(da|blas) ]]; then continue; fi
    cp -L "$path" "$stage/lib/$soname"
    strip --strip-unneeded "$stage/lib/$soname" 2>/dev/null || true
done
[ -e "$stage/lib/libopenblas.so.0" ] || { echo "gpu-bundle: libopenblas.so.0 was not collected" >&2; ls "$stage/lib" >&2; exit 1; }

# ldd with only the bundle's lib/ (and no system OpenBLAS fallback can hide a gap: the
# loader would still find /lib copies, so check each needed soname is in lib/ or system).
bad=0
for exe in "$stage"/bin/*; do
    if LD_LIBRARY_PATH="$stage/lib" ldd "$exe" | grep -q 'not found'; then
        echo "gpu-bundle: $(basename "$exe") misses a library:" >&2
        LD_LIBRARY_PATH="$stage/lib" ldd "$exe" | grep 'not found' >&2
        bad=1
    fi
    if LD_LIBRARY_PATH="$stage/lib" ldd "$exe" | grep -E 'libcuda|libcublas' >&2; then
        echo "gpu-bundle: $(basename "$exe") links CUDA libraries (expected dlopen at run time)" >&2
        bad=1
    fi
    for need in $(objdump -p "$exe" | awk '/NEEDED/{print $2}'); do
        if ! [[ "$need" =~ $system ]] && [ ! -e "$stage/lib/$need" ]; then
            echo "gpu-bundle: $(basename "$exe") needs $need, which the bundle does not carry" >&2
            bad=1
        fi
    done
done
[ "$bad" -eq 0 ] || exit 1
glibc=$(for exe in "$stage"/bin/* "$stage"/lib/*; do objdump -T "$exe" 2>/dev/null | grep -o 'GLIBC_[0-9.]*'; done | sort -uV | tail -n1)

cp benches/peers/gpu_peer.py benches/peers/official_sparsegrad.py "$stage/peers/"
commit="$(git rev-parse HEAD)"
git diff --quiet HEAD -- src cuda tests benches examples build.rs Cargo.toml Cargo.lock scripts || commit="$commit+uncommitted-changes"
{
    echo "commit: $commit"
    echo "built: $(date -u +%FT%TZ) on $(uname -m) ($(rustc --version))"
    echo "kernel_archs: $archs"
    echo "glibc_needed: ${glibc#GLIBC_}"
    echo "libraries: $(cd "$stage/lib" && ls | tr '\n' ' ')"
    echo "binaries: $(wc -l <"$list")"
    while read -r name _; do
        case "$name" in
            test_*) echo "tests $name: $("$stage/bin/$name" --list 2>/dev/null | grep -c ': test$' || true)" ;;
        esac
    done <"$list"
} >"$stage/MANIFEST"

rm -rf "$dest"
mkdir -p "$dest"
echo "gpu-bundle: packing $(du -sh "$stage" | cut -f1) into $dest/bundle.tar.xz" >&2
# One xz stream over similar binaries: the copies of sparsegrad and the kernels compress away.
# The CI rehearsal packs at -6 (about twice as fast; the bundle stays far under the limit).
level=-9
[ "$from_release" = 1 ] && level=-6
tar -C "$stage" -cf - MANIFEST bin lib peers | xz "$level" -T2 >"$dest/bundle.tar.xz"
cp "$stage/MANIFEST" "$dest/MANIFEST"
cp scripts/gpu-run.sh "$dest/gpu-run.sh"
size=$(du -sb "$dest" | cut -f1)
echo "gpu-bundle: $dest is $((size / 1024)) KiB ($(awk -v s="$size" 'BEGIN{printf "%.1f", s / 1048576}') MiB; limit $max_mib MiB)" >&2
[ "$size" -lt $((max_mib * 1024 * 1024)) ] || { echo "gpu-bundle: $dest is over $max_mib MiB" >&2; exit 1; }
sed 's/^/  /' "$dest/MANIFEST" >&2

if [ "$from_release" = 0 ] && [ "$rehearse" = 1 ]; then
    [ -e target/cuda-emu/libcuda.so ] || python3 cuda/emu/build.py plain target/cuda-emu
    out="target/gpu-bundle-check"
    mkdir -p "$out"
    echo "gpu-bundle: rehearsing the bundle on the emulated device (OUT=$out)" >&2
    rc=0
    OUT="$out" bash "$dest/gpu-run.sh" --rehearse --bundle "$dest" --emu target/cuda-emu || rc=$?
    python3 scripts/gpu-report.py "$out" >"$out/report.md"
    if [ "$rc" -ne 0 ]; then
        echo "gpu-bundle: $dest is built, but on the emulated device these parts failed:" >&2
        grep -E '^part .* rc=[^0]' "$out/summary.txt" >&2 || true
        echo "gpu-bundle: see $out/*.log and $out/report.md (--no-rehearse skips this check)" >&2
        exit 1
    fi
    echo "gpu-bundle: rehearsal passed; report in $out/report.md" >&2
fi
echo "gpu-bundle: on the GPU machine run: bash target/gpu-bundle/gpu-run.sh --bundle target/gpu-bundle   (carry target/gpu-bundle)" >&2
