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

import inspect
import typing

import torch

from grouter_pass.ops import reference
from grouter_pass.spec import ROUTE_ARGS, GatingSpec


def _op_type(hint: typing.Any) -> typing.Any:
    """A ``GatingSpec`` field's type as an op argument: a ``Literal`` of names is a ``str``."""
    return str if typing.get_origin(hint) is typing.Literal else hint


def _route_signature() -> inspect.Signature:
    hints = typing.get_type_hints(GatingSpec)
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter("logits", kind, annotation=torch.Tensor),
              inspect.Parameter("bias", kind, annotation=torch.Tensor | None),
              *(inspect.Parameter(name, kind, annotation=_op_type(hints[name])) for name in ROUTE_ARGS)]
    return inspect.Signature(params, return_annotation=tuple[torch.Tensor, torch.Tensor])


def _with_route_signature(fn):
    fn.__signature__ = _route_signature()
    return fn


@torch.library.custom_op("grouter::route", mutates_args=())
@_with_route_signature
def route(logits, bias, *spec):
    """Arguments: logits, bias, then the :data:`~grouter_pass.spec.ROUTE_ARGS` fields of the spec."""
    with torch.no_grad():
        w, ids = reference.route_reference(logits, bias, **dict(zip(ROUTE_ARGS, spec)))
    return w.contiguous(), ids.contiguous()  # gather/topk outputs: fresh tensors, never aliases


@route.register_fake
def _route_fake(logits, bias, *spec):
    top_k, weights_dtype = (dict(zip(ROUTE_ARGS, spec))[k] for k in ("top_k", "weights_dtype"))
    torch._check(logits.dim() >= 1, lambda: f"route expects logits [..., E], got {tuple(logits.shape)}")
    lead = tuple(logits.shape[:-1])
    return (logits.new_empty((*lead, top_k), dtype=weights_dtype),
            logits.new_empty((*lead, top_k), dtype=torch.int64))


def _route_setup_context(ctx, inputs, output):
    logits, bias, *spec = inputs
    ctx.spec = dict(zip(ROUTE_ARGS, spec))
    ctx.save_for_backward(logits, bias, output[1])


def _route_backward(ctx, grad_weights, grad_ids):
    logits, bias, ids = ctx.saved_tensors
    grad_logits, grad_bias = reference.route_backward_reference(grad_weights, logits, bias, ids, **ctx.spec)
    return (grad_logits, grad_bias) + (None,) * len(ROUTE_ARGS)


route.register_autograd(_route_backward, setup_context=_route_setup_context)
