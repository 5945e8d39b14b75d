"""The diff of a rewritten graph, and the log channel that prints it during any compile.

``TORCH_LOGS="+grouter_pass.inspect.diff"`` (or ``"+grouter_pass"``, with everything else the
library logs at DEBUG) prints, for every graph the pass rewrites, the unified diff of the graph
before and after, new nodes tagged by role (router, dispatch plan, experts, combine) and removed
nodes by their site. DEBUG, so that an application logging at INFO does not get whole graphs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch.fx as fx

log = logging.getLogger(__name__)


def rewrite_diff(report: Any, before: fx.GraphModule, after: fx.GraphModule) -> str:
    """The tagged unified diff of ``before`` and ``after`` for the pass report ``report``."""
    from grouter_pass.inspect.graph_text import graph_lines, rewrite_tags, unified_diff

    tags_before, tags_after = rewrite_tags(report)
    return unified_diff(graph_lines(before, tags_before), graph_lines(after, tags_after))


def log_rewrite_diff(report: Any, before: fx.GraphModule, after: fx.GraphModule) -> None:
    """Log the diff on this module's channel (built only when the channel is on)."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("grouter diff:\n%s", rewrite_diff(report, before, after))
