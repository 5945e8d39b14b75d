"""Timing shared by the demo and the benchmarks (docs/performance.md describes the method)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def time_interleaved(steps: dict[str, Callable[[], object]], *, warmup: int, iters: int) -> dict[str, float]:
    """Median milliseconds of each named step.

    Every step is first run ``warmup`` times (compilation, autotuning and allocator growth happen
    there); then the timed calls are interleaved, one call of every step per round, so that a slow
    spell of a shared machine hits every row alike and ratios within a run stay meaningful.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def lm_training_step(model: Callable, ids: object, context: Callable | None = None) -> Callable[[], None]:
    """One causal-LM training step on ``ids`` (labels = inputs: gradients cleared, forward, loss,
    backward), optionally inside ``context()`` (e.g. the per-batch routing of a Grouter mode)."""
    import contextlib

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with context() if context is not None else contextlib.nullcontext():
            loss = model(ids, labels=ids).loss
        loss.backward()

    return step
