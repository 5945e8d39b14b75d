"""The one definition of the experts ops' arguments, their schemas and their autograd.

``grouter::moe_experts`` and its Triton twin take nine tensors, the :class:`~grouter_pass.spec.ExpertMLP`
fields and ``out_dtype`` (the twin then ``allow_tf32``); their backward ops take the gradient,
the same nine tensors, ``h``, which gradients are needed, and the :class:`ExpertMLP` fields.
Why generate the signatures here (``torch.library`` infers each op's schema from them) rather
than type four by hand: a field added to :class:`ExpertMLP` then reaches every op, fake rule and
backward at once, and the backward maps gradients to inputs by name, not by position.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from grouter_pass.spec import ExpertMLP

#: the experts ops' tensor inputs, in schema order (``b_up`` / ``b_down`` may be None)
EXPERT_INPUTS = ("x", "weights", "perm", "inv_perm", "offsets", "w_up", "w_down", "b_up", "b_down")
_OPTIONAL = ("b_up", "b_down")


class ExpertGrads(NamedTuple):
    """The gradients the backward ops return (empty tensors where not needed), in this order."""

    x: torch.Tensor | None
    weights: torch.Tensor | None
    w_up: torch.Tensor | None
    w_down: torch.Tensor | None
    b_up: torch.Tensor | None
    b_down: torch.Tensor | None


_FIELD_TYPES = {"str": str, "bool": bool, "float": float}


def _params(names: Sequence[str], annotation: Any) -> list[inspect.Parameter]:
    return [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation) for n in names]


def _tensor_params(names: Sequence[str] = EXPERT_INPUTS) -> list[inspect.Parameter]:
    return [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                              annotation=torch.Tensor | None if n in _OPTIONAL else torch.Tensor) for n in names]


def _mlp_params() -> list[inspect.Parameter]:
    return [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=_FIELD_TYPES[str(f.type)])
            for f in dataclasses.fields(ExpertMLP)]


def forward_signature(extra: Sequence[str] = ()) -> inspect.Signature:
    """``(tensors, ExpertMLP fields, out_dtype, *extra bools) -> (out, h)``."""
    params = [*_tensor_params(), *_mlp_params(),
              inspect.Parameter("out_dtype", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=torch.dtype | None),
              *_params(extra, bool)]
    return inspect.Signature(params, return_annotation=tuple[torch.Tensor, torch.Tensor])


def backward_signature(extra: Sequence[str] = ()) -> inspect.Signature:
    """``(grad_out, tensors, h, needs, ExpertMLP fields, *extra bools) -> ExpertGrads``."""
    params = [*_tensor_params(("grad_out",)), *_tensor_params(), *_tensor_params(("h",)),
              *_params(("needs",), Sequence[bool]), *_mlp_params(), *_params(extra, bool)]
    grads = tuple[(torch.Tensor,) * len(ExpertGrads._fields)]
    return inspect.Signature(params, return_annotation=grads)


def experts_op_impl(signature: inspect.Signature) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give an implementation written as ``fn(tensors..., *scalars)`` the op's full signature, so
    ``torch.library`` infers the op's schema from :class:`ExpertMLP` (``custom_op`` and
    ``triton_op`` alike; ``triton_op`` always infers its schema from the signature)."""

    def give(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.__signature__ = signature
        return fn

    return give


def split_forward_scalars(scalars: Sequence[Any]) -> tuple[ExpertMLP, torch.dtype | None, tuple[Any, ...]]:
    """A forward op's arguments after the tensors: ``(mlp, out_dtype, extras)``."""
    n = len(ExpertMLP.names())
    return ExpertMLP.from_args(tuple(scalars[:n])), scalars[n], tuple(scalars[n + 1:])


def split_backward_scalars(scalars: Sequence[Any]) -> tuple[ExpertMLP, tuple[Any, ...]]:
    """A backward op's arguments after ``needs``: ``(mlp, extras)``."""
    n = len(ExpertMLP.names())
    return ExpertMLP.from_args(tuple(scalars[:n])), tuple(scalars[n:])


def as_op_grads(grads: Sequence[torch.Tensor | None], like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """An op returns a tensor for every gradient; the ones not computed are empty."""
    return tuple(g if g is not None else like.new_empty((0,)) for g in grads)


def register_experts_autograd(op: Any, backward_op: Callable[..., Any], extra: Sequence[str] = ()) -> None:
    """Autograd for a forward op of :func:`forward_signature` ``(extra)`` through ``backward_op`` of
    :func:`backward_signature` ``(extra)``, which computes only the gradients autograd needs. The
    opaque op and its Triton twin (with ``allow_tf32``) share it."""
    n_in = len(EXPERT_INPUTS)
    grad_index = {name: EXPERT_INPUTS.index(name) for name in ExpertGrads._fields}

    def setup_context(ctx, inputs, output):
        tensors, scalars = inputs[:n_in], inputs[n_in:]
        ctx.mlp, _, ctx.extra = split_forward_scalars(scalars)
        ctx.n_scalars = len(scalars)
        ctx.has_bias = {name: tensors[EXPERT_INPUTS.index(name)] is not None for name in _OPTIONAL}
        ctx.save_for_backward(*tensors, output[1])

    def backward(ctx, grad_out, grad_h):
        *tensors, h = ctx.saved_tensors
        needs = [ctx.needs_input_grad[grad_index[name]] and ctx.has_bias.get(name, True)
                 for name in ExpertGrads._fields]
        grads = backward_op(grad_out.contiguous(), *tensors, h, needs, *ctx.mlp.kwargs().values(), *ctx.extra)
        by_input = {grad_index[name]: g if need else None for name, g, need in zip(ExpertGrads._fields, grads, needs)}
        return tuple(by_input.get(i) for i in range(n_in)) + (None,) * ctx.n_scalars

    op.register_autograd(backward, setup_context=setup_context)


__all__ = ["EXPERT_INPUTS", "ExpertGrads", "as_op_grads", "backward_signature", "experts_op_impl",
           "forward_signature", "register_experts_autograd", "split_backward_scalars", "split_forward_scalars"]
