"""softmax -> top-k (-> renormalise) (-> scale): Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, Jamba, DBRX.

Dynamo pre-grad IR after canonicalization (Mixtral, fp32)::

    logits = linear(x, W_gate)                   f32[N, E]
    probs  = softmax(Tensor.to(logits, f32), -1) f32[N, E]
    vals, ids = topk(probs, k, dim=-1)           f32[N, k], i64[N, k]
    w = div(vals, sum(vals, -1, keepdim=True))   f32[N, k]      (renorm: Mixtral, Qwen3 norm_topk_prob)
    w = Tensor.to(w, logits.dtype)                               (Qwen2/3, OLMoE)

becomes::

    w, ids = grouter.route(logits, None, top_k=k, score_func="softmax", renorm="sum", ...)

A selection-only bias (``softmax + b -> topk``, weights gathered from the unbiased
probabilities) and group-limited selection are accepted too; they keep the family name.
"""

from __future__ import annotations

from grouter_pass.passes.detect.gating_chain import GatingParse
from grouter_pass.passes.detect.registry import build_spec, register_gating_family
from grouter_pass.spec import GatingSpec, NoMatch


@register_gating_family("softmax_topk")
def match_softmax_topk(parse: GatingParse) -> GatingSpec | NoMatch:
    if parse.order != "score_then_topk" or parse.score_func != "softmax":
        return NoMatch("not softmax-then-top-k")
    return build_spec("softmax_topk", parse)
