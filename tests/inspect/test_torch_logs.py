"""``TORCH_LOGS="grouter"`` and ``TORCH_LOGS="grouter_diff"`` during ordinary compiles.

torch reads ``TORCH_LOGS`` when it is imported, so each setting runs in a fresh process; both
front doors run in it: ``backend="grouter"`` and Inductor's ``pre_grad_custom_pass``.
"""

import os
import re
import subprocess
import sys
import textwrap

import pytest

# torch's log prefix on every line of a message: "I1129 18:38:16.143000 26580 /path/file.py:46] [0/0] "
PREFIX = re.compile(r"^[IWEDC]\d{4} [\d:.]+ \d+ \S+:\d+\] (\[[^\]]*\] )?", re.M)

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from grouter_pass import GrouterPreGradPass
    from grouter_pass.testing.handwritten import DenseBmmMoE, TinyMoELM

    torch.manual_seed(0)
    model = TinyMoELM(DenseBmmMoE, layers=2)
    ids = torch.randint(0, 97, (2, 5))
    print("=== backend", file=sys.stderr, flush=True)
    torch.compile(model, backend="grouter", options={"compiler": "eager"})(ids)
    torch._dynamo.reset()
    print("=== pre_grad", file=sys.stderr, flush=True)
    torch.compile(model, options={"pre_grad_custom_pass": GrouterPreGradPass()})(ids)
""")


def _run(torch_logs: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_LOGS"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600,
                          env={**env, "TORCH_LOGS": torch_logs})
    assert proc.returncode == 0, proc.stderr[-4000:]
    _, backend, pre_grad = PREFIX.sub("", proc.stderr).split("=== ")
    return {"backend": backend, "pre_grad": pre_grad}


def _site_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "softmax_topk E=8 k=2" in line]


@pytest.mark.slow
def test_torch_logs_grouter_prints_one_line_per_site_in_both_front_doors():
    logs = _run("grouter")
    for door, text in logs.items():
        lines = _site_lines(text)
        assert len(lines) == 2, (door, text)
        assert "blocks.0" in lines[0] and "blocks.1" in lines[1]
        assert lines[0].rstrip().endswith("-> rewritten")
        assert "+grouter_route" not in text, door   # the diff is its own channel


@pytest.mark.slow
def test_torch_logs_grouter_diff_prints_the_tagged_diff_in_both_front_doors():
    logs = _run("grouter_diff")
    for door, text in logs.items():
        assert _site_lines(text) == [], door
        assert "--- before\n+++ after" in text, (door, text)
        assert text.count("grouter.route(") == 2
        assert "  # router: blocks.0" in text and "  # experts: blocks.1" in text
        assert "# removed: blocks.0" in text
