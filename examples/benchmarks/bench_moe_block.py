"""Benchmark: one fine-grained MoE block (Qwen3-MoE style), forward + backward, fp32, CPU.

Rows (all in one process, same inputs, same warm-up, median of timed calls):
  grouter exact      the transformers block compiled with backend="grouter" (Inductor)
  grouter reference  the same compiled block with GROUTER_KERNELS=reference: the experts op runs
                     its plain reference instead of the expert-parallel CPU path (for comparison)
  hf grouped_mm      transformers' default experts implementation, eager
  hf grouped_mm+compile   the same under torch.compile (Inductor)
  hf eager loop      transformers' per-expert loop (experts_implementation="eager")
  dense bound        the same expert FLOPs as two plain dense matmuls (+ activation), the
                     speed a perfect grouped GEMM would reach

Method (../shared/reference/benchmarking.md): glibc's allocator thresholds pinned (the script
re-executes itself with them if they are missing), threads fixed, >= 3 warm-up calls (so
compilation is excluded), median of >= 8 timed calls. Ratios are to the dense bound; absolute
times drift between runs on a shared machine, ratios within one run hold.

    python examples/benchmarks/bench_moe_block.py [--tokens 4096] [--threads 2] [--iters 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys

PINNED = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
if any(os.environ.get(k) != v for k, v in PINNED.items()):
    os.execvpe(sys.executable, [sys.executable, *sys.argv], {**os.environ, **PINNED})

import torch  # noqa: E402

from grouter_pass.testing.timing import time_interleaved  # noqa: E402


def make_block(impl: str, args: argparse.Namespace) -> torch.nn.Module:
    import transformers
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    transformers.logging.set_verbosity_error()
    cfg = transformers.Qwen3MoeConfig(hidden_size=args.hidden, moe_intermediate_size=args.ffn,
                                      num_experts=args.experts, num_experts_per_tok=args.topk, norm_topk_prob=True)
    cfg._experts_implementation = impl
    torch.manual_seed(0)
    block = Qwen3MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.normal_(0, 0.05)
        block.experts.gate_up_proj.normal_(0, 0.05)
        block.experts.down_proj.normal_(0, 0.05)
    return block


class DenseBound(torch.nn.Module):
    """The expert FLOPs of the block as plain dense GEMMs: rows [N*K, H] -> [N*K, 2F] -> SwiGLU ->
    [N*K, H], forward and backward (input and weight gradients), nothing else: no router, no
    gather, no combine. Called with the [N*K, H] rows directly."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.up = torch.nn.Parameter(torch.randn(args.hidden, 2 * args.ffn) * 0.05)
        self.down = torch.nn.Parameter(torch.randn(args.ffn, args.hidden) * 0.05)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        gate, up = (rows @ self.up).chunk(2, dim=-1)
        return (torch.nn.functional.silu(gate) * up) @ self.down


class WithEnv:
    """Calls ``fn`` with environment variables set for the duration of the call (the grouter ops
    read ``GROUTER_KERNELS`` at each call)."""

    def __init__(self, fn, **env: str) -> None:
        self.fn, self.env = fn, env

    def __call__(self, *args):
        before = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            return self.fn(*args)
        finally:
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def time_rows(rows: dict[str, tuple], warmup: int, iters: int) -> dict[str, float]:
    """Median forward+backward ms of each ``name -> (fn, input, grad)``, steps interleaved."""

    def step(fn, x, grad):
        if isinstance(fn, WithEnv):
            return lambda: WithEnv(lambda: fn.fn(x.detach().requires_grad_()).backward(grad), **fn.env)()
        return lambda: fn(x.detach().requires_grad_()).backward(grad)

    return time_interleaved({name: step(*row) for name, row in rows.items()}, warmup=warmup, iters=iters)


def profile_row(fn, x: torch.Tensor, grad: torch.Tensor, steps: int = 3) -> None:
    """Self CPU time per op of ``steps`` forward+backward steps (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn(x.detach().requires_grad_()).backward(grad)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\nwhere the grouter row spends its time ({steps} steps, self CPU time per op):")
    print(f"  {'op':44s} {'ms/step':>8s} {'share':>6s} {'calls/step':>10s}")
    for e in events[:12]:
        print(f"  {e.key[:44]:44s} {e.self_cpu_time_total / 1e3 / steps:8.1f} {e.self_cpu_time_total / total:6.1%} "
              f"{e.count // steps:10d}")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001
        return platform.processor() or "unknown"


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
    p.add_argument("--rows", default="grouter,hf_grouped_mm,hf_grouped_mm_compiled,hf_eager_loop,dense_bound")
    p.add_argument("--profile", action="store_true", help="also print where the grouter row spends its time")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import grouter_pass
    from grouter_pass import GrouterConfig, apply_grouter, grouter_reports

    x = torch.randn(1, args.tokens, args.hidden)
    grad = torch.randn(1, args.tokens, args.hidden)
    slots = args.tokens * args.topk
    wanted = args.rows.split(",")
    todo: dict[str, tuple] = {}
    if "dense_bound" in wanted:
        todo["dense bound"] = (DenseBound(args), torch.randn(slots, args.hidden), torch.randn(slots, args.hidden))
    if "grouter" in wanted:
        compiled = apply_grouter(make_block("grouped_mm", args), GrouterConfig())
        todo["grouter exact"] = (compiled, x, grad)
    if "grouter_reference" in wanted:
        compiled_ref = apply_grouter(make_block("grouped_mm", args), GrouterConfig())
        todo["grouter exact, reference experts"] = (WithEnv(compiled_ref, GROUTER_KERNELS="reference"), x, grad)
    if "hf_grouped_mm" in wanted:
        todo["hf grouped_mm (eager)"] = (make_block("grouped_mm", args), x, grad)
    if "hf_grouped_mm_compiled" in wanted:
        todo["hf grouped_mm + torch.compile"] = (torch.compile(make_block("grouped_mm", args)), x, grad)
    if "hf_eager_loop" in wanted:
        todo["hf eager loop"] = (make_block("eager", args), x, grad)
    rows = time_rows(todo, args.warmup, args.iters)
    if "grouter" in wanted:
        assert len(grouter_reports(compiled)[-1].rewritten) == 1, "the block was not rewritten"
    if args.profile and "grouter" in wanted:
        profile_row(compiled, x, grad)

    bound = rows.get("dense bound")
    peers = [v for k, v in rows.items() if k.startswith("hf")]
    best_peer = min(peers) if peers else None
    print(f"MoE block E={args.experts} k={args.topk} H={args.hidden} I={args.ffn}, {args.tokens} tokens, fp32, "
          f"fwd+bwd, {args.threads} threads, median of {args.iters} interleaved steps after {args.warmup} warm-up")
    print(f"torch {torch.__version__}, grouter-pass {grouter_pass.__version__}, CPU: {cpu_model()}, "
          f"allocator pinned ({', '.join(f'{k}={v}' for k, v in PINNED.items())})")
    print(f"{'row':32s} {'ms':>9s} {'bound/row':>10s} {'best peer/row':>14s}")
    for name, ms in rows.items():
        r_bound = f"{bound / ms:10.2f}" if bound else f"{'-':>10s}"
        r_peer = f"{best_peer / ms:14.2f}" if best_peer else f"{'-':>14s}"
        print(f"{name:32s} {ms:9.1f} {r_bound} {r_peer}")


if __name__ == "__main__":
    main()
