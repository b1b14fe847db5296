#!/usr/bin/env bash
# Sets up and runs the test suite on a fresh machine: install dependencies, build the extension
# ahead of time in place (CUDA kernels too when a toolkit and a CUDA torch are present), run pytest
# on the source tree. The in-place build registers nothing in site-packages, so other checkouts on
# the same machine keep importing their own code.
set -euo pipefail
cd "$(dirname "$0")/.."
phase() { local name=$1; shift; local t0=$SECONDS; echo "== $name"; "$@"; echo "== $name took $((SECONDS - t0)) s"; }
phase "install dependencies" python -m pip install -q -r requirements-test.txt
phase "build extension" python setup.py -q build_ext --inplace
phase "tests" python -m pytest -q -ra "$@"
