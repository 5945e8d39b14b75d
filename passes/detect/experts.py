"""The experts side of a site: what the graph does with the routing, found by dataflow and
identified by running it.

Given the routing boundary (the nodes whose values are the site's weights and ids, see
:mod:`~grouter_pass.passes.detect.routing`), the routed-expert computation is everything fed by
those nodes up to where the expert outputs are back in token shape:

1. **Output**: the first token-shaped node (``numel == N * H``, last dim H) fed by the routing
   weights, followed along its single-user chain while it only accumulates more routed terms
   (an unrolled expert loop, an ``index_add_`` per expert, reshapes and casts); a residual or a
   shared expert added afterwards ends it.
2. **Region and its inputs**: the nodes between the routing and the output. What they read from
   outside must be the routing, the token states (``x``; views and casts of it are recomputed),
   model state (the expert weights: ``[E, ., .]`` tensors, ``[E * F, H]`` views, an
   ``nn.ModuleList``'s per-expert weights, their biases), a tensor the routed outputs are added
   into (a shared expert's output), constants, or sizes.
3. **Capacity**: routing every token to one expert shows how many it keeps (and, with two more
   probes, in which order: token, choice or score); ``C`` is then found among the region's
   constants and symbolic sizes, so it stays correct for other token counts.
4. **Spec**: every reading the shapes allow (which weight is gate / up / down, layouts, gated or
   not, concatenated / interleaved / separate halves, activation, weight on the input or the
   output, biases, identity experts) is run through ``grouter.moe_experts`` next to the region on
   random routing, token states and weights; the first reading that agrees in value and in every
   gradient, on spread and on skewed routing, is the site's :class:`~grouter_pass.spec.ExpertsSpec`.

Nothing here depends on how the dispatch is spelled: sorted rows and grouped GEMMs, gathered
per-slot weights, dense experts on every token, one-hot einsums, slot buffers, loops over
``torch.where``, a third-party op in the combine are all just the function the region computes.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

import grouter_pass.ops  # noqa: F401  (registers torch.ops.grouter)
from grouter_pass.numerics import compare_max, default_tolerance
from grouter_pass.ops import reference
from grouter_pass.passes.dataflow import GraphFacts, data_inputs, scalar_value
from grouter_pass.passes.detect.routing import Relation, RoutingAnalysis, RoutingCandidate
from grouter_pass.passes.fingerprint import region_fingerprint
from grouter_pass.passes.gradient_proof import blocks_gradients, gradients_follow_values
from grouter_pass.passes.graph_utils import (
    ancestors,
    descendants,
    dtype_of,
    is_function,
    is_getitem,
    is_view,
    meta_val,
    same_size,
    shape_of,
    static_int,
    target_name,
    tensor_meta,
)
from grouter_pass.passes.probe import ProbeError, Region, concrete, concrete_shape, eager, random_routing
from grouter_pass.passes.probe_weights import ProbeWeights
from grouter_pass.spec import ActivationSpec, ExpertMLP, ExpertsSpec, NoMatch

log = logging.getLogger(__name__)

_MAX_READINGS = 600

#: gradient comparisons already made in one graph: region fingerprint and reading -> the mismatch or None
GradientProofs = dict[tuple, "str | None"]


@dataclass
class WeightRef:
    """An expert weight as the experts op needs it: one ``[E, a, b]`` node, or E per-expert
    ``[a, b]`` nodes the rewrite stacks; ``transposed``: stored ``[E, in, out]``."""

    nodes: list[fx.Node]
    transposed: bool = False

    @property
    def stacked(self) -> bool:
        return len(self.nodes) > 1

    @property
    def node(self) -> fx.Node | None:
        return self.nodes[0] if len(self.nodes) == 1 else None


@dataclass
class ExpertsMatch:
    spec: ExpertsSpec
    x: fx.Node                               # token states in the routing's token order ([..., H])
    up: list[WeightRef]                      # [gate, up] (two GEMMs) or [up]
    down: WeightRef
    up_bias: list[WeightRef]                 # like ``up``, or []
    down_bias: WeightRef | None
    output: fx.Node
    region: list[fx.Node]
    combine_base: fx.Node | None = None
    runtime_scalars: dict[str, fx.Node] = field(default_factory=dict)
    #: capacity: the node (or constant) holding C, when the spec has a capacity
    capacity: Any = None

    # the names the rewrite, expert parallelism and inspection use for single-tensor weights
    @property
    def w_up(self) -> fx.Node | None:
        return self.up[-1].node

    @property
    def w_gate(self) -> fx.Node | None:
        return self.up[0].node if len(self.up) == 2 else None

    @property
    def w_down(self) -> fx.Node | None:
        return self.down.node

    @property
    def b_up(self) -> fx.Node | None:
        return self.up_bias[-1].node if self.up_bias else None

    @property
    def b_gate(self) -> fx.Node | None:
        return self.up_bias[0].node if len(self.up_bias) == 2 else None

    @property
    def b_down(self) -> fx.Node | None:
        return self.down_bias.node if self.down_bias is not None else None

    @property
    def per_expert(self) -> bool:
        return any(r.stacked for r in (*self.up, self.down, *self.up_bias, *(
            [self.down_bias] if self.down_bias else [])))


# ------------------------------------------------------------------------------------------------
# 1-2. output, region, inputs
# ------------------------------------------------------------------------------------------------


def _numel(node: fx.Node) -> Any:
    s = shape_of(node)
    return None if s is None else math.prod(s)


def _token_shaped(node: fx.Node, n_tokens: Any, hidden: Any) -> bool:
    t = tensor_meta(node)
    if t is None or not t.is_floating_point() or t.dim() == 0:
        return False
    return same_size(t.shape[-1], hidden) and same_size(_numel(node), n_tokens * hidden)


def _accumulates(u: fx.Node, cur: fx.Node, routed: set[fx.Node], facts: GraphFacts, n_tokens: Any,
                 hidden: Any) -> bool:
    """``u`` continues the combine of ``cur``: it reads only routed values, fresh tensors and
    scalars besides ``cur``, and stays token-shaped (a model's own scaling or residual ends it)."""
    if not _token_shaped(u, n_tokens, hidden):
        return False
    for a in data_inputs(u):
        if a is cur or a in routed or a in facts.fresh:
            continue
        return False
    return True


def find_output(boundary: dict[fx.Node, Relation], facts: GraphFacts, n_tokens: Any, hidden: Any
                ) -> tuple[fx.Node, set[fx.Node]] | None:
    # what the routing feeds, minus what merely computes the boundary itself from the router's
    # side (a weight gathered by the ids before its renormalisation); what the boundary alone
    # determines (a one-hot mask of the ids that both weights and dispatch read, slot positions)
    # is recomputed from it and stays
    by_boundary = _closure_of(list(boundary), facts)
    routed = descendants(boundary) - set(boundary) - (ancestors(boundary) - by_boundary)
    weight_nodes = [n for n, r in boundary.items() if r.kind != "ids"]
    weighted = descendants(weight_nodes)
    start = None
    for n in facts.in_order(routed):
        if n in weighted and n in facts.live and _token_shaped(n, n_tokens, hidden):
            start = n
            break
    if start is None:
        return None
    cur = start
    while len(cur.users) == 1:
        u = next(iter(cur.users))
        # the combine goes on while it accumulates routed terms (an expert loop) or casts; the
        # model's own views of the result stay the model's
        if u.op == "output" or is_view(u) or not _accumulates(u, cur, routed, facts, n_tokens, hidden):
            break
        cur = u
    return cur, routed





def _closure_of(roots: list[fx.Node], facts: GraphFacts) -> set[fx.Node]:
    """Nodes computed from ``roots`` alone (with fresh tensors and scalars)."""
    inside = set(roots)
    if not roots:
        return inside
    for n in facts.in_order(descendants(roots)):
        inputs = data_inputs(n)
        if all(a in inside or a in facts.fresh for a in inputs) and any(a in inside for a in n.all_input_nodes):
            inside.add(n)
    return inside


def _order_preserving(node: fx.Node) -> fx.Node:
    """Walk back through casts and views that keep the element order (not transposes)."""
    keep = {"view", "reshape", "contiguous", "flatten", "unsqueeze", "squeeze", "view_as", "reshape_as", "to",
            "float", "bfloat16", "half", "type_as", "unflatten"}
    while node.op == "call_method" and node.target in keep and node.args and isinstance(node.args[0], fx.Node) \
            and tensor_meta(node.args[0]) is not None:
        node = node.args[0]
    return node


def _strip_transpose(node: fx.Node) -> tuple[fx.Node, bool]:
    """A weight read through transposes of its last two dims (and size-1 dims added or removed:
    ``b.unsqueeze(1)`` of an ``[E, F]`` bias): (the tensor before, flipped?)."""
    flipped = False
    while True:
        if node.op == "call_method" and node.target in ("unsqueeze", "squeeze") and node.args and isinstance(
                node.args[0], fx.Node) and tensor_meta(node.args[0]) is not None and tensor_meta(node.args[0]).dim():
            node = node.args[0]
            continue
        if (node.op in ("call_method", "call_function") and (target_name(node) in ("Tensor.transpose", "transpose"))
                and len(node.args) >= 3 and tensor_meta(node.args[0]) is not None):
            nd = tensor_meta(node.args[0]).dim()
            dims = {d % nd for d in node.args[1:3] if isinstance(d, int)}
            if dims == {nd - 1, nd - 2}:
                node, flipped = node.args[0], not flipped
                continue
        if target_name(node) in ("Tensor.t", "t") and tensor_meta(node.args[0]) is not None and \
                tensor_meta(node.args[0]).dim() == 2:
            node, flipped = node.args[0], not flipped
            continue
        if is_function(node, getattr) and len(node.args) == 2 and node.args[1] == "mT":
            node, flipped = node.args[0], not flipped
            continue
        return node, flipped


@dataclass
class _Inputs:
    routing: list[fx.Node]
    tokens: list[fx.Node]
    weights: list[tuple[fx.Node, bool]]   # (node after stripping transposes, flipped)
    weight_reads: list[fx.Node]           # the nodes the region reads
    problem: NoMatch | None = None
    derived: list[fx.Node] = field(default_factory=list)   # computed from the tokens alone


def _computed_from(t: fx.Node, sources: set[fx.Node], facts: GraphFacts, memo: dict | None = None,
                   state: bool = True) -> bool:
    """``t`` is computed from ``sources`` with constants, scalars and (``state``) model state only."""
    memo = {} if memo is None else memo
    if t in sources or t in facts.fresh or (state and t in facts.state_derived):
        return True
    if t in memo:
        return memo[t]
    memo[t] = False
    if t.op not in ("call_function", "call_method") or t in facts.random:
        return False
    inputs = data_inputs(t)
    memo[t] = bool(inputs) and all(_computed_from(a, sources, facts, memo, state) for a in inputs)
    return memo[t]


def _token_derived(a: fx.Node, facts: GraphFacts, n_tokens: Any, hidden: Any, depth: int = 32,
                   memo: dict | None = None) -> list[fx.Node] | None:
    """The token-shaped tensors ``a`` is computed from, when it depends on nothing else but model
    state, fresh tensors and scalars (``x.repeat(E, 1)``; dense experts run on every token before
    the routing weights are applied)."""
    memo = {} if memo is None else memo
    if a in memo:
        return memo[a]
    memo[a] = None
    if depth == 0 or a.op not in ("call_function", "call_method") or a in facts.random:
        return None
    roots: list[fx.Node] = []
    for b in data_inputs(a):
        if b in facts.state_derived or b in facts.fresh:
            continue
        if _token_shaped(b, n_tokens, hidden):
            roots.append(b)
            continue
        sub = _token_derived(b, facts, n_tokens, hidden, depth - 1, memo)
        if sub is None:
            return None
        roots += sub
    memo[a] = roots or None
    return memo[a]


def _classify_inputs(region: set[fx.Node], boundary: dict, facts: GraphFacts, n_tokens: Any, hidden: Any,
                     routing_region: set[fx.Node]) -> _Inputs:
    out = _Inputs([], [], [], [])
    seen: set[fx.Node] = set()
    for n in facts.in_order(region):
        for a in n.all_input_nodes:
            if a in region or a in seen:
                continue
            seen.add(a)
            if a in boundary:
                out.routing.append(a)
            elif tensor_meta(a) is None:
                continue
            elif all(_metadata_only(u, a) for u in a.users if u in region):
                continue
            elif a in facts.fresh:
                continue
            elif a in facts.state_derived:
                out.weight_reads.append(a)
            elif a in routing_region:
                out.problem = NoMatch("the experts read %s, a routing tensor that the routing's weights and ids do "
                                      "not determine", (a.name,), node=a, step="experts", partial=True)
                return out
            elif _token_shaped(a, n_tokens, hidden):
                out.tokens.append(a)
            elif (roots := _token_derived(a, facts, n_tokens, hidden)) is not None:
                out.tokens.extend(roots)        # e.g. hidden.repeat(E, 1): recomputed from the tokens
                out.derived.append(a)
            else:
                out.problem = NoMatch("the experts read %s %s, which is not the routing, the token states, model "
                                      "weights or a constant", (a.name, list(shape_of(a) or [])), node=a,
                                      step="experts", partial=True)
                return out
    return out


def _metadata_only(user: fx.Node, a: fx.Node) -> bool:
    from grouter_pass.passes.dataflow import reads_only_metadata
    return reads_only_metadata(user, a)


# ------------------------------------------------------------------------------------------------
# 4. readings of the expert weights
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Reading:
    up: tuple[int, ...]                  # indices into the weight list: (gate, up) or (up,)
    down: int
    up_t: tuple[bool, ...]
    down_t: bool
    gated: str                           # "concat" | "interleaved" | "separate" | "none"
    activation: ActivationSpec
    up_bias: tuple[int, ...]
    down_bias: int | None
    weight_on_input: bool
    identity: str                        # "none" | "identity" | "zero"


def _layouts(shape: tuple[int, int], in_dim: int, out_dim: int) -> list[bool]:
    """Whether a stored ``[a, b]`` expert matrix is ``[in, out]`` (transposed) or ``[out, in]``."""
    a, b = shape
    out = []
    if (a, b) == (out_dim, in_dim):
        out.append(False)
    if (a, b) == (in_dim, out_dim):
        out.append(True)
    return out


def _activation_candidates(region: list[fx.Node], consts: dict) -> list[ActivationSpec]:
    names = [target_name(n) for n in region]
    approx = {n.kwargs.get("approximate") for n in region if target_name(n) in ("gelu", "Tensor.gelu")}
    order: list[str] = []
    if any(n in ("silu", "Tensor.silu") for n in names):
        order.append("silu")
    if "tanh" in approx:
        order.append("gelu_tanh")
    if any(n in ("gelu", "Tensor.gelu") for n in names):
        order.append("gelu")
    if any(n in ("relu", "Tensor.relu") for n in names):
        order.append("relu")
    for kind in ("silu", "gelu", "gelu_tanh", "relu"):
        if kind not in order:
            order.append(kind)
    acts = [ActivationSpec(k) for k in order]
    if consts.get("limits") and "sigmoid" in names:
        for alpha, limit in consts["limits"]:
            acts.insert(0, ActivationSpec("clamped_swiglu", alpha=alpha, limit=limit))
    return acts


def _clamped_constants(region: list[fx.Node]) -> dict:
    """GPT-OSS's clamped SwiGLU: the ``clamp(max=limit)`` and the ``alpha`` of ``sigmoid(alpha * g)``."""
    limits, alphas = [], []
    for n in region:
        if target_name(n) == "clamp" and n.kwargs.get("min") is None and n.kwargs.get("max") is not None:
            v = scalar_value(n.kwargs["max"])
            if v is not None:
                limits.append((v, n.kwargs["max"] if isinstance(n.kwargs["max"], fx.Node) else None))
        if target_name(n) == "mul" and any(target_name(u) == "sigmoid" for u in n.users):
            for arg in n.args[1:]:
                v = scalar_value(arg)
                if v is not None:
                    alphas.append((v, arg if isinstance(arg, fx.Node) else None))
    if not limits:
        return {}
    alphas = alphas or [(1.0, None)]
    return {"limits": [(a[0], lim[0]) for lim in limits[:1] for a in alphas[:1]],
            "runtime": {k: v for k, v in (("alpha", alphas[0][1]), ("limit", limits[0][1])) if v is not None}}


# ------------------------------------------------------------------------------------------------
# the probe
# ------------------------------------------------------------------------------------------------


class _Probe:
    """Runs the region and the experts op on the same random inputs."""

    def __init__(self, graph: fx.Graph, facts: GraphFacts, region: list[fx.Node], boundary: dict,
                 routing_inputs: list[fx.Node], x_root: fx.Node, base: fx.Node | None, weights: list[fx.Node],
                 output: fx.Node, e_route: int, k: int, n_tokens: int, w_dtype: torch.dtype,
                 weights_source: ProbeWeights | None = None, use_ops: bool = True) -> None:
        self.inputs = [*routing_inputs, x_root, *([base] if base is not None else []), *weights]
        self.region = Region(graph, region, self.inputs, facts)
        self.region_nodes = region
        self.boundary, self.routing_inputs = boundary, routing_inputs
        self.x_root, self.base, self.weights, self.output = x_root, base, weights, output
        self.e, self.k, self.n = e_route, k, n_tokens
        self.w_dtype = w_dtype
        #: run the real ``grouter.moe_experts`` (False: its reference semantics, GrouterConfig.probe_ops)
        self.use_ops = use_ops
        self.constant_weights: float | None = None
        self.dev = tensor_meta(x_root).device
        # one set of expert weights for every trial: the model's own above the memory budget
        # (read-only, no gradients), else random ones
        real = weights_source.real(weights, e_route) if weights_source is not None else None
        self.real_weights = real is not None
        self.params = real if real is not None else self._random_weights()

    def _random_weights(self) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(1234)
        params = []
        for p in self.weights:
            pt = tensor_meta(p)
            shape = concrete_shape(p)
            scale = 1.0 / math.sqrt(max(shape[-1], 1)) if len(shape) >= 2 else 0.2
            params.append((torch.randn(shape, generator=gen) * scale).to(device=self.dev, dtype=pt.dtype))
        return params

    def make(self, seed: int, ids: torch.Tensor | None = None, w: torch.Tensor | None = None,
             base_zero: bool = False) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(seed)
        if ids is None:
            ids = random_routing(self.n, self.k, self.e, gen, skewed=seed % 2 == 1)
        if w is None:
            w = torch.rand(self.n, self.k, generator=gen) + 0.1
            if self.constant_weights is not None:   # the only weights the routing can give
                w = torch.full((self.n, self.k), self.constant_weights)
        inputs = {"ids": ids.to(self.dev), "w": w.to(device=self.dev, dtype=self.w_dtype)}
        xt = tensor_meta(self.x_root)
        inputs["x"] = torch.randn(concrete_shape(self.x_root), generator=gen).to(device=self.dev, dtype=xt.dtype)
        if self.base is not None:
            bt = tensor_meta(self.base)
            inputs["base"] = (torch.zeros if base_zero else torch.randn)(concrete_shape(self.base), generator=gen) \
                .to(device=self.dev, dtype=bt.dtype) if not base_zero else torch.zeros(
                    concrete_shape(self.base), device=self.dev, dtype=bt.dtype)
        inputs["params"] = self.params
        return inputs

    def run_region(self, inputs: dict[str, Any], grad: bool = False) -> tuple[torch.Tensor, dict]:
        leaves = self._leaves(inputs, grad)
        vals: dict[fx.Node, Any] = {}
        for n in self.routing_inputs:
            vals[n] = self.boundary[n].value(leaves["w"], leaves["ids"], self.e, n)
        vals[self.x_root] = leaves["x"]
        if self.base is not None:
            vals[self.base] = leaves["base"]
        for p, v in zip(self.weights, leaves["params"]):
            vals[p] = v
        with torch.random.fork_rng(devices=[]), torch.set_grad_enabled(grad):
            out = self.region.run(vals)[self.output]
        return out, leaves

    def _leaves(self, inputs: dict[str, Any], grad: bool) -> dict[str, Any]:
        if not grad:
            return inputs
        out = dict(inputs)
        for key in ("w", "x", "base"):
            if key in out and out[key].is_floating_point():
                out[key] = out[key].detach().clone().requires_grad_(True)
        # the model's own weights never join autograd (their gradients are proved by structure)
        out["params"] = [p.detach() if self.real_weights else p.detach().requires_grad_(p.is_floating_point())
                         for p in inputs["params"]]
        return out


def _assemble(parts: list[WeightRef], index: dict[fx.Node, int], params: list[torch.Tensor], cat_dim_out: bool
              ) -> torch.Tensor:
    """The op's tensor for ``parts`` (stacked per-expert, gate and up concatenated)."""
    tensors = []
    for ref in parts:
        if ref.stacked:
            t = torch.stack([params[index[n]] for n in ref.nodes])
        else:
            t = params[index[ref.nodes[0]]]
        tensors.append(t)
    if len(tensors) == 1:
        return tensors[0]
    return torch.cat(tensors, dim=(2 if cat_dim_out else 1) if tensors[0].dim() == 3 else 1)


# ------------------------------------------------------------------------------------------------
# matching
# ------------------------------------------------------------------------------------------------


@dataclass
class _Capacity:
    value: int
    priority: str
    node: Any          # an fx.Node (SymInt) or the int itself


def _weight_groups(reads: list[tuple[fx.Node, bool]], e_route: int, hidden: int
                   ) -> tuple[list[WeightRef], list[WeightRef], int] | NoMatch:
    """Expert matrices and biases as WeightRefs, and the number of FFN experts."""
    stacked = [(n, f) for n, f in reads if (shape_of(n) is not None and len(shape_of(n)) in (2, 3)
                                            and static_int(shape_of(n)[0]) is not None)]
    lead = {static_int(shape_of(n)[0]) for n, _ in stacked if len(shape_of(n)) == 3}
    if len(lead) == 1:
        e_ffn = lead.pop()
        if e_ffn > e_route or e_ffn < 2:
            return NoMatch("expert weights have %s experts but the router %s", (e_ffn, e_route), step="experts")
        mats = [WeightRef([n], f) for n, f in stacked if len(shape_of(n)) == 3]
        biases = [WeightRef([n]) for n, f in stacked if len(shape_of(n)) == 2 and static_int(shape_of(n)[0]) == e_ffn]
        rest = [n for n, _ in reads if n not in {r.nodes[0] for r in mats + biases}]
        if rest:
            return NoMatch("the experts also read model weights %s", ([r.name for r in rest],), step="experts")
        return mats, biases, e_ffn
    if lead:
        return NoMatch("expert weights disagree on the number of experts (%s)", (sorted(lead),), step="experts")
    # per-expert weights (an nn.ModuleList): E blocks of the same shapes, in order of first use
    for e_ffn in range(e_route, 1, -1):
        if len(reads) % e_ffn:
            continue
        m = len(reads) // e_ffn
        blocks = [reads[i * m:(i + 1) * m] for i in range(e_ffn)]
        shapes = [tuple(tuple(shape_of(n)) for n, _ in b) for b in blocks]
        if any(s != shapes[0] for s in shapes):
            continue
        if any(len(s) not in (1, 2) for s in shapes[0]):
            continue
        mats, biases = [], []
        for pos in range(m):
            nodes = [b[pos][0] for b in blocks]
            flips = {b[pos][1] for b in blocks}
            if len(flips) != 1:
                break
            ref = WeightRef(nodes, flips.pop())
            (mats if len(shapes[0][pos]) == 2 else biases).append(ref)
        else:
            return mats, biases, e_ffn
    return NoMatch("the experts read model weights with no leading expert dim: %s",
                   ([list(shape_of(n)) for n, _ in reads][:6],), step="experts", partial=False)


def _shape2(ref: WeightRef) -> tuple[int, int]:
    s = shape_of(ref.nodes[0])
    return (static_int(s[-2]), static_int(s[-1]))


def _readings(mats: list[WeightRef], biases: list[WeightRef], hidden: int, acts: list[ActivationSpec],
              identity_modes: list[str]) -> Iterator[_Reading]:
    shapes = [_shape2(m) for m in mats]
    n = len(mats)
    if n not in (2, 3):
        return
    for perm in itertools.permutations(range(n)):
        if n == 3:
            gate, up, down = perm
            ups = (gate, up)
        else:
            up, down = perm
            ups = (up,)
        down_shape = shapes[down]
        ffns = {d for d in down_shape if d != hidden} or {hidden}
        for ffn in ffns:
            down_ts = _layouts(down_shape, ffn, hidden)
            if not down_ts:
                continue
            if n == 3:
                gated_opts = [("separate", ffn)]
            else:
                u = shapes[up]
                widths = {d for d in u if d != hidden} or {hidden}
                gated_opts = []
                for width in widths:
                    if width == 2 * ffn:
                        gated_opts += [("concat", width), ("interleaved", width)]
                    if width == ffn:
                        gated_opts.append(("none", width))
            for gated, width in gated_opts:
                per_part = width if gated != "separate" else ffn
                up_ts_options = [_layouts(shapes[i], hidden, per_part) for i in ups]
                if any(not o for o in up_ts_options):
                    continue
                for up_ts in itertools.product(*up_ts_options):
                    if len(set(up_ts)) != 1:
                        continue
                    for down_t in down_ts:
                        for ub, db in _bias_roles(biases, ups, gated, width, ffn, hidden):
                            for act in acts:
                                if act.kind == "clamped_swiglu" and gated not in ("concat", "interleaved"):
                                    continue
                                act_spec = ActivationSpec(
                                    act.kind, gated=gated != "none",
                                    layout="interleaved" if gated == "interleaved" else "concat",
                                    alpha=act.alpha, limit=act.limit)
                                for woi in (False, True):
                                    if woi and (ub or db is not None):
                                        continue
                                    for ident in identity_modes:
                                        yield _Reading(tuple(ups), down, tuple(up_ts), down_t, gated, act_spec,
                                                       ub, db, woi, ident)


def _bias_roles(biases: list[WeightRef], ups: tuple, gated: str, width: int, ffn: int, hidden: int
                ) -> list[tuple[tuple[int, ...], int | None]]:
    if not biases:
        return [((), None)]
    sizes = [static_int(shape_of(b.nodes[0])[-1]) for b in biases]
    out = []
    for perm in itertools.permutations(range(len(biases))):
        if len(ups) == 2 and len(biases) == 3:
            g, u, d = perm
            if sizes[g] == ffn and sizes[u] == ffn and sizes[d] == hidden:
                out.append(((g, u), d))
        elif len(ups) == 1 and len(biases) == 2:
            u, d = perm
            if sizes[u] == width and sizes[d] == hidden:
                out.append(((u,), d))
    return out


def _op_reference(reading: _Reading, parts: dict, inputs: dict, probe: _Probe, x_op: torch.Tensor,
                  e_ffn: int, capacity: _Capacity | None, hidden: int, out_like: fx.Node) -> torch.Tensor:
    """What the rewrite will compute, with the real ``grouter`` ops (autograd included), or with
    the experts written out in differentiable torch ops when ``probe.use_ops`` is off."""
    index = {n: i for i, n in enumerate(probe.weights)}
    params = inputs["params"]
    w_up = _assemble(parts["up"], index, params, cat_dim_out=reading.up_t[0])
    w_down = _assemble([parts["down"]], index, params, False)
    b_up = _assemble(parts["up_bias"], index, params, False) if parts["up_bias"] else None
    b_down = _assemble([parts["down_bias"]], index, params, False) if parts["down_bias"] is not None else None
    ids, w = inputs["ids"], inputs["w"]
    n = ids.shape[0]
    x_flat = x_op.reshape(n, hidden)
    w_flat = w.reshape(n, -1)
    ffn_ids, ffn_w = ids, w_flat
    if capacity is not None:
        keep = reference.capacity_keep_reference(ids, w_flat, probe.e, capacity.value, capacity.priority)
        ffn_w = ffn_w * keep.to(ffn_w.dtype)
    if e_ffn < probe.e:
        is_ffn = ids < e_ffn
        ffn_ids = ids.clamp(max=e_ffn - 1)
        ffn_w = ffn_w * is_ffn.to(ffn_w.dtype)
    mlp = ExpertMLP.of(reading.activation, up_transposed=reading.up_t[0], down_transposed=reading.down_t,
                       weight_on_input=reading.weight_on_input)
    if probe.use_ops:
        plan = reference.dispatch_plan_reference(ffn_ids, e_ffn)
        out, _ = torch.ops.grouter.moe_experts(x_flat, ffn_w, plan[0], plan[1], plan[3], w_up, w_down, b_up, b_down,
                                               **mlp.kwargs(), out_dtype=None)
    else:
        out = reference.moe_experts_autograd_reference(x_flat, ffn_w, ffn_ids, w_up, w_down, b_up, b_down, mlp=mlp)
    if e_ffn < probe.e and reading.identity == "identity":
        extra = (w_flat * (ids >= e_ffn).to(w_flat.dtype)).sum(-1, keepdim=True)
        out = out + (extra * x_flat).to(out.dtype)
    if "base" in inputs:
        out = inputs["base"].reshape(out.shape).to(out.dtype) + out
    return out.reshape(concrete_shape(out_like)).to(dtype_of(out_like))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and compare_max(a, b.to(a.dtype)).ok


@eager
def match_experts(graph: fx.Graph, facts: GraphFacts, routing: RoutingAnalysis, cand: RoutingCandidate, *,
                  check_gradients: bool = True, probe_weights: ProbeWeights | None = None,
                  gradient_proofs: GradientProofs | None = None, probe_ops: bool = True) -> ExpertsMatch | NoMatch:
    """The experts fed by ``cand``'s routing boundary (see the module docstring). Without
    ``check_gradients`` a reading is accepted on forward values alone; ``gradient_proofs`` holds
    the gradient comparisons of earlier sites of the same graph, by region fingerprint."""
    boundary = cand.boundary
    hidden_node = routing.router_input
    hidden = shape_of(hidden_node)[-1] if shape_of(hidden_node) else None
    n_tokens = routing.n_tokens
    if hidden is None or static_int(hidden) is None:
        return NoMatch("the router's input has no constant hidden size", node=routing.router, step="experts")
    hidden = static_int(hidden)
    found = find_output(boundary, facts, n_tokens, hidden)
    if found is None:
        return NoMatch("the routing weights never reach a token-shaped [N, %s] tensor (no expert combine)", (hidden,),
                       node=routing.anchor.node, step="combine")
    out, routed = found
    region_set = (ancestors([out]) | {out}) & routed
    while True:   # what is computed from the token states alone (dense experts) joins the region
        inputs = _classify_inputs(region_set, boundary, facts, n_tokens, hidden, set(routing.region))
        if inputs.problem is not None:
            return inputs.problem
        grown = set()
        for d in inputs.derived:
            grown |= {d} | _between([d], list(dict.fromkeys(inputs.tokens)))
        # a token-shaped input computed from another one (an expert run on every token) joins too
        # when the region reads no expert weights, the experts ran on every token before the
        # routing met them (a dense loop): token-shaped inputs computed from the router's input
        # (or from another input) with model weights join the region
        tokens = list(dict.fromkeys(inputs.tokens))
        for t in tokens:   # copies of the token states (x.repeat_interleave(1)) are recomputed
            others = [o for o in tokens if o is not t and o in ancestors([t])]
            if others and _computed_from(t, set(others), facts, state=False):
                grown |= {t} | _between([t], others)
        if not inputs.weight_reads:
            for t in tokens:
                anchors = [*tokens, routing.router_input, _order_preserving(routing.router_input)]
                others = [o for o in dict.fromkeys(anchors) if o is not t and o in ancestors([t])]
                if others and _computed_from(t, set(others), facts):
                    grown |= {t} | _between([t], others)
        if grown <= region_set:
            break
        region_set |= grown
    if not inputs.weight_reads:
        return NoMatch("no model weights are read between the routing and the combine (not an expert computation)",
                       node=out, step="experts")
    if any(n in facts.random for n in region_set):
        return NoMatch("the expert computation draws random numbers (dropout in training)", node=out,
                       step="experts", partial=True)
    weights = [_strip_transpose(n) for n in inputs.weight_reads]
    grouped = _weight_groups(weights, routing.num_experts, hidden)
    if isinstance(grouped, NoMatch):   # partial when some weights had an expert dim
        return NoMatch(grouped.reason, grouped.args, node=out, step="experts", partial=grouped.step != "experts"
                       or "no leading expert dim" not in grouped.reason)
    mats, biases, e_ffn = grouped
    # the region as the probe runs it: what is fed from the stripped weight nodes (transposes inside)
    weight_nodes = list(dict.fromkeys(n for n, _ in weights))
    region_nodes = (region_set | (set(inputs.weight_reads) - set(weight_nodes))) | _between(
        inputs.weight_reads, weight_nodes)
    tokens = list(dict.fromkeys(inputs.tokens))
    x_candidates, base = _token_roles(tokens, hidden_node)
    if x_candidates is None:
        return NoMatch("the experts read several token-shaped tensors %s", ([t.name for t in tokens],), node=out,
                       step="experts", partial=True)
    routing_inputs = [n for n in inputs.routing]
    w_dtype = next((dtype_of(n) for n in routing_inputs if boundary[n].kind != "ids"), torch.float32)
    n = int(concrete(n_tokens)) if not isinstance(n_tokens, int) else n_tokens
    result = None
    for x_root, x_op_node in x_candidates:
        try:
            probe = _Probe(graph, facts, facts.in_order(region_nodes | _between([x_op_node], [x_root])),
                           boundary, routing_inputs, x_root, base, weight_nodes, out, routing.num_experts,
                           routing.top_k, n, w_dtype, probe_weights, use_ops=probe_ops)
        except ProbeError as err:
            result = NoMatch("the expert region cannot be run on its own: %s", (err,), node=out, step="probe",
                             partial=True)
            continue
        probe.constant_weights = cand.constant_weights
        result = _search(probe, facts, routing, cand, mats, biases, e_ffn, hidden, out, x_root, x_op_node, base,
                         region_nodes, weights, check_gradients, gradient_proofs)
        if isinstance(result, ExpertsMatch):
            return result
    return result


def _between(tops: list[fx.Node], bottoms: list[fx.Node]) -> set[fx.Node]:
    """Nodes on paths from ``bottoms`` up to ``tops`` (both excluded)."""
    up = ancestors(tops)
    down = descendants(bottoms)
    return (up & down) - set(tops) - set(bottoms)


def _token_roles(tokens: list[fx.Node], router_input: fx.Node) -> tuple[list[tuple[fx.Node, fx.Node]] | None,
                                                                         fx.Node | None]:
    """``([(probe input, the node the op reads)], base)`` for the token-shaped tensors read."""
    if not tokens:
        return [(router_input, router_input)], None
    roots = list(dict.fromkeys(_order_preserving(t) for t in tokens))
    router_root = _order_preserving(router_input)
    if len(roots) == 1:   # the op reads what the experts read (a flat view), else the root itself
        root = roots[0]
        cands = [(root, t) for t in tokens if t is not root] + [(root, root)]
        return cands, None
    if len(roots) == 2:
        xs = [r for r in roots if r is router_root or router_root in ancestors([r]) or r in ancestors([router_root])]
        x = xs[0] if xs else roots[0]
        base = next(r for r in roots if r is not x)
        return [(x, x)], base
    return None, None


def _search(probe: _Probe, facts: GraphFacts, routing: RoutingAnalysis, cand: RoutingCandidate,
            mats: list[WeightRef], biases: list[WeightRef], e_ffn: int, hidden: int, out: fx.Node,
            x_root: fx.Node, x_op_node: fx.Node, base: fx.Node | None, region_nodes: set,
            weights: list[tuple[fx.Node, bool]], check_gradients: bool = True,
            gradient_proofs: GradientProofs | None = None) -> ExpertsMatch | NoMatch:
    gradient_proofs = {} if gradient_proofs is None else gradient_proofs
    region_list = facts.in_order(region_nodes)
    consts = _clamped_constants(region_list)
    acts = _activation_candidates(region_list, consts)
    identity_modes = ["identity", "zero"] if e_ffn < routing.num_experts else ["none"]
    try:
        capacity = _measure_capacity(probe, region_list)
    except (RuntimeError, ValueError, IndexError, ProbeError) as err:
        return NoMatch("the expert region failed on random routing: %s", (err,), node=out, step="probe",
                       partial=True)
    if isinstance(capacity, NoMatch):
        return capacity
    # two random routings: the first screens every reading; the second is compared where a
    # reading passed the first, inside the gradient comparison when that runs (the region's and
    # the op's forward at full size are then computed once, not twice)
    trials = [probe.make(seed, base_zero=False) for seed in (0, 1)]
    outs: list[torch.Tensor | None] = [None, None]

    def region_failed(err: Exception) -> NoMatch:
        return NoMatch("the expert region failed on random routing: %s", (err,), node=out, step="probe",
                       partial=True)

    try:
        outs[0] = probe.run_region(trials[0])[0]
    except Exception as err:  # noqa: BLE001 - the region itself failed on valid routing
        return region_failed(err)

    def x_value(inputs: dict, grad: bool = False) -> torch.Tensor:
        if x_op_node is x_root:
            return inputs["x"]
        chain = Region(x_root.graph, _between([x_op_node], [x_root]) | {x_op_node}, [x_root], facts)
        return chain.run({x_root: inputs["x"]})[x_op_node]

    tried = 0
    last_err = None
    for reading in _readings(mats, biases, hidden, acts, identity_modes):
        tried += 1
        if tried > _MAX_READINGS:
            break
        parts = {"up": [_flipped(mats[i], t) for i, t in zip(reading.up, reading.up_t)],
                 "down": _flipped(mats[reading.down], reading.down_t),
                 "up_bias": [biases[i] for i in reading.up_bias],
                 "down_bias": biases[reading.down_bias] if reading.down_bias is not None else None}
        def forward_matches(i: int) -> bool:
            nonlocal last_err
            try:
                with torch.no_grad():
                    ref = _op_reference(reading, parts, trials[i], probe, x_value(trials[i]), e_ffn, capacity,
                                        hidden, out)
            except (RuntimeError, ValueError, IndexError) as err:
                last_err = err
                return False
            return _same(outs[i], ref)

        if not forward_matches(0):
            continue
        compare = check_gradients and _gradients_by_value(probe, reading, e_ffn, capacity, hidden,
                                                         gradient_proofs)
        if not compare:   # the second routing's forward on its own
            if outs[1] is None:
                try:
                    outs[1] = probe.run_region(trials[1])[0]
                except Exception as err:  # noqa: BLE001 - the region itself failed on valid routing
                    return region_failed(err)
            if not forward_matches(1):
                continue
        bad = _check_gradients(probe, reading, parts, trials[1], e_ffn, capacity, hidden, out, x_value,
                               gradient_proofs) if check_gradients else None
        if bad is not None:
            last_err = bad
            continue
        return _build_match(reading, parts, mats, biases, e_ffn, hidden, out, x_op_node, base, region_nodes,
                            probe, capacity, consts, routing, facts)
    detail = f" (last error: {last_err})" if last_err is not None else ""
    return NoMatch("no reading of the expert weights (%s matrices %s, activations %s) reproduces the region on "
                   "random routing%s", (len(mats), [list(shape_of(m.nodes[0])) for m in mats],
                                        [a.describe() for a in acts], detail), node=out, step="experts probe",
                   partial=True)


def _flipped(ref: WeightRef, transposed: bool) -> WeightRef:
    return WeightRef(ref.nodes, transposed)


def _gradient_route(probe: _Probe, reading: _Reading, e_ffn: int, capacity: _Capacity | None, hidden: int,
                    proofs: GradientProofs) -> tuple[str, Any]:
    """How a reading's gradients are proved: ``("blocked", why)``, ``("follows", None)`` (library
    ops only: the forward match proves them), ``("known", result)`` (a region with this one's
    fingerprint was compared before) or ``("compare", (why, key))`` (by value, now)."""
    if probe.real_weights:
        blocker = blocks_gradients(probe.region_nodes, probe.weights)
        if blocker is not None:
            return "blocked", f"{blocker.name} ({blocker.target}) stops the expert weights' gradients"
    sources = [probe.x_root, *probe.routing_inputs, *([probe.base] if probe.base is not None else []), *probe.weights]
    why = gradients_follow_values(probe.region_nodes, sources)
    if why is None:
        return "follows", None
    fingerprint = region_fingerprint(probe.region_nodes)
    key = None if fingerprint is None else (fingerprint, reading, e_ffn, repr(capacity), hidden)
    if key is not None and key in proofs:
        return "known", proofs[key]
    return "compare", (why, key)


def _gradients_by_value(probe: _Probe, reading: _Reading, e_ffn: int, capacity: _Capacity | None, hidden: int,
                        proofs: GradientProofs) -> bool:
    """Whether :func:`_check_gradients` will run the region and the op with autograd."""
    return _gradient_route(probe, reading, e_ffn, capacity, hidden, proofs)[0] == "compare"


def _check_gradients(probe: _Probe, reading: _Reading, parts: dict, trial: dict, e_ffn: int,
                     capacity: _Capacity | None, hidden: int, out: fx.Node, x_value,
                     proofs: GradientProofs) -> str | None:
    """Every gradient of the region and of the op agree (token states, weights, expert weights).

    Where the region is built only from library ops with no gradient blocker, the forward match
    already proves it (``passes/gradient_proof.py``); otherwise the gradients are compared by
    value, with autograd on whatever the caller's mode (a teacher forward under ``no_grad``), and
    the forward values of ``trial`` with them. On the model's own weights, their gradients are
    always proved by structure: nothing between them and the output stops gradients (the op's
    own weight gradients are tested against autograd). A region with the fingerprint of one
    compared before (another layer of the same model) takes that comparison's answer from
    ``proofs``."""
    route, detail = _gradient_route(probe, reading, e_ffn, capacity, hidden, proofs)
    if route == "blocked":
        return detail
    if route == "follows":
        log.debug("grouter: the expert region at %s is built from library ops only: gradients follow from the "
                  "forward match", out.name)
        return None
    if route == "known":
        log.debug("grouter: the expert region at %s has the code and shapes of one compared before: %s", out.name,
                  "its gradients agreed" if detail is None else detail)
        return detail
    why, key = detail
    log.debug("grouter: comparing the expert region's gradients by value at %s: %s", out.name, why)
    with torch.inference_mode(False), torch.enable_grad():
        result = _gradient_mismatch(probe, reading, parts, trial, e_ffn, capacity, hidden, out, x_value)
    if key is not None and result != _SECOND_ROUTING_DIFFERS:   # a value mismatch is this site's, not the code's
        proofs[key] = result
    return result


_SECOND_ROUTING_DIFFERS = "the values differ on a second random routing"


def _gradient_mismatch(probe: _Probe, reading: _Reading, parts: dict, trial: dict, e_ffn: int,
                       capacity: _Capacity | None, hidden: int, out: fx.Node, x_value) -> str | None:
    got, leaves = probe.run_region(trial, grad=True)
    gen = torch.Generator().manual_seed(11)
    cot = torch.randn(got.shape, generator=gen).to(got.dtype)
    targets = [leaves["x"], leaves["w"], *[p for p in leaves["params"] if p.requires_grad]]
    if "base" in leaves:
        targets.append(leaves["base"])
    want = torch.autograd.grad((got * cot).sum(), targets, allow_unused=True)
    leaves2 = probe._leaves(trial, True)
    ref = _op_reference(reading, parts, leaves2, probe, x_value(leaves2), e_ffn, capacity, hidden, out)
    targets2 = [leaves2["x"], leaves2["w"], *[p for p in leaves2["params"] if p.requires_grad]]
    if "base" in leaves2:
        targets2.append(leaves2["base"])
    if not _same(got.detach(), ref.detach()):
        return _SECOND_ROUTING_DIFFERS
    have = torch.autograd.grad((ref * cot).sum(), targets2, allow_unused=True)
    names = ["x", "weights"] + [f"expert weight {i}" for i in range(len(targets) - 2)]
    largest = max((g.abs().max().item() for g in want if g is not None and g.numel()), default=0.0)
    # gradients are compared at the precision the experts compute in (bf16 experts in an fp32
    # model give fp32 routing-weight gradients with bf16 errors)
    precision = _least_precise([got.dtype, *[p.dtype for p in leaves["params"] if p.is_floating_point()]])
    for name, a, b in zip(names, have, want):
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        scale = largest if b.abs().max().item() < 1e-4 * largest else None
        c = compare_max(a, b, precision=precision, scale=scale)
        if not c.ok:
            return f"gradient of {name} differs ({c})"
    return None


def _least_precise(dtypes: list[torch.dtype]) -> torch.dtype:
    return max(dtypes, key=lambda d: default_tolerance(d)[0])


def _measure_capacity(probe: _Probe, region: list[fx.Node]) -> _Capacity | None | NoMatch:
    """Route every token's first choice to expert 0 and see how many tokens it keeps."""
    n, k, e = probe.n, probe.k, probe.e
    if n < 2:
        return None
    gen = torch.Generator().manual_seed(5)
    ids = torch.stack([torch.randperm(e - 1, generator=gen)[: k - 1] + 1 for _ in range(n)]) if k > 1 else \
        torch.empty(n, 0, dtype=torch.int64)
    ids = torch.cat([torch.zeros(n, 1, dtype=torch.int64), ids], dim=1)
    w = torch.zeros(n, k)
    w[:, 0] = 1.0
    inputs = probe.make(21, ids=ids, w=w, base_zero=True)
    got, _ = probe.run_region(inputs)
    rows = got.reshape(n, -1)
    kept = (rows.abs().sum(-1) > 0).nonzero().reshape(-1)
    if kept.numel() == n:
        return None
    c = int(kept.numel())
    if c == 0 or not torch.equal(kept.cpu(), torch.arange(c)):
        return NoMatch("capacity-based dispatch keeps tokens %s of %s routed to one expert: not a known priority",
                       (kept.tolist()[:8], n), step="capacity", partial=True)
    priority = "token"
    # score priority: the same routing with distinct weights keeps the C heaviest tokens
    w2 = w.clone()
    w2[:, 0] = torch.rand(n, generator=gen) + 0.5
    got2, _ = probe.run_region(probe.make(22, ids=ids, w=w2, base_zero=True))
    kept2 = (got2.reshape(n, -1).abs().sum(-1) > 0).nonzero().reshape(-1)
    heaviest = torch.argsort(w2[:, 0], descending=True, stable=True)[:c].sort().values
    if torch.equal(kept2.cpu(), heaviest) and not torch.equal(kept2.cpu(), torch.arange(c)):
        priority = "score"
    elif k > 1:
        # choice priority: second choices of the first half, first choices of the second half
        ids3 = ids.clone()
        half = n // 2
        ids3[:half, 1], ids3[:half, 0] = 0, ids[:half, 1]
        w3 = torch.zeros(n, k)
        w3[:half, 1] = 1.0
        w3[half:, 0] = 1.0
        got3, _ = probe.run_region(probe.make(23, ids=ids3, w=w3, base_zero=True))
        kept3 = (got3.reshape(n, -1).abs().sum(-1) > 0).nonzero().reshape(-1)
        token_first = torch.arange(min(c, n))
        if not torch.equal(kept3.cpu(), token_first):
            priority = "choice"
    node = _capacity_node(region, c)
    if node is None:
        return NoMatch("capacity-based dispatch keeps %s tokens per expert, but no constant or size of the graph "
                       "holds that number", (c,), step="capacity", partial=True)
    return _Capacity(c, priority, node)


def _capacity_node(region: list[fx.Node], c: int) -> Any:
    """The graph value holding the capacity: a symbolic size node or a constant argument."""
    for n in region:
        for a in list(n.args) + list(n.kwargs.values()):
            if isinstance(a, fx.Node) and tensor_meta(a) is None and scalar_value(a) == c and isinstance(
                    meta_val(a), torch.SymInt):
                return a
    for n in region:
        for a in itertools.chain(n.args, n.kwargs.values()):
            items = a if isinstance(a, (tuple, list)) else (a,)
            for i in items:
                if isinstance(i, int) and not isinstance(i, bool) and i == c:
                    return c
                if isinstance(i, fx.Node) and tensor_meta(i) is None and scalar_value(i) == c:
                    return i
        s = shape_of(n)
        if s is not None:
            for d in s:
                if static_int(d) == c:
                    return c
    return None


def _style(region: list[fx.Node], boundary_nodes: set[fx.Node]) -> str:
    """A name for how the dispatch is written (for reports; detection does not use it)."""
    names = [target_name(n) for n in region]
    joined = " ".join(names)
    if "grouped_mm" in joined:
        return "grouped_mm"
    custom = [n.target for n in region if isinstance(n.target, torch._ops.OpOverload | torch._ops.OpOverloadPacket)
              and getattr(n.target, "namespace", "aten") not in ("aten", "prims")]
    if any(x in names for x in ("nonzero", "where")) and any(
            n.op == "call_function" and n.target is torch.where and len(n.args) == 1 for n in region):
        return "loop"
    if "index_copy" in joined:
        return "slot_buffer"
    if "einsum" in names:
        return "einsum"
    if "bmm" in names:
        gathered = any(is_getitem(n) and any(a in boundary_nodes or a in descendants(boundary_nodes, limit=50)
                                             for a in n.all_input_nodes[1:]) for n in region)
        return "batched_mm" if gathered else "dense_bmm"
    if custom:
        return f"custom op {custom[0]}"
    return "dense"


def _build_match(reading: _Reading, parts: dict, mats, biases, e_ffn: int, hidden: int, out: fx.Node,
                 x_op_node: fx.Node, base: fx.Node | None, region_nodes: set, probe: _Probe,
                 capacity: _Capacity | None, consts: dict, routing: RoutingAnalysis, facts: GraphFacts
                 ) -> ExpertsMatch:
    region = facts.in_order(region_nodes)
    up_width = static_int(shape_of(parts["up"][0].nodes[0])[-2 if not reading.up_t[0] else -1])
    ffn = up_width // 2 if reading.gated in ("concat", "interleaved") else up_width
    compute = dtype_of(parts["up"][0].nodes[0])
    spec = ExpertsSpec(
        style=_style(region, set(probe.routing_inputs)), num_experts=e_ffn, top_k=routing.top_k,
        hidden_size=hidden, ffn_size=ffn, activation=reading.activation, up_transposed=reading.up_t[0],
        down_transposed=reading.down_t, has_bias=bool(parts["up_bias"]), weight_on_input=reading.weight_on_input,
        compute_dtype=compute, out_dtype=dtype_of(out),
        capacity=capacity.value if capacity is not None else None,
        capacity_priority=capacity.priority if capacity is not None else "token",
        routed_experts=routing.num_experts if e_ffn < routing.num_experts else None,
        extra_experts=reading.identity if e_ffn < routing.num_experts else "none")
    runtime = dict(consts.get("runtime", {})) if reading.activation.kind == "clamped_swiglu" else {}
    return ExpertsMatch(spec=spec, x=x_op_node, up=parts["up"], down=parts["down"], up_bias=parts["up_bias"],
                        down_bias=parts["down_bias"], output=out, region=region, combine_base=base,
                        runtime_scalars=runtime, capacity=capacity.node if capacity is not None else None)


__all__ = ["ExpertsMatch", "WeightRef", "find_output", "match_experts"]

