"""How the project compares tensors: one definition of "the same numbers" for probes, ``verify``
and the parity tests.

Errors are measured relative to the reference's scale: ``|a - e| <= atol * max|e| + rtol * |e|``
elementwise, so a tolerance means the same thing for logits of size 1e-3 and activations of
size 1e3. Default tolerances are per dtype (fp32: 1e-5 relative, the project's exact-mode
contract).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {  # dtype -> (rtol, atol as a fraction of max|e|)
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def default_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return DEFAULT_TOLERANCES.get(dtype, (0.0, 0.0))  # integer / bool tensors: exact


@dataclass(frozen=True)
class Comparison:
    ok: bool
    max_abs: float
    max_rel: float      # max |a - e| / max |e|
    detail: str = ""

    def __str__(self) -> str:
        return f"max abs err {self.max_abs:.3e}, max rel err {self.max_rel:.3e}" + (
            f" ({self.detail})" if self.detail else "")


def compare(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float | None = None,
            atol: float | None = None, scale: float | None = None) -> Comparison:
    """Compare ``actual`` with the reference ``expected``.

    ``scale`` replaces ``max|expected|`` as the magnitude errors are measured against (for a
    tensor that is mathematically zero, whose reference holds only rounding noise).
    """
    if actual.shape != expected.shape:
        return Comparison(False, float("inf"), float("inf"), f"shape {tuple(actual.shape)} vs {tuple(expected.shape)}")
    if actual.dtype != expected.dtype:
        return Comparison(False, float("inf"), float("inf"), f"dtype {actual.dtype} vs {expected.dtype}")
    d_rtol, d_atol = default_tolerance(expected.dtype)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    if expected.numel() == 0:
        return Comparison(True, 0.0, 0.0)
    a, e = actual.detach().double(), expected.detach().double()
    if not (a.isfinite().all() and e.isfinite().all()):
        # non-finite values must sit at the same places with the same sign; compare the rest
        if not (torch.equal(a.isnan(), e.isnan()) and torch.equal(a == float("inf"), e == float("inf"))
                and torch.equal(a == float("-inf"), e == float("-inf"))):
            return Comparison(False, float("nan"), float("nan"), "non-finite values differ")
        finite = e.isfinite()
        a, e = a[finite], e[finite]
        if e.numel() == 0:
            return Comparison(True, 0.0, 0.0)
    diff = (a - e).abs()
    scale = e.abs().max().item() if scale is None else scale
    max_abs = diff.max().item()
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    ok = bool(torch.all(diff <= atol * scale + rtol * e.abs()))
    return Comparison(ok, max_abs, max_rel)


def compare_max(actual: torch.Tensor, expected: torch.Tensor, *, precision: torch.dtype | None = None,
                scale: float | None = None) -> Comparison:
    """Agreement in the max norm: ``max|a - e| <= rtol * max|e|`` with the relative tolerance of
    ``precision`` (default: the reference's dtype). The criterion of the parity tests, used where
    the same quantity is computed in two summation orders (an element near zero carries the
    absolute error of the large ones, so an elementwise test would be meaningless there)."""
    c = compare(actual, expected, scale=scale)
    if not math.isfinite(c.max_rel) and c.detail:
        return c
    rtol = default_tolerance(precision or expected.dtype)[0]
    return Comparison(c.max_rel <= rtol, c.max_abs, c.max_rel, c.detail)
