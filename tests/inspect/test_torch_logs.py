"""``TORCH_LOGS="grouter_pass"`` and ``TORCH_LOGS="+grouter_pass.inspect.diff"`` during ordinary
compiles: the package's own logger names, no top-level modules.

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
PREFIX = re.compile(r"^[IWEDCV]\d{4} [\d:.]+ \d+ \S+:\d+\] (\[[^\]]*\] )?", re.M)

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
def test_torch_logs_grouter_pass_prints_one_line_per_site_in_both_front_doors():
    logs = _run("grouter_pass")
    for door, text in logs.items():
        lines = _site_lines(text)
        assert len(lines) == 2, (door, text)
        assert "blocks.0" in lines[0] and "blocks.1" in lines[1]
        assert lines[0].rstrip().endswith("-> rewritten")
        assert "+grouter_route" not in text, door   # the diff is its own channel


@pytest.mark.slow
def test_torch_logs_diff_channel_prints_the_tagged_diff_in_both_front_doors():
    logs = _run("+grouter_pass.inspect.diff")
    for door, text in logs.items():
        assert _site_lines(text) == [], door
        assert "--- before\n+++ after" in text, (door, text)
        assert text.count("grouter.route(") == 2
        assert "  # router: blocks.0" in text and "  # experts: blocks.1" in text
        assert "# removed: blocks.0" in text


def test_the_distribution_installs_no_top_level_logging_modules():
    import importlib.util

    assert importlib.util.find_spec("grouter") is None and importlib.util.find_spec("grouter_diff") is None


def test_torch_trace_dump_holds_the_rewrite_as_artifacts(tmp_path):
    import json

    script = textwrap.dedent("""
        import torch
        from grouter_pass import GrouterConfig, apply_grouter
        from grouter_pass.testing.handwritten import DenseBmmMoE, TinyMoELM

        torch.manual_seed(0)
        model = TinyMoELM(DenseBmmMoE, layers=2)
        apply_grouter(model, GrouterConfig(compiler="eager"), verify=True)(torch.randint(0, 97, (2, 5)))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_LOGS", "TORCH_TRACE")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**env, "TORCH_TRACE": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    artifacts: dict[str, list[str]] = {}
    for log_file in tmp_path.iterdir():
        lines = log_file.read_text().splitlines()
        for i, line in enumerate(lines):
            start = line.find("] {")
            if line.startswith("\t") or start < 0:
                continue
            head = json.loads(line[start + 2:])
            if "artifact" in head and head["artifact"]["name"].startswith("grouter_"):
                payload = []
                for x in lines[i + 1:]:
                    if not x.startswith("\t"):
                        break
                    payload.append(x[1:])
                artifacts.setdefault(head["artifact"]["name"], []).append("\n".join(payload))
    assert set(artifacts) == {"grouter_sites", "grouter_graph_before", "grouter_graph_after", "grouter_diff",
                              "grouter_parity"}, sorted(artifacts)
    sites = json.loads(artifacts["grouter_sites"][0])["sites"]
    assert len(sites) == 2 and all(s["rewritten"] for s in sites)
    assert "torch.ops.grouter.route" in artifacts["grouter_graph_after"][0]
    assert "grouter.route" not in artifacts["grouter_graph_before"][0] and artifacts["grouter_diff"][0].strip()
    parity = json.loads(artifacts["grouter_parity"][0])
    assert parity["outputs"] and all(row["ok"] for row in parity["outputs"])
