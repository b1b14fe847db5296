#!/usr/bin/env bash
# Sets up and runs the test suite on a fresh machine: install dependencies, build the extension
# ahead of time in place (CUDA kernels too when a toolkit and a CUDA torch are present), run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
phase() { local name=$1; shift; local t0=$SECONDS; echo "== $name"; "$@"; echo "== $name took $((SECONDS - t0)) s"; }
phase "install dependencies" python -m pip install -q -r requirements-test.txt
phase "build extension" python -m pip install -q --no-build-isolation -e .
phase "tests" python -m pytest -q -ra "$@"
