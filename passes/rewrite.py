"""Exact-mode rewrite: each detected site becomes three ``grouter`` ops with the same numbers.

Before (one site, transformers grouped_mm, after canonicalization)::

    logits --softmax/sigmoid/bias/group-mask/topk/gather/renorm/scale--> weights, ids
    ids --reshape/sort--> perm --//K--> x[.] --grouped_mm--> act --grouped_mm--> * weights[perm]
        --[inv_perm]--> view(N, K, H).sum(1) --> out

After::

    weights, ids = grouter.route(logits, bias, <GatingSpec fields>)
    perm, inv_perm, counts, offsets = grouter.dispatch_plan(ids, E)
    out, h = grouter.moe_experts(x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down,
                                 <ExpertsSpec fields>)

The router linear stays (Inductor keeps its GEMM, and any other reader of the logits, such as
an auxiliary loss, still works). Other readers of the old ``weights`` / ``ids`` are moved to the
new ones (same values). Region nodes left without users are erased; every new node gets its
``example_value`` from the op's fake implementation and the module stack of the code it replaces,
and is tagged ``meta["grouter_role"]`` (router / dispatch_plan / experts) for inspection.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._dynamo.utils import counters

import grouter_pass.ops  # noqa: F401  (registers torch.ops.grouter)
from grouter_pass.passes.detect import Site, route_insertion_point
from grouter_pass.passes.expert_parallel import (
    EPLayout,
    emit_ep_experts,
    insert_physical_ids,
    refuse_unreplaced_shards,
)
from grouter_pass.passes.graph_utils import fake_mode_of, meta_val

log = logging.getLogger(__name__)

_KEEP_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "seq_nr")


def _call(graph: fx.Graph, target: Any, args: tuple, kwargs: dict, *, like: fx.Node, role: str,
          names: tuple[str, ...]) -> list[fx.Node]:
    """Insert ``target(*args, **kwargs)`` plus one getitem per output (named ``names``: the
    graph diff then reads ``expert_ids = getitem(grouter_route, 1)``), with metadata."""
    node = graph.call_function(target, args, kwargs)
    node._rename(f"grouter_{target._opname}" if hasattr(target, "_opname") else "grouter_call")
    for key in _KEEP_META:
        if key in like.meta:
            node.meta[key] = like.meta[key]
    node.meta["grouter_role"] = role
    fake_args = fx.node.map_arg(args, meta_val)
    fake_kwargs = fx.node.map_arg(kwargs, meta_val)
    mode = fake_mode_of(pytree.tree_leaves((fake_args, fake_kwargs)))
    val = None
    if mode is not None:
        with mode:
            val = target(*fake_args, **fake_kwargs)
        node.meta["example_value"] = val
    outs = []
    for i, name in enumerate(names):
        item = graph.call_function(operator.getitem, (node, i))
        item._rename(name)
        item.meta.update({k: node.meta[k] for k in (*_KEEP_META, "grouter_role") if k in node.meta})
        if val is not None:
            item.meta["example_value"] = val[i]
        outs.append(item)
    return outs


def _node(graph: fx.Graph, target: Any, args: tuple, kwargs: dict, *, like: fx.Node, role: str) -> fx.Node:
    """Insert one plain torch call with metadata (a single-output :func:`_call`)."""
    node = graph.call_function(target, args, kwargs)
    for key in _KEEP_META:
        if key in like.meta:
            node.meta[key] = like.meta[key]
    node.meta["grouter_role"] = role
    fake_args = fx.node.map_arg(args, meta_val)
    fake_kwargs = fx.node.map_arg(kwargs, meta_val)
    mode = fake_mode_of(pytree.tree_leaves((fake_args, fake_kwargs)))
    if mode is not None:
        with mode:
            node.meta["example_value"] = target(*fake_args, **fake_kwargs)
    return node


def rewrite_site(graph: fx.Graph, site: Site, shared: Any = None, ep: Any = None, step_key: int | None = None,
                 site_index: int = 0) -> list[str]:
    """Rewrite one site in place; returns the (caller-graph) names of the nodes it removed.

    ``shared`` (a :class:`~grouter_pass.passes.shared_routing.SharedRouting`): route with the
    step's one routing and dispatch plan instead of the site's own router (Grouter modes).
    ``ep`` (an :class:`~grouter_pass.passes.expert_parallel.EPLayout`): run the experts
    expert-parallel; ``step_key`` names the routing source whose per-step split sizes it reads
    (``None``: exchange counts in the layer)."""
    g, e = site.gating, site.experts
    region = set(g.region) | set(e.region)
    if shared is not None:
        weights, ids, perm, inv_perm, offsets = shared.weights, shared.ids, shared.perm, shared.inv_perm, shared.offsets
        counts = shared.counts
    else:
        # after the last of route's inputs (a runtime scale may be computed late), outside no_grad
        with graph.inserting_before(route_insertion_point(graph, g.parse).next):
            route_kwargs = {**g.spec.route_kwargs(), **g.parse.runtime_scalars}
            weights, ids = _call(graph, torch.ops.grouter.route.default, (g.logits, g.bias), route_kwargs,
                                 like=g.weights, role="router", names=("routing_weights", "expert_ids"))
            perm, inv_perm, counts, offsets = _call(
                graph, torch.ops.grouter.dispatch_plan.default, (ids, g.spec.num_experts), {}, like=g.ids,
                role="dispatch_plan", names=("perm", "inv_perm", "expert_counts", "expert_offsets"))
        if ep is not None and ep.logical_to_physical is not None:
            insert_physical_ids(graph, ids, perm.args[0], ep)
    w = {"w_gate": e.w_gate, "w_up": e.w_up, "b_gate": e.b_gate, "b_up": e.b_up, "w_down": e.w_down, "b_down": e.b_down}
    shards = ep.local_shards(w, g.spec.num_experts, site.module_path) if ep is not None else None
    w = shards or w
    with graph.inserting_before(e.output):
        w_up, b_up = w["w_up"], w["b_up"]
        if w["w_gate"] is not None:  # gate and up were two GEMMs: the op takes [gate; up]
            w_up = _node(graph, torch.cat, ([w["w_gate"], w["w_up"]],), {"dim": 2 if e.spec.up_transposed else 1},
                         like=e.output, role="experts")
            if w["b_gate"] is not None:
                b_up = _node(graph, torch.cat, ([w["b_gate"], w["b_up"]],), {"dim": 1}, like=e.output, role="experts")
        if ep is not None:
            out = emit_ep_experts(graph, x=e.x, weights=weights, perm=perm, counts=counts, w_up=w_up,
                                  w_down=w["w_down"], b_up=b_up, b_down=w["b_down"], num_experts=g.spec.num_experts,
                                  top_k=g.spec.top_k,
                                  op_kwargs={**e.spec.op_kwargs(), **e.runtime_scalars}, layout=ep,
                                  step_key=step_key, site_index=site_index, weights_local=shards is not None,
                                  like=e.output)
        else:
            out, _h = _call(graph, torch.ops.grouter.moe_experts.default,
                            (e.x, weights, perm, inv_perm, offsets, w_up, e.w_down, b_up, e.b_down),
                            {**e.spec.op_kwargs(), **e.runtime_scalars}, like=e.output, role="experts",
                            names=("moe_out", "moe_hidden"))
        if e.combine_base is not None:  # the experts were added into e.g. a shared expert's output
            out = _node(graph, torch.add, (e.combine_base, out), {}, like=e.output, role="combine")
    e.output.replace_all_uses_with(out)
    for old, new in ((g.weights, weights), (g.ids, ids)):
        for user in list(old.users):
            if user not in region:
                user.replace_input_with(old, new)
    removed = []
    for node in reversed([n for n in graph.nodes if n in region]):
        if not node.users and node.op not in ("placeholder", "output"):
            removed.append(node.meta.get("grouter_origin", node.name))
            graph.erase_node(node)
    counters["grouter"]["nodes_replaced"] += len(removed)
    return removed[::-1]


def _expert_parallel_layout(gm: fx.GraphModule, sites: list[Site], config: Any, *, per_step: bool
                            ) -> EPLayout | None:
    """The EP layout when ``config.expert_parallel`` is set, every site checked against it."""
    if config is None or getattr(config, "expert_parallel", None) is None or not sites:
        return None
    layout = EPLayout.from_config(config)
    for site in sites:
        layout.check_site(site.gating.spec.num_experts, site.module_path, config.expert_placement)
    gm.meta["grouter_report"].expert_parallel = layout.describe(per_step)
    return layout


def rewrite_exact_pass(gm: fx.GraphModule, example_inputs: Any = None, *, config: Any = None) -> fx.GraphModule:
    """Rewrite every site the detection pass recorded in ``gm.meta["grouter_sites"]``."""
    pairs = gm.meta.pop("grouter_sites", [])
    ep = _expert_parallel_layout(gm, [site for site, _ in pairs], config, per_step=False)
    for index, (site, report) in enumerate(pairs):
        before = set(gm.graph.nodes)
        report.removed_nodes = rewrite_site(gm.graph, site, ep=ep, site_index=index)
        report.added_nodes = {n.name: n.meta["grouter_role"] for n in gm.graph.nodes
                              if n not in before and "grouter_role" in n.meta}
        report.new_ops = ["grouter.route", "grouter.dispatch_plan",
                          "ep_experts_in_graph (all_to_all_single)" if ep else "grouter.moe_experts"]
        report.rewritten = True
        counters["grouter"]["sites_rewritten"] += 1
    refuse_unreplaced_shards(gm, ep is not None)
    return gm


def rewrite_shared_pass(gm: fx.GraphModule, example_inputs: Any = None, *, config: Any) -> fx.GraphModule:
    """Grouter / precomputed / hash modes: one routing and one dispatch plan for all sites,
    routers and router-only losses removed (see :mod:`grouter_pass.passes.shared_routing`)."""
    from grouter_pass.passes.shared_routing import insert_shared_routing, remove_router_remnants

    pairs = gm.meta.pop("grouter_sites", [])
    if not pairs:
        refuse_unreplaced_shards(gm, config.expert_parallel is not None)
        return gm
    sites = [site for site, _ in pairs]
    used_before = {n for n in gm.graph.nodes if n.op == "placeholder" and n.users}
    ep = _expert_parallel_layout(gm, sites, config, per_step=True)
    shared = insert_shared_routing(gm, sites, config.routing, _call)
    report_all = gm.meta["grouter_report"]
    if ep is not None:
        if ep.logical_to_physical is not None:
            insert_physical_ids(gm.graph, shared.ids, shared.perm.args[0], ep)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        tokens = shared.tokens
        report_all.ep_step = {"routing": config.routing, "num_experts": sites[0].gating.spec.num_experts,
                              "top_k": sites[0].gating.spec.top_k, "layout": ep,
                              "token_input": placeholders.index(tokens) if tokens in placeholders else None}
    kind = config.routing.kind
    for index, (site, report) in enumerate(pairs):
        before = set(gm.graph.nodes)
        report.removed_nodes = rewrite_site(gm.graph, site, shared, ep=ep, step_key=config.routing.key if ep else None,
                                            site_index=index)
        report.added_nodes = {n.name: n.meta["grouter_role"] for n in gm.graph.nodes
                              if n not in before and "grouter_role" in n.meta}
        report.new_ops = ["ep_experts_in_graph (all_to_all_single)" if ep else "grouter.moe_experts"]
        report.routing = kind
        report.rewritten = True
        counters["grouter"]["sites_rewritten"] += 1
    remnants = remove_router_remnants(gm, [s.gating.logits for s in sites], [s.experts.x for s in sites],
                                      token_like=shared.weights)
    counters["grouter"]["nodes_replaced"] += len(remnants.removed)
    shared_names = {n.name: n.meta["grouter_role"] for n in shared.added}
    report_all.shared = {"routing": config.routing.describe(), "nodes": shared_names,
                         "removed": remnants.removed, "aux_losses": remnants.aux_losses, "kept": remnants.kept,
                         "zeroed_logits": remnants.zeroed}
    dead = [n for n in remnants.dead_placeholders if n in used_before]
    report_all.unused_inputs = [n.name for n in dead]
    report_all.unused_parameters = [ga.example for n in dead
                                    if (ga := n.meta.get("grapharg")) is not None
                                    and isinstance(getattr(ga, "example", None), torch.nn.Parameter)]
    for line in remnants.aux_losses:
        log.info("grouter: removed the auxiliary router loss %s: it was computed only from router logits, "
                 "which %s routing replaces", line, kind)
    for line in remnants.zeroed:
        log.warning("grouter: router logits %s are returned by the graph (e.g. output_router_logits=True, for an "
                    "auxiliary loss computed after a graph break); with %s routing there is no router, so they "
                    "are returned as zeros: a loss computed from them is a constant without gradient. Set "
                    "output_router_logits=False to drop it altogether", line, kind)
    for line in remnants.kept:
        log.warning("grouter: router logits still used: %s; that router linear is kept", line)
    refuse_unreplaced_shards(gm, ep is not None)
    return gm
