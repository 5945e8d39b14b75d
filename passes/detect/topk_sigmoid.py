"""top-k on logits -> sigmoid of the selected logits, as a dense [N, E] score matrix: Llama 4.

Dynamo pre-grad IR after canonicalization (Llama 4, top-1)::

    logits = linear(x, W_router)                               f32[N, E]
    vals, ids = topk(logits, 1, dim=-1)                        f32[N, 1], i64[N, 1]
    dense  = scatter(full_like(logits, -inf), -1, ids, vals)   f32[N, E]
    scores = Tensor.to(sigmoid(Tensor.to(dense, f32)), f32)    f32[N, E]   zero where not selected

The experts then run on every token (``hidden.repeat(E, 1) * scores``, ``bmm`` over ``[E, N, H]``),
weighting each expert's *input*. The site becomes::

    w, ids = grouter.route(logits, None, top_k=1, score_func="sigmoid", order="topk_then_score", ...)
    out, _ = grouter.moe_experts(..., weight_on_input=True)

which computes only the selected experts, with the same numbers (an unselected expert sees a
zero input and, having no bias, adds exactly zero).
"""

from __future__ import annotations

from grouter_pass.passes.detect.gating_chain import GatingParse
from grouter_pass.passes.detect.registry import build_spec, register_gating_family
from grouter_pass.spec import GatingSpec, NoMatch


@register_gating_family("topk_sigmoid")
def match_topk_sigmoid(parse: GatingParse) -> GatingSpec | NoMatch:
    if parse.order != "topk_then_score" or parse.score_func != "sigmoid":
        return NoMatch("not top-k-then-sigmoid")
    return build_spec("topk_sigmoid", parse)
