"""Find MoE gating sites in a canonicalized Dynamo graph, by dataflow and shapes.

A *site* is a gating subgraph plus the routed-expert computation that consumes it:

1. anchors: every top-k over the last dim of a 2-D tensor (``gating_chain.topk_anchors``);
2. parse: walk back from the anchor to an E-output router linear and forward to the routing
   weights (``gating_chain.parse_gating``); a family from the registry names and accepts it;
3. experts: the first two expert GEMMs fed by the anchor's indices, the token input, the
   activation and the combine (``experts.match_experts``);
4. probe: both regions are cut out and run against the ops' reference semantics on random
   inputs (``grouter_pass.passes.probe``).

Only a site that passes all four is returned for rewriting. Everything else is reported with
its reason: at INFO when it looked like a MoE site (an E-way router feeding a top-k), at DEBUG
otherwise (a vocabulary top-k, an auxiliary-loss top-k, the inner top-k of a group mask).
Detection never looks at module classes or attribute names.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

# importing the family modules registers them, in this (documented) order
from grouter_pass.passes.detect import (  # noqa: F401
    sigmoid_topk,
    softmax_topk,
    sparsemixer,
    topk_sigmoid,
    topk_softmax,
)
from grouter_pass.passes.detect.experts import ExpertsMatch, find_capacity_limit, match_experts
from grouter_pass.passes.detect.gating_chain import GatingParse, parse_gating, router_of_top1, topk_anchors
from grouter_pass.passes.detect.registry import GATING_FAMILIES, classify, register_gating_family
from grouter_pass.passes.graph_utils import (
    ancestors,
    common_module_path,
    descendants,
    is_getitem,
    module_path,
    shape_of,
    tensor_meta,
)
from grouter_pass.passes.probe import probe_experts, probe_gating
from grouter_pass.spec import GatingSpec, NoMatch, SiteReport

log = logging.getLogger(__name__)


def map_nodes(obj: Any, f: Callable[[fx.Node], fx.Node]) -> Any:
    """A copy of a (dataclass / list / dict) structure with every fx.Node replaced by ``f(node)``."""
    if isinstance(obj, fx.Node):
        return f(obj)
    if isinstance(obj, list):
        return [map_nodes(x, f) for x in obj]
    if isinstance(obj, tuple):
        return tuple(map_nodes(x, f) for x in obj)
    if isinstance(obj, dict):
        return {k: map_nodes(v, f) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type) and any(
            isinstance(getattr(obj, fl.name), (fx.Node, list, tuple, dict)) or dataclasses.is_dataclass(
                getattr(obj, fl.name)) for fl in dataclasses.fields(obj)):
        return dataclasses.replace(obj, **{fl.name: map_nodes(getattr(obj, fl.name), f)
                                          for fl in dataclasses.fields(obj) if fl.init})
    return obj


@dataclass
class GatingMatch:
    spec: GatingSpec
    parse: GatingParse
    region: list[fx.Node]   # graph order: the nodes from the logits to (weights, ids)

    @property
    def logits(self) -> fx.Node:
        return self.parse.logits

    @property
    def bias(self) -> fx.Node | None:
        return self.parse.bias

    @property
    def weights(self) -> fx.Node:
        return self.parse.weights

    @property
    def ids(self) -> fx.Node:
        return self.parse.ids


@dataclass
class Site:
    module_path: str
    gating: GatingMatch
    experts: ExpertsMatch

    def report(self) -> SiteReport:
        return SiteReport(module_path=self.module_path, gating=self.gating.spec, experts=self.experts.spec)

    def translated(self, f: Callable[[fx.Node], fx.Node]) -> Site:
        """The same site with every node mapped through ``f`` (onto another copy of the graph)."""
        return map_nodes(self, f)


def gating_region(graph: fx.Graph, parse: GatingParse) -> list[fx.Node] | NoMatch:
    """Nodes between the router logits and ``(weights, ids)``, in graph order."""
    upstream = ancestors([parse.logits]) | {parse.logits}
    # the bias and a runtime scale are inputs of the site: whatever computes them stays outside
    for site_input in (parse.bias, *parse.runtime_scalars.values()):
        if site_input is not None:
            upstream |= ancestors([site_input]) | {site_input}
    outs = [parse.weights, parse.ids]
    region = (ancestors(outs) | set(outs)) - upstream
    for n in region:
        if n.op == "placeholder" and tensor_meta(n) is not None:
            return NoMatch("the gating also reads tensor input %s", (n.name,), partial=True)
        if n.op == "get_attr":
            return NoMatch("the gating reads module attribute %s", (n.target,), partial=True)
    return [n for n in graph.nodes if n in region]


def _inside_no_grad(graph: fx.Graph, points: list[fx.Node]) -> fx.Node | None:
    """The first of ``points`` (nodes before/after which new ops go) where Dynamo's
    ``_set_grad_enabled`` calls have turned autograd off; None if all are under grad."""
    enabled, pending = True, set(points)
    for n in graph.nodes:
        if n in pending:
            if not enabled:
                return n
            pending.discard(n)
            if not pending:
                return None
        if n.op == "call_function" and getattr(n.target, "__name__", "") == "_set_grad_enabled" and n.args:
            enabled = bool(n.args[0])
    return None


def route_insertion_point(graph: fx.Graph, parse: GatingParse) -> fx.Node:
    """The node after which ``grouter.route`` goes: its last input, or, when that lies inside a
    ``no_grad`` block (PhiMoE computes its threshold there), the call that turns grad back on."""
    remaining = {parse.logits, parse.bias, *parse.runtime_scalars.values()} - {None}
    enabled, point = True, None
    for n in graph.nodes:
        if n in remaining:
            remaining.discard(n)
            point = n
        if n.op == "call_function" and getattr(n.target, "__name__", "") == "_set_grad_enabled" and n.args:
            enabled = bool(n.args[0])
            if not remaining and enabled:
                return n
        if not remaining and enabled:
            return point
    return point


def _reader_before_route_inputs(graph: fx.Graph, parse: GatingParse, regions: set[fx.Node]) -> NoMatch | None:
    """The new route node goes after :func:`route_insertion_point`; every other reader of the old
    weights/ids must come after that point to be rewired to it."""
    position = {n: i for i, n in enumerate(graph.nodes)}
    last = position[route_insertion_point(graph, parse)]
    for old in (parse.weights, parse.ids):
        for user in old.users:
            if user not in regions and position[user] <= last:
                return NoMatch("%s reads the routing before the router's runtime scale is computed", (user.name,),
                               partial=True)
    return None


def match_site(graph: fx.Graph, anchor: fx.Node, *, probe: bool = True) -> Site | SiteReport:
    """Try to build a :class:`Site` around ``anchor``; a :class:`SiteReport` with the reason if not."""
    where = module_path(anchor)
    parse = sparsemixer.parse_sparsemixer(anchor) if anchor.target is torch.max else None
    if parse is None and anchor.target is not torch.topk:
        return _top1_report(anchor, where)
    if parse is None:
        parse = parse_gating(anchor)
    if isinstance(parse, NoMatch):
        return _rejected(parse, where)
    spec = classify(parse)
    if isinstance(spec, NoMatch):
        return _rejected(spec, where)
    experts = match_experts(graph, parse.ids, parse.weights, spec.num_experts, spec.top_k, after=anchor)
    if isinstance(experts, NoMatch):
        return _rejected(experts, where, spec)
    where = common_module_path([parse.logits, experts.output])
    region = gating_region(graph, parse)
    if isinstance(region, NoMatch):
        return _rejected(region, where, spec)
    late = _reader_before_route_inputs(graph, parse, set(region) | set(experts.region))
    if late is not None:
        return _rejected(late, where, spec)
    no_grad = _inside_no_grad(graph, [experts.output])  # route's point is chosen under grad by construction
    if no_grad is not None:
        return _rejected(NoMatch("the rewritten ops would run inside a no_grad region (at %s)", (no_grad.name,),
                                 partial=True), where, spec)
    if parse.dense and any(u not in set(region) | set(experts.region) for u in parse.weights.users):
        return _rejected(NoMatch("the dense [N, E] routing weights are also read outside the experts",
                                 partial=True), where, spec)
    if probe:
        bad = probe_gating(spec, region, parse)
        if bad is None:
            bad = probe_experts(experts, ids=parse.ids, weights=parse.weights, dense=parse.dense)
        if bad is not None:
            return _rejected(bad, where, spec, experts.spec)
    return Site(module_path=where, gating=GatingMatch(spec, parse, region), experts=experts)


def _top1_report(anchor: fx.Node, where: str) -> SiteReport:
    """Top-1 by ``max`` / ``argmax`` (Switch, GShard): recognised to say why it is not rewritten."""
    name = anchor.target.__name__
    if router_of_top1(anchor) is None:
        return _rejected(NoMatch("%s is not over router scores", (name,)), where)
    ids = next((u for u in anchor.users if is_getitem(u, 1)), None) if anchor.target is torch.max else anchor
    n_tokens = (shape_of(anchor.args[0]) or (None,))[0]
    if ids is not None and n_tokens is not None:
        capacity = find_capacity_limit(descendants([ids], limit=2000), n_tokens)
        if capacity is not None:
            return _rejected(NoMatch(
                "routing by %s with capacity-based dispatch (at most %s tokens per expert, the rest dropped): the "
                "grouter ops never drop tokens, so the site is left unchanged", (name, capacity), partial=True), where)
    return _rejected(NoMatch("top-1 routing by %s is not supported yet", (name,), partial=True), where)


def _rejected(result: NoMatch, where: str, spec: GatingSpec | None = None, experts=None) -> SiteReport:
    return SiteReport(module_path=where, gating=spec, experts=experts, reason=result.detail, partial=result.partial)


def find_gating_sites(gm: fx.GraphModule, *, probe: bool = True) -> tuple[list[Site], list[SiteReport]]:
    """All rewritable sites of ``gm`` (canonicalized), and reports of the near-misses (candidates
    that looked like a MoE site but could not be rewritten)."""
    graph = gm.graph
    sites: list[Site] = []
    rejected: list[SiteReport] = []
    claimed: set[fx.Node] = set()
    reported: set[fx.Node] = set()  # router logits already explained: one report per router
    for anchor in topk_anchors(graph):
        if anchor in claimed:
            continue
        result = match_site(graph, anchor, probe=probe)
        if isinstance(result, Site):
            claimed.update(result.gating.region)
            claimed.update(result.experts.region)
            sites.append(result)
            log.debug("grouter: site %s: %s / %s", result.module_path, result.gating.spec.describe(),
                      result.experts.spec.describe())
            continue
        router = router_of_top1(anchor) if anchor.target is not torch.topk else _router_of(anchor)
        if result.partial and (router is None or router not in reported):
            log.info("grouter: left %s unchanged: %s", result.module_path, result.reason)
            rejected.append(result)
            if router is not None:
                reported.add(router)
        else:
            log.debug("grouter: %s is not a gating site: %s", result.module_path, result.reason)
    return sites, rejected


def _router_of(anchor: fx.Node) -> fx.Node | None:
    parse = parse_gating(anchor)
    return None if isinstance(parse, NoMatch) else parse.logits


__all__ = ["GATING_FAMILIES", "GatingMatch", "Site", "find_gating_sites", "gating_region", "match_site",
           "register_gating_family", "route_insertion_point"]
