"""The ops that carry all-to-all split sizes into a compiled graph (``grouter_pass/ops/split_sizes.py``):
opcheck, what they read, the refusal outside a step, and one compilation for changing sizes."""

from __future__ import annotations

import pytest
import torch

import grouter_pass.ops  # noqa: F401
from grouter_pass.distributed.splits import EPSplits, compute_ep_splits
from grouter_pass.runtime import StepPlan, running_step

KEY = 987654


def active_step_splits(key, splits):
    return running_step(key, StepPlan(splits=splits))


def _splits():
    counts = torch.tensor([[3, 0, 2, 1], [1, 4, 0, 2]])   # [R=2, E=4]: two ranks, two experts each
    return compute_ep_splits(counts, rank=1)


def test_split_size_reads_one_count():
    counts = torch.tensor([5, 0, 7])
    assert [torch.ops.grouter.split_size(counts, i) for i in range(3)] == [5, 0, 7]
    torch.library.opcheck(torch.ops.grouter.split_size.default, (counts, 2))


def test_step_ops_read_the_active_step():
    splits = _splits()   # rank 1 sends [1+4, 0+2] and receives [2+1, 0+2]
    anchor = torch.randn(3)
    with active_step_splits(KEY, splits):
        sizes = [torch.ops.grouter.step_split_size(anchor, KEY, i, 0) for i in range(4)]
        recv = torch.ops.grouter.step_recv_counts(anchor, KEY, 2, 2, 0)
        torch.library.opcheck(torch.ops.grouter.step_split_size.default, (anchor, KEY, 3, 1))
        torch.library.opcheck(torch.ops.grouter.step_recv_counts.default, (anchor, KEY, 2, 2, 1))
    assert sizes == [5, 2, 3, 2]
    assert recv.tolist() == [[2, 1], [0, 2]]


def test_step_ops_outside_a_step_are_refused():
    with pytest.raises(RuntimeError, match="none were computed for this call"):
        torch.ops.grouter.step_split_size(torch.randn(2), KEY, 0, 0)
    with active_step_splits(KEY, _splits()), pytest.raises(ValueError, match=r"this graph expects \[4, 1\]"):
        torch.ops.grouter.step_recv_counts(torch.randn(2), KEY, 4, 1, 0)


def test_changing_sizes_compile_once():
    """The sizes are unbacked in the graph: new values each call, one compilation, no host read
    in the traced code."""
    from torch._dynamo.testing import CompileCounter

    def f(x):
        n0 = torch.ops.grouter.step_split_size(x, KEY, 0, 0)
        n1 = torch.ops.grouter.step_split_size(x, KEY, 1, 0)
        a, b = torch.split(x, [n0, n1])
        return a.sum() * 2 + b.sum()

    counter = CompileCounter()
    compiled = torch.compile(f, backend=counter, fullgraph=True)
    for n0, n1 in ((2, 3), (0, 5), (4, 1)):
        # one rank: index 0 reads the send split, index 1 the receive split
        splits = EPSplits(input_splits=[n0], output_splits=[n1], recv_counts_RL=torch.tensor([[n1]]))
        x = torch.randn(n0 + n1)
        with active_step_splits(KEY, splits):
            torch.testing.assert_close(compiled(x), f(x))
    assert counter.frame_count == 1
