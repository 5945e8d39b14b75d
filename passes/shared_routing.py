"""Grouter, precomputed and hash modes: one routing and one dispatch plan for every MoE layer.

In these modes routing no longer depends on the model's representation, so it is computed once
per step instead of once per layer:

1. :func:`find_token_ids` finds the graph's token-id input by dataflow: the integer placeholder
   that feeds the token-embedding lookup (through views only). No names are read.
2. :func:`check_sites` refuses, naming both values, a source whose E or k differs from a site's,
   or whose vocabulary is smaller than the model's embedding table.
3. :func:`insert_shared_routing` adds at the top of the graph one ``grouter.external_routing``
   call (the frozen Grouter, the hash table, or the routing delivered with the batch) and one
   ``grouter.dispatch_plan``; the rewrite makes every site's experts op consume them.
4. :func:`remove_router_remnants` deletes what the routers leave behind: the router linears
   (now dead) and auxiliary losses computed only from router logits (balance / z losses), which
   are replaced by a zero of the same dtype where they join the model's loss, with a log line.
   Router logits the model *returns* as tensors cannot be removed that way; they are kept and
   the report says so. The parameters that lost every use are reported, so
   :func:`grouter_pass.trainable_parameters` can leave them out of the optimizer.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from grouter_pass.passes.graph_utils import (
    descendants,
    dtype_of,
    is_view,
    meta_val,
    module_path,
    same_size,
    shape_of,
    target_name,
)
from grouter_pass.spec import NoMatch

log = logging.getLogger(__name__)

_EMBEDDING_INDEX_ARG = {F.embedding: 0, torch.embedding: 1, torch.ops.aten.embedding.default: 1}


def _strip_views(node: fx.Node) -> fx.Node:
    while isinstance(node, fx.Node) and node.op != "placeholder" and (is_view(node) or target_name(node) in (
            "Tensor.long", "Tensor.int", "Tensor.to", "Tensor.contiguous")) and node.args:
        node = node.args[0]
    return node


def find_token_ids(graph: fx.Graph) -> fx.Node | NoMatch:
    """The integer graph input that feeds the token embedding lookup (``[B, S]`` token ids)."""
    found: list[fx.Node] = []
    for n in graph.nodes:
        if n.op != "call_function" or n.target not in _EMBEDDING_INDEX_ARG:
            continue
        idx = n.args[_EMBEDDING_INDEX_ARG[n.target]] if len(n.args) > _EMBEDDING_INDEX_ARG[n.target] else None
        src = _strip_views(idx) if isinstance(idx, fx.Node) else None
        dtype = dtype_of(src) if src is not None else None
        if src is not None and src.op == "placeholder" and dtype is not None and not dtype.is_floating_point:
            found.append(src)
    if not found:
        return NoMatch("the graph has no token-id input (no embedding lookup reads an integer graph input; "
                       "a model fed inputs_embeds?)")
    return found[0]


def embedding_rows(graph: fx.Graph, token_ids: fx.Node) -> int | None:
    """The vocabulary size of the embedding table ``token_ids`` indexes (its row count)."""
    for n in graph.nodes:
        if n.op == "call_function" and n.target in _EMBEDDING_INDEX_ARG:
            pos = _EMBEDDING_INDEX_ARG[n.target]
            if len(n.args) > pos and isinstance(n.args[pos], fx.Node) and _strip_views(n.args[pos]) is token_ids:
                weight = n.args[1 - pos]
                shape = shape_of(weight)
                if shape is not None and isinstance(shape[0], int):
                    return shape[0]
    return None


def check_sites(sites: list[Any], routing: Any, vocab_rows: int | None) -> None:
    """Refuse a routing source that does not fit the model, naming both values."""
    want_e = getattr(routing, "num_experts", None)
    want_k = getattr(routing, "top_k", None)
    for site in sites:
        spec = site.gating.spec
        if routing.kind == "hash":
            if want_e is not None and want_e > spec.num_experts:
                raise ValueError(f"the hash table routes to expert {want_e - 1} but site {site.module_path} "
                                 f"has E={spec.num_experts} experts")
        elif want_e is not None and want_e != spec.num_experts:
            raise ValueError(f"the {routing.kind} routing has E={want_e} experts but site {site.module_path} "
                             f"has E={spec.num_experts} (fold or expand the Grouter to E={spec.num_experts})")
        if want_k is not None and want_k != spec.top_k:
            raise ValueError(f"the {routing.kind} routing selects k={want_k} experts per token but site "
                             f"{site.module_path} uses k={spec.top_k}")
    vocab = getattr(routing, "vocab_size", None)
    if vocab is not None and vocab_rows is not None and vocab_rows > vocab:
        raise ValueError(f"the model's token embedding has vocab {vocab_rows} rows but the {routing.kind} "
                         f"routing covers vocab_size={vocab}: token ids >= {vocab} cannot be routed")


@dataclass
class SharedRouting:
    tokens: fx.Node          # what the routing reads: the token-id input, or the first site's hidden states
    weights: fx.Node
    ids: fx.Node
    perm: fx.Node
    inv_perm: fx.Node
    counts: fx.Node
    offsets: fx.Node
    added: list[fx.Node] = field(default_factory=list)


def _n_tokens(node: fx.Node, token_dims: int) -> Any:
    shape = shape_of(node)
    return math.prod(shape[:token_dims]) if shape is not None else None


def insert_shared_routing(gm: fx.GraphModule, sites: list[Any], routing: Any, call: Any) -> SharedRouting:
    """Add the one routing call and the one dispatch plan; ``call`` is the rewrite's node factory
    (``rewrite._call``), so the new nodes carry the same metadata as per-site ones."""
    graph = gm.graph
    first = sites[0]
    spec = first.gating.spec
    token_ids = find_token_ids(graph)
    if isinstance(token_ids, NoMatch):
        if routing.needs_token_ids:
            raise ValueError(f"{routing.describe()} routing reads token ids, but {token_ids.detail}; "
                             "only PrecomputedRouting() can route such a model")
        tokens, token_dims = first.experts.x, shape_of(first.experts.x).__len__() - 1
        anchor = tokens
    else:
        tokens, token_dims = token_ids, len(shape_of(token_ids))
        anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
    check_sites(sites, routing, embedding_rows(graph, token_ids) if not isinstance(token_ids, NoMatch) else None)
    n_tokens = _n_tokens(tokens, token_dims)
    for site in sites:
        n_site = _n_tokens(site.experts.x, len(shape_of(site.experts.x)) - 1)
        if n_tokens is None or n_site is None or not same_size(n_site, n_tokens):
            raise ValueError(f"site {site.module_path} routes {n_site} tokens but the routing input "
                             f"{tokens.name} has {n_tokens}: cannot share one routing")
    before = set(graph.nodes)
    with graph.inserting_before(anchor.next):
        weights, ids = call(graph, torch.ops.grouter.external_routing.default,
                            (tokens, routing.key, token_dims, spec.top_k), {}, like=first.gating.weights,
                            role="router", names=("routing_weights", "expert_ids"))
    with graph.inserting_before(ids.next):
        perm, inv_perm, counts, offsets = call(
            graph, torch.ops.grouter.dispatch_plan.default, (ids, spec.num_experts), {}, like=first.gating.ids,
            role="dispatch_plan", names=("perm", "inv_perm", "expert_counts", "expert_offsets"))
    for n in graph.nodes:   # the shared nodes belong to no layer
        if n not in before:
            n.meta.pop("nn_module_stack", None)
    return SharedRouting(tokens, weights, ids, perm, inv_perm, counts, offsets,
                         [n for n in graph.nodes if n not in before])


# ------------------------------------------------------------------------------------------------
# what the routers leave behind
# ------------------------------------------------------------------------------------------------

_KEEP = {operator.setitem, torch._C._set_grad_enabled}


def _removable(node: fx.Node) -> bool:
    if node.op not in ("call_function", "call_method") or node.users:
        return False
    if node.op == "call_method" and str(node.target).endswith("_"):
        return False
    if node.target in _KEEP or getattr(node.target, "__name__", "") in ("_set_grad_enabled",):
        return False
    return not node.is_impure()


@dataclass
class Remnants:
    removed: list[str] = field(default_factory=list)          # node names deleted
    aux_losses: list[str] = field(default_factory=list)       # one line per aux loss replaced by zero
    kept: list[str] = field(default_factory=list)             # router outputs that had to stay
    zeroed: list[str] = field(default_factory=list)           # returned router logits, now zeros
    dead_placeholders: list[fx.Node] = field(default_factory=list)


def _zero_logits_like(graph: fx.Graph, logits: fx.Node, token_like: fx.Node) -> fx.Node | None:
    """``[N, E]`` zeros built from the shared routing (``token_like``: ``[N, k]``), so they do not
    depend on the router: what a caller that reads returned router logits gets in Grouter modes."""
    shape, val = shape_of(logits), meta_val(logits)
    if shape is None or len(shape) != 2 or not same_size(shape[0], shape_of(token_like)[0]):
        return None
    with graph.inserting_before(token_like.next):
        col = graph.call_function(operator.getitem, (token_like, (slice(None), slice(0, 1))))
        zero = graph.call_method("new_zeros", (col, (1, 1)), {"dtype": val.dtype})
        wide = graph.call_method("expand", (zero, -1, shape[1]))
    one = val.new_zeros((1, 1))
    for n, v in ((col, meta_val(token_like)[:, :1]), (zero, one), (wide, one.expand(shape[0], shape[1]))):
        n.meta["example_value"] = v
        n.meta["grouter_role"] = "router"
    return wide


def remove_router_remnants(gm: fx.GraphModule, seeds: list[fx.Node], activations: list[fx.Node],
                           token_like: fx.Node | None = None) -> Remnants:
    """Delete the router linears and loss terms computed only from router logits (``seeds``).

    A node is *router-only* when every tensor it reads is a seed, router-only, or independent
    of the model's activations (``activations``: each site's expert input; e.g. the attention
    mask the balance loss reads). Where a router-only scalar meets the rest of the graph (the
    loss sum, a returned ``aux_loss``) it is replaced by zero; a router-only tensor that is not a
    scalar (returned router logits) is kept, and reported."""
    graph = gm.graph
    out = Remnants()
    acts = set(activations) | descendants(activations)
    seed_set = set(seeds)
    router_only: set[fx.Node] = set()
    downstream = descendants(seeds)
    for n in graph.nodes:
        if n not in downstream or n.op == "output":
            continue
        if all(i in seed_set or i in router_only or i not in acts for i in n.all_input_nodes):
            router_only.add(n)
    zero_cache: dict[tuple, fx.Node] = {}
    for n in [x for x in graph.nodes if x in router_only or x in seed_set]:
        outside = [u for u in n.users if u not in router_only]
        if not outside:
            continue
        val = meta_val(n)
        scalar = isinstance(val, torch.Tensor) and val.dim() == 0 and val.dtype.is_floating_point
        if not scalar:
            returned = all(u.op == "output" for u in outside)
            zeros = _zero_logits_like(graph, n, token_like) if returned and n in seed_set and token_like else None
            if zeros is None:
                out.kept.append(f"{n.name} ({module_path(n) or 'model'}) is read by "
                                f"{', '.join(u.name for u in outside)}")
                continue
            for u in outside:
                u.replace_input_with(n, zeros)
            out.zeroed.append(f"{n.name} ({module_path(n) or 'model'})")
            continue
        key = (val.dtype, str(val.device))
        if key not in zero_cache:
            with graph.inserting_before(n):
                z = graph.call_function(torch.zeros, ((),), {"dtype": val.dtype, "device": val.device})
            z.meta["example_value"] = val.new_zeros(()) if hasattr(val, "new_zeros") else None
            z.meta["grouter_role"] = "combine"
            zero_cache[key] = z
        for u in outside:
            u.replace_input_with(n, zero_cache[key])
        out.aux_losses.append(f"{n.name} ({module_path(n) or 'model'})")
    # delete dead nodes upstream of and including the seeds / router-only nodes
    scope = seed_set | router_only
    for s in seeds:
        stack = [s]
        while stack:
            x = stack.pop()
            for i in x.all_input_nodes:
                if i.op != "placeholder":
                    scope.add(i)
    changed = True
    while changed:
        changed = False
        for n in reversed(list(graph.nodes)):
            if n in scope and _removable(n):
                out.removed.append(n.name)
                graph.erase_node(n)
                scope.discard(n)
                changed = True
    out.dead_placeholders = [n for n in graph.nodes if n.op == "placeholder" and not n.users
                             and isinstance(meta_val(n), torch.Tensor)]
    return out


__all__ = ["Remnants", "SharedRouting", "check_sites", "embedding_rows", "find_token_ids", "insert_shared_routing",
           "remove_router_remnants"]
