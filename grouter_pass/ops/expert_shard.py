"""``grouter::experts_from_shard``: an ``[E, ...]`` expert parameter as the traced code sees it,
built from this rank's ``[E/R, ...]`` shard.

Why it exists: a model's MoE code indexes its expert parameters by global expert id, so Dynamo
must trace them with their full ``[E, ...]`` shape; but under expert parallelism each rank should
*store* only its rows. :func:`~grouter_pass.distributed.shard_expert_parameters` with
``keep_shape=True`` therefore keeps the shard as the parameter and registers a parametrization
that calls this op. The expert-parallel rewrite reads the shard directly (the op's first input)
and the op is left without users and removed, so the full tensor is never built in the compiled
step. Run anywhere else (eager, or a site the rewrite did not replace) it builds the full tensor
with the other ranks' rows as zeros and logs a warning once: those experts are not on this rank.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)
_WARNED = [False]


@torch.library.custom_op("grouter::experts_from_shard", mutates_args=())
def experts_from_shard(shard: torch.Tensor, num_experts: int, rows: list[int]) -> torch.Tensor:
    if not _WARNED[0]:
        _WARNED[0] = True
        log.warning("grouter: an expert parameter sharded for expert parallelism was read outside the "
                    "expert-parallel rewrite; the experts of other ranks read as zeros")
    full = shard.new_zeros((num_experts, *shard.shape[1:]))
    full[torch.tensor(rows, dtype=torch.int64, device=shard.device)] = shard
    return full


@experts_from_shard.register_fake
def _experts_from_shard_fake(shard, num_experts, rows):
    return shard.new_empty((num_experts, *shard.shape[1:]))


def _setup(ctx, inputs, output):
    ctx.rows = inputs[2]


def _backward(ctx, grad):
    index = torch.tensor(ctx.rows, dtype=torch.int64, device=grad.device)
    return grad.index_select(0, index), None, None


experts_from_shard.register_autograd(_backward, setup_context=_setup)

__all__ = ["experts_from_shard"]
