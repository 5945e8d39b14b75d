"""Step 2: whether a candidate breaks the graph, and its gating, read by the graph pass's own
routing synthesis from a recorded run of the block's forward."""

from __future__ import annotations

import torch
from torch import nn

from grouter_pass.spec import GatingSpec, NoMatch


def graph_breaks(block: nn.Module, x: torch.Tensor) -> int:
    """Graph breaks Dynamo takes on ``block(x)``, counted in an isolated region (no reset)."""
    from grouter_pass.inspect.graph_breaks import graph_breaks

    return graph_breaks(block, x).breaks


def gating_spec(block: nn.Module, x: torch.Tensor, router_weight: torch.Tensor
                 ) -> tuple[GatingSpec, str | None] | NoMatch:
    """The gating of ``block``, read from a recorded run of its forward (see ``function_trace``)
    by the graph pass's own routing synthesis: the selection whose router is ``router`` (by the
    identity of its weight among the recorded inputs), read as a spec ``grouter.route`` computes
    from that router's logits."""
    from grouter_pass.integrations.function_trace import record_forward
    from grouter_pass.passes.canonicalize import canonicalize_gating_pass
    from grouter_pass.passes.dataflow import GraphFacts, strip_pure_views
    from grouter_pass.passes.detect.anchors import find_anchors
    from grouter_pass.passes.detect.routing import analyse_routing

    gm, inputs, _ = record_forward(block, x)
    canonicalize_gating_pass(gm)
    facts = GraphFacts(gm.graph)
    reason: NoMatch = NoMatch("no top-k gating on the router's logits in a recorded run of the block")
    for anchor in find_anchors(gm.graph, facts):
        if anchor.kind == "lookup":
            continue
        analysis = analyse_routing(gm.graph, facts, anchor)
        if isinstance(analysis, NoMatch):
            reason = analysis
            continue
        weights = [strip_pure_views(a) for a in analysis.router.all_input_nodes if a is not analysis.router_input]
        if not any(inputs.get(w) is router_weight for w in weights):
            continue
        for cand in analysis.candidates:
            if cand.cut is not analysis.router or not cand.spec.uses_route_op:
                continue
            if cand.bias is None:
                return cand.spec, None
            bias = inputs.get(strip_pure_views(cand.bias))
            path = next((name for name, b in block.named_buffers() if b is bias), None) or next(
                (name for name, b in block.named_parameters() if b is bias), None)
            if path is not None:   # a selection bias the block owns
                return cand.spec, path
        reason = NoMatch("no gating spec computes the block's routing from its router's logits alone")
    return reason
