"""Expert parallelism in the rewrite (``GrouterConfig(expert_parallel=...)``).

Each rewritten site's experts node becomes one call of
:func:`grouter_pass.distributed.experts.ep_experts_in_graph`; AOT autograd traces through it, so
the forward and backward graphs hold the functional all-to-alls (dispatch out, combine back, and
their reverses in backward) instead of an opaque op. What changes per routing mode:

* exact mode (learned routers): each site's dispatch plan counts its tokens per expert; the
  call exchanges the ``[E]`` counts with an all-to-all and reads the split sizes on the host
  (``grouter.split_size``): the per-layer count exchange of Megatron-LM and torchtitan.
* Grouter / precomputed / hash modes: the one shared plan serves every site, and the split sizes
  are read with ``grouter.step_split_size`` from what :class:`~grouter_pass.distributed.runtime.
  EPStepRunner` computed before entering the compiled graph: no collective and no device read
  inside the graph.

With a placement (``expert_placement``), the routing ids are mapped to *physical* slots once
(``to_physical_ids``) before the dispatch plan: rank ``r`` owns slots ``[r*L, (r+1)*L)``.

Expert parameters: either the model's full ``[E, ...]`` parameters (the graph reads only this
rank's rows), or, after ``shard_expert_parameters(keep_shape=True)``, the ``[E/R, ...]`` shards
behind ``grouter.experts_from_shard``: the rewrite reads the shard and removes that op, so the
full tensor is never built. A sharded parameter read by anything the rewrite did not replace is
refused (:func:`refuse_unreplaced_shards`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from grouter_pass.passes.graph_utils import fake_mode_of, meta_val, shape_of


def to_physical_ids(ids: torch.Tensor, logical_to_physical: tuple[int, ...]) -> torch.Tensor:
    """Routing ids (logical experts) -> physical slots of a placement (an FX call target)."""
    table = torch.tensor(logical_to_physical, dtype=torch.int64, device=ids.device)
    return table[ids.long()]


@dataclass(frozen=True)
class EPLayout:
    """The expert-parallel group and placement the rewrite emits code for."""

    group_name: str
    size: int
    rank: int
    local_experts: tuple[int, ...] | None       # logical experts of this rank (None: the contiguous block)
    logical_to_physical: tuple[int, ...] | None  # None: identity

    @classmethod
    def from_config(cls, config: Any) -> EPLayout:
        from grouter_pass.distributed.group import resolve_ep_group

        epg = resolve_ep_group(config.expert_parallel)
        placement = config.expert_placement
        local = l2p = None
        if placement is not None:
            placement.check_matches(ep_size=epg.size, source="the expert placement")
            per = placement.num_experts // epg.size
            local = tuple(int(e) for e in placement.expert_perm[epg.rank * per:(epg.rank + 1) * per])
            l2p = tuple(int(p) for p in placement.logical_to_physical)
        return cls(group_name=epg.group.group_name, size=epg.size, rank=epg.rank, local_experts=local,
                   logical_to_physical=l2p)

    def check_site(self, num_experts: int, where: str, placement: Any) -> None:
        """Refuse, naming both values, an EP size that does not divide E or a placement for another E."""
        if num_experts % self.size:
            raise ValueError(f"expert-parallel size {self.size} does not divide the number of experts "
                             f"{num_experts} of site {where}")
        if placement is not None:
            placement.check_matches(num_experts=num_experts, source="the expert placement")

    def local_rows(self, num_experts: int) -> tuple[int, ...]:
        per = num_experts // self.size
        return self.local_experts if self.local_experts is not None else tuple(
            range(self.rank * per, (self.rank + 1) * per))

    def local_shards(self, weights: dict[str, fx.Node | None], num_experts: int, where: str
                     ) -> dict[str, fx.Node | None] | None:
        """The shards behind ``weights`` when every one is a ``grouter.experts_from_shard`` of this
        rank's rows; ``None`` when none is; an error when only some are or the rows differ."""
        present = {k: v for k, v in weights.items() if v is not None}
        sources = {k: _shard_args(v) for k, v in present.items()}
        if not any(sources.values()):
            return None
        if not all(sources.values()):
            raise ValueError(f"site {where}: expert parameters {sorted(k for k, v in sources.items() if v)} are "
                             f"sharded for expert parallelism but {sorted(k for k, v in sources.items() if not v)} "
                             "are not; shard all of them (shard_expert_parameters(keep_shape=True))")
        want = self.local_rows(num_experts)
        for k, (_, e, rows) in sources.items():
            if e != num_experts or tuple(rows) != want:
                raise ValueError(f"site {where}: {k} was sharded for E={e} with rows {list(rows)} on this rank, but "
                                 f"the expert-parallel layout gives E={num_experts} rows {list(want)} (shard with "
                                 "the same mesh and placement as the GrouterConfig)")
        return {k: (sources[k][0] if v is not None else None) for k, v in weights.items()}

    def describe(self, per_step: bool) -> dict[str, Any]:
        return {"ep_size": self.size, "rank": self.rank, "group": self.group_name,
                "local_experts": list(self.local_experts) if self.local_experts is not None else "contiguous",
                "split_sizes": "once per step, before the graph" if per_step else "per layer (count all-to-all)"}


def _is_shard_view(node: Any) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function"
            and node.target in (torch.ops.grouter.experts_from_shard.default, torch.ops.grouter.experts_from_shard))


def _shard_args(node: fx.Node) -> tuple[fx.Node, int, tuple[int, ...]] | None:
    if not _is_shard_view(node):
        return None
    shard, num_experts, rows = (list(node.args) + [node.kwargs.get("num_experts"), node.kwargs.get("rows")])[:3]
    return shard, int(num_experts), tuple(int(r) for r in rows)


def refuse_unreplaced_shards(gm: fx.GraphModule, expert_parallel: bool) -> None:
    """Remove the ``grouter.experts_from_shard`` nodes the rewrite left without users; refuse the
    graph when one is still read: that code would see the other ranks' experts as zeros."""
    for node in list(gm.graph.nodes):
        if _is_shard_view(node) and not node.users:
            gm.graph.erase_node(node)
    readers = [(n, sorted(u.name for u in n.users)) for n in gm.graph.nodes if _is_shard_view(n)]
    if readers:
        what = "; ".join(f"{n.name} read by {users}" for n, users in readers)
        hint = ("a MoE site the rewrite did not replace reads them (see the site report for why)" if expert_parallel
                else "compile it with GrouterConfig(expert_parallel=...) using the same mesh")
        raise ValueError(f"this model's expert parameters are sharded for expert parallelism "
                         f"(shard_expert_parameters(keep_shape=True)) and only the expert-parallel rewrite can run "
                         f"them: {what}; {hint}")


def _fake_like(node: fx.Node, shape: Any, dtype: torch.dtype) -> Any:
    val = meta_val(node)
    mode = fake_mode_of([val])
    if mode is None:
        return None
    with mode:
        return val.new_empty(shape, dtype=dtype)


def insert_physical_ids(graph: fx.Graph, ids: fx.Node, plan_node: fx.Node, layout: EPLayout) -> fx.Node:
    """Map ``ids`` to physical slots for ``plan_node`` (a ``grouter.dispatch_plan`` call) only."""
    with graph.inserting_before(plan_node):
        phys = graph.call_function(to_physical_ids, (ids, layout.logical_to_physical))
    phys._rename("physical_expert_ids")
    phys.meta["example_value"] = _fake_like(ids, shape_of(ids), torch.int64)
    phys.meta["grouter_role"] = plan_node.meta.get("grouter_role", "dispatch_plan")
    plan_node.replace_input_with(ids, phys)
    return phys


@dataclass(frozen=True)
class EPStep:
    """What the expert-parallel step runner (``distributed/runtime.py``) needs to compute a step's
    routing and split sizes before the compiled graph runs, in Grouter modes.

    ``routing``: the routing source; ``num_experts`` / ``top_k`` of the sites; ``layout``: the
    :class:`EPLayout`; ``token_input``: the index of the graph input holding the token ids (None
    when the source needs none: precomputed routing).
    """

    routing: Any
    num_experts: int
    top_k: int
    layout: EPLayout
    token_input: int | None


def emit_ep_experts(graph: fx.Graph, *, x: fx.Node, weights: fx.Node, perm: fx.Node, counts: fx.Node,
                    w_up: fx.Node, w_down: fx.Node, b_up: fx.Node | None, b_down: fx.Node | None,
                    num_experts: int, top_k: int, op_kwargs: dict[str, Any], layout: EPLayout,
                    step_key: int | None, site_index: int, weights_local: bool, like: fx.Node) -> fx.Node:
    """One ``ep_experts_in_graph`` node in place of ``grouter.moe_experts``; returns its output."""
    from grouter_pass.distributed.experts import ep_experts_in_graph

    kwargs = {"group_name": layout.group_name, "num_experts": num_experts, "top_k": top_k,
              "local_experts": layout.local_experts, "step_key": step_key, "site": site_index,
              "weights_local": weights_local, **op_kwargs}
    node = graph.call_function(ep_experts_in_graph, (x, weights, perm, counts, w_up, w_down, b_up, b_down), kwargs)
    node._rename("ep_moe_out")
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "seq_nr"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    node.meta["grouter_role"] = "experts"
    out_dtype = op_kwargs.get("out_dtype") or meta_val(x).dtype
    node.meta["example_value"] = _fake_like(x, shape_of(x), out_dtype)
    return node


__all__ = ["EPLayout", "EPStep", "emit_ep_experts", "insert_physical_ids", "refuse_unreplaced_shards",
           "to_physical_ids"]
