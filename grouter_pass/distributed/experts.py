"""Expert-parallel MoE experts: dispatch slots to the ranks owning their experts, run the local
experts with the single-device ``grouter.moe_experts`` op, and combine back.

Legend: N local tokens, K top-k, S = N*K slots, H hidden, E experts (global), R ep ranks,
L = E/R local experts, M slots received by this rank.

Data flow on every rank (``ids`` are *physical* expert ids: rank r owns ``[r*L, (r+1)*L)``)::

    x [N, H] --gather by plan.perm--> x_S [S, H]   (slots in expert order = grouped by owner rank)
        --all_to_all(input_splits -> output_splits)--> x_M [M, H] (by source rank, then expert)
        --grouter.moe_experts(local experts, one slot per row)--> y_M [M, H]
        --all_to_all(output_splits -> input_splits)--> y_S [S, H]
        --* routing weight, index_add by token--> out [N, H]

The collectives are ``all_to_all_single_autograd`` from
``torch.distributed._functional_collectives``: traceable and differentiable, so the whole step
(forward and backward) can stay inside one ``torch.compile`` graph. Their backward is the
reverse all-to-all, which is what carries every rank's gradient contribution back to the
expert shards.

Split sizes: when ``splits`` is given (precomputed / Grouter / hash routing: computed once per
step, see :mod:`grouter_pass.distributed.splits`) nothing else is communicated; when it is
``None`` (learned routing, "exact mode") each call first exchanges its ``[E]`` counts with an
all-to-all and reads the split sizes on the host, as Megatron-LM and torchtitan do.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.distributed_c10d import _resolve_process_group

import grouter_pass.ops  # noqa: F401  (registers torch.ops.grouter.*)
from grouter_pass.distributed.group import EPGroup, resolve_ep_group
from grouter_pass.distributed.splits import EPSplits
from grouter_pass.spec import ExpertMLP

log = logging.getLogger(__name__)

DispatchPlan = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def exchange_layer_splits(counts_E: torch.Tensor, epg: EPGroup) -> EPSplits:
    """Exact mode: one all-to-all of this rank's ``[E]`` counts, then a host read of the splits.

    This is the per-layer, host-synchronising step that precomputed routing removes. The read is
    one D2H copy of ``2R`` totals, then ``grouter.split_size`` per entry: traceable as unbacked
    sizes (the rewrite's graphs; ``fullgraph=True`` at model level), a graph break otherwise.
    """
    local = counts_E.shape[0] // epg.size
    counts = counts_E.to(torch.int64)
    recv = funcol.all_to_all_single(counts, [local] * epg.size, [local] * epg.size, epg.group)
    recv_RL = funcol.wait_tensor(recv).view(epg.size, local)
    totals = torch.cat([counts.view(epg.size, local).sum(1), recv_RL.sum(1)]).cpu()
    sizes = [torch.ops.grouter.split_size(totals, i) for i in range(2 * epg.size)]
    return EPSplits(input_splits=sizes[:epg.size], output_splits=sizes[epg.size:], recv_counts_RL=recv_RL)


def _local_expert_ids(recv_counts_RL: torch.Tensor, num_received: int) -> torch.Tensor:
    """``[M]`` local expert of every received row: rows arrive by source rank, then by expert."""
    ranks, local = recv_counts_RL.shape
    experts = torch.arange(local, device=recv_counts_RL.device).repeat(ranks)
    return torch.repeat_interleave(experts, recv_counts_RL.reshape(-1), output_size=num_received)


def _all_to_all(t: torch.Tensor, output_splits: list[int], input_splits: list[int], epg: EPGroup) -> torch.Tensor:
    out = funcol.all_to_all_single_autograd(t.contiguous(), output_splits, input_splits, epg.group)
    return funcol.wait_tensor(out)


def ep_moe_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    *,
    ep: EPGroup | dist.ProcessGroup,
    num_experts: int,
    splits: EPSplits | None = None,
    plan: DispatchPlan | None = None,
    mlp: ExpertMLP = ExpertMLP(),
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Routed experts sharded over an expert-parallel group; the EP twin of ``grouter.moe_experts``.

    Args:
        x: ``[N, H]`` this rank's tokens.
        weights: ``[N, K]`` routing weights.
        ids: ``[N, K]`` int64 *physical* expert ids in ``[0, E)`` (apply a placement's
            ``logical_to_physical`` first; identity without placement).
        w_up, w_down, b_up, b_down: this rank's expert shards, ``[L, ...]`` with the layouts of
            ``grouter.moe_experts`` (see :func:`~grouter_pass.distributed.shard_expert_parameters`).
        ep: the expert-parallel group (an :class:`EPGroup` from
            :func:`~grouter_pass.distributed.resolve_ep_group`, or a ``ProcessGroup``).
        num_experts: E, the global number of experts.
        splits: this step's split sizes (:mod:`~grouter_pass.distributed.splits`); ``None``
            exchanges counts in this call (exact mode: one more all-to-all and a host read).
        plan: ``grouter.dispatch_plan(ids, E)`` when the caller already has it (one shared plan per
            step in Grouter mode); computed here otherwise.
        mlp: the experts' activation and weight layouts (:class:`~grouter_pass.spec.ExpertMLP`).
        out_dtype: as ``grouter.moe_experts``.

    Returns:
        ``[N, H]`` in ``out_dtype`` (x's dtype when None): the same function as
        ``grouter.moe_experts`` with the full expert weights.

    Raises:
        ValueError: when the group size does not divide ``num_experts`` or the shards do not
            hold ``E / ep`` experts.
    """
    epg = ep if isinstance(ep, EPGroup) else resolve_ep_group(ep)
    if num_experts % epg.size:
        raise ValueError(f"expert-parallel size {epg.size} does not divide the number of experts {num_experts}")
    local = num_experts // epg.size
    if w_up.shape[0] != local or w_down.shape[0] != local:
        raise ValueError(f"expert shards hold {w_up.shape[0]} / {w_down.shape[0]} experts, expected "
                         f"{local} = {num_experts} experts / ep size {epg.size}")
    if plan is None:
        plan = torch.ops.grouter.dispatch_plan(ids, num_experts)
    perm_S, _, counts_E, _ = plan
    if splits is None:
        splits = exchange_layer_splits(counts_E, epg)
    return _dispatch_compute_combine(x, weights, perm_S, splits, w_up, w_down, b_up, b_down, epg, top_k=ids.shape[1],
                                     mlp=mlp, out_dtype=out_dtype)


def _dispatch_compute_combine(x: torch.Tensor, weights: torch.Tensor, perm_S: torch.Tensor, splits: EPSplits,
                              w_up: torch.Tensor, w_down: torch.Tensor, b_up: torch.Tensor | None,
                              b_down: torch.Tensor | None, epg: EPGroup, *, top_k: int, mlp: ExpertMLP,
                              out_dtype: torch.dtype | None) -> torch.Tensor:
    """The data path shared by the model-level and the graph-level entry: gather slots in expert
    order, all-to-all out, local experts, all-to-all back, weight and combine by token."""
    n, hidden = x.shape
    k, local = top_k, w_up.shape[0]
    weight_on_input = mlp.weight_on_input
    compute_dtype = w_up.dtype
    tok_S = torch.div(perm_S, k, rounding_mode="floor")
    w_sorted_S1 = weights.reshape(-1).index_select(0, perm_S).unsqueeze(-1)
    x_S = x.index_select(0, tok_S)
    if weight_on_input:
        x_S = x_S * w_sorted_S1
    x_S = x_S.to(compute_dtype)

    x_M = _all_to_all(x_S, splits.output_splits, splits.input_splits, epg)
    local_ids_M = _local_expert_ids(splits.recv_counts_RL.to(x.device), splits.num_received)
    lperm, linv, _, loffsets = torch.ops.grouter.dispatch_plan(local_ids_M.unsqueeze(1), local)
    # One slot per received row, weight 1 on the input (an exact no-op): the op returns each row's
    # expert output in row order, unweighted, in the compute dtype.
    ones_M1 = torch.ones(x_M.shape[0], 1, dtype=compute_dtype, device=x.device)
    y_M, _ = torch.ops.grouter.moe_experts(x_M, ones_M1, lperm, linv, loffsets, w_up, w_down, b_up, b_down,
                                           **{**mlp.kwargs(), "weight_on_input": True}, out_dtype=compute_dtype)
    y_S = _all_to_all(y_M, splits.input_splits, splits.output_splits, epg)

    # Combine exactly as the single-device reference: weight in promote(compute, weights), sum
    # the slots of a token in expert order.
    if weight_on_input:
        acc_dtype, yw_S = compute_dtype, y_S
    else:
        acc_dtype = torch.promote_types(compute_dtype, weights.dtype)
        yw_S = y_S.to(acc_dtype) * w_sorted_S1
    out = torch.zeros(n, hidden, dtype=acc_dtype, device=x.device).index_add(0, tok_S, yw_S)
    return out.to(x.dtype if out_dtype is None else out_dtype)


def _local_rows(t: torch.Tensor | None, rank: int, local: int, local_experts: tuple[int, ...] | None
                ) -> torch.Tensor | None:
    """This rank's experts of a full ``[E, ...]`` parameter: a slice, or the placement's rows."""
    if t is None:
        return None
    if local_experts is None:
        return t.narrow(0, rank * local, local)
    return t.index_select(0, torch.tensor(local_experts, dtype=torch.int64, device=t.device))


def ep_experts_in_graph(
    x: torch.Tensor,
    weights: torch.Tensor,
    perm: torch.Tensor,
    counts: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    b_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    *,
    group_name: str,
    num_experts: int,
    top_k: int,
    local_experts: tuple[int, ...] | None = None,
    step_key: int | None = None,
    site: int = 0,
    weights_local: bool = False,
    out_dtype: torch.dtype | None = None,
    **mlp: Any,
) -> torch.Tensor:
    """What the rewrite calls for one MoE site under ``GrouterConfig(expert_parallel=...)``.

    A plain function on purpose: it is the target of one FX node, and AOT autograd traces
    through it, so the forward and backward graphs contain the functional all-to-alls themselves
    (Inductor can schedule around them) rather than an opaque op.

    Args:
        x, weights: ``[N, H]`` tokens and ``[N, K]`` routing weights of this rank.
        perm, counts: the site's (or the step's shared) ``grouter.dispatch_plan`` over
            *physical* expert ids: slot order and ``[E]`` counts.
        w_up, w_down, b_up, b_down: the model's full ``[E, ...]`` expert parameters; only this
            rank's rows are read (``local_experts``, or ``[r*L, (r+1)*L)``), so only they get a
            gradient here.
        group_name: the expert-parallel process group (its registered name: FX arguments must
            be plain values).
        step_key: ``None`` in exact mode: the layer exchanges its ``[E]`` counts with an
            all-to-all and reads the split sizes on the host (one D2H copy). Otherwise the
            routing source's key: the split sizes were computed before the step and are read
            with ``grouter.step_split_size`` (no collective, no device read).
        site: the MoE layer's index in the graph (keeps each layer's size reads distinct).
        weights_local: the expert arguments already are this rank's ``[E/R, ...]`` shards
            (``shard_expert_parameters(keep_shape=True)``), not full parameters to slice.
        out_dtype: as ``grouter.moe_experts``.
        mlp: the :class:`~grouter_pass.spec.ExpertMLP` fields by name (FX arguments must be
            plain values, and a rewrite may pass a traced scalar for one of them).
    """
    group = _resolve_process_group(group_name)
    epg = EPGroup(group=group, size=dist.get_world_size(group), rank=dist.get_rank(group))
    local = num_experts // epg.size
    if weights_local:
        shards = [w_up, w_down, b_up, b_down]
    else:
        shards = [_local_rows(t, epg.rank, local, local_experts) for t in (w_up, w_down, b_up, b_down)]
    if step_key is None:
        splits = exchange_layer_splits(counts, epg)
    else:
        recv_RL = torch.ops.grouter.step_recv_counts(counts, step_key, epg.size, local, site)
        sizes = [torch.ops.grouter.step_split_size(counts, step_key, i, site) for i in range(2 * epg.size)]
        splits = EPSplits(input_splits=sizes[:epg.size], output_splits=sizes[epg.size:], recv_counts_RL=recv_RL)
    return _dispatch_compute_combine(x, weights, perm, splits, *shards, epg, top_k=top_k, mlp=ExpertMLP(**mlp),
                                     out_dtype=out_dtype)
