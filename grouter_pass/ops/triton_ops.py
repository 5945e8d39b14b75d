"""``torch.library.triton_op`` forms of the grouter ops, so Inductor sees the Triton kernels.

Why separate ops: the graph rewrite emits ``grouter::dispatch_plan`` / ``grouter::moe_experts``,
opaque ``custom_op``s that run the reference on CPU and call the kernels directly on CUDA. An
opaque op hides its kernels from Inductor (no fusion with neighbours, no CUDA-graph-friendly
launch bookkeeping). Here the same computations are registered as ``triton_op``s, whose kernel
launches go through ``torch.library.wrap_triton``. The graph pass chooses between the twins
where device and dtype are known (``passes/select_kernels.py``), so the choice is part of the
compiled graph (and of every cache key on it) rather than a global patch of Inductor.

Ops: ``grouter::dispatch_plan_triton``, ``grouter::moe_experts_triton`` (with autograd through
``grouter::moe_experts_backward_triton``): the schemas of their opaque twins, plus ``allow_tf32``.

:func:`register_triton_ops` registers them once, when the pass first selects them, so processes
that never compile for CUDA never import Triton for this.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)
_registered = False
#: the Triton twins' arguments after their opaque ops' (schema order)
_TWIN_EXTRA = ("allow_tf32",)


def register_triton_ops() -> bool:
    """Register the ``triton_op``s. Returns False when Triton is not installed. Idempotent."""
    global _registered
    from grouter_pass.kernels import has_triton

    if _registered:
        return True
    if not has_triton():
        return False
    _define_ops()
    _registered = True
    log.debug("grouter triton_ops registered")
    return True


def _define_ops() -> None:
    from torch.library import custom_op, triton_op, wrap_triton

    from grouter_pass import env
    from grouter_pass.kernels.dispatch_kernels import dispatch_plan_triton
    from grouter_pass.kernels.moe import moe_experts_backward_triton, moe_experts_triton
    from grouter_pass.ops.dispatch_plan import _dispatch_plan_fake
    from grouter_pass.ops.experts_schema import (
        as_op_grads,
        backward_signature,
        experts_op_impl,
        forward_signature,
        register_experts_autograd,
        split_backward_scalars,
        split_forward_scalars,
    )
    from grouter_pass.ops.moe_experts import _moe_experts_backward_fake, _moe_experts_fake

    # Triton's CPU interpreter runs kernels eagerly and cannot trace them with fake tensors, so
    # there the twins are opaque custom ops with the opaque ops' fake rules (same schemas, same
    # kernels, the same choice in the graph); compiled kernels get triton_ops Inductor can see.
    interpreted = env.triton_interpret()
    define = custom_op if interpreted else triton_op

    @define("grouter::dispatch_plan_triton", mutates_args=())
    def dispatch_plan_triton_op(ids: torch.Tensor, num_experts: int
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return dispatch_plan_triton(ids, num_experts, wrap=wrap_triton)[:4]

    @define("grouter::moe_experts_triton", mutates_args=())
    @experts_op_impl(forward_signature(_TWIN_EXTRA))
    def moe_experts_triton_op(x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down, *scalars):
        mlp, out_dtype, (tf32,) = split_forward_scalars(scalars)
        return moe_experts_triton(x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down, mlp=mlp,
                                  out_dtype=out_dtype, allow_tf32=tf32, wrap=wrap_triton)

    @define("grouter::moe_experts_backward_triton", mutates_args=())
    @experts_op_impl(backward_signature(_TWIN_EXTRA))
    def moe_experts_backward_triton_op(grad_out, x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down, h,
                                       needs, *scalars):
        mlp, (tf32,) = split_backward_scalars(scalars)
        grads = moe_experts_backward_triton(grad_out, x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down,
                                            h, mlp=mlp, needs=tuple(needs), allow_tf32=tf32, wrap=wrap_triton)
        return as_op_grads(grads, x)

    if interpreted:
        dispatch_plan_triton_op.register_fake(_dispatch_plan_fake)
        moe_experts_triton_op.register_fake(_moe_experts_fake)
        moe_experts_backward_triton_op.register_fake(_moe_experts_backward_fake)

    register_experts_autograd(moe_experts_triton_op, torch.ops.grouter.moe_experts_backward_triton, extra=_TWIN_EXTRA)
