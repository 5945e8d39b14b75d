"""The explain report pinned for three gating families, and a broken rewrite showing up as FAIL.

Snapshots use ``numbers=False`` (pass/fail instead of measured errors, which vary by machine);
regenerate after an intended change with ``EXPECTTEST_ACCEPT=1 pytest tests/inspect``.
"""

import json

import pytest
import torch
from expecttest import assert_expected_inline

from grouter_pass import GrouterConfig, explain
from grouter_pass.testing.handwritten import DenseBmmMoE, TinyMoELM
from grouter_pass.testing.models import tiny_hf_moe


def _report(model_type: str, **overrides):
    model = tiny_hf_moe(model_type, num_hidden_layers=1, **overrides)
    embeds = torch.randn(1, 4, model.config.hidden_size)
    return explain(model, inputs_embeds=embeds)


def _site_and_diff(report) -> str:
    """The sites table and the diff (the parity rows list every parameter: checked separately)."""
    text = report.render_text(numbers=False)
    head = text.split("\nGraphs:")[0]
    return head + "\n" + "\n".join(text.split("\nDiff of graph 0\n")[1:])


@pytest.mark.slow
def test_softmax_topk_mixtral_report():
    report = _report("mixtral")
    assert report.parity_ok
    assert [r.name for r in report.parity][:2] == ["output", "grad[input inputs_embeds]"]
    assert_expected_inline(_site_and_diff(report), """\
grouter explain: MixtralForCausalLM (exact mode)

Sites: 1 found, 1 rewritten
  module              family        E  k  gating                        experts                                    routing          became
  model.layers.0.mlp  softmax_topk  8  2  softmax -> top-2, renorm sum  grouped_mm E=8 H=64 F=48 silu-glu(concat)  learned (exact)  route + dispatch_plan + moe_experts

--- before
+++ after
@@ -99,43 +99,16 @@
 hidden_states_10 = Tensor.reshape(hidden_states_9, -1, 64) -> float32[4,64]
 router_logits = linear(hidden_states_10, l_self_modules_model_modules_layers_modules_0_modules_mlp_modules_gate_parameters_weight_) -> float32[4,8]
-float_2 = Tensor.float(router_logits) -> float32[4,8]  # removed: model.layers.0.mlp
-router_probs = softmax(float_2, dim=-1) -> float32[4,8]  # removed: model.layers.0.mlp
-topk = topk(router_probs, 2, dim=-1) -> (float32[4,2], int64[4,2])  # removed: model.layers.0.mlp
-router_top_value = getitem(topk, 0) -> float32[4,2]  # removed: model.layers.0.mlp
-router_indices = getitem(topk, 1) -> int64[4,2]  # removed: model.layers.0.mlp
-sum_1 = Tensor.sum(router_top_value, dim=-1, keepdim=True) -> float32[4,1]  # removed: model.layers.0.mlp
-router_top_value_1 = itruediv(router_top_value, sum_1) -> float32[4,2]  # removed: model.layers.0.mlp
-sample_weights = Tensor.reshape(router_top_value_1, -1) -> float32[8]  # removed: model.layers.0.mlp
-expert_ids = Tensor.reshape(router_indices, -1) -> int64[8]  # removed: model.layers.0.mlp
-sort = sort(expert_ids) -> (int64[8], int64[8])  # removed: model.layers.0.mlp
-expert_ids_g = getitem(sort, 0) -> int64[8]  # removed: model.layers.0.mlp
-perm = getitem(sort, 1) -> int64[8]  # removed: model.layers.0.mlp
-floordiv = floordiv(perm, 2) -> int64[8]  # removed: model.layers.0.mlp
-selected_hidden_states_g = getitem(hidden_states_9, floordiv) -> float32[8,64]  # removed: model.layers.0.mlp
-sample_weights_g = getitem(sample_weights, perm) -> float32[8]  # removed: model.layers.0.mlp
-histc_input = Tensor.float(expert_ids_g) -> float32[8]  # removed: model.layers.0.mlp
-tokens_per_expert = histc(histc_input, bins=8, min=0, max=7) -> float32[8]  # removed: model.layers.0.mlp
-offsets = cumsum(tokens_per_expert, dim=0, dtype=int32) -> int32[8]  # removed: model.layers.0.mlp
-transpose_4 = Tensor.transpose(l_self_modules_model_modules_layers_modules_0_modules_mlp_modules_experts_parameters_gate_up_proj_, -2, -1) -> float32[8,64,96]  # removed: model.layers.0.mlp
-to_9 = Tensor.to(selected_hidden_states_g, float32) -> float32[8,64]  # removed: model.layers.0.mlp
-out = transformers.grouped_mm_fallback(to_9, transpose_4, offs=offsets) -> float32[8,96]  # removed: model.layers.0.mlp
-chunk = Tensor.chunk(out, 2, dim=-1) -> (float32[8,48], float32[8,48])  # removed: model.layers.0.mlp
-gate = getitem(chunk, 0) -> float32[8,48]  # removed: model.layers.0.mlp
-up = getitem(chunk, 1) -> float32[8,48]  # removed: model.layers.0.mlp
-silu = silu(gate) -> float32[8,48]  # removed: model.layers.0.mlp
-proj_out = mul(silu, up) -> float32[8,48]  # removed: model.layers.0.mlp
-transpose_5 = Tensor.transpose(l_self_modules_model_modules_layers_modules_0_modules_mlp_modules_experts_parameters_down_proj_, -2, -1) -> float32[8,48,64]  # removed: model.layers.0.mlp
-to_10 = Tensor.to(proj_out, float32) -> float32[8,48]  # removed: model.layers.0.mlp
-out_1 = transformers.grouped_mm_fallback(to_10, transpose_5, offs=offsets) -> float32[8,64]  # removed: model.layers.0.mlp
-unsqueeze_3 = Tensor.unsqueeze(sample_weights_g, -1) -> float32[8,1]  # removed: model.layers.0.mlp
-weighted_out = mul(out_1, unsqueeze_3) -> float32[8,64]  # removed: model.layers.0.mlp
-inv_perm = empty_like(perm) -> int64[8]  # removed: model.layers.0.mlp
-arange_5 = arange(8, device=device(type='cpu')) -> int64[8]  # removed: model.layers.0.mlp
-setitem = setitem(inv_perm, perm, arange_5) -> None  # removed: model.layers.0.mlp
-weighted_out_1 = getitem(weighted_out, inv_perm) -> float32[8,64]  # removed: model.layers.0.mlp
-view_4 = Tensor.view(weighted_out_1, 4, 2, 64) -> float32[4,2,64]  # removed: model.layers.0.mlp
-final_hidden_states = Tensor.sum(view_4, dim=1) -> float32[4,64]  # removed: model.layers.0.mlp
-hidden_states_11 = Tensor.to(final_hidden_states, float32) -> float32[4,64]  # removed: model.layers.0.mlp
-hidden_states_12 = Tensor.reshape(hidden_states_11, 1, 4, 64) -> float32[1,4,64]
+grouter_route = grouter.route(router_logits, None, top_k=2, score_func='softmax', order='score_then_topk', bias_mode='none', n_group=1, topk_group=1, group_score='top2_sum', renorm='sum', renorm_eps=0.0, renorm_clamp_min=None, renorm_p=1.0, scaling_factor=1.0, score_dtype=None, weights_dtype=float32, sorted=True, sparsemixer_threshold=0.0) -> (float32[4,2], int64[4,2])  # router: model.layers.0.mlp
+routing_weights = getitem(grouter_route, 0) -> float32[4,2]  # router: model.layers.0.mlp
+expert_ids_1 = getitem(grouter_route, 1) -> int64[4,2]  # router: model.layers.0.mlp
+grouter_dispatch_plan = grouter.dispatch_plan(expert_ids_1, 8) -> (int64[8], int64[8], int64[8], int32[8])  # dispatch plan: model.layers.0.mlp
+perm_1 = getitem(grouter_dispatch_plan, 0) -> int64[8]  # dispatch plan: model.layers.0.mlp
+inv_perm_1 = getitem(grouter_dispatch_plan, 1) -> int64[8]  # dispatch plan: model.layers.0.mlp
+expert_counts = getitem(grouter_dispatch_plan, 2) -> int64[8]  # dispatch plan: model.layers.0.mlp
+expert_offsets = getitem(grouter_dispatch_plan, 3) -> int32[8]  # dispatch plan: model.layers.0.mlp
+grouter_moe_experts = grouter.moe_experts(hidden_states_9, routing_weights, perm_1, inv_perm_1, expert_offsets, l_self_modules_model_modules_layers_modules_0_modules_mlp_modules_experts_parameters_gate_up_proj_, l_self_modules_model_modules_layers_modules_0_modules_mlp_modules_experts_parameters_down_proj_, None, None, up_transposed=False, down_transposed=False, weight_on_input=False, out_dtype=float32, activation='silu', gated=True, interleaved=False, alpha=1.0, limit=0.0) -> (float32[4,64], float32[8,96])  # experts: model.layers.0.mlp
+moe_out = getitem(grouter_moe_experts, 0) -> float32[4,64]  # experts: model.layers.0.mlp
+moe_hidden = getitem(grouter_moe_experts, 1) -> float32[8,96]  # experts: model.layers.0.mlp
+hidden_states_12 = Tensor.reshape(moe_out, 1, 4, 64) -> float32[1,4,64]
 hidden_states_13 = add(hidden_states_5, hidden_states_12) -> float32[1,4,64]
 hidden_states_14 = Tensor.to(hidden_states_13, float32) -> float32[1,4,64]""")


@pytest.mark.slow
def test_sigmoid_group_limited_deepseek_report():
    report = _report("deepseek_v3")
    assert report.parity_ok
    assert_expected_inline(_site_and_diff(report), """\
grouter explain: DeepseekV3ForCausalLM (exact mode)

Sites: 1 found, 1 rewritten
  module              family        E  k  gating                                                                                   experts                                    routing          became
  model.layers.0.mlp  sigmoid_topk  8  2  sigmoid -> +bias(selection) -> group-top-2/4(top2_sum) -> top-2, renorm sum+1e-20, x2.5  grouped_mm E=8 H=64 F=48 silu-glu(concat)  learned (exact)  route + dispatch_plan + moe_experts

--- before
+++ after
@@ -133,60 +133,17 @@
 type_2 = Tensor.type(l_self_modules_model_modules_layers_modules_0_modules_mlp_modules_gate_parameters_weight_, float32) -> float32[8,64]
 router_logits = linear(type_1, type_2) -> float32[4,8]
-scores = Tensor.sigmoid(router_logits) -> float32[4,8]  # removed: model.layers.0.mlp
-scores_for_choice = add(scores, l_self_modules_model_modules_layers_modules_0_modules_mlp_modules_gate_buffers_e_score_correction_bias_) -> float32[4,8]  # removed: model.layers.0.mlp
-view_5 = Tensor.view(scores_for_choice, -1, 4, 2) -> float32[4,4,2]  # removed: model.layers.0.mlp
-topk = Tensor.topk(view_5, 2, dim=-1) -> (float32[4,4,2], int64[4,4,2])  # removed: model.layers.0.mlp
-getitem_24 = getitem(topk, 0) -> float32[4,4,2]  # removed: model.layers.0.mlp
-group_scores = Tensor.sum(getitem_24, dim=-1) -> float32[4,4]  # removed: model.layers.0.mlp
-topk_1 = topk(group_scores, k=2, dim=-1, sorted=False) -> (float32[4,2], int64[4,2])  # removed: model.layers.0.mlp
-group_idx = getitem(topk_1, 1) -> int64[4,2]  # removed: model.layers.0.mlp
-group_mask = zeros_like(group_scores) -> float32[4,4]  # removed: model.layers.0.mlp
-scatter_ = Tensor.scatter_(group_mask, 1, group_idx, 1) -> float32[4,4]  # removed: model.layers.0.mlp
-unsqueeze_3 = Tensor.unsqueeze(group_mask, -1) -> float32[4,4,1]  # removed: model.layers.0.mlp
-expand_3 = Tensor.expand(unsqueeze_3, -1, 4, 2) -> float32[4,4,2]  # removed: model.layers.0.mlp
-score_mask = Tensor.reshape(expand_3, -1, 8) -> float32[4,8]  # removed: model.layers.0.mlp
-bool_1 = Tensor.bool(score_mask) -> bool[4,8]  # removed: model.layers.0.mlp
-invert = invert(bool_1) -> bool[4,8]  # removed: model.layers.0.mlp
-scores_for_choice_1 = Tensor.masked_fill(scores_for_choice, invert, -inf) -> float32[4,8]  # removed: model.layers.0.mlp
-topk_2 = topk(scores_for_choice_1, k=2, dim=-1, sorted=False) -> (float32[4,2], int64[4,2])  # removed: model.layers.0.mlp
-topk_indices = getitem(topk_2, 1) -> int64[4,2]  # removed: model.layers.0.mlp
-topk_weights = Tensor.gather(scores, 1, topk_indices) -> float32[4,2]  # removed: model.layers.0.mlp
-sum_2 = Tensor.sum(topk_weights, dim=-1, keepdim=True) -> float32[4,1]  # removed: model.layers.0.mlp
-denominator = add(sum_2, 1e-20) -> float32[4,1]  # removed: model.layers.0.mlp
-topk_weights_1 = itruediv(topk_weights, denominator) -> float32[4,2]  # removed: model.layers.0.mlp
-topk_weights_2 = mul(topk_weights_1, 2.5) -> float32[4,2]  # removed: model.layers.0.mlp
+grouter_route = grouter.route(router_logits, l_self_modules_model_modules_layers_modules_0_modules_mlp_modules_gate_buffers_e_score_correction_bias_, top_k=2, score_func='sigmoid', order='score_then_topk', bias_mode='selection', n_group=4, topk_group=2, group_score='top2_sum', renorm='sum', renorm_eps=1e-20, renorm_clamp_min=None, renorm_p=1.0, scaling_factor=2.5, score_dtype=None, weights_dtype=float32, sorted=False, sparsemixer_threshold=0.0) -> (float32[4,2], int64[4,2])  # router: model.layers.0.mlp
+routing_weights = getitem(grouter_route, 0) -> float32[4,2]  # router: model.layers.0.mlp
+expert_ids_1 = getitem(grouter_route, 1) -> int64[4,2]  # router: model.layers.0.mlp
+grouter_dispatch_plan = grouter.dispatch_plan(expert_ids_1, 8) -> (int64[8], int64[8], int64[8], int32[8])  # dispatch plan: model.layers.0.mlp
+perm_1 = getitem(grouter_dispatch_plan, 0) -> int64[8]  # dispatch plan: model.layers.0.mlp
+inv_perm_1 = getitem(grouter_dispatch_plan, 1) -> int64[8]  # dispatch plan: model.layers.0.mlp
+expert_counts = getitem(grouter_dispatch_plan, 2) -> int64[8]  # dispatch plan: model.layers.0.mlp
+expert_offsets = getitem(grouter_dispatch_plan, 3) -> int32[8]  # dispatch plan: model.layers.0.mlp
 hidden_states_12 = Tensor.view(hidden_states_10, -1, 64) -> float32[4,64]
-sample_weights = Tensor.reshape(topk_weights_2, -1) -> float32[8]  # removed: model.layers.0.mlp
-expert_ids = Tensor.reshape(topk_indices, -1) -> int64[8]  # removed: model.layers.0.mlp
-sort = sort(expert_ids) -> (int64[8], int64[8])  # removed: model.layers.0.mlp
-expert_ids_g = getitem(sort, 0) -> int64[8]  # removed: model.layers.0.mlp
-perm = getitem(sort, 1) -> int64[8]  # removed: model.layers.0.mlp
-floordiv = floordiv(perm, 2) -> int64[8]  # removed: model.layers.0.mlp
-selected_hidden_states_g = getitem(hidden_states_12, floordiv) -> float32[8,64]  # removed: model.layers.0.mlp
-sample_weights_g = getitem(sample_weights, perm) -> float32[8]  # removed: model.layers.0.mlp
-histc_input = Tensor.float(expert_ids_g) -> float32[8]  # removed: model.layers.0.mlp
-tokens_per_expert = histc(histc_input, bins=8, min=0, max=7) -> float32[8]  # removed: model.layers.0.mlp
-offsets = cumsum(tokens_per_expert, dim=0, dtype=int32) -> int32[8]  # removed: model.layers.0.mlp
-transpose_3 = Tensor.transpose(l_self_modules_model_modules_layers_modules_0_modules_mlp_modules_experts_parameters_gate_up_proj_, -2, -1) -> float32[8,64,96]  # removed: model.layers.0.mlp
-to_13 = Tensor.to(selected_hidden_states_g, float32) -> float32[8,64]  # removed: model.layers.0.mlp
-out = transformers.grouped_mm_fallback(to_13, transpose_3, offs=offsets) -> float32[8,96]  # removed: model.layers.0.mlp
-chunk = Tensor.chunk(out, 2, dim=-1) -> (float32[8,48], float32[8,48])  # removed: model.layers.0.mlp
-gate = getitem(chunk, 0) -> float32[8,48]  # removed: model.layers.0.mlp
-up = getitem(chunk, 1) -> float32[8,48]  # removed: model.layers.0.mlp
-silu = silu(gate) -> float32[8,48]  # removed: model.layers.0.mlp
-proj_out = mul(silu, up) -> float32[8,48]  # removed: model.layers.0.mlp
-transpose_4 = Tensor.transpose(l_self_modules_model_modules_layers_modules_0_modules_mlp_modules_experts_parameters_down_proj_, -2, -1) -> float32[8,48,64]  # removed: model.layers.0.mlp
-to_14 = Tensor.to(proj_out, float32) -> float32[8,48]  # removed: model.layers.0.mlp
-out_1 = transformers.grouped_mm_fallback(to_14, transpose_4, offs=offsets) -> float32[8,64]  # removed: model.layers.0.mlp
-unsqueeze_4 = Tensor.unsqueeze(sample_weights_g, -1) -> float32[8,1]  # removed: model.layers.0.mlp
-weighted_out = mul(out_1, unsqueeze_4) -> float32[8,64]  # removed: model.layers.0.mlp
-inv_perm = empty_like(perm) -> int64[8]  # removed: model.layers.0.mlp
-arange_5 = arange(8, device=device(type='cpu')) -> int64[8]  # removed: model.layers.0.mlp
-setitem = setitem(inv_perm, perm, arange_5) -> None  # removed: model.layers.0.mlp
-weighted_out_1 = getitem(weighted_out, inv_perm) -> float32[8,64]  # removed: model.layers.0.mlp
-view_7 = Tensor.view(weighted_out_1, 4, 2, 64) -> float32[4,2,64]  # removed: model.layers.0.mlp
-final_hidden_states = Tensor.sum(view_7, dim=1) -> float32[4,64]  # removed: model.layers.0.mlp
-to_15 = Tensor.to(final_hidden_states, float32) -> float32[4,64]  # removed: model.layers.0.mlp
-hidden_states_13 = Tensor.view(to_15, 1, 4, 64) -> float32[1,4,64]
+grouter_moe_experts = grouter.moe_experts(hidden_states_12, routing_weights, perm_1, inv_perm_1, expert_offsets, l_self_modules_model_modules_layers_modules_0_modules_mlp_modules_experts_parameters_gate_up_proj_, l_self_modules_model_modules_layers_modules_0_modules_mlp_modules_experts_parameters_down_proj_, None, None, up_transposed=False, down_transposed=False, weight_on_input=False, out_dtype=float32, activation='silu', gated=True, interleaved=False, alpha=1.0, limit=0.0) -> (float32[4,64], float32[8,96])  # experts: model.layers.0.mlp
+moe_out = getitem(grouter_moe_experts, 0) -> float32[4,64]  # experts: model.layers.0.mlp
+moe_hidden = getitem(grouter_moe_experts, 1) -> float32[8,96]  # experts: model.layers.0.mlp
+hidden_states_13 = Tensor.view(moe_out, 1, 4, 64) -> float32[1,4,64]
 linear_6 = linear(hidden_states_10, l_self_modules_model_modules_layers_modules_0_modules_mlp_modules_shared_experts_modules_gate_proj_parameters_weight_, None) -> float32[1,4,48]
 silu_1 = silu(linear_6) -> float32[1,4,48]""")


@pytest.mark.slow
def test_topk_then_softmax_gpt_oss_report():
    report = _report("gpt_oss", layer_types=["full_attention"])
    assert report.parity_ok
    assert_expected_inline(_site_and_diff(report), """\
grouter explain: GptOssForCausalLM (exact mode)

Sites: 1 found, 1 rewritten
  module              family        E  k  gating                   experts                                                                           routing          became
  model.layers.0.mlp  topk_softmax  8  2  top-2 -> softmax over k  grouped_mm E=8 H=64 F=48 clamped_swiglu(alpha=1.702, limit=7, interleaved), bias  learned (exact)  route + dispatch_plan + moe_experts

--- before
+++ after
@@ -119,46 +119,16 @@
 hidden_states_9 = Tensor.reshape(hidden_states_8, -1, 64) -> float32[4,64]
 router_logits = linear(hidden_states_9, l_self_modules_model_modules_layers_modules_0_modules_mlp_modules_router_parameters_weight_, l_self_modules_model_modules_layers_modules_0_modules_mlp_modules_router_parameters_bias_) -> float32[4,8]
-topk = topk(router_logits, 2, dim=-1) -> (float32[4,2], int64[4,2])  # removed: model.layers.0.mlp
-router_top_value = getitem(topk, 0) -> float32[4,2]  # removed: model.layers.0.mlp
-router_indices = getitem(topk, 1) -> int64[4,2]  # removed: model.layers.0.mlp
-router_scores = softmax(router_top_value, dim=1, dtype=float32) -> float32[4,2]  # removed: model.layers.0.mlp
-sample_weights = Tensor.reshape(router_scores, -1) -> float32[8]  # removed: model.layers.0.mlp
-expert_ids = Tensor.reshape(router_indices, -1) -> int64[8]  # removed: model.layers.0.mlp
-sort = sort(expert_ids) -> (int64[8], int64[8])  # removed: model.layers.0.mlp
-expert_ids_g = getitem(sort, 0) -> int64[8]  # removed: model.layers.0.mlp
-perm = getitem(sort, 1) -> int64[8]  # removed: model.layers.0.mlp
-floordiv = floordiv(perm, 2) -> int64[8]  # removed: model.layers.0.mlp
-selected_hidden_states_g = getitem(hidden_states_9, floordiv) -> float32[8,64]  # removed: model.layers.0.mlp
-sample_weights_g = getitem(sample_weights, perm) -> float32[8]  # removed: model.layers.0.mlp
-histc_input = Tensor.float(expert_ids_g) -> float32[8]  # removed: model.layers.0.mlp
-tokens_per_expert = histc(histc_input, bins=8, min=0, max=7) -> float32[8]  # removed: model.layers.0.mlp
-offsets = cumsum(tokens_per_expert, dim=0, dtype=int32) -> int32[8]  # removed: model.layers.0.mlp
-selected_biases = getitem(l_self_modules_model_modules_layers_modules_0_modules_mlp_modules_experts_parameters_gate_up_proj_bias_, expert_ids_g) -> float32[8,96]  # removed: model.layers.0.mlp
-to_10 = Tensor.to(selected_hidden_states_g, float32) -> float32[8,64]  # removed: model.layers.0.mlp
-out = transformers.grouped_mm_fallback(to_10, l_self_modules_model_modules_layers_modules_0_modules_mlp_modules_experts_parameters_gate_up_proj_, offs=offsets) -> float32[8,96]  # removed: model.layers.0.mlp
-add_ = Tensor.add_(out, selected_biases) -> float32[8,96]  # removed: model.layers.0.mlp
-gate = getitem(out, (..., ::2)) -> float32[8,48]  # removed: model.layers.0.mlp
-up = getitem(out, (..., 1::2)) -> float32[8,48]  # removed: model.layers.0.mlp
-gate_1 = Tensor.clamp(gate, min=None, max=7.0) -> float32[8,48]  # removed: model.layers.0.mlp
-up_1 = Tensor.clamp(up, min=-7.0, max=7.0) -> float32[8,48]  # removed: model.layers.0.mlp
-mul_16 = mul(gate_1, 1.702) -> float32[8,48]  # removed: model.layers.0.mlp
-sigmoid = sigmoid(mul_16) -> float32[8,48]  # removed: model.layers.0.mlp
-glu = mul(gate_1, sigmoid) -> float32[8,48]  # removed: model.layers.0.mlp
-add_11 = add(up_1, 1) -> float32[8,48]  # removed: model.layers.0.mlp
-gated_output = mul(add_11, glu) -> float32[8,48]  # removed: model.layers.0.mlp
-selected_biases_1 = getitem(l_self_modules_model_modules_layers_modules_0_modules_mlp_modules_experts_parameters_down_proj_bias_, expert_ids_g) -> float32[8,64]  # removed: model.layers.0.mlp
-to_11 = Tensor.to(gated_output, float32) -> float32[8,48]  # removed: model.layers.0.mlp
-out_1 = transformers.grouped_mm_fallback(to_11, l_self_modules_model_modules_layers_modules_0_modules_mlp_modules_experts_parameters_down_proj_, offs=offsets) -> float32[8,64]  # removed: model.layers.0.mlp
-add__1 = Tensor.add_(out_1, selected_biases_1) -> float32[8,64]  # removed: model.layers.0.mlp
-unsqueeze_3 = Tensor.unsqueeze(sample_weights_g, -1) -> float32[8,1]  # removed: model.layers.0.mlp
-weighted_out = mul(out_1, unsqueeze_3) -> float32[8,64]  # removed: model.layers.0.mlp
-inv_perm = empty_like(perm) -> int64[8]  # removed: model.layers.0.mlp
-arange_9 = arange(8, device=device(type='cpu')) -> int64[8]  # removed: model.layers.0.mlp
-setitem = setitem(inv_perm, perm, arange_9) -> None  # removed: model.layers.0.mlp
-weighted_out_1 = getitem(weighted_out, inv_perm) -> float32[8,64]  # removed: model.layers.0.mlp
-view_3 = Tensor.view(weighted_out_1, 4, 2, 64) -> float32[4,2,64]  # removed: model.layers.0.mlp
-final_hidden_states = Tensor.sum(view_3, dim=1) -> float32[4,64]  # removed: model.layers.0.mlp
-hidden_states_10 = Tensor.to(final_hidden_states, float32) -> float32[4,64]  # removed: model.layers.0.mlp
-hidden_states_11 = Tensor.reshape(hidden_states_10, 1, 4, 64) -> float32[1,4,64]
+grouter_route = grouter.route(router_logits, None, top_k=2, score_func='softmax', order='topk_then_score', bias_mode='none', n_group=1, topk_group=1, group_score='top2_sum', renorm='none', renorm_eps=0.0, renorm_clamp_min=None, renorm_p=1.0, scaling_factor=1.0, score_dtype=None, weights_dtype=float32, sorted=True, sparsemixer_threshold=0.0) -> (float32[4,2], int64[4,2])  # router: model.layers.0.mlp
+routing_weights = getitem(grouter_route, 0) -> float32[4,2]  # router: model.layers.0.mlp
+expert_ids_1 = getitem(grouter_route, 1) -> int64[4,2]  # router: model.layers.0.mlp
+grouter_dispatch_plan = grouter.dispatch_plan(expert_ids_1, 8) -> (int64[8], int64[8], int64[8], int32[8])  # dispatch plan: model.layers.0.mlp
+perm_1 = getitem(grouter_dispatch_plan, 0) -> int64[8]  # dispatch plan: model.layers.0.mlp
+inv_perm_1 = getitem(grouter_dispatch_plan, 1) -> int64[8]  # dispatch plan: model.layers.0.mlp
+expert_counts = getitem(grouter_dispatch_plan, 2) -> int64[8]  # dispatch plan: model.layers.0.mlp
+expert_offsets = getitem(grouter_dispatch_plan, 3) -> int32[8]  # dispatch plan: model.layers.0.mlp
+grouter_moe_experts = grouter.moe_experts(hidden_states_9, routing_weights, perm_1, inv_perm_1, expert_offsets, l_self_modules_model_modules_layers_modules_0_modules_mlp_modules_experts_parameters_gate_up_proj_, l_self_modules_model_modules_layers_modules_0_modules_mlp_modules_experts_parameters_down_proj_, l_self_modules_model_modules_layers_modules_0_modules_mlp_modules_experts_parameters_gate_up_proj_bias_, l_self_modules_model_modules_layers_modules_0_modules_mlp_modules_experts_parameters_down_proj_bias_, up_transposed=True, down_transposed=True, weight_on_input=False, out_dtype=float32, activation='clamped_swiglu', gated=True, interleaved=True, alpha=1.702, limit=7.0) -> (float32[4,64], float32[8,96])  # experts: model.layers.0.mlp
+moe_out = getitem(grouter_moe_experts, 0) -> float32[4,64]  # experts: model.layers.0.mlp
+moe_hidden = getitem(grouter_moe_experts, 1) -> float32[8,96]  # experts: model.layers.0.mlp
+hidden_states_11 = Tensor.reshape(moe_out, 1, 4, 64) -> float32[1,4,64]
 hidden_states_12 = add(hidden_states_5, hidden_states_11) -> float32[1,4,64]
 hidden_states_13 = Tensor.to(hidden_states_12, float32) -> float32[1,4,64]""")


@pytest.mark.slow
def test_report_sections_op_counts_and_json():
    report = _report("qwen3_moe")
    text = report.render_text(numbers=False, diff=False)
    assert_expected_inline(text.split("\nParity")[0].split("\nSites")[1], """\
: 1 found, 1 rewritten
  module              family        E  k  gating                        experts                                    routing          became
  model.layers.0.mlp  softmax_topk  8  2  softmax -> top-2, renorm sum  grouped_mm E=8 H=64 F=48 silu-glu(concat)  learned (exact)  route + dispatch_plan + moe_experts

Graphs: 1 (0 breaks) before -> 1 (0 breaks) after

Op counts (changed ops)
  op                                before  after
  Tensor.to                         19      15
  Tensor.reshape                    8       6
  Tensor.sum                        2       0
  Tensor.transpose                  6       4
  mul                               19      17
  transformers.grouped_mm_fallback  2       0
  Tensor.chunk                      1       0
  Tensor.float                      2       1
  Tensor.unsqueeze                  4       3
  Tensor.view                       5       4
  arange                            6       5
  cumsum                            1       0
  empty_like                        1       0
  floordiv                          1       0
  getitem                           25      24
  histc                             1       0
  itruediv                          1       0
  setitem                           1       0
  silu                              1       0
  softmax                           1       0
  sort                              1       0
  topk                              1       0
  grouter.dispatch_plan             0       1
  grouter.moe_experts               0       1
  grouter.route                     0       1
""")
    data = json.loads(report.to_json())
    assert data["parity_ok"] is True
    assert data["sites"][0]["family"] == "softmax_topk"
    assert {r["name"] for r in data["parity"]} >= {"output", "grad[input inputs_embeds]",
                                                  "grad[model.layers.0.mlp.gate.weight]"}
    assert all(r["max_rel"] <= 1e-5 for r in data["parity"])
    assert data["diffs"][0]["unified"].startswith("--- before\n+++ after\n")


@pytest.mark.slow
def test_a_wrong_renorm_shows_as_failing_parity_rows(monkeypatch):
    """Inject a wrong rewrite (renormalisation dropped by the rewrite after detection proved the
    right spec), so only the parity table can catch it: the output and the gradients that depend
    on the weights fail."""
    from grouter_pass.passes import rewrite

    real = rewrite._call

    def wrong_call(graph, target, args, kwargs, **kw):
        if target is torch.ops.grouter.route.default:
            kwargs = {**kwargs, "renorm": "none"}
        return real(graph, target, args, kwargs, **kw)

    monkeypatch.setattr(rewrite, "_call", wrong_call)
    model = tiny_hf_moe("mixtral", num_hidden_layers=1)
    report = explain(model, inputs_embeds=torch.randn(1, 4, model.config.hidden_size),
                     config=GrouterConfig(compiler="eager"))
    assert not report.parity_ok
    rows = {r.name: r for r in report.parity}
    assert not rows["output"].ok and rows["output"].max_rel > 1e-3
    assert not rows["grad[model.layers.0.mlp.gate.weight]"].ok
    text = report.render_text()
    assert "Parity, rewritten vs original, forward and backward: FAIL" in text
    output_line = next(line for line in text.splitlines() if line.strip().startswith("output "))
    assert output_line.rstrip().endswith("FAIL")
    assert "renorm='none'" in report.diffs[0].unified


def test_side_by_side_pairs_rows_by_node_not_by_position():
    from grouter_pass.inspect.graph_text import side_by_side

    before = ["a = f(x) -> f32[4]", "r = linear(a, w) -> f32[4,8]", "t = topk(r) -> (f32[4,2], i64[4,2])",
              "y = g(a, t) -> f32[4]", "return y"]
    after = ["a = f(x) -> f32[4]", "plan = grouter.dispatch_plan(ids) -> i64[8]", "y = g(a, plan) -> f32[4]",
             "return y"]
    rows = side_by_side(before, after)
    assert ("changed", "y = g(a, t) -> f32[4]", "y = g(a, plan) -> f32[4]") in rows
    assert ("removed", "r = linear(a, w) -> f32[4,8]", "") in rows
    assert ("added", "", "plan = grouter.dispatch_plan(ids) -> i64[8]") in rows
    # position alone would have paired the removed router with the new plan
    assert not any(k == "changed" and left.startswith("r =") for k, left, _ in rows)


def test_html_sites_link_to_their_hunks():
    import re

    from grouter_pass.inspect.html import site_anchor

    model = TinyMoELM(DenseBmmMoE, layers=2)
    page = explain(model, torch.randint(0, 97, (2, 5))).to_html()
    for path in ("blocks.0", "blocks.1"):
        anchor = site_anchor(path)
        assert f'<a href="#{anchor}">{path}</a>' in page
        assert len(re.findall(f'id="{anchor}"', page)) == 1, f"{path}: one hunk anchor"
