"""Graphs captured once per test module: capturing a transformers model costs seconds."""

import functools

import torch

from grouter_pass.passes.canonicalize import canonicalize_gating_pass
from grouter_pass.passes.detect import find_gating_sites
from grouter_pass.passes.graph_utils import copy_graph_module
from grouter_pass.testing.graphs import capture_graphs
from grouter_pass.testing.models import tiny_hf_moe, tiny_token_ids


class SlotGatherExperts(torch.nn.Module):
    """A MoE block on ``[N, H]`` tokens with per-slot gathered expert weights and ``bmm``; ``act``
    is the experts' activation (what the near-miss and gradient-proof tests vary)."""

    def __init__(self, act, hidden=64, ffn=48, experts=8, top_k=2):
        super().__init__()
        self.act, self.top_k = act, top_k
        self.router = torch.nn.Linear(hidden, experts, bias=False)
        self.w_in = torch.nn.Parameter(torch.randn(experts, ffn, hidden) * 0.1)
        self.w_out = torch.nn.Parameter(torch.randn(experts, hidden, ffn) * 0.1)

    def forward(self, x):
        w, ids = torch.topk(torch.softmax(self.router(x), dim=-1), self.top_k, dim=-1)
        flat = ids.reshape(-1)
        xs = x.repeat_interleave(self.top_k, dim=0)
        h = self.act(torch.bmm(self.w_in[flat], xs.unsqueeze(-1)).squeeze(-1))
        y = torch.bmm(self.w_out[flat], h.unsqueeze(-1)).squeeze(-1)
        return (y.view(-1, self.top_k, x.shape[-1]) * w.unsqueeze(-1)).sum(1)


@functools.cache
def captured_graph(model_type: str, dynamic: bool = False, **overrides) -> torch.fx.GraphModule:
    model = tiny_hf_moe(model_type, **overrides)
    graphs = capture_graphs(model, tiny_token_ids(), dynamic=dynamic)
    assert len(graphs) == 1, f"{model_type}: expected one Dynamo graph, got {len(graphs)}"
    return graphs[0]


def detected(model_type: str, dynamic: bool = False):
    gm = copy_graph_module(captured_graph(model_type, dynamic))
    canonicalize_gating_pass(gm)
    return gm, *find_gating_sites(gm)
