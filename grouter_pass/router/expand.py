"""Expert expanding (method notes section 7; reference code only): a Grouter for E_T > E_S.

1. Run the Grouter on data; keep the final hidden states (entering ``score``) of the tokens
   whose maximum logit is in the bottom ``quantile`` (default 20%): the low-confidence tokens.
2. k-means them into ``E_T - E_S`` clusters (deterministic: k-means++ seeding from ``seed``).
3. Project the centroids onto the null space of the old score rows; rescale each to the mean old
   row norm; QR-orthogonalise; rescale again; append them as new score rows.
4. New experts' selection bias: the mean of the old biases (the reference does not record it;
   the mean keeps bias routing neutral towards them).

At most ``d - rank(W_old)`` new rows fit; asking for more is an error naming both numbers.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable

import torch

from grouter_pass._logging import RESULT
from grouter_pass.router.network import Grouter

log = logging.getLogger(__name__)


def kmeans(x: torch.Tensor, k: int, *, iters: int = 50, seed: int = 0) -> torch.Tensor:
    """Centroids ``[k, D]`` of ``x [N, D]`` (float64, k-means++ seeding, Lloyd iterations)."""
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n} low-confidence tokens; use more data")
    g = torch.Generator().manual_seed(seed)
    x = x.double()
    centroids = [x[int(torch.randint(n, (1,), generator=g))]]
    d2 = ((x - centroids[0]) ** 2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full((n,), 1.0 / n, dtype=torch.float64)
        c = x[int(torch.multinomial(probs, 1, generator=g))]
        centroids.append(c)
        d2 = torch.minimum(d2, ((x - c) ** 2).sum(1))
    c = torch.stack(centroids)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        new = c.clone()
        for j in range(k):
            members = x[assign == j]
            if members.shape[0]:
                new[j] = members.mean(0)
        if torch.allclose(new, c):
            break
        c = new
    return c


@torch.no_grad()
def low_confidence_hidden(grouter: Grouter, batches: Iterable[torch.Tensor], quantile: float = 0.2) -> torch.Tensor:
    """Final hidden states ``[M, D]`` of the tokens whose max logit is in the bottom ``quantile``."""
    hs, maxes = [], []
    for ids in batches:
        h = grouter.final_hidden(ids)
        hs.append(h.reshape(-1, h.shape[-1]).double())
        maxes.append(grouter.score(h).float().amax(-1).reshape(-1))
    if not hs:
        raise ValueError("empty dataset: no tokens to expand experts from")
    h, m = torch.cat(hs), torch.cat(maxes)
    return h[m <= torch.quantile(m.double(), quantile).to(m.dtype)]


def new_expert_rows(old: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Rows orthogonal to ``old [E_S, D]`` and to each other, with the mean old row norm."""
    old = old.double()
    d = old.shape[1]
    _, s, vh = torch.linalg.svd(old, full_matrices=True)
    rank = int((s > s.max() * max(old.shape) * torch.finfo(torch.float64).eps).sum()) if s.numel() else 0
    free = d - rank
    n_new = centroids.shape[0]
    if n_new > free:
        raise ValueError(f"cannot add {n_new} experts: only d - rank(W) = {d} - {rank} = {free} directions are "
                         "orthogonal to the existing score rows (use a wider Grouter or fewer new experts)")
    null = vh[rank:]                                  # [free, D] orthonormal basis of the null space
    proj = centroids.double() @ null.t() @ null       # projection onto the null space
    target = old.norm(dim=1).mean()
    proj = proj / proj.norm(dim=1, keepdim=True).clamp_min(1e-12) * target
    q, _ = torch.linalg.qr(proj.t())                  # [D, n_new], orthonormal columns in the null space
    rows = q.t()
    # QR may flip a direction; keep each row on its centroid's side
    sign = torch.sign((rows * proj).sum(1, keepdim=True)).clamp_min(0) * 2 - 1
    return rows * sign * target


def expand_grouter(grouter: Grouter, target_experts: int, batches: Iterable[torch.Tensor], *,
                   top_k: int | None = None, quantile: float = 0.2, seed: int = 0, iters: int = 50) -> Grouter:
    """A new Grouter with ``target_experts`` experts: the old score rows plus new ones placed on
    the low-confidence tokens (see the module docstring). ``grouter`` is left unchanged."""
    e_s = grouter.config.num_experts
    if target_experts <= e_s:
        raise ValueError(f"expanding needs target_experts > source experts; got target_experts={target_experts}, "
                         f"source num_experts={e_s} (use folding to reduce)")
    k = top_k if top_k is not None else grouter.config.top_k
    if not 1 <= k <= target_experts:
        raise ValueError(f"top_k={k} does not fit num_experts={target_experts}")
    grouter.eval()
    hidden = low_confidence_hidden(grouter, batches, quantile)
    centroids = kmeans(hidden, target_experts - e_s, iters=iters, seed=seed)
    w = grouter.score.weight.detach()
    rows = new_expert_rows(w, centroids)
    new = copy.deepcopy(grouter)
    new.config = grouter.config.replace(num_experts=target_experts, top_k=k)
    new.score = torch.nn.Linear(w.shape[1], target_experts, bias=False, dtype=w.dtype)
    with torch.no_grad():
        new.score.weight.copy_(torch.cat([w.double(), rows]).to(w.dtype))
        b = grouter.bias.detach()
        new.bias = torch.nn.Parameter(torch.cat([b, b.mean().expand(target_experts - e_s)]))
    new.folding = None
    new.expanding = {"source_experts": e_s, "new_experts": list(range(e_s, target_experts)),
                     "low_confidence_tokens": int(hidden.shape[0]), "quantile": quantile}
    log.info("expanded %d -> %d experts from %d low-confidence tokens", e_s, target_experts, hidden.shape[0],
             extra=RESULT)
    return new
