"""``grouter placement`` / ``grouter traffic`` end to end, and the reader of pre-dispatched
dataset directories (issue 5's format)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from grouter_pass.cli import main
from grouter_pass.distributed.placement_file import load_placement
from grouter_pass.distributed.routing_data import load_routing, save_routing

from .test_placement import E, R, clustered_routing


@pytest.fixture(scope="module")
def routing_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("routing") / "routing.npz"
    save_routing(path, clustered_routing()[0])
    return path


def test_placement_command_writes_a_checked_file(routing_file, tmp_path, capsys):
    out = tmp_path / "p.npz"
    assert main(["placement", str(routing_file), "--ep", str(R), "-o", str(out), "--no-progress"]) == 0
    assert "E=16 over ep=4 ranks" in capsys.readouterr().out
    placement = load_placement(out, num_experts=E, ep_size=R, num_samples=64)
    assert placement.metadata["local_slot_fraction"] > 0.85


def test_placement_command_refuses_bad_ep_size(routing_file, tmp_path, capsys):
    assert main(["placement", str(routing_file), "--ep", "5", "-o", str(tmp_path / "p.npz")]) == 2
    assert "expert-parallel size 5 does not divide the number of experts 16" in capsys.readouterr().err


def test_traffic_command_prints_the_three_strategies(routing_file, capsys):
    assert main(["traffic", str(routing_file), "--ep", "2", "4", "--no-progress"]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| 2 |") or line.startswith("| 4 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["none", "grouping", "grouping+placement"] * 2


def test_predispatched_directory_is_read_as_packed_windows(tmp_path):
    rng = np.random.default_rng(0)
    n, k, seq = 100, 3, 16
    ids = rng.integers(0, 32, size=(n, k)).astype(np.uint8)
    ids.tofile(tmp_path / "routing_ids.bin")
    meta = {"format": "grouter-predispatch", "version": 1, "num_tokens": n, "num_experts": 32, "top_k": k,
            "ids_dtype": "uint8", "weights_dtype": "bfloat16", "granularity": "packed", "seq_len": seq}
    (tmp_path / "routing.json").write_text(json.dumps(meta))
    routing = load_routing(tmp_path)
    assert routing.num_samples == n // seq and routing.num_experts == 32
    np.testing.assert_array_equal(routing.ids, ids[: (n // seq) * seq])
    with pytest.raises(ValueError, match="seq_len=16; cannot read it with seq_len=8"):
        load_routing(tmp_path, seq_len=8)
