"""The placement file: expert permutation + sample -> rank table, with the sizes it was made for.

Consumed by the data loader (:class:`~grouter_pass.distributed.sampler.PlacementSampler`: each
rank reads only its samples) and by the model (``shard_expert_parameters(expert_perm=...)`` and
``logical_to_physical`` to remap expert ids). A file made for another E or another EP size would
silently route tokens to the wrong experts, so loading checks both and names both values.

Format: ``.npz`` with ``expert_perm [E]`` (physical slot -> logical expert; rank r owns slots
``[r*M, (r+1)*M)``), ``sample_rank [S]`` and ``meta`` (a JSON string: version, num_experts,
ep_size and the statistics of the run that made it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Placement:
    """Where experts and samples live over ``ep_size`` ranks."""

    expert_perm: np.ndarray
    sample_rank: np.ndarray
    num_experts: int
    ep_size: int
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_experts % self.ep_size:
            raise ValueError(f"expert-parallel size {self.ep_size} does not divide the number of experts "
                             f"{self.num_experts}")
        if sorted(self.expert_perm.tolist()) != list(range(self.num_experts)):
            raise ValueError(f"expert_perm is not a permutation of num_experts={self.num_experts} experts")
        if self.sample_rank.size and (self.sample_rank.min() < 0 or self.sample_rank.max() >= self.ep_size):
            raise ValueError(f"sample ranks must lie in [0, ep_size={self.ep_size})")

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def logical_to_physical(self) -> np.ndarray:
        """``[E]``: physical slot of each logical expert (remap routing ids with it)."""
        return np.argsort(self.expert_perm)

    @property
    def rank_of_expert(self) -> np.ndarray:
        """``[E]``: rank owning each logical expert."""
        return self.logical_to_physical // self.experts_per_rank

    def samples_of(self, rank: int) -> np.ndarray:
        return np.flatnonzero(self.sample_rank == rank)

    def check_matches(self, *, num_experts: int | None = None, ep_size: int | None = None,
                      num_samples: int | None = None, source: str = "placement") -> None:
        """Raise ``ValueError`` naming both values when this placement was made for other sizes."""
        if num_experts is not None and num_experts != self.num_experts:
            raise ValueError(f"{source} was made for num_experts={self.num_experts}, but this run has "
                             f"num_experts={num_experts}")
        if ep_size is not None and ep_size != self.ep_size:
            raise ValueError(f"{source} was made for ep_size={self.ep_size} ranks, but this run has "
                             f"ep_size={ep_size}")
        if num_samples is not None and num_samples != self.sample_rank.size:
            raise ValueError(f"{source} places {self.sample_rank.size} samples, but the dataset has {num_samples}")


def save_placement(path: str | Path, placement: Placement) -> None:
    meta = {"version": FORMAT_VERSION, "num_experts": placement.num_experts, "ep_size": placement.ep_size,
            **placement.metadata}
    np.savez(path, expert_perm=placement.expert_perm.astype(np.int64),
             sample_rank=placement.sample_rank.astype(np.int32), meta=np.array(json.dumps(meta)))


def load_placement(path: str | Path, *, num_experts: int | None = None, ep_size: int | None = None,
                   num_samples: int | None = None) -> Placement:
    """Read a placement file and check it against this run's sizes (any left ``None`` is not checked)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"placement file {path} does not exist")
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: placement format version {meta.get('version')}, expected {FORMAT_VERSION}")
        placement = Placement(expert_perm=z["expert_perm"], sample_rank=z["sample_rank"].astype(np.int64),
                              num_experts=int(meta.pop("num_experts")), ep_size=int(meta.pop("ep_size")),
                              metadata=meta)
    placement.check_matches(num_experts=num_experts, ep_size=ep_size, num_samples=num_samples,
                            source=f"placement file {path}")
    return placement
