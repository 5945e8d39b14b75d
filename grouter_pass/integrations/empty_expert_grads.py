"""Keep eager's ``.grad is None`` for experts that received no tokens.

A loop-style MoE block (``for e in range(E): if no tokens: continue``) never touches the
parameters of an expert that got no tokens, so eager autograd leaves their ``.grad`` at ``None``.
The rewritten block computes every expert in one grouped op, so autograd writes a zero gradient
into them, and optimizers treat the two differently: AdamW applies weight decay and momentum to a
zero gradient but skips a parameter whose gradient is ``None``.

Which experts were empty is data (the per-expert token counts of the step), so it cannot decide
the shape of a compiled graph. It is decided after the backward instead, by hooks on the expert
parameters, outside any compiled code: a parameter whose ``.grad`` was ``None`` before this
backward, whose expert got no tokens in the forward, and whose new gradient is exactly zero, gets
``None`` back. One host read of the counts per backward (only when some hook fires), none in the
forward.
"""

from __future__ import annotations

import torch
from torch import nn


class EmptyExpertGrads:
    """Hooks on one block's per-expert parameters; ``record(counts)`` is called by its forward."""

    def __init__(self, per_expert: list[list[nn.Parameter]]) -> None:
        self._counts: torch.Tensor | None = None
        self._host: list[int] | None = None
        self._was_none: dict[int, bool] = {}
        self._handles = []
        for e, params in enumerate(per_expert):
            for p in params:
                self._handles.append(p.register_hook(self._before(p)))
                self._handles.append(p.register_post_accumulate_grad_hook(self._after(e)))

    def record(self, counts: torch.Tensor) -> None:
        """Tokens per expert of the forward whose backward comes next."""
        self._counts = counts
        self._host = None

    def _before(self, p: nn.Parameter):
        def hook(grad: torch.Tensor) -> None:
            self._was_none[id(p)] = p.grad is None
        return hook

    def _after(self, expert: int):
        def hook(p: nn.Parameter) -> None:
            if not self._was_none.pop(id(p), False) or self._counts is None:
                return
            if self._host is None:
                self._host = self._counts.detach().cpu().tolist()
            if self._host[expert] == 0 and p.grad is not None and not p.grad.any():
                p.grad = None
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
