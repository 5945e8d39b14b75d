"""Distillation at scale: gradient accumulation and data parallelism compute the steps of one
process on the whole batch (within fp32 summation order)."""

import pytest
import torch

from tests.distributed._spawn import assert_check, run_spawned
from tests.router._distill_workers import run_distill, worker_data_parallel


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(torch.tensor(got[name]), torch.tensor(want[name]), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture(scope="module")
def whole_batch():
    return run_distill()


@pytest.mark.parametrize("micro", [1, 3])
def test_micro_batches_give_the_whole_batch_step(whole_batch, micro):
    """3 does not divide the batch of 4: the last micro-batch is shorter and weighs less."""
    _assert_same(run_distill(micro_batch_size=micro), whole_batch)


def test_micro_batches_change_the_result_if_weighted_wrongly(whole_batch):
    """The comparison can fail: a different batch (one more sequence) is a different run."""
    from grouter_pass.router import DistillConfig, distill
    from tests.router._distill_workers import CONFIG, SETTINGS
    from tests.router.test_distill import linear_teacher, random_corpus

    other = DistillConfig(**{**SETTINGS.__dict__, "batch_size": 5})
    g, _ = distill(linear_teacher(), CONFIG, random_corpus(3000, 1, 16), None, other, progress=False)
    assert (g.score.weight.flatten() - torch.tensor(whole_batch["score.weight"])).abs().max() > 1e-4


def test_two_data_parallel_ranks_compute_the_single_process_run(whole_batch, tmp_path):
    results = run_spawned(worker_data_parallel, 2, tmp_path)
    for check in ("ddp", "ddp_micro"):
        recs = assert_check(results, check)
        for rec in recs:
            _assert_same(rec["state"], whole_batch)
    ddp = assert_check(results, "ddp")
    assert "model.safetensors" in ddp[0]["wrote"] and ddp[1]["wrote"] == []   # rank 0 alone writes


def test_batch_must_split_over_the_ranks():
    from grouter_pass.router import DistillConfig

    with pytest.raises(ValueError, match="micro_batch_size must be >= 1, got 0"):
        DistillConfig(micro_batch_size=0)
