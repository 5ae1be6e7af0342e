#!/usr/bin/env bash
# gpu-rehearse.sh: the GPU run rehearsed end to end on the CPU emulation of CUDA, at tiny
# sizes, as CI runs it (scripts/test.sh, after scripts/test-cuda-emu.sh plain has built the
# CUDA test binaries and target/cuda-emu). Nothing it prints is a GPU result.
#
#   1. scripts/gpu-bundle.sh --from-release: packs the binaries already built in target/release
#      into target/gpu-bundle-rehearse (same packing, ldd and size checks as the real bundle);
#   2. runs that bundle's gpu-run.sh --rehearse (OUT=target/gpu-rehearse-out): every part, a
#      stub in place of the PyTorch peer; fails if any part fails;
#   3. scripts/gpu-report.py turns the outputs into the RESULTS.md format
#      (target/gpu-rehearse-out/report.md): fails if any part is missing or a figure is not
#      labelled emulated; and checks that the report rejects the same output with a part cut.
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=target/gpu-bundle-rehearse
out=target/gpu-rehearse-out
[ -e target/cuda-emu/libcuda.so ] || python3 cuda/emu/build.py plain target/cuda-emu
scripts/gpu-bundle.sh --from-release --out "$bundle"
mkdir -p "$out"
run_rc=0
OUT="$out" bash "$bundle/gpu-run.sh" --rehearse --bundle "$bundle" --emu target/cuda-emu || run_rc=$?
report="$(mktemp)"
cut="$(mktemp -d)"
trap 'rm -rf "$report" "$cut"' EXIT
python3 scripts/gpu-report.py "$out" >"$report"
cp "$report" "$out/report.md"
grep -q 'emulated - not a GPU result' "$report" || { echo "gpu-rehearse: the report does not say it is emulated" >&2; exit 1; }
# Every timing in the report's tables carries the emulated mark (the parts' wall seconds and
# the tests' counts are the rehearsal's own bookkeeping, not device figures).
if grep -E '^\| ' "$report" | grep -vE '^\| (part|---|run|binary|shape|op|preflight|tests|kernels|layer|peer|test_cuda_[a-z0-9_]+) \|' |
    grep -E '\| [0-9.]+(x|%| [A-Za-z/]+)? \|' >&2; then
    echo "gpu-rehearse: the figures above are not marked emulated" >&2
    exit 1
fi
cp "$out"/* "$cut/"
sed -i '/^part shape /d' "$cut/summary.txt"
if python3 scripts/gpu-report.py "$cut" >/dev/null 2>"$cut/err"; then
    echo "gpu-rehearse: the report accepted an output without its shape part" >&2
    exit 1
fi
grep -q '^missing: part shape' "$cut/err"
if [ "$run_rc" -ne 0 ]; then
    echo "gpu-rehearse: the report format holds, but these parts failed on the emulated device:" >&2
    grep -E '^part .* rc=[^0]' "$out/summary.txt" >&2 || true
    echo "gpu-rehearse: details in $out/*.log; report in $out/report.md" >&2
    exit 1
fi
echo "gpu-rehearse: passed; the report is $out/report.md (emulated - not a GPU result)"
