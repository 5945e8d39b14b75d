"""``grouter.experts_from_shard``: what a sharded expert parameter reads as outside the
expert-parallel rewrite (the rewrite itself removes the op; see test_ep_rewrite.py)."""

from __future__ import annotations

import logging

import torch

import grouter_pass.ops  # noqa: F401
from grouter_pass.ops import expert_shard


def test_opcheck_and_values(caplog):
    shard = torch.randn(2, 3, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.grouter.experts_from_shard.default, (shard, 5, [3, 1]))
    expert_shard._WARNED[0] = False
    with caplog.at_level(logging.WARNING, logger="grouter_pass.ops.expert_shard"):
        full = torch.ops.grouter.experts_from_shard(shard, 5, [3, 1])
        first = len(caplog.records)
        torch.ops.grouter.experts_from_shard(shard, 5, [3, 1])   # warned once per process
        assert len(caplog.records) == first
    assert first and "the experts of other ranks read as zeros" in caplog.records[0].getMessage()
    assert full.shape == (5, 3, 4)
    torch.testing.assert_close(full[3], shard[0])
    torch.testing.assert_close(full[1], shard[1])
    assert full[[0, 2, 4]].abs().sum() == 0
    grad = torch.randn(5, 3, 4)
    full.backward(grad)
    torch.testing.assert_close(shard.grad, grad[[3, 1]])
