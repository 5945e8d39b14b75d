"""What a site becomes: the rewritten graph of one site is pinned with expecttest, and nothing of
the old gating or expert computation survives except the router linear."""

import torch
from expecttest import assert_expected_inline

from grouter_pass.config import GrouterConfig
from grouter_pass.passes import run_grouter_passes
from grouter_pass.testing.graphs import rewritten_site_text
from tests.passes.conftest import captured_graph


def rewritten(model_type: str, dynamic: bool = False):
    gm, report = run_grouter_passes(captured_graph(model_type, dynamic), None, GrouterConfig())
    assert [s.rewritten for s in report.sites] == [True, True]
    return gm


def test_qwen3_moe_site_becomes_three_ops():
    gm = rewritten("qwen3_moe")
    assert_expected_inline(rewritten_site_text(gm), """\
v0 = grouter.route(in0, None, top_k=2, score_func='softmax', order='score_then_topk', bias_mode='none', n_group=1, topk_group=1, group_score='top2_sum', renorm='sum', renorm_eps=0.0, renorm_clamp_min=None, renorm_p=1.0, scaling_factor=1.0, score_dtype=None, weights_dtype=float32, sorted=True, sparsemixer_threshold=0.0) -> (float32[10,2], int64[10,2])
v1 = getitem(v0, 0) -> float32[10,2]
v2 = getitem(v0, 1) -> int64[10,2]
v3 = grouter.dispatch_plan(v2, 8) -> (int64[20], int64[20], int64[8], int32[8])
v4 = getitem(v3, 0) -> int64[20]
v5 = getitem(v3, 1) -> int64[20]
v6 = getitem(v3, 2) -> int64[8]
v7 = getitem(v3, 3) -> int32[8]
v8 = grouter.moe_experts(in1, v1, v4, v5, v7, in2, in3, None, None, up_transposed=False, down_transposed=False, weight_on_input=False, out_dtype=float32, activation='silu', gated=True, interleaved=False, alpha=1.0, limit=0.0) -> (float32[10,64], float32[20,96])
v9 = getitem(v8, 0) -> float32[10,64]
v10 = getitem(v8, 1) -> float32[20,96]""")


def test_gpt_oss_site_keeps_biases_layouts_and_activation_parameters():
    gm = rewritten("gpt_oss")
    assert_expected_inline(rewritten_site_text(gm), """\
v0 = grouter.route(in0, None, top_k=2, score_func='softmax', order='topk_then_score', bias_mode='none', n_group=1, topk_group=1, group_score='top2_sum', renorm='none', renorm_eps=0.0, renorm_clamp_min=None, renorm_p=1.0, scaling_factor=1.0, score_dtype=None, weights_dtype=float32, sorted=True, sparsemixer_threshold=0.0) -> (float32[10,2], int64[10,2])
v1 = getitem(v0, 0) -> float32[10,2]
v2 = getitem(v0, 1) -> int64[10,2]
v3 = grouter.dispatch_plan(v2, 8) -> (int64[20], int64[20], int64[8], int32[8])
v4 = getitem(v3, 0) -> int64[20]
v5 = getitem(v3, 1) -> int64[20]
v6 = getitem(v3, 2) -> int64[8]
v7 = getitem(v3, 3) -> int32[8]
v8 = grouter.moe_experts(in1, v1, v4, v5, v7, in2, in3, in4, in5, up_transposed=True, down_transposed=True, weight_on_input=False, out_dtype=float32, activation='clamped_swiglu', gated=True, interleaved=True, alpha=1.702, limit=7.0) -> (float32[10,64], float32[20,96])
v9 = getitem(v8, 0) -> float32[10,64]
v10 = getitem(v8, 1) -> float32[20,96]""")


def test_deepseek_v3_dynamic_site_passes_the_runtime_scale_on():
    gm = rewritten("deepseek_v3", dynamic=True)
    route = next(n for n in gm.graph.nodes if n.target is torch.ops.grouter.route.default)
    scale = route.kwargs["scaling_factor"]
    assert isinstance(scale, torch.fx.Node) and scale.target == "item"  # not the constant 2.5


def test_nothing_of_the_old_sites_survives():
    gm = rewritten("mixtral")
    targets = [n.target for n in gm.graph.nodes]
    assert torch.topk not in targets and torch.sort not in targets and torch.histc not in targets
    assert not any("grouped_mm" in str(t) for t in targets)
    assert sum(t is torch.ops.grouter.moe_experts.default for t in targets) == 2
    gm.graph.lint()


def test_passes_run_one_by_one_share_a_typed_state():
    """The passes hand each other a ``PipelineState``, not ``gm.meta`` keys: run alone, one after
    another with one state, they rewrite what the pipeline rewrites; a rewrite run without a
    detection before it finds no site and leaves the graph as it was."""
    from grouter_pass.passes import (
        PipelineState,
        canonicalize_gating_pass,
        detect_gating_sites_pass,
        rewrite_exact_pass,
    )
    from grouter_pass.passes.graph_utils import copy_graph_module

    config = GrouterConfig()
    gm = copy_graph_module(captured_graph("qwen3_moe"))
    state = PipelineState()
    for p in (canonicalize_gating_pass, detect_gating_sites_pass, rewrite_exact_pass):
        gm = p(gm, None, config=config, state=state)
    assert [s.rewritten for s in state.report.sites] == [True, True]
    assert not state.sites, "the rewrite took the sites"
    assert not any(k.startswith("grouter") for k in gm.meta)
    ops = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.grouter.moe_experts.default in ops

    alone = copy_graph_module(captured_graph("qwen3_moe"))
    before = [n.format_node() for n in alone.graph.nodes]
    rewrite_exact_pass(alone, None, config=config)
    assert [n.format_node() for n in alone.graph.nodes] == before
