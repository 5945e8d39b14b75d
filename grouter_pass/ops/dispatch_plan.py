"""``grouter::dispatch_plan``: expert ids -> the permutation that groups slots by expert.

Inputs:  ids ``[N, K]`` int64, ``num_experts`` E.
Outputs: perm ``[S]`` int64, inv_perm ``[S]`` int64, counts ``[E]`` int64, offsets ``[E]`` int32,
with ``S = N*K`` (see :func:`~grouter_pass.ops.reference.dispatch_plan_reference`).

Every output size is fixed by ``(N*K, E)``, so the plan is traceable with a symbolic token
count and never forces a host synchronisation; it is computed once per site (once per step in
Grouter mode) and saved by the AOT partitioner for the backward.
"""

from __future__ import annotations

import torch

from grouter_pass.ops import reference


@torch.library.custom_op("grouter::dispatch_plan", mutates_args=())
def dispatch_plan(ids: torch.Tensor, num_experts: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return reference.dispatch_plan_reference(ids, num_experts)


@dispatch_plan.register_fake
def _dispatch_plan_fake(ids, num_experts):
    s = ids.numel()
    return (ids.new_empty((s,), dtype=torch.int64), ids.new_empty((s,), dtype=torch.int64),
            ids.new_empty((num_experts,), dtype=torch.int64), ids.new_empty((num_experts,), dtype=torch.int32))


def _dispatch_plan_backward(ctx, *grads):
    # ids are integers: nothing to differentiate. Registered so that autograd never has to
    # guess, and so that a float input by mistake fails here with a clear message.
    return None, None


dispatch_plan.register_autograd(_dispatch_plan_backward)
