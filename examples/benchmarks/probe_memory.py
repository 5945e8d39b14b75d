"""Compile-time memory of the grouter pass against ``torch.compile``, on one large expert layer.

Each arm runs in its own process (``python examples/benchmarks/probe_memory.py``) and reports the
peak resident memory above what the process held once the model was built (sampled every 2 ms):

* ``compile``: ``torch.compile(model, backend="aot_eager")``;
* ``grouter``: ``apply_grouter`` with the default ``probe_weight_budget`` (the probe reads the
  model's own weights, the layer being above the budget);
* ``random``: ``apply_grouter`` with an unlimited budget (random copies of every expert weight).
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import threading
import time

ARMS = ("compile", "grouter", "random")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_arm(arm: str, experts: int, hidden: int, ffn: int, tokens: int) -> str:
    import torch

    from grouter_pass import GrouterConfig, apply_grouter, grouter_reports
    from grouter_pass.testing.handwritten import TorchtitanStyleMoE

    torch.manual_seed(0)
    model = TorchtitanStyleMoE(hidden=hidden, ffn=ffn, experts=experts, top_k=4, shared=False).bfloat16()
    x = torch.randn(1, tokens, hidden, dtype=torch.bfloat16)
    gc.collect()
    base = _rss_mib()
    peak, stop = [base], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rewritten = "-"
    if arm == "compile":
        torch.compile(model, backend="aot_eager")(x)
    else:
        budget = 2**50 if arm == "random" else GrouterConfig().probe_weight_budget
        compiled = apply_grouter(model, GrouterConfig(compiler="aot_eager", probe_weight_budget=budget))
        compiled(x)
        rewritten = str(sum(len(r.rewritten) for r in grouter_reports(compiled)))
    stop.set()
    sampler.join()
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return f"| {arm} | {weights:.0f} | {peak[0] - base:.0f} | {rewritten} |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--arm", choices=ARMS, help="run one arm in this process (default: all, one process each)")
    ap.add_argument("--experts", type=int, default=64, help="experts in the layer")
    ap.add_argument("--hidden", type=int, default=1024, help="hidden size")
    ap.add_argument("--ffn", type=int, default=2048, help="expert FFN width")
    ap.add_argument("--tokens", type=int, default=256, help="tokens in the example batch")
    args = ap.parse_args(argv)
    shape = [str(v) for v in (args.experts, args.hidden, args.ffn, args.tokens)]
    if args.arm:
        print(run_arm(args.arm, args.experts, args.hidden, args.ffn, args.tokens))
        return 0
    print("| arm | expert weights (MiB) | peak memory above the built model (MiB) | sites rewritten |")
    print("|---|---:|---:|---:|")
    for arm in ARMS:
        out = subprocess.run([sys.executable, __file__, "--arm", arm, "--experts", shape[0], "--hidden", shape[1],
                              "--ffn", shape[2], "--tokens", shape[3]], capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
