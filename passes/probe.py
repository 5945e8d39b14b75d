"""Run pieces of a graph on concrete random tensors: the proof behind every rewrite.

Detection proposes; the probe decides. A candidate site is a region of the caller's graph with
known inputs (router logits, routing, token states, expert weights); :class:`Region` copies
those nodes into a standalone ``GraphModule`` and runs it eagerly on random values (shapes from
the node metadata, symbolic sizes at the values seen while tracing), returning the value of
every node. Specs are synthesised by comparing those values with the reference semantics of the
``grouter`` ops (:mod:`grouter_pass.ops.reference`), and accepted only when outputs *and*
gradients agree on spread and on skewed inputs. The probe runs at compile time only, outside any
fake-tensor mode, on the example's device; its cost is a few MoE layer forwards per site.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx

from grouter_pass.passes.dataflow import GraphFacts, reads_only_metadata
from grouter_pass.passes.graph_utils import hint_int, is_view, meta_val, shape_of, tensor_meta


class ProbeError(Exception):
    """The region cannot be run on its own (it reads a value the probe cannot make up)."""


def eager(fn: Callable) -> Callable:
    """Run outside any active fake-tensor mode: Dynamo calls backends with one active, and random
    tensors made there would be fake."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            return fn(*args, **kwargs)

    return wrapper


def concrete(val: Any) -> Any:
    """A concrete Python value for a possibly symbolic scalar (its trace-time hint)."""
    if isinstance(val, (int, float, bool)) or val is None:
        return val
    if isinstance(val, torch.SymInt):
        return hint_int(val)
    if isinstance(val, (torch.SymFloat, torch.SymBool)) and val.node.hint is not None:
        return val.node.hint
    raise ProbeError(f"cannot make a concrete value for {type(val).__name__}")


def concrete_shape(node: fx.Node) -> list[int]:
    return [hint_int(d) for d in shape_of(node)]


def _is_grad_toggle(n: fx.Node) -> bool:
    return n.op == "call_function" and getattr(n.target, "__name__", "") == "_set_grad_enabled"


def _recomputable(n: fx.Node, facts: GraphFacts | None) -> bool:
    """A node the copy may recompute from scalars and templates alone."""
    return facts is not None and n in facts.fresh


class Region:
    """A standalone copy of some nodes of a graph: ``run({input node: value}) -> {node: value}``.

    ``nodes`` are copied in graph order. Values the nodes read from outside must be ``inputs``,
    symbolic or constant scalars (given their trace-time value), tensors read only for their
    shape (given zeros), fresh constructors (copied), or views / casts of an input (copied).
    ``_set_grad_enabled`` calls between the first and the last node are copied too, so a
    ``no_grad`` block inside the region keeps its meaning when gradients are probed.
    """

    def __init__(self, graph: fx.Graph, nodes: Iterable[fx.Node], inputs: Sequence[fx.Node],
                 facts: GraphFacts | None = None) -> None:
        self.inputs = list(inputs)
        position = facts.position if facts is not None else {n: i for i, n in enumerate(graph.nodes)}
        chosen = set(nodes) - set(self.inputs)
        # pull in what can be recomputed: fresh constructors and views/casts of inputs
        in_set = set(self.inputs)
        changed = True
        while changed:
            changed = False
            for n in list(chosen):
                for a in n.all_input_nodes:
                    if a in chosen or a in in_set or tensor_meta(a) is None:
                        continue
                    if _recomputable(a, facts) or (_is_view_or_cast(a) and _reaches(a, in_set | chosen)):
                        chosen.add(a)
                        changed = True
        ordered = sorted(chosen, key=position.__getitem__)
        if ordered:
            lo, hi = position[ordered[0]], position[ordered[-1]]
            toggles = [n for n in graph.nodes if _is_grad_toggle(n) and lo <= position[n] <= hi]
            ordered = sorted(set(ordered) | set(toggles), key=position.__getitem__)
        self.nodes = ordered
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        self.placeholders: list[tuple[str, fx.Node]] = []
        for i, n in enumerate(self.inputs):
            env[n] = g.placeholder(f"in_{i}")
            self.placeholders.append(("input", n))
        region_set = set(ordered)
        attrs: dict[str, Any] = {}
        owner = graph.owning_module
        for n in ordered:
            for a in n.all_input_nodes:
                if a in env or a in region_set:
                    continue
                if a.op == "get_attr" and owner is not None:  # e.g. the graphs of an autograd.Function
                    attrs[a.target] = _fetch_attr(owner, a.target)
                    env[a] = g.get_attr(a.target)
                    continue
                env[a] = g.placeholder(f"ext_{len(self.placeholders)}")
                if tensor_meta(a) is None:
                    self.placeholders.append(("scalar", a))
                elif all(reads_only_metadata(u, a) for u in a.users if u in region_set):
                    self.placeholders.append(("template", a))
                else:
                    raise ProbeError(f"the region reads {a.name} ({a.op} {getattr(a.target, '__name__', a.target)}), "
                                     "which is none of its inputs")
            env[n] = g.node_copy(n, lambda a: env[a])
        self.outputs = [n for n in ordered if not _is_grad_toggle(n)]
        g.output(tuple(env[n] for n in self.outputs))
        self.gm = fx.GraphModule(attrs if attrs else torch.nn.Module(), g)

    def run(self, values: dict[fx.Node, Any]) -> dict[fx.Node, Any]:
        args = []
        for kind, n in self.placeholders:
            if kind == "input":
                args.append(values[n])
            elif kind == "scalar":
                args.append(concrete(meta_val(n)))
            else:
                t = tensor_meta(n)
                args.append(torch.zeros(concrete_shape(n), dtype=t.dtype, device=t.device))
        outs = self.gm(*args)
        result = dict(zip(self.outputs, outs))
        result.update({n: values[n] for n in self.inputs})
        return result


def _fetch_attr(module: torch.nn.Module, target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _is_view_or_cast(n: fx.Node) -> bool:
    return n.op in ("call_method", "call_function") and (is_view(n) or (
        n.op == "call_method" and n.target in ("to", "contiguous", "float", "bfloat16", "half", "type_as")))


def _reaches(n: fx.Node, targets: set[fx.Node]) -> bool:
    """``n`` is a view/cast chain ending in one of ``targets``."""
    cur = n
    for _ in range(16):
        if cur in targets:
            return True
        if not _is_view_or_cast(cur) or not cur.args or not isinstance(cur.args[0], fx.Node):
            return False
        cur = cur.args[0]
    return False


def random_like(node: fx.Node, gen: torch.Generator, scale: float = 1.0, shift: torch.Tensor | None = None
                ) -> torch.Tensor:
    """A random tensor with ``node``'s (trace-time) shape, dtype and device."""
    t = tensor_meta(node)
    v = torch.randn(concrete_shape(node), generator=gen) * scale
    if shift is not None:
        v = v + shift
    return v.to(device=t.device, dtype=t.dtype)


def random_routing(n_tokens: int, k: int, e: int, gen: torch.Generator, skewed: bool = False) -> torch.Tensor:
    """``[N, k]`` distinct expert ids per token; ``skewed``: every token on the same k experts."""
    if skewed:
        return torch.arange(k).expand(n_tokens, k).clone()
    if n_tokens == 0:
        return torch.empty(0, k, dtype=torch.int64)
    return torch.argsort(torch.rand(n_tokens, e, generator=gen), dim=-1)[:, :k].contiguous()


__all__ = ["ProbeError", "Region", "concrete", "concrete_shape", "eager", "random_like", "random_routing"]
