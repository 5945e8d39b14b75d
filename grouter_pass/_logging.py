"""Logging conventions.

* ``logging.getLogger("grouter_pass")`` (and its children): one INFO summary per compiled graph,
  one line per site, DEBUG for the reasons a candidate is not a site.
* ``TORCH_LOGS="grouter"``: one line per site during any compile with the pass (the grouter backend
  or the ``pre_grad_custom_pass``), printed by torch's own log handlers.
* ``TORCH_LOGS="grouter_diff"``: the unified diff of each rewritten graph.

The two short names are top-level modules of the distribution (``grouter``, ``grouter_diff``):
torch validates ``TORCH_LOGS`` at import time against its registered names and importable
modules, so a name registered later by a library would be refused; a module name is accepted
and enables the logger of that name.

Counters live in ``torch._dynamo.utils.counters["grouter"]`` (``sites_found``,
``sites_rewritten``, ``sites_rejected``, ``nodes_replaced``, ``canonicalized_nodes``) so tests can
assert exact numbers.
"""

from __future__ import annotations

import logging

import torch.fx as fx

from grouter_pass.spec import PassReport

log = logging.getLogger("grouter_pass")
#: marks a library log record that is a command's one-line result (a Grouter saved, a dataset
#: pre-dispatched): ``log.info(..., extra=RESULT)``; the ``grouter`` CLI prints a fuller line of
#: its own and drops these, so no result is shown twice
RESULT_ATTR = "grouter_result"
RESULT = {RESULT_ATTR: True}
site_log = logging.getLogger("grouter")          # TORCH_LOGS="grouter"
diff_log = logging.getLogger("grouter_diff")     # TORCH_LOGS="grouter_diff"
# Off unless asked for: torch gives the two loggers a level when TORCH_LOGS names them (before
# this runs); otherwise they would inherit an application's root INFO level and dump diffs.
for _channel in (site_log, diff_log):
    if _channel.level == logging.NOTSET:
        _channel.setLevel(logging.WARNING)


def log_report(report: PassReport, *, before: fx.GraphModule | None = None,
               after: fx.GraphModule | None = None) -> None:
    rewritten = report.rewritten
    if not report.sites:
        log.info("grouter: no MoE gating site found; graph compiled unchanged")
        return
    log.info("grouter: found %d gating site(s), rewrote %d", len(report.sites), len(rewritten))
    for site in report.sites:
        log.info("grouter:   %s", site.summary())
        site_log.info("%s", site.summary())
    if report.changed and before is not None and after is not None and diff_log.isEnabledFor(logging.INFO):
        from grouter_pass.inspect.graph_text import graph_lines, rewrite_tags, unified_diff

        tags_before, tags_after = rewrite_tags(report)
        diff_log.info("grouter diff:\n%s", unified_diff(graph_lines(before, tags_before),
                                                          graph_lines(after, tags_after)))
