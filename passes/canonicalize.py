"""Canonicalize the spellings of gating ops in a Dynamo pre-grad graph.

Dynamo records what the user wrote: ``F.softmax(x, dim=-1)``, ``torch.softmax(x, -1)`` and
``x.softmax(-1)`` are three different nodes, ``w /= s`` is ``operator.itruediv`` and
``mask.scatter_(1, i, 1)`` mutates ``mask`` in place. Detection would need a case for every
combination; instead this pass rewrites each spelling into one vocabulary first::

    F.softmax / torch.softmax / Tensor.softmax            -> torch.softmax(x, dim[, dtype=])
    torch.topk / Tensor.topk                              -> torch.topk(x, k, dim=, largest=, sorted=)
    torch.sort / argsort / Tensor.sort / argsort          -> torch.sort / torch.argsort(x, dim=, descending=)
    truediv / itruediv / torch.div / Tensor.div(_)        -> torch.div(a, b)
    mul / imul / Tensor.mul(_)  (add, sub likewise)       -> torch.mul(a, b)
    .float() / .to(f32) / .type(f32) / .type_as(t)       -> Tensor.to(x, dtype)
    F.sigmoid / Tensor.sigmoid                            -> torch.sigmoid(x)
    Tensor.sum / Tensor.gather / masked_fill / clamp ...  -> torch.sum / torch.gather / ...
    torch.norm(p, dim) / Tensor.norm                      -> torch.linalg.vector_norm(x, ord, dim)
    ~x / Tensor.bitwise_not / Tensor.logical_not (bool)   -> torch.bitwise_not(x)
    x[idx] = v (tensor idx)                               -> torch.index_put(x, (idx,), v)
    a @ b / Tensor.matmul                                 -> torch.matmul(a, b)

In-place spellings are made functional when that is provably safe: the mutated tensor is a
fresh intermediate (not a graph input, not a view, not viewed before the mutation) and the
functional op has the same dtype. Later readers of the mutated tensor are redirected to the new
node. When a rewrite is not safe the node is left as it is (with a DEBUG line): detection then
simply does not recognise that spelling, it never guesses.

Every canonical form is an ordinary torch call with the same semantics, so the canonical graph
remains executable; the pipeline still runs it on a copy and returns the caller's graph
untouched when no site is rewritten.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._dynamo.utils import counters

from grouter_pass.passes.graph_utils import fake_mode_of, is_view, meta_val, tensor_meta

log = logging.getLogger(__name__)

_CAST_METHODS = {
    "float": torch.float32, "double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16,
    "int": torch.int32, "long": torch.int64, "bool": torch.bool, "short": torch.int16,
}

# (canonical target, args, kwargs, in_place) or None when the node cannot be canonicalized
Canonical = tuple[Any, tuple, dict, bool]
Normalizer = Callable[[fx.Node], "Canonical | None"]


def _bind(node: fx.Node, names: tuple[str, ...], defaults: dict[str, Any], skip: int = 0) -> dict[str, Any] | None:
    """Map a call's positional/keyword arguments (after ``skip`` leading ones) onto ``names``."""
    out = dict(defaults)
    pos = node.args[skip:]
    if len(pos) > len(names):
        return None
    out.update(zip(names, pos))
    for k, v in node.kwargs.items():
        if k not in names and k not in defaults:
            return None
        out[k] = v
    return out


def _is_tensor(x: Any) -> bool:
    return isinstance(x, fx.Node) and tensor_meta(x) is not None


def _neg_dim(x: Any, dim: Any) -> Any:
    """Dims are written counted from the end (``-1`` for the last dim, whatever the rank), so
    ``softmax(x, 1)`` and ``softmax(x, -1)`` on a 2-D tensor become the same node."""
    t = tensor_meta(x)
    if t is None or not isinstance(dim, int) or isinstance(dim, bool) or t.dim() == 0:
        return dim
    return dim - t.dim() if dim >= 0 else dim


def _self_arg(node: fx.Node) -> Any:
    return node.args[0] if node.args else node.kwargs.get("input")


# ---------------------------------------------------------------------------------------------
# one normalizer per op family
# ---------------------------------------------------------------------------------------------


def normalize_softmax(node: fx.Node) -> Canonical | None:
    if node.target is F.softmax:
        a = _bind(node, ("input", "dim", "_stacklevel", "dtype"), {"dim": None, "_stacklevel": 3, "dtype": None})
    else:
        a = _bind(node, ("input", "dim", "dtype"), {"dtype": None})
    if a is None or a.get("dim") is None:  # implicit-dim softmax is deprecated and ambiguous
        return None
    kwargs = {"dtype": a["dtype"]} if a["dtype"] is not None else {}
    return torch.softmax, (a["input"], _neg_dim(a["input"], a["dim"])), kwargs, False


def normalize_sigmoid(node: fx.Node) -> Canonical | None:
    return torch.sigmoid, (_self_arg(node),), {}, node.target == "sigmoid_"


def normalize_topk(node: fx.Node) -> Canonical | None:
    a = _bind(node, ("input", "k", "dim", "largest", "sorted"), {"dim": -1, "largest": True, "sorted": True})
    if a is None or "k" not in a:
        return None
    return torch.topk, (a["input"], a["k"]), {"dim": _neg_dim(a["input"], a["dim"]), "largest": a["largest"],
                                              "sorted": a["sorted"]}, False


def normalize_sort(node: fx.Node) -> Canonical | None:
    a = _bind(node, ("input", "dim", "descending"), {"dim": -1, "descending": False, "stable": None})
    if a is None:
        return None
    kwargs = {"dim": _neg_dim(a["input"], a["dim"]), "descending": bool(a["descending"])}
    if a.get("stable"):
        kwargs["stable"] = True
    target = torch.argsort if node.target in ("argsort", torch.argsort) else torch.sort
    return target, (a["input"],), kwargs, False


def normalize_max(node: fx.Node) -> Canonical | None:
    a = _bind(node, ("input", "dim", "keepdim"), {"keepdim": False})
    if a is None or "dim" not in a or _is_tensor(a["dim"]):  # max(a, b) is elementwise: not ours
        return None
    return torch.max, (a["input"], _neg_dim(a["input"], a["dim"])), {"keepdim": a["keepdim"]}, False


def normalize_argmax(node: fx.Node) -> Canonical | None:
    a = _bind(node, ("input", "dim", "keepdim"), {"dim": None, "keepdim": False})
    if a is None or a["dim"] is None:
        return None
    return torch.argmax, (a["input"],), {"dim": _neg_dim(a["input"], a["dim"]), "keepdim": a["keepdim"]}, False


def _binary(target: Any, commutative: bool) -> Normalizer:
    def norm(node: fx.Node) -> Canonical | None:
        in_place = (node.op == "call_function" and node.target in _INPLACE_OPERATORS) or (
            node.op == "call_method" and str(node.target).endswith("_"))
        if node.op == "call_method" or node.target in _OPERATOR_SPELLINGS:
            if len(node.args) != 2 or node.kwargs:
                other = node.kwargs.get("other")
                if len(node.args) != 1 or set(node.kwargs) - {"other"} or other is None:
                    return None
                a, b = node.args[0], other
            else:
                a, b = node.args
        else:
            bound = _bind(node, ("input", "other"), {"alpha": 1, "rounding_mode": None})
            if bound is None or bound.get("alpha", 1) != 1 or bound.get("rounding_mode") is not None:
                return None
            a, b = bound["input"], bound["other"]
        if not _is_tensor(a):
            if in_place or not commutative or not _is_tensor(b):
                return None  # scalar / SymInt arithmetic is not a tensor op
            a, b = b, a
        return target, (a, b), {}, in_place
    return norm


def normalize_sum(node: fx.Node) -> Canonical | None:
    a = _bind(node, ("input", "dim", "keepdim"), {"keepdim": False, "dtype": None})
    if a is None or a.get("dim") is None:
        return None
    kwargs = {"keepdim": a["keepdim"]}
    if a["dtype"] is not None:
        kwargs["dtype"] = a["dtype"]
    return torch.sum, (a["input"], _neg_dim(a["input"], a["dim"])), kwargs, False


def normalize_cast(node: fx.Node) -> Canonical | None:
    x = node.args[0]
    if node.target in _CAST_METHODS:
        if len(node.args) != 1 or set(node.kwargs) - {"memory_format"}:
            return None
        dtype = _CAST_METHODS[node.target]
    elif node.target == "to":
        rest = node.args[1:]
        # copy=False / non_blocking=False do not change a dtype cast
        kw = {k: v for k, v in node.kwargs.items() if not (k in ("copy", "non_blocking") and v is False)}
        if len(rest) == 1 and isinstance(rest[0], torch.dtype) and not kw:
            dtype = rest[0]
        elif not rest and set(kw) == {"dtype"} and isinstance(kw["dtype"], torch.dtype):
            dtype = kw["dtype"]
        else:
            return None  # device moves / copies: not a pure dtype cast
    elif node.target == "type":
        if len(node.args) != 2 or not isinstance(node.args[1], torch.dtype) or node.kwargs:
            return None
        dtype = node.args[1]
    elif node.target == "type_as":
        other = tensor_meta(node.args[1]) if len(node.args) == 2 else None
        if other is None:
            return None
        dtype = other.dtype
    else:
        return None
    return "to", (x, dtype), {}, False


def normalize_gather(node: fx.Node) -> Canonical | None:
    a = _bind(node, ("input", "dim", "index"), {"sparse_grad": False})
    if a is None or a["sparse_grad"]:
        return None
    return torch.gather, (a["input"], _neg_dim(a["input"], a["dim"]), a["index"]), {}, False


def normalize_masked_fill(node: fx.Node) -> Canonical | None:
    a = _bind(node, ("input", "mask", "value"), {})
    if a is None or "value" not in a:
        return None
    return torch.masked_fill, (a["input"], a["mask"], a["value"]), {}, node.target == "masked_fill_"


def normalize_scatter(node: fx.Node) -> Canonical | None:
    a = _bind(node, ("input", "dim", "index", "src"), {})
    if a is None:
        return None
    if "src" not in a:
        if "value" in node.kwargs and len(node.args) == 3:
            a["src"] = node.kwargs["value"]
        else:
            return None
    if "reduce" in node.kwargs:
        return None
    return (torch.scatter, (a["input"], _neg_dim(a["input"], a["dim"]), a["index"], a["src"]), {},
            node.target == "scatter_")


def normalize_clamp(node: fx.Node) -> Canonical | None:
    t = node.target
    if t in ("clamp_min", "clamp_min_", torch.clamp_min):
        a = _bind(node, ("input", "min"), {})
        lo, hi = (a or {}).get("min"), None
    elif t in ("clamp_max", "clamp_max_", torch.clamp_max):
        a = _bind(node, ("input", "max"), {})
        lo, hi = None, (a or {}).get("max")
    else:
        a = _bind(node, ("input", "min", "max"), {"min": None, "max": None})
        lo, hi = (a or {}).get("min"), (a or {}).get("max")
    if a is None or (lo is None and hi is None) or _is_tensor(lo) or _is_tensor(hi):
        return None
    in_place = node.op == "call_method" and str(t).endswith("_")
    return torch.clamp, (a["input"],), {"min": lo, "max": hi}, in_place


def normalize_norm(node: fx.Node) -> Canonical | None:
    a = _bind(node, ("input", "p", "dim", "keepdim", "dtype", "out"), {"p": "fro", "dim": None, "keepdim": False,
                                                                         "dtype": None, "out": None})
    if a is None or a["dim"] is None or a["out"] is not None or a["dtype"] is not None:
        return None
    p = a["p"]
    if p == "fro":
        p = 2.0
    if not isinstance(p, (int, float)):
        return None
    return (torch.linalg.vector_norm, (a["input"],),
            {"ord": float(p), "dim": _neg_dim(a["input"], a["dim"]), "keepdim": a["keepdim"]}, False)


def normalize_invert(node: fx.Node) -> Canonical | None:
    x = _self_arg(node)
    t = tensor_meta(x)
    if t is None or (node.target in ("logical_not", torch.logical_not) and t.dtype != torch.bool):
        return None
    return torch.bitwise_not, (x,), {}, False


def normalize_matmul(node: fx.Node) -> Canonical | None:
    if len(node.args) != 2 or node.kwargs or not (_is_tensor(node.args[0]) and _is_tensor(node.args[1])):
        return None
    return torch.matmul, tuple(node.args), {}, False


def normalize_setitem(node: fx.Node) -> Canonical | None:
    if len(node.args) != 3:
        return None
    x, idx, v = node.args
    idx_t = tensor_meta(idx)
    if idx_t is None or idx_t.dtype not in (torch.int64, torch.int32, torch.bool) or not _is_tensor(v):
        return None
    return torch.index_put, (x, (idx,), v), {}, True


def normalize_activation(node: fx.Node) -> Canonical | None:
    x = _self_arg(node)
    t = node.target
    if t in (F.silu, "silu"):
        inplace = node.kwargs.get("inplace", False)
        return (F.silu, (x,), {}, False) if not inplace else None
    if t in (F.relu, torch.relu, "relu"):
        return (torch.relu, (x,), {}, False) if not node.kwargs.get("inplace", False) else None
    if t in (F.gelu, "gelu"):
        a = _bind(node, ("input", "approximate"), {"approximate": "none"})
        return (F.gelu, (x,), {"approximate": a["approximate"]}, False) if a else None
    return None


#: in-place methods whose functional method takes the same arguments (``x.index_add_(0, i, y)``
#: -> ``x.index_add(0, i, y)``): expert loops accumulate with them
_FUNCTIONAL_TWINS = ("index_add", "index_copy", "index_put", "index_fill", "scatter_add", "scatter_reduce",
                     "masked_scatter", "put", "index_reduce")


def normalize_inplace_twin(node: fx.Node) -> Canonical | None:
    name = str(node.target)[:-1]
    if not node.args or not _is_tensor(node.args[0]):
        return None
    return name, tuple(node.args), dict(node.kwargs), True


_INPLACE_OPERATORS = {operator.itruediv, operator.imul, operator.iadd, operator.isub}
_OPERATOR_SPELLINGS = {operator.truediv, operator.mul, operator.add, operator.sub} | _INPLACE_OPERATORS

_DIV, _MUL, _ADD, _SUB = (_binary(torch.div, False), _binary(torch.mul, True), _binary(torch.add, True),
                          _binary(torch.sub, False))

#: (op kind, target) -> normalizer. The canonical spellings themselves are listed too when
#: their arguments still need normalizing (defaults made explicit).
SPELLINGS: dict[tuple[str, Any], Normalizer] = {
    ("call_function", F.softmax): normalize_softmax,
    ("call_function", torch.softmax): normalize_softmax,
    ("call_method", "softmax"): normalize_softmax,
    ("call_function", torch.sigmoid): normalize_sigmoid,
    ("call_function", F.sigmoid): normalize_sigmoid,
    ("call_method", "sigmoid"): normalize_sigmoid,
    ("call_method", "sigmoid_"): normalize_sigmoid,
    ("call_function", torch.topk): normalize_topk,
    ("call_method", "topk"): normalize_topk,
    ("call_function", torch.sort): normalize_sort,
    ("call_method", "sort"): normalize_sort,
    ("call_function", torch.argsort): normalize_sort,
    ("call_method", "argsort"): normalize_sort,
    ("call_function", torch.max): normalize_max,
    ("call_method", "max"): normalize_max,
    ("call_function", torch.argmax): normalize_argmax,
    ("call_method", "argmax"): normalize_argmax,
    **{("call_function", t): _DIV for t in (operator.truediv, operator.itruediv, torch.div, torch.true_divide)},
    **{("call_method", t): _DIV for t in ("div", "div_", "true_divide", "true_divide_")},
    **{("call_function", t): _MUL for t in (operator.mul, operator.imul, torch.mul)},
    **{("call_method", t): _MUL for t in ("mul", "mul_")},
    **{("call_function", t): _ADD for t in (operator.add, operator.iadd, torch.add)},
    **{("call_method", t): _ADD for t in ("add", "add_")},
    **{("call_function", t): _SUB for t in (operator.sub, operator.isub, torch.sub)},
    **{("call_method", t): _SUB for t in ("sub", "sub_")},
    ("call_function", torch.sum): normalize_sum,
    ("call_method", "sum"): normalize_sum,
    **{("call_method", t): normalize_cast for t in (*_CAST_METHODS, "to", "type", "type_as")},
    ("call_function", torch.gather): normalize_gather,
    ("call_method", "gather"): normalize_gather,
    ("call_function", torch.masked_fill): normalize_masked_fill,
    ("call_method", "masked_fill"): normalize_masked_fill,
    ("call_method", "masked_fill_"): normalize_masked_fill,
    ("call_function", torch.scatter): normalize_scatter,
    ("call_method", "scatter"): normalize_scatter,
    ("call_method", "scatter_"): normalize_scatter,
    **{("call_method", t): normalize_clamp for t in ("clamp", "clamp_", "clip", "clamp_min", "clamp_min_",
                                                     "clamp_max", "clamp_max_")},
    **{("call_function", t): normalize_clamp for t in (torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max)},
    ("call_function", torch.functional.norm): normalize_norm,
    ("call_function", torch.norm): normalize_norm,
    ("call_method", "norm"): normalize_norm,
    ("call_function", operator.invert): normalize_invert,
    ("call_function", torch.bitwise_not): normalize_invert,
    ("call_function", torch.logical_not): normalize_invert,
    ("call_method", "bitwise_not"): normalize_invert,
    ("call_method", "logical_not"): normalize_invert,
    ("call_function", operator.setitem): normalize_setitem,
    ("call_function", operator.matmul): normalize_matmul,
    ("call_method", "matmul"): normalize_matmul,
    **{("call_method", f"{t}_"): normalize_inplace_twin for t in _FUNCTIONAL_TWINS},
    **{("call_function", t): normalize_activation for t in (F.silu, F.relu, torch.relu, F.gelu)},
    **{("call_method", t): normalize_activation for t in ("silu", "relu", "gelu")},
}


def _same_call(node: fx.Node, target: Any, args: tuple, kwargs: dict) -> bool:
    op = "call_method" if isinstance(target, str) else "call_function"
    return node.op == op and node.target == target and tuple(node.args) == tuple(args) and dict(node.kwargs) == kwargs


def _functional_dtype_ok(x: fx.Node, new_val: Any) -> bool:
    """An in-place op keeps ``x``'s dtype; its functional form must too."""
    xv = tensor_meta(x)
    return xv is not None and isinstance(new_val, torch.Tensor) and new_val.dtype == xv.dtype


def _result_meta(target: Any, args: tuple, kwargs: dict) -> Any:
    """Propagate fake values through the canonical call (to set ``meta`` on the new node)."""
    fakes: list[torch.Tensor] = []

    def to_fake(a: Any) -> Any:
        if isinstance(a, fx.Node):
            v = meta_val(a)
            if isinstance(v, torch.Tensor):
                fakes.append(v)
            return v
        return a

    fake_args = fx.node.map_aggregate(args, to_fake)
    fake_kwargs = fx.node.map_aggregate(kwargs, to_fake)
    mode = fake_mode_of(fakes)
    if mode is None and not fakes:
        return None

    def call() -> Any:
        if isinstance(target, str):
            return getattr(fake_args[0], target)(*fake_args[1:], **fake_kwargs)
        return target(*fake_args, **fake_kwargs)

    if mode is None:  # a graph recorded on real tensors (function_trace): the canonical op is functional
        with torch.no_grad():
            return call()
    with mode:
        return call()


def canonicalize_gating_pass(gm: fx.GraphModule, example_inputs: Any = None, *, config: Any = None,
                             state: Any = None) -> fx.GraphModule:
    """Rewrite every recognised spelling in ``gm`` into the canonical vocabulary (in place)."""
    graph = gm.graph
    seen: set[fx.Node] = set()
    n_changed = 0
    for node in list(graph.nodes):
        normalizer = SPELLINGS.get((node.op, node.target)) if node.op in ("call_function", "call_method") else None
        canonical = normalizer(node) if normalizer is not None else None
        if canonical is None:
            seen.add(node)
            continue
        target, args, kwargs, in_place = canonical
        if not in_place and _same_call(node, target, args, kwargs):
            seen.add(node)
            continue
        if in_place and not _can_functionalize(node, seen):
            seen.add(node)
            continue
        try:
            new_val = _result_meta(target, args, kwargs)
        except Exception as e:  # noqa: BLE001 - fake propagation failed: leave the node as written
            log.debug("canonicalize: kept %s (%s): fake propagation failed: %s", node.name, node.target, e)
            seen.add(node)
            continue
        if in_place and not _functional_dtype_ok(node.args[0], new_val):
            log.debug("canonicalize: kept in-place %s: functional form changes the dtype", node.name)
            seen.add(node)
            continue
        with graph.inserting_before(node):
            new = (graph.call_method(target, args, kwargs) if isinstance(target, str)
                   else graph.call_function(target, args, kwargs))
        new.meta = dict(node.meta)
        new.meta.setdefault("grouter_origin", node.name)  # the node it stands for in the caller's graph
        if new_val is not None:
            new.meta["example_value"] = new_val
            new.meta.pop("val", None)
        if in_place:
            mutated = node.args[0]
            for user in list(mutated.users):
                if user is not node and user is not new and user not in seen:
                    user.replace_input_with(mutated, new)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        seen.add(new)
        n_changed += 1
    counters["grouter"]["canonicalized_nodes"] += n_changed
    log.debug("canonicalize: rewrote %d nodes", n_changed)
    return gm


def _sole_view_of_fresh_tensor(view: fx.Node) -> bool:
    """True when ``view`` is the only way to see its base: every tensor up the view chain is a
    fresh intermediate with no other reader (``bmm(...).squeeze(1).add_(b)``), so mutating the
    view can be replaced by a functional op whose readers are the view's later readers."""
    cur = view
    while is_view(cur):
        base = cur.args[0]
        if not isinstance(base, fx.Node) or base.op not in ("call_function", "call_method") or len(base.users) != 1:
            return False
        cur = base
    return True


def _can_functionalize(node: fx.Node, seen: set[fx.Node]) -> bool:
    x = node.args[0] if node.args else None
    if not isinstance(x, fx.Node) or x.op not in ("call_function", "call_method") or tensor_meta(x) is None:
        log.debug("canonicalize: kept in-place %s: it mutates a graph input or a non-tensor", node.name)
        return False
    if is_view(x) and not _sole_view_of_fresh_tensor(x):
        log.debug("canonicalize: kept in-place %s: it mutates a view (%s) whose base is seen elsewhere", node.name,
                  x.name)
        return False
    for user in x.users:
        if user is not node and user in seen and is_view(user):
            log.debug("canonicalize: kept in-place %s: %s is viewed by %s before the mutation", node.name,
                      x.name, user.name)
            return False
    return True
