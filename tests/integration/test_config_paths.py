"""Paths of the public API that users take and that no other test walks: exact mode with the
auxiliary balance loss (``output_router_logits=True``, how most MoE models are trained),
``prepare_model`` on its own, ``unused_parameters``, the ``GrouterConfig`` switches
(``rewrite_modules``, ``disable_passes``, ``probe_ops``) and ``routing(r)`` with one argument.

Each compares against the unmodified model and states what the compiled graphs hold
(``expect_ops``): a switch that silently did nothing would pass a parity check alone.
"""

from __future__ import annotations

import copy

import pytest
import torch

import grouter_pass
from grouter_pass import (
    GrouterConfig,
    HashRouting,
    PrecomputedRouting,
    apply_grouter,
    grouter_reports,
    prepare_model,
    unused_parameters,
)
from grouter_pass.router.predispatching import Routing
from grouter_pass.testing.handwritten import BatchedGatherMoE, TinyMoELM
from grouter_pass.testing.models import tiny_hf_moe, tiny_token_ids
from grouter_pass.testing.parity import check_parity, compare_steps, default_output, exact_ops, run_step
from grouter_pass.testing.support import CASES_BY_NAME, make_inputs

REL_TOL = 1e-5


def _aot(**kw) -> GrouterConfig:
    return GrouterConfig(compiler="aot_eager", **kw)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_exact_mode_with_the_aux_loss_matches_the_training_loss_and_every_gradient(model_type):
    """The loss includes transformers' load-balancing loss computed from the router logits the
    rewritten graph returns: its gradient reaches the router through ``grouter.route``'s logits."""
    model = tiny_hf_moe(model_type, output_router_logits=True, router_aux_loss_coef=0.05).train()
    ids = tiny_token_ids(2, 7)
    result = check_parity(model, {"input_ids": ids, "labels": ids}, lambda m: apply_grouter(m, _aot()),
                          expect_ops=exact_ops(2), output_fn=lambda out: out.loss)
    assert not result.missing_grads and result.max_rel() <= REL_TOL, result.summary()
    # the aux loss is not a constant: without it the router gradients differ
    plain = tiny_hf_moe(model_type, output_router_logits=False).train()
    ref_aux = run_step(model, model, {"input_ids": ids, "labels": ids}, lambda o: o.loss, True, 1)[2]
    ref_plain = run_step(plain, plain, {"input_ids": ids, "labels": ids}, lambda o: o.loss, True, 1)[2]
    gate = next(k for k in ref_aux if k.endswith("layers.0.mlp.gate.weight"))
    assert not torch.allclose(ref_aux[gate], ref_plain[gate])


def test_prepare_model_alone_changes_no_number_and_makes_the_loop_capturable():
    """``prepare_model`` then ``torch.compile(backend="grouter")``: the loop-style block is
    rewritten in place before Dynamo (eager numbers unchanged), and the graph pass then rewrites it."""
    case = CASES_BY_NAME["megatron"]
    model = case.build()
    unmodified = copy.deepcopy(model)
    report = prepare_model(model)
    assert [b.path for b in report.loop_blocks if b.rewritten] == ["blocks.0", "blocks.1"] and report.changed
    inputs = make_inputs(case, model, 2, 6)
    got = run_step(model, model, inputs, default_output, True, 3)
    want = run_step(unmodified, unmodified, inputs, default_output, True, 3)
    result = compare_steps(got, want, None, None)
    assert not result.missing_grads and result.max_rel() <= REL_TOL, result.summary()
    compiled = torch.compile(model, backend="grouter", options={"compiler": "aot_eager"})
    got = run_step(compiled, model, inputs, default_output, True, 3)
    result = compare_steps(got, want, None, None)
    assert not result.missing_grads and result.max_rel() <= REL_TOL, result.summary()
    assert counters_ops() == exact_ops(2)


def counters_ops() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return dict(sorted(counters["grouter_ops"].items()))


def test_rewrite_modules_false_leaves_a_loop_block_to_dynamo():
    """Without the pre-Dynamo rewrite, the graph-breaking expert loop stays as the model wrote
    it: same numbers, no grouter op, and the module's forward is the model's own."""
    case = CASES_BY_NAME["megatron"]
    model = case.build()
    forward_before = type(model.blocks[0]).forward
    compiled = []
    result = check_parity(model, make_inputs(case, model, 2, 6), expect_ops={},
                          compile_fn=lambda m: compiled.append(apply_grouter(m, _aot(rewrite_modules=False)))
                          or compiled[-1])
    assert result.ok and result.max_rel() <= REL_TOL, result.summary()
    assert not compiled[0]._grouter_prepared.changed
    assert type(model.blocks[0]).forward is forward_before and "forward" not in vars(model.blocks[0])
    # and with it (the default) the same model is rewritten: the switch is what made the difference
    torch._dynamo.reset()   # the frames compiled above would otherwise be reused
    check_parity(model, make_inputs(case, model, 2, 6), lambda m: apply_grouter(m, _aot()), expect_ops=exact_ops(2))


def test_disable_passes_skips_the_rewrite_and_names_unknown_passes():
    model = tiny_hf_moe("qwen3_moe").train()
    compiled = []
    config = _aot(disable_passes=("rewrite_exact",))
    result = check_parity(model, {"input_ids": tiny_token_ids()}, expect_ops={},
                          compile_fn=lambda m: compiled.append(apply_grouter(m, config)) or compiled[-1])
    assert result.max_rel() <= REL_TOL
    (report,) = grouter_reports(compiled[0])
    assert len(report.sites) == 2 and not report.rewritten   # found, then not rewritten
    with pytest.raises(Exception, match=r"disable_passes names unknown passes \['rewrite'\]; passes: \["):
        apply_grouter(tiny_hf_moe("qwen3_moe"), _aot(disable_passes=("rewrite",)))(tiny_token_ids())


def test_unused_parameters_are_the_routers_in_grouter_modes_and_none_in_exact_mode():
    torch.manual_seed(0)
    model = TinyMoELM(BatchedGatherMoE, layers=2)
    ids = tiny_token_ids(2, 5)
    hashed = apply_grouter(model, _aot(routing=HashRouting.random(97, 8, 2, seed=1)))
    hashed(ids)
    assert [id(p) for p in unused_parameters(hashed)] == [id(model.blocks[0].router), id(model.blocks[1].router)]
    torch._dynamo.reset()
    exact = apply_grouter(model, _aot())
    exact(ids)
    assert unused_parameters(exact) == [] and counters_ops()["grouter.route"] == 2


def test_routing_with_one_argument_takes_a_predispatch_routing():
    torch.manual_seed(0)
    model = TinyMoELM(BatchedGatherMoE, layers=2)
    compiled = apply_grouter(model, _aot(routing=PrecomputedRouting()))
    ids = tiny_token_ids(2, 5)
    gen = torch.Generator().manual_seed(4)
    r = Routing(weights=torch.rand(2, 5, 2, generator=gen), ids=torch.rand(2, 5, 8, generator=gen).argsort(-1)[..., :2])
    with grouter_pass.routing(r):
        one = compiled(ids)
    with grouter_pass.routing(r.weights, r.ids):
        two = compiled(ids)
    assert torch.equal(one, two)
    with grouter_pass.routing(r.weights, (r.ids + 1) % 8):
        other = compiled(ids)
    assert not torch.allclose(one, other)   # the routing given is the routing used
    with pytest.raises(TypeError, match=r"routing\(r\) takes an object with \.ids and \.weights"):
        with grouter_pass.routing(r.weights):
            pass


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_parity_with_the_ops_outside_the_probe(model_type):
    """``probe_ops=False``: detection proves each site against the ops' reference semantics,
    so the ops that run are the ones compiled in, and only this parity check stands between a
    defect in an op and the user (with the probe running the ops, a wrong op is refused)."""
    model = tiny_hf_moe(model_type).train()
    with torch.no_grad():
        embeds = model.get_input_embeddings()(tiny_token_ids(3, 6))
    result = check_parity(model, {"inputs_embeds": embeds}, lambda m: apply_grouter(m, _aot(probe_ops=False)),
                          expect_ops=exact_ops(2))
    assert not result.missing_grads and result.max_rel() <= REL_TOL, result.summary()
