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
from grouter_pass.passes.dataflow import is_fresh
from grouter_pass.passes.detect import Site, route_insertion_point
from grouter_pass.passes.expert_parallel import (
    EPLayout,
    EPStep,
    emit_ep_experts,
    insert_physical_ids,
    refuse_unreplaced_shards,
)
from grouter_pass.passes.graph_utils import (
    dtype_of,
    fake_mode_of,
    meta_val,
    mutated_arg,
    same_shape,
    shape_of,
)
from grouter_pass.passes.pipeline_state import PipelineState
from grouter_pass.spec import PassReport

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


def _reshape(graph: fx.Graph, node: fx.Node, shape: tuple, like: fx.Node, role: str) -> fx.Node:
    return _node(graph, torch.reshape, (node, shape), {}, like=like, role=role)


def _assemble(graph: fx.Graph, parts: list, cat_dim: int, like: fx.Node) -> fx.Node | None:
    """One ``[E, ., .]`` tensor from a site's weight parts: per-expert weights stacked, gate and up
    concatenated (two GEMMs in the model, one in the op)."""
    if not parts:
        return None
    tensors = []
    for ref in parts:
        if ref.stacked:
            tensors.append(_node(graph, torch.stack, (list(ref.nodes),), {}, like=like, role="experts"))
        else:
            tensors.append(ref.nodes[0])
    if len(tensors) == 1:
        return tensors[0]
    return _node(graph, torch.cat, (tensors,), {"dim": cat_dim}, like=like, role="experts")


def _rewire(graph: fx.Graph, site: Site, weights: fx.Node, ids: fx.Node, region: set[fx.Node], after: fx.Node
            ) -> None:
    """Readers of the old routing outside the site (an auxiliary loss, a returned tensor) read the
    new routing when it holds exactly the same values (same dtype, same slot order); others keep
    the nodes they read, which then stay in the graph."""
    position = {n: i for i, n in enumerate(graph.nodes)}
    for old, rel in site.gating.boundary.items():
        if rel.kind == "dense" or not rel.exact_order:
            continue
        src = ids if rel.kind == "ids" else weights
        if dtype_of(old) != dtype_of(src):
            continue
        readers = [u for u in old.users if u not in region and position.get(u, -1) > position[after]]
        if not readers:
            continue
        with graph.inserting_before(readers[0]):
            new = src
            if rel.column is not None:
                new = _node(graph, operator.getitem, (src, (Ellipsis, rel.column)), {}, like=old, role="router")
            new = _node(graph, torch.Tensor.reshape_as, (new, old), {}, like=old, role="router") \
                if not same_shape(shape_of(new), shape_of(old)) else new
        for u in readers:
            if new is not old and old in u.all_input_nodes and u is not new:
                u.replace_input_with(old, new)


def rewrite_site(graph: fx.Graph, site: Site, shared: Any = None, ep: Any = None, step_key: int | None = None,
                 site_index: int = 0) -> list[str]:
    """Rewrite one site in place; returns the (caller-graph) names of the nodes it removed.

    ``shared`` (a :class:`~grouter_pass.passes.shared_routing.SharedRouting`): route with the
    step's one routing and dispatch plan instead of the site's own router (Grouter modes).
    ``ep`` (an :class:`~grouter_pass.passes.expert_parallel.EPLayout`): run the experts
    expert-parallel; ``step_key`` names the routing source whose per-step split sizes it reads
    (``None``: exchange counts in the layer)."""
    g, e = site.gating, site.experts
    spec, espec = g.spec, e.spec
    k, e_route, e_ffn = spec.top_k, spec.num_experts, espec.num_experts
    region = set(g.region) | set(e.region)
    if ep is not None and (e.per_expert or espec.capacity is not None or espec.has_extra_experts):
        raise ValueError(f"site {site.module_path}: expert parallelism supports experts stored as [E, ...] "
                         "tensors without capacity or zero-computation experts; this site has "
                         f"{espec.describe()}")
    if shared is not None:
        if espec.capacity is not None or espec.has_extra_experts:
            raise ValueError(f"site {site.module_path}: shared routing cannot drive a site with capacity-based "
                             f"dispatch or zero-computation experts ({espec.describe()})")
        weights, ids, perm, inv_perm, offsets = shared.weights, shared.ids, shared.perm, shared.inv_perm, shared.offsets
        counts = shared.counts
        after = None
    else:
        after = route_insertion_point(graph, g)
        if isinstance(e.capacity, fx.Node):   # the capacity is a size computed in the graph
            position = {n: i for i, n in enumerate(graph.nodes)}
            if position[e.capacity] > position[after]:
                after = e.capacity
        with graph.inserting_before(after.next):
            if spec.uses_route_op:
                bias = g.bias
                if bias is not None and len(shape_of(bias)) != 1:
                    bias = _reshape(graph, bias, (-1,), g.bias, "router")
                route_kwargs = {**spec.route_kwargs(), **g.runtime_scalars}
                w_r, ids_r = _call(graph, torch.ops.grouter.route.default, (g.cut, bias), route_kwargs,
                                   like=g.anchor, role="router", names=("routing_weights", "expert_ids"))
                weights = _reshape(graph, w_r, (-1, k), g.anchor, "router") if len(shape_of(w_r)) != 2 else w_r
                ids = _reshape(graph, ids_r, (-1, k), g.anchor, "router") if len(shape_of(ids_r)) != 2 else ids_r
                rewire_from = (w_r, ids_r)
            else:
                weights = _reshape(graph, g.weights_node, (-1, k), g.weights_node, "router")
                ids = _reshape(graph, g.ids_node, (-1, k), g.ids_node, "router")
                rewire_from = None
            ffn_w, ffn_ids = weights, ids
            if espec.capacity is not None:
                keep = _node(graph, torch.ops.grouter.capacity_keep.default,
                             (ids, weights, e_route, e.capacity, espec.capacity_priority), {}, like=g.anchor,
                             role="dispatch_plan")
                keep_w = _node(graph, torch.Tensor.to, (keep, dtype_of(weights)), {}, like=g.anchor,
                               role="dispatch_plan")
                ffn_w = _node(graph, torch.mul, (weights, keep_w), {}, like=g.anchor, role="dispatch_plan")
            if espec.has_extra_experts:
                is_ffn = _node(graph, torch.lt, (ids, e_ffn), {}, like=g.anchor, role="dispatch_plan")
                ffn_ids = _node(graph, torch.clamp, (ids,), {"max": e_ffn - 1}, like=g.anchor, role="dispatch_plan")
                ffn_w = _node(graph, torch.mul, (ffn_w, _node(graph, torch.Tensor.to, (is_ffn, dtype_of(weights)), {},
                                                                like=g.anchor, role="dispatch_plan")), {},
                              like=g.anchor, role="dispatch_plan")
            perm, inv_perm, counts, offsets = _call(
                graph, torch.ops.grouter.dispatch_plan.default, (ffn_ids, e_ffn), {}, like=g.anchor,
                role="dispatch_plan", names=("perm", "inv_perm", "expert_counts", "expert_offsets"))
            weights_for_experts = ffn_w
        if ep is not None and ep.logical_to_physical is not None:
            insert_physical_ids(graph, ffn_ids, perm.args[0], ep)
    if shared is not None:
        weights_for_experts = weights
    w = {"w_gate": e.w_gate, "w_up": e.w_up, "b_gate": e.b_gate, "b_up": e.b_up, "w_down": e.w_down, "b_down": e.b_down}
    shards = ep.local_shards(w, e_ffn, site.module_path) if ep is not None else None
    with graph.inserting_before(e.output):
        if shards is not None:
            w_up = shards["w_up"] if shards["w_gate"] is None else _node(
                graph, torch.cat, ([shards["w_gate"], shards["w_up"]],), {"dim": 2 if espec.up_transposed else 1},
                like=e.output, role="experts")
            b_up = shards["b_up"] if shards["b_gate"] is None else _node(
                graph, torch.cat, ([shards["b_gate"], shards["b_up"]],), {"dim": 1}, like=e.output, role="experts")
            w_down, b_down = shards["w_down"], shards["b_down"]
        else:
            w_up = _assemble(graph, e.up, 2 if espec.up_transposed else 1, e.output)
            w_down = _assemble(graph, [e.down], 1, e.output)
            b_up = _assemble(graph, e.up_bias, 1, e.output)
            b_down = _assemble(graph, [e.down_bias] if e.down_bias is not None else [], 1, e.output)
        hidden = espec.hidden_size
        x_flat = e.x if len(shape_of(e.x)) == 2 else _reshape(graph, e.x, (-1, hidden), e.output, "experts")
        if ep is not None:
            out = emit_ep_experts(graph, x=x_flat, weights=weights_for_experts, perm=perm, counts=counts, w_up=w_up,
                                  w_down=w_down, b_up=b_up, b_down=b_down, num_experts=e_ffn, top_k=k,
                                  op_kwargs={**espec.op_kwargs(), **e.runtime_scalars}, layout=ep,
                                  step_key=step_key, site_index=site_index, weights_local=shards is not None,
                                  like=e.output)
        else:
            out, _h = _call(graph, torch.ops.grouter.moe_experts.default,
                            (x_flat, weights_for_experts, perm, inv_perm, offsets, w_up, w_down, b_up, b_down),
                            {**espec.op_kwargs(), **e.runtime_scalars}, like=e.output, role="experts",
                            names=("moe_out", "moe_hidden"))
        if espec.has_extra_experts and espec.extra_experts == "identity":
            is_extra = _node(graph, torch.ge, (ids, e_ffn), {}, like=e.output, role="combine")
            w_extra = _node(graph, torch.mul, (weights, _node(graph, torch.Tensor.to, (is_extra, dtype_of(weights)), {},
                                                              like=e.output, role="combine")), {},
                            like=e.output, role="combine")
            w_sum = _node(graph, torch.sum, (w_extra, -1), {"keepdim": True}, like=e.output, role="combine")
            ident = _node(graph, torch.mul, (w_sum, x_flat), {}, like=e.output, role="combine")
            ident = _node(graph, torch.Tensor.to, (ident, dtype_of(out)), {}, like=e.output, role="combine")
            out = _node(graph, torch.add, (out, ident), {}, like=e.output, role="combine")
        if e.combine_base is not None:  # the experts were added into e.g. a shared expert's output
            base = e.combine_base if len(shape_of(e.combine_base)) == 2 else _reshape(
                graph, e.combine_base, (-1, hidden), e.output, "combine")
            out = _node(graph, torch.add, (base, out), {}, like=e.output, role="combine")
        if not same_shape(shape_of(out), shape_of(e.output)):
            if site.output_like is not None:
                out = _node(graph, torch.Tensor.reshape_as, (out, site.output_like), {}, like=e.output, role="combine")
            else:
                target = tuple(d if isinstance(d, int) else -1 for d in shape_of(e.output))
                out = _reshape(graph, out, target, e.output, "combine")
        if dtype_of(out) != dtype_of(e.output):
            out = _node(graph, torch.Tensor.to, (out, dtype_of(e.output)), {}, like=e.output, role="combine")
    _replace_output(graph, e.output, out)
    if shared is None and rewire_from is not None:
        _rewire(graph, site, *rewire_from, region, after)
    # accumulators the region filled in place (``out = zeros_like(x); out.index_add_(...)``) are
    # the region's own once their readers read the new output
    for node in list(graph.nodes):
        if is_fresh(node) and node.users and all(u in region for u in node.users):
            region.add(node)
        # what reads only the region (Dynamo's checks on its data-dependent sizes: a getitem of
        # nonzero's output, sym_size, >= 0, _assert_scalar) goes with it when nothing else reads it
        elif node.op in ("call_function", "call_method") and node.all_input_nodes and all(
                a in region for a in node.all_input_nodes):
            region.add(node)
    removed = []
    for node in reversed([n for n in graph.nodes if n in region]):
        if not node.users and node.op not in ("placeholder", "output") and not _mutation_still_read(node, region):
            removed.append(node.meta.get("grouter_origin", node.name))
            graph.erase_node(node)
    counters["grouter"]["nodes_replaced"] += len(removed)
    return removed[::-1]


def _replace_output(graph: fx.Graph, old: fx.Node, new: fx.Node) -> None:
    """Readers of the experts' output read the new one. When the output is an in-place update
    (``out.index_add_(...)`` whose result the model never names), its readers are those of the
    updated tensor after the update."""
    old.replace_all_uses_with(new)
    base = mutated_arg(old)
    while base is not None:
        position = {n: i for i, n in enumerate(graph.nodes)}
        for user in list(base.users):
            if user is not new and position[user] > position[old] and user.meta.get("grouter_role") is None:
                user.replace_input_with(base, new)
        base = mutated_arg(base) if base.op in ("call_method", "call_function") else None


def _mutation_still_read(node: fx.Node, region: set[fx.Node]) -> bool:
    """An in-place update that must stay: of a tensor outside the region (a buffer the model
    updates, e.g. per-expert token counts for load balancing), or one something still reads
    afterwards."""
    base = mutated_arg(node)
    if base is None:
        return False
    if base not in region:
        return True
    # erased in reverse graph order: the readers after it that are dead are gone by now
    position = {n: i for i, n in enumerate(node.graph.nodes)}
    return any(position[u] > position[node] for u in base.users)


def _expert_parallel_layout(report: PassReport, sites: list[Site], config: Any, *, per_step: bool
                            ) -> EPLayout | None:
    """The EP layout when ``config.expert_parallel`` is set, every site checked against it."""
    if config is None or getattr(config, "expert_parallel", None) is None or not sites:
        return None
    layout = EPLayout.from_config(config)
    for site in sites:
        layout.check_site(site.gating.spec.num_experts, site.module_path, config.expert_placement)
    report.expert_parallel = layout.describe(per_step)
    return layout


def rewrite_exact_pass(gm: fx.GraphModule, example_inputs: Any = None, *, config: Any = None,
                       state: PipelineState | None = None) -> fx.GraphModule:
    """Rewrite every site the detection pass recorded in ``state``."""
    state = state if state is not None else PipelineState()
    pairs = state.take_sites()
    ep = _expert_parallel_layout(state.report, [site for site, _ in pairs], config, per_step=False)
    for index, (site, report) in enumerate(pairs):
        before = set(gm.graph.nodes)
        report.removed_nodes = rewrite_site(gm.graph, site, ep=ep, site_index=index)
        report.added_nodes = {n.name: n.meta["grouter_role"] for n in gm.graph.nodes
                              if n not in before and "grouter_role" in n.meta}
        report.new_ops = (["grouter.route"] if site.gating.spec.uses_route_op else []) + (
            ["grouter.capacity_keep"] if site.experts.spec.capacity is not None else []) + [
            "grouter.dispatch_plan", "ep_experts_in_graph (all_to_all_single)" if ep else "grouter.moe_experts"]
        report.rewritten = True
        counters["grouter"]["sites_rewritten"] += 1
    refuse_unreplaced_shards(gm, ep is not None)
    return gm


def rewrite_shared_pass(gm: fx.GraphModule, example_inputs: Any = None, *, config: Any,
                        state: PipelineState | None = None) -> fx.GraphModule:
    """Grouter / precomputed / hash modes: one routing and one dispatch plan for all sites,
    routers and router-only losses removed (see :mod:`grouter_pass.passes.shared_routing`)."""
    from grouter_pass.passes.shared_routing import insert_shared_routing, remove_router_remnants

    state = state if state is not None else PipelineState()
    pairs = state.take_sites()
    if not pairs:
        refuse_unreplaced_shards(gm, config.expert_parallel is not None)
        return gm
    sites = [site for site, _ in pairs]
    used_before = {n for n in gm.graph.nodes if n.op == "placeholder" and n.users}
    report_all = state.report
    ep = _expert_parallel_layout(report_all, sites, config, per_step=True)
    shared = insert_shared_routing(gm, sites, config.routing, _call)
    if ep is not None:
        if ep.logical_to_physical is not None:
            insert_physical_ids(gm.graph, shared.ids, shared.perm.args[0], ep)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        tokens = shared.tokens
        report_all.ep_step = EPStep(routing=config.routing, num_experts=sites[0].gating.spec.num_experts,
                                    top_k=sites[0].gating.spec.top_k, layout=ep,
                                    token_input=placeholders.index(tokens) if tokens in placeholders else None)
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
