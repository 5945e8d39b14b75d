"""Step 3: which expert weight is the gate, the up and the down projection, in which layout,
with which activation: every reading the shapes allow (the search keeps the one that reproduces
the block)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from grouter_pass.integrations.loop_blocks.candidates import Experts
from grouter_pass.spec import ActivationSpec

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


@dataclass(frozen=True)
class Roles:
    gate: int | None       # index into Experts.weights (a separate gate projection), else None
    up: int
    down: int
    activation: str
    #: "separate" (gate and up are two weights), "concat" / "interleaved" (one [2F, H] weight),
    #: "plain" (no gate)
    layout: str = "separate"

    @property
    def act_spec(self) -> ActivationSpec:
        return ActivationSpec(self.activation, gated=self.layout != "plain",
                              layout="interleaved" if self.layout == "interleaved" else "concat")


def linear_layout(w: torch.Tensor, out_dim: int, in_dim: int) -> torch.Tensor | None:
    """``w`` [E, a, b] as ``[E, out, in]`` (nn.Linear layout), or None if the shape does not fit."""
    if w.shape[1:] == (out_dim, in_dim):
        return w
    if w.shape[1:] == (in_dim, out_dim):
        return w.transpose(1, 2)
    return None


def expert_tensors(block: nn.Module, experts: Experts, roles: Roles, ffn: int):
    """(w_up [E, (2)F, H], w_down [E, H, F], b_up, b_down) in nn.Linear layout, or None."""
    ws = experts.weights
    h = experts.hidden
    up_width = 2 * ffn if roles.layout in ("concat", "interleaved") else ffn
    down = linear_layout(ws[roles.down][1](block), h, ffn)
    up = linear_layout(ws[roles.up][1](block), up_width, h)
    gate = linear_layout(ws[roles.gate][1](block), ffn, h) if roles.gate is not None else None
    if down is None or up is None or (roles.gate is not None and gate is None):
        return None
    w_up = torch.cat([gate, up], dim=1) if gate is not None else up
    biases = [ws[i][2] for i in ((roles.gate,) if roles.gate is not None else ()) + (roles.up, roles.down)]
    if any(b is None for b in biases) != all(b is None for b in biases):
        return None
    if biases[0] is None:
        return w_up, down, None, None
    b_up = torch.cat([b(block) for b in biases[:-1]], dim=1)
    return w_up, down, b_up, biases[-1](block)


def role_candidates(experts: Experts, shapes: list[tuple[int, int]]) -> list[tuple[Roles, int]]:
    """Every (roles, FFN width) the weight shapes allow."""
    n, h = len(experts.weights), experts.hidden
    out = []
    for perm in itertools.permutations(range(n)):
        if n == 3:
            gate, up, down = perm
        else:
            gate, (up, down) = None, perm
        for ffn in {d for d in shapes[down] if d != h} or {h}:
            if set(shapes[down]) != {h, ffn}:
                continue
            if n == 3:
                layouts = ["separate"] if set(shapes[gate]) == set(shapes[up]) == {h, ffn} else []
            elif set(shapes[up]) == {h, 2 * ffn}:
                layouts = ["concat", "interleaved"]
            elif set(shapes[up]) == {h, ffn}:
                layouts = ["plain"]
            else:
                layouts = []
            out.extend((Roles(gate, up, down, act, layout), ffn) for layout in layouts for act in ACTIVATIONS)
    return out
