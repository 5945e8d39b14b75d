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

import torch

from grouter_pass.ops import cpu_experts, reference
from grouter_pass.ops.experts_schema import (
    as_op_grads,
    backward_signature,
    experts_op_impl,
    forward_signature,
    register_experts_autograd,
    split_backward_scalars,
    split_forward_scalars,
)
from grouter_pass.ops.kernel_select import allow_tf32, use_cpu_experts, use_moe_kernels

log = logging.getLogger(__name__)


@functools.cache
def _warn_reference_on(device_type: str) -> None:
    log.warning("grouter.moe_experts runs its reference implementation on %s: one host synchronisation per "
                "call to read the expert offsets", device_type)


@torch.library.custom_op("grouter::moe_experts", mutates_args=())
@experts_op_impl(forward_signature())
def moe_experts(x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down, *scalars):
    """Arguments: :data:`~grouter_pass.ops.experts_schema.EXPERT_INPUTS`, the
    :class:`~grouter_pass.spec.ExpertMLP` fields, ``out_dtype``."""
    mlp, out_dtype, _ = split_forward_scalars(scalars)
    tensors = (x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down)
    if use_moe_kernels(x, w_up, w_down, activation=mlp.activation, weight_on_input=mlp.weight_on_input):
        from grouter_pass.kernels.moe import moe_experts_triton

        with torch.no_grad():
            return moe_experts_triton(*tensors, mlp=mlp, out_dtype=out_dtype, allow_tf32=allow_tf32())
    impl = reference.moe_experts_reference
    if use_cpu_experts(x, weights, w_up, w_down, weight_on_input=mlp.weight_on_input):
        impl = cpu_experts.moe_experts_cpu
    elif x.device.type != "cpu":
        _warn_reference_on(x.device.type)
    with torch.no_grad():
        return impl(*tensors, mlp=mlp, out_dtype=out_dtype)


@moe_experts.register_fake
def _moe_experts_fake(x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down, *scalars):
    mlp, out_dtype, _ = split_forward_scalars(scalars)
    torch._check(x.dim() == 2 and weights.dim() == 2, lambda: "moe_experts expects x [N, H] and weights [N, K]")
    up_out = w_up.shape[2] if mlp.up_transposed else w_up.shape[1]
    out = x.new_empty(x.shape, dtype=x.dtype if out_dtype is None else out_dtype)
    h = x.new_empty((perm.shape[0], up_out), dtype=w_up.dtype)
    return out, h


@torch.library.custom_op("grouter::moe_experts_backward", mutates_args=())
@experts_op_impl(backward_signature())
def moe_experts_backward(grad_out, x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down, h, needs,
                         *scalars):
    """Gradients of :func:`moe_experts` (:class:`~grouter_pass.ops.experts_schema.ExpertGrads`)."""
    mlp, _ = split_backward_scalars(scalars)
    tensors = (x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down)
    if use_moe_kernels(x, w_up, w_down, activation=mlp.activation, weight_on_input=mlp.weight_on_input):
        from grouter_pass.kernels.moe import moe_experts_backward_triton

        with torch.no_grad():
            grads = moe_experts_backward_triton(grad_out, *tensors, h, mlp=mlp, needs=tuple(needs),
                                                allow_tf32=allow_tf32())
        return as_op_grads(grads, x)
    impl = reference.moe_experts_backward_reference
    if use_cpu_experts(x, weights, w_up, w_down, weight_on_input=mlp.weight_on_input):
        impl = cpu_experts.moe_experts_backward_cpu
    with torch.no_grad():
        grads = impl(grad_out, *tensors, h, mlp=mlp, needs_input_grad=tuple(needs))
    return as_op_grads(grads, x)


@moe_experts_backward.register_fake
def _moe_experts_backward_fake(grad_out, x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down, h, needs,
                               *scalars):
    like = (x, weights, w_up, w_down, b_up, b_down)
    return tuple(torch.empty_like(t) if (need and t is not None) else x.new_empty((0,))
                 for t, need in zip(like, needs))


register_experts_autograd(moe_experts, torch.ops.grouter.moe_experts_backward)
