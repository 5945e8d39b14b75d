"""Logging conventions: one INFO summary per compiled graph, one line per site, DEBUG for the
reasons a candidate is not a site, and counters in ``torch._dynamo.utils.counters["grouter"]``
(``sites_found``, ``sites_rewritten``, ``sites_rejected``, ``nodes_replaced``,
``canonicalized_nodes``) so tests can assert exact numbers."""

from __future__ import annotations

import logging

from grouter_pass.spec import PassReport

log = logging.getLogger("grouter_pass")


def log_report(report: PassReport) -> None:
    rewritten = report.rewritten
    if not report.sites:
        log.info("grouter: no MoE gating site found; graph compiled unchanged")
        return
    log.info("grouter: found %d gating site(s), rewrote %d", len(report.sites), len(rewritten))
    for site in report.sites:
        log.info("grouter:   %s", site.summary())
