"""Token counts stay symbolic (no recompiles), and the edge cases of routing keep exact numbers:
a single token, heavily skewed routing, experts that receive no token."""

import copy
import logging

import torch
from torch._dynamo.utils import counters

from grouter_pass import GrouterBackend, GrouterConfig, apply_grouter
from grouter_pass.testing.models import DenseMLPModel, tiny_hf_moe, tiny_token_ids
from grouter_pass.testing.parity import check_parity, compare_steps, default_output, exact_ops, run_step

REL_TOL = 1e-5


class CountingBackend(GrouterBackend):
    def __init__(self, config):
        super().__init__(config)
        self.graphs_compiled = 0

    def __call__(self, gm, example_inputs):
        self.graphs_compiled += 1
        return super().__call__(gm, example_inputs)


def test_changing_the_token_count_does_not_recompile():
    model = tiny_hf_moe("qwen3_moe").train()
    reference = copy.deepcopy(model)
    backend = CountingBackend(GrouterConfig(compiler="aot_eager"))
    compiled = torch.compile(model, backend=backend, dynamic=True)
    # sizes 0 and 1 are always specialised by Dynamo, so every count here is >= 2
    for step, (batch, seq) in enumerate([(2, 5), (3, 7), (2, 13), (4, 16)]):
        ids = tiny_token_ids(batch, seq, seed=step)
        got = run_step(compiled, model, {"input_ids": ids}, default_output, True, step)
        want = run_step(reference, reference, {"input_ids": ids}, default_output, True, step)
        result = compare_steps(got, want, None, None)
        assert not result.missing_grads and result.max_rel() <= REL_TOL, f"{(batch, seq)}: {result.summary()}"
        assert len(result.param_grads) == len(list(model.parameters()))
        if step == 0:
            after_first = backend.graphs_compiled  # one frame (Dynamo may restart its trace once)
    assert backend.graphs_compiled == after_first, "a new token count triggered a recompile"
    assert all(len(r.rewritten) == 2 for r in backend.reports)
    assert counters["stats"]["unique_graphs"] == 1


def test_single_token():
    model = tiny_hf_moe("deepseek_v3").train()
    emb = model.get_input_embeddings()(tiny_token_ids(1, 1)).detach()
    result = check_parity(model, {"inputs_embeds": emb},
                          lambda m: apply_grouter(m, GrouterConfig(compiler="aot_eager")), expect_ops=exact_ops(2))
    assert counters["grouter"]["sites_rewritten"] == 2
    assert result.max_rel() <= REL_TOL, result.summary()


def _skew(model, experts=(0, 1)):
    """Make every router send every token to ``experts`` (the rest get none)."""
    with torch.no_grad():
        for layer in model.model.layers:
            mlp = layer.mlp
            router = getattr(mlp, "router", None) or mlp.gate
            if hasattr(router, "e_score_correction_bias"):   # DeepSeek: a selection-only bias
                router.e_score_correction_bias.fill_(-5.0)[list(experts)] = 5.0
            else:                                             # GPT-OSS: a router bias
                router.bias.fill_(-50.0)[list(experts)] = 50.0
    return model


def test_skewed_routing_with_empty_experts_deepseek():
    model = _skew(tiny_hf_moe("deepseek_v3")).train()
    result = check_parity(model, {"input_ids": tiny_token_ids(3, 6)},
                          lambda m: apply_grouter(m, GrouterConfig(compiler="aot_eager")), expect_ops=exact_ops(2))
    assert counters["grouter"]["sites_rewritten"] == 2
    assert result.max_rel() <= REL_TOL, result.summary()
    # the selection bias steers the choice only: it never gets a gradient, here as in eager
    assert not any("correction_bias" in k for k in result.param_grads)


def test_skewed_routing_with_empty_experts_gpt_oss():
    model = _skew(tiny_hf_moe("gpt_oss")).train()
    emb = model.get_input_embeddings()(tiny_token_ids(2, 9)).detach()
    result = check_parity(model, {"inputs_embeds": emb},
                          lambda m: apply_grouter(m, GrouterConfig(compiler="aot_eager")), expect_ops=exact_ops(2))
    assert counters["grouter"]["sites_rewritten"] == 2
    assert result.max_rel() <= REL_TOL, result.summary()
    assert "model.layers.0.mlp.router.bias" in result.param_grads


def test_model_without_moe_compiles_unchanged_with_one_log_line(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="grouter_pass")
    import grouter_pass.backend as backend_module

    seen = []
    real = backend_module.run_grouter_passes

    def spy(gm, example_inputs, config):
        new_gm, report = real(gm, example_inputs, config)
        seen.append((gm, new_gm))
        return new_gm, report

    monkeypatch.setattr(backend_module, "run_grouter_passes", spy)
    model = DenseMLPModel()
    ids = tiny_token_ids()
    want = model(ids)
    got = apply_grouter(model, GrouterConfig(compiler="eager"))(ids)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert len(seen) == 1 and seen[0][0] is seen[0][1], "the original graph must be handed on untouched"
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("grouter_pass")]
    assert lines == ["grouter: no MoE gating site found; graph compiled unchanged"]
