"""Candidates that must *not* be rewritten, and the reasons users see for them.

Gating variants (the tiny Qwen3-MoE with its router's forward replaced) that differ from every
known family in one detail are read by what they compute and rewritten exactly. What the ops
cannot compute (an unknown expert activation) is left exactly as it is, with the step and node
that failed logged once at INFO; non-MoE top-k's must not be reported at all.
"""

import logging

import pytest
import torch
import torch.nn.functional as F

from grouter_pass import apply_grouter, grouter_reports
from grouter_pass.config import GrouterConfig
from grouter_pass.passes import run_grouter_passes
from grouter_pass.testing.graphs import capture_graphs
from grouter_pass.testing.models import DenseMLPModel, tiny_hf_moe, tiny_token_ids
from grouter_pass.testing.parity import check_parity, exact_ops
from tests.passes.conftest import SlotGatherExperts


def _route_with(variant):
    """A Qwen3-MoE whose routers compute ``variant(router, hidden) -> (logits, weights, ids)``."""
    model = tiny_hf_moe("qwen3_moe")
    for layer in model.model.layers:
        router = layer.mlp.gate
        router.forward = variant.__get__(router)
    return model


def scale_before_renorm(self, hidden):
    hidden = hidden.reshape(-1, self.hidden_dim)
    logits = F.linear(hidden, self.weight)
    v, i = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
    v = v * 2.0
    return logits, v / v.sum(dim=-1, keepdim=True), i   # the scale cancels: plain renorm


def squared_weights(self, hidden):
    hidden = hidden.reshape(-1, self.hidden_dim)
    logits = F.linear(hidden, self.weight)
    v, i = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
    v = v / v.sum(dim=-1, keepdim=True)
    return logits, v.pow(2), i  # an op no gating spec has: the gating is kept as written


def softmax_over_tokens(self, hidden):
    hidden = hidden.reshape(-1, self.hidden_dim)
    logits = F.linear(hidden, self.weight)
    v, i = torch.topk(torch.softmax(logits, dim=0), self.top_k, dim=-1)
    return logits, v, i  # not a per-token score: it stays in the graph, route starts after it


def run(model, **kwargs):
    (gm,) = capture_graphs(model, tiny_token_ids(), **kwargs)
    new_gm, report = run_grouter_passes(gm, None, GrouterConfig())
    return gm, new_gm, report


@pytest.mark.parametrize("variant,family,describe", [
    (scale_before_renorm, "softmax_topk", "softmax -> top-2, renorm sum"),
    (squared_weights, "kept", "top-2, gating kept as written"),
    (softmax_over_tokens, "topk", "[softmax] -> none -> top-2"),
])
def test_unusual_gating_is_read_by_meaning_and_rewritten_exactly(variant, family, describe):
    """Spellings a grammar of known families would refuse: each is read for what it computes
    (or kept as written) and the rewritten model computes the same numbers, forward and backward."""
    model = _route_with(variant).train()
    compiled = []

    def compile_fn(m):
        compiled.append(apply_grouter(m, GrouterConfig(compiler="eager")))
        return compiled[-1]

    result = check_parity(model, {"input_ids": tiny_token_ids()}, compile_fn,
                          expect_ops=exact_ops(2, route=family != "kept"))
    assert result.ok, result.summary()
    (report,) = grouter_reports(compiled[0])
    assert [s.rewritten for s in report.sites] == [True, True], [s.summary() for s in report.sites]
    assert {s.family for s in report.sites} == {family}
    assert report.sites[0].gating.describe() == describe


def test_unsupported_experts_are_left_unchanged_with_the_step_and_node(grouter_logs):
    graphs = capture_graphs(SlotGatherExperts(F.mish), torch.randn(10, 64))   # an activation the op lacks
    gm = graphs[0]
    new_gm, report = run_grouter_passes(gm, None, GrouterConfig())
    assert new_gm is gm, "nothing may change when no site is rewritten"
    (site,) = report.sites
    assert not site.rewritten and site.partial
    assert site.step == "experts probe" and site.node, site
    assert "no reading of the expert weights" in site.reason
    infos = [r.getMessage() for r in grouter_logs.records if r.levelno == logging.INFO and "left" in r.getMessage()]
    assert len(infos) == 1 and "experts probe at node" in infos[0]


def test_model_without_moe_is_not_touched(grouter_logs):
    gm, new_gm, report = run(DenseMLPModel())
    assert new_gm is gm and report.sites == []


def test_auxiliary_loss_topk_is_not_a_site():
    """With ``output_router_logits=True`` the load-balancing loss runs its own softmax -> top-k
    on the router logits; it feeds no experts and must be neither rewritten nor reported."""
    model = tiny_hf_moe("qwen3_moe", output_router_logits=True, router_aux_loss_coef=0.01)
    # transformers collects router logits under a lock, which Dynamo cannot enter: several graphs
    graphs = capture_graphs(lambda ids: model(ids, labels=ids).loss, tiny_token_ids())
    sites, aux_topks = [], 0
    for gm in graphs:
        new_gm, report = run_grouter_passes(gm, None, GrouterConfig())
        sites += report.sites
        aux_topks += sum(1 for n in new_gm.graph.nodes if n.target in (torch.topk, "topk"))
    # after a graph break, module paths are relative to the module whose frame Dynamo restarted in
    assert sorted(s.module_path.removeprefix("model.") for s in sites) == ["layers.0.mlp", "layers.1.mlp"]
    assert all(s.rewritten for s in sites)
    assert aux_topks == 2  # the load-balancing loss keeps its own top-k, one per layer


class _Sampler(torch.nn.Module):
    """A tiny LM's generation step: top-k sampling over vocabulary logits."""

    def __init__(self):
        super().__init__()
        self.lm = DenseMLPModel()

    def forward(self, ids):
        logits, _ = self.lm(ids)
        vals, idx = torch.topk(logits[:, -1], 5, dim=-1)
        choice = torch.multinomial(torch.softmax(vals, dim=-1), 1)
        return idx.gather(-1, choice)


class _TopKAttention(torch.nn.Module):
    """Sparse attention: each query keeps its top-k keys (q @ k^T has a token dim, not experts)."""

    def __init__(self, hidden=64):
        super().__init__()
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(0, 1)
        vals, idx = torch.topk(scores, 3, dim=-1)
        return torch.einsum("nk,nkh->nh", torch.softmax(vals, dim=-1), v[idx])


class _EightWayClassifier(torch.nn.Module):
    """A linear with 8 outputs (as many as a router would have) whose top-2 pick label embeddings."""

    def __init__(self, hidden=64):
        super().__init__()
        self.head = torch.nn.Linear(hidden, 8, bias=False)
        self.labels = torch.nn.Embedding(8, hidden)

    def forward(self, x):
        w, idx = torch.topk(torch.softmax(self.head(x), dim=-1), 2, dim=-1)
        return (self.labels(idx) * w.unsqueeze(-1)).sum(1)


@pytest.mark.parametrize("model,inputs", [
    (_Sampler(), (tiny_token_ids(),)),
    (_TopKAttention(), (torch.randn(10, 64),)),
    (_EightWayClassifier(), (torch.randn(10, 64),)),
    (DenseMLPModel(), (tiny_token_ids(),)),  # softmax over the vocabulary, then top-k
], ids=["topk_sampling", "attention_topk", "eight_way_classifier", "vocab_softmax_topk"])
def test_not_a_moe_site(model, inputs, grouter_logs):
    graphs = capture_graphs(model, *inputs)
    for gm in graphs:
        new_gm, report = run_grouter_passes(gm, None, GrouterConfig())
        assert new_gm is gm and report.sites == []
    assert not [r for r in grouter_logs.records if r.levelno >= logging.INFO and r.name.startswith("grouter_pass")]
