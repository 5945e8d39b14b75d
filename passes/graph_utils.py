"""Small, reusable queries over Dynamo pre-grad FX graphs.

Everything here reads graphs; nothing rewrites them. Shapes come from node metadata
(``meta["example_value"]`` in Dynamo graphs, ``meta["val"]`` after re-tracing); symbolic sizes
are compared with ``statically_known_true`` so that detection never adds a guard (a guard
added after Dynamo has finished tracing would be silently ignored or would force a recompile).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

# Methods / functions whose result aliases their first argument.
VIEW_METHODS = frozenset({
    "view", "reshape", "view_as", "reshape_as", "transpose", "permute", "expand", "expand_as", "unsqueeze",
    "squeeze", "flatten", "unflatten", "narrow", "select", "t", "contiguous", "chunk", "split", "unbind",
    "as_strided", "diagonal", "movedim", "swapaxes", "detach", "unfold",
})
VIEW_FUNCTIONS = frozenset({
    torch.reshape, torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze, torch.flatten, torch.narrow,
    torch.select, torch.t, torch.chunk, torch.split, torch.unbind, torch.movedim, torch.swapaxes, torch.detach,
})
# Views that keep the element order, only re-labelling dims: safe to look through when the
# matcher only cares about values (e.g. [N*K] <-> [N, K]).
RESHAPE_METHODS = frozenset({"view", "reshape", "contiguous", "flatten", "unsqueeze", "squeeze", "view_as",
                             "reshape_as"})


def meta_val(node: Any) -> Any:
    """The example value recorded for ``node`` (FakeTensor, SymInt, tuple...), or None."""
    if not isinstance(node, fx.Node):
        return None
    if "val" in node.meta:
        return node.meta["val"]
    return node.meta.get("example_value")


def fake_mode_of(values: Iterable[Any]) -> Any:
    """The FakeTensorMode the given example values belong to (None if none is fake).

    Taken from the values themselves rather than ``detect_fake_mode()``: inside a backend the
    ambient tracing context may hold a different mode than the one that produced the graph's
    metadata, and mixing the two fails."""
    from torch._subclasses.fake_tensor import FakeTensor

    for v in values:
        if isinstance(v, FakeTensor):
            return v.fake_mode
    return None


def tensor_meta(node: Any) -> torch.Tensor | None:
    v = meta_val(node)
    return v if isinstance(v, torch.Tensor) else None


def shape_of(node: Any) -> tuple | None:
    t = tensor_meta(node)
    return None if t is None else tuple(t.shape)


def dtype_of(node: Any) -> torch.dtype | None:
    t = tensor_meta(node)
    return None if t is None else t.dtype


def same_size(a: Any, b: Any) -> bool:
    """True when two (possibly symbolic) sizes are provably equal, without adding guards."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001 - symbolic reasoning failed: treat as "not provably equal"
        return False


def same_shape(a: Iterable | None, b: Iterable | None) -> bool:
    if a is None or b is None:
        return False
    a, b = tuple(a), tuple(b)
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def static_int(x: Any) -> int | None:
    """``x`` as a Python int if it is one (or a SymInt with a constant value), else None."""
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        try:
            return int(x.node.maybe_as_int()) if x.node.maybe_as_int() is not None else None
        except Exception:  # noqa: BLE001
            return None
    return None


def hint_int(x: Any) -> int:
    """A concrete value for a possibly symbolic int (its hint: the size seen while tracing)."""
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import optimization_hint
        return int(optimization_hint(x))  # reads the hint; never adds a guard
    raise TypeError(f"not an int: {x!r}")


def runtime_scalar(node: Any) -> float | None:
    """If ``node`` is a symbolic Python scalar computed in the graph (``x.item()`` of a 0-d
    input: how Dynamo passes float module attributes under ``dynamic=True``), its value at trace
    time; else None. Such a value may change between calls without a recompile, so a rewrite
    must pass the node on, never bake the value in."""
    if not isinstance(node, fx.Node):
        return None
    v = meta_val(node)
    if isinstance(v, torch.SymFloat):
        hint = v.node.hint
        return None if hint is None else float(hint)
    if isinstance(v, torch.SymInt):
        return float(hint_int(v))
    return None


def is_method(node: Any, *names: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def is_function(node: Any, *targets: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def is_getitem(node: Any, index: Any = None) -> bool:
    if not is_function(node, operator.getitem):
        return False
    return index is None or (len(node.args) > 1 and node.args[1] == index)


def is_view(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in VIEW_METHODS:
        return True
    if node.op == "call_function" and node.target in VIEW_FUNCTIONS:
        return True
    if is_getitem(node):
        base = node.args[0]
        if isinstance(base, fx.Node) and isinstance(meta_val(base), (tuple, list)):
            # an element of a multi-output op: a view only for chunk/split/unbind
            return is_method(base, "chunk", "split", "unbind") or is_function(base, torch.chunk, torch.split,
                                                                                   torch.unbind)
        idx = node.args[1]
        idx_items = idx if isinstance(idx, tuple) else (idx,)
        # basic indexing (ints, slices, None, Ellipsis) returns a view; tensor indices copy
        return not any(isinstance(i, fx.Node) and isinstance(meta_val(i), torch.Tensor) for i in idx_items)
    return False






def ancestors(roots: Iterable[fx.Node], stop: set[fx.Node] | frozenset = frozenset()) -> set[fx.Node]:
    """All nodes ``roots`` depend on (roots excluded), not walking past ``stop`` nodes (which are
    included when reached)."""
    seen: set[fx.Node] = set()
    stack = [r for r in roots]
    while stack:
        n = stack.pop()
        for inp in n.all_input_nodes:
            if inp not in seen:
                seen.add(inp)
                if inp not in stop:
                    stack.append(inp)
    return seen


def descendants(roots: Iterable[fx.Node], limit: int | None = None) -> set[fx.Node]:
    """All nodes that depend on ``roots`` (roots excluded)."""
    seen: set[fx.Node] = set()
    stack = list(roots)
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in seen:
                seen.add(u)
                stack.append(u)
                if limit is not None and len(seen) > limit:
                    return seen
    return seen




_INPLACE_OPERATORS = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem})


def mutated_arg(node: fx.Node) -> fx.Node | None:
    """The tensor an in-place node writes to (``x.add_(y)``, ``x /= y``, ``x[i] = v``), else None."""
    target = str(node.target)
    if (node.op == "call_method" and target.endswith("_") and not target.startswith("_")) or (
            node.op == "call_function" and node.target in _INPLACE_OPERATORS):
        a = node.args[0] if node.args else None
        return a if isinstance(a, fx.Node) else None
    return None


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost ``nn.Module`` that produced ``node`` (from Dynamo's
    ``nn_module_stack``), e.g. ``model.layers.0.mlp.gate``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<top>"
    path = list(stack.values())[-1][0]
    return clean_module_path(path)


def clean_module_path(path: str) -> str:
    """``L['self'].model.layers[0].mlp`` -> ``model.layers.0.mlp``."""
    import re
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"^[LG]\['([^']+)'\]", r"\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\._(modules|parameters|buffers)\.", ".", path)
    return path.strip(".") or "<top>"


def common_module_path(nodes: Iterable[fx.Node]) -> str:
    """Longest common dotted prefix of the module paths of ``nodes``."""
    paths = [module_path(n).split(".") for n in nodes if n.meta.get("nn_module_stack")]
    if not paths:
        return "<top>"
    prefix = paths[0]
    for p in paths[1:]:
        i = 0
        while i < min(len(prefix), len(p)) and prefix[i] == p[i]:
            i += 1
        prefix = prefix[:i]
    return ".".join(prefix) or "<top>"


def target_name(node: fx.Node) -> str:
    """Readable name of what a node calls: ``softmax``, ``Tensor.sum``, ``grouter.route``."""
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            return f"{t.namespace}.{t._opname}"
        if isinstance(t, torch._ops.OpOverloadPacket):
            return f"{t._qualified_op_name.replace('::', '.')}"
        return getattr(t, "__name__", str(t))
    return f"{node.op}:{node.target}"


def _copy_nodes_into(dst: fx.Graph, src: fx.Graph) -> None:
    val_map: dict[fx.Node, fx.Node] = {}
    rv, old_out = dst.graph_copy(src, val_map, return_output_node=True)
    new_out = dst.output(rv, type_expr=old_out.type)
    new_out.meta = dict(old_out.meta)


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with a fresh copy of ``gm``'s graph (nodes and shallow-copied meta), sharing
    parameters and submodules. Lets the pipeline work on a copy and hand back the original
    untouched when nothing matches."""
    new_graph = fx.Graph(tracer_cls=gm.graph._tracer_cls)
    new_graph._codegen = gm.graph._codegen
    _copy_nodes_into(new_graph, gm.graph)
    new_gm = fx.GraphModule(gm, new_graph, class_name=type(gm).__name__)
    new_gm.meta = dict(getattr(gm, "meta", {}))
    return new_gm


def replace_graph_contents(dst: fx.Graph, src: fx.Graph) -> None:
    """Make ``dst`` hold a copy of ``src``'s nodes (for in-place hooks such as
    ``pre_grad_custom_pass`` that receive a graph and must mutate it)."""
    for node in reversed(list(dst.nodes)):
        dst.erase_node(node)
    _copy_nodes_into(dst, src)
