"""Choose each grouter op's implementation in the graph, where device and dtype are known.

The rewrite emits the opaque ops (``grouter::dispatch_plan``, ``grouter::moe_experts``), which
run anywhere. On CUDA with Triton, when the kernels support the configuration, this pass points
those nodes at the ``triton_op`` twins (``grouter_pass/ops/triton_ops.py``) so Inductor sees and
schedules the kernel launches. Why a graph pass: the choice depends on the device, dtypes and
shapes of the node's inputs and on ``GROUTER_KERNELS``; made here, it is written into the graph
the compiler and its caches see, rather than into a process-wide Inductor decomposition table.

Nodes the user's own code put in the graph (``experts_implementation="grouter"``) are chosen for
the same way as the rewrite's.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx

from grouter_pass.ops.kernel_select import allow_tf32, kernels_available_for, use_moe_kernels
from grouter_pass.passes.graph_utils import tensor_meta
from grouter_pass.passes.pipeline_state import PipelineState

log = logging.getLogger(__name__)

# the opaque op's argument names, in schema order (its Triton twin takes them, then allow_tf32)
_MOE_ARGS = tuple(a.name for a in torch.ops.grouter.moe_experts.default._schema.arguments)


def _bound(node: fx.Node, names: tuple[str, ...]) -> dict[str, Any]:
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    return args


def _choose(node: fx.Node) -> tuple[Any, tuple] | None:
    """The Triton twin and its arguments for ``node``, or None to keep the opaque op."""
    if node.target is torch.ops.grouter.dispatch_plan.default:
        ids = tensor_meta(node.args[0])
        if ids is None or not kernels_available_for(ids):
            return None
        return "dispatch_plan_triton", tuple(node.args)
    if node.target is torch.ops.grouter.moe_experts.default:
        a = _bound(node, _MOE_ARGS)
        x, w_up, w_down = (tensor_meta(a[k]) for k in ("x", "w_up", "w_down"))
        if x is None or w_up is None or w_down is None:
            return None
        if not use_moe_kernels(x, w_up, w_down, activation=a["activation"], weight_on_input=a["weight_on_input"]):
            return None
        return "moe_experts_triton", (*(a[k] for k in _MOE_ARGS), allow_tf32())
    return None


def select_kernels_pass(gm: fx.GraphModule, example_inputs: Any = None, *, config: Any = None,
                        state: PipelineState | None = None) -> fx.GraphModule:
    """Point grouter op nodes at their Triton twins where the kernels apply (see module docstring)."""
    chosen: dict[str, tuple[str, str]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        choice = _choose(node)
        if choice is None:
            continue
        from grouter_pass.ops.triton_ops import register_triton_ops

        if not register_triton_ops():
            return gm
        name, args = choice
        chosen[node.name] = (f"grouter.{node.target._schema.name.split('::')[1]}", f"grouter.{name}")
        node.target = getattr(torch.ops.grouter, name).default
        node.args, node.kwargs = args, {}
    report = state.report if state is not None else None
    if chosen and report is not None:
        report.kernels.update({n: twin for n, (_, twin) in chosen.items()})
        for site in report.sites:   # each report names the ops its site now calls
            twins = dict(chosen[n] for n in site.added_nodes if n in chosen)
            site.new_ops = [twins.get(op, op) for op in site.new_ops]
    if chosen:
        gm.recompile()
        log.debug("grouter: Triton kernels for %s", sorted(chosen))
    return gm
