"""Compare finished runs of ``train_grouter.py``: one markdown table row per output directory and
one figure with the validation curves of every run (the repeats-and-ablations section of
docs/results.md is made with it).

    python examples/grouter_training/compare.py out/train_grouter/cpu=main out/train_grouter/cpu-seed3="seed 3" \\
        --png docs/results/cpu_repeats.png

Each argument is ``DIR`` or ``DIR=LABEL``; a directory whose ``summary.json`` is missing is listed
as not finished.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grouter_training.plots import _pyplot  # noqa: E402

HEADER = ("| run | baseline final | Grouter final | data util. (final) | vs baseline best | mean gap, 2nd half | "
          "throughput ratio | MaxVio val. base / Grouter | code |\n|---|---|---|---|---|---|---|---|---|")


def _row(label: str, s: dict[str, Any]) -> str:
    u, b, f = s["data_utilisation"], s["data_utilisation_vs_best"], s["final_val_loss"]
    util = "not reached" if u["ratio"] is None else f"{u['ratio']:.1%} ({u['speedup']:.2f}x)"
    best = "not reached" if b["ratio"] is None else f"{b['ratio']:.1%}"
    mv = s["maxvio_validation"]
    code = (s.get("code_version") or "unknown").split(" (exported")[0]
    return (f"| {label} | {f['baseline']:.4f} | {f['grouter']:.4f} | {util} | {best} | "
            f"{s['mean_gap_second_half']:+.4f} | {s['throughput_ratio']:.3f} | "
            f"{mv['baseline']['mean']:.2f} / {mv['grouter']['mean']:.2f} | {code} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="DIR or DIR=LABEL")
    p.add_argument("--png", type=Path, default=None, help="write the overlay of all validation curves here")
    args = p.parse_args(argv)
    rows, curves = [HEADER], {}
    for spec in args.runs:
        d, _, label = spec.partition("=")
        label = label or Path(d).name
        path = Path(d) / "summary.json"
        if not path.is_file():
            rows.append(f"| {label} | (not finished) | | | | | | | |")
            continue
        rows.append(_row(label, json.loads(path.read_text())))
        with (Path(d) / "val_loss.csv").open() as fh:
            for r in csv.DictReader(fh):
                curves.setdefault((label, r["run"]), []).append((int(r["tokens"]), float(r["val_loss"])))
    print("\n".join(rows))
    if args.png is not None and curves:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(7.2, 4.4), dpi=100)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        labels = list(dict.fromkeys(label for label, _ in curves))
        for (label, run), pts in curves.items():
            pts = sorted(p for p in pts if p[0] > 0)
            ax.plot([t / 1e6 for t, _ in pts], [v for _, v in pts], color=colors[labels.index(label) % len(colors)],
                    linestyle="-" if run == "grouter" else "--", linewidth=1.2, label=f"{label}: {run}")
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel("validation loss (nats / byte)")
        ax.set_title("solid: Grouter run, dashed: baseline (learned router + aux loss)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(args.png)
        plt.close(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
