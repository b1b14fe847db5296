#!/usr/bin/env bash
# Compiles the CUDA launchers (csrc/cuda/*.cu) with nvcc for sm_80 and sm_90,
# with `-Xptxas -v`, and prints each kernel's register and shared-memory usage,
# then the SASS instruction counts of each kernel's loops (.ci/sass_count.py).
# Needs nvcc and a CUDA build of torch; no GPU. Usage: .ci/ptxas_report.sh [archs...]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -gt 0 ]; then ARCHS=("$@"); else ARCHS=(80 90); fi
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
NVCC="$CUDA_HOME/bin/nvcc"
PY="${PYTHON:-python}"
TORCH_INC=$("$PY" -c "import torch.utils.cpp_extension as c; print(' '.join('-I'+p for p in c.include_paths()))")
ABI=$("$PY" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
status=0
GENCODE=()
for arch in "${ARCHS[@]}"; do GENCODE+=(-gencode "arch=compute_$arch,code=sm_$arch"); done
for src in csrc/cuda/*.cu; do
  log="$TMP/$(basename "$src" .cu).log"
  # One nvcc run for all archs: the host side is compiled once.
  obj="$TMP/$(basename "$src" .cu).o"
  if ! "$NVCC" -c "$src" -o "$obj" -std=c++20 -O3 -lineinfo --expt-relaxed-constexpr "${GENCODE[@]}" \
      -Xptxas -v -DDROPIT_WITH_CUDA -D_GLIBCXX_USE_CXX11_ABI="$ABI" \
      -Icsrc $TORCH_INC -I"$CUDA_HOME/include" >"$log" 2>&1; then
    echo "nvcc failed for $src:"; cat "$log"; status=1; continue
  fi
  if grep -qi "warning" "$log"; then echo "== $src: compiler warnings"; grep -i -A3 "warning" "$log" | head -40; fi
  echo "== $src (ptxas -v: registers, shared memory per kernel)"
  # ptxas prints "Compiling entry function '<mangled>' for 'sm_XX'" then "Used N registers, ...".
  awk '
    /Compiling entry function/ {
      n = split($0, q, "'"'"'"); name = q[2]; arch = q[4]
    }
    /bytes stack frame/ { frame = $0; sub(/^[ \t]+/, "", frame) }
    /Used [0-9]+ registers/ { line = $0; sub(/^.*Used/, "Used", line); print "  " arch "  " name ": " line "; " frame }
  ' "$log" | (command -v c++filt >/dev/null && c++filt || cat) \
    | sed -E 's/dropit::\(anonymous namespace\):://g; s/dropit:://g; s/unsigned long/u64/g; s/unsigned int/u32/g; s/unsigned short/u16/g' \
    | sort
done
# SASS instruction counts per kernel and per innermost loop, from the same objects (-lineinfo
# labels the loops with their source lines). Needs cuobjdump (the toolkit's, or Triton's copy).
echo "== SASS instructions per kernel and innermost loop (.ci/sass_count.py)"
if ! "$PY" .ci/sass_count.py "$TMP"/*.o; then echo "sass_count failed"; status=1; fi
exit $status
