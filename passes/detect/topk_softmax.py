"""top-k on logits -> softmax over the k selected logits: GPT-OSS, GraniteMoE.

Dynamo pre-grad IR after canonicalization (GPT-OSS, router with bias)::

    logits = linear(x, W_router, b_router)       f32[N, E]
    vals, ids = topk(logits, k, dim=-1)          f32[N, k], i64[N, k]
    w = softmax(vals, 1, dtype=f32)              f32[N, k]

becomes::

    w, ids = grouter.route(logits, None, top_k=k, score_func="softmax", order="topk_then_score", ...)

This is also the gate form of the Grouter reference code (there with a x2.5 scale).
"""

from __future__ import annotations

from grouter_pass.passes.detect.gating_chain import GatingParse
from grouter_pass.passes.detect.registry import build_spec, register_gating_family
from grouter_pass.spec import GatingSpec, NoMatch


@register_gating_family("topk_softmax")
def match_topk_softmax(parse: GatingParse) -> GatingSpec | NoMatch:
    if parse.order != "topk_then_score" or parse.score_func != "softmax":
        return NoMatch("not top-k-then-softmax")
    return build_spec("topk_softmax", parse)
