"""Candidates that must *not* be rewritten, and the reasons users see for them.

The variants are the tiny Qwen3-MoE with its router's forward replaced by code that differs
from a supported family in one detail. Each must be left exactly as it is, with the reason
logged once at INFO; non-MoE top-k's must not be reported at all.
"""

import logging

import pytest
import torch
import torch.nn.functional as F

from grouter_pass.config import GrouterConfig
from grouter_pass.passes import run_grouter_passes
from grouter_pass.testing.graphs import capture_graphs
from grouter_pass.testing.models import DenseMLPModel, tiny_hf_moe, tiny_token_ids


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
    return logits, v / v.sum(dim=-1, keepdim=True), i


def squared_weights(self, hidden):
    hidden = hidden.reshape(-1, self.hidden_dim)
    logits = F.linear(hidden, self.weight)
    v, i = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
    v = v / v.sum(dim=-1, keepdim=True)
    return logits, v.pow(2), i  # an op no family knows, feeding the experts


def softmax_over_tokens(self, hidden):
    hidden = hidden.reshape(-1, self.hidden_dim)
    logits = F.linear(hidden, self.weight)
    v, i = torch.topk(torch.softmax(logits, dim=0), self.top_k, dim=-1)
    return logits, v, i


def run(model, **kwargs):
    (gm,) = capture_graphs(model, tiny_token_ids(), **kwargs)
    new_gm, report = run_grouter_passes(gm, None, GrouterConfig())
    return gm, new_gm, report


@pytest.mark.parametrize("variant,reason", [
    (scale_before_renorm, "routing weights are renormalised after scaling or casting"),
    (squared_weights, "experts probe 0 (random routing): classified as [grouped_mm"),
    (softmax_over_tokens, "softmax is not over the expert dim"),
])
def test_variant_is_left_unchanged_with_reason(variant, reason, grouter_logs):
    gm, new_gm, report = run(_route_with(variant))
    assert new_gm is gm, "nothing may change when no site is rewritten"
    partial = [s for s in report.sites if s.partial]
    assert len(partial) == 2 and not report.rewritten
    assert all(reason in s.reason for s in partial), [s.reason for s in partial]
    infos = [r.getMessage() for r in grouter_logs.records if r.levelno == logging.INFO and "left" in r.getMessage()]
    assert len(infos) == 2 and reason in infos[0]


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
