"""``examples/hf_trainer.py``: the HF ``Trainer`` recipes train, exact mode with the model's own
numbers, Grouter (pre-dispatch) mode with the routers frozen and one compilation."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")   # the Trainer needs it

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

import hf_trainer  # noqa: E402

import grouter_pass  # noqa: E402


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.slow
def test_exact_mode_trains_like_the_unmodified_model(tmp_path):
    eager = hf_trainer.train_eager(tmp_path / "eager", steps=3)
    exact = hf_trainer.train_exact(tmp_path / "exact", steps=3, compiler="aot_eager")
    assert len(_losses(exact)) == 3
    torch.testing.assert_close(torch.tensor(_losses(exact)), torch.tensor(_losses(eager)), rtol=1e-4, atol=1e-4)
    reports = grouter_pass.grouter_reports(exact.model)
    assert reports and len(reports[-1].rewritten) == 2


@pytest.mark.slow
def test_precomputed_mode_freezes_the_routers_and_compiles_once(tmp_path):
    trainer = hf_trainer.train_precomputed(tmp_path / "pre", steps=3, compiler="aot_eager")
    model = trainer.model._orig_mod if hasattr(trainer.model, "_orig_mod") else trainer.model
    before = hf_trainer.tiny_moe()   # same seed: the initial weights
    routers = [n for n, _ in model.named_parameters() if n.endswith("mlp.gate.weight")]
    assert len(routers) == 2
    for name in routers:
        p = model.get_parameter(name)
        assert not p.requires_grad and p.grad is None
        assert torch.equal(p, before.get_parameter(name)), f"{name} moved"
    moved = [n for n, p in model.named_parameters() if p.requires_grad
             and not torch.equal(p, before.get_parameter(n))]
    assert moved, "nothing trained"
    # the warm-up compile, then one recompile at the first step (freezing the routers changed
    # their requires_grad, which Dynamo guards on); none per batch after that
    assert len(grouter_pass.grouter_reports(trainer.model)) == 2, "recompiled per batch"
    assert all(torch.isfinite(torch.tensor(_losses(trainer))))
