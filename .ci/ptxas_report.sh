#!/usr/bin/env bash
# Compiles the CUDA launchers (csrc/cuda/*.cu) with nvcc for sm_80 and sm_90,
# with `-Xptxas -v`, and prints each kernel's register and shared-memory usage.
# Needs nvcc and a CUDA build of torch; no GPU. Usage: .ci/ptxas_report.sh [archs...]
set -euo pipefail
cd "$(dirname "$0")/.."
ARCHS=("${@:-80 90}")
[ $# -gt 0 ] || ARCHS=(80 90)
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
NVCC="$CUDA_HOME/bin/nvcc"
PY="${PYTHON:-python}"
TORCH_INC=$("$PY" -c "import torch.utils.cpp_extension as c; print(' '.join('-I'+p for p in c.include_paths()))")
ABI=$("$PY" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
status=0
for src in csrc/cuda/*.cu; do
  for arch in "${ARCHS[@]}"; do
    log="$TMP/$(basename "$src" .cu)_sm$arch.log"
    if ! "$NVCC" -c "$src" -o "$TMP/out.o" -std=c++20 -O3 --expt-relaxed-constexpr \
        -gencode "arch=compute_$arch,code=sm_$arch" -Xptxas -v \
        -DDROPIT_WITH_CUDA -D_GLIBCXX_USE_CXX11_ABI="$ABI" \
        -Icsrc $TORCH_INC -I"$CUDA_HOME/include" >"$log" 2>&1; then
      echo "nvcc failed for $src (sm_$arch):"; cat "$log"; status=1; continue
    fi
    echo "== $src sm_$arch"
    # ptxas prints "Compiling entry function '<mangled>'" then "Used N registers, ... smem ...".
    awk '
      /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); name = substr($0, RSTART + 1, RLENGTH - 2) }
      /Used [0-9]+ registers/ { sub(/^.*Used/, "Used"); print "  " name ": " $0 }
    ' "$log" | (command -v c++filt >/dev/null && c++filt || cat) | sed -E 's/dropit::\(anonymous namespace\):://g; s/dropit:://g'
  done
done
exit $status
