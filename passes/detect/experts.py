"""Find and classify the routed-expert computation that consumes a gating site's outputs.

The matcher looks, after the router, for the first *expert GEMMs*: GEMMs one of whose operands
is a 3-D ``[E, ., .]`` weight that does not depend on the routing. Four spellings are recognised::

    grouped_mm   (transformers' default; torchtitan)   rows sorted by expert, torch._grouped_mm /
                 transformers::grouped_mm_fallback with offsets derived from the ids
    batched_mm   (transformers' batched_mm)            bmm(W[ids], x_slot): weights gathered per slot
    dense_bmm    (Llama 4, dense MoEs)                 bmm([E, N, I], W): every expert on every token
    einsum       (GShard-style)                        einsum("ech,ehf->ecf", dispatched, W)

Up and gate may be one concatenated GEMM or two GEMMs on the same input. From the GEMMs the
matcher reads the token input ``x``, the expert weights and layouts, per-expert biases, the
activation between the GEMMs, where the routing weight is applied (to each slot's output, or to
its input as in Llama 4), and the combine back to ``[N, H]`` (a sum over the K slots, a sum over
the E experts, an einsum, or a scatter/index add, possibly into a base such as a shared
expert's output). Capacity-based dispatch that can drop tokens is recognised and refused.

The whole region from the inputs to the combine output is returned so that the probe can run it
against the op's reference and the rewrite can delete it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from grouter_pass.passes.graph_utils import (
    RESHAPE_METHODS,
    ancestors,
    descendants,
    dtype_of,
    is_function,
    is_getitem,
    is_method,
    meta_val,
    mutated_arg,
    runtime_scalar,
    same_shape,
    same_size,
    shape_of,
    static_int,
    tensor_meta,
)
from grouter_pass.spec import ActivationSpec, ExpertsSpec, NoMatch

EINSUM_TARGETS = (torch.einsum, torch.functional.einsum)


def _grouped_mm_targets() -> tuple:
    targets: list = [torch._grouped_mm, torch.ops.aten._grouped_mm.default, torch.ops.aten._grouped_mm]
    if hasattr(torch.nn.functional, "grouped_mm"):
        targets.append(torch.nn.functional.grouped_mm)
    try:  # registered by transformers.integrations.moe at import time
        pkt = torch.ops.transformers.grouped_mm_fallback
        targets += [pkt, pkt.default]
    except (AttributeError, RuntimeError):
        pass
    return tuple(targets)


@dataclass
class ExpertGemm:
    node: fx.Node          # the GEMM call
    out: fx.Node           # its result (after a squeeze for the per-slot bmm)
    act_input: fx.Node     # the activation operand
    weight: fx.Node        # the 3-D [E, ., .] expert weight (before any transpose view)
    transposed: bool       # True when the weight is stored [E, in, out]
    style: str


@dataclass
class ExpertsMatch:
    spec: ExpertsSpec
    x: fx.Node
    w_up: fx.Node
    w_down: fx.Node
    b_up: fx.Node | None
    b_down: fx.Node | None
    output: fx.Node
    region: list[fx.Node]   # graph order; includes ``output``
    #: the gate half when gate and up are two GEMMs (the rewrite concatenates [gate; up])
    w_gate: fx.Node | None = None
    b_gate: fx.Node | None = None
    #: a tensor the routed outputs are added into (a shared expert's output), else None
    combine_base: fx.Node | None = None
    #: op arguments that are runtime scalars in the graph (see ``graph_utils.runtime_scalar``)
    runtime_scalars: dict[str, fx.Node] = field(default_factory=dict)


def _is_cast(node: object) -> bool:
    return is_method(node, "to") and len(node.args) == 2 and isinstance(node.args[1], torch.dtype)


def _strip_casts(node: fx.Node) -> fx.Node:
    while _is_cast(node) or (is_method(node, *RESHAPE_METHODS) and same_shape(shape_of(node), shape_of(node.args[0]))):
        node = node.args[0]
    return node


def _strip_weight_views(node: fx.Node) -> tuple[fx.Node, bool]:
    """Skip casts and a transpose of the last two dims on a weight; (base, seen transposed)."""
    transposed = False
    while True:
        if _is_cast(node):
            node = node.args[0]
        elif (is_method(node, "transpose") or is_function(node, torch.transpose)) and {
                d % 3 for d in node.args[1:3] if isinstance(d, int)} == {1, 2}:
            node, transposed = node.args[0], not transposed
        elif is_function(node, getattr) and node.args[1] == "mT":
            node, transposed = node.args[0], not transposed
        else:
            return node, transposed


def _expert_weight(node: object, num_experts: int, routed: set[fx.Node]) -> tuple[fx.Node, bool] | None:
    """(3-D expert weight, whether the GEMM sees it transposed) or None."""
    if not isinstance(node, fx.Node):
        return None
    w, seen_transposed = _strip_weight_views(node)
    s = shape_of(w)
    if s is None or len(s) != 3 or not same_size(s[0], num_experts) or w in routed:
        return None
    return w, seen_transposed


def _einsum_gemm(node: fx.Node, num_experts: int, routed: set[fx.Node]) -> ExpertGemm | None:
    eq = node.args[0] if node.args and isinstance(node.args[0], str) else None
    operands = list(node.args[1:]) if eq is not None else []
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if eq is None or len(operands) != 2:
        return None
    m = re.fullmatch(r"\s*(\w+)\s*,\s*(\w+)\s*->\s*(\w+)\s*", eq.replace("...", ""))
    if m is None:
        return None
    lhs, rhs, out = m.groups()
    for act, w, a_sub, w_sub in ((operands[0], operands[1], lhs, rhs), (operands[1], operands[0], rhs, lhs)):
        got = _expert_weight(w, num_experts, routed)
        if got is None or len(w_sub) != 3 or len(a_sub) != 3 or len(out) != 3:
            continue
        base, seen_t = got
        e, p, q = w_sub
        contracted = set(a_sub) & set(w_sub) - {e} - set(out)
        if a_sub[0] != e or out[0] != e or len(contracted) != 1:
            return None
        in_dim = contracted.pop()
        stored_in_out = (p == in_dim) != seen_t  # weight laid out [E, in, out] as stored
        return ExpertGemm(node, node, act, base, transposed=stored_in_out, style="einsum")
    return None


def _as_expert_gemm(node: fx.Node, num_experts: int, routed: set[fx.Node], grouped_targets: tuple
                    ) -> ExpertGemm | None:
    if node.op == "call_function" and node.target in grouped_targets:
        if len(node.args) < 2 or node not in routed:
            return None
        got = _expert_weight(node.args[1], num_experts, routed)
        if got is None:
            return None
        w, seen_transposed = got
        # grouped_mm(a, B) computes a @ B[e] with B [E, in, out]: a transpose view means w is
        # stored [E, out, in] (nn.Linear layout), i.e. *not* transposed in our convention.
        return ExpertGemm(node, node, node.args[0], w, transposed=not seen_transposed, style="grouped_mm")
    if is_function(node, torch.bmm):
        a, b = node.args[0], node.args[1]
        sq = next(iter(node.users)) if len(node.users) == 1 else None
        for mat, vec, transposed in ((a, b, False), (b, a, True)):
            if is_getitem(mat) and isinstance(mat.args[1], fx.Node) and mat.args[1] in routed:
                w = mat.args[0]
                s = shape_of(w)
                if s is not None and len(s) == 3 and same_size(s[0], num_experts) and w not in routed:
                    if not (is_method(vec, "unsqueeze") and is_method(sq, "squeeze")):
                        return None
                    return ExpertGemm(node, sq, vec.args[0], w, transposed=transposed, style="batched_mm")
        got = _expert_weight(b, num_experts, routed)  # dense: bmm([E, N, I], W[E, I, O])
        a_shape = shape_of(a)
        if got is not None and a_shape is not None and len(a_shape) == 3 and same_size(a_shape[0], num_experts):
            w, seen_transposed = got
            return ExpertGemm(node, node, a, w, transposed=not seen_transposed, style="dense_bmm")
        return None
    if is_function(node, *EINSUM_TARGETS):
        return _einsum_gemm(node, num_experts, routed)
    return None


def _bias_add(out: fx.Node, num_experts: int, routed: set[fx.Node]) -> tuple[fx.Node, fx.Node | None]:
    """``out + b[sorted_ids]`` (a per-expert bias gathered by routed ids) -> (sum, b)."""
    for u in out.users:
        if is_function(u, torch.add) and u.args[0] is out and isinstance(u.args[1], fx.Node):
            sel = u.args[1]
            if is_getitem(sel) and isinstance(sel.args[1], fx.Node) and sel.args[1] in routed:
                b = sel.args[0]
                s = shape_of(b)
                if s is not None and len(s) == 2 and same_size(s[0], num_experts) and b not in routed:
                    return u, b
    return out, None


def _token_input(act_input: fx.Node, n_tokens, weighted: set[fx.Node], routed: set[fx.Node]
                 ) -> tuple[fx.Node | None, bool]:
    """Walk from the first GEMM's activation operand back to the ``[N, H]`` token tensor.

    Returns ``(x, weight_on_input)``: the second is True when a routing-weight product sits on
    the way (the slot inputs are scaled before the experts, as in Llama 4)."""
    cur, on_input = act_input, False
    for _ in range(12):
        s = shape_of(cur)
        if s is not None and len(s) == 2 and same_size(s[0], n_tokens) and cur not in routed and cur not in weighted:
            return cur, on_input
        if _is_cast(cur) or (cur.op == "call_method" and cur.target in RESHAPE_METHODS | {"expand", "repeat"}):
            cur = cur.args[0]
        elif is_method(cur, "repeat_interleave") or is_function(cur, torch.repeat_interleave):
            cur = cur.args[0]
        elif (is_getitem(cur) and isinstance(cur.args[1], fx.Node) and cur.args[1] in routed) or (
                is_function(cur, torch.index_select) and cur.args[2] in routed):
            cur = cur.args[0]
        elif is_function(cur, torch.mul) and all(isinstance(a, fx.Node) for a in cur.args):
            a, b = cur.args
            if b in weighted and a not in weighted:
                cur, on_input = a, True
            elif a in weighted and b not in weighted:
                cur, on_input = b, True
            else:
                return None, False
        elif is_function(cur, *EINSUM_TARGETS):
            tokens = [o for o in cur.args[1:] if isinstance(o, fx.Node) and o not in routed and o not in weighted]
            if len(tokens) != 1:
                return None, False
            cur = tokens[0]
        else:
            return None, False
    return None, False


def _float_param(x: object) -> tuple[float | None, fx.Node | None]:
    """A constant float, or a runtime scalar node (value at trace time, node)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x), None
    value = runtime_scalar(x)
    return (value, x) if value is not None else (None, None)


_ACT_FUNCS = {F.silu: "silu", F.gelu: "gelu", torch.relu: "relu"}


def classify_activation(ups: list[fx.Node], a: fx.Node) -> tuple[ActivationSpec, dict[str, fx.Node], int] | NoMatch:
    """Classify the elementwise subgraph from the up-GEMM output(s) to the down-GEMM input ``a``.

    ``ups`` is ``[h]`` for one concatenated gate/up GEMM or ``[h1, h2]`` for two. Returns the
    spec, the activation parameters that are runtime scalars (graph nodes, passed to the op
    instead of their trace-time values) and, for two GEMMs, the index of the gate one.
    """
    region = descendants(ups) & (ancestors([a]) | {a})
    names = {n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
             for n in region}
    act_nodes = [n for n in region if n.op == "call_function" and n.target in _ACT_FUNCS]
    gate_index = 0
    if len(ups) == 2:
        layout, gated = "concat", True
        feeds = [i for i, h in enumerate(ups) if any(h in ancestors([n]) | {n.args[0]} for n in act_nodes)]
        if len(feeds) != 1:
            return NoMatch("two up-projections, but not one activated gate and one linear half", partial=True)
        gate_index = feeds[0]
    else:
        h = ups[0]
        chunk = next((u for u in h.users if is_method(u, "chunk") and u.args[1] == 2
                      and u.kwargs.get("dim", u.args[2] if len(u.args) > 2 else 0) in (-1, 1, 2)), None)
        strided = [u for u in h.users if is_getitem(u) and isinstance(u.args[1], tuple)
                   and len(u.args[1]) == 2 and u.args[1][0] is Ellipsis and isinstance(u.args[1][1], slice)]
        steps = sorted((s.args[1][1].start or 0, s.args[1][1].step) for s in strided)
        if chunk is not None:
            layout, gated = "concat", True
            halves = [u for u in chunk.users if is_getitem(u)]
            first = next((u for u in halves if u.args[1] == 0), None)
            if first is not None and act_nodes and not any(first in ancestors([n]) | {n.args[0]} for n in act_nodes):
                return NoMatch("the activation is applied to the second half of the gate/up output", partial=True)
        elif steps == [(0, 2), (1, 2)]:
            layout, gated = "interleaved", True
        elif strided:
            return NoMatch("unrecognised gate/up split of the first expert GEMM", partial=True)
        else:
            layout, gated = "concat", False
    if "clamp" in names and "sigmoid" in names:
        if not gated or len(ups) != 1:
            return NoMatch("clamped activation outside a gate/up GEMM", partial=True)
        gate_clamp = next((n for n in region if is_function(n, torch.clamp) and n.kwargs.get("min") is None), None)
        limit, limit_node = _float_param(gate_clamp.kwargs.get("max")) if gate_clamp is not None else (None, None)
        alpha_mul = next((n for n in region if is_function(n, torch.mul) and any(
            is_function(u, torch.sigmoid) for u in n.users) and _float_param(n.args[1])[0] is not None), None)
        alpha, alpha_node = _float_param(alpha_mul.args[1]) if alpha_mul is not None else (1.0, None)
        if limit is None:
            return NoMatch("clamped activation without a recognisable limit", partial=True)
        runtime = {k: v for k, v in (("alpha", alpha_node), ("limit", limit_node)) if v is not None}
        return ActivationSpec("clamped_swiglu", gated=True, layout=layout, alpha=alpha, limit=limit), runtime, 0
    if len({n.target for n in act_nodes}) > 1:
        return NoMatch("several different activations between the expert GEMMs", partial=True)
    if act_nodes:
        n = act_nodes[0]
        kind = _ACT_FUNCS[n.target]
        if kind == "gelu" and n.kwargs.get("approximate") == "tanh":
            kind = "gelu_tanh"
    elif "sigmoid" in names and "mul" in names:
        kind = "silu"  # x * sigmoid(x) written out
    else:
        return NoMatch("unrecognised expert activation (ops: %s)", (sorted(names),), partial=True)
    return ActivationSpec(kind, gated=gated, layout=layout), {}, gate_index


def _combine_output(y: fx.Node, n_tokens, hidden, num_experts, allowed: set[fx.Node]
                    ) -> tuple[fx.Node, fx.Node | None] | None:
    """Follow the single-user chain after the down GEMM (weighting, un-permuting, reshaping) to
    the reduction that brings the slot outputs back to ``[N, H]``, plus trailing casts.

    Reductions: ``sum`` over the K slots of ``[N, K, H]`` or the E experts of ``[E, N, H]``, an
    einsum producing ``[N, H]``, or ``scatter_add`` / ``index_add`` into ``[N, H]``. Returns
    ``(output, base)`` where ``base`` is the tensor a scatter/index add accumulates into when that
    is not a fresh zero tensor. Only operands derived from the routing may join the chain: a
    residual or shared-expert add ends it, so a model's own post-processing is never swallowed.
    """
    cur = y
    for _ in range(12):
        if len(cur.users) != 1:
            return None
        u = next(iter(cur.users))
        outside = [a for a in u.all_input_nodes if a is not cur and a not in allowed and tensor_meta(a) is not None]
        out_shape = shape_of(u)
        reduced = out_shape is not None and same_shape(out_shape, (n_tokens, hidden))
        base = None
        if reduced and (is_function(u, torch.scatter_add, torch.index_add) or is_method(u, "scatter_add",
                                                                                           "index_add")):
            base = u.args[0]
            outside = [a for a in outside if a is not base]
            if _is_fresh_zeros(base):
                base = None
        if outside:
            return None
        if reduced and (base is not None or _is_fresh_zeros_target(u) or is_function(u, *EINSUM_TARGETS) or (
                is_function(u, torch.sum) and not u.kwargs.get("keepdim") and u.args[1] in (0, -3, 1, -2))):
            out = u
            while len(out.users) == 1 and _is_cast(next(iter(out.users))):
                out = next(iter(out.users))
            return out, base
        cur = u
    return None


def _is_fresh_zeros(node: object) -> bool:
    return is_function(node, torch.zeros_like, torch.zeros) or is_method(node, "zero_", "new_zeros")


def _is_fresh_zeros_target(u: fx.Node) -> bool:
    return (is_function(u, torch.scatter_add, torch.index_add) or is_method(u, "scatter_add", "index_add")) and \
        _is_fresh_zeros(u.args[0])


def find_capacity_limit(region: set[fx.Node], n_tokens) -> int | object | None:
    """The per-expert capacity of a capacity-based dispatch in ``region``, or None.

    A capacity dispatch one-hot-encodes each routed token's *position* inside its expert (a
    ``cumsum`` over tokens) into ``C`` slots. When ``C`` is provably at least the token count no
    token can be dropped and None is returned; otherwise ``C``."""
    for n in region:
        if not is_function(n, F.one_hot):
            continue
        classes = n.args[1] if len(n.args) > 1 else n.kwargs.get("num_classes", -1)
        if isinstance(classes, fx.Node):
            classes = meta_val(classes)
        if not _cumsum_nearby(n.args[0]):
            continue  # the expert mask, not a slot position
        if not _at_least(classes, n_tokens):
            return classes
    return None


def _cumsum_nearby(node: object, depth: int = 6) -> bool:
    """A ``cumsum`` within a few ops upstream of ``node`` (a slot position is a running count)."""
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if not isinstance(n, fx.Node):
                continue
            if is_function(n, torch.cumsum) or is_method(n, "cumsum"):
                return True
            nxt.extend(n.all_input_nodes)
        frontier = nxt
    return False


def _at_least(a, b) -> bool:
    if same_size(a, b):
        return True
    ia, ib = static_int(a), static_int(b)
    return ia is not None and ib is not None and ia >= ib


def match_experts(graph: fx.Graph, ids: fx.Node, weights: fx.Node, num_experts: int, top_k: int,
                  after: fx.Node | None = None) -> ExpertsMatch | NoMatch:
    """Match the expert computation fed by ``(weights, ids)`` (``after``: where to start looking)."""
    routed = descendants([ids]) | {ids}
    weighted = descendants([weights]) | {weights}
    touched = routed | weighted
    grouped_targets = _grouped_mm_targets()
    started = after is None
    gemms: list[ExpertGemm] = []
    for n in graph.nodes:
        if not started:
            started = n is after
            continue
        g = _as_expert_gemm(n, num_experts, routed, grouped_targets)
        if g is not None:
            gemms.append(g)
            if len(gemms) == 3:
                break
    not_consumed = NoMatch("top-k indices are not consumed by an expert dispatch (e.g. an auxiliary loss)")
    # GEMMs fed by the routing are certainly this site's experts: a failure below is then a near
    # miss worth reporting. Dense experts (every expert on every token) meet the routing only in
    # the combine, so for them a failure may just mean the GEMMs belong to another site.
    direct = any(g.node in touched or _strip_casts(g.act_input) in touched for g in gemms)

    def fail(reason: str, *args: object) -> NoMatch:
        return NoMatch(reason, args, partial=direct)

    if not gemms:
        return not_consumed
    if len(gemms) < 2:
        return fail("found one expert GEMM, expected an up and a down projection")
    x_of = [_strip_casts(g.act_input) for g in gemms]
    if len(gemms) == 3 and x_of[0] is x_of[1]:
        ups, down = gemms[:2], gemms[2]
    else:
        ups, down = gemms[:1], gemms[1]
    if any(g.style != down.style for g in ups):
        return fail("expert GEMMs of mixed styles (%s, %s)", ups[0].style, down.style)
    up_outs, up_biases = zip(*(_bias_add(g.out, num_experts, routed) for g in ups))
    if not all(down.act_input in descendants([h]) for h in up_outs):
        return fail("the last expert GEMM does not consume the first one's output")
    y, b_down = _bias_add(down.out, num_experts, routed)
    n_tokens = shape_of(ids)[0]
    x, on_input = _token_input(ups[0].act_input, n_tokens, weighted, routed)
    if x is None:
        return fail("could not find the [N, H] token input of the first expert GEMM")
    hidden = shape_of(x)[1]
    combined = _combine_output(y, n_tokens, hidden, num_experts, touched | {y})
    if combined is None:
        return fail("could not find where the expert outputs are combined back to [N, H]")
    out, base = combined
    if not touched & ancestors([out]):
        return not_consumed
    direct = True
    w_shapes = [shape_of(g.weight) for g in (*ups, down)]
    in_out = [(s[1], s[2]) if g.transposed else (s[2], s[1]) for g, s in zip((*ups, down), w_shapes)]
    if not (all(same_size(i, hidden) for i, _ in in_out[:-1]) and same_size(in_out[-1][1], hidden)):
        return fail("expert weight shapes %s do not fit hidden size %s", w_shapes, hidden)
    ffn = static_int(in_out[-1][0])
    classified = classify_activation(list(up_outs), _strip_casts(down.act_input))
    if isinstance(classified, NoMatch):
        return classified
    act, runtime_scalars, gate_index = classified
    up_width = sum(static_int(o) or 0 for _, o in in_out[:-1])
    if ffn is None or up_width != (2 * ffn if act.gated else ffn):
        return fail("up-projection width %s does not fit FFN %s (gated=%s)", up_width, ffn, act.gated)
    if len(ups) == 2 and (ups[0].transposed != ups[1].transposed or (up_biases[0] is None) != (up_biases[1] is None)):
        return fail("gate and up projections are laid out differently")
    if weights not in ancestors([out]):
        return fail("the expert combine does not use the site's routing weights")
    boundary = {ids, weights, x, *(g.weight for g in (*ups, down))} | set(runtime_scalars.values()) | {
        b for b in (*up_biases, b_down, base) if b is not None}
    upstream = ancestors(boundary) | boundary
    region_set = (ancestors([out]) | {out}) - upstream
    capacity = find_capacity_limit(region_set, n_tokens)
    if capacity is not None:
        return fail("capacity-based dispatch keeps at most %s tokens per expert and drops the rest; the grouter "
                    "ops never drop tokens, so the site is left unchanged", capacity)
    for n in region_set:
        if n.op == "placeholder" and tensor_meta(n) is not None:
            return fail("the expert computation also reads tensor input %s", n.name)
        if n.op == "get_attr":
            return fail("the expert computation reads module attribute %s", n.target)
        mutated = mutated_arg(n)
        if mutated is not None and mutated not in region_set:
            return fail("%s mutates %s, outside the expert computation", n.name, mutated.name)
    has_bias = b_down is not None or any(b is not None for b in up_biases)
    if has_bias and (b_down is None or any(b is None for b in up_biases)):
        return fail("only some of the expert GEMMs have a bias")
    spec = ExpertsSpec(
        style=down.style, num_experts=num_experts, top_k=top_k, hidden_size=static_int(hidden) or -1, ffn_size=ffn,
        activation=act, up_transposed=ups[0].transposed, down_transposed=down.transposed, has_bias=has_bias,
        weight_on_input=on_input, compute_dtype=dtype_of(ups[0].weight) or dtype_of(down.weight),
        out_dtype=dtype_of(out))
    if len(ups) == 2:  # the op takes [gate; up] concatenated: keep both, the rewrite concatenates
        gate, up = (0, 1) if gate_index == 0 else (1, 0)
        w_gate, w_up, b_gate, b_up = ups[gate].weight, ups[up].weight, up_biases[gate], up_biases[up]
    else:
        w_gate, w_up, b_gate, b_up = None, ups[0].weight, None, up_biases[0]
    return ExpertsMatch(spec=spec, x=x, w_up=w_up, w_down=down.weight, b_up=b_up, b_down=b_down, output=out,
                        region=[n for n in graph.nodes if n in region_set], w_gate=w_gate, b_gate=b_gate,
                        combine_base=base, runtime_scalars=runtime_scalars)


__all__ = ["ExpertsMatch", "ExpertGemm", "match_experts", "classify_activation", "find_capacity_limit"]
