"""The reference semantics of the ops, checked against independent formulations.

``route_reference`` is compared with gating code written the way model authors write it
(transformers' routers, transcribed); ``moe_experts_reference`` with a per-token loop over the
K selected experts; the dispatch plan with its invariants.
"""

import pytest
import torch

from grouter_pass.ops import reference as R
from grouter_pass.spec import ExpertMLP


def mixtral_router(logits):
    probs = torch.softmax(logits.float(), dim=-1)
    v, i = torch.topk(probs, 2, dim=-1)
    v /= v.sum(dim=-1, keepdim=True)
    return v, i


def deepseek_router(logits, bias, n_group=4, topk_group=2, k=2, scale=2.5):
    scores = logits.sigmoid()
    sel = scores + bias
    gs = sel.view(-1, n_group, logits.shape[1] // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    gidx = torch.topk(gs, k=topk_group, dim=-1, sorted=False)[1]
    gmask = torch.zeros_like(gs)
    gmask.scatter_(1, gidx, 1)
    smask = gmask.unsqueeze(-1).expand(-1, n_group, logits.shape[1] // n_group).reshape(-1, logits.shape[1])
    sel = sel.masked_fill(~smask.bool(), float("-inf"))
    idx = torch.topk(sel, k=k, dim=-1, sorted=False)[1]
    w = scores.gather(1, idx)
    w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * scale, idx


def gpt_oss_router(logits, k=2):
    v, i = torch.topk(logits, k, dim=-1)
    return torch.softmax(v, dim=1, dtype=v.dtype), i


def ernie_router(logits, bias, k=2):
    probs = torch.softmax(logits, dim=1, dtype=torch.float)
    _, i = torch.topk(probs + bias, k, dim=-1)
    w = torch.gather(probs, 1, i)
    return w / torch.clamp(w.sum(dim=-1, keepdim=True), min=1e-12), i


def dbrx_router(logits, k=2):
    probs = torch.softmax(logits, dim=1, dtype=torch.float32)
    v, i = torch.topk(probs, k, dim=-1)
    return v / torch.norm(v, p=1, dim=-1, keepdim=True), i


def phimoe_router(logits, jitter_eps=0.15):
    """PhiMoE's sparsemixer in eval mode, transcribed."""
    scores = logits
    with torch.no_grad():
        thr, max_ind = scores.max(dim=-1, keepdim=True)
        factor = scores.abs().clamp(min=thr)
        mask = ((thr - scores) / factor) > (2 * jitter_eps)
    gates = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    w1 = gates.gather(dim=-1, index=max_ind)
    masked = torch.scatter(scores, -1, max_ind, float("-inf"))
    with torch.no_grad():
        thr2, max_ind2 = masked.max(dim=-1, keepdim=True)
        factor = scores.abs().clamp(min=thr2)
        mask = ((thr2 - scores) / factor) > (2 * jitter_eps)
    gates2 = torch.softmax(masked.masked_fill(mask, float("-inf")), dim=-1)
    w2 = gates2.gather(dim=-1, index=max_ind2)
    return torch.cat((w1, w2), dim=-1), torch.cat((max_ind, max_ind2), dim=-1)


@pytest.mark.parametrize("n", [1, 7, 64])
def test_route_matches_transcribed_routers(n):
    logits = torch.randn(n, 8)
    bias = torch.randn(8) * 0.3
    cases = [
        (mixtral_router(logits), dict(top_k=2, renorm="sum")),
        (deepseek_router(logits, bias), dict(top_k=2, score_func="sigmoid", bias_mode="selection", n_group=4,
                                             topk_group=2, renorm="sum", renorm_eps=1e-20, scaling_factor=2.5,
                                             sorted=False)),
        (gpt_oss_router(logits), dict(top_k=2, order="topk_then_score")),
        (ernie_router(logits, bias), dict(top_k=2, bias_mode="selection", renorm="sum", renorm_clamp_min=1e-12)),
        (dbrx_router(logits), dict(top_k=2, renorm="lp", renorm_p=1.0)),
        (phimoe_router(logits), dict(top_k=2, score_func="sparsemixer", sparsemixer_threshold=2 * 0.15)),
    ]
    for (want_w, want_i), kw in cases:
        got_w, got_i = R.route_reference(logits, bias if kw.get("bias_mode") else None, **kw)
        assert torch.equal(got_i, want_i), kw
        torch.testing.assert_close(got_w, want_w, rtol=0, atol=0)


@pytest.mark.parametrize("kw", [
    dict(top_k=2, renorm="sum"),
    dict(top_k=3, score_func="sigmoid", bias_mode="selection", n_group=4, topk_group=2, renorm="sum",
         renorm_eps=1e-20, scaling_factor=2.5, sorted=False),
    dict(top_k=2, order="topk_then_score"),
    dict(top_k=2, bias_mode="selection", renorm="sum", renorm_clamp_min=1e-12),
    dict(top_k=2, renorm="lp", renorm_p=1.0),
    dict(top_k=2, renorm="lp", renorm_p=2.0, renorm_eps=1e-6),
    dict(top_k=2, score_func="sigmoid", bias_mode="score", renorm="sum"),
    dict(top_k=1, order="topk_then_score", score_func="sigmoid"),
    dict(top_k=2, score_dtype=torch.float64, weights_dtype=torch.float32),
    dict(top_k=2, score_func="sparsemixer", sparsemixer_threshold=0.3),
    dict(top_k=2, score_func="sparsemixer", sparsemixer_threshold=0.3, scaling_factor=1.5),
])
def test_route_backward_matches_autograd(kw):
    logits = torch.randn(11, 8, dtype=torch.float32, requires_grad=True)
    bias = torch.randn(8, requires_grad=True)
    w, ids = R.route_reference(logits, bias, **kw)
    g = torch.randn_like(w)
    want = torch.autograd.grad(w, [logits, bias], g, allow_unused=True)
    got_logits, got_bias = R.route_backward_reference(g, logits.detach(), bias.detach(), ids,
                                                       **{**R_DEFAULTS, **kw})
    torch.testing.assert_close(got_logits, want[0], rtol=1e-5, atol=1e-7)
    if want[1] is None:
        assert got_bias is None
    else:
        torch.testing.assert_close(got_bias, want[1], rtol=1e-5, atol=1e-7)


R_DEFAULTS = dict(score_func="softmax", order="score_then_topk", bias_mode="none", renorm="none", renorm_eps=0.0,
                  renorm_clamp_min=None, renorm_p=1.0, scaling_factor=1.0, score_dtype=None, sparsemixer_threshold=0.0)


@pytest.mark.parametrize("n,k,e", [(1, 1, 4), (9, 2, 8), (33, 4, 7), (5, 3, 3)])
def test_dispatch_plan_invariants(n, k, e):
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    perm, inv, counts, offsets = R.dispatch_plan_reference(ids, e)
    flat = ids.reshape(-1)
    assert torch.equal(perm[inv], torch.arange(n * k))             # inverse
    assert torch.equal(inv[perm], torch.arange(n * k))
    assert torch.equal(counts, torch.bincount(flat, minlength=e))  # counts
    assert counts.sum() == n * k
    assert offsets.dtype == torch.int32 and torch.equal(offsets.long(), counts.cumsum(0))
    sorted_ids = flat[perm]
    assert torch.equal(sorted_ids, flat.sort(stable=True).values)  # grouped by expert
    for ex in range(e):                                            # stable: token order kept
        slots = perm[sorted_ids == ex]
        assert torch.equal(slots, slots.sort().values)


def test_dispatch_plan_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 4\), got range \[0, 4\]"):
        R.dispatch_plan_reference(torch.tensor([[0, 4]]), 4)


def per_token_experts(x, w, ids, wu, wd, bu, bd, act, up_t, down_t, weight_on_input=False):
    """sum_j w[t, j] * expert_{ids[t, j]}(x[t]) (or expert(w[t, j] * x[t])), one token and one expert
    at a time."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.promote_types(wu.dtype, w.dtype))
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            xin = x[t] * w[t, j] if weight_on_input else x[t]
            h = xin.to(wu.dtype) @ (wu[e] if up_t else wu[e].t())
            if bu is not None:
                h = h + bu[e]
            a = R.activation_forward(h[None], **act)[0]
            y = a @ (wd[e] if down_t else wd[e].t())
            if bd is not None:
                y = y + bd[e]
            out[t] += y if weight_on_input else y * w[t, j]
    return out.to(x.dtype)


ACTS = {
    "swiglu": dict(activation="silu", gated=True, interleaved=False, alpha=1.0, limit=0.0),
    "geglu_tanh_interleaved": dict(activation="gelu_tanh", gated=True, interleaved=True, alpha=1.0, limit=0.0),
    "gpt_oss": dict(activation="clamped_swiglu", gated=True, interleaved=True, alpha=1.702, limit=0.7),
    "relu_plain": dict(activation="relu", gated=False, interleaved=False, alpha=1.0, limit=0.0),
    "gelu_plain": dict(activation="gelu", gated=False, interleaved=False, alpha=1.0, limit=0.0),
}


def _experts_case(n, k, e, h, f, act, transposed, bias, routing, dtype=torch.float32):
    gen = torch.Generator().manual_seed(n * 131 + k)
    up = 2 * f if ACTS[act]["gated"] else f
    x = torch.randn(n, h, generator=gen).to(dtype)
    w = (torch.rand(n, k, generator=gen) + 0.1)
    if routing == "random":
        ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)])
    elif routing == "one_expert_set":  # every token on experts 0..k-1: the others are empty
        ids = torch.arange(k).expand(n, k).clone()
    else:  # skewed: 80% of tokens share the same experts
        ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)])
        ids[: (4 * n) // 5] = torch.arange(e - k, e)
    wu = (torch.randn((e, h, up) if transposed else (e, up, h), generator=gen) * 0.2).to(dtype)
    wd = (torch.randn((e, f, h) if transposed else (e, h, f), generator=gen) * 0.2).to(dtype)
    bu = (torch.randn(e, up, generator=gen) * 0.1).to(dtype) if bias else None
    bd = (torch.randn(e, h, generator=gen) * 0.1).to(dtype) if bias else None
    return x, w, ids, wu, wd, bu, bd


@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("n,k,e,routing", [(1, 1, 4, "random"), (1, 2, 5, "random"), (13, 2, 8, "random"),
                                            (17, 3, 7, "one_expert_set"), (20, 2, 8, "skewed"), (6, 4, 4, "random")])
@pytest.mark.parametrize("transposed,bias", [(False, False), (True, True)])
def test_moe_experts_matches_per_token_loop(act, n, k, e, routing, transposed, bias):
    h, f = 12, 5  # odd sizes, not multiples of anything
    x, w, ids, wu, wd, bu, bd = _experts_case(n, k, e, h, f, act, transposed, bias, routing)
    perm, inv, counts, offs = R.dispatch_plan_reference(ids, e)
    got, hidden = R.moe_experts_reference(x, w, perm, inv, offs, wu, wd, bu, bd, mlp=ExpertMLP(
        up_transposed=transposed, down_transposed=transposed, **ACTS[act]))
    want = per_token_experts(x, w, ids, wu, wd, bu, bd, ACTS[act], transposed, transposed)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert hidden.shape == (n * k, wu.shape[2] if transposed else wu.shape[1])


@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("routing", ["random", "one_expert_set"])
@pytest.mark.parametrize("weight_on_input", [False, True])
def test_moe_experts_backward_matches_autograd(act, routing, weight_on_input):
    n, k, e, h, f = 9, 2, 6, 10, 4
    x, w, ids, wu, wd, bu, bd = _experts_case(n, k, e, h, f, act, True, True, routing)
    leaves = [t.clone().requires_grad_() for t in (x, w, wu, wd, bu, bd)]
    want_out = per_token_experts(leaves[0], leaves[1], ids, *leaves[2:], ACTS[act], True, True,
                                 weight_on_input=weight_on_input)
    g = torch.randn_like(want_out)
    want = torch.autograd.grad(want_out, leaves, g)
    perm, inv, _, offs = R.dispatch_plan_reference(ids, e)
    mlp = ExpertMLP(up_transposed=True, down_transposed=True, weight_on_input=weight_on_input, **ACTS[act])
    got_out, hidden = R.moe_experts_reference(x, w, perm, inv, offs, wu, wd, bu, bd, mlp=mlp)
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-6)
    got = R.moe_experts_backward_reference(g, x, w, perm, inv, offs, wu, wd, bu, bd, hidden, mlp=mlp)
    for name, a, b in zip(("x", "weights", "w_up", "w_down", "b_up", "b_down"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_moe_experts_bf16_combines_in_fp32_like_transformers():
    n, k, e, h, f = 8, 2, 4, 16, 8
    x, w, ids, wu, wd, _, _ = _experts_case(n, k, e, h, f, "swiglu", False, False, "random", dtype=torch.bfloat16)
    perm, inv, _, offs = R.dispatch_plan_reference(ids, e)
    got, _ = R.moe_experts_reference(x, w, perm, inv, offs, wu, wd, mlp=ExpertMLP(**ACTS["swiglu"]))
    assert got.dtype == torch.bfloat16
    want = per_token_experts(x.float(), w, ids, wu.float(), wd.float(), None, None, ACTS["swiglu"], False, False)
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)
