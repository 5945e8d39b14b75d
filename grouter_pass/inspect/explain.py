"""``grouter_pass.explain(model, *inputs)``: run the pass on a copy of ``model`` and report.

The model is copied (the caller's object is never modified), prepared as ``apply_grouter``
would (pre-Dynamo module rewrites), compiled with the grouter backend keeping every graph
before and after the pass, and run forward and backward on the given inputs next to the
original. The graph counts and break reasons before and after are taken in isolated Dynamo regions
(``graph_breaks``): nothing the caller compiled is reset or recompiled.
By default the rewritten graphs run without Inductor (``compiler="eager"``): what is inspected is
the pass; pass ``config=GrouterConfig(...)`` to check through Inductor too.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from grouter_pass.api import PrepareReport, prepare_model
from grouter_pass.backend import GrouterBackend
from grouter_pass.config import GrouterConfig
from grouter_pass.inspect.graph_breaks import graph_breaks
from grouter_pass.inspect.graph_text import changed_op_counts, graph_lines, rewrite_tags, unified_diff
from grouter_pass.inspect.report import ExplainReport, GraphCounts, GraphDiff, ParityRow
from grouter_pass.testing.parity import compare_steps, default_output, run_step


def _graph_counts(model: torch.nn.Module, args: tuple, kwargs: dict) -> GraphCounts:
    counted = graph_breaks(model, *args, **kwargs)
    return GraphCounts(counted.graphs, counted.breaks, counted.reasons)


def _named_inputs(args: tuple, kwargs: dict) -> dict[str, Any]:
    return {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}


def _caller(model: Any, n_args: int):
    def call(**named: Any) -> Any:
        return model(*[named.pop(f"arg{i}") for i in range(n_args)], **named)
    return call


def explain(model: torch.nn.Module, *args: Any, config: GrouterConfig | None = None, tolerance: float = 1e-5,
            **kwargs: Any) -> ExplainReport:
    """What the pass does to ``model`` on these inputs, and whether the result is the same function.

    Args:
        model: any module; it is copied, never modified.
        *args, **kwargs: example inputs, as for ``model(*args, **kwargs)``. Floating-point inputs
            get gradients (pass ``inputs_embeds`` to an LM to see the input gradient).
        config: the pass configuration (default: exact mode, no Inductor).
        tolerance: the max relative error a parity row may show to count as equal.
    """
    config = dataclasses.replace(config or GrouterConfig(compiler="eager"), verify=False)
    if not config.exact:
        return _explain_grouter_mode(model, args, kwargs, config, tolerance)
    candidate = copy.deepcopy(model)
    prepared = prepare_model(candidate) if config.rewrite_modules else PrepareReport()
    before = _graph_counts(model, args, kwargs)
    after = _graph_counts(candidate, args, kwargs) if prepared.changed else before
    backend = GrouterBackend(config, keep_graphs=True)
    compiled = torch.compile(candidate, backend=backend, dynamic=config.dynamic, fullgraph=config.fullgraph,
                             isolate_recompiles=True)
    inputs = _named_inputs(args, kwargs)
    ref = run_step(_caller(model, len(args)), model, inputs, default_output, True, 1234)
    got = run_step(_caller(compiled, len(args)), candidate, inputs, default_output, True, 1234)
    parity = compare_steps(got, ref, None, None)

    rows = [ParityRow.of("output", list(ref[0].shape), parity.output, tolerance)]
    for name, c in parity.input_grads.items():
        rows.append(ParityRow.of(f"grad[input {name}]", list(ref[1][name].shape), c, tolerance))
    for name, c in parity.param_grads.items():
        rows.append(ParityRow.of(f"grad[{name}]", list(ref[2][name].shape), c, tolerance))
    for name in parity.missing_grads:
        rows.append(ParityRow(f"grad[{name}]", [], float("nan"), float("nan"), False))

    return _assemble(model, "exact", backend, prepared, before, after, rows, tolerance)


def _assemble(model, mode, backend, prepared, before, after, rows, tolerance, **extra) -> ExplainReport:
    diffs, sites = [], []
    for i, (gm_before, gm_after, report) in enumerate(backend.graphs):
        tags_before, tags_after = rewrite_tags(report)
        lines_before, lines_after = graph_lines(gm_before, tags_before), graph_lines(gm_after, tags_after)
        diffs.append(GraphDiff(i, lines_before, lines_after, unified_diff(lines_before, lines_after)))
        sites.extend(report.sites)
    prepared_lines = [f"{p}: experts_implementation -> 'grouter'" for p in prepared.experts_switched] + [
        b.summary() for b in prepared.loop_blocks]
    return ExplainReport(
        model=type(model).__name__, mode=mode, sites=sites, diffs=diffs,
        op_counts=changed_op_counts([g[0] for g in backend.graphs], [g[1] for g in backend.graphs]),
        graphs_before=before, graphs_after=after, parity=rows, tolerance=tolerance, prepared=prepared_lines,
        **extra)


def _explain_grouter_mode(model, args, kwargs, config, tolerance) -> ExplainReport:
    """Grouter, precomputed or hash routing: the rewrite, the routing agreement with the model's
    own router, and what changed (unused router parameters, removed auxiliary losses)."""
    from grouter_pass.inspect.routing_agreement import routing_agreement

    candidate = copy.deepcopy(model)
    before = _graph_counts(model, args, kwargs)
    backend = GrouterBackend(config, keep_graphs=True)
    compiled = torch.compile(candidate, backend=backend, dynamic=config.dynamic, fullgraph=config.fullgraph,
                             isolate_recompiles=True)
    compiled(*args, **kwargs)
    agreement = routing_agreement(model, config, lambda m: m(*args, **kwargs))
    changes = []
    param_names = {id(p): n for n, p in candidate.named_parameters()}
    for report in backend.reports:
        if report.shared is None:
            continue
        changes += [f"router parameter unused (no gradient): {param_names.get(id(p), '?')}"
                    for p in report.unused_parameters]
        changes += [f"auxiliary loss removed: {line}" for line in report.shared.get("aux_losses", [])]
        changes += [f"returned router logits are zeros: {line}" for line in report.shared.get("zeroed_logits", [])]
        changes += [f"router output kept: {line}" for line in report.shared.get("kept", [])]
    return _assemble(model, config.routing.kind, backend, PrepareReport(), before, before, [], tolerance,
                     agreement=agreement, changes=changes)
