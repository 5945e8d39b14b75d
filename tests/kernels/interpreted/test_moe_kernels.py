"""The composed routed-experts forward and backward on the kernels, against the ops' reference
(the exact-mode contract), through the ops (autograd included) and through the ``triton_op``s."""

import pytest
import torch

import grouter_pass  # noqa: F401  (registers the ops)
from grouter_pass.kernels.moe import moe_experts_backward_triton, moe_experts_triton
from grouter_pass.ops import reference as R
from grouter_pass.ops.triton_ops import register_triton_ops
from grouter_pass.spec import ExpertMLP
from tests.kernels.interpreted.cases import assert_close, make_ids, plan, rand

# name -> (routing, n, k, e, h, f, dtype, activation, gated, interleaved, up_T, down_T, biases)
CASES = {
    "fp32_swiglu": ("random", 19, 2, 4, 40, 24, torch.float32, "silu", True, False, False, False, False),
    "bf16_gelu_transposed_bias_empty": ("empty_experts", 13, 2, 6, 36, 20, torch.bfloat16, "gelu", False, False,
                                        True, True, True),
    "fp16_interleaved_one_token": ("random", 1, 2, 4, 24, 18, torch.float16, "silu", True, True, False, True, False),
    "fp32_one_expert_bias": ("one_expert", 21, 1, 3, 20, 12, torch.float32, "gelu_tanh", True, False, True, False,
                             True),
}
NAMES = ("x", "weights", "w_up", "w_down", "b_up", "b_down")


def _inputs(name):
    routing, n, k, e, h, f, dtype, act, gated, inter, up_t, down_t, biases = CASES[name]
    ids = make_ids(routing, n, k, e)
    perm, inv_perm, _, offsets = plan(ids, e)
    o = 2 * f if gated else f
    tensors = dict(
        x=rand(n, h, dtype=dtype), weights=torch.rand(n, k) + 0.1,
        w_up=rand(*((e, h, o) if up_t else (e, o, h)), dtype=dtype, scale=0.2),
        w_down=rand(*((e, f, h) if down_t else (e, h, f)), dtype=dtype, scale=0.2),
        b_up=rand(e, o, dtype=dtype, scale=0.1) if biases else None,
        b_down=rand(e, h, dtype=dtype, scale=0.1) if biases else None)
    mlp = ExpertMLP(activation=act, gated=gated, interleaved=inter, up_transposed=up_t, down_transposed=down_t)
    return tensors, (perm, inv_perm, offsets), mlp, dtype


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_backward_match_reference(name):
    t, (perm, inv_perm, offsets), mlp, dtype = _inputs(name)
    args = (t["x"], t["weights"], perm, inv_perm, offsets, t["w_up"], t["w_down"], t["b_up"], t["b_down"])
    out, h = moe_experts_triton(*args, mlp=mlp, out_dtype=None)
    want_out, want_h = R.moe_experts_reference(*args, mlp=mlp)
    assert_close(out, want_out, dtype, "out")
    assert_close(h, want_h, dtype, "h")
    grad_out = rand(*out.shape, dtype=out.dtype)
    got = moe_experts_backward_triton(grad_out, *args, want_h, mlp=mlp)
    want = R.moe_experts_backward_reference(grad_out, *args, want_h, mlp=mlp)
    for label, g, w in zip(NAMES, got, want):
        assert (g is None) == (w is None), label
        if w is not None:
            assert_close(g, w, dtype, f"grad {label}")


def test_op_autograd_runs_the_kernels(monkeypatch):
    """``grouter::moe_experts`` + autograd on the kernels (GROUTER_KERNELS=triton) equals the same
    op on the reference path, for the output and every gradient."""
    import grouter_pass.kernels.moe as M

    t, (perm, inv_perm, offsets), mlp, dtype = _inputs("fp32_one_expert_bias")
    flags = dict(mlp.kwargs(), out_dtype=None)
    calls = []
    for fn in ("moe_experts_triton", "moe_experts_backward_triton"):
        real = getattr(M, fn)
        monkeypatch.setattr(M, fn, lambda *a, _real=real, _fn=fn, **k: calls.append(_fn) or _real(*a, **k))

    def run():
        leaves = {k: v.clone().requires_grad_() for k, v in t.items() if v is not None}
        full = {k: leaves.get(k) for k in NAMES}
        out, _ = torch.ops.grouter.moe_experts(full["x"], full["weights"], perm, inv_perm, offsets, full["w_up"],
                                               full["w_down"], full["b_up"], full["b_down"], **flags)
        grads = torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out) * 0.5)
        return out, grads

    out, grads = run()
    assert calls == ["moe_experts_triton", "moe_experts_backward_triton"]
    monkeypatch.setenv("GROUTER_KERNELS", "reference")
    want_out, want_grads = run()
    assert_close(out, want_out, dtype, "out")
    for g, w in zip(grads, want_grads):
        assert_close(g, w, dtype, "grad")


def test_triton_ops_eager_and_opcheck():
    """The ``triton_op`` forms Inductor uses on CUDA give the same results in eager mode."""
    assert register_triton_ops()
    t, (perm, inv_perm, offsets), mlp, dtype = _inputs("fp16_interleaved_one_token")
    args = (t["x"], t["weights"], perm, inv_perm, offsets, t["w_up"], t["w_down"], t["b_up"], t["b_down"])
    flags = tuple(mlp.kwargs().values())
    out, h = torch.ops.grouter.moe_experts_triton(*args, *flags, None, False)
    want_out, want_h = R.moe_experts_reference(*args, mlp=mlp)
    assert_close(out, want_out, dtype, "out")
    grad_out = rand(*out.shape, dtype=out.dtype)
    grads = torch.ops.grouter.moe_experts_backward_triton(grad_out, *args, want_h, [True] * 6, *flags, False)
    want = R.moe_experts_backward_reference(grad_out, *args, want_h, mlp=mlp)
    for label, g, w in zip(NAMES, grads, want):
        if w is not None:
            assert_close(g, w, dtype, f"grad {label}")
    ids = make_ids("random", 7, 2, 5)
    for g, w in zip(torch.ops.grouter.dispatch_plan_triton(ids, 5), plan(ids, 5)):
        assert torch.equal(g, w)
