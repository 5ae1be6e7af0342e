#!/usr/bin/env bash
# The peer harness: the same jobs in PyTorch (+ transformers, PEFT; the official SparseGrad
# algorithm written from the paper) and in sparsegrad, interleaved in one run so both sides
# see the same machine load. Not part of CI. Creates its own venv (target/peers-venv,
# pinned versions in requirements.txt) on first use.
#
# usage: benches/peers/run.sh [layer|basis|finetune|all]...   (default: all)
# env:   PEER_THREADS (2), PEER_ROUNDS (2: peer/ours pairs per layer shape),
#        PEER_LAYER_SHAPES (bert-up,bert-down; also smollm2-up, llama-7b: cpu_layer's names),
#        PEER_STEPS (6: timed fine-tuning steps per side), PEER_MODEL (the GGUF in assets/),
#        OPENBLAS_CORETYPE (unless set: SkylakeX where the CPU has avx512f, else Haswell, as
#        scripts/run-example.sh picks; Debian's OpenBLAS misdetects these CPUs otherwise)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
VENV=$ROOT/target/peers-venv
REQ=$ROOT/benches/peers/requirements.txt
if [ ! -f "$VENV/.installed" ] || ! cmp -s "$REQ" "$VENV/.installed"; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q -r "$REQ"
    cp "$REQ" "$VENV/.installed"
fi
PY="$VENV/bin/python"
if grep -q avx512f /proc/cpuinfo 2>/dev/null; then coretype=SkylakeX; else coretype=Haswell; fi
export OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-$coretype}
export OMP_NUM_THREADS=${PEER_THREADS:-2} OPENBLAS_NUM_THREADS=${PEER_THREADS:-2}
export RAYON_NUM_THREADS=${PEER_THREADS:-2}
THREADS=${PEER_THREADS:-2}
ROUNDS=${PEER_ROUNDS:-2}
STEPS=${PEER_STEPS:-6}
MODEL=${PEER_MODEL:-$ROOT/assets/SmolLM2-135M-Instruct.Q4_1.gguf}
WORK=$ROOT/target/peers-work
mkdir -p "$WORK"
LOG=$WORK/run-$(date -u +%Y%m%dT%H%M%S).log
JOBS=("$@")
[ ${#JOBS[@]} -eq 0 ] && JOBS=(layer basis finetune)

say() { echo "$@" | tee -a "$LOG"; }
run() { "$@" 2>&1 | tee -a "$LOG"; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

say "peer harness $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) $(nproc) cores," \
    "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)," \
    "avx512f: $(grep -q avx512f /proc/cpuinfo && echo yes || echo no), OPENBLAS_CORETYPE=$OPENBLAS_CORETYPE, threads $THREADS"
cargo build --release --quiet --features recipes --bin sparsegrad --example llama_mlp_finetune
cargo bench --quiet --no-run --bench cpu_layer 2>/dev/null

for job in "${JOBS[@]}"; do
    case $job in
    layer)
        # Shapes as cpu_layer names them; llama-7b (4096 -> 11008) is minutes per side.
        IFS=, read -r -a shapes <<<"${PEER_LAYER_SHAPES:-bert-up,bert-down}"
        for shape in "${shapes[@]}"; do
            case $shape in
            bert-up) dims=(--out 3072 --inp 768) ;;
            bert-down) dims=(--out 768 --inp 3072) ;;
            smollm2-up) dims=(--out 1536 --inp 576) ;;
            llama-7b) dims=(--out 11008 --inp 4096) ;;
            *) echo "unknown layer shape $shape (bert-up, bert-down, smollm2-up, llama-7b)" >&2; exit 2 ;;
            esac
            iters=3
            [ "$shape" = llama-7b ] && iters=1
            for r in $(seq "$ROUNDS"); do
                say "== layer $shape round $r: peer (load $(loadavg))"
                (cd benches/peers && run "$PY" layer.py "${dims[@]}" --iters "$iters" --threads "$THREADS")
                say "== layer $shape round $r: ours (load $(loadavg))"
                SPARSEGRAD_BENCH_SHAPES=$shape SPARSEGRAD_BENCH_ITERS=$iters run cargo bench --quiet --bench cpu_layer
            done
        done
        ;;
    basis)
        G=$WORK/grads30.safetensors
        [ -f "$G" ] || (cd benches/peers && "$PY" basis.py --write "$G")
        say "== basis: ours (load $(loadavg))"
        /usr/bin/time -f "OURS basis: %e s wall, %U s user, peak RSS %M KB" \
            target/release/sparsegrad basis --grads "$G" --output "$WORK/basis30.safetensors" 2>&1 | tee -a "$LOG"
        say "== basis: peer (load $(loadavg))"
        (cd benches/peers && run "$PY" basis.py --threads "$THREADS")
        ;;
    finetune)
        for m in sparsegrad lora full; do
            say "== finetune $m: peer (load $(loadavg))"
            (cd benches/peers && run "$PY" finetune.py --model "$MODEL" --method "$m" --steps "$STEPS" --threads "$THREADS")
            say "== finetune $m: ours (load $(loadavg))"
            extra=()
            [ "$m" = lora ] && extra=(--lora-rank 4)
            target/release/examples/llama_mlp_finetune --model "$MODEL" --method "$m" --blocks 23,26,29 \
                --batch 8 --seq-len 32 --keep 0.01 --steps $((STEPS + 1)) --eval-batches 1 --eval-every 0 \
                --prelim-steps 4 --out "$WORK/ft-$m" "${extra[@]}" 2>&1 | grep -E "tokens/s|time  |step time" | tee -a "$LOG"
            say "OURS finetune $m: $((STEPS + 1)) steps of 8 x 32 (load $(loadavg))"
        done
        ;;
    *) echo "unknown job $job (layer, basis, finetune)" >&2; exit 2 ;;
    esac
done
"$PY" benches/peers/summarize.py "$LOG"
