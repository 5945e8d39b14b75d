"""Detection on real transformers models (tiny, random init, default ``grouped_mm`` experts).

For each family the canonical gating subgraph of the first site, its ``GatingSpec`` and its
``ExpertsSpec`` are pinned with expecttest: a change in how transformers writes its gating, or in
what the pass sees, shows up as a readable diff (``EXPECTTEST_ACCEPT=1`` regenerates).
"""

from expecttest import assert_expected_inline

from grouter_pass.passes.canonicalize import canonicalize_gating_pass
from grouter_pass.spec import compact_repr
from grouter_pass.testing.graphs import capture_graphs, gating_site_text
from tests.passes.conftest import detected


def snapshot(model_type: str, dynamic: bool = False) -> str:
    gm, sites, rejected = detected(model_type, dynamic)
    assert len(sites) == 2 and not rejected, [r.summary() for r in rejected]
    assert sites[0].module_path == "model.layers.0.mlp"
    s = sites[0]
    return f"{gating_site_text(s)}\n{compact_repr(s.gating.spec)}\n{compact_repr(s.experts.spec)}"


def test_mixtral():
    assert_expected_inline(snapshot("mixtral"), """\
logits = linear(in0, in1) -> float32[10,8]
v0 = Tensor.to(logits, float32) -> float32[10,8]
v1 = softmax(v0, -1) -> float32[10,8]
v2 = topk(v1, 2, dim=-1, largest=True, sorted=True) -> (float32[10,2], int64[10,2])
v3 = getitem(v2, 0) -> float32[10,2]
ids = getitem(v2, 1) -> int64[10,2]
v4 = sum(v3, -1, keepdim=True) -> float32[10,1]
weights = div(v3, v4) -> float32[10,2]
GatingSpec(family='softmax_topk', num_experts=8, top_k=2, renorm='sum')
ExpertsSpec(style='grouped_mm', num_experts=8, top_k=2, hidden_size=64, ffn_size=48, activation=ActivationSpec())""")


def test_qwen2_moe():
    assert_expected_inline(snapshot("qwen2_moe"), """\
logits = linear(in0, in1) -> float32[10,8]
v0 = softmax(logits, -1, dtype=float32) -> float32[10,8]
v1 = topk(v0, 2, dim=-1, largest=True, sorted=True) -> (float32[10,2], int64[10,2])
v2 = getitem(v1, 0) -> float32[10,2]
ids = getitem(v1, 1) -> int64[10,2]
weights = Tensor.to(v2, float32) -> float32[10,2]
GatingSpec(family='softmax_topk', num_experts=8, top_k=2)
ExpertsSpec(style='grouped_mm', num_experts=8, top_k=2, hidden_size=64, ffn_size=48, activation=ActivationSpec())""")


def test_qwen3_moe():
    assert_expected_inline(snapshot("qwen3_moe"), """\
logits = linear(in0, in1) -> float32[10,8]
v0 = softmax(logits, -1, dtype=float32) -> float32[10,8]
v1 = topk(v0, 2, dim=-1, largest=True, sorted=True) -> (float32[10,2], int64[10,2])
v2 = getitem(v1, 0) -> float32[10,2]
ids = getitem(v1, 1) -> int64[10,2]
v3 = sum(v2, -1, keepdim=True) -> float32[10,1]
v4 = div(v2, v3) -> float32[10,2]
weights = Tensor.to(v4, float32) -> float32[10,2]
GatingSpec(family='softmax_topk', num_experts=8, top_k=2, renorm='sum')
ExpertsSpec(style='grouped_mm', num_experts=8, top_k=2, hidden_size=64, ffn_size=48, activation=ActivationSpec())""")


def test_olmoe():
    assert_expected_inline(snapshot("olmoe"), """\
logits = linear(in0, in1) -> float32[10,8]
v0 = softmax(logits, -1, dtype=float32) -> float32[10,8]
v1 = topk(v0, 2, dim=-1, largest=True, sorted=True) -> (float32[10,2], int64[10,2])
v2 = getitem(v1, 0) -> float32[10,2]
ids = getitem(v1, 1) -> int64[10,2]
weights = Tensor.to(v2, float32) -> float32[10,2]
GatingSpec(family='softmax_topk', num_experts=8, top_k=2)
ExpertsSpec(style='grouped_mm', num_experts=8, top_k=2, hidden_size=64, ffn_size=48, activation=ActivationSpec())""")


def test_deepseek_v3():
    assert_expected_inline(snapshot("deepseek_v3"), """\
logits = linear(in0, in1) -> float32[10,8]
v0 = sigmoid(logits) -> float32[10,8]
v1 = add(v0, bias) -> float32[10,8]
v2 = Tensor.view(v1, -1, 4, 2) -> float32[10,4,2]
v3 = topk(v2, 2, dim=-1, largest=True, sorted=True) -> (float32[10,4,2], int64[10,4,2])
v4 = getitem(v3, 0) -> float32[10,4,2]
v5 = sum(v4, -1, keepdim=False) -> float32[10,4]
v6 = topk(v5, 2, dim=-1, largest=True, sorted=False) -> (float32[10,2], int64[10,2])
v7 = getitem(v6, 1) -> int64[10,2]
v8 = zeros_like(v5) -> float32[10,4]
v9 = scatter(v8, -1, v7, 1) -> float32[10,4]
v10 = Tensor.unsqueeze(v9, -1) -> float32[10,4,1]
v11 = Tensor.expand(v10, -1, 4, 2) -> float32[10,4,2]
v12 = Tensor.reshape(v11, -1, 8) -> float32[10,8]
v13 = Tensor.to(v12, bool) -> bool[10,8]
v14 = bitwise_not(v13) -> bool[10,8]
v15 = masked_fill(v1, v14, -inf) -> float32[10,8]
v16 = topk(v15, 2, dim=-1, largest=True, sorted=False) -> (float32[10,2], int64[10,2])
ids = getitem(v16, 1) -> int64[10,2]
v17 = gather(v0, -1, ids) -> float32[10,2]
v18 = sum(v17, -1, keepdim=True) -> float32[10,1]
v19 = add(v18, 1e-20) -> float32[10,1]
v20 = div(v17, v19) -> float32[10,2]
weights = mul(v20, 2.5) -> float32[10,2]
GatingSpec(family='sigmoid_topk', num_experts=8, top_k=2, score_func='sigmoid', bias_mode='selection', n_group=4, topk_group=2, renorm='sum', renorm_eps=1e-20, scaling_factor=2.5, sorted=False)
ExpertsSpec(style='grouped_mm', num_experts=8, top_k=2, hidden_size=64, ffn_size=48, activation=ActivationSpec())""")


def test_gpt_oss():
    assert_expected_inline(snapshot("gpt_oss"), """\
logits = linear(in0, in1, in2) -> float32[10,8]
v0 = topk(logits, 2, dim=-1, largest=True, sorted=True) -> (float32[10,2], int64[10,2])
v1 = getitem(v0, 0) -> float32[10,2]
ids = getitem(v0, 1) -> int64[10,2]
weights = softmax(v1, -1, dtype=float32) -> float32[10,2]
GatingSpec(family='topk_softmax', num_experts=8, top_k=2, order='topk_then_score')
ExpertsSpec(style='grouped_mm', num_experts=8, top_k=2, hidden_size=64, ffn_size=48, activation=ActivationSpec(kind='clamped_swiglu', layout='interleaved', alpha=1.702, limit=7.0), up_transposed=True, down_transposed=True, has_bias=True)""")


def test_deepseek_v3_dynamic_shapes_keep_the_runtime_scale():
    """Under ``dynamic=True`` Dynamo turns ``routed_scaling_factor`` into a graph input; the site
    is still matched and the scale stays a runtime value (the rewrite passes the node on)."""
    gm, sites, rejected = detected("deepseek_v3", dynamic=True)
    assert len(sites) == 2 and not rejected
    gating = sites[0].gating
    assert set(gating.runtime_scalars) == {"scaling_factor"} and gating.spec.scaling_factor == 2.5


def test_gpt_oss_dynamic_shapes_keep_runtime_activation_parameters():
    gm, sites, rejected = detected("gpt_oss", dynamic=True)
    assert len(sites) == 2 and not rejected
    assert set(sites[0].experts.runtime_scalars) == {"alpha", "limit"}


def test_every_layer_of_a_deep_model_finds_its_own_router():
    """The router is the nearest qualifying GEMM upstream of the selection, however deep the model:
    with hundreds of earlier nodes (attention projections whose head dim equals E among them) a
    search cut off in set order found another GEMM for some layers, differently on every run."""
    from grouter_pass.passes.detect import find_gating_sites
    from grouter_pass.testing.models import tiny_hf_moe, tiny_token_ids

    model = tiny_hf_moe("qwen3_moe", num_hidden_layers=8)
    (gm,) = capture_graphs(model, tiny_token_ids())
    canonicalize_gating_pass(gm)
    sites, rejected = find_gating_sites(gm)
    assert not rejected, [r.summary() for r in rejected]
    assert [s.module_path for s in sites] == [f"model.layers.{i}.mlp" for i in range(8)]
    routers = [s.gating.router for s in sites]
    assert len(set(routers)) == 8 and all(f"layers_modules_{i}_" in str(r.args[1]) for i, r in enumerate(routers))
