"""``grouter::external_routing``: routing that does not come from the model's representation.

Inputs:  ``tokens`` — the token ids ``[B, S]`` (Grouter and hash sources) or any tensor whose
         leading ``token_dims`` dims are the tokens (precomputed routing of a model fed
         ``inputs_embeds``: the first MoE layer's hidden states); ``source`` — the key of a
         routing source registered in :mod:`grouter_pass.runtime.sources`; ``top_k``.
Outputs: weights ``[N, k]`` float32, ids ``[N, k]`` int64, ``N = prod(tokens.shape[:token_dims])``.

Opaque on purpose: the source may be a whole network (the Grouter, run frozen under no_grad) or
a lookup of routing delivered with the batch; the graph only needs the output sizes, which the
fake implementation gives from the symbolic token count. Nothing is differentiable: the routing
is a constant of the step, as in the paper.
"""

from __future__ import annotations

import math

import torch

from grouter_pass.runtime import source_of, step_plan


@torch.library.custom_op("grouter::external_routing", mutates_args=())
def external_routing(tokens: torch.Tensor, source: int, token_dims: int, top_k: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    src = source_of(source)
    n_tokens = math.prod(tokens.shape[:token_dims])
    plan = step_plan(source)  # the expert-parallel step runner may have computed it already
    if plan is not None and plan.routing is not None:
        weights, ids = plan.routing
    elif src.needs_token_ids:
        weights, ids = src.compute(tokens)
    else:
        weights, ids = src.compute(tokens, n_tokens, top_k)
    if ids.shape != (n_tokens, top_k):
        raise ValueError(f"routing source {src.describe()} returned ids {list(ids.shape)}; "
                         f"expected [{n_tokens}, {top_k}]")
    return weights.contiguous(), ids.contiguous()


@external_routing.register_fake
def _external_routing_fake(tokens, source, token_dims, top_k):
    n = math.prod(tokens.shape[:token_dims])
    return (tokens.new_empty((n, top_k), dtype=torch.float32), tokens.new_empty((n, top_k), dtype=torch.int64))


def _no_backward(ctx, *grads):
    return None, None, None, None


external_routing.register_autograd(_no_backward)
