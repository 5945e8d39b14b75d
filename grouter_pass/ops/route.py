"""``grouter::route``: router logits -> top-k expert weights and ids, in one op.

The op replaces the whole gating chain of a site (score function, selection bias, group-limited
top-k, gather, renormalisation, scaling, casts) with one node whose arguments are the fields of
:class:`grouter_pass.spec.GatingSpec`. The router linear itself stays in the graph, so Inductor
keeps the GEMM and any other consumer of the logits (an auxiliary loss) is untouched.

Inputs:  logits ``[..., E]`` (any float dtype, any leading dims: ``[N, E]``, ``[B, T, E]``,
         sequence-first ``[T, B, E]``), optional bias ``[E]``.
Outputs: weights ``[..., K]`` in ``weights_dtype``, ids ``[..., K]`` int64.

Troubleshooting: the backward is written out in plain torch ops
(:func:`~grouter_pass.ops.reference.route_backward_reference`), so it is traced into the AOT
backward graph and fused by Inductor; it recomputes the ``[N, E]`` scores from the saved logits
instead of saving them.
"""

from __future__ import annotations

import torch

from grouter_pass.ops import reference


@torch.library.custom_op("grouter::route", mutates_args=())
def route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    score_func: str,
    order: str,
    bias_mode: str,
    n_group: int,
    topk_group: int,
    group_score: str,
    renorm: str,
    renorm_eps: float,
    renorm_clamp_min: float | None,
    renorm_p: float,
    scaling_factor: float,
    score_dtype: torch.dtype | None,
    weights_dtype: torch.dtype,
    sorted: bool,
    sparsemixer_threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        w, ids = reference.route_reference(
            logits, bias, top_k=top_k, score_func=score_func, order=order, bias_mode=bias_mode,
            n_group=n_group, topk_group=topk_group, group_score=group_score, renorm=renorm,
            renorm_eps=renorm_eps, renorm_clamp_min=renorm_clamp_min, renorm_p=renorm_p,
            scaling_factor=scaling_factor, score_dtype=score_dtype, weights_dtype=weights_dtype,
            sorted=sorted, sparsemixer_threshold=sparsemixer_threshold)
    return w.contiguous(), ids.contiguous()  # gather/topk outputs: fresh tensors, never aliases


@route.register_fake
def _route_fake(logits, bias, top_k, score_func, order, bias_mode, n_group, topk_group, group_score, renorm,
                renorm_eps, renorm_clamp_min, renorm_p, scaling_factor, score_dtype, weights_dtype, sorted,
                sparsemixer_threshold):
    torch._check(logits.dim() >= 1, lambda: f"route expects logits [..., E], got {tuple(logits.shape)}")
    lead = tuple(logits.shape[:-1])
    return (logits.new_empty((*lead, top_k), dtype=weights_dtype),
            logits.new_empty((*lead, top_k), dtype=torch.int64))


_SPEC_ARGS = ("top_k", "score_func", "order", "bias_mode", "n_group", "topk_group", "group_score", "renorm",
              "renorm_eps", "renorm_clamp_min", "renorm_p", "scaling_factor", "score_dtype", "weights_dtype",
              "sorted", "sparsemixer_threshold")


def _route_setup_context(ctx, inputs, output):
    logits, bias, *spec = inputs
    ctx.spec = dict(zip(_SPEC_ARGS, spec))
    ctx.save_for_backward(logits, bias, output[1])


def _route_backward(ctx, grad_weights, grad_ids):
    logits, bias, ids = ctx.saved_tensors
    grad_logits, grad_bias = reference.route_backward_reference(grad_weights, logits, bias, ids, **ctx.spec)
    return (grad_logits, grad_bias) + (None,) * len(_SPEC_ARGS)


route.register_autograd(_route_backward, setup_context=_route_setup_context)
