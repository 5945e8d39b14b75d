"""transformers' official experts extension point, used so that eager expert loops capture.

transformers 5 dispatches the experts of most MoE models through ``ExpertsInterface``: with
``experts_implementation="eager"`` each layer runs a Python loop over ``nonzero()`` (5-6 graph
breaks per layer). :func:`use_grouter_experts` registers this project's experts function under
the name ``"grouter"`` (``ALL_EXPERTS_FUNCTIONS.register``) and selects it with the model's own
``set_experts_implementation``: the model then captures as one graph, where the pass matches and
rewrites it as usual.

The function runs in two ways. Under ``torch.compile`` it is transformers' own ``grouped_mm``
path, which the graph pass knows how to prove and rewrite. In eager mode it runs the grouter ops
(``grouter.dispatch_plan`` and ``grouter.moe_experts``: the CPU expert-parallel path, the Triton
kernels on CUDA) when the layer is one they express, read from the layer's behaviour rather than
its names: a gate ``act(gate) * up`` (gate and up as the two halves or alternating columns,
checked by running the layer's ``_apply_gate``), an activation that matches one of the ops' on a
grid of values, no post-expert norm and no expert parallelism. Other layers (a custom gate, as
gpt-oss's clamped SwiGLU) run ``grouped_mm`` in eager mode too. Both ways compute the same function (fp32 tolerance).

The name is registered with transformers when both are imported, in either order: right away if
transformers' MoE module is already loaded, else when it is first imported (a post-import hook
on that one module), so ``from_pretrained(..., experts_implementation="grouter")`` works right
after ``import grouter_pass``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
import weakref
from typing import Any

import torch

from grouter_pass.spec import ExpertMLP

log = logging.getLogger(__name__)

EXPERTS_IMPLEMENTATION = "grouter"
_MOE_MODULE = "transformers.integrations.moe"
_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
# per experts module: what its experts compute, as the grouter op reads it, or None (grouped_mm)
_op_args: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def grouter_experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts of one transformers MoE layer: under ``torch.compile`` transformers'
    ``grouped_mm`` path (one capturable graph the pass rewrites), in eager mode the grouter ops
    where the layer maps onto them (module docstring)."""
    from transformers.integrations.moe import grouped_mm_experts_forward

    if torch.compiler.is_compiling():
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    if self not in _op_args:
        _op_args[self] = _layer_op_args(self)
    mlp = _op_args[self]
    if mlp is None:
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    ids = top_k_index.long()
    perm, inv_perm, _counts, offsets = torch.ops.grouter.dispatch_plan(ids, self.num_experts)
    w_up = self.gate_up_proj if self.has_gate else self.up_proj
    b_up = (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias) if self.has_bias else None
    b_down = self.down_proj_bias if self.has_bias else None
    out, _ = torch.ops.grouter.moe_experts(hidden_states, top_k_weights, perm, inv_perm, offsets, w_up,
                                           self.down_proj, b_up, b_down, **mlp.kwargs(), out_dtype=None)
    return out.to(hidden_states.dtype)


def _layer_op_args(experts: torch.nn.Module) -> ExpertMLP | None:
    """The ``moe_experts`` arguments that compute what ``experts`` computes, read from how it
    behaves; None where the ops cannot express it (a reason is logged at DEBUG)."""
    why, layout = None, "concat"
    if getattr(experts, "_is_expert_parallel", False):
        why = "expert parallel"
    elif getattr(experts, "has_post_expert_norm", False):
        why = "a norm after each expert"
    elif not isinstance(getattr(experts, "num_experts", None), int):
        why = "no num_experts"
    if why is None:
        act_fn = getattr(experts, "act_fn", None)
        kind = _activation_of(act_fn) if act_fn is not None else None
        if kind is None:
            why = f"activation {type(act_fn).__name__} is not one of {_ACTIVATIONS}"
        elif experts.has_gate:
            layout = _gate_layout(experts, kind)
            if layout is None:
                why = "a custom gate (_apply_gate is not act(gate) * up, gate and up as halves or alternating)"
    if why is not None:
        log.debug("grouter experts: %s runs grouped_mm in eager mode: %s", type(experts).__name__, why)
        return None
    transposed = bool(getattr(experts, "is_transposed", False))
    return ExpertMLP(activation=kind, gated=bool(experts.has_gate), interleaved=layout == "interleaved",
                     up_transposed=transposed, down_transposed=transposed)


def _probe_values() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.cat([torch.linspace(-6, 6, 97), torch.randn(64, generator=gen) * 3]).reshape(1, -1)


def _activation_of(act_fn: Any) -> str | None:
    """Which of the ops' activations ``act_fn`` is, by its values on a grid (fp64)."""
    from grouter_pass.ops.reference import _act

    x = _probe_values().double()
    try:
        with torch.no_grad():
            y = act_fn(x)
    except Exception:  # noqa: BLE001 - a callable the ops cannot name
        return None
    for kind in _ACTIVATIONS:
        if isinstance(y, torch.Tensor) and y.shape == x.shape and torch.allclose(y, _act(x, kind), rtol=1e-9,
                                                                                 atol=1e-12):
            return kind
    return None


def _gate_layout(experts: torch.nn.Module, kind: str) -> str | None:
    """How the layer's gate reads its ``[S, 2F]`` input, found by running it: ``"concat"`` for
    ``act(gate) * up`` with gate and up the two halves, ``"interleaved"`` for alternating columns;
    None for any other function."""
    from grouter_pass.ops.reference import _act

    x = torch.randn(7, 2 * 11, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    try:
        with torch.no_grad():
            y = experts._apply_gate(x)
    except Exception:  # noqa: BLE001
        return None
    for layout, (gate, up) in (("concat", x.chunk(2, dim=-1)), ("interleaved", (x[:, ::2], x[:, 1::2]))):
        if isinstance(y, torch.Tensor) and y.shape == gate.shape and torch.allclose(y, _act(gate, kind) * up,
                                                                                    rtol=1e-9, atol=1e-12):
            return layout
    return None


def _register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if EXPERTS_IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, grouter_experts_forward)


class _RegisterAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds transformers' MoE module with the other finders and registers the experts function
    once it has run (Python's import system, for this one module only)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != _MOE_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        self._inner = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec: Any) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._inner.exec_module(module)
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        _register()


def register_experts_implementation() -> None:
    """Make ``experts_implementation="grouter"`` known to transformers (now, or on its import)."""
    if _MOE_MODULE in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


def use_grouter_experts(model: torch.nn.Module) -> list[str]:
    """Switch every transformers model inside ``model`` whose experts run the eager loop to the
    capturable ``"grouter"`` implementation, in place. Returns the switched models' paths."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # transformers is optional
        return []
    switched = []
    for path, module in model.named_modules():
        if not isinstance(module, PreTrainedModel) or not type(module)._can_set_experts_implementation():
            continue
        current = getattr(module.config, "_experts_implementation", None)
        if current not in ("eager", None) or any(path.startswith(p + ".") for p in switched if p):
            continue
        _register()
        module.set_experts_implementation(EXPERTS_IMPLEMENTATION)
        switched.append(path)
        log.info("grouter: %s: experts_implementation %r -> %r (the expert loop no longer breaks the graph)",
                 path or type(module).__name__, current, EXPERTS_IMPLEMENTATION)
    return switched
