#!/usr/bin/env python3
"""SASS instruction counts of the CUDA kernels, per kernel and per innermost loop.

Usage: python .ci/sass_count.py [--json OUT] [--kernels REGEX] [FILE ...]

FILE is the built extension (default: dropit_cuda/_C*.so beside this checkout), an object file or
a cubin. Needs ``cuobjdump`` (from the CUDA toolkit, or the copy Triton ships); with ``nvdisasm``
and code compiled with ``-lineinfo`` each loop is labelled with its source lines.

For every kernel and architecture it prints the instructions of the kernel's main code (the
divergent-warp fallbacks the compiler parks after the final trap are counted apart, as "cold"),
then each innermost loop (a backward branch that encloses no other) with its size and the
instructions in it that the host SIMT layer also counts ("seen": global and shared loads,
stores and atomics, asynchronous global-to-shared copies, warp votes, shuffles, matches and
reductions, barriers). "per seen" is the loops' instructions per seen instruction. The JSON also lists every seen instruction with its chain of
kernel-header source lines and its loop: benchmarks/bench_kernel_cost.py matches them to the host
layer's sites to weigh each loop by how often it runs.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Opcodes (before the first dot) the host SIMT layer sees, by class.
SEEN = {
    "LDG": "global load", "LD": "global load", "STG": "global store", "ST": "global store",
    "LDS": "shared load", "STS": "shared store", "ATOMS": "shared atomic",
    "VOTE": "vote", "SHFL": "shuffle", "MATCH": "match", "REDUX": "reduce", "BAR": "barrier",
    "WARPSYNC": "warp barrier",
    "LDGSTS": "async copy",  # cp.async (sm_80+): a global load and shared store in one
}
INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
LABEL = re.compile(r"^(\.L_x_\d+):")
FILE_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
FUNC_CUOBJDUMP = re.compile(r"^\s*Function : (\S+)")
FUNC_NVDISASM = re.compile(r"^\.text\.(\S+):$")


def find_tool(name: str) -> str | None:
    """A CUDA binary tool: from CUDA_HOME, PATH, or the copy in Triton's package."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", name), os.X_OK):
            return os.path.join(home, "bin", name)
    if shutil.which(name):
        return shutil.which(name)
    try:
        import triton  # noqa: F401  (ships cuobjdump and nvdisasm)

        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if os.access(path, os.X_OK):
            return str(path)
    except ImportError:
        pass
    return None


@dataclass
class Instr:
    addr: int
    op: str
    target: str  # branch target (address or label), "" otherwise
    predicated: bool
    chain: list  # "file.cuh:N" of its kernel-header frames, innermost first; empty without line info
    never: bool = False  # predicated on !PT: never executes (nvcc pads LDGSTS with such LDS)

    @property
    def line(self) -> str:
        return self.chain[0] if self.chain else ""


@dataclass
class Loop:
    start: int
    end: int
    size: int = 0
    seen: dict = field(default_factory=dict)
    lines: str = ""
    blocks: list = field(default_factory=list)  # sizes of its basic blocks, in address order


def demangle(names: list[str]) -> list[str]:
    if not shutil.which("c++filt"):
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    short = []
    for n in out:
        n = re.sub(r"dropit::(\(anonymous namespace\)::)?", "", n)
        n = n.replace("unsigned long", "u64").replace("unsigned int", "u32").replace("unsigned short", "u16")
        n = re.sub(r"\((PackParams|UnpackParams)<.*", "", n)
        n = re.sub(r"\(.*\)$", "", n)
        short.append(n.replace("(KeySource)0", "Shared").replace("(KeySource)1", "Global").replace("(KeySource)2", "Random"))
    return short


def kernel_chain(frames: list[tuple[str, int]]) -> list[str]:
    """An instruction's place in the kernel headers: its frames in csrc/cuda/*.cuh other than the
    portability layer, innermost first (the host layer's sites resolve to the same chains)."""
    return [f"{os.path.basename(f)}:{n}" for f, n in frames if f.endswith(".cuh") and os.path.basename(f) != "simt.cuh"]


def parse(text: str, func_re: re.Pattern) -> dict[str, list[Instr]]:
    funcs: dict[str, list[Instr]] = {}
    cur = None
    frames: list[tuple[str, int]] = []
    new_group = True
    labels: dict[str, int] = {}
    for raw in text.splitlines():
        m = func_re.match(raw)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            labels = {}
            frames, new_group = [], True
            continue
        if cur is None:
            continue
        m = FILE_LINE.search(raw)
        if m:
            if new_group:
                frames, new_group = [], False
            frames.append((m.group(1), int(m.group(2))))
            continue
        m = INSTR.match(raw)
        if m:
            new_group = True
            op, args = m.group(3), m.group(4)
            target = ""
            if op.split(".")[0] in ("BRA", "BRX", "JMP"):
                t = re.search(r"\(?(\.L_x_\d+)\)?|(0x[0-9a-f]+)", args)
                if t:
                    target = t.group(1) or t.group(2)
            pred = (m.group(2) or "").strip()
            cur.append(Instr(int(m.group(1), 16), op, target, pred != "", kernel_chain(frames), pred == "@!PT"))
    return funcs


def seen_class(i: Instr) -> str | None:
    """The class of a seen instruction (one the host layer also counts), else None."""
    return None if i.never else SEEN.get(i.op.split(".")[0])


def analyse(instrs: list[Instr], label_addr: dict[str, int]) -> dict:
    instrs = [i for i in instrs if i.op != "NOP"]
    # The main code ends with its last unconditional EXIT; the compiler's fallbacks for warps
    # that reach a warp intrinsic diverged (entered by BRA.DIV) and the final trap come after it.
    exits = [k for k, i in enumerate(instrs) if i.op == "EXIT" and not i.predicated]
    end = exits[-1] + 1 if exits else len(instrs)
    main = instrs[:end]
    loops = []
    for i in main:
        if i.op.split(".")[0] == "BRA" and i.target:
            t = resolve(i.target, label_addr)
            if t is not None and t <= i.addr:
                loops.append(Loop(t, i.addr))
    innermost = [lp for lp in loops
                 if not any(o is not lp and lp.start <= o.start and o.end <= lp.end for o in loops)]
    innermost.sort(key=lambda lp: lp.start)
    # Basic blocks inside the loops: a block starts at a branch target and after a branch.
    targets = {resolve(i.target, label_addr) for i in main if i.target}
    block_starts = set(targets)
    for k, i in enumerate(main[:-1]):
        if i.op.split(".")[0] in ("BRA", "BRX", "JMP", "EXIT", "RET", "CALL", "BREAK", "WARPSYNC", "BSYNC"):
            block_starts.add(main[k + 1].addr)
    block_of = {}
    for li, lp in enumerate(innermost):
        sizes, b = [], -1
        for i in main:
            if lp.start <= i.addr <= lp.end:
                if b < 0 or i.addr in block_starts:
                    sizes.append(0)
                    b += 1
                sizes[b] += 1
                block_of[i.addr] = (li, b)
        lp.blocks = sizes
    seen_list = []  # every seen instruction: class, chain, innermost loop and block (or -1, -1)
    for i in main:
        cls = seen_class(i)
        if cls:
            loop, block = block_of.get(i.addr, (-1, -1))
            seen_list.append([cls, i.chain, loop, block])
    for lp in innermost:
        lines = []
        for i in main:
            if lp.start <= i.addr <= lp.end:
                lp.size += 1
                cls = seen_class(i)
                if cls:
                    lp.seen[cls] = lp.seen.get(cls, 0) + 1
                if i.line:
                    lines.append(i.line)
        files = sorted({ln.split(":")[0] for ln in lines})
        lp.lines = ", ".join(
            f"{f}:{min(int(ln.split(':')[1]) for ln in lines if ln.startswith(f + ':'))}-"
            f"{max(int(ln.split(':')[1]) for ln in lines if ln.startswith(f + ':'))}" for f in files)
    size = sum(lp.size for lp in innermost)
    seen = sum(sum(lp.seen.values()) for lp in innermost)
    return {
        "instructions": len(main),
        "cold_instructions": len(instrs) - len(main),
        "seen_instructions": len(seen_list),
        "loops": len(loops),
        "innermost_loops": [
            {"start": hex(lp.start), "size": lp.size, "seen": lp.seen, "lines": lp.lines, "blocks": lp.blocks}
            for lp in innermost
        ],
        "loop_instructions_per_seen": (size / seen) if seen else None,
        "seen_list": seen_list,
    }


def resolve(target: str, label_addr: dict[str, int]) -> int | None:
    if target.startswith("0x"):
        return int(target, 16)
    return label_addr.get(target)


def label_addresses(text: str) -> dict[str, dict[str, int]]:
    """Per function: label -> address of the instruction after it (nvdisasm output)."""
    out: dict[str, dict[str, int]] = {}
    cur = None
    pending: list[str] = []
    for raw in text.splitlines():
        m = FUNC_NVDISASM.match(raw)
        if m:
            cur = out.setdefault(m.group(1), {})
            pending = []
            continue
        m = LABEL.match(raw)
        if m and cur is not None:
            pending.append(m.group(1))
            continue
        m = INSTR.match(raw)
        if m and cur is not None:
            for lab in pending:
                cur[lab] = int(m.group(1), 16)
            pending = []
    return out


def disassemble(path: str, cuobjdump: str, nvdisasm: str | None) -> dict[str, dict[str, dict]]:
    """arch -> kernel (mangled) -> analysis."""
    result: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if nvdisasm:
            subprocess.run([cuobjdump, "-xelf", "all", os.path.abspath(path)], cwd=tmp, check=True,
                           capture_output=True)
            for cubin in sorted(glob.glob(os.path.join(tmp, "*.cubin"))):
                arch = re.search(r"sm_(\d+a?)", cubin)
                text = subprocess.run([nvdisasm, "-c", "-gi", cubin], check=True, capture_output=True,
                                      text=True).stdout
                labels = label_addresses(text)
                for name, instrs in parse(text, FUNC_NVDISASM).items():
                    result.setdefault(arch.group(0) if arch else "?", {})[name] = analyse(instrs, labels.get(name, {}))
            if result:
                return result
        text = subprocess.run([cuobjdump, "-sass", path], check=True, capture_output=True, text=True).stdout
        arch = "?"
        for part in re.split(r"(?m)^\s*arch = ", text)[1:]:
            arch = part.split()[0]
            for name, instrs in parse(part, FUNC_CUOBJDUMP).items():
                result.setdefault(arch, {})[name] = analyse(instrs, {})
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--kernels", default=".", help="only kernels whose short name matches this regex")
    args = ap.parse_args()
    files = args.files or sorted(glob.glob(str(ROOT / "dropit_cuda" / "_C*.so")))
    cuobjdump, nvdisasm = find_tool("cuobjdump"), find_tool("nvdisasm")
    if not files:
        print("sass_count: no built extension (dropit_cuda/_C*.so) and no file given", file=sys.stderr)
        return 1
    if not cuobjdump:
        print("sass_count: cuobjdump not found (CUDA toolkit or Triton's copy)", file=sys.stderr)
        return 1
    report = {}
    for path in files:
        per_arch = disassemble(path, cuobjdump, nvdisasm)
        for arch in sorted(per_arch):
            kernels = per_arch[arch]
            names = sorted(kernels)
            for mangled, short in sorted(zip(names, demangle(names)), key=lambda p: p[1]):
                if not re.search(args.kernels, short):
                    continue
                a = kernels[mangled]
                report.setdefault(arch, {})[short] = a
                ratio = a["loop_instructions_per_seen"]
                print(f"{arch}  {short}: {a['instructions']} instructions ({a['cold_instructions']} cold), "
                      f"{a['loops']} loops, loop instructions per seen instruction "
                      f"{'-' if ratio is None else f'{ratio:.1f}'}")
                for lp in a["innermost_loops"]:
                    seen = ", ".join(f"{v} {k}" for k, v in sorted(lp["seen"].items())) or "none"
                    print(f"    loop {lp['start']:>7} {lp['lines'] or '(no line info)'}: {lp['size']} instructions; seen: {seen}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
