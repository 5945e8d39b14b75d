"""What a region of a graph computes, independent of node names: so one layer's analysis serves
the next.

The layers of one model repeat the same code on same-shaped values. Two regions with one
fingerprint run the same ops, with the same constants, on inputs of the same shapes and dtypes;
given the same input values they compute the same values. The probe uses this twice: a gradient
comparison of one expert region proves every region with its fingerprint, and the routing
synthesis of one gating (its readings, found on random logits) is the synthesis of every gating
with its fingerprint, once its nodes are mapped (``RegionSignature.nodes``: the region's nodes in
order, then the nodes it reads from outside in order of first use).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from grouter_pass.passes.dataflow import scalar_value


@dataclass(frozen=True)
class RegionSignature:
    """``key``: hashable, equal for regions that compute alike; ``nodes``: the region's nodes and
    then its outside inputs, position by position the counterparts of another region with the key."""

    key: tuple
    nodes: tuple[fx.Node, ...]

    def mapping_to(self, other: RegionSignature) -> dict[fx.Node, fx.Node]:
        """This region's nodes to their counterparts in ``other`` (same key)."""
        if other.key != self.key:
            raise ValueError("regions with different fingerprints have no node mapping")
        return dict(zip(self.nodes, other.nodes))


def _meta_key(n: fx.Node) -> tuple:
    val = n.meta.get("val", n.meta.get("example_value"))
    if isinstance(val, torch.Tensor):
        return ("tensor", tuple(str(d) for d in val.shape), str(val.dtype), str(val.device))
    return ("value", type(val).__name__, str(val) if isinstance(val, (int, float, bool, torch.SymInt)) else None)


def _attr_key(n: fx.Node, by_value: bool) -> tuple:
    """A ``get_attr`` by what it holds: a higher-order op's body (an ``autograd.Function``'s
    forward and backward) by its own fingerprint; a constant tensor by its shape and dtype, or
    (``by_value``, where its numbers matter) by the attribute itself."""
    owner = n.graph.owning_module
    try:
        value = owner.get_submodule(n.target) if owner is not None else None
    except AttributeError:
        value = None
    if isinstance(value, fx.GraphModule):
        inner = region_signature(list(value.graph.nodes), by_value=by_value)
        return ("graph", None if inner is None else inner.key)
    if value is not None:
        return ("module", id(value))   # some other module: only itself is the same
    if by_value:
        return ("attr", id(owner), n.target)
    return _meta_key(n)


def region_signature(region: Sequence[fx.Node], *, by_value: bool = False) -> RegionSignature | None:
    """Per node its op, target, argument structure (region nodes by position, outside nodes by
    order of first use with their shape and dtype, constants by value) and output shape and dtype.

    ``by_value``: also what makes values differ where shapes agree: an outside scalar by its
    value and a constant tensor by its attribute (use it where the analysis reads values, not
    only gradients). None where a node's meaning depends on its name (a module call), so the
    region is never matched to another."""
    index = {n: i for i, n in enumerate(region)}
    outside: dict[fx.Node, int] = {}

    def outside_key(a: fx.Node) -> tuple:
        key = ("input", outside.setdefault(a, len(outside)), _meta_key(a))
        if by_value and not isinstance(a.meta.get("val", a.meta.get("example_value")), torch.Tensor):
            key += (repr(scalar_value(a)),)
        return key

    def arg_key(a: Any) -> Any:
        if isinstance(a, fx.Node):
            if a.op == "get_attr":
                return ("attr", _attr_key(a, by_value))
            if a in index:
                return ("node", index[a])
            return outside_key(a)
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(arg_key(x) for x in a))
        if isinstance(a, dict):
            return ("dict", tuple((k, arg_key(v)) for k, v in a.items()))
        if isinstance(a, (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format,
                          torch.layout, slice, type(Ellipsis))):
            return ("const", repr(a))
        return ("other", type(a).__name__, repr(a))

    key = []
    for n in region:
        if n.op == "call_module":
            return None
        if n.op in ("placeholder", "get_attr"):
            key.append((n.op, _attr_key(n, by_value) if n.op == "get_attr" else _meta_key(n)))
            continue
        target = n.target if isinstance(n.target, str) else f"{getattr(n.target, '__module__', '')}." \
            f"{getattr(n.target, '__qualname__', getattr(n.target, '__name__', repr(n.target)))}@{id(n.target)}"
        key.append((n.op, target, arg_key(n.args), arg_key(n.kwargs), _meta_key(n)))
    return RegionSignature(tuple(key), (*region, *outside))


def region_fingerprint(region: Sequence[fx.Node]) -> tuple | None:
    """The signature's key alone (see :func:`region_signature`)."""
    sig = region_signature(region)
    return None if sig is None else sig.key


__all__ = ["RegionSignature", "region_fingerprint", "region_signature"]
