"""What installing needs: the library runs on torch and numpy alone; the demo's packages are the
[demo] extra; a just-in-time build needs ninja and says so."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dropit_cuda import _native
from dropit_cuda.demo import EXTRA_PACKAGES

ROOT = Path(__file__).resolve().parent.parent


def test_library_works_without_the_demo_extra():
    """Import, convert, train a step and measure with scikit-learn, matplotlib and tqdm unimportable."""
    code = (
        "import sys\n"
        "for name in ('sklearn', 'matplotlib', 'tqdm'): sys.modules[name] = None\n"
        "import torch, dropit_cuda as dc\n"
        "m = dc.convert(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),"
        " gamma=0.5, chunk=16, skip_first=False)\n"
        "x = torch.randn(4, 8)\n"
        "m(x).sum().backward()\n"
        "assert dc.memory.measure(m, x).dropit_bytes > 0\n"
        "import dropit_cuda.demo\n"  # the demo package itself imports without its extra
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_package_metadata_keeps_demo_dependencies_optional():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = lambda reqs: {r.split(">")[0].split("=")[0].split("<")[0].strip() for r in reqs}  # noqa: E731
    assert names(project["dependencies"]) == {"torch", "numpy"}
    assert names(project["optional-dependencies"]["demo"]) == set(EXTRA_PACKAGES.values())


def _imported_top_modules(folder: Path) -> set[str]:
    """Top-level modules the Python files under ``folder`` import (any depth, importorskip too)."""
    import ast

    found = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip"
                  and node.args and isinstance(node.args[0], ast.Constant)):
                found.add(node.args[0].value.split(".")[0])
    return found


def test_test_extra_installs_what_the_tests_import():
    """``pip install ".[test]"`` must bring every third-party package the tests and the benchmarks
    they run import (a module counts as third-party when an installed distribution provides it)."""
    import importlib.metadata as md
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = list(project["dependencies"])
    for req in extras["test"]:
        wanted += extras[req[len("dropit_cuda["):-1]] if req.startswith("dropit_cuda[") else [req]
    declared = {re.split(r"[<>=!~\[ ]", r)[0].strip().lower().replace("_", "-") for r in wanted}
    provides = md.packages_distributions()
    needed = {}
    for module in _imported_top_modules(ROOT / "tests") | _imported_top_modules(ROOT / "benchmarks"):
        for dist in provides.get(module, []):
            needed.setdefault(dist.lower().replace("_", "-"), module)
    missing = {d: m for d, m in needed.items() if d not in declared and d != "dropit-cuda"}
    assert not missing, f"imported by tests/benchmarks but not in the [test] extra: {missing}"


def test_jit_build_without_ninja_names_it(monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(_native._build, "want_cuda", lambda: False)  # no CUDA set-up for this check
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: pytest.fail("built without ninja"))
    with pytest.raises(ImportError, match="ninja"):
        _native._jit_build()
