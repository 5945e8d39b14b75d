"""Where routing decisions are made: every node that selects experts, found by structure.

An *anchor* is a node that picks, for every token, some of E alternatives: a top-k / max /
argmax over the last dim of a tensor of any rank whose last dim is a constant E (``[N, E]``,
``[B, T, E]``, sequence-first ``[T, B, E]``), a descending ``sort`` / ``argsort`` whose indices
are sliced to the first k, k rounds of ``argmax`` where each round masks the experts already
picked (GShard's top-2), or an integer lookup in a frozen table indexed by token ids (hash
routing). Whether the alternatives are experts is decided later, by what consumes the ids.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from grouter_pass.passes.dataflow import GraphFacts, getitem_of, is_state_input
from grouter_pass.passes.graph_utils import dtype_of, is_function, shape_of, static_int


@dataclass
class Anchor:
    """One routing decision: ``ids`` hold, per token, the indices of the k chosen experts."""

    node: fx.Node                      # the selection call (first round)
    kind: str                          # "topk" | "sort" | "rounds" | "lookup"
    num_experts: int | None            # E (None for a lookup: known from the experts)
    top_k: int
    #: the index outputs: one ``[..., k]`` node, or one ``[...]`` node per round (column j)
    ids: list[fx.Node]
    #: the tensor selected from (``[..., E]``); None for a lookup
    selection_input: fx.Node | None
    sorted: bool = True
    rounds: list[fx.Node] = field(default_factory=list)

    @property
    def token_shape(self) -> tuple:
        s = shape_of(self.ids[0])
        return tuple(s[:-1]) if self.kind in ("topk", "sort", "lookup") and len(self.ids) == 1 else tuple(s)


def _last_dim(dim: object, node: fx.Node) -> bool:
    s = shape_of(node)
    return s is not None and isinstance(dim, int) and (dim == -1 or dim == len(s) - 1)


def _experts_dim(node: fx.Node) -> int | None:
    s = shape_of(node)
    if s is None or not s:
        return None
    e = static_int(s[-1])
    return e if e is not None and e >= 2 else None


def _topk_anchor(n: fx.Node) -> Anchor | None:
    x = n.args[0]
    e = _experts_dim(x)
    k = static_int(n.args[1]) if len(n.args) > 1 else None
    if e is None or k is None or not 1 <= k <= e:
        return None
    if not _last_dim(n.kwargs.get("dim", -1), x) or n.kwargs.get("largest", True) is not True:
        return None
    ids = getitem_of(n, 1)
    if ids is None:
        return None
    return Anchor(n, "topk", e, k, [ids], x, sorted=bool(n.kwargs.get("sorted", True)))


def _leading_slice(node: fx.Node, rank: int) -> int | None:
    """``t[..., :k]`` / ``t[:, :k]`` / ``t.narrow(-1, 0, k)`` of a rank-``rank`` tensor -> k."""
    if is_function(node, operator.getitem):
        idx = node.args[1]
        items = idx if isinstance(idx, tuple) else (idx,)
        if items and items[0] is Ellipsis:
            items = items[1:]
            lead = []
        else:
            lead = list(items[:-1])
            items = items[-1:]
            if len(lead) != rank - 1 or any(not (isinstance(s, slice) and s == slice(None)) for s in lead):
                return None
        if len(items) != 1 or not isinstance(items[0], slice):
            return None
        s = items[0]
        if s.start not in (None, 0) or s.step not in (None, 1):
            return None
        return static_int(s.stop)
    if node.op == "call_method" and node.target == "narrow" and len(node.args) == 4:
        _, dim, start, length = node.args
        if dim in (-1, rank - 1) and start == 0:
            return static_int(length)
    return None


def _sort_anchor(n: fx.Node) -> Anchor | None:
    x = n.args[0]
    e = _experts_dim(x)
    if e is None or not n.kwargs.get("descending", False) or not _last_dim(n.kwargs.get("dim", -1), x):
        return None
    idx = n if n.target is torch.argsort else getitem_of(n, 1)
    if idx is None:
        return None
    rank = len(shape_of(x))
    for u in idx.users:
        k = _leading_slice(u, rank)
        if k is not None and 1 <= k < e:
            return Anchor(n, "sort", e, k, [u], x, sorted=True)
    return None


def _argmax_ids(n: fx.Node) -> fx.Node | None:
    if is_function(n, torch.argmax):
        return n
    return getitem_of(n, 1)


def _is_argmax_like(n: fx.Node) -> bool:
    if is_function(n, torch.argmax):
        return n.kwargs.get("dim") is not None and _last_dim(n.kwargs["dim"], n.args[0])
    return is_function(n, torch.max) and len(n.args) > 1 and _last_dim(n.args[1], n.args[0])


def _round_anchors(graph: fx.Graph, facts: GraphFacts, claimed: set[fx.Node]) -> list[Anchor]:
    """argmax / max over ``[..., E]``; a later argmax over the same scores with the earlier
    picks masked out is the next round of the same top-k."""
    singles = [n for n in graph.nodes if _is_argmax_like(n) and _experts_dim(n.args[0]) is not None]
    out = []
    used: set[fx.Node] = set()
    for n in singles:
        if n in used or n in claimed:
            continue
        ids = _argmax_ids(n)
        if ids is None:
            continue
        e = _experts_dim(n.args[0])
        rounds, cur_ids, base = [n], [ids], n.args[0]
        while True:
            # the next round selects from the same scores with the earlier picks masked: its input
            # is computed from those scores and ids alone (not from another layer's states)
            closure = _closure([base, *rounds, *cur_ids], facts)
            nxt = next((m for m in singles if m in closure and m not in used and m not in rounds
                        and _experts_dim(m.args[0]) == e and m.args[0] in closure), None)
            if nxt is None or _argmax_ids(nxt) is None:
                break
            rounds.append(nxt)
            cur_ids = [*cur_ids, _argmax_ids(nxt)]
        used.update(rounds)
        out.append(Anchor(n, "rounds", e, len(rounds), cur_ids, n.args[0], sorted=True, rounds=rounds))
    return out


def _closure(roots: list[fx.Node], facts: GraphFacts, limit: int = 2000) -> set[fx.Node]:
    """Nodes computed from ``roots`` alone (and fresh tensors and scalars), grown forward from
    the roots through users whose every tensor input is already inside."""
    import heapq

    from grouter_pass.passes.dataflow import data_inputs

    inside = set(roots)
    heap = [(facts.position[u], id(u), u) for r in roots for u in r.users]
    heapq.heapify(heap)
    seen: set[fx.Node] = set()
    while heap and len(inside) < limit:
        _, _, n = heapq.heappop(heap)
        if n in seen or n in inside:
            continue
        seen.add(n)
        if n.op not in ("call_function", "call_method"):
            continue
        if all(a in inside or a in facts.fresh for a in data_inputs(n)) and any(a in inside for a in n.all_input_nodes):
            inside.add(n)
            for u in n.users:
                heapq.heappush(heap, (facts.position[u], id(u), u))
    return inside


def _lookup_anchors(graph: fx.Graph, facts: GraphFacts) -> list[Anchor]:
    """``table[token_ids]`` with an integer table held by the model: hash routing."""
    out = []
    for n in graph.nodes:
        if not is_function(n, operator.getitem, torch.index_select, torch.nn.functional.embedding):
            continue
        if is_function(n, operator.getitem):
            table, index = n.args[0], n.args[1]
        elif is_function(n, torch.index_select):
            table, index = n.args[0], n.args[2]
        else:
            index, table = n.args[0], n.args[1]
        if not (isinstance(table, fx.Node) and isinstance(index, fx.Node)):
            continue
        t_dtype, i_dtype = dtype_of(table), dtype_of(index)
        if t_dtype is None or i_dtype is None or t_dtype.is_floating_point or i_dtype.is_floating_point:
            continue
        if t_dtype == torch.bool or not (is_state_input(table) or table in facts.state_derived):
            continue
        ts = shape_of(table)
        k = static_int(ts[1]) if ts is not None and len(ts) == 2 else 1
        if k is None:
            continue
        out.append(Anchor(n, "lookup", None, k, [n], None, sorted=True))
    return out


def find_anchors(graph: fx.Graph, facts: GraphFacts) -> list[Anchor]:
    """Every routing decision of ``graph`` (canonicalized), in graph order."""
    anchors = []
    for n in graph.nodes:
        a = None
        if is_function(n, torch.topk):
            a = _topk_anchor(n)
        elif is_function(n, torch.sort, torch.argsort):
            a = _sort_anchor(n)
        if a is not None:
            anchors.append(a)
    anchors += _round_anchors(graph, facts, set())
    anchors += _lookup_anchors(graph, facts)
    return sorted(anchors, key=lambda a: facts.position[a.node])


__all__ = ["Anchor", "find_anchors"]
