"""Graph capture and printing helpers for snapshot tests and inspection.

``capture_graphs`` records the Dynamo pre-grad graphs of a callable (the IR the pass works
on); ``gating_region_text`` prints the canonical gating subgraph of a site in a stable,
address-free form suitable for ``expecttest.assert_expected_inline``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import torch.fx as fx

from grouter_pass.inspect.graph_text import fmt_arg, fmt_val
from grouter_pass.passes.graph_utils import meta_val, target_name


def capture_graphs(fn: Callable, *args: Any, dynamic: bool | None = False, **kwargs: Any) -> list[fx.GraphModule]:
    """Run ``fn(*args, **kwargs)`` under ``torch.compile`` with a recording backend and return the
    Dynamo graphs (each with ``meta["example_value"]`` on its nodes)."""
    from grouter_pass.inspect.graph_breaks import record_graphs

    return record_graphs(fn, *args, dynamic=dynamic, **kwargs)


def nodes_text(nodes: Iterable[fx.Node], *, rename: dict[fx.Node, str] | None = None) -> str:
    """Print ``nodes`` one per line as ``name = target(args) -> dtype[shape]``.

    Printed nodes are renumbered ``v0, v1, ...``; nodes they read that are not printed become
    ``in0, in1, ...`` in order of first use (unless named in ``rename``). The text therefore does
    not depend on Dynamo's variable names, only on the dataflow.
    """
    nodes = list(nodes)
    names: dict[fx.Node, str] = dict(rename or {})
    for i, n in enumerate(n for n in nodes if n not in names):
        names[n] = f"v{i}"
    n_inputs = 0

    def fmt(a: Any) -> str:
        nonlocal n_inputs
        if isinstance(a, fx.Node) and a not in names:
            names[a] = f"in{n_inputs}"
            n_inputs += 1
        return fmt_arg(a, names)

    lines = []
    for n in nodes:
        args = ", ".join([fmt(a) for a in n.args] + [f"{k}={fmt(v)}" for k, v in n.kwargs.items()])
        lines.append(f"{names[n]} = {target_name(n)}({args}) -> {fmt_val(meta_val(n))}")
    return re.sub(r"0x[0-9a-f]+", "0x?", "\n".join(lines))


def gating_site_text(site: Any) -> str:
    """The canonical gating subgraph of a detected site: router linear to ``(weights, ids)``."""
    from grouter_pass.passes.graph_utils import ancestors

    g = site.gating
    rename = {g.logits: "logits", g.weights: "weights", g.ids: "ids"}
    if g.bias is not None:
        rename[g.bias] = "bias"
    shown = ancestors([g.weights, g.ids]) | {g.weights, g.ids}
    return nodes_text([g.logits, *[n for n in g.region if n in shown]], rename=rename)


def rewritten_site_text(gm: fx.GraphModule, site_index: int = 0) -> str:
    """The nodes one rewritten site became (the ``grouter`` ops and the getitems unpacking them),
    with the values they read printed as ``in0, in1, ...``."""
    picked = [n for n in gm.graph.nodes if "grouter_role" in n.meta]
    per_site = len(picked) // max(1, sum(1 for n in picked if n.meta["grouter_role"] == "router"
                                         and n.op == "call_function" and "route" in str(n.target)))
    return nodes_text(picked[site_index * per_site:(site_index + 1) * per_site])
