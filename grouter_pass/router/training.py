"""What distillation and tuning share: the LR schedule, resumable trainer checkpoints and the
step loop that ties them to the progress bar (:func:`run_steps`).

A run directory holds ``checkpoint/`` (the Grouter, :func:`~.checkpoint.save_grouter` format)
and ``checkpoint/trainer_state.pt`` (step, optimizer state, RNG states, the run's settings). A
run restarted on the same directory continues from the last checkpoint; data positions are a
function of the step (:class:`~.data.PackedBatches`), so nothing else needs saving, and the
resumed run computes bit for bit what the uninterrupted run would have (on the same machine).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from grouter_pass.router.checkpoint import load_grouter, save_grouter
from grouter_pass.router.network import Grouter
from grouter_pass.router.progress import Progress

log = logging.getLogger(__name__)

CHECKPOINT_DIR, STATE_FILE = "checkpoint", "trainer_state.pt"


def lr_at(step: int, *, base_lr: float, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio * base_lr`` at ``total``."""
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return base_lr * (min_ratio + (1 - min_ratio) * cosine)


def save_trainer_checkpoint(run_dir: str | os.PathLike, grouter: Grouter, optimizer: torch.optim.Optimizer,
                            step: int, settings: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write the Grouter and the trainer state of ``step`` under ``run_dir/checkpoint`` (the state
    file is written last and atomically, so a crash mid-save leaves the previous one usable)."""
    ckpt = Path(run_dir) / CHECKPOINT_DIR
    save_grouter(grouter, ckpt, extra={"step": step})
    state = {"step": step, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
             "settings": json.loads(json.dumps(settings, default=str)), "extra": extra or {}}
    tmp = ckpt / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, ckpt / STATE_FILE)
    return ckpt


def load_trainer_checkpoint(run_dir: str | os.PathLike, settings: dict[str, Any]
                            ) -> tuple[Grouter, dict[str, Any]] | None:
    """The saved ``(grouter, state)`` of ``run_dir``, or None when there is none. A checkpoint
    made with other settings (what changes the result: sizes, LR, steps, data) is refused with
    the differing values."""
    ckpt = Path(run_dir) / CHECKPOINT_DIR
    if not (ckpt / STATE_FILE).is_file():
        return None
    try:
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"{ckpt / STATE_FILE} is corrupt or truncated ({type(exc).__name__}: {exc}); delete it "
                         "or pass --no-resume") from None
    want = json.loads(json.dumps(settings, default=str))
    diff = {k: (state["settings"].get(k), v) for k, v in want.items() if state["settings"].get(k) != v}
    if diff:
        details = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"cannot resume {run_dir}: the checkpoint was made with other settings ({details}); use "
                         "another output directory or --no-resume")
    grouter = load_grouter(ckpt)
    return grouter, state


def clear_trainer_checkpoint(run_dir: str | os.PathLike) -> None:
    state = Path(run_dir) / CHECKPOINT_DIR / STATE_FILE
    if state.exists():
        state.unlink()


def resume_run(run_dir: str | os.PathLike | None, settings: dict[str, Any], *, resume: bool, what: str
               ) -> tuple[Grouter, dict[str, Any]] | None:
    """The checkpoint of ``run_dir`` to continue from, with the torch RNG restored to it, or None
    to start from the beginning (no directory, ``resume=False`` or nothing saved yet)."""
    loaded = load_trainer_checkpoint(run_dir, settings) if (run_dir is not None and resume) else None
    if loaded is not None:
        torch.set_rng_state(loaded[1]["torch_rng"])
        log.info("resuming %s from step %d (%s)", what, int(loaded[1]["step"]), run_dir)
    return loaded


def run_steps(name: str, step: Callable[[int], tuple[float, dict[str, float]]], *, start: int, steps: int,
              grouter: Grouter, optimizer: torch.optim.Optimizer, settings: dict[str, Any],
              run_dir: str | os.PathLike | None, save_every: int, progress: bool = True, writer: bool = True,
              after_step: Callable[[int], None] | None = None,
              on_step: Callable[[int, float], None] | None = None) -> None:
    """Steps ``start .. steps-1`` of a resumable run.

    ``step(i)`` trains step ``i`` and returns ``(value, shown)``: the value handed to
    ``on_step(done, value)`` (tests interrupt runs there) and the numbers the progress bar shows
    (``tokens`` counts towards its throughput). Every ``save_every`` steps, short of the last, the
    trainer checkpoint is written to ``run_dir`` (by the ``writer`` process only, rank 0 of a
    data-parallel run); ``after_step(done)`` runs next (periodic evaluation). The last step's
    checkpoint is the caller's, with what else the run saves."""
    bar = Progress(steps, name, start=start, enabled=progress and writer)
    for i in range(start, steps):
        value, shown = step(i)
        done = i + 1
        bar.update(done, **shown)
        if run_dir is not None and writer and save_every and done % save_every == 0 and done < steps:
            save_trainer_checkpoint(run_dir, grouter, optimizer, done, settings)
        if after_step is not None:
            after_step(done)
        if on_step is not None:
            on_step(done, value)
    bar.close()
