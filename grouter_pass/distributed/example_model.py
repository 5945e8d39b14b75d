"""A tiny MoE language model that runs single-device or expert-parallel, for the tests, the
``torchrun`` example and the docs.

It is written the way the rewrite will run a model once ``GrouterConfig(expert_parallel=...)``
lands: stacked expert weights ``[E, ...]``, ``grouter.dispatch_plan`` + ``grouter.moe_experts`` on
one device, :func:`~grouter_pass.distributed.ep_moe_experts` under EP. Two routing modes:

* learned (exact mode): each layer has a ``Linear(H, E)`` router (softmax -> top-k -> renorm);
  under EP every layer exchanges its counts.
* precomputed (Grouter / pre-dispatch mode): ``(weights, ids)`` come with the batch, one dispatch
  plan and one :class:`~grouter_pass.distributed.EPSplits` serve every layer of the step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import grouter_pass.ops  # noqa: F401  (registers torch.ops.grouter.*)
from grouter_pass.distributed.experts import ep_moe_experts
from grouter_pass.distributed.group import EPGroup
from grouter_pass.distributed.splits import EPSplits
from grouter_pass.ops.reference import route_reference
from grouter_pass.spec import ExpertMLP


class TinyMoELayer(nn.Module):
    """RMSNorm -> routed SwiGLU experts with biases (no shared expert)."""

    def __init__(self, hidden: int, ffn: int, experts: int, top_k: int, learned_router: bool) -> None:
        super().__init__()
        self.num_experts, self.top_k = experts, top_k
        self.norm = nn.RMSNorm(hidden)
        self.router = nn.Linear(hidden, experts, bias=False) if learned_router else None
        s = 1.0 / math.sqrt(hidden)
        self.w_up = nn.Parameter(torch.randn(experts, 2 * ffn, hidden) * s)
        self.w_down = nn.Parameter(torch.randn(experts, hidden, ffn) / math.sqrt(ffn))
        self.b_up = nn.Parameter(torch.randn(experts, 2 * ffn) * 0.1)
        self.b_down = nn.Parameter(torch.randn(experts, hidden) * 0.1)  # same shape as the router weight

    def route(self, h_NH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return route_reference(self.router(h_NH), top_k=self.top_k, renorm="sum")

    def forward(self, h_NH: torch.Tensor, weights_NK: torch.Tensor | None, ids_NK: torch.Tensor | None, *,
                plan=None, ep: EPGroup | None = None, splits: EPSplits | None = None,
                logical_to_physical: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(h_NH)
        if weights_NK is None:
            weights_NK, ids_NK = self.route(x)
            if logical_to_physical is not None:
                ids_NK = logical_to_physical[ids_NK]
            plan = None
        if ep is None:
            perm, inv, _, offsets = plan if plan is not None else torch.ops.grouter.dispatch_plan(
                ids_NK, self.num_experts)
            out, _ = torch.ops.grouter.moe_experts(x, weights_NK, perm, inv, offsets, self.w_up, self.w_down,
                                                   self.b_up, self.b_down, **ExpertMLP().kwargs(), out_dtype=None)
            return out
        return ep_moe_experts(x, weights_NK, ids_NK, self.w_up, self.w_down, self.b_up, self.b_down, ep=ep,
                              num_experts=self.num_experts, splits=splits, plan=plan)


class TinyEPMoELM(nn.Module):
    """Embedding -> ``layers`` x (MoE layer, residual) -> head; ``forward`` returns the loss summed
    over tokens (divide by the global token count to get each rank's share of the mean)."""

    def __init__(self, vocab: int = 61, hidden: int = 16, ffn: int = 12, experts: int = 8, top_k: int = 2,
                 layers: int = 2, learned_router: bool = True) -> None:
        super().__init__()
        self.num_experts = experts
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList([TinyMoELayer(hidden, ffn, experts, top_k, learned_router)
                                     for _ in range(layers)])
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.ep: EPGroup | None = None
        self.register_buffer("logical_to_physical", torch.arange(experts), persistent=False)

    def enable_expert_parallel(self, ep: EPGroup, expert_perm: torch.Tensor | None = None) -> None:
        """Run the experts over ``ep`` (shard them first with ``shard_expert_parameters`` and the
        same ``expert_perm``)."""
        self.ep = ep
        if expert_perm is not None:
            self.logical_to_physical = torch.argsort(torch.as_tensor(expert_perm))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, routing: tuple[torch.Tensor, torch.Tensor] | None
                = None, splits: EPSplits | None = None) -> torch.Tensor:
        """Args:
            input_ids, labels: ``[B, T]``.
            routing: precomputed ``(weights [B, T, K], ids [B, T, K] logical)`` shared by every layer,
                or ``None`` for the learned routers.
            splits: this step's EP splits (precomputed mode only; see ``grouter_pass.distributed``).
        """
        h = self.embed(input_ids).flatten(0, 1)
        weights = ids = plan = None
        if routing is not None:
            weights, ids = routing[0].flatten(0, 1), self.logical_to_physical[routing[1].flatten(0, 1)]
            plan = torch.ops.grouter.dispatch_plan(ids, self.num_experts)  # one plan for every layer
        for layer in self.layers:
            h = h + layer(h, weights, ids, plan=plan, ep=self.ep, splits=splits,
                          logical_to_physical=self.logical_to_physical if self.ep is not None else None)
        logits = self.head(h)
        return nn.functional.cross_entropy(logits, labels.flatten(), reduction="sum")
