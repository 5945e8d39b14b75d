"""Training evidence for Grouter mode (issue 6, item 4; arXiv 2603.06626 section 4.1).

On the built-in corpus (the Python standard library's sources, byte tokens):

  (a) train a source Qwen3-MoE language model with its learned router + aux balance loss;
  (b) distill a Grouter from its first MoE router (found by the project's detection pass) and
      tune it for balance;
  (c) train a fresh target Qwen3-MoE twice, from the same init on the same tokens: baseline =
      learned router + aux loss (``torch.compile``), Grouter run =
      ``apply_grouter(model, GrouterConfig(routing=GrouterRouting(grouter)))``;
  (d) write validation-loss curves, expert-load heatmaps (PNG + CSV), the data-utilisation and
      step-throughput ratios, MaxVio of both runs, ``summary.json`` and ``summary.md``.

Usage::

    python examples/train_grouter.py --scale smoke            # < 1 min, what CI runs
    python examples/train_grouter.py --scale cpu              # about an hour on 2 cores
    python examples/train_grouter.py --scale paper-cpu        # source on 10x the target's tokens
    python examples/train_grouter.py --scale gpu              # CUDA

Every phase writes its result under ``--out`` (default ``out/train_grouter/<scale>``) and is
skipped when run again; training phases checkpoint and resume. ``--until tune`` stops before the
target runs.

The process re-executes itself once with glibc's allocator thresholds pinned (unpinned large
frees page-fault back in every step and make step times uneven, docs/performance.md). OpenMP's
wait policy is left at its default, what users run: ``OMP_WAIT_POLICY=PASSIVE`` makes every short
parallel region pay a thread wake-up, which slows the many small ATen ops of the baseline arm far
more than the grouter arms and would bias the per-step times. On a machine shared with other
jobs, set ``OMP_WAIT_POLICY=PASSIVE`` yourself (spinning threads then crawl) and read the step
times as loaded.
"""

from __future__ import annotations

import os
import sys

PINNED = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
if sys.platform.startswith("linux") and any(os.environ.get(k) != v for k, v in PINNED.items()):
    os.execvpe(sys.executable, [sys.executable, *sys.argv], {**os.environ, **PINNED})

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import shlex  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grouter_training.pipeline import ALL_PHASES, GROUTER_IMPLS, Pipeline, RunOptions  # noqa: E402
from grouter_training.scales import SCALES, get_scale  # noqa: E402

log = logging.getLogger("train_grouter")

PHASES = (*ALL_PHASES, "report")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="smoke")
    p.add_argument("--out", type=Path, default=None, help="output directory (default out/train_grouter/<scale>)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the scale's)")
    p.add_argument("--no-resume", action="store_true", help="recompute every phase, ignore checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--until", choices=PHASES, default="report", help="stop after this phase")
    p.add_argument("--target-steps", type=int, default=None, help="override the target runs' steps")
    p.add_argument("--grouter-impl", choices=GROUTER_IMPLS, default="pass",
                   help="pass: the graph rewrite (default); hooks: a hand-written eager reference, for when this "
                        "checkout has no Grouter mode (its step times say nothing about the pass)")
    p.add_argument("--grouter-attention", choices=("causal", "bidirectional"), default=None,
                   help="ablation: the Grouter's attention (default: the scale's, causal; bidirectional is the "
                        "reference code's and lets a token's routing see the next token)")
    p.add_argument("--gate-scale", type=float, default=None,
                   help="ablation: the Grouter gates' scaling factor in the target run (default: the Grouter's, 2.5)")
    p.add_argument("--target-seed", type=int, default=None,
                   help="initialisation seed of both target arms (default: the scale's); a repeat with another "
                        "seed measures the run-to-run spread")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    scale = get_scale(args.scale)
    if args.target_steps is not None:
        scale = scale.replace(target_train=dataclasses.replace(scale.target_train, steps=args.target_steps))
    if args.grouter_attention is not None:
        scale = scale.replace(grouter=scale.grouter.replace(causal=args.grouter_attention == "causal"))
    if args.target_seed is not None:
        scale = scale.replace(target_seed=args.target_seed)
    if args.gate_scale is not None:
        scale = scale.replace(target_gate_scale=args.gate_scale)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cpu":
        torch.set_num_threads(args.threads or scale.threads)
    # source, teacher and both target arms are instances of one class: their frames share
    # Dynamo's cache, so the default recompile limit would be reached by design, not by a bug
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
    out = args.out or Path("out") / "train_grouter" / args.scale
    command = "python examples/train_grouter.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    opts = RunOptions(out_dir=out, resume=not args.no_resume, progress=not args.no_progress, device=device,
                      grouter_impl=args.grouter_impl, command=command)
    pipe = Pipeline(scale, opts)
    log.info("scale %s on %s, %d threads, output %s", scale.name, device, torch.get_num_threads(), out)
    if args.until != "report" and args.until not in pipe.phases():
        raise SystemExit(f"--until {args.until}: scale {scale.name} has no such phase (its phases: "
                         f"{', '.join(pipe.phases())}, report)")
    for phase in pipe.phases():
        getattr(pipe, phase)()
        if phase == args.until:
            log.info("stopping after phase %s (--until)", phase)
            return 0
    summary = pipe.report(command)
    print((out / "summary.md").read_text())
    log.info("summary: %s", out / "summary.json")
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
