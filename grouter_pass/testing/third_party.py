"""MoE layers of third-party training libraries, used as they ship (for tests and the support matrix).

Only construction lives here: the layers' code is the library's own, imported from the installed
package, never copied. Each builder returns a 2-layer :class:`~grouter_pass.testing.handwritten.TinyMoELM`
whose blocks are the library's MoE layer, with random weights (the libraries allocate their
parameters uninitialised) and random non-zero routing buffers.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import nn

from grouter_pass.testing.handwritten import TinyMoELM


def torchtitan_available() -> bool:
    return importlib.util.find_spec("torchtitan") is not None


def _torchtitan_block(hidden: int, ffn: int, experts: int, top_k: int, score: str, route_norm: bool,
                      route_scale: float, groups: tuple[int, int] | None, shared: bool) -> nn.Module:
    from torchtitan.models.common.feed_forward import FeedForward
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import GroupedExperts, MoE, RoutedExperts, TokenChoiceTopKRouter
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    router = TokenChoiceTopKRouter.Config(
        num_experts=experts, gate=Linear.Config(in_features=hidden, out_features=experts), top_k=top_k,
        score_func=score, route_norm=route_norm, route_scale=route_scale,
        num_expert_groups=groups[0] if groups else None, num_limited_groups=groups[1] if groups else None)
    cfg = MoE.Config(
        num_experts=experts,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=hidden, hidden_dim=ffn, num_experts=experts),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=experts, top_k=top_k)),
        router=router,
        shared_experts=FeedForward.Config(w1=Linear.Config(in_features=hidden, out_features=ffn),
                                          w2=Linear.Config(in_features=ffn, out_features=hidden),
                                          w3=Linear.Config(in_features=hidden, out_features=ffn)) if shared else None)
    block = cfg.build()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
        if block.expert_bias_E is not None:
            block.expert_bias_E.normal_(0.0, 0.1)
    return block


def torchtitan_moe_lm(*, score: str = "sigmoid", route_norm: bool = True, route_scale: float = 2.5,
                      groups: tuple[int, int] | None = None, shared: bool = True, hidden: int = 64, ffn: int = 48,
                      experts: int = 8, top_k: int = 2) -> nn.Module:
    """A 2-layer LM of torchtitan's ``MoE`` layers (``torchtitan.models.common.moe``): token-choice
    router (3-D ``[B, L, E]`` scores, optional node-limited groups, a load-balancing bias owned by
    the parent ``MoE`` and passed to the router), argsort dispatch, experts run by
    ``torch._grouped_mm`` in bf16 inside the fp32 model, torchtitan's deterministic scatter-add
    custom op in the combine, a shared expert, and a per-expert token counter updated in place
    in training."""
    torch.manual_seed(0)
    factory = functools.partial(_torchtitan_block, hidden, ffn, experts, top_k, score, route_norm, route_scale,
                                groups, shared)
    return TinyMoELM(factory, hidden=hidden).train()


__all__ = ["torchtitan_available", "torchtitan_moe_lm"]
