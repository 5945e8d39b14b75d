"""Every row of the support matrix (grouter_pass/testing/support.py), checked for real.

Each case is compiled with ``apply_grouter`` (``dynamic=True``; the rewritten graph runs without
Inductor code generation, which is covered elsewhere) and trained one step at three token
counts next to the unmodified model. Checked per case: what was rewritten (family, expert
style, number of MoE layers) or the reason it was left alone; output and every gradient within
the case's tolerance; no recompile for a new token count; the Dynamo graph counts; the gating
spec, pinned per case in ``GATING_SPECS`` (each case stands alone: any order, any worker).
docs/support.md must be the rendering of the registry.

The first case of every distinct gating spec also runs with ``probe_ops=False``: the probe then
proves sites against the ops' reference semantics, so a defect in an op is compiled in and must
show in the numbers here (with the probe running the ops, it would be refused and the case would
fail on its counts). Cases that repeat a spec exercise the detector on another model, which the
probed run covers; the ops see the same arguments.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from grouter_pass import GrouterConfig, apply_grouter, grouter_reports
from grouter_pass.spec import compact_repr
from grouter_pass.testing.parity import compare_steps, default_output, run_step
from grouter_pass.testing.support import SUPPORT_CASES, SupportCase, make_inputs, render_support_md

SIZES = [(2, 5), (3, 7), (2, 11)]
ROOT = Path(__file__).resolve().parents[2]


#: the gating spec each case's first rewritten layer must be read as (``compact_repr``), pinned
GATING_SPECS = {
    "mixtral": "GatingSpec(family='softmax_topk', num_experts=8, top_k=2, renorm='sum')",
    "qwen2_moe": "GatingSpec(family='softmax_topk', num_experts=8, top_k=2)",
    "qwen3_moe": "GatingSpec(family='softmax_topk', num_experts=8, top_k=2, renorm='sum')",
    "olmoe": "GatingSpec(family='softmax_topk', num_experts=8, top_k=2)",
    "deepseek_v3": "GatingSpec(family='sigmoid_topk', num_experts=8, top_k=2, score_func='sigmoid', bias_mode='selection', n_group=4, topk_group=2, renorm='sum', renorm_eps=1e-20, scaling_factor=2.5, sorted=False)",
    "deepseek_v2": "GatingSpec(family='softmax_topk', num_experts=8, top_k=2, n_group=4, topk_group=2, group_score='max', scaling_factor=1.5, sorted=False)",
    "gpt_oss": "GatingSpec(family='topk_softmax', num_experts=8, top_k=2, order='topk_then_score')",
    "glm4_moe": "GatingSpec(family='sigmoid_topk', num_experts=8, top_k=2, score_func='sigmoid', bias_mode='selection', renorm='sum', renorm_eps=1e-20, sorted=False)",
    "ernie4_5_moe": "GatingSpec(family='softmax_topk', num_experts=8, top_k=2, bias_mode='selection', renorm='sum', renorm_clamp_min=1e-12)",
    "granitemoe": "GatingSpec(family='topk_softmax', num_experts=8, top_k=2, order='topk_then_score')",
    "jamba": "GatingSpec(family='softmax_topk', num_experts=8, top_k=2)",
    "llama4": "GatingSpec(family='topk_sigmoid', num_experts=8, top_k=1, score_func='sigmoid', order='topk_then_score')",
    "phimoe_eval": "GatingSpec(family='sparsemixer', num_experts=8, top_k=2, score_func='sparsemixer', sparsemixer_threshold=0.02)",
    "phimoe_train": 'left unchanged',
    "dbrx": "GatingSpec(family='softmax_topk', num_experts=8, top_k=2, renorm='lp')",
    "qwen3_moe_eager": "GatingSpec(family='softmax_topk', num_experts=8, top_k=2, renorm='sum')",
    "mixtral_batched_mm": "GatingSpec(family='softmax_topk', num_experts=8, top_k=2, renorm='sum')",
    "qwen2_moe_sparse_step": "GatingSpec(family='softmax_topk', num_experts=8, top_k=2)",
    "deepseek_v3_first_dense": "GatingSpec(family='sigmoid_topk', num_experts=8, top_k=2, score_func='sigmoid', bias_mode='selection', n_group=4, topk_group=2, renorm='sum', renorm_eps=1e-20, scaling_factor=2.5, sorted=False)",
    "qwen3_moe_mlp_only": "GatingSpec(family='softmax_topk', num_experts=8, top_k=2, renorm='sum')",
    "torchtitan": "GatingSpec(family='sigmoid_topk', num_experts=8, top_k=2, score_func='sigmoid', score_dtype=float32, bias_mode='selection', renorm='sum', renorm_eps=1e-20, scaling_factor=1.5)",
    "einsum": "GatingSpec(family='softmax_topk', num_experts=8, top_k=2, renorm='sum')",
    "dense_bmm": "GatingSpec(family='softmax_topk', num_experts=8, top_k=2, renorm='sum')",
    "batched_gather": "GatingSpec(family='softmax_topk', num_experts=8, top_k=2, renorm='sum')",
    "loop_4x": "GatingSpec(family='softmax_topk', num_experts=8, top_k=2, renorm='sum')",
    "split_loop": "GatingSpec(family='topk_softmax', num_experts=8, top_k=2, order='topk_then_score')",
    "switch_capacity": "GatingSpec(family='softmax_topk', num_experts=8, top_k=1)",
    "gshard_capacity": "GatingSpec(family='softmax_topk', num_experts=8, top_k=2, renorm='sum')",
    "torchtitan_pypi": "GatingSpec(family='sigmoid_topk', num_experts=8, top_k=2, score_func='sigmoid', bias_mode='selection', renorm='sum', renorm_eps=1e-20, scaling_factor=2.5, sorted=False)",
    "torchtitan_pypi_groups": "GatingSpec(family='softmax_topk', num_experts=8, top_k=2, bias_mode='selection', n_group=4, topk_group=2, sorted=False)",
    "megatron": "GatingSpec(family='softmax_topk', num_experts=8, top_k=2)",
    "megatron_sigmoid": "GatingSpec(family='sigmoid_topk', num_experts=8, top_k=2, score_func='sigmoid', bias_mode='selection', renorm='sum', renorm_eps=1e-20)",
    "nanogpt": "GatingSpec(family='topk_softmax', num_experts=8, top_k=2, order='topk_then_score')",
}


def _rewritten(compiled) -> tuple[list, list]:
    """(graph-pass site reports rewritten, pre-Dynamo block rewrites) of the first compile."""
    sites = [s for r in grouter_reports(compiled) for s in r.rewritten]
    blocks = [b for b in compiled._grouter_prepared.loop_blocks if b.rewritten]
    return sites, blocks


def _first_of_each_spec() -> set[str]:
    seen: dict[str, str] = {}
    for case in SUPPORT_CASES:
        spec = GATING_SPECS[case.name]
        if spec != "left unchanged":
            seen.setdefault(spec, case.name)
    return set(seen.values())


UNPROBED = _first_of_each_spec()
CASES = [pytest.param(c, True, id=f"{c.name}-probe_ops") for c in SUPPORT_CASES] + [
    pytest.param(c, False, id=f"{c.name}-ops_unprobed") for c in SUPPORT_CASES if c.name in UNPROBED]


@pytest.mark.parametrize("case,probe_ops", CASES)
def test_support_case(case: SupportCase, probe_ops: bool):
    model = case.build()
    unmodified = copy.deepcopy(model)
    candidate = copy.deepcopy(model)
    compiled = apply_grouter(candidate, GrouterConfig(compiler="eager", dynamic=True, probe_ops=probe_ops))
    graphs_after_first_call = None
    # a model that recompiles per token count anyway is checked at two counts, not three
    for i, (batch, seq) in enumerate(SIZES[:2] if case.recompiles else SIZES):
        inputs = make_inputs(case, model, batch, seq, seed=i)
        torch.manual_seed(i)  # same random draws for both (a model that samples, e.g. PhiMoE in training)
        ref = run_step(model, model, inputs, default_output, True, 100 + i)
        torch.manual_seed(i)
        got = run_step(compiled, candidate, inputs, default_output, True, 100 + i)
        result = compare_steps(got, ref, None, None)
        assert not result.missing_grads, result.missing_grads
        assert result.max_rel() <= case.tolerance, f"{(batch, seq)}: {result.summary()}"
        if i == 0:
            graphs_after_first_call = len(grouter_reports(compiled))
    for (name, want), got in zip(model.named_buffers(), candidate.buffers()):   # e.g. per-expert token counts
        assert torch.equal(got, want), f"buffer {name} differs after the same steps"
    _, blocks = _rewritten(compiled)
    first_sites = [s for r in grouter_reports(compiled)[:graphs_after_first_call] for s in r.rewritten]
    assert len(first_sites) + len(blocks) == case.rewritten, [r.sites for r in grouter_reports(compiled)]
    families = {s.gating.family for s in first_sites} | {b.gating.family for b in blocks}
    styles = {s.experts.style for s in first_sites} | ({"module rewrite"} if blocks else set())
    assert families == ({case.family} if case.family else set())
    assert styles == ({case.experts} if case.experts else set())
    if case.reason:
        reasons = [s.reason for r in grouter_reports(compiled) for s in r.sites if s.partial]
        assert reasons and all(case.reason in r for r in reasons), reasons
    assert graphs_after_first_call == case.graphs_after
    if not case.recompiles:
        assert len(grouter_reports(compiled)) == graphs_after_first_call, "a new token count recompiled"
    if case.graphs_before != case.graphs_after:
        inputs = make_inputs(case, model, *SIZES[0])
        with torch.no_grad():
            assert torch._dynamo.explain(unmodified)(**inputs).graph_count == case.graphs_before
    specs = [compact_repr(s.gating) for s in first_sites[:1]] + [compact_repr(b.gating) for b in blocks[:1]]
    spec = specs[0] if specs else "left unchanged"
    assert spec == GATING_SPECS[case.name], f"{case.name}: the gating was read as {spec}"


def test_every_case_has_a_pinned_spec():
    assert list(GATING_SPECS) == [c.name for c in SUPPORT_CASES]


def test_support_doc_is_current():
    assert (ROOT / "docs" / "support.md").read_text() == render_support_md(), (
        "regenerate with: python -m grouter_pass.testing.support > docs/support.md")
