"""The probe skips comparing an expert region's gradients by value only where its forward match
proves them: a region of library ops. Anything that may define its own backward (an
``autograd.Function``, a custom op, a module call) is still compared, forward and backward."""

import pytest
import torch
import torch.nn.functional as F

from grouter_pass.config import GrouterConfig
from grouter_pass.passes import run_grouter_passes
from grouter_pass.passes.gradient_proof import gradients_follow_values
from grouter_pass.testing.graphs import capture_graphs
from tests.passes.conftest import SlotGatherExperts


class _ScaledSiLU(torch.autograd.Function):
    """SiLU whose backward is ``scale`` times the true derivative (1.0: a correct custom backward)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(x)
        ctx.scale = scale
        return F.silu(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * s * (1 + x * (1 - s)) * ctx.scale, None


@torch.library.custom_op("grouter_test::silu", mutates_args=())
def _custom_silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


@_custom_silu.register_fake
def _(x):
    return torch.empty_like(x)


def _custom_silu_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    s = torch.sigmoid(x)
    return grad * s * (1 + x * (1 - s)) * 3.0   # deliberately wrong


_custom_silu.register_autograd(_custom_silu_backward, setup_context=lambda ctx, inputs, output:
                               ctx.save_for_backward(inputs[0]))


class _SiLUModule(torch.nn.Module):
    def forward(self, x):
        return F.silu(x)


def _region(act):
    """The whole captured graph (every node) and its placeholders."""
    (gm,) = capture_graphs(SlotGatherExperts(act), torch.randn(10, 64))
    nodes = list(gm.graph.nodes)
    return nodes, [n for n in nodes if n.op == "placeholder"]


def test_a_region_of_library_ops_needs_no_gradient_comparison():
    assert gradients_follow_values(*_region(F.silu)) is None


def test_a_region_built_by_torch_fx_symbolic_trace_with_a_module_call_is_compared():
    gm = torch.fx.symbolic_trace(SlotGatherExperts(_SiLUModule()))
    nodes = list(gm.graph.nodes)
    why = gradients_follow_values(nodes, [n for n in nodes if n.op == "placeholder"])
    assert why is not None and "call_module" in why, why


@pytest.mark.parametrize("act,what", [
    (lambda x: _ScaledSiLU.apply(x, 1.0), "autograd_function_apply"),
    (_custom_silu, "grouter_test.silu"),
])
def test_a_region_that_may_define_its_own_backward_is_compared(act, what):
    why = gradients_follow_values(*_region(act))
    assert why is not None and what in why.replace("::", "."), why


def test_a_detach_is_named_as_the_reason():
    why = gradients_follow_values(*_region(lambda x: F.silu(x) + (x - x.detach())))
    assert why is not None and "detach" in why and "stops gradients" in why, why


@pytest.mark.parametrize("act", [lambda x: _ScaledSiLU.apply(x, 2.0), _custom_silu],
                         ids=["autograd_function", "custom_op"])
def test_a_custom_backward_that_is_not_the_derivative_is_not_rewritten(act):
    """The forward is exactly SiLU, so only the gradient comparison can tell the op apart."""
    (gm,) = capture_graphs(SlotGatherExperts(act), torch.randn(10, 64))
    new_gm, report = run_grouter_passes(gm, None, GrouterConfig())
    (site,) = report.sites
    assert new_gm is gm and not site.rewritten, site.summary()
    assert "gradient of" in site.reason and "differs" in site.reason, site.reason


def test_a_correct_custom_backward_is_rewritten():
    (gm,) = capture_graphs(SlotGatherExperts(lambda x: _ScaledSiLU.apply(x, 1.0)), torch.randn(10, 64))
    _, report = run_grouter_passes(gm, None, GrouterConfig())
    assert [s.rewritten for s in report.sites] == [True], [s.summary() for s in report.sites]


class _TwoLayers(torch.nn.Module):
    def __init__(self, first, second):
        super().__init__()
        self.layers = torch.nn.ModuleList([SlotGatherExperts(first), SlotGatherExperts(second)])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_layers_with_one_region_compare_gradients_once(caplog):
    act = lambda x: _ScaledSiLU.apply(x, 1.0)   # noqa: E731
    (gm,) = capture_graphs(_TwoLayers(act, act), torch.randn(10, 64))
    with caplog.at_level("DEBUG", logger="grouter_pass.passes.detect.experts"):
        _, report = run_grouter_passes(gm, None, GrouterConfig())
    assert [s.rewritten for s in report.sites] == [True, True]
    assert caplog.text.count("comparing the expert region's gradients by value") == 1
    assert caplog.text.count("compared before: its gradients agreed") == 1


def test_a_layer_with_another_backward_is_compared_on_its_own():
    """Same forward, same shapes, but the second layer's ``autograd.Function`` has a wrong backward:
    its fingerprint differs (the backward's code), so the first layer's proof does not carry over."""
    (gm,) = capture_graphs(_TwoLayers(lambda x: _ScaledSiLU.apply(x, 1.0), lambda x: _ScaledSiLU.apply(x, 2.0)),
                           torch.randn(10, 64))
    _, report = run_grouter_passes(gm, None, GrouterConfig())
    assert [s.rewritten for s in report.sites] == [True, False], [s.summary() for s in report.sites]


@pytest.mark.parametrize("act,runs", [(F.silu, ["capacity", "trial", "trial"]),
                                      (lambda x: _ScaledSiLU.apply(x, 1.0), ["capacity", "trial", "gradients"])],
                         ids=["library_ops", "autograd_function"])
def test_the_region_runs_once_per_routing(monkeypatch, act, runs):
    """Capacity, then two random routings: where gradients are compared by value, the second
    routing's forward is compared in the same run (at full size the region's forward is most of
    the probe's time, so it is not run twice)."""
    from grouter_pass.passes.detect import experts

    seen = []
    original = experts._Probe.run_region

    def counted(self, inputs, grad=False):
        seen.append("gradients" if grad else "capacity" if float(inputs["w"].count_nonzero()) == inputs["w"].shape[0]
                    else "trial")
        return original(self, inputs, grad)

    monkeypatch.setattr(experts._Probe, "run_region", counted)
    (gm,) = capture_graphs(SlotGatherExperts(act), torch.randn(10, 64))
    _, report = run_grouter_passes(gm, None, GrouterConfig())
    assert [s.rewritten for s in report.sites] == [True]
    assert seen == runs
