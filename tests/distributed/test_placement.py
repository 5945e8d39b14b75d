"""Offline placement: on a routing with known clusters of experts and samples, the grouping
recovers the clusters, every sample lands on its cluster's rank, cross-rank traffic falls
accordingly; the placement file round-trips and refuses other sizes naming both values."""

from __future__ import annotations

import numpy as np
import pytest

from grouter_pass.distributed.placement import (
    PlacementConfig,
    affinity_entropy,
    build_placement,
    capacities,
    place_samples,
    sample_affinity,
)
from grouter_pass.distributed.placement_file import load_placement, save_placement
from grouter_pass.distributed.routing_data import RoutingData, load_routing, save_routing
from grouter_pass.distributed.sampler import PlacementSampler
from grouter_pass.distributed.traffic import simulate_traffic

E, R, K, SEQ = 16, 4, 2, 32


def clustered_routing(num_samples: int = 64, in_cluster: float = 0.9, seed: int = 0
                      ) -> tuple[RoutingData, list[set[int]], np.ndarray]:
    """Experts shuffled into R clusters of E/R; each sample belongs to one cluster (balanced) and
    each of its tokens picks K distinct experts, from its cluster with probability ``in_cluster``
    and uniformly otherwise. Samples of a cluster are interleaved so round robin mixes them."""
    rng = np.random.default_rng(seed)
    clusters = rng.permutation(E).reshape(R, E // R)
    sample_cluster = rng.permutation(np.arange(num_samples) % R)
    ids = np.empty((num_samples, SEQ, K), dtype=np.int64)
    for s in range(num_samples):
        for t in range(SEQ):
            pool = clusters[sample_cluster[s]] if rng.random() < in_cluster else np.arange(E)
            ids[s, t] = rng.choice(pool, size=K, replace=False)
    return RoutingData.from_sequences(ids, E), [set(c.tolist()) for c in clusters], sample_cluster


@pytest.fixture(scope="module")
def clustered():
    return clustered_routing()


def test_affinity_rows_sum_to_k_and_entropy_bounds(clustered):
    routing, _, _ = clustered
    phi = sample_affinity(routing)
    np.testing.assert_allclose(phi.sum(axis=1), K)
    h = affinity_entropy(phi, K)
    assert (h > 0).all() and (h <= np.log2(E) + 1e-9).all()


def test_grouping_and_sample_placement_recover_the_clusters(clustered):
    routing, clusters, sample_cluster = clustered
    placement = build_placement(routing, PlacementConfig(ep_size=R))
    m = E // R
    groups = [set(placement.expert_perm[r * m:(r + 1) * m].tolist()) for r in range(R)]
    assert sorted(map(sorted, groups)) == sorted(map(sorted, clusters))
    # every sample sits on the rank that holds its cluster, and ranks are balanced
    rank_of_cluster = {c: groups.index(clusters[c]) for c in range(R)}
    np.testing.assert_array_equal(placement.sample_rank, [rank_of_cluster[c] for c in sample_cluster])
    assert np.bincount(placement.sample_rank, minlength=R).tolist() == [routing.num_samples // R] * R


def test_traffic_falls_with_grouping_and_placement(clustered):
    routing, _, _ = clustered
    rows = {r.strategy: r for r in simulate_traffic(routing, (R,))}
    none, grouping, both = rows["none"], rows["grouping"], rows["grouping+placement"]
    # random layout: about (R-1)/R of the pairs cross; grouping alone keeps round robin samples
    assert none.remote_pair_fraction > 0.6 and grouping.remote_pair_fraction > 0.6
    # all in-cluster picks stay local: only the ~10% uniform picks (3/4 of them remote) cross
    assert both.remote_pair_fraction < 0.15
    assert both.per_slot_bytes_per_step < none.per_slot_bytes_per_step / 4
    assert both.dedup_bytes_per_step < none.dedup_bytes_per_step / 3


def test_capacity_binds_when_all_samples_prefer_one_rank():
    score = np.tile([[5.0, 1.0, 0.0]], (7, 1))
    score[:, 1] += np.arange(7) * 0.1            # regret decreases with the index
    out = place_samples(score, capacities(7, 3))
    assert np.bincount(out, minlength=3).tolist() == [3, 2, 2]
    assert set(np.flatnonzero(out == 0)) == {0, 1, 2}   # largest regret first


def test_high_entropy_samples_are_placed_last():
    score = np.array([[1.0, 0.0], [0.9, 0.0]])
    out = place_samples(score, np.array([1, 1]), filler=np.array([True, False]))
    assert out.tolist() == [1, 0]


def test_placement_file_round_trip_and_refusals(clustered, tmp_path):
    routing, _, _ = clustered
    placement = build_placement(routing, PlacementConfig(ep_size=R))
    path = tmp_path / "placement.npz"
    save_placement(path, placement)
    back = load_placement(path, num_experts=E, ep_size=R, num_samples=routing.num_samples)
    np.testing.assert_array_equal(back.expert_perm, placement.expert_perm)
    np.testing.assert_array_equal(back.sample_rank, placement.sample_rank)
    assert back.metadata["top_k"] == K
    with pytest.raises(ValueError, match=r"num_experts=16, but this run has num_experts=32"):
        load_placement(path, num_experts=32)
    with pytest.raises(ValueError, match=r"ep_size=4 ranks, but this run has ep_size=8"):
        load_placement(path, ep_size=8)


def test_build_refuses_ep_size_not_dividing_experts(clustered):
    routing, _, _ = clustered
    with pytest.raises(ValueError, match="expert-parallel size 6 does not divide the number of experts 16"):
        build_placement(routing, PlacementConfig(ep_size=6))


def test_sampler_equal_samples_per_rank_and_step_reconstruction(clustered):
    routing, _, _ = clustered
    placement = build_placement(routing, PlacementConfig(ep_size=R))
    samplers = [PlacementSampler(placement, r, seed=3) for r in range(R)]
    orders = [list(s) for s in samplers]
    assert {len(o) for o in orders} == {routing.num_samples // R}
    assert sorted(sum(orders, [])) == list(range(routing.num_samples))
    for r, o in enumerate(orders):
        assert (placement.sample_rank[o] == r).all()
    step = samplers[0].step_samples(1, batch_size=2)          # rank 0 knows what every rank reads
    assert [s.tolist() for s in step] == [o[2:4] for o in orders]


def test_routing_file_round_trip(clustered, tmp_path):
    routing, _, _ = clustered
    save_routing(tmp_path / "r.npz", routing)
    back = load_routing(tmp_path / "r.npz")
    assert back.ids.dtype == np.uint8 and back.num_experts == E
    np.testing.assert_array_equal(back.ids, routing.ids)
    np.testing.assert_array_equal(back.offsets, routing.offsets)
    with pytest.raises(ValueError, match="outside"):
        RoutingData(ids=routing.ids, offsets=routing.offsets, num_experts=8)
