"""What a user asks first on a GPU: the training step of a real model, plain vs converted.

Parts (each runs on its own and records its error instead of stopping the others):

- ``train``: a GPT-2-small-sized decoder (12 layers, 768 wide, 12 heads, 50257-token vocabulary,
  8 sequences of 1024 tokens) and a torchvision ResNet-50 (batch 64, 224x224), both under bf16
  autocast, plain and ``dc.convert(gamma=0.9)``, eager or ``torch.compile``: the median step
  time (forward, backward, SGD step) and ``torch.cuda.max_memory_allocated`` over the timed steps.
- ``bandwidth``: pack and unpack (D = 16384, gamma = 0.9, bitmap index) of 64M float32 and
  bfloat16 elements, as a fraction of the device's measured copy bandwidth (``y.copy_(x)`` on a
  tensor of the same bytes): the bytes each must move (pack reads the input, writes the kept
  values and the bitmap; unpack the reverse) over its median time.

``--tiny`` shrinks every size (2 layers, 64 wide, 2 x 32 tokens; a ResNet of one bottleneck block
a stage on 2 x 32x32; 64K elements) so the whole script runs on a CPU in seconds: tests/test_gpu_check.py runs it that
way. Figures from a CPU are not GPU figures; the JSON records the device.

    python benchmarks/bench_train_step.py --device cuda --parts train --modes eager --json train.json
    python benchmarks/bench_train_step.py --device cpu --tiny --json tiny.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dropit_cuda as dc  # noqa: E402

PARTS = ("train", "bandwidth")
MODELS = ("gpt2_small", "resnet50")
MODES = ("eager", "compiled")


class Block(nn.Module):
    """A GPT-2 block: pre-norm causal self-attention and a 4x MLP with GELU."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, w // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, w))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    """A GPT-2-shaped language model (learned positions, tied input/output embedding)."""

    def __init__(self, layers: int, width: int, heads: int, vocab: int, context: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        for emb in (self.tok, self.pos):  # GPT-2's initialisation: the logits start small
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln(x), self.tok.weight)


def gpt2_small(tiny: bool, device: torch.device) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    """The model and a loss function of it on fixed random tokens (next-token cross entropy)."""
    layers, width, heads, vocab, batch, seq = (2, 64, 2, 512, 2, 32) if tiny else (12, 768, 12, 50257, 8, 1024)
    torch.manual_seed(0)
    model = GPT(layers, width, heads, vocab, seq).to(device)
    ids = torch.randint(vocab, (batch, seq + 1), device=device)

    def loss(m: nn.Module) -> torch.Tensor:
        logits = m(ids[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())

    return model, loss


def resnet50(tiny: bool, device: torch.device) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    from torchvision.models.resnet import Bottleneck, ResNet

    batch, side = (2, 32) if tiny else (64, 224)
    torch.manual_seed(0)
    # ResNet-50 is ResNet(Bottleneck, [3, 4, 6, 3]); tiny: one bottleneck block a stage.
    model = ResNet(Bottleneck, [1, 1, 1, 1] if tiny else [3, 4, 6, 3])
    model = model.to(device).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, side, side, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(1000, (batch,), device=device)
    return model, lambda m: F.cross_entropy(m(x).float(), y)


BUILDERS = {"gpt2_small": gpt2_small, "resnet50": resnet50}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_case(model_name: str, variant: str, mode: str, gamma: float, device: torch.device, tiny: bool,
               warmup: int, steps: int, backend: str = "inductor") -> dict:
    """One model's training step: median seconds and peak allocated bytes over the timed steps."""
    model, loss_of = BUILDERS[model_name](tiny, device)
    model.train()
    if variant == "converted":
        dc.convert(model, gamma=gamma)
    run = torch.compile(model, backend=backend) if mode == "compiled" else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    losses = []

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_of(run)
        loss.backward()
        opt.step()
        losses.append(loss.detach())

    t_first = time.perf_counter()
    step()  # the first step (compilation, autotuning, allocator growth) is timed apart
    sync(device)
    first = time.perf_counter() - t_first
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median_seconds(step, device, max(0, warmup - 1), steps)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    last = losses[-1].item()
    if not math.isfinite(last):
        raise FloatingPointError(f"{model_name} {variant} {mode}: loss {last}")
    row = {"part": "train", "model": model_name, "variant": variant, "mode": mode, "gamma": gamma if
           variant == "converted" else None, "step_ms": seconds * 1e3, "first_step_s": first,
           "max_memory_allocated": peak, "loss": last}
    if variant == "converted":
        row["report_cached_fraction"] = _cached_fraction(model)
    return row


def _cached_fraction(model: nn.Module) -> float | None:
    """The cached over dense bytes of the converted products (dc.report), if it tells them."""
    try:
        rep = dc.report(model)
        return rep.cached_bytes / rep.dense_bytes if rep.dense_bytes else None
    except Exception:  # the report is informative only
        return None


def bandwidth_case(dtype: torch.dtype, device: torch.device, tiny: bool, repeats: int) -> dict:
    """Pack and unpack bandwidth as a fraction of the device's copy bandwidth, one dtype."""
    n, D, gamma = (1 << 16) if tiny else (1 << 26), 16384, 0.9
    ops = torch.ops.dropit_cuda
    x = torch.randn(n, device=device).to(dtype)
    y = torch.empty_like(x)
    values, index = ops.pack(x, gamma, D, True, None)
    es = x.element_size()
    packed = values.numel() * es + index.numel() * index.element_size()
    copy_s = median_seconds(lambda: y.copy_(x), device, 2, repeats)
    pack_s = median_seconds(lambda: ops.pack(x, gamma, D, True, None), device, 2, repeats)
    unpack_s = median_seconds(lambda: ops.unpack(values, index, n, gamma, D, True), device, 2, repeats)
    copy_bw = 2 * n * es / copy_s
    pack_bw = (n * es + packed) / pack_s
    unpack_bw = (packed + n * es) / unpack_s
    return {"part": "bandwidth", "dtype": str(dtype).replace("torch.", ""), "numel": n, "chunk": D, "gamma": gamma,
            "copy_GBps": copy_bw / 1e9, "pack_GBps": pack_bw / 1e9, "unpack_GBps": unpack_bw / 1e9,
            "pack_fraction_of_copy": pack_bw / copy_bw, "unpack_fraction_of_copy": unpack_bw / copy_bw,
            "pack_ms": pack_s * 1e3, "unpack_ms": unpack_s * 1e3, "copy_ms": copy_s * 1e3}


def attempt(what: dict, fn: Callable[[], dict], results: list, out: str | None) -> None:
    """Runs one case; a failure is recorded with its error, and the JSON is rewritten after each."""
    t0 = time.perf_counter()
    try:
        row = fn()
    except Exception as e:  # one part's failure must not stop the others
        row = dict(what, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=3))
    row["seconds"] = time.perf_counter() - t0
    results.append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
    if out:
        with open(out, "w") as f:
            json.dump({"meta": meta_of(), "results": results}, f, indent=1)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def meta_of() -> dict:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "device_name": dev}


def table(results: list) -> str:
    lines = ["| model | mode | variant | step ms | max allocated MiB |", "|---|---|---|---|---|"]
    for r in results:
        if r["part"] == "train":
            mem = "-" if r.get("max_memory_allocated") is None else f"{r['max_memory_allocated'] / 2**20:.0f}"
            ms = f"{r['step_ms']:.1f}" if "step_ms" in r else "error"
            lines.append(f"| {r['model']} | {r['mode']} | {r['variant']} | {ms} | {mem} |")
    lines += ["", "| dtype | copy GB/s | pack GB/s (of copy) | unpack GB/s (of copy) |", "|---|---|---|---|"]
    for r in results:
        if r["part"] == "bandwidth":
            if "copy_GBps" in r:
                lines.append(f"| {r['dtype']} | {r['copy_GBps']:.0f} | {r['pack_GBps']:.0f} "
                             f"({r['pack_fraction_of_copy']:.0%}) | {r['unpack_GBps']:.0f} "
                             f"({r['unpack_fraction_of_copy']:.0%}) |")
            else:
                lines.append(f"| {r['dtype']} | error | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--modes", nargs="+", default=["eager"], choices=MODES)
    ap.add_argument("--gamma", type=float, default=0.9)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps, the first included")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: a CPU run of the script's code paths")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile's backend for --modes compiled (aot_eager: tracing without code generation)")
    ap.add_argument("--json", help="write every figure here (rewritten after each case)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    results: list[dict] = []
    if "bandwidth" in args.parts:
        for dtype in (torch.float32, torch.bfloat16):
            what = {"part": "bandwidth", "dtype": str(dtype).replace("torch.", "")}
            attempt(what, lambda: bandwidth_case(dtype, device, args.tiny, max(3, args.steps)), results, args.json)
    if "train" in args.parts:
        for mode in args.modes:
            for model in args.models:
                for variant in ("plain", "converted"):
                    what = {"part": "train", "model": model, "variant": variant, "mode": mode}
                    attempt(what, lambda: train_case(model, variant, mode, args.gamma, device, args.tiny,
                                                     args.warmup, args.steps, args.compile_backend),
                            results, args.json)
    print(table(results))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
