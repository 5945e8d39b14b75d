"""``grouter::moe_experts``: gather -> grouped GEMM -> activation -> grouped GEMM -> weighted combine.

Inputs:
    x ``[N, H]``, routing weights ``[N, K]``, the plan (perm ``[S]``, inv_perm ``[S]``,
    offsets ``[E]`` int32), w_up ``[E, 2F, H]`` or ``[E, H, 2F]``, w_down ``[E, H, F]`` or
    ``[E, F, H]``, optional biases ``[E, 2F]`` / ``[E, H]``, and the activation as scalars.
Outputs:
    out ``[N, H]`` in ``out_dtype``, and ``h [S, 2F]``, the first GEMM's output in expert
    order, returned only so the backward need not recompute a GEMM (the AOT partitioner saves
    it; in inference it is dead and freed at once).

The backward is one more opaque op, ``grouter::moe_experts_backward``, returning the gradients
of x, routing weights, both expert weights and both biases (empty tensors for the gradients
autograd did not ask for).

Device dispatch (:mod:`grouter_pass.ops.kernel_select`): on CUDA with Triton installed, the fused
kernels of :mod:`grouter_pass.kernels.moe` (no host synchronisation; Inductor sees them through
the ``*_triton`` ops of :mod:`grouter_pass.ops.triton_ops`); on CPU, and for configurations the
kernels do not fuse, :mod:`grouter_pass.ops.reference`, whose per-expert GEMMs are ``torch.mm``
calls on contiguous row ranges with one host read of the E offsets per call (free on CPU; a
device synchronisation per call elsewhere, logged once). On CPU the common configuration runs
:mod:`grouter_pass.ops.cpu_experts` instead: the same arithmetic, experts split between threads.

Troubleshooting: ``GROUTER_KERNELS=reference`` forces the reference path on every device.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch

from grouter_pass.ops import cpu_experts, reference
from grouter_pass.ops.kernel_select import allow_tf32, use_cpu_experts, use_moe_kernels

log = logging.getLogger(__name__)
_EMPTY_GRAD = (0,)


@functools.cache
def _warn_reference_on(device_type: str) -> None:
    log.warning("grouter.moe_experts runs its reference implementation on %s: one host synchronisation per "
                "call to read the expert offsets", device_type)


@torch.library.custom_op("grouter::moe_experts", mutates_args=())
def moe_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    perm: torch.Tensor,
    inv_perm: torch.Tensor,
    offsets: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    b_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    activation: str,
    gated: bool,
    interleaved: bool,
    alpha: float,
    limit: float,
    up_transposed: bool,
    down_transposed: bool,
    weight_on_input: bool,
    out_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_moe_kernels(x, w_up, w_down, activation=activation, weight_on_input=weight_on_input):
        from grouter_pass.kernels.moe import moe_experts_triton

        with torch.no_grad():
            return moe_experts_triton(
                x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down, activation=activation, gated=gated,
                interleaved=interleaved, up_transposed=up_transposed, down_transposed=down_transposed,
                out_dtype=out_dtype, allow_tf32=allow_tf32())
    impl = reference.moe_experts_reference
    if use_cpu_experts(x, weights, w_up, w_down, weight_on_input=weight_on_input):
        impl = cpu_experts.moe_experts_cpu
    elif x.device.type != "cpu":
        _warn_reference_on(x.device.type)
    with torch.no_grad():
        return impl(
            x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down, activation=activation, gated=gated,
            interleaved=interleaved, alpha=alpha, limit=limit, up_transposed=up_transposed,
            down_transposed=down_transposed, weight_on_input=weight_on_input, out_dtype=out_dtype)


@moe_experts.register_fake
def _moe_experts_fake(x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down, activation, gated,
                      interleaved, alpha, limit, up_transposed, down_transposed, weight_on_input, out_dtype):
    torch._check(x.dim() == 2 and weights.dim() == 2, lambda: "moe_experts expects x [N, H] and weights [N, K]")
    up_out = w_up.shape[2] if up_transposed else w_up.shape[1]
    out = x.new_empty(x.shape, dtype=x.dtype if out_dtype is None else out_dtype)
    h = x.new_empty((perm.shape[0], up_out), dtype=w_up.dtype)
    return out, h


_ACT_ARGS = ("activation", "gated", "interleaved", "alpha", "limit", "up_transposed", "down_transposed",
             "weight_on_input")


def register_experts_autograd(op: Any, backward_op: Any, extra_args: tuple[str, ...] = ()) -> None:
    """Autograd for an experts op with ``moe_experts``' schema (the 9 tensors, ``_ACT_ARGS``,
    ``out_dtype``) plus ``extra_args``: ``backward_op`` (``moe_experts_backward``' schema plus the
    same ``extra_args``) computes the gradients that are needed. The opaque op and its Triton twin
    (``triton_ops.py``, with ``allow_tf32``) share it."""

    def setup_context(ctx, inputs, output):
        x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down, *rest = inputs
        ctx.kw = dict(zip(_ACT_ARGS, rest[: len(_ACT_ARGS)]))
        ctx.kw.update(zip(extra_args, rest[len(_ACT_ARGS) + 1:]))   # after out_dtype
        ctx.n_flags = len(rest)
        ctx.has_b_up, ctx.has_b_down = b_up is not None, b_down is not None
        ctx.save_for_backward(x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down, output[1])

    def backward(ctx, grad_out, grad_h):
        x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down, h = ctx.saved_tensors
        nig = ctx.needs_input_grad
        needs = [nig[0], nig[1], nig[5], nig[6], nig[7] and ctx.has_b_up, nig[8] and ctx.has_b_down]
        grads = backward_op(grad_out.contiguous(), x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down,
                            h, needs=needs, **ctx.kw)
        gx, gw, gup, gdown, gbup, gbdown = (g if need else None for g, need in zip(grads, needs))
        return (gx, gw, None, None, None, gup, gdown, gbup, gbdown) + (None,) * ctx.n_flags

    op.register_autograd(backward, setup_context=setup_context)


@torch.library.custom_op("grouter::moe_experts_backward", mutates_args=())
def moe_experts_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weights: torch.Tensor,
    perm: torch.Tensor,
    inv_perm: torch.Tensor,
    offsets: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    b_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    h: torch.Tensor,
    needs: Sequence[bool],
    activation: str,
    gated: bool,
    interleaved: bool,
    alpha: float,
    limit: float,
    up_transposed: bool,
    down_transposed: bool,
    weight_on_input: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_moe_kernels(x, w_up, w_down, activation=activation, weight_on_input=weight_on_input):
        from grouter_pass.kernels.moe import moe_experts_backward_triton

        with torch.no_grad():
            grads = moe_experts_backward_triton(
                grad_out, x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down, h, activation=activation,
                gated=gated, interleaved=interleaved, up_transposed=up_transposed, down_transposed=down_transposed,
                needs=tuple(needs), allow_tf32=allow_tf32())
        return tuple(g if g is not None else x.new_empty(_EMPTY_GRAD) for g in grads)
    impl = reference.moe_experts_backward_reference
    if use_cpu_experts(x, weights, w_up, w_down, weight_on_input=weight_on_input):
        impl = cpu_experts.moe_experts_backward_cpu
    with torch.no_grad():
        grads = impl(
            grad_out, x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down, h, activation=activation,
            gated=gated, interleaved=interleaved, alpha=alpha, limit=limit, up_transposed=up_transposed,
            down_transposed=down_transposed, weight_on_input=weight_on_input, needs_input_grad=tuple(needs))
    return tuple(g if g is not None else x.new_empty(_EMPTY_GRAD) for g in grads)


@moe_experts_backward.register_fake
def _moe_experts_backward_fake(grad_out, x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down, h,
                               needs, activation, gated, interleaved, alpha, limit, up_transposed, down_transposed,
                               weight_on_input):
    like = (x, weights, w_up, w_down, b_up, b_down)
    return tuple(torch.empty_like(t) if (need and t is not None) else x.new_empty(_EMPTY_GRAD)
                 for t, need in zip(like, needs))


register_experts_autograd(moe_experts, torch.ops.grouter.moe_experts_backward)
