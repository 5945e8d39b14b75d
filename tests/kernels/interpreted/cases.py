"""Inputs shared by the interpreter tests: routings with the edge cases the kernels must survive,
and tolerances that travel with the dtype."""

from __future__ import annotations

import torch

from grouter_pass.ops import reference as R

# dtype -> max error allowed, relative to the largest magnitude of the expected tensor
TOL = {torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_ids(routing: str, n: int, k: int, e: int) -> torch.Tensor:
    """Expert ids ``[n, k]``: random (distinct per token), ``empty_experts`` (only the first
    half of the experts is used), ``one_expert`` (k must be 1: every token to the last expert)."""
    if routing == "one_expert":
        assert k == 1
        return torch.full((n, 1), e - 1, dtype=torch.int64)
    pool = e // 2 if routing == "empty_experts" else e
    return torch.stack([torch.randperm(pool)[:k] for _ in range(n)]) if n else torch.empty(0, k, dtype=torch.int64)


def plan(ids: torch.Tensor, e: int):
    return R.dispatch_plan_reference(ids, e)


def rand(*shape, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    """Random values away from zero (a kernel that drops a term cannot pass by luck)."""
    t = torch.randn(*shape) * scale
    return (t + 0.05 * t.sign()).to(dtype)


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype, want.dtype)
    if want.numel() == 0:
        return
    err = (got.float() - want.float()).abs().max().item()
    ref = max(want.float().abs().max().item(), 1e-3)
    assert err <= TOL[dtype] * ref, f"{what}: max error {err:.3g} > {TOL[dtype]:.1g} x {ref:.3g}"
