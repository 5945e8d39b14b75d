"""Run a worker function in N gloo processes and collect what each check recorded.

Process start-up dominates the cost of a distributed test on CPU (about 5 s per spawn), so each
spawned group runs many named checks and records each result; the pytest functions only read
the records. A failing check records its traceback and the worker moves on to the next one.
"""

from __future__ import annotations

import datetime
import json
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = datetime.timedelta(seconds=90)


class Recorder:
    """Per-rank record of named checks: ``{"name": {"ok": bool, "error": str, ...values}}``."""

    def __init__(self) -> None:
        self.results: dict[str, dict] = {}

    def check(self, name: str, fn: Callable[[], dict | None]) -> None:
        start = time.perf_counter()
        try:
            extra = fn() or {}
            self.results[name] = {"ok": True, **extra, "seconds": round(time.perf_counter() - start, 2)}
        except Exception:  # recorded, reported by the pytest function that reads this check
            self.results[name] = {"ok": False, "error": traceback.format_exc()}
        dist.barrier()


def _entry(rank: int, world: int, init_file: str, out_dir: str, worker: Callable[[Recorder, int, int], None]) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=TIMEOUT)
    rec = Recorder()
    try:
        worker(rec, rank, world)
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(rec.results))
        dist.destroy_process_group()


def run_spawned(worker: Callable[[Recorder, int, int], None], world: int, tmp: Path) -> list[dict[str, dict]]:
    """Run ``worker(recorder, rank, world)`` on ``world`` gloo processes; returns each rank's record."""
    tmp.mkdir(parents=True, exist_ok=True)
    mp.spawn(_entry, args=(world, str(tmp / "init"), str(tmp), worker), nprocs=world, join=True)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]


def assert_check(results: list[dict[str, dict]], name: str) -> list[dict]:
    """Fail with every rank's traceback unless check ``name`` passed on all ranks."""
    recs = [r.get(name, {"ok": False, "error": "check did not run"}) for r in results]
    errors = [f"rank {i}:\n{r['error']}" for i, r in enumerate(recs) if not r["ok"]]
    assert not errors, "\n".join(errors)
    return recs
