"""Graphs as text: one line per node, tagged with what the grouter rewrite did to it.

The format is the project's own (not ``gm.code``): FX code is full of ``x = None`` bookkeeping
that changes whenever anything changes, which would drown a diff. Here every node is
``name = target(args) -> dtype[shape]``; nodes keep their names across the rewrite, so a unified
diff shows exactly the removed region of each site and the ``grouter`` nodes that replaced it.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx

from grouter_pass.passes.graph_utils import meta_val, target_name

ROLE_LABELS = {"router": "router", "dispatch_plan": "dispatch plan", "experts": "experts", "combine": "combine"}


def fmt_arg(a: Any, names: dict[fx.Node, str] | None = None) -> str:
    names = names or {}
    if isinstance(a, fx.Node):
        return names.get(a, a.name)
    if isinstance(a, (tuple, list)):
        inner = ", ".join(fmt_arg(x, names) for x in a)
        return f"({inner},)" if isinstance(a, tuple) and len(a) == 1 else (
            f"({inner})" if isinstance(a, tuple) else f"[{inner}]")
    if isinstance(a, torch.dtype):
        return str(a).removeprefix("torch.")
    if isinstance(a, float):
        return repr(a)
    if isinstance(a, slice):
        return f"{'' if a.start is None else a.start}:{'' if a.stop is None else a.stop}" + (
            "" if a.step is None else f":{a.step}")
    if a is Ellipsis:
        return "..."
    return repr(a)


def fmt_val(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        dims = ",".join(str(d) for d in v.shape)
        return f"{str(v.dtype).removeprefix('torch.')}[{dims}]"
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(fmt_val(x) for x in v) + ")"
    if isinstance(v, torch.SymInt):
        return "SymInt"
    if isinstance(v, torch.SymFloat):
        return "SymFloat"
    return type(v).__name__ if v is not None else "None"


def node_line(n: fx.Node, names: dict[fx.Node, str] | None = None) -> str:
    names = names or {}
    if n.op == "output":
        return f"return {fmt_arg(n.args[0], names)}"
    args = ", ".join([fmt_arg(a, names) for a in n.args] + [f"{k}={fmt_arg(v, names)}" for k, v in n.kwargs.items()])
    return f"{names.get(n, n.name)} = {target_name(n)}({args}) -> {fmt_val(meta_val(n))}"


def graph_lines(gm: fx.GraphModule, tags: dict[str, str] | None = None, *, placeholders: bool = False) -> list[str]:
    """One line per node (placeholders left out unless asked), ``  # tag`` appended where tagged."""
    tags = tags or {}
    lines = []
    for n in gm.graph.nodes:
        if n.op == "placeholder" and not placeholders:
            continue
        line = re.sub(r"0x[0-9a-f]+", "0x?", node_line(n))
        tag = tags.get(n.name)
        lines.append(f"{line}  # {tag}" if tag else line)
    return lines


def rewrite_tags(report: Any) -> tuple[dict[str, str], dict[str, str]]:
    """(tags for the graph before: removed nodes -> their site, tags after: new nodes -> their role)."""
    before, after = {}, {}
    shared = getattr(report, "shared", None) or {}
    for name, role in shared.get("nodes", {}).items():
        after[name] = f"{ROLE_LABELS.get(role, role)}: shared by every layer"
    for name in shared.get("removed", []):
        before[name] = "removed: router"
    for site in report.sites:
        for name in site.removed_nodes:
            before[name] = f"removed: {site.module_path}"
        for name, role in site.added_nodes.items():
            after[name] = f"{ROLE_LABELS.get(role, role)}: {site.module_path}"
    return before, after


def unified_diff(before: list[str], after: list[str], context: int = 2) -> str:
    return "\n".join(difflib.unified_diff(before, after, "before", "after", lineterm="", n=context))


def node_name(line: str) -> str | None:
    """The node a graph line defines (``name = ...``), or None (the return line)."""
    head, sep, _ = line.partition(" = ")
    return head if sep and " " not in head else None


def side_by_side(before: list[str], after: list[str]) -> list[tuple[str, str, str]]:
    """Rows ``(kind, left, right)`` aligning the two graphs **by node**: kind is equal, removed,
    added or changed (the same node, different text). Inside a differing block a removed node is
    never paired with an unrelated added one just because they sit at the same position."""
    rows: list[tuple[str, str, str]] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=before, b=after, autojunk=False).get_opcodes():
        if tag == "equal":
            rows.extend(("equal", before[i], after[j]) for i, j in zip(range(i1, i2), range(j1, j2)))
            continue
        left, right = before[i1:i2], after[j1:j2]
        keys_l = [node_name(x) or f"\0{x}" for x in left]
        keys_r = [node_name(x) or f"\0{x}" for x in right]
        # the nodes both sides define, in order, are the anchors; what lies between is removed/added
        for t2, a1, a2, b1, b2 in difflib.SequenceMatcher(a=keys_l, b=keys_r, autojunk=False).get_opcodes():
            if t2 == "equal":
                rows.extend(("changed", left[a], right[b]) for a, b in zip(range(a1, a2), range(b1, b2)))
                continue
            rows.extend(("removed", left[a], "") for a in range(a1, a2))
            rows.extend(("added", "", right[b]) for b in range(b1, b2))
    return rows


def op_counts(gm: fx.GraphModule) -> Counter:
    return Counter(target_name(n) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))


def changed_op_counts(before: Iterable[fx.GraphModule], after: Iterable[fx.GraphModule]) -> list[tuple[str, int, int]]:
    b, a = Counter(), Counter()
    for gm in before:
        b.update(op_counts(gm))
    for gm in after:
        a.update(op_counts(gm))
    return sorted(((op, b[op], a[op]) for op in set(b) | set(a) if b[op] != a[op]), key=lambda r: (r[2] - r[1], r[0]))
