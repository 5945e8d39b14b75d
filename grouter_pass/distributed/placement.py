"""Offline expert grouping and sample placement from a dataset's routing (Grouter §3.4.2, App. J).

Legend: S samples, T tokens, K top-k, E experts, R = ep ranks, M = E / R experts per rank.

Pipeline (:func:`build_placement`):

1. **Affinity** (paper Eq. 6): ``phi[s, e]`` = fraction of the tokens of sample s that select
   expert e (each row sums to K).
2. **Entropy filter** (App. J): samples whose normalised affinity ``phi/K`` has an entropy above
   the threshold have no preference; they are left out of the grouping and placed last, as
   fillers. The paper's 6.85 bits at E = 128 is 0.98 of the maximum log2(E); the default
   threshold is that fraction of log2(E) for any E.
3. **Expert grouping**: the co-activation matrix ``C = phi^T phi`` (how much two experts are used
   by the same samples) is cut into R balanced groups of M experts maximising the co-activation
   inside groups: greedy growth from the strongest expert, then Kernighan-Lin pair swaps. This
   replaces the reference code's PCA -> k-means -> agglomerative -> Hungarian chain (it needs
   scikit-learn and SciPy; the project depends on neither); it optimises the same thing the
   matching step scores (affinity mass inside each partition) and is balanced by construction.
4. **Sample placement** (paper Eq. 9 / Alg. 1): each sample goes to the rank whose experts
   serve the most of its tokens (tokens with at least one selected expert there), under a
   capacity of S/R samples per rank so every rank gets the same number of samples per step.
   Samples are placed in order of decreasing regret (how much worse their second-best rank
   is), high-entropy samples last; the reference code solves the same capacity-constrained
   problem with a Hungarian assignment.
5. **Refinement** (ours, off with ``refine_rounds=0``): given the placed samples, experts are
   reassigned to the ranks that use them most (M per rank), samples are placed again, and the
   round is kept only if fewer token-expert pairs cross ranks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from grouter_pass.distributed.group import check_divides
from grouter_pass.distributed.placement_file import Placement
from grouter_pass.distributed.routing_data import RoutingData

log = logging.getLogger(__name__)

#: the paper's threshold (6.85 bits) over its maximum at E = 128 (7 bits)
PAPER_ENTROPY_FRACTION = 6.85 / 7.0
_CHUNK_TOKENS = 1 << 20


@dataclass(frozen=True, kw_only=True)
class PlacementConfig:
    """Settings of :func:`build_placement`.

    Attributes:
        ep_size: R, the number of expert-parallel ranks (GPU level) or nodes (node level).
        entropy_threshold: bits over ``phi / K``; ``None``: ``0.98 * log2(E)`` (the paper's
            6.85 bits at E = 128).
        refine_rounds: alternating expert/sample reassignment rounds after the paper's steps.
        max_swaps: cap on Kernighan-Lin swaps in the grouping (``None``: ``20 * E``).
        progress: show progress bars (tqdm) on stderr.
    """

    ep_size: int
    entropy_threshold: float | None = None
    refine_rounds: int = 2
    max_swaps: int | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        if self.ep_size < 1:
            raise ValueError(f"ep_size must be >= 1, got {self.ep_size}")
        if self.refine_rounds < 0:
            raise ValueError(f"refine_rounds must be >= 0, got {self.refine_rounds}")


class _Stages:
    """One progress bar over the stages of :func:`build_placement` (tqdm on stderr), or nothing."""

    def __init__(self, enabled: bool, total: int, desc: str) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="stage")

    def done(self, stage: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(stage)
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _token_chunks(routing: RoutingData) -> list[tuple[int, int]]:
    """Sample ranges holding about ``_CHUNK_TOKENS`` tokens each (so memory stays bounded)."""
    bounds, start = [], 0
    off = routing.offsets
    while start < routing.num_samples:
        end = int(np.searchsorted(off, off[start] + _CHUNK_TOKENS, side="right")) - 1
        end = max(end, start + 1)
        bounds.append((start, min(end, routing.num_samples)))
        start = end
    return bounds


def sample_affinity(routing: RoutingData) -> np.ndarray:
    """``phi [S, E]`` float64: fraction of each sample's tokens selecting each expert (Eq. 6)."""
    e = routing.num_experts
    phi = np.zeros((routing.num_samples, e), dtype=np.float64)
    for s0, s1 in _token_chunks(routing):
        t0, t1 = routing.offsets[s0], routing.offsets[s1]
        lengths = np.diff(routing.offsets[s0:s1 + 1])
        local_sample = np.repeat(np.arange(s1 - s0), lengths)
        flat = (local_sample[:, None] * e + routing.ids[t0:t1].astype(np.int64)).reshape(-1)
        phi[s0:s1] = np.bincount(flat, minlength=(s1 - s0) * e).reshape(s1 - s0, e) / lengths[:, None]
    return phi


def affinity_entropy(phi: np.ndarray, top_k: int) -> np.ndarray:
    """``[S]`` entropy in bits of ``phi / K`` (0: one expert set; log2(E): uniform)."""
    p = phi / top_k
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(p), 0.0)
    return terms.sum(axis=1)


def default_entropy_threshold(num_experts: int) -> float:
    return PAPER_ENTROPY_FRACTION * math.log2(num_experts)


def coactivation(phi: np.ndarray) -> np.ndarray:
    """``[E, E]`` co-activation affinity ``phi^T phi`` with a zero diagonal."""
    c = phi.T @ phi
    np.fill_diagonal(c, 0.0)
    return c


def group_experts(c: np.ndarray, ep_size: int, *, max_swaps: int | None = None) -> np.ndarray:
    """Balanced partition of the experts maximising co-activation inside groups.

    Returns:
        ``[E]`` group (rank) of every expert, each group holding ``E / ep_size`` experts.
    """
    e = c.shape[0]
    m = check_divides(e, ep_size)
    labels = np.full(e, -1, dtype=np.int64)
    for g in range(ep_size):
        free = np.flatnonzero(labels < 0)
        sub = c[np.ix_(free, free)]
        seed = free[int(np.argmax(sub.sum(axis=1)))]
        labels[seed] = g
        members = [seed]
        for _ in range(m - 1):
            free = np.flatnonzero(labels < 0)
            pick = free[int(np.argmax(c[np.ix_(free, members)].sum(axis=1)))]
            labels[pick] = g
            members.append(pick)
    # Kernighan-Lin pair swaps: d[i, g] = affinity of expert i to group g
    d = c @ np.eye(ep_size)[labels]
    scale = max(float(c.sum()), 1e-30)
    for _ in range(max_swaps if max_swaps is not None else 20 * e):
        own = d[np.arange(e), labels]
        cross = d[:, labels]                      # cross[i, j] = d[i, group of j]
        gain = cross - own[:, None] + cross.T - own[None, :] - 2 * c
        gain[labels[:, None] == labels[None, :]] = -np.inf
        i, j = np.unravel_index(int(np.argmax(gain)), gain.shape)
        if gain[i, j] <= 1e-12 * scale:
            break
        a, b = labels[i], labels[j]
        d[:, a] += c[:, j] - c[:, i]
        d[:, b] += c[:, i] - c[:, j]
        labels[i], labels[j] = b, a
    return labels


def expert_perm_from_groups(labels: np.ndarray) -> np.ndarray:
    """Physical order (rank-major) from expert groups: groups ordered by their smallest expert,
    experts ascending inside a group. ``perm[p]`` = logical expert at physical slot p."""
    groups = sorted((np.flatnonzero(labels == g) for g in np.unique(labels)), key=lambda x: int(x.min()))
    return np.concatenate(groups).astype(np.int64)


def local_token_counts(routing: RoutingData, rank_of_expert: np.ndarray, ep_size: int) -> np.ndarray:
    """``[S, R]``: tokens of each sample with at least one selected expert on each rank (Alg. 1)."""
    out = np.zeros((routing.num_samples, ep_size), dtype=np.int64)
    for s0, s1 in _token_chunks(routing):
        t0, t1 = routing.offsets[s0], routing.offsets[s1]
        ranks = rank_of_expert[routing.ids[t0:t1].astype(np.int64)]              # [t, K]
        hit = np.zeros((t1 - t0, ep_size), dtype=bool)
        np.put_along_axis(hit, ranks, True, axis=1)
        out[s0:s1] = np.add.reduceat(hit, routing.offsets[s0:s1] - t0, axis=0, dtype=np.int64)
    return out


def capacities(num_samples: int, ep_size: int) -> np.ndarray:
    """Samples per rank: equal, the first ``S mod R`` ranks one more (the sampler truncates to the
    smallest so every rank takes the same number of samples per step)."""
    cap = np.full(ep_size, num_samples // ep_size, dtype=np.int64)
    cap[: num_samples % ep_size] += 1
    return cap


def place_samples(score: np.ndarray, cap: np.ndarray, filler: np.ndarray | None = None) -> np.ndarray:
    """Capacity-constrained greedy placement: each sample to its best rank with room left.

    Args:
        score: ``[S, R]`` preference of each sample for each rank (higher is better).
        cap: ``[R]`` samples each rank takes (sums to at least S).
        filler: ``[S]`` bool, samples to place last (no real preference).

    Returns:
        ``[S]`` rank of every sample.
    """
    s, r = score.shape
    if int(cap.sum()) < s:
        raise ValueError(f"capacity {int(cap.sum())} is smaller than the {s} samples to place")
    top2 = -np.sort(-score, axis=1)[:, :2] if r > 1 else np.concatenate([score, score], axis=1)
    regret = top2[:, 0] - top2[:, 1]
    key = (np.zeros(s) if filler is None else filler.astype(np.float64))
    order = np.lexsort((-regret, key))  # non-fillers first, then by decreasing regret
    left = cap.astype(np.int64).copy()
    out = np.empty(s, dtype=np.int64)
    full = np.zeros(r, dtype=bool)
    for i in order:
        row = np.where(full, -np.inf, score[i])
        dest = int(np.argmax(row))
        out[i] = dest
        left[dest] -= 1
        if left[dest] == 0:
            full[dest] = True
    return out


def local_slot_fraction(routing: RoutingData, rank_of_expert: np.ndarray, sample_rank: np.ndarray) -> float:
    """Fraction of token-expert pairs whose expert is on the rank of the token's sample."""
    tok_rank = np.repeat(sample_rank, np.diff(routing.offsets))
    return float((rank_of_expert[routing.ids.astype(np.int64)] == tok_rank[:, None]).mean())


def _regroup_for_samples(phi: np.ndarray, lengths: np.ndarray, sample_rank: np.ndarray, ep_size: int) -> np.ndarray:
    """Experts to the ranks whose samples use them most, M per rank (greedy on the demand)."""
    e = phi.shape[1]
    m = e // ep_size
    demand = np.zeros((e, ep_size))
    np.add.at(demand.T, sample_rank, phi * lengths[:, None])
    labels = np.full(e, -1, dtype=np.int64)
    left = np.full(ep_size, m)
    for flat in np.argsort(-demand, axis=None, kind="stable"):
        i, g = divmod(int(flat), ep_size)
        if labels[i] < 0 and left[g] > 0:
            labels[i] = g
            left[g] -= 1
    return labels


def build_placement(routing: RoutingData, config: PlacementConfig) -> Placement:
    """Expert permutation + sample -> rank table for ``routing`` over ``config.ep_size`` ranks."""
    e, r = routing.num_experts, config.ep_size
    check_divides(e, r)
    if routing.num_samples < r:
        raise ValueError(f"{routing.num_samples} samples cannot fill {r} ranks")
    stages = _Stages(config.progress, 3 + config.refine_rounds, f"placement ep={r}")
    phi = sample_affinity(routing)
    stages.done("affinity")
    threshold = config.entropy_threshold if config.entropy_threshold is not None else default_entropy_threshold(e)
    entropy = affinity_entropy(phi, routing.top_k)
    filler = entropy > threshold
    kept = phi[~filler] if (~filler).any() else phi
    labels = group_experts(coactivation(kept), r, max_swaps=config.max_swaps)
    stages.done("expert grouping")
    perm = expert_perm_from_groups(labels)
    cap = capacities(routing.num_samples, r)
    lengths = np.diff(routing.offsets)

    def placed(perm: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        rank_of_expert = np.argsort(perm) // (e // r)
        score = local_token_counts(routing, rank_of_expert, r) / lengths[:, None]
        sample_rank = place_samples(score, cap, filler)
        return rank_of_expert, sample_rank, local_slot_fraction(routing, rank_of_expert, sample_rank)

    rank_of_expert, sample_rank, local = placed(perm)
    stages.done("sample placement")
    history = [local]
    for _ in range(config.refine_rounds):
        new_perm = expert_perm_from_groups(_regroup_for_samples(phi, lengths, sample_rank, r))
        cand = placed(new_perm)
        stages.done("refinement")
        history.append(cand[2])
        if cand[2] <= local + 1e-12:
            break
        perm, (_, sample_rank, local) = new_perm, cand
    stages.close()
    meta = {
        "top_k": routing.top_k, "num_samples": routing.num_samples, "num_tokens": routing.num_tokens,
        "entropy_threshold_bits": threshold, "filtered_samples": int(filler.sum()),
        "local_slot_fraction": local, "refine_history": history,
    }
    log.info("placement over %d ranks: %.1f%% of token-expert pairs local (%d of %d samples filtered as "
             "high-entropy)", r, 100 * local, int(filler.sum()), routing.num_samples)
    return Placement(expert_perm=perm, sample_rank=sample_rank, num_experts=e, ep_size=r, metadata=meta)
