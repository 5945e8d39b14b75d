"""Exact mode through the real compilers: the grouter backend with Inductor (and AOT autograd)
under ``dynamic=True``, one training step next to the unmodified model.

The support matrix (test_support_matrix.py) checks every family and style with the rewritten
graph run directly; these three cases add what only a compiler exercises: AOT tracing of the
ops' fake and autograd registrations with symbolic token counts, the partitioner saving the
dispatch plan, and Inductor lowering. Between them they cover softmax and sigmoid gating, a
router bias, transposed biased experts, and runtime scalars passed to the ops (Inductor's C++
compile of a whole model costs about a minute on the CI machine, hence three).

Compared: the logits, the gradient of the input embeddings, and the gradient of every parameter
(router weights and biases, expert weights and biases, attention, norms). Contract: relative
error <= 1e-5 (max abs error / max magnitude) for each of them.
"""

import pytest
import torch

from grouter_pass import GrouterConfig, apply_grouter, grouter_reports
from grouter_pass.testing.models import tiny_hf_moe, tiny_token_ids
from grouter_pass.testing.parity import check_parity, exact_ops

REL_TOL = 1e-5


def embeds(model, batch=2, seq=7, seed=0):
    with torch.no_grad():
        return model.get_input_embeddings()(tiny_token_ids(batch, seq, seed=seed))


COMPILER = {"qwen3_moe": "inductor", "deepseek_v3": "inductor", "gpt_oss": "aot_eager"}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(COMPILER))
def test_train_step_parity_dynamic(model_type):
    model = tiny_hf_moe(model_type).train()
    compiled = []
    post_grad_graphs = []   # GrouterConfig.inductor_options reach Inductor: its post-grad hook runs
    options = {"post_grad_custom_post_pass": post_grad_graphs.append} if COMPILER[model_type] == "inductor" else {}
    config = GrouterConfig(dynamic=True, compiler=COMPILER[model_type], inductor_options=options)
    # dynamic=True: Dynamo may compile the frame twice (a restart), so the ops are checked per compile below
    result = check_parity(model, {"inputs_embeds": embeds(model)}, expect_ops=None,
                          compile_fn=lambda m: compiled.append(apply_grouter(m, config)) or compiled[-1])
    reports = grouter_reports(compiled[0])
    final = reports[-1]
    assert all(len(r.rewritten) == 2 for r in reports)
    assert result.ops == {op: n * len(reports) for op, n in exact_ops(2).items()}
    assert [s.module_path for s in final.rewritten] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert not result.missing_grads, result.missing_grads
    assert result.max_rel() <= REL_TOL, result.summary()
    router = [k for k in result.param_grads if k.endswith("mlp.gate.weight") or k.endswith("mlp.router.weight")]
    experts = [k for k in result.param_grads if ".experts." in k]
    assert len(router) == 2 and len(experts) >= 4, "router and expert weights must receive gradients"
    if options:   # forward and backward graphs, each holding the grouter ops
        assert len(post_grad_graphs) >= 2
        assert all(any("grouter" in str(n.target) for n in g.nodes) for g in post_grad_graphs)
