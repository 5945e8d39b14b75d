"""All-to-all split sizes of an expert-parallel MoE step.

Legend: E experts (global, physical order), R = ep ranks, L = E / R local experts per rank.
Rank ``r`` owns the physical experts ``[r*L, (r+1)*L)``.

Why this module exists: with learned routing every MoE layer must first exchange its per-expert
token counts (an all-to-all of ``[E]`` integers, then a host read of the split sizes) before it
can exchange tokens. With Grouter, precomputed or hash routing the routing of a step is known
before the forward and identical for every layer, so the counts of *every* rank can be known
before the step starts:

* from the data itself (:func:`splits_from_step_routing`: each rank reads the routing of the
  samples the other ranks get in this step; no collective at all), or
* with one all-gather of ``[E]`` counts per step, outside the compiled region
  (:func:`gather_step_splits`).

Either way :func:`compute_ep_splits` turns the ``[R, E]`` count matrix into an :class:`EPSplits`
that every MoE layer of the step reuses; the split sizes reach the host once per step, before
the forward, and the compiled graph receives them as plain integers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from grouter_pass.distributed.group import EPGroup, check_divides, resolve_ep_group


@dataclass(frozen=True)
class EPSplits:
    """Split sizes of one rank for one step (shared by every MoE layer of that step).

    Attributes:
        input_splits: ``[R]`` slots this rank sends to each rank (dispatch), i.e. the number of
            its ``(token, expert)`` pairs whose expert lives on that rank.
        output_splits: ``[R]`` slots this rank receives from each rank.
        recv_counts_RL: ``[R, L]`` int64 tensor: slots received from each source rank for each
            local expert (the received rows are ordered by source rank, then by expert).
    """

    input_splits: list[int]
    output_splits: list[int]
    recv_counts_RL: torch.Tensor

    @property
    def num_received(self) -> int:
        return sum(self.output_splits)

    @property
    def num_sent(self) -> int:
        return sum(self.input_splits)


def expert_counts(ids_NK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[E]`` int64: slots per (physical) expert of one rank's tokens."""
    return torch.bincount(ids_NK.reshape(-1).to(torch.int64), minlength=num_experts)[:num_experts]


def compute_ep_splits(counts_RE: torch.Tensor, rank: int) -> EPSplits:
    """The splits of ``rank`` from the ``[R, E]`` per-rank expert counts of one step.

    Pure host arithmetic (one ``.tolist()``): call it once per step, before the forward.
    """
    if counts_RE.dim() != 2:
        raise ValueError(f"counts must be [ranks, experts], got shape {tuple(counts_RE.shape)}")
    ep, e = counts_RE.shape
    local = check_divides(e, ep)
    counts_RE = counts_RE.to(torch.int64)
    input_splits = counts_RE[rank].view(ep, local).sum(1).tolist()
    recv_RL = counts_RE[:, rank * local:(rank + 1) * local].contiguous()
    return EPSplits(input_splits=input_splits, output_splits=recv_RL.sum(1).tolist(), recv_counts_RL=recv_RL)


def splits_from_step_routing(ids_per_rank: Sequence[torch.Tensor], num_experts: int, rank: int) -> EPSplits:
    """Splits from the routing of every rank's tokens in this step (``ids_per_rank[r]`` is
    ``[N_r, K]`` physical expert ids), with no communication: usable when the routing is stored
    with the data and the sampler is deterministic, so each rank knows what the others get."""
    counts = torch.stack([expert_counts(ids, num_experts) for ids in ids_per_rank])
    return compute_ep_splits(counts, rank)


def gather_step_splits(ids_NK: torch.Tensor, num_experts: int,
                       ep: EPGroup | dist.ProcessGroup | None = None) -> EPSplits:
    """Splits from this rank's routing with one all-gather of ``[E]`` counts: one collective per
    step instead of one count exchange per MoE layer. Call it outside the compiled region."""
    epg = resolve_ep_group(ep)
    check_divides(num_experts, epg.size)
    counts = expert_counts(ids_NK, num_experts)
    gathered = torch.empty(epg.size * num_experts, dtype=counts.dtype, device=counts.device)
    dist.all_gather_into_tensor(gathered, counts.contiguous(), group=epg.group)
    return compute_ep_splits(gathered.view(epg.size, num_experts), epg.rank)
