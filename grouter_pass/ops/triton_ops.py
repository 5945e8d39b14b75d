"""``torch.library.triton_op`` forms of the grouter ops, so Inductor sees the Triton kernels.

Why separate ops: the graph rewrite emits ``grouter::dispatch_plan`` / ``grouter::moe_experts``,
opaque ``custom_op``s that run the reference on CPU and call the kernels directly on CUDA. An
opaque op hides its kernels from Inductor (no fusion with neighbours, no CUDA-graph-friendly
launch bookkeeping). Here the same computations are registered as ``triton_op``s, whose kernel
launches go through ``torch.library.wrap_triton``, and Inductor decompositions map the rewrite's
ops onto them for CUDA tensors (returning ``NotImplemented``, i.e. keep the opaque op, for CPU
tensors and for configurations the kernels do not fuse).

Ops: ``grouter::dispatch_plan_triton``, ``grouter::moe_experts_triton``,
``grouter::moe_experts_backward_triton`` (schemas of their opaque twins, plus ``allow_tf32``).

:func:`register_triton_ops` registers them once; ``grouter_pass.ops`` calls it on import when
CUDA and Triton are present, so CPU-only processes never import Triton or Inductor for this.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from grouter_pass.ops.kernel_select import allow_tf32, kernels_available_for, use_moe_kernels

log = logging.getLogger(__name__)
_EMPTY_GRAD = (0,)
_registered = False


def register_triton_ops(*, decompositions: bool = True) -> bool:
    """Register the ``triton_op``s (and, with ``decompositions``, Inductor's mapping of the
    opaque ops onto them). Returns False when Triton is not installed. Idempotent."""
    global _registered
    from grouter_pass.kernels import has_triton

    if _registered:
        return True
    if not has_triton():
        return False
    _define_ops()
    if decompositions:
        _register_decompositions()
    _registered = True
    log.debug("grouter triton_ops registered (decompositions=%s)", decompositions)
    return True


def _define_ops() -> None:
    from torch.library import triton_op, wrap_triton

    from grouter_pass.kernels.dispatch_kernels import dispatch_plan_triton
    from grouter_pass.kernels.moe import moe_experts_backward_triton, moe_experts_triton

    @triton_op("grouter::dispatch_plan_triton", mutates_args=())
    def dispatch_plan_triton_op(ids: torch.Tensor, num_experts: int
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return dispatch_plan_triton(ids, num_experts, wrap=wrap_triton)[:4]

    @triton_op("grouter::moe_experts_triton", mutates_args=())
    def moe_experts_triton_op(
        x: torch.Tensor, weights: torch.Tensor, perm: torch.Tensor, inv_perm: torch.Tensor, offsets: torch.Tensor,
        w_up: torch.Tensor, w_down: torch.Tensor, b_up: torch.Tensor | None, b_down: torch.Tensor | None,
        activation: str, gated: bool, interleaved: bool, alpha: float, limit: float, up_transposed: bool,
        down_transposed: bool, weight_on_input: bool, out_dtype: torch.dtype | None, allow_tf32: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return moe_experts_triton(x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down,
                                  activation=activation, gated=gated, interleaved=interleaved,
                                  up_transposed=up_transposed, down_transposed=down_transposed, out_dtype=out_dtype,
                                  allow_tf32=allow_tf32, wrap=wrap_triton)

    @triton_op("grouter::moe_experts_backward_triton", mutates_args=())
    def moe_experts_backward_triton_op(
        grad_out: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, perm: torch.Tensor, inv_perm: torch.Tensor,
        offsets: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, b_up: torch.Tensor | None,
        b_down: torch.Tensor | None, h: torch.Tensor, needs: Sequence[bool], activation: str, gated: bool,
        interleaved: bool, alpha: float, limit: float, up_transposed: bool, down_transposed: bool,
        weight_on_input: bool, allow_tf32: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        grads = moe_experts_backward_triton(
            grad_out, x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down, h, activation=activation,
            gated=gated, interleaved=interleaved, up_transposed=up_transposed, down_transposed=down_transposed,
            needs=tuple(needs), allow_tf32=allow_tf32, wrap=wrap_triton)
        return tuple(g if g is not None else x.new_empty(_EMPTY_GRAD) for g in grads)


def _register_decompositions() -> None:
    from torch._inductor.decomposition import register_decomposition

    @register_decomposition(torch.ops.grouter.dispatch_plan.default)
    def _dispatch_plan(ids, num_experts):
        if not kernels_available_for(ids):
            return NotImplemented
        return torch.ops.grouter.dispatch_plan_triton(ids, num_experts)

    @register_decomposition(torch.ops.grouter.moe_experts.default)
    def _moe_experts(x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down, activation, gated,
                     interleaved, alpha, limit, up_transposed, down_transposed, weight_on_input, out_dtype):
        if not use_moe_kernels(x, w_up, w_down, activation=activation, weight_on_input=weight_on_input):
            return NotImplemented
        return torch.ops.grouter.moe_experts_triton(
            x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down, activation, gated, interleaved, alpha,
            limit, up_transposed, down_transposed, weight_on_input, out_dtype, allow_tf32())

    @register_decomposition(torch.ops.grouter.moe_experts_backward.default)
    def _moe_experts_backward(grad_out, x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down, h, needs,
                              activation, gated, interleaved, alpha, limit, up_transposed, down_transposed,
                              weight_on_input):
        if not use_moe_kernels(x, w_up, w_down, activation=activation, weight_on_input=weight_on_input):
            return NotImplemented
        return torch.ops.grouter.moe_experts_backward_triton(
            grad_out, x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down, h, needs, activation, gated,
            interleaved, alpha, limit, up_transposed, down_transposed, weight_on_input, allow_tf32())
