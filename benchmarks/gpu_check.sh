#!/usr/bin/env bash
# The GPU-machine check, in one shot: on a machine with a CUDA GPU, torch (2.11 or newer) and nvcc,
# no network, builds the extension just in time with its CUDA kernels (for this GPU's architecture
# only, to be quick), runs the CUDA tests (tests/test_cuda.py and the CUDA cases of
# tests/test_relu_mask.py) and the GPU benchmarks (bench_train_step: GPT-2 small and ResNet-50
# training steps plain vs converted, eager and compiled, and pack/unpack bandwidth against the
# device's copy; bench_select, bench_relu_mask, a short bench_memory).
#
# OUTDIR receives two files: summary.txt (the machine, each step's status and seconds, the tail
# of each step's log) and gpu_check.tar.gz (every log, the tests' JUnit XML, the benchmarks' JSON
# and plot). Each step runs under `timeout`, a failed step doesn't stop the next ones, and the
# whole run stays within 5 minutes, the cold build included.
#
# Usage: benchmarks/gpu_check.sh OUTDIR        (PYTHON=... picks the interpreter)
set -uo pipefail
if [ $# -ne 1 ]; then echo "usage: $0 OUTDIR" >&2; exit 2; fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."

# `python` may be missing where only `python3` holds torch.
PY=${PYTHON:-python}
command -v "$PY" > /dev/null 2>&1 || PY=python3
BUDGET=${GPU_CHECK_BUDGET:-280}  # seconds for every step together; archiving uses part of the rest
WORK=$(mktemp -d)                # what goes into the archive
start=$SECONDS
status=0
steps=()

finish() {
  trap - EXIT TERM INT
  {
    echo "gpu_check: $( [ $status -eq 0 ] && echo ok || echo FAILED ) in $((SECONDS - start)) s"
    cat "$WORK/machine.log" 2> /dev/null
    echo
    printf '%-16s %-10s %5s %6s %6s\n' step status exit secs limit
    for line in "${steps[@]}"; do printf '%-16s %-10s %5s %6s %6s\n' $line; done
    for line in "${steps[@]}"; do
      set -- $line
      [ "$1" != machine ] && [ -f "$WORK/$1.log" ] || continue
      echo
      echo "== $1 ($2): last lines of $1.log"
      tail -n "$( [ "$2" = ok ] && echo 25 || echo 60 )" "$WORK/$1.log"
    done
  } > "$OUT/summary.txt"
  tar -czf "$OUT/gpu_check.tar.gz" -C "$WORK" . && rm -rf "$WORK"
  echo "== gpu_check: $( [ $status -eq 0 ] && echo ok || echo FAILED ) in $((SECONDS - start)) s:" \
       "$OUT/summary.txt, $OUT/gpu_check.tar.gz"
}
trap finish EXIT
trap 'status=1; exit 143' TERM INT  # killed from outside: still write what there is

# step NAME LIMIT CMD...: runs CMD under `timeout`, cut short where the budget runs out, logs to
# NAME.log; the status goes to the summary.
step() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - start)))
  if [ "$left" -lt 5 ]; then
    steps+=("$name skipped - 0 0"); status=1
    echo "== $name: skipped, out of time"; return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most $limit s)"
  local t0=$SECONDS
  timeout --kill-after=5 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$? state=ok
  case $rc in
    0) ;;
    124|137) state=timeout ;;
    *) state=FAILED ;;
  esac
  # A test step whose tests all skip proves nothing.
  if [ $rc -eq 0 ] && tail -n 1 "$WORK/$name.log" | grep -q skipped; then state=skips; fi
  [ "$state" = ok ] || status=1
  steps+=("$name $state $rc $((SECONDS - t0)) $limit")
  echo "== $name: $state (exit $rc) after $((SECONDS - t0)) s"
  return $rc
}

machine_info() {
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "cpus: $(nproc), python: $(command -v "$PY")"
  nvcc --version | tail -n 1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
}
export -f machine_info
export PY
step machine 40 bash -c machine_info

ARCH=$(timeout 30 "$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2> /dev/null || echo 9.0)
export DROPIT_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.torch_ext}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's dropit_cuda

# The just-in-time build; a later step resumes it (ninja keeps what was compiled) if it ran out
# of time, but after a compile error nothing else can run.
step build 150 "$PY" -c "import json, dropit_cuda as dc; info = dc.extension_info(); print(json.dumps(info)); assert info['cuda_kernels'] and info['cuda_available'], info"
build_rc=$?
if [ $build_rc -eq 0 ] || [ $build_rc -eq 124 ] || [ $build_rc -eq 137 ]; then
  # Most important first: when time runs short, the last steps are the ones cut.
  step test_cuda 60 "$PY" -m pytest -q -ra -p no:cacheprovider tests/test_cuda.py tests/test_relu_mask.py \
    -k "cuda or CUDA" --junitxml="$WORK/test_cuda.xml"
  # What users ask first: a training step of GPT-2 small and ResNet-50, plain vs converted (step
  # time, peak memory), and pack/unpack bandwidth against the device's copy bandwidth; compiled
  # models in a step of their own (compilation takes most of it), after the eager figures.
  step train_eager 45 "$PY" benchmarks/bench_train_step.py --device cuda --parts bandwidth train \
    --modes eager --json "$WORK/train_eager.json"
  step train_compiled 80 "$PY" benchmarks/bench_train_step.py --device cuda --parts train \
    --modes compiled --json "$WORK/train_compiled.json"
  step bench_select 25 "$PY" benchmarks/bench_select.py --device cuda --numel 67108864 --chunk 16384 \
    --gamma 0.9 --json "$WORK/bench_select.json"
  step bench_relu_mask 15 "$PY" benchmarks/bench_relu_mask.py --device cuda --numel 67108864 --repeats 5 \
    --json "$WORK/bench_relu_mask.json"
  step bench_memory 40 "$PY" benchmarks/bench_memory.py --device cuda --steps 5 --warmup 2 --markdown \
    --json "$WORK/bench_memory.json" --plot "$WORK/bench_memory.png"
  # Not here: benchmarks/bench_kernel_cost.py, the kernels' modelled cost on the host SIMT layer.
  # It needs no GPU (CI and the CPU machines run it); this script runs only what needs the GPU.
fi
exit $status
