"""Logging conventions.

* ``logging.getLogger("grouter_pass")`` (and its children): one INFO summary per compiled graph,
  one line per site, DEBUG for the reasons a candidate is not a site.
* ``TORCH_LOGS="grouter_pass"``: that summary and one line per site during any compile with the
  pass (the grouter backend or the ``pre_grad_custom_pass``), printed by torch's own handlers;
  ``"+grouter_pass"``: everything at DEBUG, near-miss reasons and graph diffs included.
* ``TORCH_LOGS="+grouter_pass.inspect.diff"``: only the unified diff of each rewritten graph
  (:mod:`grouter_pass.inspect.diff`).

These are the package's own logger names: torch validates ``TORCH_LOGS`` when it is imported,
against its registered names and importable modules, and a module name enables the logger of
that name (and of its submodules).

With ``TORCH_TRACE=<dir>`` each compile also records artifacts for ``tlparse``: ``grouter_sites``
(the pass report as JSON), ``grouter_graph_before`` / ``grouter_graph_after`` / ``grouter_diff``
for a rewritten graph, and ``grouter_parity`` (the first-call comparison of ``verify=True``).

Counters live in ``torch._dynamo.utils.counters["grouter"]`` (``sites_found``,
``sites_rewritten``, ``sites_rejected``, ``nodes_replaced``, ``canonicalized_nodes``) so tests can
assert exact numbers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import torch.fx as fx

from grouter_pass.inspect.diff import log_rewrite_diff, rewrite_diff
from grouter_pass.spec import PassReport

log = logging.getLogger("grouter_pass")
#: marks a library log record that is a command's one-line result (a Grouter saved, a dataset
#: pre-dispatched): ``log.info(..., extra=RESULT)``; the ``grouter`` CLI prints a fuller line of
#: its own and drops these, so no result is shown twice
RESULT_ATTR = "grouter_result"
RESULT = {RESULT_ATTR: True}


def trace_artifact(name: str, payload_fn: Callable[[], Any], *, encoding: str = "json") -> None:
    """One ``torch._logging.trace_structured`` artifact (shown by tlparse in a ``TORCH_TRACE``
    dump, next to the compile it belongs to); the payload is built only when tracing is on."""
    from torch._logging import trace_structured

    def payload() -> str:
        value = payload_fn()
        return json.dumps(value, default=str) if encoding == "json" else str(value)

    trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": encoding}, payload_fn=payload)


def _trace_report(report: PassReport, before: fx.GraphModule | None, after: fx.GraphModule | None) -> None:
    trace_artifact("grouter_sites", report.to_dict)
    if report.changed and before is not None and after is not None:
        trace_artifact("grouter_graph_before", lambda: before.print_readable(print_output=False), encoding="string")
        trace_artifact("grouter_graph_after", lambda: after.print_readable(print_output=False), encoding="string")
        trace_artifact("grouter_diff", lambda: rewrite_diff(report, before, after), encoding="string")


def log_report(report: PassReport, *, before: fx.GraphModule | None = None,
               after: fx.GraphModule | None = None) -> None:
    _trace_report(report, before, after)
    rewritten = report.rewritten
    if not report.sites:
        log.info("grouter: no MoE gating site found; graph compiled unchanged")
        return
    log.info("grouter: found %d gating site(s), rewrote %d", len(report.sites), len(rewritten))
    for site in report.sites:
        log.info("grouter:   %s", site.summary())
    if report.changed and before is not None and after is not None:
        log_rewrite_diff(report, before, after)
