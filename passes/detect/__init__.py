"""Find MoE sites in a canonicalized Dynamo graph, by dataflow and by running it.

A *site* is a routing decision plus the routed-expert computation that consumes it:

1. **anchors** (:mod:`.anchors`): every selection over E alternatives (top-k / max / argmax /
   sort of any rank, argmax rounds, token-id lookups);
2. **routing** (:mod:`.routing`): the router behind the anchor, the routing region, and the
   readings of the gating that reproduce it (a :class:`~grouter_pass.spec.GatingSpec` per cut,
   or the gating kept as written), each with the boundary nodes whose values it determines;
3. **experts** (:mod:`.experts`): what consumes that boundary up to the combine, its inputs and
   the :class:`~grouter_pass.spec.ExpertsSpec` that reproduces it in value and gradient.

Readings are tried in order (upstream cut first, deepest weights first, kept gating last); the
first whose experts match makes the site. Everything else is reported with the step and the node
it failed at: at INFO when it looked like a MoE site, at DEBUG otherwise (a vocabulary top-k, an
attention top-k, the inner top-k of a group mask). Detection never reads module classes or
attribute names.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from grouter_pass.config import DEFAULT_PROBE_WEIGHT_BUDGET
from grouter_pass.passes.dataflow import GraphFacts
from grouter_pass.passes.detect.anchors import Anchor, find_anchors
from grouter_pass.passes.detect.experts import ExpertsMatch, GradientProofs, match_experts
from grouter_pass.passes.detect.routing import (
    Relation,
    RoutingCandidate,
    RoutingReadings,
    analyse_routing,
    check_route_op,
    family_of,
)
from grouter_pass.passes.graph_utils import (
    ancestors,
    common_module_path,
    descendants,
    module_path,
    same_shape,
    shape_of,
)
from grouter_pass.passes.probe_weights import ProbeWeights
from grouter_pass.spec import GatingSpec, NoMatch, SiteReport

log = logging.getLogger(__name__)


def map_nodes(obj: Any, f: Callable[[fx.Node], fx.Node]) -> Any:
    """A copy of a (dataclass / list / dict) structure with every fx.Node replaced by ``f(node)``
    (dict keys included)."""
    if isinstance(obj, fx.Node):
        return f(obj)
    if isinstance(obj, list):
        return [map_nodes(x, f) for x in obj]
    if isinstance(obj, tuple):
        return tuple(map_nodes(x, f) for x in obj)
    if isinstance(obj, dict):
        return {map_nodes(k, f): map_nodes(v, f) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type) and not isinstance(
            obj, (GatingSpec, Relation)) and any(
            isinstance(getattr(obj, fl.name), (fx.Node, list, tuple, dict)) or dataclasses.is_dataclass(
                getattr(obj, fl.name)) for fl in dataclasses.fields(obj)):
        return dataclasses.replace(obj, **{fl.name: map_nodes(getattr(obj, fl.name), f)
                                          for fl in dataclasses.fields(obj) if fl.init})
    return obj


@dataclass
class GatingMatch:
    """The gating half of a site, as the rewrite needs it."""

    spec: GatingSpec
    anchor: fx.Node
    router: fx.Node                      # the router's logits
    router_input: fx.Node                # the hidden state the router reads
    cut: fx.Node | None                  # what ``grouter.route`` reads (None: gating kept as written)
    bias: fx.Node | None
    boundary: dict[fx.Node, Relation]    # nodes whose values the routing determines
    region: list[fx.Node]                # routing nodes between the cut and the boundary (graph order)
    runtime_scalars: dict[str, fx.Node] = field(default_factory=dict)
    weights_node: fx.Node | None = None  # kept gating: what the experts op reads
    ids_node: fx.Node | None = None
    anchor_ids: fx.Node | None = None    # the selection's index output

    @property
    def logits(self) -> fx.Node:
        return self.router

    @property
    def weights(self) -> fx.Node:
        """The node holding the routing weights as the gating leaves them (the latest one shaped
        like the ids; else a column or the dense form)."""
        if self.weights_node is not None:
            return self.weights_node
        ids_shape = shape_of(self.ids)
        shaped = [n for n, r in self.boundary.items() if r.kind == "weights" and same_shape(shape_of(n), ids_shape)]
        cands = shaped or [n for n, r in self.boundary.items() if r.kind == "weights"] or [
            n for n, r in self.boundary.items() if r.kind == "dense"]
        return cands[-1]

    @property
    def ids(self) -> fx.Node:
        """The node holding the ids as the selection produced them."""
        if self.ids_node is not None:
            return self.ids_node
        if any(self.boundary.get(self.anchor_ids) == r for r in [Relation("ids")]):
            return self.anchor_ids
        return next(n for n, r in self.boundary.items() if r.kind == "ids")


@dataclass
class Site:
    module_path: str
    gating: GatingMatch
    experts: ExpertsMatch
    #: a node of the caller's graph with the shape of the experts' output (to reshape back to)
    output_like: fx.Node | None = None

    def report(self) -> SiteReport:
        return SiteReport(module_path=self.module_path, gating=self.gating.spec, experts=self.experts.spec)

    def translated(self, f: Callable[[fx.Node], fx.Node]) -> Site:
        """The same site with every node mapped through ``f`` (onto another copy of the graph)."""
        return map_nodes(self, f)


def _inside_no_grad(graph: fx.Graph, points: list[fx.Node]) -> fx.Node | None:
    """The first of ``points`` where Dynamo's ``_set_grad_enabled`` calls have turned autograd off."""
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


def route_insertion_point(graph: fx.Graph, gating: GatingMatch) -> fx.Node:
    """The node after which the site's new routing nodes go: after the last of their inputs, and
    (when that lies inside a ``no_grad`` block) after the call that turns grad back on."""
    if gating.cut is not None:
        remaining = {gating.cut, gating.bias, *gating.runtime_scalars.values()} - {None}
    else:
        remaining = {gating.weights_node, gating.ids_node} - {None}
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


def _output_like(graph: fx.Graph, facts: GraphFacts, out: fx.Node, removed: set[fx.Node]) -> fx.Node | None | NoMatch:
    """A node that survives the rewrite with exactly the output's shape (the op's ``[N, H]``
    result is reshaped to it); None when a reshape with constants and one ``-1`` will do."""
    shape = shape_of(out)
    symbolic = [d for d in shape if not isinstance(d, int)]
    if len(symbolic) <= 1 and len(shape) <= 2:
        return None
    for n in reversed([m for m in graph.nodes if facts.position[m] < facts.position[out]]):
        if n in removed or n.op == "output":
            continue
        if same_shape(shape_of(n), shape):
            return n
    if len(symbolic) <= 1:
        return None
    return NoMatch("no tensor of the output's shape %s survives the rewrite to reshape the result to", (list(shape),),
                   node=out, step="rewrite", partial=True)


def match_site(graph: fx.Graph, facts: GraphFacts, anchor: Anchor, *, probe: bool = True, probe_ops: bool = True,
               weights: ProbeWeights | None = None, gradient_proofs: GradientProofs | None = None,
               routing_readings: RoutingReadings | None = None) -> Site | SiteReport:
    """Try to build a :class:`Site` around ``anchor``; a :class:`SiteReport` with the reason if not.
    ``gradient_proofs`` and ``routing_readings`` carry the probe's gradient comparisons and the
    routing syntheses from one site of a graph to the next (the layers of a model repeat them).
    ``probe_ops=False`` proves the site against the ops' reference semantics only (see
    ``GrouterConfig.probe_ops``)."""
    where = module_path(anchor.node)
    routing = analyse_routing(graph, facts, anchor, readings=routing_readings)
    if isinstance(routing, NoMatch):
        return _rejected(routing, where)
    tried: dict[frozenset, Any] = {}
    best: NoMatch | None = None
    best_spec: GatingSpec | None = None
    for cand in routing.candidates:
        key = frozenset(cand.boundary.items())
        if key not in tried:
            tried[key] = match_experts(graph, facts, routing, cand, check_gradients=probe, probe_weights=weights,
                                       gradient_proofs=gradient_proofs, probe_ops=probe_ops)
        result = tried[key]
        if isinstance(result, NoMatch):
            if best is None or (result.partial and not best.partial):
                best, best_spec = result, cand.spec
            continue
        site = _site(graph, facts, routing, cand, result)
        if isinstance(site, NoMatch):
            best, best_spec = site, cand.spec
            continue
        bad = check_route_op(graph, facts, routing, cand, gradients=probe) if probe_ops else None
        if bad is not None:   # the op itself disagrees with the model (its reference did not)
            best, best_spec = bad, cand.spec
            continue
        return site
    random = [n for n in routing.region if n in facts.random]
    if random and best is not None and best.partial:   # it looked like MoE, and its routing is random
        best = NoMatch("the routing samples experts at random (training-mode noise or sampling, at %s) and no "
                       "reading of it reproduces the experts' routing", (random[0].name,), node=random[0],
                       step="routing", partial=True)
    return _rejected(best, where, best_spec)


def _site(graph: fx.Graph, facts: GraphFacts, routing: Any, cand: RoutingCandidate, experts: ExpertsMatch
          ) -> Site | NoMatch:
    where = common_module_path([routing.router, experts.output])
    no_grad = _inside_no_grad(graph, [experts.output])
    if no_grad is not None:
        return NoMatch("the rewritten ops would run inside a no_grad region (at %s)", (no_grad.name,), node=no_grad,
                       step="rewrite", partial=True)
    if cand.cut is not None:   # what grouter.route replaces: from the cut to the boundary
        feeds = ancestors(cand.boundary) | set(cand.boundary)
        region = [n for n in routing.region if n is not cand.cut and n in descendants([cand.cut]) and n in feeds]
    else:
        region = []
    gating = GatingMatch(spec=cand.spec, anchor=routing.anchor.node, router=routing.router,
                         router_input=routing.router_input, cut=cand.cut, bias=cand.bias, boundary=cand.boundary,
                         region=region, runtime_scalars=cand.runtime_scalars, weights_node=cand.weights_node,
                         ids_node=cand.ids_node, anchor_ids=routing.anchor.ids[0])
    removed = set(region) | set(experts.region)
    like = _output_like(graph, facts, experts.output, removed)
    if isinstance(like, NoMatch):
        return like
    if any(n in removed for n in ancestors([experts.x])):
        return NoMatch("the experts' token input is computed inside the region the rewrite replaces", node=experts.x,
                       step="rewrite", partial=True)
    return Site(module_path=where, gating=gating, experts=experts, output_like=like)


def _rejected(result: NoMatch | None, where: str, spec: GatingSpec | None = None, experts: Any = None) -> SiteReport:
    if result is None:
        result = NoMatch("no reading of the routing matched")
    return SiteReport(module_path=where, gating=spec, experts=experts, reason=result.detail, partial=result.partial,
                      step=result.step, node=result.node if isinstance(result.node, str) else "")


def find_gating_sites(gm: fx.GraphModule, *, probe: bool = True, probe_ops: bool = True,
                      example_inputs: Sequence[Any] | None = None,
                      probe_weight_budget: int = DEFAULT_PROBE_WEIGHT_BUDGET) -> tuple[list[Site], list[SiteReport]]:
    """All rewritable sites of ``gm`` (canonicalized), and reports of the near-misses (candidates
    that looked like a MoE site but could not be rewritten).

    The probe draws random expert weights while they take at most ``probe_weight_budget`` bytes,
    and reads the model's own (``example_inputs``, attributes of ``gm``) above that."""
    graph = gm.graph
    facts = GraphFacts(graph)
    weights = ProbeWeights.of(gm, example_inputs, probe_weight_budget)
    sites: list[Site] = []
    rejected: list[SiteReport] = []
    claimed: set[fx.Node] = set()
    reported: set[str] = set()
    proofs: GradientProofs = {}   # the layers of one model repeat one expert region: compare its gradients once
    readings: RoutingReadings = {}   # ... and one gating: synthesise its readings once
    with torch.random.fork_rng(devices=[]):
        for anchor in find_anchors(graph, facts):
            if anchor.node in claimed:
                continue
            result = match_site(graph, facts, anchor, probe=probe, probe_ops=probe_ops, weights=weights,
                                gradient_proofs=proofs,
                                routing_readings=readings)
            if isinstance(result, Site):
                claimed.update(result.gating.region)
                claimed.update(result.experts.region)
                claimed.add(result.gating.anchor)
                sites.append(result)
                log.debug("grouter: site %s: %s / %s", result.module_path, result.gating.spec.describe(),
                          result.experts.spec.describe())
                continue
            key = f"{result.module_path}:{result.reason}"
            if result.partial and key not in reported:
                log.info("grouter: left %s unchanged (%s): %s", result.module_path,
                         f"{result.step} at node {result.node}" if result.node else result.step or "?", result.reason)
                rejected.append(result)
                reported.add(key)
            else:
                log.debug("grouter: %s is not a gating site (%s at %s): %s", result.module_path, result.step,
                          result.node, result.reason)
    # a site's own inner selections (a group mask's top-k) are not near-misses of their own
    inside = {module_path(n) for s in sites for n in s.gating.region}
    rejected = [r for r in rejected if not (r.module_path in inside and r.gating is None)]
    return sites, rejected


__all__ = ["GatingMatch", "Site", "family_of", "find_gating_sites", "map_nodes", "match_site",
           "route_insertion_point"]
