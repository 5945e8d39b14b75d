"""PhiMoE's sparsemixer (evaluation mode): two rounds of "best expert, softmax over the experts
close to it", on the raw router logits.

Dynamo pre-grad IR after canonicalization (PhiMoE, eval; the ``_set_grad_enabled`` calls of
its ``no_grad`` blocks omitted)::

    logits = linear(x, W)                                            f32[N, E]
    best, ind1 = max(logits, -1, keepdim=True)
    far1   = gt(div(sub(best, logits), Tensor.clamp(abs(logits), min=best)), 2 * jitter_eps)
    w1     = gather(softmax(masked_fill(logits, far1, -inf), -1), -1, ind1)
    second = scatter(logits, -1, ind1, -inf)
    best2, ind2 = max(second, -1, keepdim=True)
    far2   = gt(div(sub(best2, logits), Tensor.clamp(abs(logits), min=best2)), 2 * jitter_eps)
    w2     = gather(softmax(masked_fill(second, far2, -inf), -1), -1, ind2)
    weights, ids = concat((w1, w2), -1), concat((ind1, ind2), -1)

becomes ``grouter.route(logits, None, top_k=2, score_func="sparsemixer",
sparsemixer_threshold=2 * jitter_eps, ...)``.

In training mode PhiMoE samples the experts (Gumbel noise, random midpoints) and applies a
custom ``autograd.Function``: that is not a function of the logits, so the site is left
unchanged, with the reason.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from grouter_pass.passes.detect.gating_chain import (
    GatingParse,
    find_router_logits,
    parse_weight_chain,
    scalar_or_runtime,
)
from grouter_pass.passes.detect.registry import build_spec, register_gating_family
from grouter_pass.passes.graph_utils import ancestors, descendants, is_function, is_getitem, shape_of, static_int
from grouter_pass.spec import GatingSpec, NoMatch

_CATS = (torch.cat, torch.concat)
_RANDOM = {"exponential_", "uniform_", "normal_", "bernoulli_", "random_"}
_RANDOM_FUNCTIONS = {torch.rand_like, torch.randn_like, torch.rand, torch.randn, torch.randint, torch.bernoulli,
                     torch.multinomial}


def _is_random(n: fx.Node) -> bool:
    return (n.op == "call_method" and n.target in _RANDOM) or (
        n.op == "call_function" and n.target in _RANDOM_FUNCTIONS)


def _cat_of(first: fx.Node) -> fx.Node | None:
    for u in first.users:
        if is_function(u, *_CATS) and isinstance(u.args[0], (list, tuple)) and len(u.args[0]) == 2 and \
                u.args[0][0] is first:
            return u
    return None


def parse_sparsemixer(anchor: fx.Node) -> GatingParse | NoMatch | None:
    """A sparsemixer site around its first ``max(logits, -1, keepdim=True)``; None if it is not one."""
    if not (is_function(anchor, torch.max) and anchor.args[1] in (-1,) and anchor.kwargs.get("keepdim")):
        return None
    logits = find_router_logits(anchor.args[0])
    if logits is None or anchor.args[0] is not logits:
        return None
    near = descendants([anchor], limit=150)
    if any(_is_random(n) and anchor in ancestors([n], stop={logits}) for n in near):
        return NoMatch("PhiMoE-style sparsemixer routing samples experts at random (training mode) and has a "
                       "custom backward: not a function of the logits, left unchanged (evaluation mode is rewritten)",
                       partial=True)
    ind1 = next((u for u in anchor.users if is_getitem(u, 1)), None)
    ids = _cat_of(ind1) if ind1 is not None else None
    gathers = [u for u in (ind1.users if ind1 is not None else ()) if is_function(u, torch.gather)]
    weights = _cat_of(gathers[0]) if gathers else None
    if ids is None or weights is None:
        return None
    region = ancestors([ids, weights]) - ancestors([logits]) - {logits}
    gts = [n for n in region if n.op == "call_function" and getattr(n.target, "__name__", "") == "gt"]
    thresholds = {n.args[1] for n in gts}
    if len(thresholds) != 1:
        return NoMatch("sparsemixer-like routing without one threshold (%s)", (len(thresholds),), partial=True)
    num_experts = static_int(shape_of(logits)[-1])
    parse = GatingParse(anchor=anchor, logits=logits, num_experts=num_experts, top_k=2, ids=ids, weights=weights,
                        order="score_then_topk", score_func="sparsemixer", score_dtype=None, score_node=None,
                        bias=None, bias_mode="none")
    threshold = scalar_or_runtime(parse, "sparsemixer_threshold", thresholds.pop())
    if threshold is None:
        return NoMatch("sparsemixer threshold is neither a constant nor a runtime scalar", partial=True)
    parse.sparsemixer_threshold = threshold
    problem = parse_weight_chain(parse, weights)
    return problem if problem is not None else parse


@register_gating_family("sparsemixer")
def match_sparsemixer(parse: GatingParse) -> GatingSpec | NoMatch:
    if parse.score_func != "sparsemixer":
        return NoMatch("not a sparsemixer")
    return build_spec("sparsemixer", parse)
