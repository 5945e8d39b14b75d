"""Canonicalization: every spelling of a gating op becomes the same node, in-place ops become
functional only when that is provably safe, and the graph still computes the same values."""

import operator

import pytest
import torch
import torch.nn.functional as F

from grouter_pass.passes.canonicalize import canonicalize_gating_pass
from grouter_pass.passes.graph_utils import copy_graph_module
from grouter_pass.testing.graphs import capture_graphs, nodes_text


def canonical_text(fn, *args):
    (gm,) = capture_graphs(fn, *args)
    before = gm(*args)
    work = copy_graph_module(gm)
    canonicalize_gating_pass(work)
    work.recompile()
    after = work(*args)
    for a, b in zip(before if isinstance(before, (tuple, list)) else [before],
                    after if isinstance(after, (tuple, list)) else [after]):
        assert torch.equal(a, b), "canonicalization changed a value"
    # drop dead *pure* nodes for printing (FX's own DCE would also drop in-place method calls)
    for n in reversed(list(work.graph.nodes)):
        if n.op in ("call_function", "call_method") and not n.users and not str(n.target).endswith("_") \
                and n.target is not operator.setitem:
            work.graph.erase_node(n)
    return nodes_text([n for n in work.graph.nodes if n.op not in ("placeholder", "output")]), work


SPELLINGS = {
    "softmax": [lambda x: F.softmax(x, dim=-1), lambda x: torch.softmax(x, -1), lambda x: x.softmax(-1),
                lambda x: F.softmax(x, -1, _stacklevel=5)],
    "softmax_dtype": [lambda x: F.softmax(x, dim=-1, dtype=torch.float64), lambda x: x.softmax(-1, torch.float64),
                      lambda x: torch.softmax(x, dim=-1, dtype=torch.float64)],
    "topk": [lambda x: torch.topk(x, 2)[0], lambda x: x.topk(2, dim=-1)[0], lambda x: torch.topk(x, k=2, dim=1)[0]],
    "div": [lambda x: x / x.sum(-1, keepdim=True), lambda x: torch.div(x, x.sum(dim=-1, keepdim=True)),
            lambda x: x.div(torch.sum(x, -1, keepdim=True)), lambda x: x.true_divide(x.sum(-1, True))],
    "cast": [lambda x: x.double(), lambda x: x.to(torch.float64), lambda x: x.type(torch.float64),
             lambda x: x.to(dtype=torch.float64), lambda x: x.type_as(torch.zeros(1, dtype=torch.float64))],
    "sigmoid": [lambda x: torch.sigmoid(x), lambda x: F.sigmoid(x), lambda x: x.sigmoid()],
    "scale": [lambda x: x * 2.5, lambda x: 2.5 * x, lambda x: torch.mul(x, 2.5), lambda x: x.mul(2.5)],
    "clamp_min": [lambda x: x.clamp(min=1e-3), lambda x: torch.clamp(x, min=1e-3), lambda x: x.clamp_min(1e-3)],
    "norm": [lambda x: torch.norm(x, p=1, dim=-1, keepdim=True), lambda x: x.norm(1, -1, True),
             lambda x: torch.linalg.vector_norm(x, ord=1.0, dim=-1, keepdim=True)],
}


@pytest.mark.parametrize("family", sorted(SPELLINGS))
def test_all_spellings_become_one_node(family):
    x = torch.randn(5, 8)
    texts = {canonical_text(fn, x)[0] for fn in SPELLINGS[family]}
    assert len(texts) == 1, "\n---\n".join(sorted(texts))


def test_in_place_renorm_becomes_functional():
    def router(logits):
        v, i = torch.topk(torch.softmax(logits.float(), dim=-1), 2, dim=-1)
        v /= v.sum(dim=-1, keepdim=True)
        return v, i

    text, gm = canonical_text(router, torch.randn(6, 8))
    assert "itruediv" not in text and "div(" in text
    assert not any(n.target is operator.itruediv for n in gm.graph.nodes)


def test_in_place_scatter_on_fresh_tensor_becomes_functional_and_readers_follow():
    def group_mask(scores, idx):
        mask = torch.zeros_like(scores)
        mask.scatter_(1, idx, 1)
        return mask.bool()

    text, _ = canonical_text(group_mask, torch.randn(4, 6), torch.tensor([[0], [2], [5], [1]]))
    assert text.splitlines()[1].startswith("v1 = scatter(v0, -1, in1, 1)")
    assert "Tensor.to(v1, bool)" in text  # the reader after the mutation reads the new node


def test_in_place_on_a_view_is_left_alone():
    def f(x):
        y = x * 1.0
        v = y[:, :2]          # a view of y
        v.mul_(2.0)           # mutates y through the view
        return y

    text, gm = canonical_text(f, torch.randn(3, 4))
    assert "Tensor.mul_" in text


def test_in_place_on_a_graph_input_is_left_alone():
    def f(x, s):
        x /= s
        return x

    (gm,) = capture_graphs(f, torch.randn(3, 4), torch.randn(3, 1))
    work = copy_graph_module(gm)
    canonicalize_gating_pass(work)
    assert any(n.target is operator.itruediv for n in work.graph.nodes)


def test_in_place_that_would_change_dtype_is_left_alone():
    def f(x, y):
        z = x * 1.0            # fresh float32
        z.add_(y)              # y is float64: in place keeps float32, add() would promote
        return z

    text, _ = canonical_text(f, torch.randn(3), torch.randn(3, dtype=torch.float64))
    assert "Tensor.add_" in text


def test_setitem_inverse_permutation_becomes_index_put():
    def inv(perm):
        out = torch.empty_like(perm)
        out[perm] = torch.arange(perm.numel())
        return out * 1

    text, _ = canonical_text(inv, torch.randperm(7))
    assert "index_put(v0, (in0,), v1)" in text


def test_in_place_on_the_only_view_of_a_fresh_tensor_becomes_functional():
    """``bmm(...).squeeze(1).add_(bias)`` (transformers' batched_mm): nobody else can see the bmm
    result, so the in-place add is safe to make functional."""

    def f(x, w, b):
        out = torch.bmm(x.unsqueeze(1), w).squeeze(1)
        out.add_(b)
        return out * 2

    text, _ = canonical_text(f, torch.randn(4, 3), torch.randn(4, 3, 5), torch.randn(4, 5))
    assert "Tensor.add_" not in text and "add(v2, in2)" in text
    assert "mul(v3, 2)" in text  # the reader after the mutation reads the functional add
