"""Find and classify the routed-expert computation that consumes a gating site's outputs.

Starting from the site's ``(weights [N, K], ids [N, K])`` the matcher looks, in the nodes that
depend on ``ids``, for the first two *expert GEMMs*: GEMMs whose weight is (a view of) a 3-D
``[E, ., .]`` tensor that does not depend on the routing. Two spellings are recognised::

    grouped_mm (transformers' default, and torch._grouped_mm / F.grouped_mm in bf16):
        ids -> reshape(-1) -> sort -> perm;  x[perm // K] -> grouped_mm(., W_up^T, offs)
        [+ b_up[sorted_ids]] -> act -> grouped_mm(., W_down^T, offs) [+ b_down[...]]
        -> * w[perm] -> [inv_perm] -> view(N, K, H).sum(1) -> .to(dtype)
    batched_mm (transformers' batched_mm):
        x.repeat_interleave(K) -> bmm(W_up[ids], .) -> act -> bmm(W_down[ids], .) -> * w -> view(N,K,H).sum(1)

From the GEMMs it reads everything the ``grouter.moe_experts`` op needs: the token input ``x``,
the expert weight tensors and their layout, optional per-expert biases, the activation between
the GEMMs, and the combine output ``O`` (the reduction of the weighted slot outputs over the K
slots of each token, ``view(N, K, H).sum(1)``, plus trailing casts). The whole region from the inputs to ``O`` is returned so the
probe can run it against the op's reference, and the rewrite can delete it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from grouter_pass.passes.graph_utils import (
    RESHAPE_METHODS,
    ancestors,
    descendants,
    dtype_of,
    is_function,
    is_getitem,
    is_method,
    mutated_arg,
    runtime_scalar,
    same_shape,
    same_size,
    shape_of,
    static_int,
    tensor_meta,
)
from grouter_pass.spec import ActivationSpec, ExpertsSpec, NoMatch


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
    out: fx.Node           # its [S, O] result (after a squeeze for bmm)
    act_input: fx.Node     # the [S, I] activation operand
    weight: fx.Node        # the 3-D [E, ., .] expert weight tensor (before any transpose view)
    transposed: bool       # True when weight is stored [E, in, out]
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
    #: op arguments that are runtime scalars in the graph (see ``graph_utils.runtime_scalar``)
    runtime_scalars: dict[str, fx.Node] = field(default_factory=dict)


def _is_cast(node: object) -> bool:
    return is_method(node, "to") and len(node.args) == 2 and isinstance(node.args[1], torch.dtype)


def _strip_casts(node: fx.Node) -> fx.Node:
    while _is_cast(node) or (is_method(node, *RESHAPE_METHODS) and same_shape(shape_of(node), shape_of(node.args[0]))):
        node = node.args[0]
    return node


def _last_two_transposed(node: fx.Node) -> fx.Node | None:
    """``w.transpose(-2, -1)`` / ``w.transpose(1, 2)`` / ``w.mT`` of a 3-D w -> w."""
    if is_method(node, "transpose") or is_function(node, torch.transpose):
        dims = {d % 3 for d in node.args[1:3] if isinstance(d, int)}
        if dims == {1, 2}:
            return node.args[0]
    if is_function(node, getattr) and node.args[1] == "mT":
        return node.args[0]
    return None


def _expert_weight(node: fx.Node, num_experts: int, routed: set[fx.Node]) -> tuple[fx.Node, bool] | None:
    """(3-D expert weight, whether the GEMM sees it transposed) or None."""
    base = _last_two_transposed(node)
    w, seen_transposed = (base, True) if base is not None else (node, False)
    s = shape_of(w)
    if s is None or len(s) != 3 or not same_size(s[0], num_experts) or w in routed:
        return None
    return w, seen_transposed


def _as_expert_gemm(node: fx.Node, num_experts: int, routed: set[fx.Node], grouped_targets: tuple
                    ) -> ExpertGemm | None:
    if node.op == "call_function" and node.target in grouped_targets:
        if len(node.args) < 2:
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
        if not is_method(sq, "squeeze"):
            return None
        for mat, vec, transposed in ((a, b, False), (b, a, True)):
            if is_getitem(mat) and isinstance(mat.args[1], fx.Node) and mat.args[1] in routed:
                w = mat.args[0]
                s = shape_of(w)
                if s is not None and len(s) == 3 and same_size(s[0], num_experts) and w not in routed:
                    if not is_method(vec, "unsqueeze"):
                        return None
                    return ExpertGemm(node, sq, vec.args[0], w, transposed=transposed, style="batched_mm")
    return None


def _bias_add(out: fx.Node, num_experts: int, routed: set[fx.Node]) -> tuple[fx.Node, fx.Node | None]:
    """``out + b[sorted_ids]`` (the add of a per-expert bias gathered by routed ids) -> (sum, b)."""
    for u in out.users:
        if is_function(u, torch.add) and u.args[0] is out and isinstance(u.args[1], fx.Node):
            sel = u.args[1]
            if is_getitem(sel) and isinstance(sel.args[1], fx.Node) and sel.args[1] in routed:
                b = sel.args[0]
                s = shape_of(b)
                if s is not None and len(s) == 2 and same_size(s[0], num_experts) and b not in routed:
                    return u, b
    return out, None


def _token_input(act_input: fx.Node, routed: set[fx.Node]) -> fx.Node | None:
    """Walk from the first GEMM's input back to the un-permuted token tensor ``x``."""
    cur = _strip_casts(act_input)
    if is_getitem(cur) and isinstance(cur.args[1], fx.Node) and cur.args[1] in routed:
        cur = cur.args[0]
    elif is_function(cur, torch.index_select) and cur.args[2] in routed:
        cur = cur.args[0]
    elif is_method(cur, "repeat_interleave") or is_function(cur, torch.repeat_interleave):
        cur = cur.args[0]
    else:
        return None
    return cur if cur not in routed else None


def _float_param(x: object) -> tuple[float | None, fx.Node | None]:
    """A constant float, or a runtime scalar node (value at trace time, node)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x), None
    value = runtime_scalar(x)
    return (value, x) if value is not None else (None, None)


def classify_activation(h: fx.Node, a: fx.Node) -> tuple[ActivationSpec, dict[str, fx.Node]] | NoMatch:
    """Classify the elementwise subgraph from the up-GEMM output ``h`` to the down-GEMM input ``a``.

    Returns the spec and the activation parameters that are runtime scalars (graph nodes), which
    the rewrite passes to the op instead of their trace-time values.
    """
    region = descendants([h]) & (ancestors([a]) | {a})
    names = {n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
             for n in region}
    chunk = next((u for u in h.users if is_method(u, "chunk") and u.args[1] == 2
                  and u.kwargs.get("dim", u.args[2] if len(u.args) > 2 else 0) in (-1, 1)), None)
    strided = [u for u in h.users if is_getitem(u) and isinstance(u.args[1], tuple)
               and len(u.args[1]) == 2 and u.args[1][0] is Ellipsis and isinstance(u.args[1][1], slice)]
    steps = sorted((s.args[1][1].start or 0, s.args[1][1].step) for s in strided)
    if chunk is not None:
        layout, gated = "concat", True
    elif steps == [(0, 2), (1, 2)]:
        layout, gated = "interleaved", True
    elif strided:
        return NoMatch("unrecognised gate/up split of the first expert GEMM", partial=True)
    else:
        layout, gated = "concat", False
    if "clamp" in names and "sigmoid" in names:
        if not gated:
            return NoMatch("clamped activation on a non-gated expert", partial=True)
        gate_clamp = next((n for n in region if is_function(n, torch.clamp) and n.kwargs.get("min") is None), None)
        limit, limit_node = _float_param(gate_clamp.kwargs.get("max")) if gate_clamp is not None else (None, None)
        alpha_mul = next((n for n in region if is_function(n, torch.mul) and any(
            is_function(u, torch.sigmoid) for u in n.users) and _float_param(n.args[1])[0] is not None), None)
        alpha, alpha_node = _float_param(alpha_mul.args[1]) if alpha_mul is not None else (1.0, None)
        if limit is None:
            return NoMatch("clamped activation without a recognisable limit", partial=True)
        runtime = {k: v for k, v in (("alpha", alpha_node), ("limit", limit_node)) if v is not None}
        return ActivationSpec("clamped_swiglu", gated=True, layout=layout, alpha=alpha, limit=limit), runtime
    if "silu" in names:
        kind = "silu"
    elif "gelu" in names:
        g = next(n for n in region if n.target is torch.nn.functional.gelu)
        kind = "gelu_tanh" if g.kwargs.get("approximate") == "tanh" else "gelu"
    elif "relu" in names:
        kind = "relu"
    elif "sigmoid" in names and "mul" in names:
        kind = "silu"  # x * sigmoid(x) written out
    else:
        return NoMatch("unrecognised expert activation (ops: %s)", (sorted(names),), partial=True)
    return ActivationSpec(kind, gated=gated, layout=layout), {}


def _combine_output(y: fx.Node, n_tokens, hidden, allowed: set[fx.Node]) -> fx.Node | None:
    """Follow the single-user chain after the down GEMM (weighting, un-permuting, reshaping) to
    the reduction over the K slots of each token, ``view(N, K, H).sum(1)``, plus trailing casts.

    Only operands derived from the routing may join the chain: a residual or shared-expert add
    ends it, so a model's own post-processing (``* scale``) is never swallowed into the site.
    """
    cur = y
    for _ in range(12):
        if len(cur.users) != 1:
            return None
        u = next(iter(cur.users))
        if any(a not in allowed and tensor_meta(a) is not None for a in u.all_input_nodes if a is not cur):
            return None
        if (is_function(u, torch.sum) and u.args[1] in (1, -2) and not u.kwargs.get("keepdim")
                and same_shape(shape_of(u), (n_tokens, hidden))):
            out = u
            while len(out.users) == 1 and _is_cast(next(iter(out.users))):
                out = next(iter(out.users))
            return out
        cur = u
    return None


def match_experts(graph: fx.Graph, ids: fx.Node, weights: fx.Node, num_experts: int, top_k: int
                  ) -> ExpertsMatch | NoMatch:
    """Match the expert computation fed by ``(weights, ids)``."""
    routed = descendants([ids])
    routed_or_weighted = routed | descendants([weights]) | {ids, weights}
    grouped_targets = _grouped_mm_targets()
    gemms: list[ExpertGemm] = []
    for n in graph.nodes:
        if n in routed:
            g = _as_expert_gemm(n, num_experts, routed, grouped_targets)
            if g is not None:
                gemms.append(g)
                if len(gemms) == 2:
                    break
    if not gemms:
        return NoMatch("top-k indices are not consumed by an expert dispatch (e.g. an auxiliary loss)")
    if len(gemms) < 2:
        return NoMatch("found one expert GEMM, expected an up and a down projection", partial=True)
    up, down = gemms
    if up.style != down.style:
        return NoMatch("expert GEMMs of mixed styles (%s, %s)", (up.style, down.style), partial=True)
    h, b_up = _bias_add(up.out, num_experts, routed)
    if down.act_input not in descendants([h]) and down.act_input is not h:
        return NoMatch("the second expert GEMM does not consume the first one's output", partial=True)
    y, b_down = _bias_add(down.out, num_experts, routed)
    x = _token_input(up.act_input, routed)
    n_tokens = shape_of(ids)[0]
    if x is None or not same_size(shape_of(x)[0], n_tokens) or len(shape_of(x)) != 2:
        return NoMatch("could not find the [N, H] token input of the first expert GEMM", partial=True)
    hidden = shape_of(x)[1]
    w_up_s, w_down_s = shape_of(up.weight), shape_of(down.weight)
    up_in, up_out = (w_up_s[1], w_up_s[2]) if up.transposed else (w_up_s[2], w_up_s[1])
    down_in, down_out = (w_down_s[1], w_down_s[2]) if down.transposed else (w_down_s[2], w_down_s[1])
    if not (same_size(up_in, hidden) and same_size(down_out, hidden)):
        return NoMatch("expert weight shapes %s / %s do not fit hidden size %s", (w_up_s, w_down_s, hidden),
                       partial=True)
    ffn = static_int(down_in)
    classified = classify_activation(h, _strip_casts(down.act_input))
    if isinstance(classified, NoMatch):
        return classified
    act, runtime_scalars = classified
    if ffn is None or static_int(up_out) != (2 * ffn if act.gated else ffn):
        return NoMatch("first GEMM width %s does not fit FFN %s (gated=%s)", (up_out, down_in, act.gated),
                       partial=True)
    allowed = routed_or_weighted | {y}
    out = _combine_output(y, n_tokens, hidden, allowed)
    if out is None:
        return NoMatch("could not find where the expert outputs are combined back to [N, H]", partial=True)
    boundary = {ids, weights, x, up.weight, down.weight} | {b for b in (b_up, b_down) if b is not None} | set(
        runtime_scalars.values())
    upstream = ancestors(boundary) | boundary
    region_set = (ancestors([out]) | {out}) - upstream
    if weights not in ancestors([out]):
        return NoMatch("the expert combine does not use the site's routing weights", partial=True)
    for n in region_set:
        if n.op == "placeholder" and tensor_meta(n) is not None:
            return NoMatch("the expert computation also reads tensor input %s", (n.name,), partial=True)
        if n.op == "get_attr":
            return NoMatch("the expert computation reads module attribute %s", (n.target,), partial=True)
        mutated = mutated_arg(n)
        if mutated is not None and mutated not in region_set:
            return NoMatch("%s mutates %s, outside the expert computation", (n.name, mutated.name), partial=True)
    region = [n for n in graph.nodes if n in region_set]
    spec = ExpertsSpec(
        style=up.style, num_experts=num_experts, top_k=top_k, hidden_size=static_int(hidden) or -1, ffn_size=ffn,
        activation=act, up_transposed=up.transposed, down_transposed=down.transposed,
        has_bias=b_up is not None or b_down is not None, compute_dtype=dtype_of(up.weight),
        out_dtype=dtype_of(out))
    if (b_up is None) != (b_down is None):
        return NoMatch("only one of the two expert GEMMs has a bias", partial=True)
    return ExpertsMatch(spec=spec, x=x, w_up=up.weight, w_down=down.weight, b_up=b_up, b_down=b_down, output=out,
                        region=region, runtime_scalars=runtime_scalars)


__all__ = ["ExpertsMatch", "ExpertGemm", "match_experts", "classify_activation"]
