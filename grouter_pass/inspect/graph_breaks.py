"""Count the graphs and graph breaks Dynamo takes on a call, without touching the caller's caches.

``torch._dynamo.explain`` resets Dynamo before and after it runs, which throws away every compiled
function in the process: a user who compiled one model and then asked the pass about another would
recompile the first from scratch. Here the call is compiled in an isolated region
(``torch.compile(..., isolate_recompiles=True)``) with a backend that only records the graphs, so
the entries it creates are its own, live only as long as that region, and never displace the
caller's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx


@dataclass
class GraphBreaks:
    """The graphs Dynamo captured on one call and why it split them."""

    graphs: int
    breaks: int
    reasons: list[str] = field(default_factory=list)


def _reason_line(reason: Any) -> str:
    frame = reason.user_stack[-1] if getattr(reason, "user_stack", None) else None
    where = f" ({frame.filename.rsplit('/', 1)[-1]}:{frame.lineno})" if frame is not None else ""
    return reason.reason.splitlines()[0][:160] + where


def record_graphs(fn: Callable, *args: Any, dynamic: bool | None = None, **kwargs: Any) -> list[fx.GraphModule]:
    """Run ``fn(*args, **kwargs)`` once under Dynamo in an isolated region and return the graphs it
    captured (each with ``meta["example_value"]`` on its nodes), in order."""
    graphs: list[fx.GraphModule] = []

    def record(gm: fx.GraphModule, example_inputs: list) -> Callable:
        graphs.append(gm)
        return gm.forward

    torch.compile(fn, backend=record, dynamic=dynamic, isolate_recompiles=True)(*args, **kwargs)
    return graphs


def graph_breaks(fn: Callable, *args: Any, **kwargs: Any) -> GraphBreaks:
    """Run ``fn(*args, **kwargs)`` once under Dynamo (no grad) and count its graphs and breaks.

    The count is taken as ``torch._dynamo.explain`` takes it (breaks = graphs - 1, at least 0), and
    the reasons are the first line of each break's message with the user frame it happened in.
    """
    with torch.no_grad():
        graphs = record_graphs(fn, *args, **kwargs)
    reasons = [_reason_line(gm.compile_subgraph_reason) for gm in graphs
               if getattr(gm, "compile_subgraph_reason", None) is not None and gm.compile_subgraph_reason.graph_break]
    return GraphBreaks(len(graphs), max(len(graphs) - 1, 0), reasons)
