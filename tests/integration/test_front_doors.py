"""The three ways in: ``backend="grouter"`` (entry point, fresh process), ``apply_grouter`` with
``verify``, and ``GrouterPreGradPass`` for users who stay on ``backend="inductor"``."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._dynamo.utils import counters

import grouter_pass
from grouter_pass import GrouterConfig, GrouterPreGradPass, GrouterVerificationError, apply_grouter, grouter_reports
from grouter_pass.testing.models import tiny_hf_moe, tiny_token_ids
from grouter_pass.testing.parity import check_parity, exact_ops

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_backend_string_works_in_a_fresh_process_through_the_entry_point():
    code = textwrap.dedent("""
        import logging, sys
        import torch, transformers
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout)
        transformers.logging.set_verbosity_error()
        cfg = transformers.AutoConfig.for_model(
            "qwen3_moe", hidden_size=64, intermediate_size=80, moe_intermediate_size=48, num_experts=8,
            num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=97, use_cache=False)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        ids = torch.randint(0, 97, (2, 5))
        want = model(ids).logits
        assert "grouter_pass" not in sys.modules
        got = torch.compile(model, backend="grouter", options={"compiler": "aot_eager"})(ids).logits
        assert "grouter_pass" in sys.modules  # loaded by Dynamo through the entry point
        print("max abs diff", (got - want).abs().max().item())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "found 2 gating site(s), rewrote 2" in out.stdout, out.stdout
    diff = float(out.stdout.split("max abs diff")[-1])
    assert diff <= 1e-5


def test_backend_options_are_config_fields():
    with pytest.raises(ValueError, match=r"unknown grouter option\(s\) \['colour'\]; known options: \["):
        GrouterConfig.from_options({"colour": "blue"})
    assert GrouterConfig.from_options({"compiler": "eager", "probe": False}) == GrouterConfig(
        compiler="eager", probe=False)
    with pytest.raises(ValueError, match="compiler='tvm'; choose one of"):
        GrouterConfig(compiler="tvm")


def test_verify_passes_on_an_exact_rewrite():
    model = tiny_hf_moe("mixtral")
    ids = tiny_token_ids()
    want = model(ids).logits
    compiled = apply_grouter(model, GrouterConfig(compiler="aot_eager"), verify=True)
    got = compiled(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # verified because something was rewritten: verify has nothing to compare on an unchanged graph
    assert [s.module_path for s in grouter_reports(compiled)[0].rewritten] == ["model.layers.0.mlp",
                                                                               "model.layers.1.mlp"]
    assert dict(counters["grouter_ops"]) == exact_ops(2)


def _nudge_the_scaling_factor(monkeypatch, factor: float):
    """A rewrite that is off by a relative ``factor - 1`` in every routing weight."""
    from grouter_pass.passes import rewrite

    real = rewrite._call

    def nudged(graph, target, args, kwargs, **kw):
        if target is torch.ops.grouter.route.default:
            kwargs = {**kwargs, "scaling_factor": kwargs["scaling_factor"] * factor}
        return real(graph, target, args, kwargs, **kw)

    monkeypatch.setattr(rewrite, "_call", nudged)


@pytest.mark.parametrize("tolerances, raises", [({}, True), ({"verify_rtol": 1e-2, "verify_atol": 1e-2}, False)])
def test_verify_uses_the_configured_tolerances(monkeypatch, tolerances, raises):
    """A 1e-4 relative error is beyond verify's fp32 default and within a 1e-2 tolerance."""
    _nudge_the_scaling_factor(monkeypatch, 1.0 + 1e-4)
    model = tiny_hf_moe("mixtral")
    compiled = apply_grouter(model, GrouterConfig(compiler="aot_eager", **tolerances), verify=True)
    if raises:
        with pytest.raises(GrouterVerificationError, match=r"output 0 float32\[2, 5, 97\]: max abs err"):
            compiled(tiny_token_ids())
    else:
        compiled(tiny_token_ids())
    assert counters["grouter"]["sites_rewritten"] == 2


def _break_the_rewrite(monkeypatch):
    """A bug in the rewrite itself (it emits ``grouter.route`` with the scaling factor doubled)
    after detection proved the right spec: only ``verify`` can see it."""
    from grouter_pass.passes import rewrite

    real = rewrite._call

    def wrong_call(graph, target, args, kwargs, **kw):
        if target is torch.ops.grouter.route.default:
            kwargs = {**kwargs, "scaling_factor": 2.0}
        return real(graph, target, args, kwargs, **kw)

    monkeypatch.setattr(rewrite, "_call", wrong_call)


def _break_the_route_op(monkeypatch):
    """A bug in the ``grouter.route`` op (its weights doubled), not in the reference semantics
    detection reads."""
    from grouter_pass.ops import reference, route

    class Broken:
        def __getattr__(self, name):
            return getattr(reference, name)

        @staticmethod
        def route_reference(*args, **kwargs):
            w, ids = reference.route_reference(*args, **kwargs)
            return w * 2.0, ids

    monkeypatch.setattr(route, "reference", Broken())


def test_verify_raises_with_the_per_output_error_when_numbers_change(monkeypatch):
    """A wrong rewrite must be caught on the first call, naming the output and its error."""
    _break_the_rewrite(monkeypatch)
    model = tiny_hf_moe("mixtral")
    compiled = apply_grouter(model, GrouterConfig(compiler="aot_eager"), verify=True)
    with pytest.raises(GrouterVerificationError, match=r"(?s)output 0 float32\[2, 5, 97\]: max abs err .*"
                                                          r"rewritten sites:.*model.layers.0.mlp"):
        compiled(tiny_token_ids())


def test_the_probe_keeps_a_wrong_op_out_of_the_graph(monkeypatch):
    """Detection compares the real ``grouter.route`` with the model, not only its reference: with
    a broken op the gating is kept as the model wrote it (only the experts are rewritten) and
    the numbers stay the same."""
    _break_the_route_op(monkeypatch)
    model = tiny_hf_moe("mixtral")
    ids = tiny_token_ids()
    want = model(ids).logits
    compiled = apply_grouter(model, GrouterConfig(compiler="aot_eager"), verify=True)
    torch.testing.assert_close(compiled(ids).logits, want)
    sites = grouter_reports(compiled)[0].sites
    assert [(s.rewritten, s.family) for s in sites] == [(True, "kept"), (True, "kept")]
    assert all("grouter.route" not in s.new_ops for s in sites)


@pytest.mark.slow
def test_pre_grad_custom_pass_on_backend_inductor_and_fx_graph_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = tiny_hf_moe("qwen3_moe")
    ids = tiny_token_ids()
    want = model(ids).logits
    grouter_pass_ = GrouterPreGradPass(GrouterConfig())
    from torch._inductor import config as inductor_config

    with inductor_config.patch(fx_graph_cache=True, fx_graph_remote_cache=False):
        for attempt in range(2):
            torch._dynamo.reset()
            got = torch.compile(model, options={"pre_grad_custom_pass": grouter_pass_})(ids).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert dict(counters["grouter_ops"]) == {op: 2 * n for op, n in exact_ops(2).items()}
    # the uuid() keeps the FX graph cache on: the second compile is served from it
    assert counters["inductor"]["fxgraph_cache_miss"] == 1
    assert counters["inductor"]["fxgraph_cache_hit"] == 1


@pytest.mark.slow
def test_pre_grad_custom_pass_training_step_parity(tmp_path, monkeypatch):
    """Forward and every gradient through ``backend="inductor"`` with the pre-grad pass (the
    router's through the route op's backward, the experts' through the experts op's). A cache of
    its own: a warm Inductor cache serves the rewritten graph without running the pass, so the
    rewrite would not be counted (cache hits are the test above)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = tiny_hf_moe("qwen3_moe").train()
    grouter_pass_ = GrouterPreGradPass(GrouterConfig())
    result = check_parity(model, {"inputs_embeds": _embeds(model)}, expect_ops=exact_ops(2),
                          compile_fn=lambda m: torch.compile(m, options={"pre_grad_custom_pass": grouter_pass_}))
    assert not result.missing_grads and result.max_rel() <= 1e-5, result.summary()
    assert sum(".mlp.gate." in k for k in result.param_grads) == 2


def test_entry_point_backend_training_step_parity():
    """``backend="grouter"`` looked up by name, forward and every gradient."""
    model = tiny_hf_moe("deepseek_v3").train()
    result = check_parity(model, {"inputs_embeds": _embeds(model)}, expect_ops=exact_ops(2),
                          compile_fn=lambda m: torch.compile(m, backend="grouter", options={"compiler": "aot_eager"}))
    assert not result.missing_grads and result.max_rel() <= 1e-5, result.summary()
    assert sum(".mlp.gate.weight" in k for k in result.param_grads) == 2


def _embeds(model, batch: int = 2, seq: int = 7) -> torch.Tensor:
    with torch.no_grad():
        return model.get_input_embeddings()(tiny_token_ids(batch, seq))


def test_pre_grad_pass_uuid_tracks_source_and_config():
    a, b = GrouterPreGradPass(GrouterConfig()), GrouterPreGradPass(GrouterConfig())
    assert a.uuid() == b.uuid()
    assert a.uuid() != GrouterPreGradPass(GrouterConfig(probe=False)).uuid()
    # verify settings do not change the graph, so they do not invalidate the cache
    assert a.uuid() == GrouterPreGradPass(GrouterConfig(verify=True)).uuid()


def test_fullgraph_compiles_and_matches():
    model = tiny_hf_moe("deepseek_v3").train()
    result = check_parity(model, {"input_ids": tiny_token_ids()},
                          lambda m: apply_grouter(m, GrouterConfig(compiler="aot_eager", fullgraph=True)),
                          expect_ops=exact_ops(2))
    assert counters["grouter"]["sites_rewritten"] == 2
    assert result.max_rel() <= 1e-5, result.summary()


def test_every_public_name_resolves_and_importing_stays_light():
    """``import grouter_pass`` registers the ops without loading the graph passes or Dynamo;
    every name of ``__all__`` then resolves (lazily) to the object its module defines."""
    code = textwrap.dedent("""
        import sys, torch
        import grouter_pass
        assert hasattr(torch.ops.grouter, "route") and hasattr(torch.ops.grouter, "moe_experts")
        heavy = sorted(m for m in ("grouter_pass.passes", "grouter_pass.api", "torch._dynamo.eval_frame")
                       if m in sys.modules)
        assert not heavy, heavy
        for name in grouter_pass.__all__:
            obj = getattr(grouter_pass, name)
            assert getattr(obj, "__name__", name) == name or name == "routing", name
        from grouter_pass import *  # noqa: F403
        assert apply_grouter is grouter_pass.apply_grouter  # noqa: F405
        assert grouter_pass.routing.__module__ == "grouter_pass.runtime.step" and callable(grouter_pass.routing)
        print("ok", len(grouter_pass.__all__))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split()[-1]) >= 15


def test_verify_does_not_apply_in_place_input_mutations_twice():
    """The reference run of ``verify`` gets clones of the inputs the graph mutates: a step counter
    the model bumps in place must advance once per call."""

    class CountingLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = tiny_hf_moe("olmoe")
            self.register_buffer("steps", torch.zeros((), dtype=torch.long))

        def forward(self, ids):
            self.steps.add_(1)
            return self.lm(ids).logits

    model = CountingLM()
    compiled = apply_grouter(model, GrouterConfig(compiler="aot_eager"), verify=True)
    compiled(tiny_token_ids())
    assert counters["grouter"]["sites_rewritten"] == 2
    assert model.steps.item() == 1


def test_backend_object_takes_mode_and_options_as_torch_compile_passes_them():
    model = tiny_hf_moe("qwen3_moe")
    ids = tiny_token_ids()
    want = model(ids).logits
    backend = grouter_pass.GrouterBackend(GrouterConfig(compiler="eager"))
    got = torch.compile(model, backend=backend, mode="max-autotune-no-cudagraphs")(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert backend.reports and backend.reports[-1].changed
    torch._dynamo.reset()
    backend = grouter_pass.GrouterBackend(GrouterConfig(compiler="eager"))
    torch.compile(model, backend=backend, options={"probe": False})(ids)
    assert backend.reports[-1].changed
    with pytest.raises(Exception, match=r"unknown grouter option\(s\) \['colour'\]"):
        torch._dynamo.reset()
        torch.compile(model, backend=grouter_pass.GrouterBackend(), options={"colour": "red"})(ids)


def test_apply_grouter_takes_an_inductor_mode():
    model = tiny_hf_moe("qwen3_moe")
    ids = tiny_token_ids()
    compiled = apply_grouter(model, GrouterConfig(compiler="eager"), mode="max-autotune-no-cudagraphs")
    torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
