"""Benchmark: the routed-experts op alone (``grouter::moe_experts`` + its backward), CPU, fp32.

Separates the experts path from the rest of the block (router GEMM, routing, dispatch plan,
autograd bookkeeping), which ``bench_moe_block.py`` times together. Rows, all in one process,
steps interleaved, median after warm-up:
  dense bound          the expert FLOPs as two plain dense GEMMs + SwiGLU on [S, H] rows
  experts op           torch.ops.grouter.moe_experts forward + autograd backward (CPU path)
  experts op, reference    the same with GROUTER_KERNELS=reference (the plain reference path)

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        python examples/benchmarks/bench_experts_op.py [--tokens 4096] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys

PINNED = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
if any(os.environ.get(k) != v for k, v in PINNED.items()):
    os.execvpe(sys.executable, [sys.executable, *sys.argv], {**os.environ, **PINNED})

import torch  # noqa: E402

import grouter_pass  # noqa: E402,F401  (registers the ops)
from grouter_pass.testing.timing import time_interleaved  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, e, k, h, f = args.tokens, args.experts, args.topk, args.hidden, args.ffn
    x = torch.randn(n, h)
    w, ids = torch.topk(torch.randn(n, e).softmax(-1), k)
    w = w / w.sum(-1, keepdim=True)
    perm, inv_perm, _, offsets = torch.ops.grouter.dispatch_plan(ids, e)
    w_up = (torch.randn(e, 2 * f, h) * 0.05).requires_grad_()
    w_down = (torch.randn(e, h, f) * 0.05).requires_grad_()
    grad = torch.randn(n, h)
    flags = dict(activation="silu", gated=True, interleaved=False, alpha=1.0, limit=0.0, up_transposed=False,
                 down_transposed=False, weight_on_input=False, out_dtype=None)
    up = (torch.randn(h, 2 * f) * 0.05).requires_grad_()
    down = (torch.randn(f, h) * 0.05).requires_grad_()
    rows, grad_rows = torch.randn(n * k, h), torch.randn(n * k, h)

    def dense() -> None:
        r = rows.detach().requires_grad_()
        gate, u = (r @ up).chunk(2, dim=-1)
        ((torch.nn.functional.silu(gate) * u) @ down).backward(grad_rows)

    def experts(mode: str):
        def step() -> None:
            os.environ["GROUTER_KERNELS"] = mode
            xx, ww = x.detach().requires_grad_(), w.detach().requires_grad_()
            out, _ = torch.ops.grouter.moe_experts(xx, ww, perm, inv_perm, offsets, w_up, w_down, None, None, **flags)
            out.backward(grad)
        return step

    ms = time_interleaved({"dense bound": dense, "experts op": experts("auto"),
                           "experts op, reference": experts("reference")}, warmup=args.warmup, iters=args.iters)
    os.environ.pop("GROUTER_KERNELS", None)
    print(f"experts op E={e} k={k} H={h} I={f}, {n} tokens, fp32, fwd+bwd, {args.threads} threads, "
          f"median of {args.iters} interleaved steps; torch {torch.__version__}")
    for name, t in ms.items():
        print(f"{name:24s} {t:9.1f} ms  bound/row {ms['dense bound'] / t:5.2f}")


if __name__ == "__main__":
    main()
