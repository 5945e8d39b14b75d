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

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

import grouter_pass.ops  # noqa: F401  (registers torch.ops.grouter.*)
from grouter_pass.distributed.group import EPGroup, resolve_ep_group
from grouter_pass.distributed.splits import EPSplits

log = logging.getLogger(__name__)

DispatchPlan = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def exchange_layer_splits(counts_E: torch.Tensor, epg: EPGroup) -> EPSplits:
    """Exact mode: one all-to-all of this rank's ``[E]`` counts, then a host read of the splits.

    This is the per-layer, host-synchronising step that precomputed routing removes.
    """
    local = counts_E.shape[0] // epg.size
    recv = funcol.all_to_all_single(counts_E.to(torch.int64), [local] * epg.size, [local] * epg.size, epg.group)
    recv_RL = funcol.wait_tensor(recv).view(epg.size, local)
    input_splits = counts_E.view(epg.size, local).sum(1).tolist()
    return EPSplits(input_splits=input_splits, output_splits=recv_RL.sum(1).tolist(), recv_counts_RL=recv_RL)


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
    activation: str = "silu",
    gated: bool = True,
    interleaved: bool = False,
    alpha: float = 1.0,
    limit: float = 0.0,
    up_transposed: bool = False,
    down_transposed: bool = False,
    weight_on_input: bool = False,
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
        activation ... out_dtype: as ``grouter.moe_experts``.

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
    n, hidden = x.shape
    k = ids.shape[1]
    compute_dtype = w_up.dtype
    if plan is None:
        plan = torch.ops.grouter.dispatch_plan(ids, num_experts)
    perm_S, _, counts_E, _ = plan
    if splits is None:
        splits = exchange_layer_splits(counts_E, epg)

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
    y_M, _ = torch.ops.grouter.moe_experts(
        x_M, ones_M1, lperm, linv, loffsets, w_up, w_down, b_up, b_down, activation, gated, interleaved, alpha,
        limit, up_transposed, down_transposed, True, compute_dtype)
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
