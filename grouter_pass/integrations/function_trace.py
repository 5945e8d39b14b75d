"""Record a module's forward as a torch-level FX graph by running it on real tensors.

Dynamo cannot give the gating of a block whose expert loop breaks the graph: a graph break
inside a loop makes it skip the whole frame. Running the forward eagerly under a
``TorchFunctionMode`` that records every torch call follows the real control flow (the loop
is simply unrolled for the input at hand) and produces a graph in the same vocabulary as
Dynamo's pre-grad IR (``torch.softmax``, ``Tensor.topk`` as ``call_method``, ``operator``-free
indexing through ``Tensor.__getitem__``), which the canonicalizer and the gating parser read
unchanged. Every node carries its real value as ``meta["example_value"]``; placeholders stand
for the tensors the forward read from outside (its input, parameters, buffers) and map back to
them by identity.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch.overrides import TorchFunctionMode

_SKIP = {torch.Tensor.__repr__, torch.Tensor.__format__, torch.Tensor.dim, torch.Tensor.size,
         torch.Tensor.numel, torch.Tensor.__len__, torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist,
         torch.Tensor.is_floating_point, torch.Tensor.__hash__}
_GETTERS = {"shape", "dtype", "device", "requires_grad", "grad_fn", "is_leaf", "data", "T", "mT", "ndim"}
# Python operators arrive as Tensor dunder methods; Dynamo's IR writes them as operator.* calls
_OPERATORS = {
    "__add__": operator.add, "__sub__": operator.sub, "__mul__": operator.mul, "__truediv__": operator.truediv,
    "__floordiv__": operator.floordiv, "__matmul__": operator.matmul, "__iadd__": operator.iadd,
    "__isub__": operator.isub, "__imul__": operator.imul, "__itruediv__": operator.itruediv,
    "__invert__": operator.invert, "__neg__": operator.neg, "__setitem__": operator.setitem,
    "__lt__": operator.lt, "__le__": operator.le, "__gt__": operator.gt, "__ge__": operator.ge,
    "__eq__": operator.eq, "__ne__": operator.ne, "__and__": operator.and_, "__or__": operator.or_,
    "__pow__": operator.pow, "__mod__": operator.mod,
}
_REVERSED = {"__radd__": operator.add, "__rmul__": operator.mul, "__rsub__": operator.sub,
             "__rtruediv__": operator.truediv, "__rmatmul__": operator.matmul, "__rpow__": operator.pow}


class _Recorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.graph = fx.Graph()
        self.nodes: dict[int, fx.Node] = {}
        self.keep: list[Any] = []          # holds every recorded tensor so ids are never reused
        self.inputs: list[tuple[fx.Node, torch.Tensor]] = []

    def _node_of(self, t: torch.Tensor) -> fx.Node:
        node = self.nodes.get(id(t))
        if node is None:
            node = self.graph.placeholder(f"input_{len(self.inputs)}")
            node.meta["example_value"] = t
            self.nodes[id(t)] = node
            self.keep.append(t)
            self.inputs.append((node, t))
        return node

    def _arg(self, a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            return self._node_of(a)
        if isinstance(a, (list, tuple)):
            return type(a)(self._arg(x) for x in a)
        if isinstance(a, dict):
            return {k: self._arg(v) for k, v in a.items()}
        return a

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if func in _SKIP or name in _GETTERS or getattr(func, "__self__", None) is not None and name == "__get__":
            return out
        if not any(isinstance(x, torch.Tensor) for x in torch.utils._pytree.tree_leaves(out)) and name != "__setitem__":
            return out
        node_args, node_kwargs = self._arg(args), self._arg(kwargs)
        method = getattr(torch.Tensor, name, None) is func and name != "__getitem__"
        if name == "__getitem__":
            node = self.graph.call_function(operator.getitem, node_args, node_kwargs)
        elif name in _OPERATORS:
            node = self.graph.call_function(_OPERATORS[name], node_args, node_kwargs)
        elif name in _REVERSED:
            node = self.graph.call_function(_REVERSED[name], tuple(reversed(node_args)), node_kwargs)
        elif method:
            node = self.graph.call_method(name, node_args, node_kwargs)
        else:
            node = self.graph.call_function(func, node_args, node_kwargs)
        node.meta["example_value"] = out
        self.keep.append(out)
        if isinstance(out, torch.Tensor):
            self.nodes[id(out)] = node
        elif isinstance(out, (tuple, list)):
            for i, t in enumerate(out):
                if isinstance(t, torch.Tensor):
                    item = self.graph.call_function(operator.getitem, (node, i))
                    item.meta["example_value"] = t
                    self.nodes[id(t)] = item
        return out


def record_forward(module: torch.nn.Module, *args: Any) -> tuple[fx.GraphModule, dict[fx.Node, torch.Tensor], Any]:
    """Run ``module(*args)`` and return ``(graph module, placeholder -> the real tensor it stands
    for, the output)``. The graph module is for reading only (its placeholders include
    parameters, so it is not meant to be called)."""
    recorder = _Recorder()
    with torch.no_grad(), recorder:
        out = module(*args)
    state = {id(t) for t in (*module.parameters(), *module.buffers())}
    for node, t in recorder.inputs:  # detection tells model state from activations by this mark
        node.meta["grouter_input_kind"] = "state" if id(t) in state else "input"
    leaves = [recorder.nodes.get(id(t)) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    recorder.graph.output(tuple(n for n in leaves if n is not None))
    gm = fx.GraphModule(torch.nn.Module(), recorder.graph)
    return gm, dict(recorder.inputs), out
