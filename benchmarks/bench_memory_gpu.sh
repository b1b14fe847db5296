#!/usr/bin/env bash
# Short CUDA run of bench_memory.py (saved-for-backward bytes, peak memory, median step time) at the
# full batches (ResNet-18 CIFAR 128, ViT-B/16 64). Meant to be called from the GPU-machine script;
# writes memory_gpu.{json,png,txt} into $OUT (default bench-results/). Extra arguments are passed on.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench-results}"
mkdir -p "$OUT"
timeout "${BENCH_MEMORY_TIMEOUT:-420}" python benchmarks/bench_memory.py --device cuda \
    --steps 10 --warmup 3 --markdown \
    --json "$OUT/memory_gpu.json" --plot "$OUT/memory_gpu.png" "$@" | tee "$OUT/memory_gpu.txt"
