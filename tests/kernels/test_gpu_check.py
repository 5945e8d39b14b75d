"""``examples/gpu_check.py --dry-run``: the GPU script's own logic (inputs, the three timed kernel
rows and their differences, FLOP and peak arithmetic, the whole-model parity and step table) on
CPU with tiny shapes, so it is ready when a GPU is."""

import importlib.util
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "examples" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_prints_every_row(capsys):
    assert _load().main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for row in ("grouter triton", "grouped_mm + torch permutation", "transformers grouped_mm experts"):
        line = next(ln for ln in out.splitlines() if ln.startswith(row))
        ms, tflops, frac, *differences = line[len(row):].split()
        assert float(ms) > 0 and float(tflops) > 0 and frac.endswith("%")
        assert len(differences) == 5 and all(float(d.rstrip(",")) < 1e-4 for d in differences)
    for row in ("eager", "torch.compile", "grouter exact", "grouter precomputed"):
        line = next(ln for ln in out.splitlines() if ln.startswith(row + " "))
        ms, tokens_per_s, ratio, first_call = line[len(row):].split()
        assert float(ms) > 0 and float(tokens_per_s) > 0 and ratio.endswith("x")
    assert "parity fp32:" in out and "'ok': True" in out
    assert "sections failed or skipped: none" in out


def test_refuses_without_cuda_unless_dry_run(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert _load().main(["--skip-tests"]) == 2
