"""``GrouterConfig(expert_parallel=mesh)``: the rewrite runs an unmodified model's MoE layers
expert-parallel on gloo, 2 and 4 CPU processes (see ``_rewrite_workers.py``): parity with the
single-process model in exact and Grouter modes, the collectives in the AOT graphs, one
compilation for steps with different split sizes, FSDP2 + EP training, and the refusals.
"""

from __future__ import annotations

import pytest

from ._rewrite_workers import worker_rewrite_ep2, worker_rewrite_ep4
from ._spawn import assert_check, run_spawned

LAYERS = 2


# the module-scoped fixture below is costly: keep this file on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_ep_rewrite")


@pytest.fixture(scope="module")
def ep2(tmp_path_factory):
    return run_spawned(worker_rewrite_ep2, 2, tmp_path_factory.mktemp("rewrite_ep2"))


@pytest.fixture(scope="module")
def ep4(tmp_path_factory):
    return run_spawned(worker_rewrite_ep4, 4, tmp_path_factory.mktemp("rewrite_ep4"))


def _results(world, ep2, ep4):
    return {2: ep2, 4: ep4}[world]


@pytest.mark.parametrize("world,check", [(2, "exact"), (2, "exact_placed"), (4, "exact"), (2, "exact_sharded"),
                                         (4, "exact_sharded")])
def test_exact_mode_ep_matches_single_process(ep2, ep4, world, check):
    """Learned routers: loss and every gradient (experts: this rank's rows, or the stored
    ``[E/R, ...]`` shards after ``shard_expert_parameters(keep_shape=True)``, in which case the full
    expert tensors must not be built in the compiled graphs; routers, norms,
    embedding, head: summed over ranks) within 1e-5 of the eager model on the global batch, over
    steps with different (one skewed) routing, one compilation. Forward graph: per layer one
    int64 count all-to-all + two float token all-to-alls and the host read of the split sizes
    (``grouter.split_size``); backward: the two reverse token all-to-alls per layer."""
    for rec in assert_check(_results(world, ep2, ep4), check):
        assert rec["max_rel_err"] <= 1e-5
        assert rec["fw"]["all_to_all"] == ["int64", "float32", "float32"] * LAYERS, rec["fw"]
        assert rec["fw"]["other"] == [] and len(rec["fw"]["host_reads"]) == 2 * world * LAYERS, rec["fw"]
        assert rec["bw"]["all_to_all"] == ["float32"] * (2 * LAYERS) and not rec["bw"]["host_reads"], rec["bw"]
        assert rec["expert_parallel"]["split_sizes"] == "per layer (count all-to-all)"


@pytest.mark.parametrize("world,check", [(2, "precomputed_placed"), (2, "precomputed_given_splits"), (2, "hash"),
                                         (2, "grouter"), (4, "precomputed_placed"), (2, "precomputed_sharded_placed")])
def test_grouter_modes_ep_match_single_process_without_count_exchange(ep2, ep4, world, check):
    """Precomputed (with a placement; with splits given by the caller), hash and Grouter routing:
    parity with the single-process rewrite, and the compiled graphs hold only the float token
    all-to-alls (two per layer forward, two backward): no count exchange, no other collective,
    no host read. One compilation for all steps although the split sizes change every step."""
    for rec in assert_check(_results(world, ep2, ep4), check):
        assert rec["max_rel_err"] <= 1e-5
        for kind in ("fw", "bw"):
            assert rec[kind] == {"all_to_all": ["float32"] * (2 * LAYERS), "other": [], "host_reads": []}, rec[kind]
        assert rec["expert_parallel"]["split_sizes"] == "once per step, before the graph"


@pytest.mark.parametrize("check", ["exact_inductor", "precomputed_inductor"])
def test_ep_rewrite_compiles_with_inductor(ep2, check):
    """The default compiler: Inductor compiles the forward and backward with the unbacked split
    sizes (one compilation for two steps with different sizes), same numbers."""
    for rec in assert_check(ep2, check):
        assert rec["max_rel_err"] <= 1e-5


def test_ep_rewrite_on_a_2d_mesh(ep4):
    """(dp=2, ep=2): EP inside each ep group, expert gradients summed over dp by the caller."""
    for rec in assert_check(ep4, "mesh_2d"):
        assert rec["max_rel_err"] <= 1e-5 and rec["expert_parallel"]["ep_size"] == 2


def test_fsdp2_with_ep_rewrite_trains_like_single_process(ep2):
    for rec in assert_check(ep2, "fsdp_ep"):
        assert len(rec["loss_rel_errs"]) == 3 and max(rec["loss_rel_errs"]) <= 1e-5


@pytest.mark.parametrize("world", [2, 4])
def test_ep_rewrite_refuses_mismatched_sizes(ep2, ep4, world):
    for rec in assert_check(_results(world, ep2, ep4), "refusals"):
        assert set(rec["messages"]) == {"ep_size", "placement_E", "placement_ep", "sharded_without_ep"}
