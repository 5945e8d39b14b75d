"""Benchmark: the two CPU paths of ``grouter::moe_experts`` (forward + backward) at three block
sizes, under whatever OpenMP wait policy the process was started with.

* queue path: ``ops/cpu_experts.py``, the experts split between Python threads, each running
  ATen single-threaded;
* reference: ``ops/reference.py``, one multi-threaded ATen call per GEMM.

Which one ``auto`` runs is chosen from this table (``kernel_select.use_cpu_experts``): run it as
is (OpenMP's default, idle threads spin a while) and with ``OMP_WAIT_POLICY=PASSIVE``:

    python examples/benchmarks/bench_cpu_paths.py
    OMP_WAIT_POLICY=PASSIVE python examples/benchmarks/bench_cpu_paths.py
"""

from __future__ import annotations

import os
import sys
import time

PINNED = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
if any(os.environ.get(k) != v for k, v in PINNED.items()):
    os.execvpe(sys.executable, [sys.executable, *sys.argv], {**os.environ, **PINNED})

import torch  # noqa: E402

import grouter_pass  # noqa: E402, F401  (registers the ops)
from grouter_pass.ops import reference as R  # noqa: E402
from grouter_pass.ops.cpu_experts import moe_experts_backward_cpu, moe_experts_cpu  # noqa: E402
from grouter_pass.spec import ExpertMLP  # noqa: E402

SHAPES = [(1024, 128, 64, 16, 4), (2048, 256, 256, 32, 4), (4096, 256, 128, 64, 8)]   # N, H, I, E, k
FLAGS = dict(mlp=ExpertMLP())   # SwiGLU, nn.Linear layouts


def median_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[reps // 2] * 1e3


def in_a_step(args: tuple, path: str):
    """The op with autograd, between multi-threaded ATen calls as in a model step (a GEMM before,
    the loss and the backward after); ``path`` picks the implementation the op runs."""
    x, w, perm, inv, off, wu, wd, _, _ = args
    x, wu, wd, w = (t.clone().requires_grad_() for t in (x, wu, wd, w))
    proj = torch.randn(x.shape[1], x.shape[1]) * 0.05

    def step():
        env = {"OMP_WAIT_POLICY": "PASSIVE"} if path == "queue" else {"GROUTER_KERNELS": "reference"}
        saved = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GROUTER_KERNELS")}
        os.environ.update(env)   # what the op reads to choose; OpenMP itself read its policy at start
        try:
            out, _ = torch.ops.grouter.moe_experts(x @ proj, w, perm, inv, off, wu, wd, None, None,
                                                   **FLAGS["mlp"].kwargs(), out_dtype=None)
            out.pow(2).mean().backward()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return step


def main() -> int:
    torch.set_num_threads(2)
    policy = os.environ.get("OMP_WAIT_POLICY", "default")
    print(f"OMP_WAIT_POLICY={policy}, 2 threads, torch {torch.__version__}, load {os.getloadavg()[0]:.2f}")
    print("| block (N, H, I, E, k) | alone: queue path (ms) | alone: reference | in a step: queue path | "
          "in a step: reference |")
    print("|---|---:|---:|---:|---:|")
    for n, h, i, e, k in SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, h, generator=g)
        w, ids = torch.randn(n, e, generator=g).softmax(-1).topk(k)
        w = w / w.sum(-1, keepdim=True)
        wu = torch.randn(e, 2 * i, h, generator=g) * 0.05
        wd = torch.randn(e, h, i, generator=g) * 0.05
        perm, inv, _, off = torch.ops.grouter.dispatch_plan(ids, e)
        args = (x, w, perm, inv, off, wu, wd, None, None)

        def run(fwd, bwd):
            def step():
                out, hid = fwd(*args, **FLAGS)
                bwd(torch.ones_like(out), *args, hid, **FLAGS)
            return step

        queue = median_ms(run(moe_experts_cpu, moe_experts_backward_cpu))
        ref = median_ms(run(R.moe_experts_reference, R.moe_experts_backward_reference))
        step_queue, step_ref = (median_ms(in_a_step(args, path)) for path in ("queue", "reference"))
        print(f"| {n}, {h}, {i}, {e}, {k} | {queue:.1f} | {ref:.1f} | {step_queue:.1f} | {step_ref:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
