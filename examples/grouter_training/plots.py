"""CSV and PNG outputs: validation curves and expert-load heatmaps.

matplotlib (the ``examples`` extra: ``pip install grouter-pass[examples]``) with the
non-interactive Agg backend, chosen explicitly so the example works on a headless machine and
never opens a window.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from .metrics import load_fractions

log = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_curves_csv(path: Path, curves: dict[str, Sequence[dict[str, float]]]) -> Path:
    """One row per (run, evaluation): ``run, step, tokens, val_loss``."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["run", "step", "tokens", "val_loss"])
        for name, curve in curves.items():
            for c in sorted(curve, key=lambda c: c["step"]):
                w.writerow([name, int(c["step"]), int(c["tokens"]), f"{c['val_loss']:.6f}"])
    return path


def write_train_log_csv(path: Path, logs: dict[str, Sequence[dict[str, float]]],
                        times: dict[str, Sequence[dict[str, float]]]) -> Path:
    """One row per (run, step): training loss, its cross-entropy part, aux loss, step seconds."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["run", "step", "tokens", "loss", "ce", "aux", "step_seconds", "timed"])
        for name, rows in logs.items():
            secs = {int(t["step"]): t for t in times.get(name, [])}
            for r in rows:
                t = secs.get(int(r["step"]), {"seconds": float("nan"), "counted": 0.0})
                w.writerow([name, int(r["step"]), int(r["tokens"]), f"{r['loss']:.6f}", f"{r['ce']:.6f}",
                            f"{r['aux']:.6f}", f"{t['seconds']:.5f}", int(t["counted"])])
    return path


def plot_curves(path: Path, curves: dict[str, Sequence[dict[str, float]]], *, target_loss: float | None = None,
                reach_tokens: float | None = None, title: str = "") -> Path:
    """Validation loss vs training tokens, one line per run; marks where the Grouter run reaches
    the baseline's final loss."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for name, curve in curves.items():
        pts = sorted(curve, key=lambda c: c["tokens"])
        ax.plot([c["tokens"] / 1e6 for c in pts], [c["val_loss"] for c in pts], marker="o", markersize=3,
                label=name)
    if target_loss is not None:
        ax.axhline(target_loss, color="grey", linestyle=":", linewidth=1, label="baseline final")
    if reach_tokens is not None:
        ax.axvline(reach_tokens / 1e6, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation loss (nats / byte)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    lows = [c["val_loss"] for curve in curves.values() for c in curve if c["step"] > 0]
    if lows:  # step 0 (ln 257 = 5.55) would squash the interesting part
        top = max(lows)
        ax.set_ylim(min(lows) - 0.05 * (top - min(lows) + 1e-3), top + 0.05 * (top - min(lows) + 1e-3))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_load_csv(path: Path, loads: dict[str, torch.Tensor]) -> Path:
    """One row per (run, layer, expert): assignment count and fraction of the layer's."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["run", "layer", "expert", "assignments", "fraction"])
        for name, load in loads.items():
            frac = load_fractions(load)
            for layer in range(load.shape[0]):
                for e in range(load.shape[1]):
                    w.writerow([name, layer, e, int(load[layer, e]), f"{float(frac[layer, e]):.6f}"])
    return path


def plot_heatmaps(path: Path, loads: dict[str, torch.Tensor], *, title: str = "") -> Path:
    """Side-by-side layer x expert heatmaps of the share of assignments, one shared colour scale;
    1/E is a perfectly balanced layer."""
    plt = _pyplot()
    names = list(loads)
    fracs = {n: load_fractions(loads[n]).numpy() for n in names}
    vmax = max(float(f.max()) for f in fracs.values())
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names) + 0.8, 3.2), dpi=100, squeeze=False)
    im = None
    for ax, name in zip(axes[0], names):
        f = fracs[name]
        im = ax.imshow(f, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"{name} (1/E = {1 / f.shape[1]:.3f})", fontsize=10)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(f.shape[0]))
    fig.colorbar(im, ax=list(axes[0]), label="fraction of the layer's assignments")
    if title:
        fig.suptitle(title, fontsize=10, y=1.04)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
