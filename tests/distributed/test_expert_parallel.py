"""Expert parallelism on gloo, 2 and 4 CPU processes: parity with the single-process model
(exact and precomputed routing, eager and compiled), no count exchange in the compiled graph,
FSDP2 + EP training, and refusal of an EP size that does not divide E.

Each world size is spawned once (module-scoped fixture) and runs all its checks; see
``_workers.py`` for what each check compares.
"""

from __future__ import annotations

import pytest

from ._spawn import assert_check, run_spawned
from ._workers import worker_ep2, worker_ep4

# the module-scoped fixture below is costly: keep this file on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_expert_parallel")


@pytest.fixture(scope="module")
def ep2(tmp_path_factory):
    return run_spawned(worker_ep2, 2, tmp_path_factory.mktemp("ep2"))


@pytest.fixture(scope="module")
def ep4(tmp_path_factory):
    return run_spawned(worker_ep4, 4, tmp_path_factory.mktemp("ep4"))


@pytest.mark.parametrize("check", ["exact", "exact_placed", "precomputed"])
def test_ep2_matches_single_process(ep2, check):
    """Loss and every gradient (experts, routers, norms, embedding, head) within 1e-5 relative."""
    for rec in assert_check(ep2, check):
        assert rec["max_rel_err"] <= 1e-5


@pytest.mark.parametrize("check", ["exact", "precomputed"])
def test_ep4_matches_single_process(ep4, check):
    for rec in assert_check(ep4, check):
        assert rec["max_rel_err"] <= 1e-5


@pytest.mark.parametrize("world", [2, 4])
def test_ep_op_matches_moe_experts_for_other_layouts(ep2, ep4, world):
    """Transposed weights without biases; non-gated GELU with the weight on the input."""
    for rec in assert_check({2: ep2, 4: ep4}[world], "op_variants"):
        assert rec["max_rel_err"] <= 1e-5


def test_ep2_compiled_precomputed_has_no_count_exchange(ep2):
    """aot_eager forward and backward graphs: one graph each, only the 2-per-layer token
    all-to-alls (float32), no integer all-to-all, no other collective, no host read; at most one
    recompile when the split sizes change every step."""
    for rec in assert_check(ep2, "compiled_precomputed"):
        assert rec["max_rel_err"] <= 1e-5 and rec["unique_graphs"] <= 2


def test_ep2_fsdp2_with_ep_trains_like_single_process(ep2):
    for rec in assert_check(ep2, "fsdp_ep"):
        assert len(rec["loss_rel_errs"]) == 3 and max(rec["loss_rel_errs"]) <= 1e-5


@pytest.mark.parametrize("world", [2, 4])
def test_ep_size_not_dividing_experts_is_refused(ep2, ep4, world):
    results = {2: ep2, 4: ep4}[world]
    for rec in assert_check(results, "bad_ep_size"):
        assert f"expert-parallel size {world}" in rec["message"]
