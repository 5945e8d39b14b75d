"""The numbers the example reports, as plain functions of the recorded curves and counts.

* data utilisation (paper section 4.1, Fig. 4a): tokens the Grouter run needs to reach the
  baseline's final validation loss, as a fraction of the baseline's tokens. The Grouter curve is
  linearly interpolated between evaluations; the first crossing counts. Not reached: ``None``.
* throughput ratio: median step time of the baseline / of the Grouter run, steps after each
  (re)start's warm-up only (compilation and autotuning are excluded).
* MaxVio (paper App. H): ``max_i L_i / mean L - 1`` over expert loads, per layer; "global" pools a
  run's tokens, as the paper's MaxVio_global does.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Utilisation:
    """Where the Grouter curve first reaches ``target_loss`` (the baseline's final loss)."""

    target_loss: float
    baseline_tokens: int
    tokens_needed: float | None

    @property
    def ratio(self) -> float | None:
        """Fraction of the baseline's tokens (paper: 0.233); None when never reached."""
        return None if self.tokens_needed is None else self.tokens_needed / self.baseline_tokens

    @property
    def speedup(self) -> float | None:
        """Inverse of :attr:`ratio` (paper: 4.28x)."""
        r = self.ratio
        return None if r is None or r == 0 else 1.0 / r


def tokens_to_reach(curve: Sequence[dict[str, float]], target: float) -> float | None:
    """Tokens at which the piecewise-linear ``curve`` (``tokens``, ``val_loss``) first gets to
    ``target`` or below; None if it never does."""
    pts = sorted((float(c["tokens"]), float(c["val_loss"])) for c in curve)
    if not pts:
        return None
    if pts[0][1] <= target:
        return pts[0][0]
    for (t0, l0), (t1, l1) in zip(pts, pts[1:]):
        if l1 <= target:
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


def data_utilisation(baseline_curve: Sequence[dict[str, float]], grouter_curve: Sequence[dict[str, float]]
                     ) -> Utilisation:
    final = max(baseline_curve, key=lambda c: c["tokens"])
    return Utilisation(float(final["val_loss"]), int(final["tokens"]), tokens_to_reach(grouter_curve,
                                                                                         final["val_loss"]))


def utilisation_vs_best(baseline_curve: Sequence[dict[str, float]], grouter_curve: Sequence[dict[str, float]]
                        ) -> dict[str, float | None]:
    """A less noise-sensitive variant: the baseline's *best* validation loss, the tokens at which
    the baseline first got there, and the tokens the Grouter run needed for it (the final point of
    a short run can sit on an upward blip of its curve)."""
    best = min(baseline_curve, key=lambda c: (c["val_loss"], c["tokens"]))
    need = tokens_to_reach(grouter_curve, best["val_loss"])
    return {"target_loss": float(best["val_loss"]), "baseline_tokens": float(best["tokens"]),
            "grouter_tokens_needed": need, "ratio": None if need is None or not best["tokens"] else
            need / float(best["tokens"])}


def mean_gap(baseline_curve: Sequence[dict[str, float]], grouter_curve: Sequence[dict[str, float]], *,
             from_tokens: float) -> float | None:
    """Mean of ``baseline - grouter`` validation loss over the evaluations both runs made at or
    after ``from_tokens`` (equal data; positive: the Grouter run is ahead)."""
    g = {c["tokens"]: c["val_loss"] for c in grouter_curve}
    gaps = [c["val_loss"] - g[c["tokens"]] for c in baseline_curve if c["tokens"] >= from_tokens and c["tokens"] in g]
    return sum(gaps) / len(gaps) if gaps else None


def median_step_seconds(step_times: Sequence[dict[str, float]]) -> float | None:
    """Median of the counted steps (see the module docstring); None if none was counted."""
    counted = [t["seconds"] for t in step_times if t["counted"]]
    return statistics.median(counted) if counted else None


def max_violation_per_layer(load: torch.Tensor) -> list[float]:
    """MaxVio of each row of ``load [L, E]`` (assignment counts)."""
    load = load.double()
    mean = load.mean(-1).clamp_min(1e-12)
    return (load.max(-1).values / mean - 1).tolist()


def load_summary(load: torch.Tensor | None) -> dict[str, Any] | None:
    """MaxVio per layer, their mean and max, and of all layers pooled (``global``)."""
    if load is None or load.sum() == 0:
        return None
    per_layer = max_violation_per_layer(load)
    pooled = load.double().sum(0)
    return {"per_layer": per_layer, "mean": sum(per_layer) / len(per_layer), "max": max(per_layer),
            "global": float(pooled.max() / pooled.mean() - 1)}


def load_fractions(load: torch.Tensor) -> torch.Tensor:
    """``[L, E]`` share of each layer's assignments that each expert receives (rows sum to 1)."""
    load = load.double()
    return load / load.sum(-1, keepdim=True).clamp_min(1)


def mean_and_error(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and standard error of the mean over seeds (``None`` values, e.g. a loss never
    reached, are counted apart and left out); one value has no error."""
    xs = [float(v) for v in values if v is not None]
    out: dict[str, Any] = {"values": list(values), "n": len(xs), "missing": len(values) - len(xs),
                           "mean": None, "se": None}
    if xs:
        mean = sum(xs) / len(xs)
        out["mean"] = mean
        if len(xs) > 1:
            var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
            out["se"] = math.sqrt(var / len(xs))
    return out


def arm_statistics(seeds: dict[str, dict[str, dict[str, Any]]], arms: Sequence[str], baseline: str = "baseline"
                   ) -> dict[str, Any]:
    """Per arm of ``arms`` (in that order), over seeds (each arm compared with the baseline of its
    own seed): final validation loss, equal-data gap, data utilisation, step-time ratio, MaxVio
    on validation."""
    out: dict[str, Any] = {}
    for arm in arms:
        finals, gaps, ratios, speed, maxvio = [], [], [], [], []
        for runs in seeds.values():
            run, base = runs[arm], runs[baseline]
            final = max(run["curve"], key=lambda c: c["tokens"])["val_loss"]
            base_final = max(base["curve"], key=lambda c: c["tokens"])["val_loss"]
            finals.append(final)
            gaps.append(base_final - final)
            ratios.append(data_utilisation(base["curve"], run["curve"]).ratio)
            t_arm, t_base = median_step_seconds(run["step_times"]), median_step_seconds(base["step_times"])
            speed.append(t_base / t_arm if t_arm and t_base else None)
            load = load_summary(torch.as_tensor(run["val_load"])) if run.get("val_load") is not None else None
            maxvio.append(load["mean"] if load else None)
        out[arm] = {"final_val_loss": mean_and_error(finals), "equal_data_gap": mean_and_error(gaps),
                    "data_utilisation_ratio": mean_and_error(ratios), "throughput_ratio": mean_and_error(speed),
                    "maxvio_validation": mean_and_error(maxvio)}
    return out
