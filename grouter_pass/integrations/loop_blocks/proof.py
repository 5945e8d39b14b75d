"""Step 5: running a block on random inputs (spread and skewed routing) and comparing outputs
and input gradients, and which parameters a backward leaves without a gradient."""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree
from torch import nn

from grouter_pass.integrations.loop_blocks.candidates import Candidate
from grouter_pass.numerics import compare


def random_projection(leaves: list[torch.Tensor], seed: int) -> torch.Tensor:
    """A scalar that weighs every output element by a fixed random number (a random cotangent),
    drawn on the CPU from its own generator and moved to each output's device."""
    gen = torch.Generator().manual_seed(seed)
    return sum((t.float() * torch.randn(t.shape, generator=gen).to(t.device)).sum() for t in leaves)


def run_block(block: nn.Module, x: torch.Tensor, grad: bool) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    xi = x.detach().clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = block(xi)
        leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        g = None
        if grad:
            (g,) = torch.autograd.grad(random_projection(leaves, seed=7), [xi])
    return [t.detach() for t in leaves], g


def params_without_grad(block: nn.Module, x: torch.Tensor) -> set[str]:
    """Names of the parameters whose ``.grad`` a backward through ``block(x)`` leaves ``None``
    (the caller's ``.grad`` values are put back afterwards)."""
    params = dict(block.named_parameters())
    saved = {n: p.grad for n, p in params.items()}
    try:
        for p in params.values():
            p.grad = None
        xi = x.detach().clone().requires_grad_(True)
        leaves = [t for t in pytree.tree_leaves(block(xi)) if isinstance(t, torch.Tensor) and t.requires_grad]
        random_projection(leaves, seed=11).backward()
        return {n for n, p in params.items() if p.grad is None}
    finally:
        for n, p in params.items():
            p.grad = saved[n]


def same_results(a: tuple, b: tuple) -> bool:
    outs_a, g_a = a
    outs_b, g_b = b
    if len(outs_a) != len(outs_b):
        return False
    pairs = list(zip(outs_a, outs_b)) + ([(g_a, g_b)] if g_a is not None and g_b is not None else [])
    return all(x.shape == y.shape and compare(x, y).ok for x, y in pairs)


def probe_inputs(cand: Candidate, tokens: int) -> list[torch.Tensor]:
    w = cand.router_weight
    gen = torch.Generator().manual_seed(3)
    spread = torch.randn(2, tokens // 2, cand.experts.hidden, generator=gen)
    # skewed: every token close to one direction, so most tokens pick the same experts
    skew = spread * 0.1 + torch.randn(1, 1, cand.experts.hidden, generator=gen) * 2
    return [t.to(device=w.device, dtype=w.dtype) for t in (spread, skew)]
