"""Plain-PyTorch semantics of the ``grouter`` ops.

These functions *define* what the ops compute. They are the CPU implementation, the oracle of
the tests, and the spec a Triton kernel must reproduce. They use only differentiable, public
torch ops, so each forward can also be checked against autograd.

Legend: N tokens, K top-k, S = N*K slots, E experts, H hidden, F expert FFN width, G groups.
Shape suffixes: ``logits_NE``, ``ids_NK``, ``perm_S``, ``offsets_E``, ``w_up_E2FH`` ...
"""

from __future__ import annotations

import torch

from grouter_pass.spec import ExpertMLP

# --------------------------------------------------------------------------------------------
# route: logits -> (weights, ids)
# --------------------------------------------------------------------------------------------


def _score(x: torch.Tensor, score_func: str) -> torch.Tensor:
    if score_func == "softmax":
        return torch.softmax(x, dim=-1)
    if score_func == "sigmoid":
        return torch.sigmoid(x)
    if score_func == "none":
        return x
    raise ValueError(f"unknown score_func {score_func!r}")


def _group_mask(sel_NE: torch.Tensor, n_group: int, topk_group: int, group_score: str) -> torch.Tensor:
    """Boolean ``[N, E]`` mask of experts in the ``topk_group`` best of ``n_group`` groups."""
    n, e = sel_NE.shape
    grouped_NGX = sel_NE.view(n, n_group, e // n_group)
    if group_score == "top2_sum":
        group_scores_NG = grouped_NGX.topk(2, dim=-1)[0].sum(dim=-1)
    elif group_score == "max":
        group_scores_NG = grouped_NGX.amax(dim=-1)
    else:
        raise ValueError(f"unknown group_score {group_score!r}")
    group_idx = torch.topk(group_scores_NG, k=topk_group, dim=-1, sorted=False)[1]
    group_mask_NG = torch.zeros_like(group_scores_NG).scatter(1, group_idx, 1)
    return group_mask_NG.unsqueeze(-1).expand(n, n_group, e // n_group).reshape(n, e).bool()


def _renorm_denominator(w_NK: torch.Tensor, renorm: str, eps: float, clamp_min: float | None,
                        p: float) -> torch.Tensor:
    if renorm == "sum":
        d = w_NK.sum(dim=-1, keepdim=True)
    elif renorm == "lp":
        d = torch.linalg.vector_norm(w_NK, ord=p, dim=-1, keepdim=True)
    else:
        raise ValueError(f"unknown renorm {renorm!r}")
    if eps:
        d = d + eps
    if clamp_min is not None:
        d = d.clamp(min=clamp_min)
    return d


def _sparsemixer_round(x: torch.Tensor, selection: torch.Tensor, threshold: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One round of PhiMoE's evaluation-mode sparsemixer: the best expert of ``selection`` and the
    softmax over the experts whose score is within ``threshold`` (relative) of it."""
    with torch.no_grad():
        best, ind = selection.max(dim=-1, keepdim=True)
        factor = x.abs().clamp(min=best)
        far = ((best - x) / factor) > threshold
    probs = torch.softmax(selection.masked_fill(far, float("-inf")), dim=-1)
    return probs.gather(-1, ind), ind, probs


def sparsemixer_reference(x_NE: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's sparsemixer in evaluation mode (top-2): ``(weights [N, 2], ids [N, 2])``."""
    w1, ind1, _ = _sparsemixer_round(x_NE, x_NE, threshold)
    second = torch.scatter(x_NE, -1, ind1, float("-inf"))
    w2, ind2, _ = _sparsemixer_round(x_NE, second, threshold)
    return torch.cat([w1, w2], dim=-1), torch.cat([ind1, ind2], dim=-1)


def route_select(logits_NE: torch.Tensor, bias_E: torch.Tensor | None, *, top_k: int, score_func: str,
                 order: str, bias_mode: str, n_group: int, topk_group: int, group_score: str,
                 score_dtype: torch.dtype | None, sorted: bool, sparsemixer_threshold: float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Selection half of routing: ``(w0 [N, K] before renorm/scale, ids [N, K] int64)``.

    Differentiable in ``logits`` (and in ``bias`` when ``bias_mode == "score"``). Logits of any
    rank ``[..., E]`` are routed row by row (``[B, T, E]``, sequence-first ``[T, B, E]``).
    """
    if logits_NE.dim() != 2:
        lead = logits_NE.shape[:-1]
        w0, ids = route_select(logits_NE.reshape(-1, logits_NE.shape[-1]), bias_E, top_k=top_k,
                               score_func=score_func, order=order, bias_mode=bias_mode, n_group=n_group,
                               topk_group=topk_group, group_score=group_score, score_dtype=score_dtype,
                               sorted=sorted, sparsemixer_threshold=sparsemixer_threshold)
        return w0.reshape(*lead, top_k), ids.reshape(*lead, top_k)
    x = logits_NE if score_dtype is None else logits_NE.to(score_dtype)
    if score_func == "sparsemixer":
        if top_k != 2:
            raise ValueError(f"sparsemixer routing is defined for top_k=2, got {top_k}")
        return sparsemixer_reference(x, sparsemixer_threshold)
    if order == "score_then_topk":
        scores = _score(x, score_func)
        sel = scores if bias_mode == "none" else scores + bias_E
        if bias_mode == "score":
            scores = sel
        if n_group > 1 and topk_group < n_group:
            sel = sel.masked_fill(~_group_mask(sel, n_group, topk_group, group_score), float("-inf"))
        ids_NK = torch.topk(sel, top_k, dim=-1, sorted=sorted)[1]
        w0_NK = scores.gather(1, ids_NK)
    elif order == "topk_then_score":
        sel = x if bias_mode == "none" else x + bias_E
        ids_NK = torch.topk(sel, top_k, dim=-1, sorted=sorted)[1]
        vals_NK = (sel if bias_mode == "score" else x).gather(1, ids_NK)
        w0_NK = _score(vals_NK, score_func)
    else:
        raise ValueError(f"unknown order {order!r}")
    return w0_NK, ids_NK


def route_finish(w0_NK: torch.Tensor, *, renorm: str, renorm_eps: float, renorm_clamp_min: float | None,
                 renorm_p: float, scaling_factor: float, weights_dtype: torch.dtype) -> torch.Tensor:
    """Post-processing half of routing: renormalise, scale, cast."""
    w = w0_NK
    if renorm != "none":
        w = w / _renorm_denominator(w, renorm, renorm_eps, renorm_clamp_min, renorm_p)
    if scaling_factor != 1.0:
        w = w * scaling_factor
    return w.to(weights_dtype)


def route_reference(logits_NE: torch.Tensor, bias_E: torch.Tensor | None = None, *, top_k: int,
                    score_func: str = "softmax", order: str = "score_then_topk", bias_mode: str = "none",
                    n_group: int = 1, topk_group: int = 1, group_score: str = "top2_sum",
                    renorm: str = "none", renorm_eps: float = 0.0, renorm_clamp_min: float | None = None,
                    renorm_p: float = 1.0, scaling_factor: float = 1.0,
                    score_dtype: torch.dtype | None = None, weights_dtype: torch.dtype = torch.float32,
                    sorted: bool = True, sparsemixer_threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits ``[N, E]`` -> ``(weights [N, K] weights_dtype, ids [N, K] int64)``.

    See :class:`grouter_pass.spec.GatingSpec` for the meaning of every argument. Logits of any
    rank ``[..., E]`` give ``[..., K]``.
    """
    w0, ids = route_select(logits_NE, bias_E, top_k=top_k, score_func=score_func, order=order,
                           bias_mode=bias_mode, n_group=n_group, topk_group=topk_group,
                           group_score=group_score, score_dtype=score_dtype, sorted=sorted,
                           sparsemixer_threshold=sparsemixer_threshold)
    w = route_finish(w0, renorm=renorm, renorm_eps=renorm_eps, renorm_clamp_min=renorm_clamp_min,
                     renorm_p=renorm_p, scaling_factor=scaling_factor, weights_dtype=weights_dtype)
    return w, ids


def _score_backward(grad: torch.Tensor, out: torch.Tensor, inp: torch.Tensor, score_func: str) -> torch.Tensor:
    """The kernels autograd itself uses, so gradients match eager bit for bit."""
    if score_func == "softmax":
        return torch.ops.aten._softmax_backward_data(grad, out, -1, inp.dtype)
    if score_func == "sigmoid":
        return torch.ops.aten.sigmoid_backward(grad, out)
    return grad


def route_backward_reference(grad_w_NK: torch.Tensor, logits_NE: torch.Tensor, bias_E: torch.Tensor | None,
                             ids_NK: torch.Tensor, *, score_func: str, order: str, bias_mode: str,
                             renorm: str, renorm_eps: float, renorm_clamp_min: float | None, renorm_p: float,
                             scaling_factor: float, score_dtype: torch.dtype | None,
                             sparsemixer_threshold: float = 0.0, **_unused) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradient of :func:`route_reference` for ``(logits, bias)``.

    Written out (instead of re-running autograd) so that it traces into the backward graph as
    ordinary ops Inductor can fuse. Only the weights carry gradient: ids are integers and the
    group mask / top-k selection are piecewise constant. A selection-only bias gets ``None``.
    """
    if logits_NE.dim() != 2:
        e, k = logits_NE.shape[-1], ids_NK.shape[-1]
        g_x, g_b = route_backward_reference(
            grad_w_NK.reshape(-1, k), logits_NE.reshape(-1, e), bias_E, ids_NK.reshape(-1, k), score_func=score_func,
            order=order, bias_mode=bias_mode, renorm=renorm, renorm_eps=renorm_eps, renorm_clamp_min=renorm_clamp_min,
            renorm_p=renorm_p, scaling_factor=scaling_factor, score_dtype=score_dtype,
            sparsemixer_threshold=sparsemixer_threshold)
        return g_x.reshape(logits_NE.shape), g_b
    x = logits_NE if score_dtype is None else logits_NE.to(score_dtype)
    if score_func == "sparsemixer":
        return _sparsemixer_backward(grad_w_NK, x, ids_NK, sparsemixer_threshold, scaling_factor).to(
            logits_NE.dtype), None
    if order == "score_then_topk":
        scores = _score(x, score_func)
        scores_w = scores + bias_E if bias_mode == "score" else scores
        w0 = scores_w.gather(1, ids_NK)
    else:
        sel = x + bias_E if bias_mode == "score" else x
        vals = sel.gather(1, ids_NK)
        w0 = _score(vals, score_func)
    g = grad_w_NK.to(w0.dtype)
    if scaling_factor != 1.0:
        g = g * scaling_factor
    if renorm != "none":
        raw = w0.sum(dim=-1, keepdim=True) if renorm == "sum" else torch.linalg.vector_norm(
            w0, ord=renorm_p, dim=-1, keepdim=True)
        d = raw + renorm_eps if renorm_eps else raw
        if renorm_clamp_min is not None:
            d_used = d.clamp(min=renorm_clamp_min)
        else:
            d_used = d
        grad_d = (-g * ((w0 / d_used) / d_used)).sum(dim=-1, keepdim=True)  # autograd's div formula
        if renorm_clamp_min is not None:
            grad_d = grad_d * (d >= renorm_clamp_min)
        g0 = g / d_used
        if renorm == "sum":
            g0 = g0 + grad_d
        else:  # d ||w||_p / dw = sign(w) |w|^(p-1) / ||w||^(p-1)
            g0 = g0 + grad_d * torch.sign(w0) * (w0.abs() / raw).pow(renorm_p - 1)
    else:
        g0 = g
    grad_bias = None
    if order == "score_then_topk":
        g_scores = torch.zeros_like(scores).scatter(1, ids_NK, g0)
        if bias_mode == "score":
            grad_bias = g_scores.sum(dim=0)
        g_x = _score_backward(g_scores, scores, x, score_func)
    else:
        g_vals = _score_backward(g0, w0, vals, score_func)
        g_x = torch.zeros_like(x).scatter(1, ids_NK, g_vals)
        if bias_mode == "score":
            grad_bias = g_x.sum(dim=0)
    if grad_bias is not None and bias_E is not None:
        grad_bias = grad_bias.to(bias_E.dtype)
    return g_x.to(logits_NE.dtype), grad_bias


def _sparsemixer_backward(grad_w_N2: torch.Tensor, x_NE: torch.Tensor, ids_N2: torch.Tensor, threshold: float,
                          scaling_factor: float) -> torch.Tensor:
    """Gradient of :func:`sparsemixer_reference` (then ``* scaling_factor``): through each round's
    masked softmax; the masks and the selections are constants, as under PhiMoE's ``no_grad``."""
    g = grad_w_N2.to(x_NE.dtype) * scaling_factor if scaling_factor != 1.0 else grad_w_N2.to(x_NE.dtype)
    ind1, ind2 = ids_N2[:, :1], ids_N2[:, 1:]
    _, _, p1 = _sparsemixer_round(x_NE, x_NE, threshold)
    second = torch.scatter(x_NE, -1, ind1, float("-inf"))
    _, _, p2 = _sparsemixer_round(x_NE, second, threshold)
    g1 = torch.zeros_like(p1).scatter(-1, ind1, g[:, :1])
    g2 = torch.zeros_like(p2).scatter(-1, ind2, g[:, 1:])
    gx = torch.ops.aten._softmax_backward_data(g1, p1, -1, p1.dtype)
    g_second = torch.ops.aten._softmax_backward_data(g2, p2, -1, p2.dtype)
    return gx + g_second.scatter(-1, ind1, 0.0)  # the scattered -inf of round 2 has no gradient


# --------------------------------------------------------------------------------------------
# dispatch plan: ids -> permutation, inverse, counts, offsets
# --------------------------------------------------------------------------------------------


def dispatch_plan_reference(ids_NK: torch.Tensor, num_experts: int
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the ``S = N*K`` routed slots by expert.

    Returns:
        perm_S (int64): slot index (``token * K + j``) of the s-th slot in expert order; a
            stable sort, so slots of one expert keep token order.
        inv_perm_S (int64): position in expert order of each slot (``inv_perm[perm] = arange``).
        counts_E (int64): slots per expert.
        offsets_E (int32): end offset of each expert's rows (``cumsum(counts)``), the
            ``offs`` convention of ``torch._grouped_mm``.

    Every output has a size fixed by ``(N*K, E)``: no host synchronisation is needed to build
    or to consume the plan.
    """
    flat_S = ids_NK.reshape(-1)
    if flat_S.numel() and (flat_S.min() < 0 or flat_S.max() >= num_experts):
        # Only reachable with hand-made ids; route never produces them. Checked here (eagerly,
        # outside any graph) so a bad id fails loudly instead of corrupting memory in a kernel.
        raise ValueError(f"expert ids must lie in [0, {num_experts}), got range "
                         f"[{int(flat_S.min())}, {int(flat_S.max())}]")
    perm_S = torch.sort(flat_S, stable=True)[1]
    arange_S = torch.arange(flat_S.numel(), device=flat_S.device)
    inv_perm_S = torch.empty_like(perm_S).scatter_(0, perm_S, arange_S)
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=flat_S.device)
    counts_E.scatter_add_(0, flat_S, torch.ones_like(flat_S))
    offsets_E = counts_E.cumsum(0).to(torch.int32)
    return perm_S, inv_perm_S, counts_E, offsets_E


def capacity_keep_reference(ids_NK: torch.Tensor, weights_NK: torch.Tensor, num_experts: int, capacity: int,
                            priority: str) -> torch.Tensor:
    """Capacity-based dispatch: which slots an expert keeps when it takes at most ``capacity``.

    Slots claim places in their expert in ``priority`` order: "token" (token by token, a token's
    choices in turn: ``cumsum`` over the flattened ``[N*K]`` one-hot, Switch), "choice" (every
    token's first choice before any second choice: GShard) or "score" (highest routing weight
    first, ties in token order: batch-priority routing). Returns ``keep [N, K]`` bool.
    """
    n, k = ids_NK.shape
    s = n * k
    flat = ids_NK.reshape(-1)
    arange_S = torch.arange(s, device=flat.device)
    if priority == "token":
        order = arange_S
    elif priority == "choice":
        order = arange_S.view(n, k).t().reshape(-1)
    elif priority == "score":
        order = torch.argsort(weights_NK.reshape(-1), descending=True, stable=True)
    else:
        raise ValueError(f"unknown capacity priority {priority!r}")
    ids_o = flat.index_select(0, order)
    by_expert = torch.sort(ids_o, stable=True).indices            # priority order within each expert
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, ids_o, torch.ones_like(ids_o))
    starts = counts.cumsum(0) - counts
    rank_sorted = arange_S - starts.index_select(0, ids_o.index_select(0, by_expert))
    position_o = torch.empty_like(rank_sorted).scatter_(0, by_expert, rank_sorted)
    position = torch.empty_like(position_o).scatter_(0, order, position_o)
    return (position < capacity).view(n, k)


# --------------------------------------------------------------------------------------------
# expert activations
# --------------------------------------------------------------------------------------------


def _split_gate_up(h: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if interleaved:
        return h[..., ::2], h[..., 1::2]
    gate, up = h.chunk(2, dim=-1)
    return gate, up


def _act(g: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "silu":
        return torch.nn.functional.silu(g)
    if kind == "gelu":
        return torch.nn.functional.gelu(g)
    if kind == "gelu_tanh":
        return torch.nn.functional.gelu(g, approximate="tanh")
    if kind == "relu":
        return torch.relu(g)
    raise ValueError(f"unknown activation {kind!r}")


def _act_backward(grad: torch.Tensor, g: torch.Tensor, kind: str) -> torch.Tensor:
    """The exact kernels autograd uses for these activations, so gradients match eager bitwise."""
    aten = torch.ops.aten
    if kind == "silu":
        return aten.silu_backward(grad, g)
    if kind == "gelu":
        return aten.gelu_backward(grad, g, approximate="none")
    if kind == "gelu_tanh":
        return aten.gelu_backward(grad, g, approximate="tanh")
    if kind == "relu":
        return aten.threshold_backward(grad, torch.relu(g), 0)
    raise ValueError(f"unknown activation {kind!r}")


def activation_forward(h: torch.Tensor, *, activation: str, gated: bool, interleaved: bool,
                       alpha: float, limit: float) -> torch.Tensor:
    """``[S, 2F] -> [S, F]`` (gated) or ``[S, F] -> [S, F]``; see :class:`ActivationSpec`."""
    return activation_forward_saving(h, activation=activation, gated=gated, interleaved=interleaved, alpha=alpha,
                                     limit=limit)[0]


def activation_forward_saving(h: torch.Tensor, *, activation: str, gated: bool, interleaved: bool,
                              alpha: float, limit: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The activation and, for gated activations, ``act(gate)``, which the backward reuses."""
    if activation == "clamped_swiglu":
        gate, up = _split_gate_up(h, interleaved)
        gate = gate.clamp(min=None, max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha)), None
    if not gated:
        return _act(h, activation), None
    gate, up = _split_gate_up(h, interleaved)
    act_gate = _act(gate, activation)
    return act_gate * up, act_gate


def activation_backward(grad_a: torch.Tensor, h: torch.Tensor, *, activation: str, gated: bool,
                        interleaved: bool, alpha: float, limit: float,
                        act_gate: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of :func:`activation_forward` with respect to ``h``. ``act_gate`` (from
    :func:`activation_forward_saving`) avoids recomputing the activation of the gate half."""
    if not gated and activation != "clamped_swiglu":
        return _act_backward(grad_a, h, activation)
    gate, up = _split_gate_up(h, interleaved)
    grad_h = torch.empty_like(h)
    grad_gate_out, grad_up_out = _split_gate_up(grad_h, interleaved)
    if activation == "clamped_swiglu":
        gate_c = gate.clamp(min=None, max=limit)
        up_c = up.clamp(min=-limit, max=limit)
        sig = torch.sigmoid(gate_c * alpha)
        glu = gate_c * sig
        grad_up_out.copy_((grad_a * glu) * (up >= -limit).logical_and(up <= limit))
        grad_glu = grad_a * (up_c + 1)
        grad_gate_out.copy_(grad_glu * (sig + gate_c * alpha * sig * (1 - sig)) * (gate <= limit))
        return grad_h
    if act_gate is None:
        act_gate = _act(gate, activation)
    torch.mul(grad_a, act_gate, out=grad_up_out) if not interleaved else grad_up_out.copy_(grad_a * act_gate)
    grad_gate = _act_backward(grad_a * up, gate, activation)
    grad_gate_out.copy_(grad_gate)
    return grad_h


# --------------------------------------------------------------------------------------------
# routed experts: gather -> grouped GEMM -> activation -> grouped GEMM -> weighted combine
# --------------------------------------------------------------------------------------------


def _segments(offsets_E: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(expert, start, end)`` of every non-empty expert. One host read of E integers: fine
    inside an opaque CPU op; the CUDA kernels take ``offsets`` on device instead."""
    ends = offsets_E.tolist()
    out, start = [], 0
    for e, end in enumerate(ends):
        if end > start:
            out.append((e, start, end))
        start = end
    return out


def _expert_mm(a: torch.Tensor, w: torch.Tensor, transposed: bool, out: torch.Tensor) -> None:
    # w is stored [out, in] (nn.Linear layout) unless transposed ([in, out]).
    torch.mm(a, w if transposed else w.t(), out=out)


def grouped_linear(a_SI: torch.Tensor, w_EOI: torch.Tensor, offsets_E: torch.Tensor, *, transposed: bool,
                   bias_EO: torch.Tensor | None = None, segments: list | None = None) -> torch.Tensor:
    """Rows ``[start_e, end_e)`` of ``a`` times expert ``e``'s weight (+ its bias)."""
    out_dim = w_EOI.shape[2] if transposed else w_EOI.shape[1]
    out = a_SI.new_empty(a_SI.shape[0], out_dim)
    segs = _segments(offsets_E) if segments is None else segments
    covered = 0
    for e, s0, s1 in segs:
        _expert_mm(a_SI[s0:s1], w_EOI[e], transposed, out[s0:s1])
        if bias_EO is not None:
            out[s0:s1] += bias_EO[e]
        covered = s1
    if covered < a_SI.shape[0]:  # rows beyond offsets[-1] belong to no expert
        out[covered:].zero_()
    return out


def _grouped_weight_grad(left_SA: torch.Tensor, right_SB: torch.Tensor, segments: list, like: torch.Tensor
                         ) -> torch.Tensor:
    """``out[e] = left[rows_e]^T @ right[rows_e]`` for every expert; experts without rows get 0."""
    out = torch.empty_like(like)
    for e, s0, s1 in segments:
        torch.mm(left_SA[s0:s1].t(), right_SB[s0:s1], out=out[e])
    if len(segments) < like.shape[0]:
        hit = {e for e, _, _ in segments}
        for e in range(like.shape[0]):
            if e not in hit:
                out[e].zero_()
    return out


def _grouped_bias_grad(g_SO: torch.Tensor, segments: list, like: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(like)
    for e, s0, s1 in segments:
        torch.sum(g_SO[s0:s1], dim=0, out=out[e])
    return out


def moe_experts_reference(x_NH: torch.Tensor, weights_NK: torch.Tensor, perm_S: torch.Tensor,
                          inv_perm_S: torch.Tensor, offsets_E: torch.Tensor, w_up: torch.Tensor,
                          w_down: torch.Tensor, b_up: torch.Tensor | None = None,
                          b_down: torch.Tensor | None = None, *, mlp: ExpertMLP = ExpertMLP(),
                          out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed experts with a precomputed dispatch plan.

    Args:
        x_NH: token representations.
        weights_NK: routing weights (any float dtype; the combine runs in
            ``promote(compute dtype, weights dtype)``).
        perm_S, inv_perm_S, offsets_E: the plan of :func:`dispatch_plan_reference`.
        w_up: ``[E, 2F, H]`` (``[E, H, 2F]`` when ``mlp.up_transposed``); ``F`` instead of
            ``2F`` for non-gated experts.
        w_down: ``[E, H, F]`` (``[E, F, H]`` when ``mlp.down_transposed``).
        b_up, b_down: optional per-expert biases ``[E, 2F]`` / ``[E, H]``.
        mlp: the activation and weight layouts; with ``mlp.weight_on_input`` each slot's
            *input* is scaled by its routing weight and the expert outputs are summed
            unweighted (Llama 4: ``expert(w * x)``) instead of ``w * expert(x)``.

    Returns:
        ``(out [N, H] in out_dtype (x's dtype when None), h [S, 2F])`` where ``h`` is the
        pre-activation of the first GEMM in expert order, returned so that backward does not
        recompute a GEMM.

    The combine adds each slot's output into its token's row in expert order (a sequential,
    deterministic ``index_add_``); the K terms of a token are therefore summed in a different
    order than ``view(N, K, H).sum(1)`` would, which moves results by at most a few ulps.
    """
    n, hidden = x_NH.shape
    k = weights_NK.shape[1]
    compute_dtype = w_up.dtype
    combine_dtype = torch.promote_types(compute_dtype, weights_NK.dtype)
    segs = _segments(offsets_E)
    tok_S = torch.div(perm_S, k, rounding_mode="floor")
    w_sorted_S1 = weights_NK.reshape(-1).index_select(0, perm_S).unsqueeze(-1)
    x_sorted_SH = x_NH.index_select(0, tok_S)
    if mlp.weight_on_input:
        x_sorted_SH = x_sorted_SH * w_sorted_S1
    x_sorted_SH = x_sorted_SH.to(compute_dtype)
    h = grouped_linear(x_sorted_SH, w_up, offsets_E, transposed=mlp.up_transposed, bias_EO=b_up, segments=segs)
    a = activation_forward(h, **mlp.activation_kwargs())
    y_SH = grouped_linear(a, w_down, offsets_E, transposed=mlp.down_transposed, bias_EO=b_down, segments=segs)
    if mlp.weight_on_input:
        yw_SH, acc_dtype = y_SH, compute_dtype
    else:
        acc_dtype = combine_dtype
        yw_SH = y_SH.mul_(w_sorted_S1) if combine_dtype == compute_dtype else y_SH.to(combine_dtype) * w_sorted_S1
    out_NH = torch.zeros(n, hidden, dtype=acc_dtype, device=x_NH.device).index_add_(0, tok_S, yw_SH)
    return out_NH.to(x_NH.dtype if out_dtype is None else out_dtype), h


def moe_experts_autograd_reference(x_NH: torch.Tensor, weights_NK: torch.Tensor, ids_NK: torch.Tensor,
                                   w_up: torch.Tensor, w_down: torch.Tensor, b_up: torch.Tensor | None = None,
                                   b_down: torch.Tensor | None = None, *, mlp: ExpertMLP = ExpertMLP(),
                                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`moe_experts_reference` written expert by expert in differentiable torch ops, from
    the routing ids rather than a dispatch plan: no ``out=`` GEMMs, no hand-written backward, no
    plan. Autograd gives its gradients, so it is a second opinion on both halves of the op (the
    probe runs it instead of the op under ``GrouterConfig(probe_ops=False)``, so that a defect
    in the op itself reaches the compiled graph and shows in a parity test). Same dtypes as the
    op: GEMMs in the expert weights' dtype, the weighted combine in ``promote(compute dtype,
    weights dtype)``; slots are added in expert order, as the op adds them."""
    n, hidden = x_NH.shape
    k = ids_NK.shape[1]
    compute_dtype = w_up.dtype
    combine_dtype = torch.promote_types(compute_dtype, weights_NK.dtype)
    acc_dtype = compute_dtype if mlp.weight_on_input else combine_dtype
    flat_ids = ids_NK.reshape(-1)
    tok_S = torch.arange(n, device=x_NH.device).repeat_interleave(k)
    w_S1 = weights_NK.reshape(-1, 1)
    out = torch.zeros(n, hidden, dtype=acc_dtype, device=x_NH.device)
    for e in range(w_up.shape[0]):
        slots = (flat_ids == e).nonzero().squeeze(1)
        if slots.numel() == 0:
            continue
        tok, w = tok_S[slots], w_S1[slots]
        x_e = x_NH[tok] * w if mlp.weight_on_input else x_NH[tok]
        h = x_e.to(compute_dtype) @ (w_up[e] if mlp.up_transposed else w_up[e].t())
        if b_up is not None:
            h = h + b_up[e]
        a = activation_forward(h, **mlp.activation_kwargs())
        y = a @ (w_down[e] if mlp.down_transposed else w_down[e].t())
        if b_down is not None:
            y = y + b_down[e]
        if not mlp.weight_on_input:
            y = y.to(combine_dtype) * w
        out = out.index_add(0, tok, y.to(acc_dtype))
    return out.to(x_NH.dtype if out_dtype is None else out_dtype)


def moe_experts_backward_reference(
    grad_out_NH: torch.Tensor, x_NH: torch.Tensor, weights_NK: torch.Tensor, perm_S: torch.Tensor,
    inv_perm_S: torch.Tensor, offsets_E: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
    b_up: torch.Tensor | None, b_down: torch.Tensor | None, h: torch.Tensor, *, mlp: ExpertMLP = ExpertMLP(),
    needs_input_grad: tuple[bool, bool, bool, bool, bool, bool] = (True,) * 6,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of :func:`moe_experts_reference` for ``(x, weights, w_up, w_down, b_up, b_down)``.

    Weight on the output: the routing-weight gradient uses ``<g, a W_down^T> = <g W_down, a>``,
    so the unweighted expert output never has to be stored. Weight on the input: it is
    ``<d(w x), x>``. The activation is recomputed once from ``h``.
    """
    n, hidden = x_NH.shape
    k = weights_NK.shape[1]
    compute_dtype = w_up.dtype
    combine_dtype = torch.promote_types(compute_dtype, weights_NK.dtype)
    segs = _segments(offsets_E)
    need_x, need_w, need_up, need_down, need_bup, need_bdown = needs_input_grad
    weight_on_input = mlp.weight_on_input
    tok_S = torch.div(perm_S, k, rounding_mode="floor")
    w_sorted_S1 = weights_NK.reshape(-1).index_select(0, perm_S).unsqueeze(-1)
    acc_dtype = compute_dtype if weight_on_input else combine_dtype
    g_SH = grad_out_NH.to(acc_dtype).index_select(0, tok_S)  # d loss / d (slot output as combined)
    a, act_gate = activation_forward_saving(h, **mlp.activation_kwargs())
    # g W_down ([S, H] x [H, F] per expert): gradient wrt a (before the routing weight, if any)
    ga_unweighted = grouped_linear(g_SH.to(compute_dtype), w_down, offsets_E, transposed=not mlp.down_transposed,
                                   segments=segs)
    grad_weights = None
    if need_w and not weight_on_input:
        gw_sorted_S = (ga_unweighted.to(combine_dtype) * a).sum(dim=-1)
        if b_down is not None:  # y = a W^T + b, so <g, y> also has <g, b_e>
            for e, s0, s1 in segs:
                gw_sorted_S[s0:s1] += g_SH[s0:s1] @ b_down[e].to(combine_dtype)
        grad_weights = gw_sorted_S.index_select(0, inv_perm_S).view(n, k).to(weights_NK.dtype)
    if weight_on_input:
        ga, gy_SH = ga_unweighted, g_SH.to(compute_dtype)
    else:
        ga = (ga_unweighted.to(combine_dtype).mul_(w_sorted_S1)).to(compute_dtype)
        gy_SH = None
    grad_w_down = grad_b_down = None
    if need_down or need_bdown:
        if gy_SH is None:
            gy_SH = g_SH.mul_(w_sorted_S1).to(compute_dtype)  # d loss / d y (g_SH is not needed any more)
        if need_down:  # w [H, F]: dW = gy^T a;  transposed w [F, H]: dW = a^T gy
            grad_w_down = (_grouped_weight_grad(a, gy_SH, segs, w_down) if mlp.down_transposed
                           else _grouped_weight_grad(gy_SH, a, segs, w_down))
        if need_bdown and b_down is not None:
            grad_b_down = _grouped_bias_grad(gy_SH, segs, b_down)
    del a
    gh = activation_backward(ga, h, act_gate=act_gate, **mlp.activation_kwargs())
    grad_w_up = grad_b_up = None
    x_rows_SH = None
    if need_up or (weight_on_input and need_w):
        x_rows_SH = x_NH.index_select(0, tok_S)
    if need_up:
        x_in_SH = (x_rows_SH * w_sorted_S1 if weight_on_input else x_rows_SH).to(compute_dtype)
        grad_w_up = (_grouped_weight_grad(x_in_SH, gh, segs, w_up) if mlp.up_transposed
                     else _grouped_weight_grad(gh, x_in_SH, segs, w_up))
    if need_bup and b_up is not None:
        grad_b_up = _grouped_bias_grad(gh, segs, b_up)
    grad_x = None
    if need_x or (weight_on_input and need_w):
        gx_sorted_SH = grouped_linear(gh, w_up, offsets_E, transposed=not mlp.up_transposed, segments=segs)
        if weight_on_input and need_w:  # d loss / d w = <d (w x), x>
            gw_sorted_S = (gx_sorted_SH.to(combine_dtype) * x_rows_SH.to(combine_dtype)).sum(dim=-1)
            grad_weights = gw_sorted_S.index_select(0, inv_perm_S).view(n, k).to(weights_NK.dtype)
        if need_x:
            if weight_on_input:
                gx_sorted_SH = gx_sorted_SH.to(combine_dtype) * w_sorted_S1
            grad_x = torch.zeros(n, hidden, dtype=gx_sorted_SH.dtype, device=x_NH.device).index_add_(
                0, tok_S, gx_sorted_SH).to(x_NH.dtype)
    return grad_x, grad_weights, grad_w_up, grad_w_down, grad_b_up, grad_b_down
