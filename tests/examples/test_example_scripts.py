"""Every example script runs as its docstring says, at the smallest size it takes.

Each test starts the script in a fresh process (as a user would) and checks its exit status and
the line that says it did its job; numbers are checked where the script checks them itself
(the demo's parity, the distributed run's loss). ``train_grouter.py``, ``hf_trainer.py`` and
``gpu_check.py --dry-run`` have their own test files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# each script compiles its models from a cold Inductor cache in a fresh process (about 80 CPU-seconds
# for the tiny demo): `make test-examples` runs these, `make test` leaves them out
pytestmark = pytest.mark.examples


def run(args: list[str], *, timeout: int = 600, cwd: Path = ROOT, env: dict | None = None) -> str:
    out = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    assert out.returncode == 0, f"{args}: exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out.stdout + out.stderr


@pytest.mark.slow
def test_demo_at_a_tiny_size():
    text = run(["-m", "grouter_pass.demo", "--layers", "1", "--hidden", "32", "--ffn", "16", "--experts", "4",
                "--topk", "2", "--batch", "1", "--seq", "16", "--iters", "1"])
    assert "model.layers.0.mlp" in text and "Parity" in text, text[-3000:]


@pytest.mark.slow
def test_quickstart():
    text = run(["examples/quickstart.py"])
    assert text.count("-> rewritten") == 2, text[-2000:]


def test_inspect_mixtral_writes_its_page(tmp_path):
    doc = tmp_path / "inspection.md"
    html = tmp_path / "mixtral.html"
    run(["examples/inspect_mixtral.py", "--doc", str(doc), "--html", str(html)])
    page = doc.read_text()
    assert "# Inspecting a rewrite" in page and "grouter.route" in page
    assert "<html" in html.read_text().lower()


def test_make_routing_then_traffic(tmp_path):
    npz = tmp_path / "routing.npz"
    run(["examples/distributed/make_routing.py", "clustered", "-o", str(npz), "--samples", "16", "--experts", "8",
         "--clusters", "2"])
    assert npz.stat().st_size > 0
    text = run(["examples/distributed/traffic.py", "--routing", str(npz), "--ep", "2", "4"])
    assert "| 2 |" in text or "EP 2" in text or "ep=2" in text.lower(), text[-2000:]


@pytest.mark.slow
def test_train_ep_with_torchrun_on_two_cpu_ranks():
    text = run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "examples/distributed/train_ep.py", "--mode", "learned", "--steps", "2"], timeout=900)
    assert "loss" in text.lower(), text[-2000:]


def test_bench_experts_op_tiny():
    text = run(["examples/benchmarks/bench_experts_op.py", "--tokens", "64", "--hidden", "32", "--ffn", "16",
                "--experts", "4", "--topk", "2", "--warmup", "0", "--iters", "1"])
    assert "ms" in text, text[-2000:]


def test_bench_moe_block_tiny():
    text = run(["examples/benchmarks/bench_moe_block.py", "--tokens", "64", "--hidden", "32", "--ffn", "16",
                "--experts", "4", "--topk", "2", "--warmup", "0", "--iters", "1", "--rows", "grouter,dense_bound"])
    assert "grouter exact" in text and "dense bound" in text, text[-2000:]


@pytest.mark.slow
def test_bench_training_step_tiny():
    text = run(["examples/benchmarks/bench_training_step.py", "--tokens", "32", "--seq", "16", "--layers", "1",
                "--experts", "4", "--topk", "2", "--hidden", "32", "--ffn", "16", "--vocab", "64", "--warmup", "0",
                "--iters", "1"])
    assert "training step: 1 layers" in text and "grouter precomputed" in text, text[-2000:]


@pytest.mark.slow
def test_bench_sizes_tiny():
    text = run(["examples/benchmarks/bench_sizes.py", "--sizes", "tiny", "--data", "random", "--warmup", "1",
                "--iters", "1"])
    assert "| tiny | random |" in text, text[-2000:]


@pytest.mark.slow
def test_bench_compile_time_tiny():
    text = run(["examples/benchmarks/bench_compile_time.py", "--sizes", "tiny"])
    assert "tiny" in text and "grouter" in text, text[-2000:]


def test_probe_memory_tiny():
    text = run(["examples/benchmarks/probe_memory.py", "--experts", "4", "--hidden", "32", "--ffn", "16",
                "--tokens", "16"])
    assert "grouter" in text and "MiB" in text, text[-2000:]
