"""Step 4: the replacement forward, written in the ``grouter`` ops, returning the same structure
as the original block (the MoE output, and the router logits where the block returns them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

import grouter_pass.ops  # noqa: F401  (registers torch.ops.grouter)
from grouter_pass.integrations.empty_expert_grads import EmptyExpertGrads
from grouter_pass.integrations.loop_blocks.candidates import Candidate
from grouter_pass.integrations.loop_blocks.roles import Roles, expert_tensors
from grouter_pass.numerics import compare
from grouter_pass.spec import ExpertMLP, GatingSpec, NoMatch


def make_forward(cand: Candidate, spec: tuple[GatingSpec, str | None], roles: Roles, ffn: int,
                  out_tree: pytree.TreeSpec,
                  out_roles: list[str], grads: EmptyExpertGrads | None = None) -> Callable:
    experts = cand.experts
    router = cand.router
    act = roles.act_spec
    spec, bias_path = spec
    buffer_paths = {name for name, _ in cand.block.named_buffers()}
    route_kwargs = spec.route_kwargs()

    def forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        x = hidden_states.reshape(-1, experts.hidden)
        weight, bias = router.params(self)
        logits = nn.functional.linear(x, weight, bias)
        bias = self.get_buffer(bias_path) if bias_path in buffer_paths else (
            self.get_parameter(bias_path) if bias_path is not None else None)
        weights, ids = torch.ops.grouter.route(logits, bias, **route_kwargs)
        perm, inv_perm, counts, offsets = torch.ops.grouter.dispatch_plan(ids, experts.num_experts)
        if grads is not None and torch.is_grad_enabled():
            grads.record(counts)
        w_up, w_down, b_up, b_down = expert_tensors(self, experts, roles, ffn)
        out, _ = torch.ops.grouter.moe_experts(x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down,
                                               **ExpertMLP.of(act).kwargs(), out_dtype=hidden_states.dtype)
        leaves = [out.view(hidden_states.shape) if role == "output" else logits if role == "logits" else None
                  for role in out_roles]
        return pytree.tree_unflatten(leaves, out_tree)

    return forward


def output_roles(out: Any, x: torch.Tensor, logits: torch.Tensor) -> tuple[pytree.TreeSpec, list[str]] | NoMatch:
    leaves, tree = pytree.tree_flatten(out)
    roles = []
    for leaf in leaves:
        if leaf is None:   # e.g. Megatron's (output, None) when the experts have no bias
            roles.append("none")
        elif isinstance(leaf, torch.Tensor) and leaf.shape == x.shape:
            roles.append("output")
        elif isinstance(leaf, torch.Tensor) and leaf.shape == logits.shape and compare(leaf, logits).ok:
            roles.append("logits")
        else:
            return NoMatch("the block returns %s, which the rewrite cannot reproduce",
                           (type(leaf).__name__ if not isinstance(leaf, torch.Tensor) else list(leaf.shape),))
    if roles.count("output") != 1:
        return NoMatch("the block does not return exactly one tensor shaped like its input")
    return tree, roles
