"""What distillation and tuning share: the LR schedule and resumable trainer checkpoints.

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
from pathlib import Path
from typing import Any

import torch

from grouter_pass.router.checkpoint import load_grouter, save_grouter
from grouter_pass.router.network import Grouter

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
