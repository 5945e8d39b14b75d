"""The ``torch.ops.grouter`` ops: ``torch.library.opcheck`` (schema, fake tensors, autograd
registration, AOT dispatch with dynamic shapes) and gradients against autograd of the reference."""

import pytest
import torch

import grouter_pass  # noqa: F401  (registers the ops)
from grouter_pass.ops import reference as R
from grouter_pass.spec import ExpertMLP

ROUTE_DEFAULTS = dict(top_k=2, score_func="softmax", order="score_then_topk", bias_mode="none", n_group=1,
                      topk_group=1, group_score="top2_sum", renorm="none", renorm_eps=0.0, renorm_clamp_min=None,
                      renorm_p=1.0, scaling_factor=1.0, score_dtype=None, weights_dtype=torch.float32, sorted=True,
                      sparsemixer_threshold=0.0)

ROUTE_SPECS = {
    "mixtral": dict(renorm="sum"),
    "qwen2": dict(),
    "deepseek_v3": dict(score_func="sigmoid", bias_mode="selection", n_group=4, topk_group=2, renorm="sum",
                        renorm_eps=1e-20, scaling_factor=2.5, sorted=False),
    "gpt_oss": dict(order="topk_then_score"),
    "ernie": dict(bias_mode="selection", renorm="sum", renorm_clamp_min=1e-12),
    "dbrx": dict(renorm="lp", renorm_p=1.0, top_k=3),
    "biased_weights": dict(score_func="sigmoid", bias_mode="score", renorm="sum", renorm_eps=1e-20),
    "bf16_logits": dict(score_dtype=torch.float32, weights_dtype=torch.bfloat16, renorm="sum"),
    "llama4": dict(top_k=1, order="topk_then_score", score_func="sigmoid"),
    "phimoe_sparsemixer": dict(score_func="sparsemixer", sparsemixer_threshold=0.3),
}


@pytest.mark.parametrize("name", sorted(ROUTE_SPECS))
@pytest.mark.parametrize("n", [1, 13])
def test_route_opcheck_and_grads(name, n):
    kw = {**ROUTE_DEFAULTS, **ROUTE_SPECS[name]}
    dtype = torch.bfloat16 if name == "bf16_logits" else torch.float32
    logits = torch.randn(n, 8, dtype=dtype, requires_grad=True)
    bias = torch.randn(8, requires_grad=True) if kw["bias_mode"] != "none" else None
    torch.library.opcheck(torch.ops.grouter.route.default, (logits, bias), kw)
    w, ids = torch.ops.grouter.route(logits, bias, **kw)
    want_w, want_ids = R.route_reference(logits, bias, **kw)
    assert torch.equal(ids, want_ids) and torch.equal(w, want_w)
    g = torch.randn_like(w)
    leaves = [logits] + ([bias] if bias is not None else [])
    got = torch.autograd.grad(w, leaves, g, allow_unused=True)
    want = torch.autograd.grad(want_w, leaves, g, allow_unused=True)
    for a, b in zip(got, want):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(2, 5, 8), (7, 3, 8)])
def test_route_on_logits_of_any_rank(shape):
    """[B, T, E] (and sequence-first [T, B, E]) logits route row by row: same numbers and
    gradients as the flattened [N, E] routing, reshaped."""
    kw = {**ROUTE_DEFAULTS, **ROUTE_SPECS["deepseek_v3"]}
    logits = torch.randn(*shape, requires_grad=True)
    bias = torch.randn(8)
    torch.library.opcheck(torch.ops.grouter.route.default, (logits, bias), kw)
    w, ids = torch.ops.grouter.route(logits, bias, **kw)
    assert w.shape == (*shape[:-1], 2) and ids.shape == (*shape[:-1], 2)
    flat = logits.detach().reshape(-1, 8).requires_grad_(True)
    w2, ids2 = torch.ops.grouter.route(flat, bias, **kw)
    assert torch.equal(ids.reshape(-1, 2), ids2) and torch.equal(w.reshape(-1, 2), w2)
    g = torch.randn_like(w)
    (a,) = torch.autograd.grad(w, [logits], g)
    (b,) = torch.autograd.grad(w2, [flat], g.reshape(-1, 2))
    assert torch.equal(a.reshape(-1, 8), b)


def _capacity_keep_loop(ids: torch.Tensor, w: torch.Tensor, e: int, c: int, priority: str) -> torch.Tensor:
    """Written from the definition, slot by slot: an independent oracle for capacity_keep."""
    n, k = ids.shape
    slots = [(t, j) for t in range(n) for j in range(k)]
    if priority == "choice":
        slots = [(t, j) for j in range(k) for t in range(n)]
    elif priority == "score":
        slots = sorted(slots, key=lambda s: (-float(w[s]), s[0] * k + s[1]))
    used = [0] * e
    keep = torch.zeros(n, k, dtype=torch.bool)
    for t, j in slots:
        ex = int(ids[t, j])
        if used[ex] < c:
            keep[t, j] = True
        used[ex] += 1
    return keep


@pytest.mark.parametrize("priority", ["token", "choice", "score"])
@pytest.mark.parametrize("n,k,e,c", [(1, 1, 4, 1), (12, 2, 4, 3), (20, 3, 8, 2), (9, 2, 4, 9)])
def test_capacity_keep_matches_its_definition(priority, n, k, e, c):
    gen = torch.Generator().manual_seed(n * 31 + c)
    ids = torch.argsort(torch.rand(n, e, generator=gen), dim=-1)[:, :k]
    ids[: n // 2, 0] = 0   # an expert over capacity
    ids[: n // 2] = torch.where(ids[: n // 2, 1:2] == 0, torch.roll(ids[: n // 2], 1, dims=1), ids[: n // 2]) \
        if k > 1 else ids[: n // 2]
    w = torch.rand(n, k, generator=gen)
    torch.library.opcheck(torch.ops.grouter.capacity_keep.default, (ids, w, e, c, priority))
    got = torch.ops.grouter.capacity_keep(ids, w, e, c, priority)
    assert torch.equal(got, _capacity_keep_loop(ids, w, e, c, priority)), (ids, got)


@pytest.mark.parametrize("n,k,e", [(1, 1, 4), (10, 2, 8), (33, 3, 5)])
def test_dispatch_plan_opcheck(n, k, e):
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    torch.library.opcheck(torch.ops.grouter.dispatch_plan.default, (ids, e))
    for got, want in zip(torch.ops.grouter.dispatch_plan(ids, e), R.dispatch_plan_reference(ids, e)):
        assert torch.equal(got, want)


EXPERT_CASES = {  # name -> (activation kwargs, transposed layouts, biases, weight on input)
    "swiglu": (dict(activation="silu", gated=True, interleaved=False, alpha=1.0, limit=0.0), False, False, False),
    "gpt_oss": (dict(activation="clamped_swiglu", gated=True, interleaved=True, alpha=1.702, limit=0.8), True, True,
                False),
    "gelu_plain": (dict(activation="gelu", gated=False, interleaved=False, alpha=1.0, limit=0.0), False, True, False),
    "llama4_weight_on_input": (dict(activation="silu", gated=True, interleaved=False, alpha=1.0, limit=0.0), True,
                               False, True),
}


def _experts_inputs(name, n, k, e, routing, requires_grad=True):
    act, transposed, bias, on_input = EXPERT_CASES[name]
    h, f = 12, 5
    up = 2 * f if act["gated"] else f
    x = torch.randn(n, h, requires_grad=requires_grad)
    w = (torch.rand(n, k) + 0.1).requires_grad_(requires_grad)
    ids = torch.arange(k).expand(n, k).clone() if routing == "one_expert_set" else torch.stack(
        [torch.randperm(e)[:k] for _ in range(n)])
    wu = (torch.randn((e, h, up) if transposed else (e, up, h)) * 0.2).requires_grad_(requires_grad)
    wd = (torch.randn((e, f, h) if transposed else (e, h, f)) * 0.2).requires_grad_(requires_grad)
    bu = (torch.randn(e, up) * 0.1).requires_grad_(requires_grad) if bias else None
    bd = (torch.randn(e, h) * 0.1).requires_grad_(requires_grad) if bias else None
    perm, inv, _, offs = torch.ops.grouter.dispatch_plan(ids, e)
    kw = dict(up_transposed=transposed, down_transposed=transposed, weight_on_input=on_input, out_dtype=None, **act)
    return (x, w, perm, inv, offs, wu, wd, bu, bd), kw


@pytest.mark.parametrize("name", sorted(EXPERT_CASES))
@pytest.mark.parametrize("n,k,e,routing", [(1, 2, 4, "random"), (11, 2, 6, "random"), (9, 3, 7, "one_expert_set")])
def test_moe_experts_opcheck(name, n, k, e, routing):
    args, kw = _experts_inputs(name, n, k, e, routing)
    torch.library.opcheck(torch.ops.grouter.moe_experts.default, args, kw)


@pytest.mark.parametrize("name", sorted(EXPERT_CASES))
def test_moe_experts_backward_op_opcheck_and_partial_needs(name):
    args, kw = _experts_inputs(name, 7, 2, 5, "random", requires_grad=False)
    out, h = torch.ops.grouter.moe_experts(*args, **kw)
    grad = torch.randn_like(out)
    kw_b = {k: v for k, v in kw.items() if k != "out_dtype"}
    for needs in ([True] * 6, [True, False, False, True, False, False], [False] * 6):
        torch.library.opcheck(torch.ops.grouter.moe_experts_backward.default, (grad, *args, h),
                              dict(needs=needs, **kw_b))
        grads = torch.ops.grouter.moe_experts_backward(grad, *args, h, needs=needs, **kw_b)
        full = R.moe_experts_backward_reference(grad, *args, h, mlp=ExpertMLP(**kw_b))
        for need, got, want in zip(needs, grads, full):
            if need and want is not None:
                torch.testing.assert_close(got, want)
            else:
                assert got.numel() == 0


@pytest.mark.parametrize("name", sorted(EXPERT_CASES))
def test_moe_experts_autograd_matches_reference_autograd(name):
    args, kw = _experts_inputs(name, 10, 2, 6, "random")
    out, _ = torch.ops.grouter.moe_experts(*args, **kw)
    g = torch.randn_like(out)
    leaves = [a for i, a in enumerate(args) if i not in (2, 3, 4) and a is not None]
    got = torch.autograd.grad(out, leaves, g)
    # the reference is built from differentiable torch ops except the out= GEMMs, so compare
    # with an independent formulation: a loop over tokens
    from tests.ops.test_reference import per_token_experts

    x, w, perm, inv, offs, wu, wd, bu, bd = args
    ids = torch.empty(perm.numel(), dtype=torch.long)
    e = wu.shape[0]
    sorted_ids = torch.repeat_interleave(torch.arange(e), torch.diff(offs.long(), prepend=offs.new_zeros(1).long()))
    ids[perm] = sorted_ids
    act = {k: v for k, v in kw.items() if k in ("activation", "gated", "interleaved", "alpha", "limit")}
    want_out = per_token_experts(x, w, ids.view(w.shape), wu, wd, bu, bd, act, kw["up_transposed"],
                                 kw["down_transposed"], weight_on_input=kw["weight_on_input"])
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    want = torch.autograd.grad(want_out, leaves, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ops_compile_with_symbolic_token_count():
    """Fake impls keep the token count symbolic: three token counts, one compiled graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")

    def step(logits, x, wu, wd):
        w, ids = torch.ops.grouter.route(logits, None, **{**ROUTE_DEFAULTS, "renorm": "sum"})
        perm, inv, _, offs = torch.ops.grouter.dispatch_plan(ids, 8)
        out, _ = torch.ops.grouter.moe_experts(x, w, perm, inv, offs, wu, wd, None, None, activation="silu",
                                               gated=True, interleaved=False, alpha=1.0, limit=0.0,
                                               up_transposed=False, down_transposed=False, weight_on_input=False,
                                               out_dtype=None)
        return out

    f = torch.compile(step, backend=counter, dynamic=True, fullgraph=True)
    wu, wd = torch.randn(8, 10, 6, requires_grad=True), torch.randn(8, 6, 5, requires_grad=True)
    frames_after_first_call = None
    for n in (3, 17, 64):
        logits, x = torch.randn(n, 8, requires_grad=True), torch.randn(n, 6, requires_grad=True)
        out = f(logits, x, wu, wd)
        out.sum().backward()
        torch.testing.assert_close(out, step(logits, x, wu, wd))
        frames_after_first_call = frames_after_first_call or counter.frame_count
    assert counter.frame_count == frames_after_first_call  # no recompile for new token counts


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.float32, torch.bool])
def test_dispatch_plan_refuses_ids_that_are_not_int64_naming_the_dtype(dtype):
    ids = torch.randint(0, 4, (5, 2)).to(dtype)
    with pytest.raises(TypeError, match=f"int64 expert ids, got {dtype}"):
        torch.ops.grouter.dispatch_plan(ids, 4)
    with pytest.raises(TypeError, match=f"int64 expert ids, got {dtype}"):   # and at trace time
        with torch._subclasses.FakeTensorMode() as mode:
            torch.ops.grouter.dispatch_plan(mode.from_tensor(ids), 4)


# ------------------------------------------------------------------------------------------------
# The op against gating written the way model code writes it (not against route_reference, which
# the op itself calls): the options detection can produce beyond the common families.
# ------------------------------------------------------------------------------------------------


def _deepseek_v2_group_limited(logits, n_group=4, topk_group=2, k=3, scale=1.5):
    """transformers' DeepseekV2TopkRouter, topk_method="group_limited_greedy", transcribed: the
    group score is the group's best expert (a max), the other groups' scores are zeroed."""
    scores = logits.softmax(dim=-1, dtype=torch.float32)
    group_scores = scores.view(-1, n_group, logits.shape[-1] // n_group).max(dim=-1).values
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, logits.shape[-1] // n_group).reshape(-1, logits.shape[-1])
    scores = scores.masked_fill(~score_mask.bool(), 0.0)
    w, i = torch.topk(scores, k=k, dim=-1, sorted=False)
    return w * scale, i


def _sigmoid_bias_in_the_weights(logits, bias, k=2):
    """A router whose bias is part of the score the weights come from (not selection only)."""
    scores = torch.sigmoid(logits) + bias
    i = torch.topk(scores, k, dim=-1)[1]
    w = scores.gather(1, i)
    return w / (w.sum(dim=-1, keepdim=True) + 1e-20), i


def _fp64_scores_fp32_weights(logits, k=2):
    """Scores computed in double precision, weights handed on in fp32."""
    probs = torch.softmax(logits.to(torch.float64), dim=-1)
    v, i = torch.topk(probs, k, dim=-1)
    return (v / v.sum(dim=-1, keepdim=True)).to(torch.float32), i


def _by_id(w, ids):
    order = ids.argsort(dim=-1)
    return w.gather(-1, order), ids.gather(-1, order)


MODEL_ROUTERS = {
    "deepseek_v2_group_max": (lambda lg, b: _deepseek_v2_group_limited(lg), False,
                              dict(top_k=3, n_group=4, topk_group=2, group_score="max", scaling_factor=1.5,
                                   sorted=False)),
    "bias_in_the_weights": (_sigmoid_bias_in_the_weights, True,
                            dict(score_func="sigmoid", bias_mode="score", renorm="sum", renorm_eps=1e-20)),
    "fp64_scores": (lambda lg, b: _fp64_scores_fp32_weights(lg), False,
                    dict(score_dtype=torch.float64, weights_dtype=torch.float32, renorm="sum")),
}


@pytest.mark.parametrize("name", sorted(MODEL_ROUTERS))
@pytest.mark.parametrize("n", [1, 64])
def test_route_op_matches_the_model_code_forward_and_backward(name, n):
    router, has_bias, spec = MODEL_ROUTERS[name]
    kw = {**ROUTE_DEFAULTS, **spec}
    gen = torch.Generator().manual_seed(n)
    logits = (torch.randn(n, 16, generator=gen) * 2).requires_grad_(True)
    bias = (torch.randn(16, generator=gen) * 0.3).requires_grad_(True) if has_bias else None
    want_w, want_ids = _by_id(*router(logits, bias))
    got_w, got_ids = _by_id(*torch.ops.grouter.route(logits, bias, **kw))
    assert torch.equal(got_ids, want_ids)
    assert got_w.dtype == want_w.dtype
    torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=1e-7)
    g = torch.randn(want_w.shape, generator=gen)
    leaves = [logits] + ([bias] if has_bias else [])
    want = torch.autograd.grad(want_w, leaves, g)
    got = torch.autograd.grad(got_w, leaves, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_group_max_differs_from_group_top2_sum_on_these_inputs():
    """The inputs above tell the two group scores apart (else the test could not see a swap)."""
    logits = torch.randn(64, 16, generator=torch.Generator().manual_seed(64)) * 2
    kw = {**ROUTE_DEFAULTS, **MODEL_ROUTERS["deepseek_v2_group_max"][2]}
    a = _by_id(*torch.ops.grouter.route(logits, None, **kw))[1]
    b = _by_id(*torch.ops.grouter.route(logits, None, **{**kw, "group_score": "top2_sum"}))[1]
    assert not torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# bf16 experts with fp32 routing weights: the combine runs in fp32, rounded to bf16 once
# ------------------------------------------------------------------------------------------------


def test_bf16_experts_combine_in_fp32_against_an_fp64_copy():
    """Small integer activations and weights make every bf16 GEMM exact, so the only rounding
    left is the combine's: weighted in fp32 and summed in fp32, then rounded to bf16 once, the
    result is the fp64 computation rounded to bf16 (combining in bf16 rounds each product and
    each partial sum, and changes a third of the elements)."""
    gen = torch.Generator().manual_seed(0)
    n, h, f, e, k = 96, 16, 8, 4, 3
    x = torch.randint(-2, 3, (n, h), generator=gen).to(torch.bfloat16)
    w_up = torch.randint(-1, 2, (e, f, h), generator=gen).to(torch.bfloat16)
    w_down = torch.randint(-1, 2, (e, h, f), generator=gen).to(torch.bfloat16)
    ids = torch.rand(n, e, generator=gen).argsort(-1)[:, :k]
    weights = torch.rand(n, k, generator=gen, dtype=torch.float32)
    perm, inv, _, offsets = R.dispatch_plan_reference(ids, e)
    kw = dict(activation="relu", gated=False, interleaved=False, alpha=1.0, limit=0.0, up_transposed=False,
              down_transposed=False, weight_on_input=False, out_dtype=None)
    got, _ = torch.ops.grouter.moe_experts(x, weights, perm, inv, offsets, w_up, w_down, None, None, **kw)
    # the same computation in fp64, slot by slot
    x64, up64, down64, w64 = x.double(), w_up.double(), w_down.double(), weights.double()
    want = torch.zeros(n, h, dtype=torch.float64)
    for t in range(n):
        for j in range(k):
            ex = int(ids[t, j])
            y = down64[ex] @ torch.relu(up64[ex] @ x64[t])
            assert y.abs().max() <= 256, "the GEMMs must stay exact in bf16"
            want[t] += w64[t, j] * y
    assert got.dtype == torch.bfloat16
    same = got == want.to(torch.bfloat16)
    assert same.float().mean() >= 0.999, f"{(~same).sum().item()} of {same.numel()} elements differ"
    # and the check can see a bf16 combine: the same sum rounded at every step differs a lot
    bf16_combine = torch.zeros(n, h, dtype=torch.bfloat16)
    for t in range(n):
        for j in range(k):
            ex = int(ids[t, j])
            y = (w_down[ex].double() @ torch.relu(w_up[ex].double() @ x64[t])).to(torch.bfloat16)
            bf16_combine[t] += weights[t, j].to(torch.bfloat16) * y
    assert (bf16_combine != want.to(torch.bfloat16)).float().mean() > 0.1


def test_experts_op_schemas_come_from_expert_mlp():
    """Every experts op takes the ``ExpertMLP`` fields, in field order, right after its tensors
    (and, in the forward ops, ``out_dtype``): adding a field to the dataclass reaches every op."""
    from grouter_pass.ops.experts_schema import EXPERT_INPUTS, ExpertGrads
    from grouter_pass.ops.triton_ops import register_triton_ops

    register_triton_ops()
    names = list(ExpertMLP.names())
    ops = ["moe_experts", "moe_experts_backward"]
    if hasattr(torch.ops.grouter, "moe_experts_triton"):
        ops += ["moe_experts_triton", "moe_experts_backward_triton"]
    for op in ops:
        schema = getattr(torch.ops.grouter, op).default._schema
        args = [a.name for a in schema.arguments]
        start = args.index("needs") + 1 if "backward" in op else len(EXPERT_INPUTS)
        assert args[start:start + len(names)] == names, (op, args)
        want_out = len(ExpertGrads._fields) if "backward" in op else 2
        assert len(schema.returns) == want_out, op


def test_expert_mlp_from_flat_arguments_names_what_it_got():
    mlp = ExpertMLP(activation="gelu", gated=False, down_transposed=True)
    assert ExpertMLP.from_args(tuple(mlp.kwargs().values())) == mlp
    with pytest.raises(TypeError, match=r"takes 8 values .*got 9: \('gelu', False"):
        ExpertMLP.from_args((*mlp.kwargs().values(), None))


def test_route_schema_comes_from_gating_spec():
    """``grouter::route`` takes exactly the ``ROUTE_ARGS`` fields of ``GatingSpec`` after
    ``(logits, bias)``; every other field is named here, so a new field must choose a side."""
    import dataclasses

    from grouter_pass.spec import ROUTE_ARGS, GatingSpec

    args = [a.name for a in torch.ops.grouter.route.default._schema.arguments]
    assert args == ["logits", "bias", *ROUTE_ARGS]
    not_op_args = {f.name for f in dataclasses.fields(GatingSpec)} - set(ROUTE_ARGS)
    assert not_op_args == {"family", "num_experts", "prelude"}
