"""sigmoid + correction bias + group-limited top-k + gather + renormalise + scale: DeepSeek-V3, GLM-4-MoE.

Dynamo pre-grad IR after canonicalization (DeepSeek-V3, n_group=4, topk_group=2)::

    logits = linear(Tensor.to(x, f32), Tensor.to(W, f32))          f32[N, E]
    s      = sigmoid(logits)                                        f32[N, E]
    sel    = add(s, e_score_correction_bias)                        f32[N, E]
    gs     = sum(topk(Tensor.view(sel, -1, G, E/G), 2)[0], -1)      f32[N, G]
    keep   = scatter(zeros_like(gs), 1, topk(gs, tg)[1], 1)         f32[N, G]
    sel    = masked_fill(sel, bitwise_not(expand(keep)...), -inf)   f32[N, E]
    ids    = topk(sel, k, dim=-1, sorted=False)[1]                  i64[N, k]
    w      = gather(s, 1, ids)                 <- the *unbiased* scores
    w      = mul(div(w, add(sum(w, -1, keepdim=True), 1e-20)), routed_scaling_factor)

becomes::

    w, ids = grouter.route(logits, e_score_correction_bias, top_k=k, score_func="sigmoid",
                           bias_mode="selection", n_group=G, topk_group=tg, renorm="sum",
                           renorm_eps=1e-20, scaling_factor=2.5, sorted=False, ...)

The bias only steers the selection, so it gets no gradient, exactly as in the original.
"""

from __future__ import annotations

from grouter_pass.passes.detect.gating_chain import GatingParse
from grouter_pass.passes.detect.registry import build_spec, register_gating_family
from grouter_pass.spec import GatingSpec, NoMatch


@register_gating_family("sigmoid_topk")
def match_sigmoid_topk(parse: GatingParse) -> GatingSpec | NoMatch:
    if parse.order != "score_then_topk" or parse.score_func != "sigmoid":
        return NoMatch("not sigmoid-then-top-k")
    return build_spec("sigmoid_topk", parse)
