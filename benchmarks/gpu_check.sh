#!/usr/bin/env bash
# The GPU-machine check: on a machine with a CUDA GPU, torch installed and no network, builds the
# extension just in time with its CUDA kernels (for this GPU's architecture only, to be quick),
# runs the CUDA tests (tests/test_cuda.py, the CUDA cases of tests/test_relu_mask.py) and the
# benchmarks (bench_select, bench_relu_mask, a short bench_memory), and writes everything into
# OUTDIR. At most 5 minutes. Usage: benchmarks/gpu_check.sh OUTDIR
set -uo pipefail
if [ $# -ne 1 ]; then echo "usage: $0 OUTDIR" >&2; exit 2; fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
start=$SECONDS
status=0
step() {  # step NAME SECONDS CMD...: runs CMD with a time limit, logs to OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  echo "$name $rc $((SECONDS - t0))" >> "$OUT/steps.txt"
  [ $rc -eq 0 ] || status=1
  return $rc
}
: > "$OUT/steps.txt"
{ date -u +%Y-%m-%dT%H:%M:%SZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1; } > "$OUT/machine.txt"
cat "$OUT/machine.txt"

ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "9.0")
export DROPIT_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.torch_ext}"

# Time limits add up to 300 s; expected on an H200 machine: well under that.
step build 120 "$PY" -c "import json, dropit_cuda as dc; info = dc.extension_info(); print(json.dumps(info)); assert info['cuda_kernels'] and info['cuda_available'], info"
if [ $? -eq 0 ]; then
  step test_cuda 75 "$PY" -m pytest -q -ra tests/test_cuda.py tests/test_relu_mask.py -k "cuda or CUDA" \
    --junitxml="$OUT/test_cuda.xml"
  step bench_select 30 "$PY" benchmarks/bench_select.py --device cuda --numel 67108864 --chunk 16384 \
    --gamma 0.9 --json "$OUT/bench_select.json"
  step bench_relu_mask 15 "$PY" benchmarks/bench_relu_mask.py --device cuda --numel 67108864 --repeats 5 \
    --json "$OUT/bench_relu_mask.json"
  step bench_memory 60 "$PY" benchmarks/bench_memory.py --device cuda --steps 5 --warmup 2 --markdown \
    --json "$OUT/bench_memory.json" --plot "$OUT/bench_memory.png"
fi
echo "== gpu_check: $( [ $status -eq 0 ] && echo ok || echo FAILED ) in $((SECONDS - start)) s; results in $OUT"
exit $status
