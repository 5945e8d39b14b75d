"""GPU check of the grouter Triton kernels: correctness, then forward+backward speed.

    python examples/gpu_check.py                 # on a CUDA machine, < 8 minutes
    python examples/gpu_check.py --dry-run       # CPU, tiny shapes: exercises the script's logic

1. Correctness: the kernel suite of ``tests/kernels/interpreted`` compiled for the GPU (the same
   tests the CPU runs under ``TRITON_INTERPRET=1``), with ``GROUTER_TEST_DEVICE=cuda``.
2. Speed at Qwen3-30B-A3B expert shapes (E=128, k=8, H=2048, I=768, 16k tokens, bf16), forward
   + backward (input, routing-weight and both expert-weight gradients), median of interleaved
   steps after warm-up (autotuning happens there):
     grouter triton      ``torch.ops.grouter.moe_experts`` (fused Triton kernels) + its backward
     grouped_mm + perm   argsort/gather in torch, ``torch._grouped_mm`` x2, SiLU, weighted index_add
     transformers        the ``grouped_mm`` experts implementation of ``Qwen3MoeExperts``
   printed as ms, TFLOP/s (18 S H I flops for forward+backward, S = tokens*k) and the fraction
   of a measured bf16 matmul peak (8192^3 ``torch.mm``).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_correctness_suite(timeout_s: int) -> bool:
    """The kernel tests compiled for CUDA, in a subprocess (clean Triton state)."""
    env = {**os.environ, "GROUTER_TEST_DEVICE": "cuda", "GROUTER_TRITON_AUTOTUNE": "0"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests/kernels/interpreted")]
    print("correctness:", " ".join(cmd[2:]), flush=True)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    print(proc.stdout[-3000:], proc.stderr[-2000:], sep="\n")
    return proc.returncode == 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int, iters: int) -> float:
    """TFLOP/s of an ``n^3`` ``torch.mm`` (median of ``iters``)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(iters + 2):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e12


def make_inputs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """Tokens, a softmax top-k routing from random logits, expert weights (Qwen3 layout)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    n, e, k, h, i = args.tokens, args.experts, args.topk, args.hidden, args.ffn
    logits = torch.randn(n, e, generator=g)
    w, ids = torch.topk(logits.softmax(-1), k)
    w = w / w.sum(-1, keepdim=True)

    def param(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(device=device, dtype=dtype)

    return dict(x=(torch.randn(n, h, generator=g)).to(device=device, dtype=dtype), ids=ids.to(device),
                weights=w.to(device=device, dtype=dtype), w_up=param(e, 2 * i, h), w_down=param(e, h, i),
                grad=torch.randn(n, h, generator=g).to(device=device, dtype=dtype))


def grouter_step(inp: dict, num_experts: int) -> Callable[[], None]:
    import grouter_pass  # noqa: F401  (registers the ops)

    def step() -> None:
        x = inp["x"].detach().requires_grad_()
        w = inp["weights"].detach().requires_grad_()
        perm, inv_perm, _, offsets = torch.ops.grouter.dispatch_plan(inp["ids"], num_experts)
        out, _ = torch.ops.grouter.moe_experts(x, w, perm, inv_perm, offsets, inp["w_up"], inp["w_down"], None, None,
                                               activation="silu", gated=True, interleaved=False, alpha=1.0, limit=0.0,
                                               up_transposed=False, down_transposed=False, weight_on_input=False,
                                               out_dtype=None)
        out.backward(inp["grad"])

    return step


def grouped_mm_step(inp: dict, num_experts: int) -> Callable[[], None]:
    """The usual torch formulation: permutation in torch, ``torch._grouped_mm`` for the GEMMs."""
    w_up_t = inp["w_up"].transpose(1, 2)
    w_down_t = inp["w_down"].transpose(1, 2)

    def step() -> None:
        x = inp["x"].detach().requires_grad_()
        w = inp["weights"].detach().requires_grad_()
        k = inp["ids"].shape[1]
        flat = inp["ids"].reshape(-1)
        order = torch.argsort(flat, stable=True)
        offs = torch.bincount(flat, minlength=num_experts).cumsum(0).to(torch.int32)
        tok = order // k
        rows = x.index_select(0, tok)
        gate, up = torch._grouped_mm(rows, w_up_t, offs=offs).chunk(2, dim=-1)
        y = torch._grouped_mm(torch.nn.functional.silu(gate) * up, w_down_t, offs=offs)
        y = y * w.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros_like(x).index_add(0, tok, y)
        out.backward(inp["grad"])

    return step


def transformers_step(inp: dict, args: argparse.Namespace) -> Callable[[], None] | None:
    try:
        import transformers
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
    except ImportError:
        return None
    cfg = transformers.Qwen3MoeConfig(hidden_size=args.hidden, moe_intermediate_size=args.ffn,
                                      num_experts=args.experts, num_experts_per_tok=args.topk)
    cfg._experts_implementation = "grouped_mm"
    experts = Qwen3MoeExperts(cfg).to(device=inp["x"].device, dtype=inp["x"].dtype)
    with torch.no_grad():
        experts.gate_up_proj.copy_(inp["w_up"])
        experts.down_proj.copy_(inp["w_down"])

    def step() -> None:
        x = inp["x"].detach().requires_grad_()
        w = inp["weights"].detach().requires_grad_()
        experts(x, inp["ids"], w).backward(inp["grad"])

    return step


def time_rows(steps: dict[str, Callable[[], None]], device: torch.device, warmup: int, iters: int
              ) -> dict[str, float]:
    """Median seconds per step, steps interleaved after warm-up."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, no correctness suite")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--skip-tests", action="store_true")
    args = p.parse_args(argv)
    if args.dry_run:
        args.tokens, args.experts, args.topk, args.hidden, args.ffn = 64, 8, 2, 32, 16
        args.warmup, args.iters, args.skip_tests = 1, 2, True
        device, dtype, peak_n = torch.device("cpu"), torch.float32, 256
    elif not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to exercise the script on CPU")
        return 2
    else:
        device, dtype, peak_n = torch.device("cuda"), torch.bfloat16, 8192
    ok = True
    if not args.skip_tests:
        ok = run_correctness_suite(timeout_s=300)
        print("correctness suite:", "passed" if ok else "FAILED", flush=True)
    peak = measure_matmul_peak(device, dtype, peak_n, iters=5 if device.type == "cuda" else 2)
    inp = make_inputs(args, device, dtype)
    steps = {"grouter triton": grouter_step(inp, args.experts),
             "grouped_mm + torch permutation": grouped_mm_step(inp, args.experts)}
    hf = transformers_step(inp, args)
    if hf is not None:
        steps["transformers grouped_mm experts"] = hf
    secs = time_rows(steps, device, args.warmup, args.iters)
    slots = args.tokens * args.topk
    flops = 18 * slots * args.hidden * args.ffn
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run)"
    print(f"\n{name}; E={args.experts} k={args.topk} H={args.hidden} I={args.ffn}, {args.tokens} tokens, {dtype}, "
          f"fwd+bwd; measured matmul peak {peak:.3g} TFLOP/s ({peak_n}^3 torch.mm)")
    print(f"{'row':34s} {'ms':>9s} {'TFLOP/s':>9s} {'of peak':>8s}")
    for row, s in secs.items():
        tflops = flops / s / 1e12
        print(f"{row:34s} {s * 1e3:9.2f} {tflops:9.3g} {tflops / peak:8.1%}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
