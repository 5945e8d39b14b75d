"""FX passes of grouter-pass: Dynamo pre-grad graph -> canonicalize -> detect -> rewrite.

Installed as ``grouter_pass.passes``. These modules only match and rewrite graphs: numerics
live in ``grouter_pass.ops`` (reached as ``torch.ops.grouter.*``), workflows elsewhere.

Every pass has the signature ``(gm, example_inputs, *, config, state) -> gm``; passes share
results through ``state``, a :class:`~grouter_pass.passes.pipeline_state.PipelineState` (the
detected sites, the report, the caller's graph). Matching runs on a canonicalized copy;
``translate_to_original`` then moves the sites onto a fresh copy of the caller's graph, so the
compiled graph differs from the caller's only where sites were rewritten. :func:`build_pass_pipeline` lists
them in order; :func:`apply_passes` runs a list (timing each, honouring
``config.disable_passes``); :func:`run_grouter_passes` is what the backend and the Inductor hook
call: it works on a copy and returns the caller's graph untouched when no site was rewritten.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch.fx as fx
from torch._dynamo.utils import counters
from torch._ops import OpOverload, OpOverloadPacket

from grouter_pass.config import GrouterConfig
from grouter_pass.passes.canonicalize import canonicalize_gating_pass
from grouter_pass.passes.detect import find_gating_sites
from grouter_pass.passes.graph_utils import copy_graph_module
from grouter_pass.passes.pipeline_state import PipelineState
from grouter_pass.passes.rewrite import rewrite_exact_pass, rewrite_shared_pass
from grouter_pass.passes.select_kernels import select_kernels_pass
from grouter_pass.spec import PassReport

log = logging.getLogger(__name__)

GraphPass = Callable[..., fx.GraphModule]


def detect_gating_sites_pass(gm: fx.GraphModule, example_inputs: Any = None, *, config: GrouterConfig,
                             state: PipelineState | None = None) -> fx.GraphModule:
    """Find the sites; record them (and the near-misses) in ``state`` for the rewrite and report."""
    state = state if state is not None else PipelineState()
    sites, rejected = find_gating_sites(gm, probe=config.probe, probe_ops=config.probe_ops,
                                        example_inputs=example_inputs, probe_weight_budget=config.probe_weight_budget)
    for site in sites:
        r = site.report()
        state.report.sites.append(r)
        state.sites.append((site, r))
    state.report.sites.extend(rejected)
    counters["grouter"]["sites_found"] += len(sites)
    counters["grouter"]["sites_rejected"] += len(rejected)
    return gm


def translate_to_original_pass(gm: fx.GraphModule, example_inputs: Any = None, *, config: GrouterConfig,
                               state: PipelineState | None = None) -> fx.GraphModule:
    """Move the detected sites from the canonicalized copy onto a fresh copy of the caller's graph.

    Canonicalization exists for matching only: the graph that is compiled keeps every node the
    caller had, spelled as it was, except the nodes each site's rewrite replaces. Every node of
    the canonical copy is either a copy of an original node (same name) or the canonical form of
    one (``meta["grouter_origin"]``), so each site translates node by node."""
    if state is None or state.original is None or not state.sites:
        return gm
    out = copy_graph_module(state.original)
    by_name = {n.name: n for n in out.graph.nodes}

    def to_original(node: fx.Node) -> fx.Node:
        return by_name[node.meta.get("grouter_origin", node.name)]

    state.sites = [(site.translated(to_original), report) for site, report in state.sites]
    return out


def cleanup_pass(gm: fx.GraphModule, example_inputs: Any = None, *, config: GrouterConfig,
                 state: PipelineState | None = None) -> fx.GraphModule:
    """Lint and regenerate code (the FX invariant every pass pipeline ends with)."""
    gm.graph.lint()
    gm.recompile()
    return gm


def build_pass_pipeline(config: GrouterConfig, state: PipelineState | None = None) -> list[tuple[str, GraphPass]]:
    """The ordered pipeline for ``config`` (exact or shared-routing rewrite), per-pass settings
    and one shared ``state`` bound (a fresh one when none is given)."""
    state = state if state is not None else PipelineState()
    pipeline: list[tuple[str, GraphPass]] = [
        ("canonicalize_gating", canonicalize_gating_pass),
        ("detect_gating_sites", detect_gating_sites_pass),
        ("translate_to_original", translate_to_original_pass),
        # exact mode: each site routes with its own router; Grouter modes: one shared routing
        ("rewrite_exact", rewrite_exact_pass) if config.exact else ("rewrite_shared", rewrite_shared_pass),
        ("select_kernels", select_kernels_pass),
        ("cleanup", cleanup_pass),
    ]
    known = {name for name, _ in pipeline}
    unknown = set(config.disable_passes) - known
    if unknown:
        raise ValueError(f"disable_passes names unknown passes {sorted(unknown)}; passes: {sorted(known)}")
    return [(name, functools.partial(p, config=config, state=state)) for name, p in pipeline
            if name not in config.disable_passes]


def apply_passes(gm: fx.GraphModule, example_inputs: Sequence[Any] | None,
                 passes: Sequence[tuple[str, GraphPass]]) -> fx.GraphModule:
    for name, p in passes:
        t0 = time.perf_counter()
        gm = p(gm, example_inputs)
        log.debug("grouter: pass %s took %.1f ms", name, 1e3 * (time.perf_counter() - t0))
    return gm


def run_grouter_passes(gm: fx.GraphModule, example_inputs: Sequence[Any] | None, config: GrouterConfig
                       ) -> tuple[fx.GraphModule, PassReport]:
    """Run the pipeline on a copy of ``gm``; returns ``(gm or the rewritten copy, report)``."""
    state = PipelineState(original=gm)
    work = apply_passes(copy_graph_module(gm), example_inputs, build_pass_pipeline(config, state))
    report = state.report
    result = work if report.changed else gm
    count_grouter_ops(result)
    return result, report


def count_grouter_ops(gm: fx.GraphModule) -> None:
    """Add the ``torch.ops.grouter`` calls of a graph the pipeline hands on to
    ``counters["grouter_ops"]`` (``{"grouter.route": 2, ...}``, summed over compiles, next to
    Dynamo's own counters): what a model became, readable without the graphs. It counts the ops
    the rewrite wrote and those a module rewrite put in before Dynamo; a site the probe refused
    is kept as the model wrote it and adds nothing, which is how a test tells "rewritten" from
    "left alone"."""
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function":
            continue
        if isinstance(target, OpOverload):   # what the rewrite writes: torch.ops.grouter.route.default
            name = target._schema.name
        elif isinstance(target, OpOverloadPacket):   # what Dynamo records for a module that calls the op
            name = target._qualified_op_name
        else:
            continue
        if name.startswith("grouter::"):
            counters["grouter_ops"][name.replace("::", ".")] += 1


__all__ = ["PipelineState", "apply_passes", "build_pass_pipeline", "canonicalize_gating_pass", "cleanup_pass",
           "count_grouter_ops", "detect_gating_sites_pass", "rewrite_exact_pass", "rewrite_shared_pass",
           "run_grouter_passes", "select_kernels_pass", "translate_to_original_pass"]
