"""Graphs captured once per test module: capturing a transformers model costs seconds."""

import functools

import torch

from grouter_pass.passes.canonicalize import canonicalize_gating_pass
from grouter_pass.passes.detect import find_gating_sites
from grouter_pass.passes.graph_utils import copy_graph_module
from grouter_pass.testing.graphs import capture_graphs
from grouter_pass.testing.models import tiny_hf_moe, tiny_token_ids


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
