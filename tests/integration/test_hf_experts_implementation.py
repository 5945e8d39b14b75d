"""``experts_implementation="grouter"``: known to transformers right after ``import grouter_pass``
(either import order), and in eager mode it runs the grouter ops where the layer maps onto them,
matching transformers' ``grouped_mm`` forward and every gradient; other layers run ``grouped_mm``."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import grouter_pass  # noqa: F401  (registers the experts implementation)
from grouter_pass.testing.models import tiny_hf_moe, tiny_token_ids


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.ops.grouter.moe_experts.default
        return func(*args, **(kwargs or {}))


def test_the_name_is_known_right_after_import_in_a_fresh_process():
    script = textwrap.dedent("""
        import grouter_pass                      # before transformers is imported
        from grouter_pass.testing.models import tiny_hf_moe, tiny_token_ids
        model = tiny_hf_moe("qwen3_moe", experts_implementation="grouter")
        assert model.config._experts_implementation == "grouter"
        print(tuple(model(tiny_token_ids()).logits.shape))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().startswith("(2, 5,")


@pytest.mark.parametrize("model_type, runs_ops", [("qwen3_moe", True), ("mixtral", True), ("olmoe", True),
                                                  ("gpt_oss", False)])   # gpt-oss: a clamped SwiGLU gate
def test_eager_mode_runs_the_grouter_ops_and_matches_grouped_mm(model_type, runs_ops):
    ids = tiny_token_ids()
    results = {}
    for impl in ("grouped_mm", "grouter"):
        model = tiny_hf_moe(model_type, experts_implementation=impl)
        with _CountOps() as counted:
            logits = model(ids).logits
            logits.float().pow(2).mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results[impl] = (logits.detach(), grads, counted.calls)
    (want, want_grads, _), (got, got_grads, calls) = results["grouped_mm"], results["grouter"]
    layers = model.config.num_hidden_layers
    assert calls == (layers if runs_ops else 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name, g in got_grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_gate_layout_is_read_from_the_layer_not_its_class():
    """A layer whose gate reads gate and up from alternating columns runs the ops with the
    interleaved layout (found by running its ``_apply_gate``) and still matches ``grouped_mm``."""
    import types

    import torch.nn.functional as F

    def interleaved_gate(self, gate_up):
        return F.silu(gate_up[..., ::2]) * gate_up[..., 1::2]

    ids = tiny_token_ids()
    results = {}
    for impl in ("grouped_mm", "grouter"):
        model = tiny_hf_moe("qwen3_moe", experts_implementation=impl)
        for module in model.modules():
            if hasattr(module, "gate_up_proj"):
                module._apply_gate = types.MethodType(interleaved_gate, module)
        with _CountOps() as counted:
            logits = model(ids).logits
            logits.float().pow(2).mean().backward()
        results[impl] = (logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                         counted.calls)
    (want, want_grads, _), (got, got_grads, calls) = results["grouped_mm"], results["grouter"]
    assert calls == model.config.num_hidden_layers
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, g in got_grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
