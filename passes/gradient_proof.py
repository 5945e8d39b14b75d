"""When a region's gradients follow from its values, so the probe need not compare them.

The probe proves a reading of a site by comparing the region with the ``grouter`` ops on random
inputs. Forward values equal on random inputs make the two the same function; if both are built
only from differentiable library ops, their derivatives are then the same too, and comparing the
gradients by value (a forward and a backward of the region and of the op at the graph's full token
count, most of the probe's time on large layers) proves nothing more. What breaks that implication
is an op whose backward is not the derivative of its forward: ``detach`` and grad-mode switches, an
``autograd.Function``, a custom op with its own autograd formula, a module call the graph does not
show. A region containing one of those is compared by value, forward and backward, as before.
"""

from __future__ import annotations

import builtins
import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

# ops after which a value no longer carries gradients to what it was computed from
_GRADIENT_BLOCKERS = ("detach", "detach_", "_set_grad_enabled", "requires_grad_", "autograd_function_apply",
                      "set_grad_enabled", "no_grad", "stop_gradient")
# op namespaces whose backward formulas are the derivatives of their forwards
_LIBRARY_NAMESPACES = ("aten", "prims")
# Python modules whose functions compose library ops (torch.nn.functional.silu, operator.getitem)
_LIBRARY_MODULES = ("torch", "torch.nn.functional", "torch._C._nn", "torch._C._VariableFunctions",
                    "torch._C._linalg", "torch._C._special", "torch.functional", "torch.special", "torch.linalg",
                    "torch._refs", "torch._decomp.decompositions")


def _target_name(n: fx.Node) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


def blocks_gradients(region: Sequence[fx.Node], sources: Sequence[fx.Node]) -> fx.Node | None:
    """A node of ``region`` computed from ``sources`` that stops gradients flowing back to them."""
    reached = set(sources)
    for n in region:
        if n in reached:
            continue
        if any(isinstance(a, fx.Node) and a in reached for a in n.all_input_nodes):
            reached.add(n)
            if any(b == str(_target_name(n)).split(".")[-1] for b in _GRADIENT_BLOCKERS):
                return n
        elif n.op == "call_function" and _target_name(n) in ("_set_grad_enabled",):
            return n   # a grad-mode switch anywhere in the region: its effect is not local
    return None


def _library_op(target: Any) -> bool:
    if isinstance(target, torch._ops.HigherOrderOperator):
        return False
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace in _LIBRARY_NAMESPACES
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[0] in _LIBRARY_NAMESPACES
    if getattr(target, "__objclass__", None) is torch._C.TensorBase:   # torch.Tensor.index_add_
        return True
    if target in vars(operator).values() or target in vars(builtins).values() or target in vars(math).values():
        return True
    module = getattr(target, "__module__", None)
    return isinstance(module, str) and module in _LIBRARY_MODULES


def needs_gradient_values(region: Sequence[fx.Node]) -> fx.Node | None:
    """The first node of ``region`` whose backward is not known to be its forward's derivative
    (a custom op, a higher-order op, a module call, a non-library function), or None."""
    for n in region:
        if n.op in ("placeholder", "get_attr", "output"):
            continue
        if n.op == "call_method" and callable(getattr(torch.Tensor, str(n.target), None)):
            continue   # a Tensor method (x.view, x.sum); a subclass's own method is compared by value
        if n.op == "call_function" and _library_op(n.target):
            continue
        return n
    return None


def gradients_follow_values(region: Sequence[fx.Node], sources: Sequence[fx.Node]) -> str | None:
    """None when equal forward values of ``region`` and the op prove equal gradients to every node
    of ``sources``; else why the gradients must be compared by value."""
    blocker = blocks_gradients(region, sources)
    if blocker is not None:
        return f"{blocker.name} ({blocker.target}) stops gradients"
    other = needs_gradient_values(region)
    if other is not None:
        return f"{other.name} ({other.op} {other.target}) may define its own gradient"
    return None


