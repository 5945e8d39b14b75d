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

import logging
from dataclasses import dataclass

import torch
import torch.fx as fx

# importing the family modules registers them, in this (documented) order
from grouter_pass.passes.detect import sigmoid_topk, softmax_topk, topk_softmax  # noqa: F401
from grouter_pass.passes.detect.experts import ExpertsMatch, match_experts
from grouter_pass.passes.detect.gating_chain import GatingParse, parse_gating, topk_anchors
from grouter_pass.passes.detect.registry import GATING_FAMILIES, classify, register_gating_family
from grouter_pass.passes.graph_utils import ancestors, common_module_path, module_path, tensor_meta
from grouter_pass.passes.probe import probe_experts, probe_gating
from grouter_pass.spec import GatingSpec, NoMatch, SiteReport

log = logging.getLogger(__name__)


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


def gating_region(graph: fx.Graph, parse: GatingParse) -> list[fx.Node] | NoMatch:
    """Nodes between the router logits and ``(weights, ids)``, in graph order."""
    upstream = ancestors([parse.logits]) | {parse.logits}
    if parse.scale_node is not None:  # a runtime scalar: an input of the site, not part of it
        upstream |= ancestors([parse.scale_node]) | {parse.scale_node}
    outs = [parse.weights, parse.ids]
    region = (ancestors(outs) | set(outs)) - upstream
    if parse.bias is not None:
        region.discard(parse.bias)
    for n in region:
        if n.op == "placeholder" and tensor_meta(n) is not None:
            return NoMatch("the gating also reads tensor input %s", (n.name,), partial=True)
        if n.op == "get_attr":
            return NoMatch("the gating reads module attribute %s", (n.target,), partial=True)
    return [n for n in graph.nodes if n in region]


def _reader_before_route_inputs(graph: fx.Graph, parse: GatingParse, regions: set[fx.Node]) -> NoMatch | None:
    """The new route node goes after its last input; every other reader of the old weights/ids
    must come after that point to be rewired to it."""
    position = {n: i for i, n in enumerate(graph.nodes)}
    last = max(position[n] for n in (parse.logits, parse.bias, parse.scale_node) if n is not None)
    for old in (parse.weights, parse.ids):
        for user in old.users:
            if user not in regions and position[user] <= last:
                return NoMatch("%s reads the routing before the router's runtime scale is computed", (user.name,),
                               partial=True)
    return None


def _log(result: NoMatch, where: str) -> None:
    if result.partial:
        log.info("grouter: left %s unchanged: %s", where, result.detail)
    else:
        log.debug("grouter: %s is not a gating site: %s", where, result.detail)


def match_site(graph: fx.Graph, anchor: fx.Node, *, probe: bool = True) -> Site | SiteReport:
    """Try to build a :class:`Site` around ``anchor``; a :class:`SiteReport` with the reason if not."""
    where = module_path(anchor)
    if anchor.target is not torch.topk:
        # top-1 by max/argmax (Switch, GShard) is handled by later releases
        return SiteReport(where, reason=NoMatch("top-1 routing by %s is not supported yet",
                                                (anchor.target.__name__,)).detail)
    parse = parse_gating(anchor)
    if isinstance(parse, NoMatch):
        return _rejected(parse, where)
    spec = classify(parse)
    if isinstance(spec, NoMatch):
        return _rejected(spec, where)
    experts = match_experts(graph, parse.ids, parse.weights, spec.num_experts, spec.top_k)
    if isinstance(experts, NoMatch):
        return _rejected(experts, where, spec)
    where = common_module_path([parse.logits, experts.output])
    region = gating_region(graph, parse)
    if isinstance(region, NoMatch):
        return _rejected(region, where, spec)
    late = _reader_before_route_inputs(graph, parse, set(region) | set(experts.region))
    if late is not None:
        return _rejected(late, where, spec)
    if probe:
        bad = probe_gating(spec, region, parse.logits, parse.bias, parse.weights, parse.ids)
        if bad is None:
            bad = probe_experts(experts.spec, experts.region, ids=parse.ids, weights=parse.weights, x=experts.x,
                                w_up=experts.w_up, w_down=experts.w_down, b_up=experts.b_up, b_down=experts.b_down,
                                output=experts.output)
        if bad is not None:
            return _rejected(bad, where, spec, experts.spec)
    return Site(module_path=where, gating=GatingMatch(spec, parse, region), experts=experts)


def _rejected(result: NoMatch, where: str, spec: GatingSpec | None = None, experts=None) -> SiteReport:
    _log(result, where)
    return SiteReport(module_path=where, gating=spec, experts=experts, reason=result.detail, partial=result.partial)


def find_gating_sites(gm: fx.GraphModule, *, probe: bool = True) -> tuple[list[Site], list[SiteReport]]:
    """All rewritable sites of ``gm`` (canonicalized), and reports of the near-misses (candidates
    that looked like a MoE site but could not be rewritten)."""
    graph = gm.graph
    sites: list[Site] = []
    rejected: list[SiteReport] = []
    claimed: set[fx.Node] = set()
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
        elif result.partial:
            rejected.append(result)
    return sites, rejected


__all__ = ["GATING_FAMILIES", "GatingMatch", "Site", "find_gating_sites", "gating_region", "match_site",
           "register_gating_family"]
