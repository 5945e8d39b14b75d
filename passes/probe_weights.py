"""Which expert weights the probe runs a candidate site on, within a memory budget.

The probe proves a reading of the experts by running the site's region next to the ``grouter``
ops. Random weights make the proof independent of how the model was initialised (zeros, identical
upcycled experts), but they are a full copy of every expert weight, allocated at compile time on
the model's device: for a DeepSeek-V3-size layer, tens of GB. Above ``budget`` bytes the probe
reads the model's own weights in place (never writing them, never attaching them to autograd), as
long as they can tell experts apart; the weight gradients, which would need another full copy,
are then proved by structure (no gradient-blocking op between the weights and the output) rather
than by value. The token states, routing weights and base are still compared by value, forward and
backward.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from grouter_pass.passes.graph_utils import tensor_meta
from grouter_pass.passes.probe import concrete_shape

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeWeights:
    """The graph's real input values (where known) and the random-weight budget in bytes."""

    budget: int
    values: Mapping[fx.Node, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, gm: fx.GraphModule, example_inputs: Sequence[Any] | None, budget: int) -> ProbeWeights:
        """Real tensors of ``gm``'s placeholders (from ``example_inputs``) and attributes.

        Fake and meta tensors are left out (there is nothing to read); so are placeholders when the
        inputs do not line up one to one with them."""
        values: dict[fx.Node, torch.Tensor] = {}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if example_inputs is not None and len(example_inputs) == len(placeholders):
            values.update(zip(placeholders, example_inputs))
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                try:
                    values[n] = operator.attrgetter(n.target)(gm)
                except AttributeError:
                    continue
        return cls(budget, {n: v for n, v in values.items() if _readable(v)})

    def random_bytes(self, nodes: Sequence[fx.Node]) -> int:
        """Bytes random copies of ``nodes`` would take."""
        total = 0
        for n in nodes:
            t = tensor_meta(n)
            total += math.prod(concrete_shape(n)) * (t.dtype.itemsize if t is not None else 4)
        return total

    def real(self, nodes: Sequence[fx.Node], num_experts: int) -> list[torch.Tensor] | None:
        """The model's own tensors for ``nodes`` when random copies would exceed the budget and the
        real ones are known and tell experts apart; else None (the probe draws random weights)."""
        need = self.random_bytes(nodes)
        if need <= self.budget:
            return None
        if not all(n in self.values for n in nodes):
            missing = [n.name for n in nodes if n not in self.values]
            log.warning("grouter: the probe needs random copies of the expert weights (%.1f MB, above the "
                        "probe budget of %.1f MB): the real values of %s are not known at compile time",
                        need / 2**20, self.budget / 2**20, missing)
            return None
        tensors = [self.values[n].detach() for n in nodes]
        why = _degenerate(tensors, [concrete_shape(n) for n in nodes], num_experts)
        if why is not None:
            log.warning("grouter: the probe needs random copies of the expert weights (%.1f MB, above the "
                        "probe budget of %.1f MB): the model's weights %s", need / 2**20, self.budget / 2**20, why)
            return None
        log.debug("grouter: probing on the model's own expert weights (%.1f MB of random copies avoided)",
                  need / 2**20)
        return tensors


def _readable(v: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(v, torch.Tensor) and not isinstance(v, FakeTensor) and v.device.type != "meta"


def _degenerate(tensors: list[torch.Tensor], shapes: list[list[int]], num_experts: int) -> str | None:
    """Why these weights cannot distinguish readings (constant, non-finite, identical experts)."""
    for t, shape in zip(tensors, shapes):
        if list(t.shape) != list(shape):
            return f"have shape {list(t.shape)}, the graph says {shape}"
        if t.numel() == 0 or not t.is_floating_point():
            continue
        lo, hi = torch.aminmax(t)
        if not (torch.isfinite(lo) and torch.isfinite(hi)) or lo == hi:
            return f"are constant or not finite (min {lo.item()}, max {hi.item()})"
    stacked = [t for t in tensors if t.dim() >= 3 and t.shape[0] == num_experts and num_experts > 1]
    for t in stacked:   # upcycled experts start as copies of one another
        if torch.equal(t[0], t[1]) or torch.equal(t[0], t[-1]):
            return "hold identical experts (an upcycled initialisation)"
    per_expert = [t for t in tensors if t.dim() == 2]
    if len(per_expert) >= 2:
        by_shape: dict[tuple, list[torch.Tensor]] = {}
        for t in per_expert:
            by_shape.setdefault(tuple(t.shape), []).append(t)
        for group in by_shape.values():
            if len(group) >= 2 and torch.equal(group[0], group[1]):
                return "hold identical experts (an upcycled initialisation)"
    return None
