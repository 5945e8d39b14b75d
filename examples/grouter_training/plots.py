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
    """One row per (run, step): training loss, its cross-entropy part, aux and z-loss, step seconds."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["run", "step", "tokens", "loss", "ce", "aux", "z", "step_seconds", "timed"])
        for name, rows in logs.items():
            secs = {int(t["step"]): t for t in times.get(name, [])}
            for r in rows:
                t = secs.get(int(r["step"]), {"seconds": float("nan"), "counted": 0.0})
                w.writerow([name, int(r["step"]), int(r["tokens"]), f"{r['loss']:.6f}", f"{r['ce']:.6f}",
                            f"{r['aux']:.6f}", f"{r.get('z', 0.0):.6f}", f"{t['seconds']:.5f}", int(t["counted"])])
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


def _by_tokens(curves: Sequence[Sequence[dict[str, float]]]) -> tuple[list[float], list[list[float]]]:
    """The evaluation points all seeds share, and each seed's loss there."""
    common = sorted(set.intersection(*[{c["tokens"] for c in curve} for curve in curves]))
    rows = [[next(c["val_loss"] for c in curve if c["tokens"] == t) for curve in curves] for t in common]
    return common, rows


def write_arm_curves_csv(path: Path, curves: dict[str, Sequence[Sequence[dict[str, float]]]]) -> Path:
    """One row per (arm, evaluation): every seed's validation loss, their mean and standard error."""
    import statistics

    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        n_seeds = max(len(c) for c in curves.values())
        w.writerow(["arm", "tokens", *[f"seed_{i}" for i in range(n_seeds)], "mean", "se"])
        for arm, per_seed in curves.items():
            tokens, rows = _by_tokens(per_seed)
            for t, vals in zip(tokens, rows):
                se = statistics.stdev(vals) / len(vals) ** 0.5 if len(vals) > 1 else 0.0
                w.writerow([arm, int(t), *[f"{v:.6f}" for v in vals], f"{statistics.fmean(vals):.6f}", f"{se:.6f}"])
    return path


def plot_arm_bands(path: Path, curves: dict[str, Sequence[Sequence[dict[str, float]]]], *, title: str = "") -> Path:
    """Validation loss vs tokens per arm: the mean over seeds with a band of one standard error."""
    import statistics

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=100)
    lows = []
    for arm, per_seed in curves.items():
        tokens, rows = _by_tokens(per_seed)
        mean = [statistics.fmean(v) for v in rows]
        se = [statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else 0.0 for v in rows]
        x = [t / 1e6 for t in tokens]
        (line,) = ax.plot(x, mean, marker="o", markersize=2, label=f"{arm} (n={len(per_seed)})")
        ax.fill_between(x, [m - s for m, s in zip(mean, se)], [m + s for m, s in zip(mean, se)],
                        color=line.get_color(), alpha=0.2)
        lows += [m for t, m in zip(tokens, mean) if t > 0]
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation loss (nats / byte), mean ± s.e. over seeds")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if lows:
        top, low = max(lows), min(lows)
        ax.set_ylim(low - 0.05 * (top - low + 1e-3), top + 0.05 * (top - low + 1e-3))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
