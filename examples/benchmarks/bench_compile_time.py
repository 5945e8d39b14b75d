"""Benchmark: compile time of the grouter backend against ``torch.compile``, and the pass's share.

Compile time is the first training step minus the second (the first compiles forward and
backward). Each arm runs in its own process with Inductor's and AOT autograd's caches disabled,
so neither arm reuses the other's work. The pass's own share is the sum of its pipeline's timings
(``grouter: pass ... took`` at DEBUG from ``grouter_pass.passes``).

Model: transformers Qwen3-MoE from config (random init, fp32), allocator pinned, OpenMP at its
default wait policy. Sizes:
  ``large``   8 layers, E=64, k=8, H=256, I=128, 8 x 512 tokens (the size sweep's largest)
  ``30b``     one Qwen3-30B-A3B layer: E=128, k=8, H=2048, I=768, 32 heads (4 KV), 1 x 2048 tokens

    python examples/benchmarks/bench_compile_time.py [--sizes large 30b]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time

PINNED = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296",
          "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
if any(os.environ.get(k) != v for k, v in PINNED.items()):
    os.execvpe(sys.executable, [sys.executable, *sys.argv], {**os.environ, **PINNED})

SIZES = {   # layers, E, k, H, I, heads, kv heads, batch, seq
    "large": (8, 64, 8, 256, 128, 4, 2, 8, 512),
    "30b": (1, 128, 8, 2048, 768, 32, 4, 1, 2048),
    "tiny": (1, 4, 2, 64, 32, 4, 2, 1, 16),   # not a benchmark: the smoke test's size (tests/examples)
}
VOCAB = 512
ARMS = ("torch.compile", "grouter")


class _PassTimes(logging.Handler):
    """Sums the pipeline's per-pass timings as they are logged."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seconds = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        m = re.match(r"grouter: pass \S+ took ([0-9.]+) ms", record.getMessage())
        if m:
            self.seconds += float(m.group(1)) / 1e3


def _model(size: str):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    layers, e, k, h, i, heads, kv, _, seq = SIZES[size]
    cfg = transformers.AutoConfig.for_model(
        "qwen3_moe", vocab_size=VOCAB, hidden_size=h, intermediate_size=4 * h, moe_intermediate_size=i,
        num_experts=e, num_experts_per_tok=k, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, head_dim=h // heads, norm_topk_prob=True, max_position_embeddings=max(4096, seq))
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).train()


def run_arm(size: str, arm: str, threads: int) -> dict:
    """One arm in this process: build, compile (first step), a second step."""
    import torch

    from grouter_pass import apply_grouter
    from grouter_pass.testing.timing import lm_training_step

    torch.set_num_threads(threads)
    times = _PassTimes()
    logger = logging.getLogger("grouter_pass.passes")
    logger.addHandler(times)
    logger.setLevel(logging.DEBUG)
    *_, batch, seq = SIZES[size]
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))
    model = _model(size)
    compiled = torch.compile(model) if arm == "torch.compile" else apply_grouter(model)
    step = lm_training_step(compiled, ids)
    seconds = []
    for _ in range(2):
        t0 = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t0)
    return {"size": size, "arm": arm, "first": seconds[0], "second": seconds[1],
            "compile": seconds[0] - seconds[1], "pass": times.seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["large", "30b"])
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)   # a child process's one arm
    args = p.parse_args(argv)
    if args.arm:
        print(json.dumps(run_arm(args.sizes[0], args.arm, args.threads)))
        return 0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    before = os.getloadavg()[0]
    rows = []
    for size in args.sizes:
        for arm in ARMS:
            out = subprocess.run([sys.executable, __file__, "--sizes", size, "--arm", arm,
                                  "--threads", str(args.threads)], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"code {commit or 'unknown'}; load average {before:.2f} before, {os.getloadavg()[0]:.2f} after; "
          f"{args.threads} threads")
    print("| size | torch.compile | grouter | of which the pass | step after compiling (compile vs grouter) |")
    print("|---|---:|---:|---:|---:|")
    for size in args.sizes:
        base, ours = (next(r for r in rows if r["size"] == size and r["arm"] == a) for a in ARMS)
        change = 100 * (ours["compile"] / base["compile"] - 1)
        print(f"| {size} | {base['compile']:.1f} s | {ours['compile']:.1f} s ({change:+.0f}%) | {ours['pass']:.1f} s "
              f"| {base['second']:.2f} s vs {ours['second']:.2f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
