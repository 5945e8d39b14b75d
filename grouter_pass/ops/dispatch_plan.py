"""``grouter::dispatch_plan``: expert ids -> the permutation that groups slots by expert.

Inputs:  ids ``[N, K]`` int64, ``num_experts`` E.
Outputs: perm ``[S]`` int64, inv_perm ``[S]`` int64, counts ``[E]`` int64, offsets ``[E]`` int32,
with ``S = N*K`` (see :func:`~grouter_pass.ops.reference.dispatch_plan_reference`).

Every output size is fixed by ``(N*K, E)``, so the plan is traceable with a symbolic token
count and never forces a host synchronisation; it is computed once per site (once per step in
Grouter mode) and saved by the AOT partitioner for the backward.

On CUDA (:mod:`grouter_pass.ops.kernel_select`) it runs the three-launch counting sort of
:mod:`grouter_pass.kernels.dispatch_kernels`, identical to the reference's stable sort; there
out-of-range ids are not checked (that needs a host read) and their slots are left out.
"""

from __future__ import annotations

import torch

from grouter_pass import env
from grouter_pass.ops import reference
from grouter_pass.ops.cpu_experts import single_threaded_aten
from grouter_pass.ops.kernel_select import kernels_available_for


def _check_ids(ids: torch.Tensor, num_experts: int) -> None:
    # checked in the fake too, so a wrong dtype fails at trace time with this message rather than
    # deep inside a sort or a kernel
    if ids.dtype != torch.int64:
        raise TypeError(f"grouter.dispatch_plan takes int64 expert ids, got {ids.dtype} {list(ids.shape)}; "
                        "convert with ids.long()")
    if ids.dim() != 2:
        raise ValueError(f"grouter.dispatch_plan takes ids [N, K], got shape {list(ids.shape)}")
    if num_experts < 1:
        raise ValueError(f"grouter.dispatch_plan: num_experts must be >= 1, got {num_experts}")


@torch.library.custom_op("grouter::dispatch_plan", mutates_args=())
def dispatch_plan(ids: torch.Tensor, num_experts: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_ids(ids, num_experts)
    if kernels_available_for(ids):
        from grouter_pass.kernels.dispatch_kernels import dispatch_plan_triton

        return dispatch_plan_triton(ids, num_experts)[:4]
    if ids.device.type == "cpu" and env.openmp_threads_sleep():
        # A stable sort of S = N*K ids: ATen's parallel radix sort synchronises its threads once
        # per digit; where idle threads sleep, each wake-up costs more than the ~1 ms the sort
        # takes on one thread (docs/performance.md). At OpenMP's default the two are even.
        with single_threaded_aten():
            return reference.dispatch_plan_reference(ids, num_experts)
    return reference.dispatch_plan_reference(ids, num_experts)


@dispatch_plan.register_fake
def _dispatch_plan_fake(ids, num_experts):
    _check_ids(ids, num_experts)
    s = ids.numel()
    return (ids.new_empty((s,), dtype=torch.int64), ids.new_empty((s,), dtype=torch.int64),
            ids.new_empty((num_experts,), dtype=torch.int64), ids.new_empty((num_experts,), dtype=torch.int32))


def _dispatch_plan_backward(ctx, *grads):
    # ids are integers: nothing to differentiate. Registered so that autograd never has to
    # guess, and so that a float input by mistake fails here with a clear message.
    return None, None


dispatch_plan.register_autograd(_dispatch_plan_backward)


@torch.library.custom_op("grouter::capacity_keep", mutates_args=())
def capacity_keep(ids: torch.Tensor, weights: torch.Tensor, num_experts: int, capacity: int, priority: str
                  ) -> torch.Tensor:
    """Capacity-based dispatch: ``keep [N, K]`` bool, True for the slots an expert keeps when it
    takes at most ``capacity`` (see :func:`~grouter_pass.ops.reference.capacity_keep_reference`).

    The rewrite multiplies the routing weights by it, so a dropped slot adds nothing and gets no
    gradient, exactly as in a model that drops the token; ``capacity`` may be a symbolic size."""
    with torch.no_grad():
        return reference.capacity_keep_reference(ids, weights, num_experts, capacity, priority)


@capacity_keep.register_fake
def _capacity_keep_fake(ids, weights, num_experts, capacity, priority):
    return ids.new_empty(ids.shape, dtype=torch.bool)


def _capacity_keep_backward(ctx, grad):
    return None, None, None, None, None


capacity_keep.register_autograd(_capacity_keep_backward)
