"""The expert-parallel CPU path against the reference it replaces: same outputs and gradients,
for every expert style it accepts, with 1 and 2 threads, empty experts, partial ``needs``."""

import pytest
import torch

from grouter_pass.ops import cpu_experts as C
from grouter_pass.ops import reference as R
from grouter_pass.spec import ExpertMLP

# name -> (activation kwargs, transposed layouts, biases)
CASES = {
    "swiglu": (dict(activation="silu", gated=True, interleaved=False, alpha=1.0, limit=0.0), False, False),
    "gpt_oss": (dict(activation="clamped_swiglu", gated=True, interleaved=True, alpha=1.702, limit=0.8), True, True),
    "gelu_plain": (dict(activation="gelu", gated=False, interleaved=False, alpha=1.0, limit=0.0), False, True),
}


def _inputs(name, n=37, k=3, e=9, h=20, f=12):
    act, transposed, bias = CASES[name]
    up = 2 * f if act["gated"] else f
    ids = torch.stack([torch.randperm(e - 3)[:k] for _ in range(n)])  # the last 3 experts get no token
    perm, inv, _, offs = R.dispatch_plan_reference(ids, e)
    t = dict(x=torch.randn(n, h), w=torch.rand(n, k) + 0.1,
             wu=torch.randn((e, h, up) if transposed else (e, up, h)) * 0.2,
             wd=torch.randn((e, f, h) if transposed else (e, h, f)) * 0.2,
             bu=torch.randn(e, up) * 0.1 if bias else None, bd=torch.randn(e, h) * 0.1 if bias else None)
    kw = dict(mlp=ExpertMLP(up_transposed=transposed, down_transposed=transposed, **act))
    return (t["x"], t["w"], perm, inv, offs, t["wu"], t["wd"], t["bu"], t["bd"]), kw


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_backward_equal_reference(name, threads):
    args, kw = _inputs(name)
    assert C.supported(args[0], args[1], args[5], args[6], False)
    out, h = C.moe_experts_cpu(*args, **kw)
    want_out, want_h = R.moe_experts_reference(*args, **kw)
    torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(h, want_h, rtol=0, atol=0)
    grad = torch.randn_like(out)
    for needs in ((True,) * 6, (False, True, False, True, False, True), (True, False, True, False, True, False)):
        got = C.moe_experts_backward_cpu(grad, *args, want_h, needs_input_grad=needs, **kw)
        want = R.moe_experts_backward_reference(grad, *args, want_h, needs_input_grad=needs, **kw)
        for g, w in zip(got, want):
            assert (g is None) == (w is None)
            if w is not None:
                torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    assert torch.get_num_threads() == threads  # restored after the parallel region


def test_unsupported_configurations_are_declined():
    args, _ = _inputs("swiglu")
    x, w, wu, wd = args[0], args[1], args[5], args[6]
    assert not C.supported(x, w, wu, wd, True)  # weight on the input
    assert not C.supported(x.double(), w, wu, wd, False)  # mixed dtypes
    assert not C.supported(x.bfloat16(), w, wu.bfloat16(), wd.bfloat16(), False)  # fp32 weights: fp32 combine


def test_op_uses_cpu_path_where_openmp_threads_sleep_unless_reference_forced(monkeypatch):
    args, kw = _inputs("swiglu")
    calls = []
    real = C.moe_experts_cpu
    monkeypatch.setattr(C, "moe_experts_cpu", lambda *a, **k: calls.append(1) or real(*a, **k))
    flags = dict(kw["mlp"].kwargs(), out_dtype=None)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    torch.ops.grouter.moe_experts(*args, **flags)
    assert calls == [1]
    monkeypatch.setenv("GROUTER_KERNELS", "reference")
    torch.ops.grouter.moe_experts(*args, **flags)
    assert calls == [1]
    monkeypatch.delenv("GROUTER_KERNELS")
    monkeypatch.delenv("OMP_WAIT_POLICY")   # OpenMP's default: spinning threads, the reference is faster
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    torch.ops.grouter.moe_experts(*args, **flags)
    assert calls == [1]


def test_errors_in_worker_threads_propagate(threads):
    args, kw = _inputs("swiglu")
    bad = list(args)
    bad[5] = args[5][:, :, :-1]  # wrong hidden size: the first GEMM fails in whichever thread runs it
    with pytest.raises(RuntimeError):
        C.moe_experts_cpu(*bad, **kw)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("mode", ["inference_mode", "autocast_bf16"])
def test_calling_threads_modes_reach_the_workers(mode, threads):
    """Inference tensors are written by the worker threads, and autocast applies there as on the
    calling thread (the bias term of the routing-weight gradient is an autocast GEMM in the
    reference): forward and backward equal the reference run under the same mode."""
    args, kw = _inputs("gpt_oss")
    ctx = (torch.inference_mode if mode == "inference_mode"
           else lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    with ctx():
        out, h = C.moe_experts_cpu(*args, **kw)
        want_out, want_h = R.moe_experts_reference(*args, **kw)
        grad = torch.ones_like(out)
        got = C.moe_experts_backward_cpu(grad, *args, want_h, **kw)
        want = R.moe_experts_backward_reference(grad, *args, want_h, **kw)
    torch.testing.assert_close(h, want_h, rtol=0, atol=0)
    torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-7)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_inputs_that_require_grad_outside_no_grad(threads):
    """The op's implementation can be entered with grad mode on and inputs requiring grad
    (autograd is below the custom op): the worker threads must still not record."""
    args, kw = _inputs("swiglu")
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    out, h = C.moe_experts_cpu(*args, **kw)
    grads = C.moe_experts_backward_cpu(torch.ones_like(out), *args, h.detach(), **kw)
    assert not out.requires_grad and all(g is None or not g.requires_grad for g in grads)
