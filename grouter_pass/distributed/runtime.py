"""The per-step half of expert parallelism in Grouter / precomputed / hash modes.

In these modes the routing of a step does not depend on the model, so the all-to-all split sizes
of every MoE layer can be known before the compiled graph runs. :class:`EPStepRunner` wraps the
compiled graph (the backend installs it) and, on every call, **outside** the compiled region:

1. gets the step's routing: from the token-id graph input (Grouter network, hash table: run once
   here, and handed to ``grouter.external_routing`` so the graph does not run it again) or from
   ``grouter_pass.routing(...)`` (precomputed);
2. maps the ids to physical slots (placement), counts tokens per expert, and turns the counts of
   every rank into this rank's :class:`~grouter_pass.distributed.EPSplits`: with one all-gather of
   ``[E]`` integers (:func:`~grouter_pass.distributed.gather_step_splits`), or with none when the
   caller passed ``ep_splits=`` to ``grouter_pass.routing`` (e.g.
   :func:`~grouter_pass.distributed.splits_from_step_routing` over a placement's samples);
3. runs the compiled graph with those splits readable by ``grouter.step_split_size``.

This is the one place where split sizes reach the host: once per step (per compiled graph that
holds MoE layers), before the forward. The backward needs nothing from here (the sizes are saved
by autograd as integers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from grouter_pass.distributed.group import EPGroup
from grouter_pass.distributed.splits import EPSplits, gather_step_splits
from grouter_pass.runtime import StepPlan, delivered_routing, running_step


class EPStepRunner:
    """Wraps a compiled graph whose MoE layers read the step's split sizes (see module doc)."""

    def __init__(self, compiled: Callable, ep_step: Any) -> None:
        self.compiled = compiled
        self.source = ep_step.routing
        self.num_experts: int = ep_step.num_experts
        self.top_k: int = ep_step.top_k
        self.token_input: int | None = ep_step.token_input
        layout = ep_step.layout
        group = _resolve_process_group(layout.group_name)
        self.ep = EPGroup(group=group, size=dist.get_world_size(group), rank=dist.get_rank(group))
        self.logical_to_physical = (torch.tensor(layout.logical_to_physical, dtype=torch.int64)
                                    if layout.logical_to_physical is not None else None)

    def step_routing(self, args: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights [N, k], logical ids [N, k])`` of this call's tokens."""
        if self.source.needs_token_ids:
            if self.token_input is None:
                raise RuntimeError(f"{self.source.describe()} routing needs the graph's token ids")
            return self.source.compute(args[self.token_input])
        current = delivered_routing()
        if current is None:
            raise RuntimeError("PrecomputedRouting: no routing for this call; run the model inside "
                               "`with grouter_pass.routing(weights, ids): ...`")
        weights, ids = current.weights, current.ids
        return weights.reshape(-1, self.top_k), ids.reshape(-1, self.top_k)

    def splits_for(self, ids: torch.Tensor) -> EPSplits:
        delivered = delivered_routing()
        if delivered is not None and delivered.ep_splits is not None:
            return delivered.ep_splits
        phys = ids.long()
        if self.logical_to_physical is not None:
            phys = self.logical_to_physical.to(phys.device)[phys]
        return gather_step_splits(phys, self.num_experts, self.ep)

    def __call__(self, *args: Any) -> Any:
        weights, ids = self.step_routing(args)  # Dynamo calls with the flat graph inputs
        splits = self.splits_for(ids)
        # the graph's external_routing reuses the routing computed here (a Grouter or hash source
        # would otherwise run twice); precomputed routing it reads from the routing block itself
        plan = StepPlan(routing=(weights, ids) if self.source.needs_token_ids else None, splits=splits)
        with running_step(self.source.key, plan):
            return self.compiled(*args)


def wrap_for_expert_parallel(compiled: Callable, ep_step: Any) -> Callable:
    """The backend's hook: ``compiled`` as is, or wrapped in an :class:`EPStepRunner`."""
    if ep_step is None:
        return compiled
    return EPStepRunner(compiled, ep_step)


__all__ = ["EPStepRunner", "wrap_for_expert_parallel"]
