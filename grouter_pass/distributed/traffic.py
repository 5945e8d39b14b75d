"""What expert grouping and sample placement save: cross-rank traffic of a routing, simulated.

For a routing and an EP size R (no devices needed) it reports, for three strategies

* ``none``: experts in contiguous blocks of E/R (expert e on rank e // M), samples dealt round
  robin (sample s on rank s mod R, as ``DistributedSampler`` without shuffling);
* ``grouping``: the placement's expert permutation, samples still round robin;
* ``grouping+placement``: the placement's permutation and sample table;

the fraction of token-expert pairs whose expert is on another rank than the token, and the bytes
moved per step per MoE layer stack:

* per-slot: what an ``all_to_all_single`` dispatch moves (one row per remote pair, as
  :func:`~grouter_pass.distributed.ep_moe_experts` does), dispatch and combine;
* deduplicated: one row per (token, remote rank) as DeepEP sends, dispatch and combine.

Bytes per step = remote rows per token (measured over the whole routing) x tokens per step x
hidden x bytes per element x 2 (dispatch + combine) x MoE layers.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np

from grouter_pass.distributed.placement import PlacementConfig, build_placement
from grouter_pass.distributed.routing_data import RoutingData

log = logging.getLogger(__name__)

STRATEGIES = ("none", "grouping", "grouping+placement")


@dataclass(frozen=True, kw_only=True)
class TrafficConfig:
    """Model and step sizes of the byte estimate (defaults: the paper's Mini-Qwen3, bf16, 8
    sequences per rank per step as the Tiny-Qwen3 recipe)."""

    hidden: int = 1024
    moe_layers: int = 16
    bytes_per_element: int = 2
    samples_per_rank_per_step: int = 8


@dataclass(frozen=True)
class TrafficRow:
    ep_size: int
    strategy: str
    remote_pair_fraction: float
    per_slot_bytes_per_step: float
    dedup_bytes_per_step: float


def remote_rows(routing: RoutingData, rank_of_expert: np.ndarray, sample_rank: np.ndarray) -> tuple[float, float]:
    """``(remote pairs per token, distinct remote ranks per token)`` averaged over all tokens."""
    tok_rank = np.repeat(sample_rank, np.diff(routing.offsets))
    ranks = rank_of_expert[routing.ids.astype(np.int64)]                     # [T, K]
    remote = ranks != tok_rank[:, None]
    pairs = float(remote.sum(axis=1).mean())
    srt = np.sort(np.where(remote, ranks, -1), axis=1)
    distinct = (srt[:, 1:] != srt[:, :-1]) & (srt[:, 1:] >= 0)
    ranks_per_token = float((distinct.sum(axis=1) + (srt[:, 0] >= 0)).mean())
    return pairs, ranks_per_token


def simulate_traffic(routing: RoutingData, ep_sizes: tuple[int, ...] = (8, 16, 32), *,
                     traffic: TrafficConfig | None = None, placement_config: PlacementConfig | None = None
                     ) -> list[TrafficRow]:
    """One :class:`TrafficRow` per (EP size, strategy); placements are built on the fly."""
    traffic = traffic or TrafficConfig()
    rows = []
    mean_len = routing.num_tokens / routing.num_samples
    for r in ep_sizes:
        cfg = dataclasses.replace(placement_config, ep_size=r) if placement_config else PlacementConfig(ep_size=r)
        placement = build_placement(routing, cfg)
        m = routing.num_experts // r
        round_robin = np.arange(routing.num_samples) % r
        layouts = {
            "none": (np.arange(routing.num_experts) // m, round_robin),
            "grouping": (placement.rank_of_expert, round_robin),
            "grouping+placement": (placement.rank_of_expert, placement.sample_rank),
        }
        tokens_per_step = mean_len * traffic.samples_per_rank_per_step * r
        per_row = traffic.hidden * traffic.bytes_per_element * 2 * traffic.moe_layers * tokens_per_step
        for name in STRATEGIES:
            pairs, ranks = remote_rows(routing, *layouts[name])
            rows.append(TrafficRow(ep_size=r, strategy=name, remote_pair_fraction=pairs / routing.top_k,
                                   per_slot_bytes_per_step=pairs * per_row, dedup_bytes_per_step=ranks * per_row))
    return rows


def format_table(rows: list[TrafficRow]) -> str:
    """A markdown table of :func:`simulate_traffic`'s rows."""
    lines = ["| EP | strategy | token-expert pairs crossing ranks | MB/step, per-slot all-to-all | "
             "MB/step, deduplicated (DeepEP-style) |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.ep_size} | {row.strategy} | {100 * row.remote_pair_fraction:.1f}% | "
                     f"{row.per_slot_bytes_per_step / 1e6:,.1f} | {row.dedup_bytes_per_step / 1e6:,.1f} |")
    return "\n".join(lines)
