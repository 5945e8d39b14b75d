"""All-to-all split sizes as graph values: ``grouter::split_size``, ``grouter::step_split_size``,
``grouter::step_recv_counts``.

An expert-parallel MoE layer sends a data-dependent number of rows to each rank, so the sizes
passed to ``all_to_all_single`` must be integers known on the host. These ops are how those
integers enter a compiled graph without ``.tolist()`` / ``.item()`` in the traced code: each is
opaque, and its fake implementation returns a fresh *unbacked* size (``ctx.new_dynamic_size()``)
or a fixed-shape tensor, so one compiled graph serves every step (no recompile when the sizes
change, tested).

* ``split_size(counts, index)``: exact mode (learned routing). Reads one entry of a count tensor
  the layer just exchanged: the per-layer host read that Megatron-LM and torchtitan also do.
* ``step_split_size(anchor, key, index, site)`` / ``step_recv_counts(anchor, key, ranks, local, site)``:
  Grouter / precomputed / hash modes. Read the step's split sizes that were computed **before**
  the compiled graph was entered (the :class:`~grouter_pass.runtime.StepPlan` that
  :class:`grouter_pass.distributed.runtime.EPStepRunner` sets): plain Python integers, no device
  read at all. ``anchor`` is any tensor of the graph, only there to order the call after it;
  ``site`` (the MoE layer's index) keeps the calls of different layers distinct: with equal
  arguments Inductor's CSE would merge them, leaving later layers' sizes without a definition.

Index layout of ``step_split_size``: ``[0, R)`` are the input (send) splits, ``[R, 2R)`` the
output (receive) splits of this rank.
"""

from __future__ import annotations

from typing import Any

import torch

from grouter_pass.runtime import step_plan


def _step_splits(key: int) -> Any:
    plan = step_plan(key)
    if plan is None or plan.splits is None:
        raise RuntimeError("expert parallelism: this graph reads the step's all-to-all split sizes, but none were "
                           "computed for this call (the compiled graph must be called through the grouter backend's "
                           "step runner, which computes them before the step)")
    return plan.splits


@torch.library.custom_op("grouter::split_size", mutates_args=())
def split_size(counts: torch.Tensor, index: int) -> int:
    return int(counts[index])


@split_size.register_fake
def _split_size_fake(counts, index):
    return torch.library.get_ctx().new_dynamic_size()


@torch.library.custom_op("grouter::step_split_size", mutates_args=())
def step_split_size(anchor: torch.Tensor, key: int, index: int, site: int) -> int:
    splits = _step_splits(key)
    ranks = len(splits.input_splits)
    return int(splits.input_splits[index] if index < ranks else splits.output_splits[index - ranks])


@step_split_size.register_fake
def _step_split_size_fake(anchor, key, index, site):
    return torch.library.get_ctx().new_dynamic_size()


@torch.library.custom_op("grouter::step_recv_counts", mutates_args=())
def step_recv_counts(anchor: torch.Tensor, key: int, ranks: int, local: int, site: int) -> torch.Tensor:
    counts = _step_splits(key).recv_counts_RL
    if tuple(counts.shape) != (ranks, local):
        raise ValueError(f"the step's receive counts are {list(counts.shape)}; this graph expects [{ranks}, {local}]")
    return counts.to(device=anchor.device, dtype=torch.int64, copy=True)


@step_recv_counts.register_fake
def _step_recv_counts_fake(anchor, key, ranks, local, site):
    return anchor.new_empty((ranks, local), dtype=torch.int64)


__all__ = ["split_size", "step_recv_counts", "step_split_size"]
