"""transformers' official experts extension point, used so that eager expert loops capture.

transformers 5 dispatches the experts of most MoE models through ``ExpertsInterface``: with
``experts_implementation="eager"`` each layer runs a Python loop over ``nonzero()`` (5-6 graph
breaks per layer). :func:`use_grouter_experts` registers this project's experts function under
the name ``"grouter"`` (``ALL_EXPERTS_FUNCTIONS.register``) and selects it with the model's own
``set_experts_implementation``: the model then captures as one graph, where the pass matches and
rewrites it as usual. The function computes exactly what transformers' capturable ``grouped_mm``
path computes (it is that path), so the switch changes no number.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

EXPERTS_IMPLEMENTATION = "grouter"


def grouter_experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts of one transformers MoE layer, written so that Dynamo captures it whole: sort by
    expert, grouped GEMMs with offsets, weighted combine (transformers' ``grouped_mm`` path)."""
    from transformers.integrations.moe import grouped_mm_experts_forward

    return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def _register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if EXPERTS_IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, grouter_experts_forward)


def use_grouter_experts(model: torch.nn.Module) -> list[str]:
    """Switch every transformers model inside ``model`` whose experts run the eager loop to the
    capturable ``"grouter"`` implementation, in place. Returns the switched models' paths."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # transformers is optional
        return []
    switched = []
    for path, module in model.named_modules():
        if not isinstance(module, PreTrainedModel) or not type(module)._can_set_experts_implementation():
            continue
        current = getattr(module.config, "_experts_implementation", None)
        if current not in ("eager", None) or any(path.startswith(p + ".") for p in switched if p):
            continue
        _register()
        module.set_experts_implementation(EXPERTS_IMPLEMENTATION)
        switched.append(path)
        log.info("grouter: %s: experts_implementation %r -> %r (the expert loop no longer breaks the graph)",
                 path or type(module).__name__, current, EXPERTS_IMPLEMENTATION)
    return switched
