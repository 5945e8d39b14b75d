"""Expert folding (method notes section 6): a Grouter for E_T < E_S target experts.

1. Affinity: ``P = R^T R / N`` over tokens, ``R [N, E_S]`` the Grouter's top-k indicator,
   diagonal zeroed (:func:`coactivation_affinity`).
2. Groups (:func:`greedy_groups`): ``floor(E_S / E_T)`` source experts per target expert and
   ``E_S mod E_T`` groups with one extra (the *first* groups formed; the paper leaves the
   choice open and the reference code only handles ``E_S % E_T == 0``). Each group starts from
   the lowest-index unassigned expert and repeatedly adds the unassigned expert with the largest
   summed affinity to the group (ties: lowest index), as Eq. 4.
3. Folding (:func:`fold_grouter`): ``W_T = M^T W_S`` and ``b_T = M^T b_S`` with ``M [E_S, E_T]``
   the binary group map, so each target logit is the sum of its group's source logits.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable

import torch

from grouter_pass._logging import RESULT
from grouter_pass.router.checkpoint import Folding
from grouter_pass.router.network import Grouter

log = logging.getLogger(__name__)


def coactivation_affinity(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``P [E, E]`` (float64): how often experts i and j share a token's top-k, per token.

    Args:
        ids: ``[..., K]`` selected expert ids.
    """
    flat = ids.reshape(-1, ids.shape[-1])
    if flat.shape[0] == 0:
        raise ValueError("empty dataset: no tokens to measure expert affinity on")
    r = torch.zeros(flat.shape[0], num_experts, dtype=torch.float64).scatter_(1, flat.long(), 1.0)
    p = r.t() @ r / flat.shape[0]
    p.fill_diagonal_(0)
    return p


@torch.no_grad()
def grouter_affinity(grouter: Grouter, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """:func:`coactivation_affinity` of ``grouter``'s own top-k over token ``batches``."""
    e = grouter.config.num_experts
    total, n = torch.zeros(e, e, dtype=torch.float64), 0
    for ids in batches:
        _, sel = grouter.route(ids)
        flat = sel.reshape(-1, sel.shape[-1])
        total += coactivation_affinity(flat, e) * flat.shape[0]
        n += flat.shape[0]
    if n == 0:
        raise ValueError("empty dataset: no tokens to measure expert affinity on")
    return total / n


def group_sizes(source_experts: int, target_experts: int) -> list[int]:
    """``floor(E_S/E_T) + 1`` for the first ``E_S mod E_T`` groups, ``floor(E_S/E_T)`` after."""
    if not 1 <= target_experts <= source_experts:
        raise ValueError(f"folding needs 1 <= target experts <= source experts; got target_experts={target_experts}, "
                         f"source_experts={source_experts}")
    base, extra = divmod(source_experts, target_experts)
    return [base + 1 if t < extra else base for t in range(target_experts)]


def greedy_groups(affinity: torch.Tensor, target_experts: int) -> list[list[int]]:
    """Partition ``E_S`` source experts into ``target_experts`` groups by greedy affinity (Eq. 4)."""
    e = affinity.shape[0]
    if affinity.shape != (e, e):
        raise ValueError(f"affinity must be square, got shape {list(affinity.shape)}")
    a = affinity.double()
    assigned = torch.zeros(e, dtype=torch.bool)
    groups = []
    for size in group_sizes(e, target_experts):
        seed = int((~assigned).nonzero()[0])
        group = [seed]
        assigned[seed] = True
        while len(group) < size:
            score = a[group].sum(0).masked_fill(assigned, float("-inf"))
            best = int(torch.argmax(score))   # argmax returns the first maximum: lowest index on ties
            group.append(best)
            assigned[best] = True
        groups.append(group)
    return groups


def fold_grouter(grouter: Grouter, groups: list[list[int]], *, top_k: int | None = None) -> Grouter:
    """A new Grouter routing to ``len(groups)`` experts: score rows and bias summed per group.

    Args:
        grouter: the source Grouter (E_S experts; left unchanged).
        groups: ``groups[t]`` = source experts folded into target expert ``t``; every source
            expert exactly once.
        top_k: the target's k (default: the source's, if it fits).
    """
    folding = Folding(grouter.config.num_experts, [list(map(int, g)) for g in groups])
    folding.validate()
    prior = getattr(grouter, "folding", None)
    e_t = folding.target_experts
    k = top_k if top_k is not None else min(grouter.config.top_k, e_t)
    if not 1 <= k <= e_t:
        raise ValueError(f"top_k={k} does not fit the folded Grouter's num_experts={e_t}")
    m = folding.matrix(torch.float64)
    new = copy.deepcopy(grouter)
    new.config = grouter.config.replace(num_experts=e_t, top_k=k)
    w, b = grouter.score.weight.detach(), grouter.bias.detach()
    new.score = torch.nn.Linear(w.shape[1], e_t, bias=False, dtype=w.dtype)
    with torch.no_grad():
        new.score.weight.copy_((m.t() @ w.double()).to(w.dtype))
        new.bias = torch.nn.Parameter((m.t() @ b.double()).to(b.dtype))
    if prior is not None:   # folding a folded Grouter composes the mappings
        folding = Folding(prior.source_experts, [sorted(i for s in g for i in prior.groups[s]) for g in folding.groups])
    new.folding = folding
    new.expanding = None
    log.info("folded %d -> %d experts (top-%d); group sizes %s", grouter.config.num_experts, e_t, k,
             sorted({len(g) for g in groups}), extra=RESULT)
    return new
