"""The kernel choice is made by the graph pass and written into the graph: where the kernels
apply (here: ``GROUTER_KERNELS=triton`` on CPU under the interpreter, as CUDA would be), the
rewritten graph calls the ``triton_op`` twins, with autograd through the Triton backward, and the
result equals eager forward and backward; otherwise it calls the opaque ops."""

import pytest
import torch

from grouter_pass import GrouterConfig, apply_grouter, grouter_reports
from grouter_pass.testing.graphs import capture_graphs
from grouter_pass.testing.handwritten import BatchedGatherMoE


def _run(monkeypatch, kernels: str):
    monkeypatch.setenv("GROUTER_KERNELS", kernels)
    torch.manual_seed(0)
    model = BatchedGatherMoE(hidden=16, ffn=8, experts=4, top_k=2)
    x = torch.randn(1, 5, 16)
    ref = model(x)
    ref.backward(torch.ones_like(ref) * 0.3)
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = apply_grouter(model, GrouterConfig(compiler="aot_eager"))
    xg = x.clone()
    out = compiled(xg)
    out.backward(torch.ones_like(out) * 0.3)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-5, msg=n)
    (report,) = grouter_reports(compiled)
    return report


def test_where_the_kernels_apply_the_graph_calls_the_triton_ops(monkeypatch):
    report = _run(monkeypatch, "triton")
    assert sorted(report.kernels.values()) == ["grouter.dispatch_plan_triton", "grouter.moe_experts_triton"]
    (site,) = report.rewritten
    assert "grouter.moe_experts_triton" in site.new_ops and "grouter.moe_experts" not in site.new_ops


def test_with_reference_kernels_the_graph_keeps_the_opaque_ops(monkeypatch):
    report = _run(monkeypatch, "reference")
    assert report.kernels == {}
    (site,) = report.rewritten
    assert "grouter.moe_experts" in site.new_ops


@pytest.mark.parametrize("kernels", ["triton", "auto"])
def test_the_choice_is_in_the_compiled_graph_code(monkeypatch, kernels):
    """What a cache key on the graph sees: the op the graph calls (``auto``: the Triton twin on
    CUDA, the opaque op on CPU)."""
    on_gpu = torch.empty(0).device.type == "cuda"   # GROUTER_TEST_DEVICE=cuda (examples/gpu_check.py)
    calls = "moe_experts_triton.default(" if kernels == "triton" or on_gpu else "moe_experts.default("
    from grouter_pass.passes import run_grouter_passes

    monkeypatch.setenv("GROUTER_KERNELS", kernels)
    model = BatchedGatherMoE(hidden=16, ffn=8, experts=4, top_k=2)
    (gm,) = capture_graphs(model, torch.randn(1, 4, 16))
    new, _ = run_grouter_passes(gm, None, GrouterConfig())
    assert f"torch.ops.grouter.{calls}" in new.code
