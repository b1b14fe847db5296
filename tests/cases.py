"""Test inputs and probes shared by several test files."""

from __future__ import annotations

import math

import torch


def randn(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``n`` seeded standard-normal values, drawn in float64 and rounded to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)


def adversarial(dtype: torch.dtype, n: int) -> dict[str, torch.Tensor]:
    """Inputs where ties, signed zeros, NaN, infinities and subnormals decide the selection."""
    tiny = torch.finfo(dtype).smallest_normal
    cases = {
        "all_equal": torch.full((n,), 1.5),
        "all_equal_signs": torch.tensor([1.5, -1.5] * (n // 2)),
        "many_zeros": torch.where(torch.arange(n) % 10 == 0, randn(n, torch.float64, 1), torch.zeros(n)),
        "signed_zeros": torch.tensor([0.0, -0.0] * (n // 2)),
        "few_distinct": torch.randint(-2, 3, (n,), generator=torch.Generator().manual_seed(2)).double(),
        "specials": torch.tensor([math.nan, -math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, -1.0] * (n // 8)),
        "subnormals": torch.tensor([tiny / 2, -tiny / 4, tiny / 8, tiny, -tiny, 0.0], dtype=torch.float64).repeat(n // 6),
    }
    out = {k: v.to(dtype) for k, v in cases.items()}
    assert (out["subnormals"].abs() < tiny).any() and (out["subnormals"] != 0).any()
    return out


def saved_tensors(fn):
    """``fn()``'s result and every tensor autograd saved for backward while it ran."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def grads_after_step(model, x):
    """One forward/backward of ``model`` on ``x`` with a non-degenerate loss (the mean square of the
    output): the loss and ``{name: grad}`` of every parameter that got a gradient."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss = out.float().square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def weights_changed_by_dropit(make, convert, make_input, seed=0, converted=None):
    """Names of the parameters whose gradient differs between ``make()`` and its converted copy
    (``convert(copy)``, or ``converted`` if given) on the same input: the weights DropIT covers,
    since it changes weight gradients only. Asserts that everything else is equal."""
    import copy

    torch.manual_seed(seed)
    plain = make()
    conv = converted if converted is not None else convert(copy.deepcopy(plain))
    loss_p, gp = grads_after_step(plain, make_input())
    loss_c, gc = grads_after_step(conv, make_input())
    assert torch.equal(loss_p, loss_c), "the forward pass must be exact"
    assert gp.keys() == gc.keys()
    return {k for k in gp if not torch.equal(gp[k], gc[k])}


def saved_bytes(fn, model):
    """Bytes of the unique storages autograd saves for backward while ``fn()`` runs, the storages
    of ``model``'s parameters and buffers not counted."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    _, saved = saved_tensors(fn)
    sizes = {}
    for t in saved:
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            sizes[st.data_ptr()] = st.nbytes()
    return sum(sizes.values())


def node_name(fn) -> str:
    """An autograd node's name; DropIT's read the same whether the node is a Python Function's
    ("_DropITLinearBackward") or a C++ one's ("DropITLinearBackward")."""
    name = fn.name()
    return name[1:] if name.startswith("_DropIT") else name


def grad_fn_names(out):
    """Names (see :func:`node_name`) of every autograd node behind ``out``."""
    names, stack, seen = [], [out.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(node_name(fn))
        stack.extend(f for f, _ in fn.next_functions)
    return names
