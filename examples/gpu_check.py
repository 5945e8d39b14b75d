"""GPU check of grouter-pass: the Triton kernels' correctness and speed, then a whole model.

    python examples/gpu_check.py --out DIR       # on a CUDA machine, about 8 minutes
    python examples/gpu_check.py --dry-run       # CPU, tiny shapes: exercises the script's logic

Every section writes its result into ``DIR/gpu_check.json`` as soon as it ends (a run cut short
keeps what it measured) and is skipped, named as skipped, when the time budget is spent.

1. ``env``: device, torch, Triton and transformers versions.
2. ``correctness``: the kernel suite of ``tests/kernels/interpreted`` compiled for the GPU (the
   same tests the CPU runs under ``TRITON_INTERPRET=1``), with ``GROUTER_TEST_DEVICE=cuda``.
3. ``kernels``: speed at Qwen3-30B-A3B expert shapes (E=128, k=8, H=2048, I=768, 16k tokens,
   bf16), forward + backward (input, routing-weight and both expert-weight gradients), median of
   interleaved steps after warm-up (autotuning happens there):
     grouter triton      ``torch.ops.grouter.moe_experts`` (fused Triton kernels) + its backward
     grouped_mm + perm   argsort/gather in torch, ``torch._grouped_mm`` x2, SiLU, weighted index_add
     transformers        the ``grouped_mm`` experts implementation of ``Qwen3MoeExperts``
   printed as ms, TFLOP/s (18 S H I flops for forward+backward, S = tokens*k) and the fraction
   of a measured bf16 matmul peak (8192^3 ``torch.mm``), with each row's largest difference from
   the grouped_mm row (output and gradients).
4. ``model``: a transformers Qwen3-MoE from config on the GPU. Parity in fp32: the loss and
   every parameter gradient of ``torch.compile(model, backend="grouter")`` against eager, and
   the names of the Triton kernels that ran. Then a bf16 training step, timed: eager,
   ``torch.compile`` (Inductor, transformers' grouped_mm experts), grouter exact and grouter
   precomputed routing (a 1-layer Grouter's routing delivered with the batch).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


class Results:
    """The sections' results, rewritten to ``path`` after each one (None: print only)."""

    def __init__(self, path: pathlib.Path | None, budget_s: float) -> None:
        self.path, self.data = path, {}
        self.deadline = time.monotonic() + budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, section: str, value: object) -> None:
        self.data[section] = value
        if self.path is not None:
            self.path.write_text(json.dumps(self.data, indent=2, default=str))

    def run(self, section: str, fn: Callable[[], object], *, needs_s: float) -> object:
        """Run one section unless less than ``needs_s`` seconds are left; its failure is
        recorded (with the traceback) and the next section runs."""
        if self.left() < needs_s:
            self.record(section, {"skipped": f"{self.left():.0f} s left, needs {needs_s:.0f} s"})
            print(f"[{section}] skipped: {self.left():.0f} s left", flush=True)
            return None
        print(f"\n[{section}] ({self.left():.0f} s left)", flush=True)
        t0 = time.monotonic()
        try:
            value = fn()
        except Exception as exc:  # a section's failure is a result; the others still run
            traceback.print_exc()
            value = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
        if isinstance(value, dict):
            value["seconds"] = round(time.monotonic() - t0, 1)
        self.record(section, value)
        return value


def environment(device: torch.device) -> dict:
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0]}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name()
        info["capability"] = torch.cuda.get_device_capability()
    code = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    info["code"] = code.stdout.strip() or "unknown"
    print(info, flush=True)
    return info


def run_correctness_suite(timeout_s: int, log_path: pathlib.Path | None) -> dict:
    """The kernel tests compiled for CUDA, in a subprocess (clean Triton state)."""
    env = {**os.environ, "GROUTER_TEST_DEVICE": "cuda", "GROUTER_TRITON_AUTOTUNE": "0"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",
           str(ROOT / "tests/kernels/interpreted")]
    try:
        import xdist  # noqa: F401

        cmd += ["-n", "8"]
    except ImportError:
        pass
    print("correctness:", " ".join(cmd[2:]), flush=True)
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, rc = f"{exc.stdout or ''}{exc.stderr or ''}\ntimed out after {timeout_s} s", -1
        out = out if isinstance(out, str) else out.decode()
    if log_path is not None:
        log_path.write_text(out)
    print(out[-6000:], flush=True)
    summary = next((ln for ln in reversed(out.splitlines()) if " in " in ln and ("passed" in ln or "failed" in ln)), "")
    failed = [ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    return {"passed": rc == 0, "summary": summary, "failed": failed[:60]}


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


# Each step returns (out, grad x, grad routing weights, grad w_up, grad w_down) so the rows can
# be compared with each other as well as timed.
Step = Callable[[], tuple[torch.Tensor, ...]]


def grouter_step(inp: dict, num_experts: int) -> Step:
    import grouter_pass  # noqa: F401  (registers the ops)

    def step() -> tuple[torch.Tensor, ...]:
        x = inp["x"].detach().requires_grad_()
        w = inp["weights"].detach().requires_grad_()
        w_up = inp["w_up"].detach().requires_grad_()
        w_down = inp["w_down"].detach().requires_grad_()
        perm, inv_perm, _, offsets = torch.ops.grouter.dispatch_plan(inp["ids"], num_experts)
        out, _ = torch.ops.grouter.moe_experts(x, w, perm, inv_perm, offsets, w_up, w_down, None, None,
                                               activation="silu", gated=True, interleaved=False, alpha=1.0, limit=0.0,
                                               up_transposed=False, down_transposed=False, weight_on_input=False,
                                               out_dtype=None)
        out.backward(inp["grad"])
        return out, x.grad, w.grad, w_up.grad, w_down.grad

    return step


def grouped_mm_step(inp: dict, num_experts: int) -> Step:
    """The usual torch formulation: permutation in torch, ``torch._grouped_mm`` for the GEMMs."""

    def step() -> tuple[torch.Tensor, ...]:
        x = inp["x"].detach().requires_grad_()
        w = inp["weights"].detach().requires_grad_()
        w_up = inp["w_up"].detach().requires_grad_()
        w_down = inp["w_down"].detach().requires_grad_()
        k = inp["ids"].shape[1]
        flat = inp["ids"].reshape(-1)
        order = torch.argsort(flat, stable=True)
        offs = torch.bincount(flat, minlength=num_experts).cumsum(0).to(torch.int32)
        tok = order // k
        rows = x.index_select(0, tok)
        gate, up = torch._grouped_mm(rows, w_up.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        y = torch._grouped_mm(torch.nn.functional.silu(gate) * up, w_down.transpose(1, 2), offs=offs)
        y = y * w.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros_like(x).index_add(0, tok, y)
        out.backward(inp["grad"])
        return out, x.grad, w.grad, w_up.grad, w_down.grad

    return step


def transformers_step(inp: dict, args: argparse.Namespace) -> Step | None:
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

    def step() -> tuple[torch.Tensor, ...]:
        experts.zero_grad(set_to_none=True)
        x = inp["x"].detach().requires_grad_()
        w = inp["weights"].detach().requires_grad_()
        out = experts(x, inp["ids"], w)
        out.backward(inp["grad"])
        return out, x.grad, w.grad, experts.gate_up_proj.grad, experts.down_proj.grad

    return step


def time_rows(steps: dict[str, Callable[[], object]], device: torch.device, warmup: int, iters: int
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


def relative_difference(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    """``max |a - b| / max |b|`` (None when either is missing)."""
    if a is None or b is None:
        return None
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def kernel_speed(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, peak_n: int) -> dict:
    peak = measure_matmul_peak(device, dtype, peak_n, iters=5 if device.type == "cuda" else 2)
    inp = make_inputs(args, device, dtype)
    steps = {"grouter triton": grouter_step(inp, args.experts),
             "grouped_mm + torch permutation": grouped_mm_step(inp, args.experts)}
    try:
        hf = transformers_step(inp, args)
        if hf is not None:
            hf()
            steps["transformers grouped_mm experts"] = hf
    except Exception as exc:  # another transformers version: the row is left out, with the reason
        print(f"transformers row left out: {type(exc).__name__}: {exc}", flush=True)
    baseline = steps["grouped_mm + torch permutation"]()
    differences = {name: [relative_difference(a, b) for a, b in zip(step(), baseline)]
                   for name, step in steps.items()}
    secs = time_rows(steps, device, args.warmup, args.iters)
    slots = args.tokens * args.topk
    flops = 18 * slots * args.hidden * args.ffn
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run)"
    print(f"\n{name}; E={args.experts} k={args.topk} H={args.hidden} I={args.ffn}, {args.tokens} tokens, {dtype}, "
          f"fwd+bwd; measured matmul peak {peak:.3g} TFLOP/s ({peak_n}^3 torch.mm)")
    print(f"{'row':34s} {'ms':>9s} {'TFLOP/s':>9s} {'of peak':>8s}  "
          "max rel. diff vs grouped_mm (out, dx, dw, dWup, dWdown)")
    rows = {}
    for row, s in secs.items():
        tflops = flops / s / 1e12
        diffs = ", ".join("-" if d is None else f"{d:.1e}" for d in differences[row])
        print(f"{row:34s} {s * 1e3:9.2f} {tflops:9.3g} {tflops / peak:8.1%}  {diffs}")
        rows[row] = {"ms": s * 1e3, "tflops": tflops, "of_peak": tflops / peak, "max_rel_diff": differences[row]}
    return {"shape": {"tokens": args.tokens, "experts": args.experts, "top_k": args.topk, "hidden": args.hidden,
                      "ffn": args.ffn, "dtype": str(dtype)}, "matmul_peak_tflops": peak, "rows": rows}


MODEL_SIZES = {  # layers, E, k, H, I, batch, seq, vocab
    "gpu": (2, 64, 8, 1024, 512, 4, 2048, 32000),
    "dry-run": (1, 4, 2, 64, 32, 1, 16, 128),
}


def make_model(size: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    layers, e, k, h, i, _, seq, vocab = MODEL_SIZES[size]
    cfg = transformers.AutoConfig.for_model(
        "qwen3_moe", vocab_size=vocab, hidden_size=h, intermediate_size=4 * h, moe_intermediate_size=i,
        num_experts=e, num_experts_per_tok=k, num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
        head_dim=128 if h >= 1024 else 16, norm_topk_prob=True, max_position_embeddings=max(4096, seq))
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype).train()


def kernels_that_ran(step: Callable[[], object], device: torch.device) -> list[str]:
    """Names of the GPU kernels of one step that come from grouter-pass (profiler)."""
    if device.type != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        sync(device)
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if any(s in n for s in ("_up_act", "_down_combine", "_down_backward",
                                                             "_grouped_dw", "_plan_")))


def model_check(size: str, device: torch.device, iters: int) -> dict:
    """Parity of the grouter backend with eager in fp32, then bf16 step times."""
    import grouter_pass
    from grouter_pass import GrouterConfig, PrecomputedRouting, apply_grouter
    from grouter_pass.router import Grouter, GrouterModelConfig

    layers, e, k, h, i, batch, seq, vocab = MODEL_SIZES[size]
    result: dict = {"size": {"layers": layers, "experts": e, "top_k": k, "hidden": h, "ffn": i, "batch": batch,
                             "seq": seq, "vocab": vocab}}
    gen = torch.Generator().manual_seed(0)
    # parity in fp32 at a smaller batch (what the contract is stated in)
    ids = torch.randint(0, vocab, (1, min(seq, 512)), generator=gen).to(device)
    eager = make_model(size, torch.float32, device)
    ours = copy.deepcopy(eager)
    compiled = torch.compile(ours, backend="grouter")
    loss_e = eager(ids, labels=ids).loss
    loss_e.backward()
    t0 = time.perf_counter()
    loss_g = compiled(ids, labels=ids).loss
    loss_g.backward()
    sync(device)
    result["parity_first_call_s"] = time.perf_counter() - t0
    grads = {}
    for (name, p_e), (_, p_g) in zip(eager.named_parameters(), ours.named_parameters()):
        if (p_e.grad is None) != (p_g.grad is None):
            grads[name] = "None in one only"
        elif p_e.grad is not None:
            grads[name] = relative_difference(p_g.grad, p_e.grad)
    numeric = [v for v in grads.values() if isinstance(v, float)]
    worst = max(grads, key=lambda n: grads[n] if isinstance(grads[n], float) else float("inf"))
    result["parity_fp32"] = {"loss_eager": loss_e.item(), "loss_grouter": loss_g.item(),
                             "loss_rel_diff": abs(loss_e.item() - loss_g.item()) / abs(loss_e.item()),
                             "worst_grad": worst, "worst_grad_rel_diff": grads[worst],
                             "grads_compared": len(numeric), "mismatched_none": [n for n, v in grads.items()
                                                                                  if not isinstance(v, float)]}
    result["parity_fp32"]["ok"] = (result["parity_fp32"]["loss_rel_diff"] < 1e-4 and not
                                   result["parity_fp32"]["mismatched_none"] and max(numeric, default=0) < 1e-3)
    print("parity fp32:", result["parity_fp32"], flush=True)

    def fp32_step() -> None:
        ours.zero_grad(set_to_none=True)
        compiled(ids, labels=ids).loss.backward()

    result["triton_kernels_ran"] = kernels_that_ran(fp32_step, device)
    print("grouter kernels in the compiled step:", result["triton_kernels_ran"], flush=True)
    eager = ours = compiled = None  # free the fp32 models before the bf16 ones

    # bf16 training step, timed
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    torch.manual_seed(1)
    grouter = Grouter(GrouterModelConfig(vocab_size=vocab, hidden_size=256, num_heads=4, num_layers=1,
                                         intermediate_size=512, num_experts=e, top_k=k)).to(device)
    with torch.no_grad():
        weights, expert_ids = grouter.route(ids)
    weights = weights.to(torch.bfloat16)

    from grouter_pass.testing.timing import lm_training_step

    def lm_step(model: Callable, context: Callable | None = None) -> Callable[[], None]:
        return lm_training_step(model, ids, context)

    def compile_baseline() -> Callable:
        model = make_model(size, torch.bfloat16, device)
        try:
            model.set_experts_implementation("grouped_mm")
        except Exception as exc:  # older transformers: its default experts path
            result["baseline_experts_implementation"] = f"default ({exc})"
        return torch.compile(model)

    rows = {"eager": lm_step(make_model(size, torch.bfloat16, device)),
            "torch.compile": lm_step(compile_baseline()),
            "grouter exact": lm_step(torch.compile(make_model(size, torch.bfloat16, device), backend="grouter")),
            "grouter precomputed": lm_step(apply_grouter(make_model(size, torch.bfloat16, device),
                                                         GrouterConfig(routing=PrecomputedRouting())),
                                           lambda: grouter_pass.routing(weights, expert_ids))}
    first = {}
    for name, step in rows.items():  # first calls (compilation, autotuning) timed apart
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        first[name] = time.perf_counter() - t0
    secs = time_rows(rows, device, warmup=1, iters=iters)
    base = secs["torch.compile"]
    tokens = batch * seq
    print(f"\nbf16 training step: {layers} layers, E={e} k={k} H={h} I={i}, {batch} x {seq} tokens")
    print(f"{'row':22s} {'ms/step':>9s} {'tokens/s':>10s} {'vs compile':>10s} {'first call s':>12s}")
    result["bf16_step"] = {}
    for name, s in secs.items():
        print(f"{name:22s} {s * 1e3:9.2f} {tokens / s:10.0f} {base / s:9.2f}x {first[name]:12.1f}")
        result["bf16_step"][name] = {"ms": s * 1e3, "tokens_per_s": tokens / s, "speedup_vs_compile": base / s,
                                     "first_call_s": first[name]}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, no correctness suite")
    p.add_argument("--out", type=pathlib.Path, default=None, help="folder for gpu_check.json and the suite's log")
    p.add_argument("--budget-s", type=float, default=480, help="sections that would start past this are skipped")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-model", action="store_true")
    args = p.parse_args(argv)
    if args.dry_run:
        args.tokens, args.experts, args.topk, args.hidden, args.ffn = 64, 8, 2, 32, 16
        args.warmup, args.iters, args.skip_tests = 1, 2, True
        device, dtype, peak_n, size = torch.device("cpu"), torch.float32, 256, "dry-run"
    elif not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to exercise the script on CPU")
        return 2
    else:
        device, dtype, peak_n, size = torch.device("cuda"), torch.bfloat16, 8192, "gpu"
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    results = Results(args.out / "gpu_check.json" if args.out else None, args.budget_s)
    results.run("env", lambda: environment(device), needs_s=0)
    if not args.skip_tests:
        results.run("correctness", lambda: run_correctness_suite(
            timeout_s=int(min(200, results.left() - 200)), log_path=args.out / "correctness.log" if args.out else None),
            needs_s=260)
    results.run("kernels", lambda: kernel_speed(args, device, dtype, peak_n), needs_s=60)
    if not args.skip_model:
        results.run("model", lambda: model_check(size, device, iters=max(args.iters // 2, 2)), needs_s=120)
    failed = [name for name, v in results.data.items()
              if isinstance(v, dict) and ("error" in v or v.get("passed") is False or v.get("skipped"))]
    print("\nsections failed or skipped:", failed or "none", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
