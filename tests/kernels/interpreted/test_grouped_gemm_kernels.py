"""Each grouped-GEMM kernel under the Triton interpreter against its plain-torch twin
(``tests/kernels/interpreted/twins.py``), for every dtype, with empty experts, one token, every
token on one expert, and sizes that are not multiples of the interpreter's tiles (16, 32, 32)."""

import pytest
import torch

import grouter_pass  # noqa: F401  (registers the ops)
from grouter_pass.kernels.grouped_gemm_backward_kernels import down_backward, grouped_weight_grad
from grouter_pass.kernels.grouped_gemm_kernels import down_combine, linear_strides, up_act
from tests.kernels.interpreted import twins as KR
from tests.kernels.interpreted.cases import assert_close, make_ids, plan, rand

# name -> (routing, n, k, e, h, f, dtype, activation, gated, interleaved, transposed, bias)
CASES = {
    "fp32_swiglu_empty_experts": ("empty_experts", 19, 2, 6, 40, 24, torch.float32, "silu", True, False, False, True),
    "bf16_gelu_transposed": ("random", 13, 2, 4, 36, 20, torch.bfloat16, "gelu", False, False, True, False),
    "fp16_interleaved_one_token": ("random", 1, 2, 4, 24, 18, torch.float16, "gelu_tanh", True, True, False, True),
    "fp32_relu_one_expert": ("one_expert", 21, 1, 3, 20, 40, torch.float32, "relu", False, False, True, False),
}


def _setup(name):
    routing, n, k, e, h, f, dtype, act, gated, inter, transposed, bias = CASES[name]
    ids = make_ids(routing, n, k, e)
    perm, _, _, offsets = plan(ids, e)
    o = 2 * f if gated else f
    x = rand(n, h, dtype=dtype)
    w_up = rand(*((e, h, o) if transposed else (e, o, h)), dtype=dtype, scale=0.2)
    w_down = rand(*((e, f, h) if transposed else (e, h, f)), dtype=dtype, scale=0.2)
    b_up = rand(e, o, dtype=dtype, scale=0.1) if bias else None
    weights = (torch.rand(n * k) + 0.1).to(dtype)
    kw = dict(activation=act, gated=gated, interleaved=inter)
    return locals()


@pytest.mark.parametrize("name", sorted(CASES))
def test_up_act(name):
    c = _setup(name)
    args = (c["x"], c["perm"], c["offsets"], c["w_up"], c["b_up"])
    kw = dict(top_k=c["k"], up_transposed=c["transposed"], **c["kw"])
    got_h, got_a = up_act(*args, **kw)
    want_h, want_a = KR.up_act_reference(*args, **kw)
    assert_close(got_h, want_h, c["dtype"], "h")
    assert_close(got_a, want_a, c["dtype"], "a")


@pytest.mark.parametrize("name", sorted(CASES))
def test_down_combine(name):
    c = _setup(name)
    a = rand(c["perm"].numel(), c["f"], dtype=c["dtype"])
    s_e, s_out, s_in = linear_strides(c["w_down"], c["transposed"])
    b_down = rand(c["e"], c["h"], dtype=c["dtype"], scale=0.1) if c["bias"] else None
    args = (a, c["perm"], c["offsets"], c["w_down"], b_down, c["weights"], c["n"])
    kw = dict(top_k=c["k"], w_strides=(s_e, s_in, s_out), hidden=c["h"])
    assert_close(down_combine(*args, **kw), KR.down_combine_reference(*args, **kw), c["dtype"], "out")


@pytest.mark.parametrize("name", sorted(CASES))
def test_down_backward(name):
    c = _setup(name)
    h_SO, _ = KR.up_act_reference(c["x"], c["perm"], c["offsets"], c["w_up"], c["b_up"], top_k=c["k"],
                                  up_transposed=c["transposed"], **c["kw"])
    grad_out = rand(c["n"], c["h"], dtype=c["dtype"])
    args = (grad_out, c["perm"], c["offsets"], c["w_down"], h_SO, c["weights"])
    kw = dict(top_k=c["k"], down_transposed=c["transposed"], need_gw=True, **c["kw"])
    for label, g, w in zip(("gh", "a", "gw"), down_backward(*args, **kw), KR.down_backward_reference(*args, **kw)):
        assert_close(g, w, c["dtype"], label)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("gather", [True, False], ids=["gathered_scaled", "plain"])
def test_grouped_weight_grad(name, gather):
    c = _setup(name)
    s = c["perm"].numel()
    a_src = rand(c["n"], c["h"], dtype=c["dtype"]) if gather else rand(s, c["h"], dtype=c["dtype"])
    b = rand(s, c["f"], dtype=c["dtype"])
    out = torch.full((c["e"], c["f"], c["h"]), float("nan"), dtype=c["dtype"])  # stored [E, N, M]: strided
    strides = (out.stride(0), out.stride(2), out.stride(1))
    args = (a_src, b, c["perm"] if gather else None, c["weights"] if gather else None, c["offsets"])
    got = grouped_weight_grad(*args, out, strides, top_k=c["k"])
    want = KR.grouped_weight_grad_reference(*args, torch.empty_like(out), strides, top_k=c["k"])
    assert_close(got, want, c["dtype"], "dW")
