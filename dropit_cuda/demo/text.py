"""The text task: a small byte-level GPT trained from scratch on the Python standard library's source.

Every machine with Python has the text: the ``*.py`` files at the top of the running
interpreter's standard library folder (``sysconfig.get_paths()["stdlib"]``; packages and tests
below it are left out, and so is ``_sysconfigdata*.py``, which describes the local build). They
are split into training and validation by file, by a fixed rule (a file is for validation when
the CRC-32 of its name is divisible by 10), read in sorted order and capped at
:data:`TRAIN_BYTES` / :data:`VAL_BYTES`, so the corpus is the same wherever the Python version is.
Each step trains on ``batch_size`` windows of ``context`` bytes at seeded random places of the
training text; the validation loss is the mean next-byte cross-entropy over
:data:`EVAL_WINDOWS` fixed windows spread evenly over the validation text.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .runner import Check, DemoConfig, Metric, Task, cosine_schedule

VOCAB = 256  # bytes
TRAIN_BYTES = 2 * 2**20
VAL_BYTES = 256 * 2**10
EVAL_WINDOWS = 64
AMP_MODES = ("none", "bf16")


@dataclass
class TextConfig(DemoConfig):
    """The text task's settings: ``steps`` training steps, evaluated every ``eval_every``;
    the model's ``layers``, ``width``, ``heads`` and ``context``; ``amp="bf16"`` runs the forward
    passes under ``torch.autocast`` in bfloat16."""

    gammas: tuple[float, ...] = (0.8, 0.9)
    steps: int = 200
    eval_every: int = 25
    batch_size: int = 8
    lr: float = 3e-3
    weight_decay: float = 0.01
    width: int = 128
    layers: int = 2
    heads: int = 4
    context: int = 128
    amp: str = "none"

    positive_ints = ("steps", "eval_every", "seeds", "batch_size", "width", "layers", "heads", "context")

    def validate(self) -> "TextConfig":
        super().validate()
        if self.steps % self.eval_every:
            raise ValueError(f"steps ({self.steps}) must be a multiple of eval_every ({self.eval_every})")
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be a multiple of heads ({self.heads})")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        return self


# ------------------------------------------------------------------------------------- corpus


def stdlib_sources(root: Optional[Path] = None) -> list[Path]:
    """The top-level ``*.py`` files of the standard library, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else Path(root)
    return sorted(p for p in root.glob("*.py") if p.is_file() and not p.name.startswith("_sysconfigdata"))


def is_validation_file(name: str) -> bool:
    """The fixed split rule: about one file in ten, by the CRC-32 of its name."""
    return zlib.crc32(name.encode()) % 10 == 0


@dataclass
class Corpus:
    """Training and validation bytes (uint8 tensors) and the files they came from."""

    train: torch.Tensor
    val: torch.Tensor
    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)

    def to(self, device: torch.device) -> "Corpus":
        return Corpus(self.train.to(device), self.val.to(device), self.train_files, self.val_files)

    def digest(self) -> str:
        """SHA-256 of the training then validation bytes: equal digests, equal corpora."""
        h = hashlib.sha256(self.train.cpu().numpy().tobytes())
        h.update(self.val.cpu().numpy().tobytes())
        return h.hexdigest()


def load_corpus(root: Optional[Path] = None, train_bytes: int = TRAIN_BYTES, val_bytes: int = VAL_BYTES) -> Corpus:
    """Reads :func:`stdlib_sources` into the two splits, in order, until each holds its cap
    (the last file read is cut at the cap)."""
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    files: dict[bool, list[str]] = {False: [], True: []}
    room = {False: train_bytes, True: val_bytes}
    for path in stdlib_sources(root):
        split = is_validation_file(path.name)
        if room[split] <= 0:
            continue
        text = path.read_bytes()[: room[split]]
        parts[split].append(text)
        files[split].append(path.name)
        room[split] -= len(text)
    train, val = (b"".join(parts[s]) for s in (False, True))
    if len(train) < 4096 or len(val) < 4096:
        raise RuntimeError(f"the standard library at {root or sysconfig.get_paths()['stdlib']} holds too little "
                           f"Python source for the text demo ({len(train)} training, {len(val)} validation bytes)")
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    return Corpus(as_tensor(train), as_tensor(val), files[False], files[True])


def windows(text: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets (int64, ``(len(starts), context)``) of the windows at ``starts``."""
    idx = starts[:, None] + torch.arange(context + 1, device=text.device)
    tokens = text[idx].long()
    return tokens[:, :-1], tokens[:, 1:]


# -------------------------------------------------------------------------------------- model


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a 4x GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """A byte-level GPT: token and position embeddings, ``layers`` blocks, a final LayerNorm and a
    linear head over the 256 byte values. Weights start as GPT-2's (normal, std 0.02; the two
    projections back into the residual stream scaled down by sqrt(2*layers))."""

    def __init__(self, width: int = 128, layers: int = 2, heads: int = 4, context: int = 128) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(VOCAB, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "fc2.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > self.context:
            raise ValueError(f"tokens: at most {self.context} per sequence, got {tokens.shape[1]}")
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


# --------------------------------------------------------------------------------------- task


class TextTask(Task):
    """AdamW (β = 0.9, 0.95), warm-up over the first tenth of the steps, then a cosine decay to a
    tenth of ``lr``; gradients clipped to norm 1."""

    name = "text"
    title = "TinyGPT on the Python standard library"
    config_class = TextConfig
    metrics = (
        Metric("val_loss", "val loss", 3, higher_is_better=False),
        Metric("val_ppl", "val ppl", 2, higher_is_better=False),
    )
    check = Check(tolerance=3.0, relative=True)
    round_label = "step"
    grad_clip = 1.0

    def round_size(self, cfg: TextConfig) -> int:
        return cfg.eval_every

    def load(self, cfg: TextConfig, device: torch.device) -> Corpus:
        return load_corpus().to(device)

    def describe(self, data: Corpus, cfg: TextConfig) -> dict[str, Any]:
        return {
            "name": "Python standard library (top-level .py files)",
            "stdlib": sysconfig.get_paths()["stdlib"],
            "train_bytes": len(data.train), "val_bytes": len(data.val),
            "train_files": len(data.train_files), "val_files": data.val_files,
            "sha256": data.digest(),
            "log": f"{len(data.train)} training bytes ({len(data.train_files)} files), {len(data.val)} "
                   f"validation bytes ({len(data.val_files)} files), {cfg.steps} steps of {cfg.batch_size} x "
                   f"{cfg.context} bytes, amp {cfg.amp}",
        }

    def build_model(self, cfg: TextConfig) -> nn.Module:
        return TinyGPT(cfg.width, cfg.layers, cfg.heads, cfg.context)

    def schedule(self, data: Corpus, cfg: TextConfig, seed: int) -> list[list[torch.Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        high = len(data.train) - cfg.context  # a window needs context + 1 bytes
        device = data.train.device
        return [[torch.randint(0, high, (cfg.batch_size,), generator=gen).to(device) for _ in range(cfg.eval_every)]
                for _ in range(cfg.steps // cfg.eval_every)]

    def optimizer(self, model: nn.Module, cfg: TextConfig, total_steps: int):
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
        factor = cosine_schedule(total_steps, warmup=max(1, total_steps // 10), floor=0.1)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)

    def inputs_and_targets(self, data: Corpus, cfg: TextConfig, batch: torch.Tensor) -> tuple[tuple, torch.Tensor]:
        x, y = windows(data.train, batch, cfg.context)
        return (x,), y

    def criterion(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output.flatten(0, 1), targets.flatten())

    def evaluate(self, model: nn.Module, data: Corpus, cfg: TextConfig) -> dict[str, float]:
        starts = torch.linspace(0, len(data.val) - cfg.context - 1, EVAL_WINDOWS).long().to(data.val.device)
        total = 0.0
        for chunk in starts.split(32):
            x, y = windows(data.val, chunk, cfg.context)
            total += float(F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten(), reduction="sum"))
        loss = total / (EVAL_WINDOWS * cfg.context)
        return {"val_loss": loss, "val_ppl": math.exp(loss)}

    def autocast(self, cfg: TextConfig, device: torch.device) -> ContextManager:
        if cfg.amp == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()
