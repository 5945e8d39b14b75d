"""Parse the dataflow around a top-k anchor into the parts every gating family is made of.

Input: a canonical ``torch.topk`` node. Output: a :class:`GatingParse` naming the router logits,
the selection chain (casts, score function, selection bias, group-limited mask) and the weight
chain (values or gather, score-over-k, renormalisation, scaling, cast). Family matchers
(``softmax_topk.py``, ...) then decide which combinations they accept and build the
:class:`~grouter_pass.spec.GatingSpec`::

        x_NH --linear(W_EH[, b_E])--> logits_NE          <- must be an E-output linear
          [.to(dtype)] [softmax | sigmoid]                <- selection chain, walked backwards
          [+ bias_E]   [masked_fill(~group_mask, -inf)]      from the anchor's input
          topk(k, dim=-1) --> values_NK, ids_NK           <- the anchor
          [values | scores.gather(1, ids) | softmax(values)]
          [/ (sum|norm [+eps] [clamp_min])] [* c] [.to(dtype)] --> weights_NK   <- weight chain

Anything not on these paths makes the parse fail with a reason; a failure is never a guess.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from grouter_pass.passes.graph_utils import (
    RESHAPE_METHODS,
    dtype_of,
    is_function,
    is_getitem,
    is_method,
    runtime_scalar,
    same_shape,
    same_size,
    shape_of,
    static_int,
)
from grouter_pass.spec import NoMatch

LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear)


@dataclass
class GatingParse:
    anchor: fx.Node
    logits: fx.Node
    num_experts: int
    top_k: int
    ids: fx.Node
    weights: fx.Node
    order: str
    score_func: str
    score_dtype: torch.dtype | None
    score_node: fx.Node | None
    bias: fx.Node | None
    bias_mode: str
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "top2_sum"
    renorm: str = "none"
    renorm_eps: float = 0.0
    renorm_clamp_min: float | None = None
    renorm_p: float = 1.0
    scaling_factor: float = 1.0
    weights_dtype: torch.dtype = torch.float32
    sorted: bool = True
    #: spec fields whose value is a runtime scalar (a SymFloat node: Dynamo turns float module
    #: attributes such as ``routed_scaling_factor`` into graph inputs under ``dynamic=True``). The
    #: spec holds their value at trace time; the rewrite passes the nodes themselves to the op.
    runtime_scalars: dict[str, fx.Node] = field(default_factory=dict)
    #: the weights reach the experts as a dense ``[N, E]`` tensor (zero, or sigmoid(-inf), for
    #: unselected experts), as in Llama 4; ``weights`` is then that dense node
    dense: bool = False
    sparsemixer_threshold: float = 0.0


def _is_reshape_same(node: fx.Node) -> bool:
    """A reshape/view that leaves the shape as it was (``hidden.reshape(-1, H)`` on ``[N, H]``)."""
    return (node.op == "call_method" and node.target in RESHAPE_METHODS
            and same_shape(shape_of(node), shape_of(node.args[0])))


def _is_cast(node: fx.Node) -> bool:
    return is_method(node, "to") and len(node.args) == 2 and isinstance(node.args[1], torch.dtype)


def _last_dim(dim: object, ndim: int) -> bool:
    return isinstance(dim, int) and (dim == -1 or dim == ndim - 1)


def _scalar(x: object) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _parameter_like(node: object) -> bool:
    """A graph input (a lifted parameter) or a module attribute, possibly cast, viewed or
    transposed: what a router weight is. Excludes activations such as attention keys."""
    while isinstance(node, fx.Node) and node.op in ("call_method", "call_function"):
        if _is_cast(node) or is_method(node, "t", "transpose", "view", "reshape", "contiguous") or is_function(
                node, torch.t, torch.transpose):
            node = node.args[0]
        else:
            return False
    return isinstance(node, fx.Node) and node.op in ("placeholder", "get_attr")


def find_router_logits(node: fx.Node) -> fx.Node | None:
    """Walk back from ``node`` through casts and shape-preserving views to the router: a linear
    (``F.linear(x, W[E, H])``) or a matmul (``x @ W[H, E]``) with a parameter as weight."""
    cur = node
    for _ in range(8):
        if is_function(cur, *LINEAR_TARGETS) or is_function(cur, torch.matmul):
            w = cur.args[1] if len(cur.args) > 1 else cur.kwargs.get("weight")
            w_shape, out_shape = shape_of(w), shape_of(cur)
            if w_shape is None or len(w_shape) != 2 or out_shape is None or not _parameter_like(w):
                return None
            experts_dim = w_shape[0] if is_function(cur, *LINEAR_TARGETS) else w_shape[1]
            return cur if same_size(experts_dim, out_shape[-1]) else None
        if _is_cast(cur) or _is_reshape_same(cur):
            cur = cur.args[0]
            continue
        return None
    return None


def _strip(node: fx.Node, casts: list[torch.dtype]) -> fx.Node:
    """Skip casts and shape-preserving views, recording cast dtypes (outermost first)."""
    while isinstance(node, fx.Node) and (_is_cast(node) or _is_reshape_same(node)):
        if _is_cast(node):
            casts.append(node.args[1])
        node = node.args[0]
    return node


def _strip_views(node: object) -> object:
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in (
            RESHAPE_METHODS | {"expand", "expand_as"}):
        node = node.args[0]
    return node


def parse_group_mask(masked: fx.Node, selection: fx.Node) -> tuple[int, int, str] | NoMatch:
    """``masked_fill(sel, ~expand(scatter(zeros_like(gs), 1, topk(gs, tg)[1], 1)), -inf)`` with
    ``gs`` the per-group score of ``sel.view(N, G, E/G)`` -> ``(G, tg, group_score)``."""
    mask = masked.args[1]
    if not is_function(mask, torch.bitwise_not):
        return NoMatch("masked_fill mask is not `~keep` (%s)", (mask,), partial=True)
    keep = mask.args[0]
    casts: list[torch.dtype] = []
    keep = _strip(keep, casts)
    keep = _strip_views(keep)
    if not (is_function(keep, torch.scatter) and keep.args[1] in (1, -1)
            and _scalar(keep.args[3]) == 1.0 and is_function(keep.args[0], torch.zeros_like)):
        return NoMatch("group mask is not scatter(zeros_like(group_scores), 1, group_idx, 1) (%s)", (keep,),
                       partial=True)
    group_scores = keep.args[0].args[0]
    gidx = keep.args[2]
    if not (is_getitem(gidx, 1) and is_function(gidx.args[0], torch.topk) and gidx.args[0].args[0] is group_scores):
        return NoMatch("group index is not top-k of the group scores", partial=True)
    topk_group = static_int(gidx.args[0].args[1])
    # group scores: sum(topk(view(sel, N, G, E/G), 2)[0], -1)  or  amax / max over the group
    if is_function(group_scores, torch.sum) and is_getitem(group_scores.args[0], 0) and is_function(
            group_scores.args[0].args[0], torch.topk) and group_scores.args[0].args[0].args[1] == 2:
        grouped, kind = group_scores.args[0].args[0].args[0], "top2_sum"
    elif is_method(group_scores, "amax") or is_function(group_scores, torch.amax):
        grouped, kind = group_scores.args[0], "max"
    elif is_getitem(group_scores, 0) and is_function(group_scores.args[0], torch.max):
        grouped, kind = group_scores.args[0].args[0], "max"
    else:
        return NoMatch("unrecognised per-group score (%s)", (group_scores,), partial=True)
    g_shape = shape_of(grouped)
    if g_shape is None or len(g_shape) != 3 or _strip_views(grouped) is not _strip_views(selection):
        return NoMatch("group scores are not computed from the selection tensor", partial=True)
    n_group = static_int(g_shape[1])
    if n_group is None or topk_group is None:
        return NoMatch("group count is symbolic", partial=True)
    return n_group, topk_group, kind


def parse_gating(anchor: fx.Node) -> GatingParse | NoMatch:
    """Parse the gating site around ``anchor`` (a canonical ``torch.topk`` node)."""
    if not is_function(anchor, torch.topk):
        return NoMatch("not a top-k")
    sel_in = anchor.args[0]
    in_shape = shape_of(sel_in)
    if in_shape is None or len(in_shape) != 2:
        return NoMatch("top-k input is not a 2-D [tokens, experts] tensor (shape %s)", (in_shape,))
    if not _last_dim(anchor.kwargs.get("dim", -1), 2) or anchor.kwargs.get("largest", True) is not True:
        return NoMatch("top-k is not a largest-k over the last dim")
    top_k = static_int(anchor.args[1])
    if top_k is None:
        return NoMatch("top-k's k is not a constant")
    ids = next((u for u in anchor.users if is_getitem(u, 1)), None)
    values = next((u for u in anchor.users if is_getitem(u, 0)), None)
    if ids is None:
        return NoMatch("top-k indices are unused")

    # ---- selection chain, walked backwards from the anchor's input ----
    casts: list[torch.dtype] = []
    cur = _strip(sel_in, casts)
    if casts and len(set(casts)) > 1:
        return NoMatch("several casts between scores and top-k")
    n_group, topk_group, group_score = 1, 1, "top2_sum"
    if is_function(cur, torch.masked_fill) and _scalar(cur.args[2]) == -math.inf:
        group = parse_group_mask(cur, cur.args[0])
        if isinstance(group, NoMatch):
            return group
        n_group, topk_group, group_score = group
        cur = _strip(cur.args[0], casts)
    selection_node = cur
    bias = None
    if is_function(cur, torch.add) and isinstance(cur.args[1], fx.Node):
        b_shape = shape_of(cur.args[1])
        if b_shape is not None and len(b_shape) == 1 and same_size(b_shape[0], in_shape[1]):
            bias = cur.args[1]
            cur = _strip(cur.args[0], casts)
    score_func, score_node, score_dtype = "none", None, None
    pre_score_casts: list[torch.dtype] = []
    if is_function(cur, torch.softmax):
        if not _last_dim(cur.args[1], 2):
            return NoMatch("softmax is not over the expert dim", partial=True)
        score_func, score_node = "softmax", cur
        if cur.kwargs.get("dtype") is not None:
            pre_score_casts.append(cur.kwargs["dtype"])
        cur = _strip(cur.args[0], pre_score_casts)
    elif is_function(cur, torch.sigmoid):
        score_func, score_node = "sigmoid", cur
        cur = _strip(cur.args[0], pre_score_casts)
    if score_node is not None and casts and casts[0] != dtype_of(score_node):
        return NoMatch("a dtype-changing cast sits between the score function and top-k", partial=True)
    logits = find_router_logits(cur)
    if logits is None:
        return NoMatch("top-k input does not come from an E-output router linear (stopped at %s)", (cur,))
    num_experts = static_int(shape_of(logits)[-1])
    if num_experts is None or not same_size(shape_of(logits)[-1], in_shape[1]):
        return NoMatch("expert count is symbolic or differs from the top-k input")
    # dtype the score function (or top-k) sees: the last cast applied before it
    chain = pre_score_casts if score_node is not None else casts
    score_dtype = chain[0] if chain else None
    if score_dtype is not None and score_dtype == dtype_of(logits):
        score_dtype = None

    # ---- weight chain, walked forwards ----
    order = "score_then_topk"
    bias_mode = "none"
    dense = _dense_scatter(values, ids) if score_node is None else None
    if dense is not None:  # Llama 4: scatter the k logits into -inf, then score the dense [N, E]
        order, start = "topk_then_score", dense
        cur = _next_op_after_casts(dense)
        if is_function(cur, torch.sigmoid) or (is_function(cur, torch.softmax) and _last_dim(cur.args[1], 2)):
            score_func = "sigmoid" if is_function(cur, torch.sigmoid) else "softmax"
            if score_dtype is None and dtype_of(cur.args[0]) != dtype_of(logits):
                score_dtype = dtype_of(cur.args[0])
            start = cur
        else:
            return NoMatch("experts scattered into -inf but never scored", partial=True)
        if bias is not None:
            bias_mode = "score"
    elif score_node is None and values is not None and any(
            is_function(u, torch.softmax, torch.sigmoid) for u in values.users):
        order = "topk_then_score"
        post = next(u for u in values.users if is_function(u, torch.softmax, torch.sigmoid))
        if is_function(post, torch.softmax):
            if not _last_dim(post.args[1], 2):
                return NoMatch("softmax over top-k values is not over k", partial=True)
            score_func = "softmax"
            if post.kwargs.get("dtype") is not None and post.kwargs["dtype"] != dtype_of(values):
                if score_dtype is not None and score_dtype != post.kwargs["dtype"]:
                    return NoMatch("conflicting score dtypes", partial=True)
                score_dtype = post.kwargs["dtype"]
        else:
            score_func = "sigmoid"
        if bias is not None:
            bias_mode = "score"
        start = post
    else:
        gathers = [u for u in ids.users if is_function(u, torch.gather) and u.args[1] in (1, -1)]
        if gathers:
            src = gathers[0].args[0]
            if score_node is not None and _strip_views(src) is score_node:
                bias_mode = "selection" if bias is not None else "none"
            elif _strip_views(src) is selection_node and bias is not None:
                bias_mode = "score"
            elif score_node is None and find_router_logits(src) is logits and bias is None:
                bias_mode = "none"
            else:
                return NoMatch("routing weights are gathered from an unrecognised tensor (%s)", (src,), partial=True)
            start = gathers[0]
        elif values is not None:
            start = values
            if bias is not None:
                bias_mode = "score"
        else:
            return NoMatch("neither top-k values nor a gather provide routing weights", partial=True)

    parse = GatingParse(anchor=anchor, logits=logits, num_experts=num_experts, top_k=top_k, ids=ids,
                        weights=start, order=order, score_func=score_func, score_dtype=score_dtype,
                        score_node=score_node, bias=bias, bias_mode=bias_mode, n_group=n_group,
                        topk_group=topk_group, group_score=group_score,
                        sorted=bool(anchor.kwargs.get("sorted", True)),
                        weights_dtype=dtype_of(start) or torch.float32, dense=dense is not None)
    problem = parse_weight_chain(parse, start)
    return problem if problem is not None else parse


def _is_neg_inf_fill(node: object) -> bool:
    if is_function(node, torch.full_like) and len(node.args) > 1:
        return _scalar(node.args[1]) == -math.inf
    if is_function(node, torch.full) and len(node.args) > 1:
        return _scalar(node.args[1]) == -math.inf
    return False


def _dense_scatter(values: fx.Node | None, ids: fx.Node) -> fx.Node | None:
    """``full_like(logits, -inf).scatter(-1, ids, values)``: the selected logits in a dense [N, E]."""
    if values is None:
        return None
    for u in values.users:
        if (is_function(u, torch.scatter) and u.args[1] in (1, -1) and u.args[2] is ids and u.args[3] is values
                and _is_neg_inf_fill(u.args[0])):
            return u
    return None


def _next_op_after_casts(node: fx.Node) -> fx.Node:
    """Forward through a single-user chain of casts."""
    while len(node.users) == 1 and _is_cast(next(iter(node.users))):
        node = next(iter(node.users))
    return next(iter(node.users)) if len(node.users) == 1 else node


def scalar_or_runtime(parse: GatingParse, field_name: str, value: object) -> float | None:
    """A constant, or a runtime scalar node recorded in ``parse.runtime_scalars``."""
    if isinstance(value, fx.Node):
        hint = runtime_scalar(value)
        if hint is not None:
            parse.runtime_scalars[field_name] = value
        return hint
    return _scalar(value)


def _is_scalar_like(value: object) -> bool:
    return _scalar(value) is not None or runtime_scalar(value) is not None


def _denominator(d: fx.Node, w: fx.Node) -> tuple[str, object, object, float] | None:
    """``sum(w, -1, keepdim=True)`` / ``vector_norm(w, p, -1, keepdim=True)`` with optional
    ``+ eps`` and ``clamp(min=c)`` -> ``(kind, eps, clamp_min, p)`` (eps / clamp_min as constants
    or runtime scalar nodes)."""
    eps, clamp_min = 0.0, None
    if is_function(d, torch.clamp) and d.kwargs.get("max") is None and _is_scalar_like(d.kwargs.get("min")):
        clamp_min = d.kwargs["min"]
        d = d.args[0]
    if is_function(d, torch.add) and _is_scalar_like(d.args[1]):
        eps = d.args[1]
        d = d.args[0]
    if is_function(d, torch.sum) and d.args[0] is w and _last_dim(d.args[1], 2) and d.kwargs.get("keepdim"):
        return "sum", eps, clamp_min, 1.0
    if (is_function(d, torch.linalg.vector_norm) and d.args[0] is w and _last_dim(d.kwargs.get("dim"), 2)
            and d.kwargs.get("keepdim")):
        return "lp", eps, clamp_min, float(d.kwargs.get("ord", 2.0))
    return None


def parse_weight_chain(parse: GatingParse, start: fx.Node) -> NoMatch | None:
    """Follow ``start`` through renorm -> scale -> cast; sets ``parse.weights`` and the spec fields."""
    w = start
    stage = 0  # 0: nothing yet, 1: renormed, 2: scaled, 3: cast
    k_shape = shape_of(start)
    while True:
        nxt = None
        for u in w.users:
            if not same_shape(shape_of(u), k_shape):
                continue
            if is_function(u, torch.div) and u.args[0] is w and isinstance(u.args[1], fx.Node):
                den = _denominator(u.args[1], w)
                if den is not None:
                    if stage >= 1:
                        return NoMatch("routing weights are renormalised after scaling or casting", partial=True)
                    parse.renorm, eps, clamp_min, parse.renorm_p = den
                    parse.renorm_eps = scalar_or_runtime(parse, "renorm_eps", eps)
                    parse.renorm_clamp_min = None if clamp_min is None else scalar_or_runtime(
                        parse, "renorm_clamp_min", clamp_min)
                    nxt, stage = u, 1
                    break
            if is_function(u, torch.mul) and u.args[0] is w and _is_scalar_like(u.args[1]):
                if stage >= 2:
                    return NoMatch("routing weights are scaled twice or after a cast", partial=True)
                parse.scaling_factor = scalar_or_runtime(parse, "scaling_factor", u.args[1])
                nxt, stage = u, 2
                break
            if _is_cast(u) and u.args[0] is w:
                if stage >= 3:
                    return NoMatch("routing weights are cast twice", partial=True)
                nxt, stage = u, 3
                break
        if nxt is None:
            break
        w = nxt
    parse.weights = w
    parse.weights_dtype = dtype_of(w)
    return None


def router_of_top1(anchor: fx.Node) -> fx.Node | None:
    """For a ``max`` / ``argmax`` anchor: the router logits it selects from, walking back through
    casts, a score function, masks (``masked_fill``) and a bias; None when it is no router."""
    cur = anchor.args[0]
    for _ in range(8):
        cur = _strip(cur, [])
        if is_function(cur, torch.softmax, torch.sigmoid, torch.masked_fill):
            cur = cur.args[0]
        elif is_function(cur, torch.add) and isinstance(cur.args[1], fx.Node) and len(shape_of(cur.args[1]) or ()) == 1:
            cur = cur.args[0]
        else:
            return find_router_logits(cur)
    return None


def topk_anchors(graph: fx.Graph) -> list[fx.Node]:
    """Candidate anchors: canonical top-k / max / argmax over the last dim of a 2-D tensor."""
    out = []
    for n in graph.nodes:
        reduces_a_dim = is_function(n, torch.topk) or (is_function(n, torch.max) and len(n.args) > 1) or (
            is_function(n, torch.argmax) and n.kwargs.get("dim") is not None)
        if reduces_a_dim:
            s = shape_of(n.args[0])
            if s is not None and len(s) == 2:
                out.append(n)
    return out


__all__ = ["GatingParse", "parse_gating", "topk_anchors", "find_router_logits", "router_of_top1", "LINEAR_TARGETS"]
