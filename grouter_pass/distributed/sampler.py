"""A sampler that feeds each rank the samples a placement bound to it.

Every rank gets the same number of samples per epoch (the smallest rank's share; a placement
built by :func:`~grouter_pass.distributed.placement.build_placement` differs by at most one), so
every rank takes the same number of steps and the all-to-alls stay matched. Shuffling is
deterministic in ``(seed, epoch, rank)``, so any rank can also reconstruct what the others read in
a step (:meth:`PlacementSampler.step_samples`), which is what lets a rank compute the split sizes
of the step from the stored routing without a collective
(:func:`~grouter_pass.distributed.splits_from_step_routing`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from grouter_pass.distributed.placement_file import Placement


class PlacementSampler(Sampler[int]):
    """Indices of the samples bound to ``rank`` by ``placement``.

    Args:
        placement: the loaded placement (check it with ``load_placement(num_experts=...,
            ep_size=..., num_samples=len(dataset))``).
        rank: this process's rank in the expert-parallel group.
        shuffle: shuffle each rank's samples every epoch (call :meth:`set_epoch`).
        seed: shuffling seed, the same on every rank.
    """

    def __init__(self, placement: Placement, rank: int, *, shuffle: bool = True, seed: int = 0) -> None:
        if not 0 <= rank < placement.ep_size:
            raise ValueError(f"rank {rank} outside the placement's ep_size={placement.ep_size}")
        self.placement, self.rank, self.shuffle, self.seed = placement, rank, shuffle, seed
        self.epoch = 0
        self._per_rank = [placement.samples_of(r) for r in range(placement.ep_size)]
        self.num_samples = min(len(s) for s in self._per_rank)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices_of(self, rank: int) -> np.ndarray:
        """The order in which ``rank`` reads its samples this epoch."""
        idx = self._per_rank[rank]
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, rank])
            idx = idx[rng.permutation(len(idx))]
        return idx[: self.num_samples]

    def step_samples(self, step: int, batch_size: int) -> list[np.ndarray]:
        """The samples every rank reads in ``step`` with ``batch_size`` samples per rank."""
        return [self.indices_of(r)[step * batch_size:(step + 1) * batch_size] for r in range(self.placement.ep_size)]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices_of(self.rank).tolist())

    def __len__(self) -> int:
        return self.num_samples
