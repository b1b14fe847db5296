"""Packs an activation-sized tensor with DropIT and prints what the cache costs."""

import torch

import dropit_cuda as dc

device = "cuda" if torch.cuda.is_available() else "cpu"
x = torch.relu(torch.randn(64, 256, 32, 32, device=device))  # a post-ReLU activation
for gamma in (0.5, 0.8, 0.9):
    p = dc.pack(x, gamma=gamma)
    y = dc.unpack(p)
    kept = (y != 0).sum().item() / x.numel()
    print(f"gamma={gamma}: {x.nbytes / 2**20:.1f} MiB dense -> {p.nbytes / 2**20:.2f} MiB packed "
          f"({p.index_kind} index), {100 * (1 - p.nbytes / x.nbytes):.1f}% saved, "
          f"{100 * kept:.1f}% of elements nonzero after unpack")
print(dc.extension_info())
