"""The gating side of a site: from the router's logits to the routing the experts consume.

Given an anchor (a selection over E alternatives), this module works out, by dataflow and then
by running the graph, what the site's gating computes:

1. **Router**: the latest GEMM on the way to the anchor whose output has E columns and one of
   whose operands is model state (``nn.Linear``, a bare ``[E, H]`` / ``[H, E]`` parameter with
   ``F.linear``, ``@``, ``matmul`` or an einsum, casts anywhere). Its output ``L`` are the logits.
2. **Routing region**: every node computed from ``L`` (and from ``[E]``-sized side inputs such as
   a selection bias, wherever it is owned) alone, in any rank or layout (``[N, E]``,
   ``[B, T, E]``, sequence-first).
3. **Values**: the region is run on random logits (spread, and skewed towards a few experts),
   recording the value of every node.
4. **Synthesis**: for each *cut* on the way from ``L`` to the anchor (``L`` first; a later cut
   leaves an unusual score function, a temperature or noise in the graph and lets
   ``grouter.route`` start after it), every :class:`~grouter_pass.spec.GatingSpec` the shapes
   allow is compared with the recorded values: the selection by the anchor's ids, the weights by
   any region node that holds them (as a ``[..., k]`` tensor, a column per round, or a dense
   ``[..., E]`` tensor with zeros elsewhere). Constants (scale, eps, clamp) are read from the
   region, runtime scalars stay graph nodes.
5. **Boundary**: every region node whose value is a reshape, a column or the dense form of the
   routing (weights, ids) is recorded with that relation. The experts side is then the part of
   the graph fed by these nodes, so it can be probed with any routing.

The synthesis is most of the detection's time on a deep model, and its layers repeat one gating:
a gating whose region has the fingerprint of one synthesised before in the graph (same ops,
constants, shapes; ``passes/fingerprint.py``) takes that one's readings, node for node. Every
reading is still proved on its own site (``check_route_op``, the experts probe).

When no spec reproduces the region (hash routing, an unknown transformation of the weights,
sampling), the gating is *kept* as the model wrote it and only the experts are rewritten.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from grouter_pass.numerics import compare_max
from grouter_pass.ops import reference
from grouter_pass.passes.dataflow import GraphFacts, data_inputs, has_data_dependent_shape, scalar_value
from grouter_pass.passes.detect.anchors import Anchor
from grouter_pass.passes.fingerprint import RegionSignature, region_signature
from grouter_pass.passes.graph_utils import (
    ancestors,
    descendants,
    dtype_of,
    is_function,
    is_view,
    mutated_arg,
    same_size,
    shape_of,
    static_int,
    target_name,
    tensor_meta,
)
from grouter_pass.passes.probe import ProbeError, Region, concrete_shape, eager, random_routing
from grouter_pass.spec import GatingSpec, NoMatch

log = logging.getLogger(__name__)

_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)
_EINSUM = (torch.einsum, torch.functional.einsum)
#: random logits the routing region is run on: spread, skewed, peaked, spiky (see _trial_values)
_TRIALS = 8


# ------------------------------------------------------------------------------------------------
# relations between a node's value and the routing (weights [..., k], ids [..., k])
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Relation:
    """How a node's value follows from the routing: ``kind`` "ids" or "weights" (a reshape of
    the ``[..., k]`` tensor, or its column ``column``), or "dense" (the weights scattered into
    ``[..., E]`` zeros). ``exact_order``: ids in the same slot order as the reference's."""

    kind: str
    column: int | None = None
    exact_order: bool = True

    def value(self, w: torch.Tensor, ids: torch.Tensor, num_experts: int, like: fx.Node) -> torch.Tensor:
        shape = concrete_shape(like)
        dtype = dtype_of(like)
        if self.kind == "dense":
            flat_w, flat_ids = w.reshape(-1, w.shape[-1]), ids.reshape(-1, ids.shape[-1])
            dense = torch.zeros(flat_w.shape[0], num_experts, dtype=w.dtype, device=w.device)
            return dense.scatter(1, flat_ids, flat_w).reshape(shape).to(dtype)
        src = ids if self.kind == "ids" else w
        if self.column is not None:
            src = src[..., self.column]
        return src.reshape(shape).to(dtype)


def _match_relation(value: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, e: int) -> Relation | None:
    """The relation ``value`` has to the routing ``(w, ids)`` (reference values), if any."""
    n_slots, k = ids.numel(), ids.shape[-1]
    if not value.is_floating_point():
        if value.dtype == torch.bool:
            return None
        flat = value.reshape(-1)
        if value.numel() == n_slots:
            v = value.reshape(ids.shape)
            if torch.equal(v, ids):
                return Relation("ids")
            if torch.equal(v.sort(-1).values, ids.sort(-1).values):
                return Relation("ids", exact_order=False)
        if k > 1 and value.numel() == n_slots // k:
            for j in range(k):
                if torch.equal(flat, ids[..., j].reshape(-1)):
                    return Relation("ids", j)
        return None
    if value.numel() == 0:
        return None
    if value.numel() == n_slots and _close(value.reshape(w.shape), w):
        return Relation("weights")
    if k > 1 and value.numel() == n_slots // k:
        for j in range(k):
            if _close(value.reshape(-1), w[..., j].reshape(-1)):
                return Relation("weights", j)
    if value.numel() == (n_slots // k) * e and w.numel() and bool((w != w.reshape(-1)[0]).any()):
        # (with constant weights the dense form is only the one-hot mask of the ids: no relation)
        dense = torch.zeros(n_slots // k, e, dtype=w.dtype, device=w.device).scatter(
            1, ids.reshape(-1, k), w.reshape(-1, k))
        if _close(value.reshape(dense.shape), dense):
            return Relation("dense")
    return None


def _close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Same numbers at the precision of ``actual``."""
    if actual.shape != expected.shape:
        return False
    return compare_max(actual, expected.to(actual.dtype)).ok


# ------------------------------------------------------------------------------------------------
# the router
# ------------------------------------------------------------------------------------------------


def _gemm_operands(n: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(activation operand, weight operand)`` candidates of a GEMM-like node, or None."""
    if is_function(n, *_LINEAR) and len(n.args) >= 2:
        return n.args[0], n.args[1]
    if is_function(n, torch.matmul, torch.mm, operator.matmul) and len(n.args) == 2:
        return n.args[0], n.args[1]
    if is_function(n, torch.addmm) and len(n.args) >= 3:
        return n.args[1], n.args[2]
    if is_function(n, *_EINSUM) and n.args and isinstance(n.args[0], str):
        ops = list(n.args[1:])
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = list(ops[0])
        if len(ops) == 2:
            return ops[0], ops[1]
    return None


def router_of(node: fx.Node, e: int, facts: GraphFacts, limit: int = 400) -> tuple[fx.Node, fx.Node] | None:
    """``(logits, the hidden state the router reads)``: the latest GEMM among ``node`` and its
    ``limit`` latest ancestors with E output columns and one operand that is model state with a
    dim of E. Walked latest first (graph order), so the answer does not depend on set order and
    the nearest router is never cut off by the limit in a deep model."""
    nearest = sorted(ancestors([node]), key=facts.position.__getitem__, reverse=True)[: limit - 1]
    for n in [node, *nearest]:
        ops = _gemm_operands(n)
        s = shape_of(n)
        if ops is None or s is None or not s or not same_size(s[-1], e):
            continue
        for act, w in (ops, ops[::-1]):
            if not (isinstance(w, fx.Node) and isinstance(act, fx.Node)):
                continue
            ws = shape_of(w)
            if w in facts.state_derived and act not in facts.state_derived and ws is not None and any(
                    same_size(d, e) for d in ws):
                return n, act
    return None


# ------------------------------------------------------------------------------------------------
# the routing region and its values
# ------------------------------------------------------------------------------------------------


@dataclass
class RoutingCandidate:
    """One reading of the gating: the spec ``grouter.route`` would compute from ``cut`` (None:
    the gating is kept as written), and the nodes whose values it provides."""

    spec: GatingSpec
    cut: fx.Node | None
    bias: fx.Node | None
    runtime_scalars: dict[str, fx.Node]
    boundary: dict[fx.Node, Relation]
    depth: int
    #: kept gating: the nodes the experts op reads (weights [..., k], ids [..., k])
    weights_node: fx.Node | None = None
    ids_node: fx.Node | None = None
    #: the routing weights' only value, when they are constant (top-1 with a softmax over k)
    constant_weights: float | None = None

    @property
    def kept(self) -> bool:
        return self.cut is None


@dataclass
class RoutingAnalysis:
    anchor: Anchor
    num_experts: int
    top_k: int
    router: fx.Node
    router_input: fx.Node
    region: list[fx.Node]              # routing-only nodes, graph order
    side_inputs: list[fx.Node]
    candidates: list[RoutingCandidate] = field(default_factory=list)
    n_tokens: Any = None               # symbolic token count (leading dims of the routing)


def _side_ok(a: fx.Node, e: int, facts: GraphFacts) -> bool:
    """A tensor the routing may read besides the logits: ``[E]``-sized or a scalar tensor that
    is not random (a selection bias, owned anywhere; a temperature buffer)."""
    t = tensor_meta(a)
    if t is None or a in facts.random:
        return False
    numel = static_int(math.prod(t.shape)) if t.dim() else 1
    return numel is not None and numel in (1, e) and t.is_floating_point()


def _routing_region(roots: list[fx.Node], e: int, facts: GraphFacts, graph: fx.Graph
                    ) -> tuple[list[fx.Node], list[fx.Node]]:
    region: set[fx.Node] = set(roots)
    sides: list[fx.Node] = []
    start = min(facts.position[r] for r in roots)
    for n in graph.nodes:
        if facts.position[n] <= start or n in region or n.op not in ("call_function", "call_method"):
            continue
        if has_data_dependent_shape(n):   # routing tensors have sizes fixed by the token count
            continue
        target = mutated_arg(n)
        if target is not None and target not in region:   # a side effect (a buffer update), not routing
            continue
        inputs = data_inputs(n)
        if not any(a in region for a in inputs) and not (n.all_input_nodes and any(
                a in region for a in n.all_input_nodes)):
            continue
        ok = True
        new_sides = []
        for a in inputs:
            if a in region or a in facts.fresh:
                continue
            if _side_ok(a, e, facts):
                new_sides.append(a)
                continue
            ok = False
            break
        if ok:
            region.add(n)
            sides.extend(s for s in new_sides if s not in sides)
    return facts.in_order(region), sides


def _harvest(region: list[fx.Node]) -> dict[str, list]:
    """Constants and runtime scalars the region computes with, as ``(value, node or None)``: a
    runtime scalar (a float module attribute under ``dynamic=True``) must stay a graph node."""
    consts: dict[str, list] = {"scale": [], "eps": [], "clamp": [], "threshold": [], "p": [], "runtime": []}

    def scalars(items: list) -> list[tuple[float, fx.Node | None]]:
        out = []
        for a in items:
            if isinstance(a, bool):
                continue
            if isinstance(a, (int, float)):
                out.append((float(a), None))
            elif isinstance(a, fx.Node) and tensor_meta(a) is None and scalar_value(a) is not None:
                out.append((scalar_value(a), a))
        return out

    for n in region:
        name = target_name(n)
        args = list(n.args[1:]) + list(n.kwargs.values())
        found = scalars(args)
        consts["runtime"] += [node for _, node in found if node is not None]
        if name in ("mul", "div", "truediv"):
            consts["scale"] += found
        if name == "add":
            consts["eps"] += [(v, node) for v, node in found if 0 < abs(v) < 1e-2]
        if name == "clamp" and n.kwargs.get("max") is None:
            consts["clamp"] += scalars([n.kwargs.get("min")])
        if name in ("gt", "ge"):
            consts["threshold"] += found
        if name == "linalg_vector_norm":
            consts["p"].append((float(n.kwargs.get("ord", 2.0)), None))
    return consts


# ------------------------------------------------------------------------------------------------
# synthesis
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Selection:
    order: str
    score_func: str
    bias_index: int | None
    bias_mode: str
    group: tuple[int, int, str] | None
    score_dtype: torch.dtype | None


def _group_candidates(region: list[fx.Node], e: int) -> list[tuple[int, int, str]]:
    groups: set[int] = set()
    for n in region:   # a view of an [..., E] tensor as [..., G, E/G]
        s = shape_of(n)
        src = n.args[0] if n.op in ("call_method", "call_function") and n.args else None
        src_shape = shape_of(src) if isinstance(src, fx.Node) else None
        if s is None or len(s) < 2 or src_shape is None or len(src_shape) != len(s) - 1 or not is_view(n):
            continue
        g, per = static_int(s[-2]), static_int(s[-1])
        if g is not None and per is not None and g * per == e and 1 < g < e and same_size(src_shape[-1], e):
            groups.add(g)
    out = []
    for g in sorted(groups):
        # the number of groups kept: the k of a top-k over the G group scores, else any
        ks = {static_int(n.args[1]) for n in region if is_function(n, torch.topk) and len(n.args) > 1
              and shape_of(n.args[0]) is not None and static_int(shape_of(n.args[0])[-1]) == g}
        tgs = sorted(k for k in ks if k is not None and 1 <= k < g) + [
            t for t in range(1, g) if t not in ks]
        for tg in tgs:
            for gs in ("top2_sum", "max"):
                if gs == "top2_sum" and e // g < 2:
                    continue
                out.append((g, tg, gs))
    return out


def _selections(x_dtype: torch.dtype, n_bias: int, groups: list, casts: list[torch.dtype]) -> list[_Selection]:
    out = []
    dtypes = [None] + [d for d in dict.fromkeys(casts) if d != x_dtype and d.is_floating_point]
    biases = [(None, "none")] + [(i, m) for i in range(n_bias) for m in ("selection", "score")]
    for score_dtype in dtypes:
        for score in ("softmax", "sigmoid", "none"):
            for bias_index, mode in biases:
                for group in [None] + groups:
                    out.append(_Selection("score_then_topk", score, bias_index, mode, group, score_dtype))
        for score in ("softmax", "sigmoid", "none"):
            for bias_index, mode in biases:
                out.append(_Selection("topk_then_score", score, bias_index, mode, None, score_dtype))
    return out


def _select_kwargs(sel: _Selection, k: int, sorted_: bool) -> dict[str, Any]:
    g = sel.group or (1, 1, "top2_sum")
    return dict(top_k=k, score_func=sel.score_func, order=sel.order, bias_mode=sel.bias_mode, n_group=g[0],
                topk_group=g[1], group_score=g[2], score_dtype=sel.score_dtype, sorted=sorted_)


def _same_ids(got: torch.Tensor, want: torch.Tensor) -> bool:
    """The same experts for every token (in any order)."""
    if got.shape != want.shape:
        return False
    return torch.equal(got, want) or torch.equal(got.sort(-1).values, want.sort(-1).values)


def _proportional(a: torch.Tensor, b: torch.Tensor) -> bool:
    denom = float((b * b).sum())
    if denom == 0:
        return False
    c = float((a * b).sum()) / denom
    return c != 0 and bool(torch.allclose(a, b * c, rtol=1e-4, atol=1e-6 * float(b.abs().max())))


def _snap(value: float, candidates: list[tuple[float, fx.Node | None]]) -> tuple[float, fx.Node | None] | None:
    for c, node in candidates:
        if c != 0 and abs(value - c) <= 1e-5 * abs(c):
            return c, node
    return None


class _Synthesizer:
    def __init__(self, analysis: RoutingAnalysis, values: list[dict], facts: GraphFacts) -> None:
        self.a = analysis
        self.values = values
        self.facts = facts
        self.e, self.k = analysis.num_experts, analysis.top_k
        region = analysis.region
        self.consts = _harvest(region)
        runtime = [(float(scalar_value(n)), n) for n in dict.fromkeys(self.consts["runtime"])]
        scales = self.consts["scale"]
        self.scales = [(1.0, None)] + runtime + [(c, node) for c, node in scales] + [
            (1.0 / c, None) for c, node in scales if c and node is None]
        self.has_runtime = bool(runtime)
        self.casts = [n.args[1] for n in region if n.op == "call_method" and n.target == "to" and len(n.args) == 2
                      and isinstance(n.args[1], torch.dtype)] + [
            n.kwargs["dtype"] for n in region if is_function(n, torch.softmax) and n.kwargs.get("dtype") is not None]
        self.float_nodes = [n for n in region if tensor_meta(n) is not None and tensor_meta(n).is_floating_point()]
        # nodes that can hold the weights: [..., k] (or a reshape), a column per round, dense [..., E]
        n_tok = int(math.prod(concrete_shape(analysis.router)[:-1]))
        sizes = {n_tok * self.k, n_tok * self.e} | ({n_tok} if self.k > 1 else set())
        self.weight_like = [n for n in self.float_nodes if math.prod(concrete_shape(n)) in sizes]
        self.relation_nodes = [n for n in region if tensor_meta(n) is not None and tensor_meta(n).dtype != torch.bool
                               and math.prod(concrete_shape(n)) in sizes]
        self._boundary_cache: dict[tuple, dict | None] = {}
        # what the selection itself reads is no output of the routing (a group's best score equals
        # the top-1 weight, yet it is part of choosing); what an earlier round's ids feed into the
        # next round (its one-hot mask) is, since the ids determine it
        self.selecting = self._selecting(analysis) if analysis.anchor.kind != "lookup" else set()

    def _selecting(self, analysis: RoutingAnalysis) -> set[fx.Node]:
        upstream = ancestors(analysis.anchor.ids)
        ids = set(analysis.anchor.ids)
        after_ids: set[fx.Node] = set()
        for n in sorted(upstream, key=self.facts.position.__getitem__):
            if any(i in ids or i in after_ids for i in n.all_input_nodes):
                after_ids.add(n)
        return upstream - after_ids - ids

    def observed_ids(self, t: int) -> torch.Tensor:
        vals = self.values[t]
        ids = [vals[n] for n in self.a.anchor.ids]
        if len(ids) == 1:
            return ids[0]
        return torch.stack([i.reshape(i.shape[:-1] if i.shape and i.shape[-1] == 1 and i.dim() > 1 else i.shape)
                            for i in ids], dim=-1)

    # -- per cut ---------------------------------------------------------------------------

    def candidates_at(self, cut: fx.Node) -> list[RoutingCandidate]:
        a = self.a
        xs = [v[cut] for v in self.values]
        sides = a.side_inputs
        biases = [s for s in sides if static_int(math.prod(tensor_meta(s).shape)) == self.e]
        obs = [self.observed_ids(t) for t in range(_TRIALS)]
        groups = _group_candidates(a.region, self.e)
        sels = _selections(xs[0].dtype, len(biases), groups, self.casts)
        matched: list[_Selection] = []
        for sel in sels:
            ok_all = True
            for t in range(_TRIALS):
                bias = self.values[t][biases[sel.bias_index]] if sel.bias_index is not None else None
                try:
                    _, ids = reference.route_select(xs[t], bias.reshape(-1) if bias is not None else None,
                                                    **_select_kwargs(sel, self.k, a.anchor.sorted))
                except (RuntimeError, ValueError):
                    ok_all = False
                    break
                if not _same_ids(ids.reshape(obs[t].shape), obs[t]):
                    ok_all = False
                    break
            if ok_all:
                matched.append(sel)
        if a.anchor.kind == "rounds" and self.k == 2 and self.consts["threshold"]:
            matched.append(_Selection("score_then_topk", "sparsemixer", None, "none", None, None))
        out = []
        for sel in matched:
            out += self._weights_candidates(cut, sel, biases)
        return out

    def _weights_candidates(self, cut: fx.Node, sel: _Selection, biases: list[fx.Node]
                            ) -> list[RoutingCandidate]:
        """For a selection that reproduces the ids: every tail (renorm, eps, clamp, scale) that
        some region node's value confirms, with the boundary it implies."""
        if sel.score_func == "sparsemixer":
            out = []
            for thr, thr_node in dict.fromkeys(self.consts["threshold"]):
                out += self._tails(cut, sel, biases, {"sparsemixer_threshold": (thr, thr_node)})
            return out
        return self._tails(cut, sel, biases, {})

    def _tails(self, cut: fx.Node, sel: _Selection, biases: list[fx.Node],
               extra: dict[str, tuple[float, fx.Node | None]]) -> list[RoutingCandidate]:
        a = self.a
        kw = _select_kwargs(sel, self.k, a.anchor.sorted)
        kw.update({name: v for name, (v, _) in extra.items()})
        w0s, idss = [], []
        for t in range(_TRIALS):
            bias = self.values[t][biases[sel.bias_index]].reshape(-1) if sel.bias_index is not None else None
            try:
                w0, ids = reference.route_select(self.values[t][cut], bias, **kw)
            except (RuntimeError, ValueError):
                return []
            w0s.append(w0)
            idss.append(ids)
        eps_c = list(dict.fromkeys(self.consts["eps"]))
        clamp_c = list(dict.fromkeys(self.consts["clamp"]))
        tails = []
        renorms = [("none", 1.0)]
        if self.k > 1:
            renorms += [("sum", 1.0)] + [("lp", p) for p in dict.fromkeys([1.0, 2.0, *(
                v for v, _ in self.consts["p"])])]
        no_eps, no_clamp = (0.0, None), (None, None)
        for renorm, p in renorms:
            for eps, clamp in ([(no_eps, no_clamp)] if renorm == "none" else
                               [(ep, cl) for ep in eps_c or [no_eps] for cl in clamp_c or [no_clamp]]
                               + [(no_eps, no_clamp)]):
                tails.append((renorm, p, eps, clamp))
        found: list[RoutingCandidate] = []
        seen_specs: set = set()
        prelude = _prelude(a.router, cut, a.region)
        for renorm, p, (eps, eps_node), (clamp, clamp_node) in tails:
            bases = [reference.route_finish(w0, renorm=renorm, renorm_eps=eps, renorm_clamp_min=clamp, renorm_p=p,
                                            scaling_factor=1.0, weights_dtype=w0.dtype) for w0 in w0s]
            for node in reversed(self.weight_like):
                scale = self._fit_scale(node, bases, idss)
                if scale is None:
                    continue
                factor, scale_node = scale
                runtime = {name: node for name, node in (("scaling_factor", scale_node), ("renorm_eps", eps_node),
                                                         ("renorm_clamp_min", clamp_node)) if node is not None}
                runtime.update({name: node for name, (_, node) in extra.items() if node is not None})
                bias = biases[sel.bias_index] if sel.bias_index is not None else None
                g = sel.group or (1, 1, "top2_sum")
                try:
                    spec = GatingSpec(
                        family=family_of(sel.order, sel.score_func), num_experts=self.e, top_k=self.k,
                        score_func=sel.score_func, order=sel.order, score_dtype=sel.score_dtype,
                        bias_mode=sel.bias_mode, n_group=g[0], topk_group=g[1], group_score=g[2], renorm=renorm,
                        renorm_eps=eps, renorm_clamp_min=clamp, renorm_p=p, scaling_factor=factor,
                        weights_dtype=dtype_of(node), sorted=a.anchor.sorted,
                        sparsemixer_threshold=kw.get("sparsemixer_threshold", 0.0),
                        prelude=prelude)
                except ValueError:
                    continue
                key = (spec, cut, bias)
                if key in seen_specs:
                    continue
                seen_specs.add(key)
                boundary = self._boundary(spec, cut, bias)
                if boundary is None:
                    continue
                depth = max(self.facts.position[n] for n, r in boundary.items() if r.kind != "ids")
                found.append(RoutingCandidate(spec, cut, bias, runtime, boundary, depth,
                                              constant_weights=self._constant(spec, cut, bias)))
        return found

    def _constant(self, spec: GatingSpec, cut: fx.Node, bias: fx.Node | None) -> float | None:
        """The routing weights' one value, when the spec makes them constant (a softmax over one
        selected logit): permuted and unpermuted weights are then the same numbers, so the
        experts are probed with that constant rather than with arbitrary weights."""
        kw = spec.route_kwargs()
        values = set()
        for t in range(_TRIALS):
            b = self.values[t][bias].reshape(-1) if bias is not None else None
            w, _ = reference.route_reference(self.values[t][cut], b, **kw)
            values.update(torch.unique(w.float()).tolist())
            if len(values) > 1:
                return None
        return values.pop() if values else None

    def _fit_scale(self, node: fx.Node, bases: list[torch.Tensor], idss: list[torch.Tensor]
                   ) -> tuple[float, fx.Node | None] | None:
        """The constant c with ``node == c * base`` (as a reshape, a column, or dense) on every
        trial, snapped to a constant or runtime scalar of the region."""
        fits = []
        column = None
        for t in range(_TRIALS):
            v = self.values[t][node].detach()
            b = bases[t]
            if v.numel() == b.numel():
                target, ref = v.reshape(b.shape).double(), b.double()
            elif v.numel() == (b.numel() // self.k) * self.e and v.numel() != b.numel():
                dense = v.reshape(-1, self.e).double()
                target = dense.gather(1, idss[t].reshape(-1, self.k))
                ref = b.reshape(-1, self.k).double()
            elif self.k > 1 and v.numel() == b.numel() // self.k:   # one column per round
                cols = b.reshape(-1, self.k).double()
                target = v.reshape(-1).double()
                if column is None:
                    column = next((j for j in range(self.k) if _proportional(target, cols[:, j])), None)
                    if column is None:
                        return None
                ref = cols[:, column]
            else:
                return None
            denom = float((ref * ref).sum())
            if denom == 0 or not math.isfinite(denom):
                return None
            fits.append(float((target * ref).sum()) / denom)
        c = sum(fits) / len(fits)
        if not math.isfinite(c) or c == 0 or any(abs(f - c) > 1e-4 * abs(c) for f in fits):
            return None
        snapped = _snap(c, self.scales)
        if snapped is None:
            if self.has_runtime:
                return None  # the scale may depend on a runtime scalar the probe cannot account for
            snapped = (float(torch.tensor(c, dtype=torch.float32)), None)
        return snapped

    def _boundary(self, spec: GatingSpec, cut: fx.Node, bias: fx.Node | None) -> dict[fx.Node, Relation] | None:
        """Every region node whose value the spec's routing determines; None unless some node
        holds the weights and the ids really are the spec's on every trial."""
        relations: dict[fx.Node, Relation] | None = None
        kw = spec.route_kwargs()
        routings = []
        for t in range(_TRIALS):
            b = self.values[t][bias].reshape(-1) if bias is not None else None
            routings.append(reference.route_reference(self.values[t][cut], b, **kw))
        # equivalent specs compute the same routing: the boundary depends on the values only
        key = (self.facts.position[cut], tuple((ids.numpy().tobytes(), (w.double() * 1e5).round().numpy().tobytes(),
                                               str(w.dtype)) for w, ids in (r for r in routings[:2])))
        if key in self._boundary_cache:
            return self._boundary_cache[key]
        for t, (w, ids) in enumerate(routings):
            found = {}
            for n in self.relation_nodes:
                if n is cut or n in self.a.side_inputs or self.facts.position[n] < self.facts.position[cut] or (
                        n in self.selecting):
                    continue
                v = self.values[t].get(n)
                if not isinstance(v, torch.Tensor):
                    continue
                r = _match_relation(v, w, ids, self.e)
                if r is not None:
                    found[n] = r
            if relations is None:
                relations = found
            else:
                relations = {n: r for n, r in relations.items() if found.get(n) == r}
        if not relations or not any(r.kind != "ids" for r in relations.values()) or (
                not any(r.kind == "ids" for r in relations.values())
                and not any(r.kind == "dense" for r in relations.values())):
            relations = None
        self._boundary_cache[key] = relations
        return relations

    # -- kept gating -----------------------------------------------------------------------

    def kept_candidates(self, family: str) -> list[RoutingCandidate]:
        """The gating as written: the ids of the anchor with any region node of the same size as
        the weights (deepest first)."""
        a = self.a
        ids_node = a.anchor.ids[0] if len(a.anchor.ids) == 1 else None
        if ids_node is None:
            return []
        n_slots = math.prod(concrete_shape(ids_node))
        out = []
        for node in reversed(self.float_nodes):
            if math.prod(concrete_shape(node)) != n_slots or node is a.router:
                continue
            relations: dict[fx.Node, Relation] | None = None
            for t in range(_TRIALS):
                w = self.values[t][node].reshape(concrete_shape(ids_node))
                ids = self.values[t][ids_node]
                found = {}
                for n in a.region:
                    v = self.values[t].get(n)
                    if isinstance(v, torch.Tensor):
                        r = _match_relation(v, w, ids, self.e)
                        if r is not None:
                            found[n] = r
                found.setdefault(ids_node, Relation("ids"))
                relations = found if relations is None else {n: r for n, r in relations.items() if found.get(n) == r}
            relations[ids_node] = Relation("ids")
            relations[node] = Relation("weights")
            spec = GatingSpec(family=family, num_experts=self.e, top_k=self.k, score_func="none",
                              weights_dtype=dtype_of(node), sorted=a.anchor.sorted)
            out.append(RoutingCandidate(spec, None, None, {}, relations, self.facts.position[node],
                                        weights_node=node, ids_node=ids_node))
        return out


@dataclass
class SharedSynthesis:
    """The readings one gating of a graph synthesised, in terms of its signature's nodes: per cut
    (by the cut's place in the signature) and the kept readings per family."""

    signature: RegionSignature
    at_cut: dict[int, list[RoutingCandidate]] = field(default_factory=dict)
    kept: dict[str, list[RoutingCandidate]] = field(default_factory=dict)


#: routing syntheses already made in one graph: routing fingerprint -> the first gating's readings
RoutingReadings = dict[tuple, SharedSynthesis]


class _ReusingSynthesizer:
    """A synthesizer that answers from an earlier gating with the same fingerprint where it can:
    the same code on the same random logits gives the same values, so the same readings, with
    each node replaced by its counterpart. The first gating of a fingerprint records; the others
    map. A cut the first gating never reached is synthesised here (and not recorded)."""

    def __init__(self, synth: _Synthesizer, signature: RegionSignature, shared: SharedSynthesis,
                 facts: GraphFacts) -> None:
        self.synth, self.shared, self.facts = synth, shared, facts
        self.index = {n: i for i, n in enumerate(signature.nodes)}
        self.recording = shared.signature is signature
        self.to_here = None if self.recording else shared.signature.mapping_to(signature)

    def candidates_at(self, cut: fx.Node) -> list[RoutingCandidate]:
        where = self.index.get(cut)
        if where is None:
            return self.synth.candidates_at(cut)
        if self.recording:
            if where not in self.shared.at_cut:
                self.shared.at_cut[where] = self.synth.candidates_at(cut)
            return self.shared.at_cut[where]
        known = self.shared.at_cut.get(where)
        mapped = None if known is None else self._mapped(known)
        return mapped if mapped is not None else self.synth.candidates_at(cut)

    def kept_candidates(self, family: str) -> list[RoutingCandidate]:
        if self.recording:
            if family not in self.shared.kept:
                self.shared.kept[family] = self.synth.kept_candidates(family)
            return self.shared.kept[family]
        known = self.shared.kept.get(family)
        mapped = None if known is None else self._mapped(known)
        return mapped if mapped is not None else self.synth.kept_candidates(family)

    def _mapped(self, cands: list[RoutingCandidate]) -> list[RoutingCandidate] | None:
        to, position = self.to_here, self.facts.position
        at_depth = {position[n]: n for n in self.shared.signature.nodes}

        def node(n: fx.Node | None) -> fx.Node | None:
            return None if n is None else to[n]

        out = []
        try:
            for c in cands:
                out.append(dataclasses.replace(
                    c, cut=node(c.cut), bias=node(c.bias),
                    runtime_scalars={k: to[v] for k, v in c.runtime_scalars.items()},
                    boundary={to[n]: r for n, r in c.boundary.items()},
                    depth=position[to[at_depth[c.depth]]],
                    weights_node=node(c.weights_node), ids_node=node(c.ids_node)))
        except KeyError:   # a reading names a node outside the signature: synthesise afresh
            return None
        return out


def _routing_signature(analysis: RoutingAnalysis, region: Region, roots: list[fx.Node], facts: GraphFacts
                       ) -> RegionSignature | None:
    """The routing's fingerprint: the region as it is run (with what ``Region`` pulls in), by
    value (its constants and scalars decide the readings), and where the anchor, the roots and
    the side inputs sit in it."""
    nodes = facts.in_order(set(analysis.region) | set(region.nodes))
    sig = region_signature(nodes, by_value=True)
    if sig is None:
        return None
    index = {n: i for i, n in enumerate(sig.nodes)}
    anchor = analysis.anchor
    places = [index.get(n) for n in (*roots, *analysis.side_inputs, anchor.node, anchor.selection_input, *anchor.ids)]
    if any(p is None for p in places):
        return None
    extra = (anchor.kind, anchor.sorted, analysis.num_experts, analysis.top_k, len(roots), len(analysis.side_inputs),
             tuple(places))
    return RegionSignature((*sig.key, extra), sig.nodes)


_SCORE_OPS = {"softmax": ("softmax", "Tensor.softmax"), "sigmoid": ("sigmoid", "Tensor.sigmoid")}


class _FidelityContext:
    """How closely a spec follows the ops the model wrote (equivalent readings exist: a softmax
    renormalised over the top-k *is* a softmax over the k logits; the one the graph spells wins)."""

    def __init__(self, anchor: Anchor, region: list[fx.Node], cut: fx.Node) -> None:
        self.after = descendants([anchor.node])
        self.before = ancestors([anchor.selection_input]) | {anchor.selection_input}
        below = descendants([cut])
        self.names = {n: target_name(n) for n in region if n in below}

    def score(self, spec: GatingSpec) -> int:
        names, after, before = self.names, self.after, self.before
        score = 0
        ops = _SCORE_OPS.get(spec.score_func)
        if ops is not None:
            where = before if spec.order == "score_then_topk" else after
            score += 2 if any(name in ops and n in where for n, name in names.items()) else -2
        elif spec.score_func == "none":
            score += 1 if not any(name in _SCORE_OPS["softmax"] + _SCORE_OPS["sigmoid"] for name in names.values()) \
                else -1
        if spec.group_limited:
            has_max = any(name in ("amax", "max", "Tensor.amax", "Tensor.max") for name in names.values())
            score += (1 if has_max else -1) if spec.group_score == "max" else (-1 if has_max else 1)
            # a group mask is a top-k over the G group scores
            has_group_topk = any(is_function(n, torch.topk) and shape_of(n.args[0]) is not None and static_int(
                shape_of(n.args[0])[-1]) == spec.n_group for n in names)
            score += 1 if has_group_topk else -3

        def over_k(n: fx.Node) -> bool:   # a reduction of a float [..., k] tensor: a renormaliser
            src = n.args[0] if n.args else None
            t = tensor_meta(src)
            return t is not None and t.is_floating_point() and t.dim() > 0 and same_size(t.shape[-1], spec.top_k)

        has_sum = any(name == "sum" and n in after and over_k(n) for n, name in names.items())
        has_norm = any(name == "linalg_vector_norm" and over_k(n) for n, name in names.items())
        score += {"sum": 1 if has_sum else -1, "lp": 1 if has_norm else -1}.get(
            spec.renorm, 0 if (has_sum or has_norm) else 1)
        return score


def family_of(order: str, score_func: str) -> str:
    """The family name of a spec (a table, not a parse)."""
    if score_func == "sparsemixer":
        return "sparsemixer"
    if order == "topk_then_score":
        return {"softmax": "topk_softmax", "sigmoid": "topk_sigmoid"}.get(score_func, "topk")
    return {"softmax": "softmax_topk", "sigmoid": "sigmoid_topk"}.get(score_func, "topk")


def _prelude(router: fx.Node, cut: fx.Node, region: list[fx.Node]) -> tuple[str, ...]:
    """The ops the model applies between its router logits and the cut (kept in the graph)."""
    if cut is router:
        return ()
    chain = (ancestors([cut]) | {cut}) - ancestors([router]) - {router}
    return tuple(target_name(n) for n in region if n in chain and n.op != "placeholder")


def _trial_values(analysis: RoutingAnalysis, region: Region, facts: GraphFacts, lookup_ids: fx.Node | None
                  ) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    e = analysis.num_experts
    logits = analysis.router
    t = tensor_meta(logits)
    shape = concrete_shape(logits)
    skew = torch.zeros(shape[-1])
    skew[: max(1, shape[-1] // 4)] = 3.0
    out = []
    for trial in range(_TRIALS):
        base = torch.randn(shape, generator=gen)
        if trial == 1:      # a few experts hot: most others empty
            base = base * 0.5 + skew
        elif trial == 2:    # peaked scores
            base = base * 3.0
        elif trial >= 3:    # one large logit per token on top of small ones: a group's best expert and
            # its top-2 sum disagree on which group wins, selection rules that coincide on spread
            # logits do not here
            # (trial 3 cycles the spike through the experts so that every expert is chosen somewhere:
            # a node equal to the routing only while some experts are never chosen is no boundary)
            n_rows = math.prod(shape[:-1])
            if trial == 3:
                where = (torch.arange(n_rows) % shape[-1]).reshape(*shape[:-1], 1)
            else:
                where = torch.randint(0, shape[-1], (*shape[:-1], 1), generator=gen)
            spikes = torch.zeros(shape).scatter(-1, where, 2.0 + trial * 0.5)
            base = base * (0.3 + 0.2 * trial) + spikes
        vals = {logits: base.to(device=t.device, dtype=t.dtype)}
        for s in analysis.side_inputs:
            st = tensor_meta(s)
            vals[s] = (torch.randn(concrete_shape(s), generator=gen) * 0.5).to(device=st.device, dtype=st.dtype)
        if lookup_ids is not None:
            it = tensor_meta(lookup_ids)
            ish = concrete_shape(lookup_ids)
            k = ish[-1] if len(ish) > 1 else 1
            n = math.prod(ish) // k
            vals[lookup_ids] = random_routing(n, k, e, gen).reshape(ish).to(device=it.device, dtype=it.dtype)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            out.append(region.run(vals))
    return out


@eager
def analyse_routing(graph: fx.Graph, facts: GraphFacts, anchor: Anchor, *,
                    readings: RoutingReadings | None = None) -> RoutingAnalysis | NoMatch:
    """Router, routing region, recorded values and the ordered readings of the gating.
    ``readings`` carries the syntheses of earlier gatings of the same graph, by fingerprint."""
    lookup = anchor.kind == "lookup"
    if lookup:
        found = _router_for_lookup(anchor, facts)
        if found is None:
            return NoMatch("the looked-up expert ids meet no router scores", node=anchor.node, step="router")
        router, router_input, e = found
    else:
        e = anchor.num_experts
        found = router_of(anchor.selection_input, e, facts)
        if found is None:
            return NoMatch("the selection is not computed from a router (a GEMM of the hidden state with model "
                           "weights of %s outputs)", (e,), node=anchor.node, step="router")
        router, router_input = found
    roots = [router] + ([anchor.ids[0]] if lookup else [])
    region_nodes, sides = _routing_region(roots, e, facts, graph)
    if not lookup and not all(i in region_nodes for i in anchor.ids):
        return NoMatch("the selected ids also depend on tensors other than the router logits", node=anchor.node,
                       step="routing", partial=True)
    n_tokens = math.prod(shape_of(router)[:-1])
    analysis = RoutingAnalysis(anchor, e, anchor.top_k, router, router_input, region_nodes, sides,
                               n_tokens=n_tokens)
    try:
        region = Region(graph, [n for n in region_nodes if n not in roots], [*roots, *sides], facts)
        values = _trial_values(analysis, region, facts, anchor.ids[0] if lookup else None)
    except (ProbeError, RuntimeError, ValueError, IndexError) as err:
        return NoMatch("the routing could not be run on random logits: %s", (err,), node=anchor.node, step="probe",
                       partial=True)
    synth: Any = _Synthesizer(analysis, values, facts)
    signature = _routing_signature(analysis, region, roots, facts) if readings is not None else None
    if signature is not None:
        shared = readings.setdefault(signature.key, SharedSynthesis(signature))
        if shared.signature is not signature:
            log.debug("grouter: the gating at %s has the code and shapes of the one at %s: its readings carry over",
                      anchor.node.name, shared.signature.nodes[0].name)
        synth = _ReusingSynthesizer(synth, signature, shared, facts)
    spine = []
    if not lookup:
        upstream = ancestors([anchor.selection_input])
        spine = facts.in_order(
            n for n in [router, *region_nodes] if tensor_meta(n) is not None and tensor_meta(n).is_floating_point()
            and same_size(math.prod(shape_of(n)), math.prod(shape_of(anchor.selection_input)))
            and same_size(shape_of(n)[-1], e) and (n is anchor.selection_input or n in upstream))
    analysis.candidates = _LazyCandidates(synth, spine, anchor, region_nodes, "hash" if lookup else "kept")
    if not analysis.candidates:
        return NoMatch("no gating spec reproduces the routing and no tensor of the routing holds the weights",
                       node=anchor.node, step="gating", partial=True)
    return analysis


class _LazyCandidates:
    """The readings of a gating, produced cut by cut as they are asked for (most sites are read
    at the first cut; the later ones cost synthesis only when the first readings fail)."""

    def __init__(self, synth: _Synthesizer | _ReusingSynthesizer, spine: list[fx.Node], anchor: Anchor,
                 region: list[fx.Node], kept_family: str) -> None:
        self.synth, self.spine, self.anchor, self.region, self.kept_family = synth, spine, anchor, region, kept_family
        self.done: list[RoutingCandidate] = []
        self._next_cut = 0
        self._kept_done = False

    def _more(self) -> bool:
        if self._next_cut < len(self.spine):
            cut = self.spine[self._next_cut]
            self._next_cut += 1
            cands = self.synth.candidates_at(cut)
            fid = _FidelityContext(self.anchor, self.region, cut)
            cands.sort(key=lambda c: (-c.depth, -fid.score(c.spec)))
            self.done += cands
            return True
        if not self._kept_done:
            self._kept_done = True
            self.done += self.synth.kept_candidates(self.kept_family)
            return True
        return False

    def __iter__(self):
        i = 0
        while True:
            while i >= len(self.done):
                if not self._more():
                    return
            yield self.done[i]
            i += 1

    def __bool__(self) -> bool:
        for _ in self:
            return True
        return False


@eager
def check_route_op(graph: fx.Graph, facts: GraphFacts, analysis: RoutingAnalysis, cand: RoutingCandidate,
                   *, gradients: bool = True) -> NoMatch | None:
    """The real ``grouter.route`` op (not its reference) against the model's gating, on two
    trials: every boundary value, and the gradients of the weights with respect to the router
    logits and the side inputs. The synthesis compared the *reference*; this proves the op.
    Both sides start from the logits: the model's region as it is, the op after the model's own
    ops up to the cut."""
    if cand.cut is None:
        return None
    router, sides = analysis.router, list(analysis.side_inputs)
    model_nodes = (ancestors(list(cand.boundary)) | set(cand.boundary)) & descendants([router])
    chain_nodes = (ancestors([cand.cut]) | {cand.cut}) & descendants([router])
    try:
        model = Region(graph, model_nodes, [router, *sides], facts)
        chain = Region(graph, chain_nodes, [router, *sides], facts) if chain_nodes else None
    except ProbeError as err:
        return NoMatch("the gating cannot be run on its own: %s", (err,), node=cand.cut, step="gating probe",
                       partial=True)
    gen = torch.Generator().manual_seed(17)
    kw = {**cand.spec.route_kwargs(), **{k: scalar_value(v) for k, v in cand.runtime_scalars.items()}}
    lt = tensor_meta(router)
    for trial in range(2):
        vals = {router: (torch.randn(concrete_shape(router), generator=gen) * (1.0 + 2 * trial)).to(
            device=lt.device, dtype=lt.dtype)}
        for sd in sides:
            st = tensor_meta(sd)
            vals[sd] = (torch.randn(concrete_shape(sd), generator=gen) * 0.5).to(device=st.device, dtype=st.dtype)
        with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
            leaves = {n: v.detach().clone().requires_grad_(v.is_floating_point() and gradients)
                      for n, v in vals.items()}
            got = model.run(leaves)
            cut_value = chain.run(leaves)[cand.cut] if chain is not None else leaves[router]
            bias = leaves.get(cand.bias) if cand.bias is not None else None
            w, ids = torch.ops.grouter.route(cut_value, bias.reshape(-1) if bias is not None else None, **kw)
            total_model, total_op = 0, 0
            for node, rel in cand.boundary.items():
                have = rel.value(w, ids, analysis.num_experts, node)
                want = got[node]
                if rel.kind == "ids":
                    if not torch.equal(have, want) and rel.exact_order:
                        return NoMatch("gating probe: grouter.route selects other experts than %s", (node.name,),
                                       node=node, step="gating probe", partial=True)
                    continue
                c = compare_max(have, want.to(have.dtype) if have.dtype != want.dtype else want)
                if not c.ok:
                    return NoMatch("gating probe: classified as [%s] but grouter.route's weights differ from %s (%s)",
                                   (cand.spec.describe(), node.name, c), node=node, step="gating probe", partial=True)
                if gradients and want.requires_grad and have.requires_grad:
                    cot = torch.randn(want.shape, generator=gen).to(want.dtype)
                    total_model = total_model + (want * cot).sum()
                    total_op = total_op + (have * cot.to(have.dtype)).sum()
            if gradients and isinstance(total_model, torch.Tensor) and isinstance(total_op, torch.Tensor):
                targets = [t for t in leaves.values() if t.requires_grad]
                g_model = torch.autograd.grad(total_model, targets, allow_unused=True)
                g_op = torch.autograd.grad(total_op, targets, allow_unused=True)
                for a, b in zip(g_op, g_model):
                    if a is None and b is None:
                        continue
                    a = torch.zeros_like(b) if a is None else a
                    b = torch.zeros_like(a) if b is None else b
                    c = compare_max(a, b)
                    if not c.ok:
                        return NoMatch("gating probe: the gradient of grouter.route [%s] differs from the model's (%s)",
                                       (cand.spec.describe(), c), node=cand.cut, step="gating probe", partial=True)
    return None


def _router_for_lookup(anchor: Anchor, facts: GraphFacts) -> tuple[fx.Node, fx.Node, int] | None:
    ids = anchor.ids[0]
    for n in facts.in_order(descendants([ids], limit=200)):
        if is_function(n, torch.gather) and isinstance(n.args[0], fx.Node):
            src = n.args[0]
            s = shape_of(src)
            e = static_int(s[-1]) if s else None
            if e is None:
                continue
            found = router_of(src, e, facts)
            if found is not None:
                return found[0], found[1], e
    return None


__all__ = ["Relation", "RoutingAnalysis", "RoutingCandidate", "RoutingReadings", "SharedSynthesis",
           "analyse_routing", "check_route_op", "family_of", "router_of"]

