"""Runs the Triton kernels' interpreter suite (``tests/kernels/interpreted``) in a subprocess
with ``TRITON_INTERPRET=1`` and ``GROUTER_KERNELS=triton`` (see ``conftest.py`` for why a
subprocess). Run it directly, with its per-test report, as

    TRITON_INTERPRET=1 GROUTER_KERNELS=triton python -m pytest tests/kernels/interpreted
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

SUITE = pathlib.Path(__file__).parent / "interpreted"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="already interpreting: the suite runs directly")
def test_kernels_under_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "GROUTER_KERNELS": "triton"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(SUITE)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=SUITE.parents[2])
    assert proc.returncode == 0, f"interpreter suite failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-2000:]
