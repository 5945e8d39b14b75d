"""What one call of a compiled model delivers or precomputes, per thread.

* :func:`routing`: the user's ``with grouter_pass.routing(weights, ids):`` block, the routing of
  the calls inside it (pre-dispatch mode), as a :class:`DeliveredRouting`.
* :class:`StepPlan`: what the expert-parallel step runner computes for a routing source before
  the compiled graph runs (the step's routing, its all-to-all split sizes), read by
  ``grouter.external_routing`` and ``grouter.step_split_size`` / ``step_recv_counts``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from grouter_pass.runtime.slots import KeyedSlots


@dataclass(frozen=True)
class DeliveredRouting:
    """The routing a :func:`routing` block delivers: ``[B, S, k]`` or ``[B*S, k]`` weights and
    ids, and (expert parallelism only) this rank's split sizes for the step."""

    weights: torch.Tensor
    ids: torch.Tensor
    ep_splits: Any = None


@dataclass(frozen=True)
class StepPlan:
    """What the ops of one routing source read during one call, computed before the graph.

    ``routing``: ``(weights [N, k], ids [N, k])`` already computed for this call, so
    ``grouter.external_routing`` returns it instead of running the source again (None: the op
    runs the source). ``splits``: the step's :class:`~grouter_pass.distributed.EPSplits`.
    """

    routing: tuple[torch.Tensor, torch.Tensor] | None = None
    splits: Any = None


_DELIVERED = threading.local()
_STEP_PLANS = KeyedSlots()


def delivered_routing() -> DeliveredRouting | None:
    """The routing of the innermost :func:`routing` block on this thread, if any."""
    return getattr(_DELIVERED, "value", None)


def running_step(key: int, plan: StepPlan) -> contextlib.AbstractContextManager[None]:
    """Make ``plan`` what the ops of routing source ``key`` read inside the block (one call)."""
    return _STEP_PLANS.holding(key, plan)


def step_plan(key: int) -> StepPlan | None:
    return _STEP_PLANS.get(key)


def _check_routing_pair(weights: Any, ids: Any) -> None:
    if not isinstance(weights, torch.Tensor) or not isinstance(ids, torch.Tensor):
        raise TypeError(f"routing(weights, ids) takes two tensors, got {type(weights).__name__} and "
                        f"{type(ids).__name__}")
    ids_int = not ids.dtype.is_floating_point and not ids.dtype.is_complex and ids.dtype != torch.bool
    weights_int = not weights.dtype.is_floating_point and not weights.dtype.is_complex
    if not ids_int or not weights.dtype.is_floating_point:
        swapped = " (the arguments look swapped: the order is routing(weights, ids))" if (
            weights_int and ids.dtype.is_floating_point) else ""
        raise TypeError(f"routing(weights, ids) needs floating-point weights and integer ids; got weights "
                        f"{weights.dtype} {list(weights.shape)} and ids {ids.dtype} {list(ids.shape)}{swapped}")
    if weights.shape != ids.shape:
        raise ValueError(f"routing(weights, ids): weights {list(weights.shape)} and ids {list(ids.shape)} must "
                         "have the same shape ([B, S, k] or [B*S, k])")


@contextlib.contextmanager
def routing(weights: torch.Tensor | Any, ids: torch.Tensor | None = None, *, ep_splits: Any = None
            ) -> Iterator[None]:
    """Deliver precomputed routing for the calls inside the block.

    ``with grouter_pass.routing(weights, ids): loss = model(input_ids)`` — ``weights`` and
    ``ids`` are ``[B, S, k]`` (or ``[B*S, k]``) for the batch's tokens in ``[b, s]`` order, as
    :class:`grouter_pass.router.PreDispatchedDataset` yields them; ``ids`` are integers (any
    integer dtype), ``weights`` floating point. A pre-dispatch ``Routing`` (a named tuple with
    fields ``ids`` and ``weights``) is accepted as the one argument. Anything else is refused
    with the dtypes and shapes it got: a float ``ids`` would otherwise be truncated silently.
    The backward of the step needs no routing (the dispatch plan is saved by autograd).

    ``ep_splits`` (expert parallelism only): this rank's
    :class:`~grouter_pass.distributed.EPSplits` for the step, when the caller knows every rank's
    routing (:func:`~grouter_pass.distributed.splits_from_step_routing`); without it the step
    runner all-gathers the ``[E]`` counts once per step.
    """
    if ids is None:
        r = weights
        if not (hasattr(r, "ids") and hasattr(r, "weights")):
            raise TypeError("routing(r) takes an object with .ids and .weights (a pre-dispatch Routing), "
                            "or routing(weights, ids)")
        weights, ids = r.weights, r.ids
    _check_routing_pair(weights, ids)
    prev = delivered_routing()
    _DELIVERED.value = DeliveredRouting(weights=weights, ids=ids, ep_splits=ep_splits)
    try:
        yield
    finally:
        _DELIVERED.value = prev


__all__ = ["DeliveredRouting", "StepPlan", "delivered_routing", "routing", "running_step", "step_plan"]
