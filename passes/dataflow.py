"""Dataflow facts about a Dynamo pre-grad graph that detection reasons with.

Detection never reads names; it asks what a value *is made of*:

* **model state**: a graph input that is a parameter or a buffer of the model (Dynamo lifts
  them as graph inputs marked static, ``meta["tensor_dict"]["_dynamo_static_input_type"]``, and
  keeps a parameter's fake value a ``Parameter``; graphs recorded by
  ``integrations.function_trace`` mark theirs in ``meta["grouter_input_kind"]``), or a
  module attribute read with ``get_attr``;
* **state-derived**: computed from model state and constants only (an expert weight after a
  cast, a transpose, a ``view(E, F, H)`` or a ``torch.stack`` of a ``ModuleList``'s weights);
* **fresh**: a constructor whose values depend on no tensor's values (``zeros_like(x)``,
  ``torch.arange(n)``, ``x.new_zeros(...)``): an accumulator seed or a template, recomputed
  wherever needed;
* **random**: a node that draws random numbers (router jitter, sampling).

:class:`GraphFacts` computes these once per graph, in graph order.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable

import torch
import torch.fx as fx

from grouter_pass.passes.graph_utils import is_view, meta_val, mutated_arg, tensor_meta

#: constructors whose result depends only on shapes / dtypes / scalars
FRESH_FUNCTIONS = frozenset({
    torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.zeros_like, torch.ones_like,
    torch.empty_like, torch.full_like, torch.eye, torch.tensor, torch.scalar_tensor,
})
FRESH_METHODS = frozenset({"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"})
#: methods that read a tensor only for its metadata
META_METHODS = frozenset({"size", "dim", "numel", "stride", "element_size", "is_floating_point"})

RANDOM_FUNCTIONS = frozenset({
    torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like, torch.randint_like, torch.bernoulli,
    torch.multinomial, torch.normal, torch.poisson, torch.randperm, torch.nn.functional.dropout,
    torch.nn.functional.gumbel_softmax, torch.dropout, torch.nn.functional.alpha_dropout,
    torch.nn.functional.feature_alpha_dropout, torch.nn.functional.dropout1d, torch.nn.functional.dropout2d,
})
RANDOM_METHODS = frozenset({"uniform_", "normal_", "exponential_", "bernoulli_", "random_", "cauchy_",
                            "log_normal_", "geometric_", "bernoulli"})


#: ops whose output size depends on the values of their input
DATA_DEPENDENT_FUNCTIONS = frozenset({torch.nonzero, torch.unique, torch.masked_select, torch.unique_consecutive,
                                      torch.argwhere, torch.bincount})
DATA_DEPENDENT_METHODS = frozenset({"nonzero", "unique", "masked_select", "unique_consecutive", "argwhere",
                                    "bincount", "tolist", "item"})


def has_data_dependent_shape(node: fx.Node) -> bool:
    """A node whose output size depends on tensor values (``nonzero``, ``torch.where(mask)``...)."""
    if node.op == "call_function":
        if node.target in DATA_DEPENDENT_FUNCTIONS:
            return node.target is not torch.bincount or node.kwargs.get("minlength") is None
        if node.target is torch.where and len(node.args) == 1 and not node.kwargs:
            return True
        if node.target is torch.repeat_interleave and len(node.args) > 1 and isinstance(node.args[1], fx.Node):
            return True
    return node.op == "call_method" and node.target in DATA_DEPENDENT_METHODS


def is_state_input(node: fx.Node) -> bool:
    """A graph input that holds model state (a parameter or a buffer), or a ``get_attr``."""
    if node.op == "get_attr":
        return True
    if node.op != "placeholder":
        return False
    kind = node.meta.get("grouter_input_kind")
    if kind is not None:
        return kind == "state"
    example = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(example, torch.nn.Parameter):
        return True
    # Dynamo marks the parameters and buffers it lifts to graph inputs as static inputs
    if (node.meta.get("tensor_dict") or {}).get("_dynamo_static_input_type") is not None:
        return True
    grapharg = node.meta.get("grapharg")
    if grapharg is None:
        return False
    example = getattr(grapharg, "example", None)
    if isinstance(example, torch.nn.Parameter):
        return True
    if example is not None and getattr(example, "_dynamo_static_input_type", None) is not None:
        return True
    source = getattr(grapharg, "source", None)
    try:
        guard = source.guard_source() if source is not None else None
        return bool(guard is not None and (guard.is_unspecialized_nn_module() or guard.is_specialized_nn_module()
                                           or guard.is_fsdp_module()))
    except Exception:  # noqa: BLE001 - an unusual source: not provably state
        return False


def is_fresh(node: fx.Node) -> bool:
    """A constructor whose values depend on no input's values."""
    if node.op == "call_function" and node.target in FRESH_FUNCTIONS:
        return node.target is not torch.tensor or not any(isinstance(a, fx.Node) for a in node.all_input_nodes)
    return node.op == "call_method" and node.target in FRESH_METHODS


def is_random(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in RANDOM_FUNCTIONS:
        if node.target in (torch.nn.functional.dropout, torch.dropout):
            train = node.kwargs.get("training", node.kwargs.get("train", node.args[2] if len(node.args) > 2 else True))
            p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
            return bool(train) and p != 0
        return True
    return node.op == "call_method" and node.target in RANDOM_METHODS


def reads_only_metadata(user: fx.Node, tensor: fx.Node) -> bool:
    """``user`` reads ``tensor`` only for its shape, dtype or device (``zeros_like(t)``, ``t.size()``)."""
    if user.op == "call_function" and user.target in (torch.zeros_like, torch.ones_like, torch.empty_like,
                                                       torch.full_like, torch.randn_like, torch.rand_like):
        return user.args[0] is tensor and tensor not in user.args[1:] and tensor not in user.kwargs.values()
    if user.op == "call_method" and (user.target in FRESH_METHODS or user.target in META_METHODS):
        return user.args[0] is tensor and tensor not in user.args[1:] and tensor not in user.kwargs.values()
    if user.op == "call_function" and getattr(user.target, "__name__", "") in ("sym_size", "sym_size_int", "sym_numel",
                                                                            "sym_stride"):
        return True
    return False


def data_inputs(node: fx.Node) -> list[fx.Node]:
    """The tensor inputs whose *values* ``node`` reads (template reads and scalars excluded;
    a multi-output op counts for the getitem that unpacks it)."""
    out = []
    for a in node.all_input_nodes:
        if tensor_meta(a) is None and not isinstance(meta_val(a), (tuple, list)):
            continue  # a scalar or a size: no tensor values
        if reads_only_metadata(node, a):
            continue
        out.append(a)
    return out


class GraphFacts:
    """Per-graph dataflow facts (computed once, in graph order)."""

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        self.position: dict[fx.Node, int] = {n: i for i, n in enumerate(graph.nodes)}
        self.state_derived: set[fx.Node] = set()
        self.fresh: set[fx.Node] = set()
        self.random: set[fx.Node] = set()
        for n in graph.nodes:
            if is_random(n):
                self.random.add(n)
            if n.op in ("placeholder", "get_attr"):
                if is_state_input(n):
                    self.state_derived.add(n)
                continue
            if n.op not in ("call_function", "call_method", "call_module"):
                continue
            if is_fresh(n) and not is_random(n):
                self.fresh.add(n)
                continue
            inputs = data_inputs(n)
            # computed from constants alone (``arange(n).repeat_interleave(k)``): constant too
            if inputs and all(a in self.fresh for a in inputs) and not is_random(n) and mutated_arg(n) is None:
                self.fresh.add(n)
                continue
            if inputs and all(a in self.state_derived or a in self.fresh for a in inputs) and any(
                    a in self.state_derived for a in inputs) and not is_random(n):
                self.state_derived.add(n)
        # a buffer updated in place by the graph is state, but what reads it after the update
        # reads a value the graph computed: keep such nodes out of "state-derived"
        for n in graph.nodes:
            target = mutated_arg(n) if n.op in ("call_function", "call_method") else None
            if target is not None and target in self.state_derived:
                for user in target.users:
                    if self.position[user] > self.position[n]:
                        self.state_derived.discard(user)

    @functools.cached_property
    def live(self) -> set[fx.Node]:
        """Nodes the graph's outputs depend on (dead code is nobody's combine)."""
        from grouter_pass.passes.graph_utils import ancestors

        outs = [n for n in self.graph.nodes if n.op == "output"]
        return ancestors(outs) | set(outs)

    def before(self, a: fx.Node, b: fx.Node) -> bool:
        return self.position[a] < self.position[b]

    def in_order(self, nodes: Iterable[fx.Node]) -> list[fx.Node]:
        return sorted(set(nodes), key=self.position.__getitem__)


def strip_pure_views(node: fx.Node) -> fx.Node:
    """Walk back through views, reshapes, contiguous and dtype casts to the tensor they re-label."""
    while isinstance(node, fx.Node) and node.op in ("call_method", "call_function") and node.args and (
            is_view(node) or (node.op == "call_method" and node.target in ("to", "contiguous", "float", "bfloat16",
                                                                          "half", "type_as", "clone"))):
        if not isinstance(node.args[0], fx.Node):
            break
        node = node.args[0]
    return node


def getitem_of(node: fx.Node, index: int) -> fx.Node | None:
    return next((u for u in node.users if u.op == "call_function" and u.target is operator.getitem
                 and len(u.args) > 1 and u.args[1] == index), None)


def scalar_value(x: object) -> float | None:
    """A Python number, or the trace-time value of a symbolic scalar node."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, fx.Node):
        v = meta_val(x)
        if isinstance(v, torch.SymFloat) and v.node.hint is not None:
            return float(v.node.hint)
        if isinstance(v, torch.SymInt):
            from torch.fx.experimental.symbolic_shapes import optimization_hint
            return float(optimization_hint(v))
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


__all__ = ["GraphFacts", "data_inputs", "getitem_of", "has_data_dependent_shape", "is_fresh", "is_random",
           "is_state_input",
           "reads_only_metadata", "scalar_value", "strip_pure_views"]
