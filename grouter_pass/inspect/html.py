"""The explain report as one self-contained HTML page (no external assets, no script).

Sections: the sites table, the parity table, graph counts and break reasons, changed op counts,
and for each graph a side-by-side before/after view in which removed, added and changed nodes
are highlighted and long unchanged runs fold into ``<details>`` (so a 400-node graph stays
readable without JavaScript). Written by ``grouter diff --html`` and shown by notebooks via
``ExplainReport._repr_html_``.
"""

from __future__ import annotations

import re
from html import escape
from typing import TYPE_CHECKING

from grouter_pass.inspect.graph_text import side_by_side

if TYPE_CHECKING:
    from grouter_pass.inspect.report import ExplainReport

CONTEXT = 3   # unchanged rows shown around each change; the rest fold away

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #1b1f24; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #1a7f37; font-weight: 600; } .fail { color: #cf222e; font-weight: 600; }
table.graph { width: 100%; table-layout: fixed; font-family: ui-monospace, monospace; font-size: 12px; }
table.graph td { white-space: pre-wrap; word-break: break-all; border: none; border-bottom: 1px solid #eee; }
tr.removed td.left, tr.changed td.left { background: #ffebe9; }
tr.added td.right, tr.changed td.right { background: #dafbe1; }
tr.fold td { background: #f6f8fa; color: #57606a; }
summary { cursor: pointer; }
"""


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], *, cls: str = "",
           row_classes: list[str] | None = None, numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    out = [f'<table class="{cls}">' if cls else "<table>", "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header)
           + "</tr>"]
    for i, row in enumerate(rows):
        rc = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        cells = "".join(f'<td class="num">{escape(c)}</td>' if j in numeric else f"<td>{escape(c)}</td>"
                        for j, c in enumerate(row))
        out.append(f"<tr{rc}>{cells}</tr>")
    out.append("</table>")
    return "\n".join(out)


def site_anchor(module_path: str) -> str:
    """The id of a site's first changed row in the graph view (the sites table links to it)."""
    return "site-" + re.sub(r"[^A-Za-z0-9_-]+", "-", module_path or "root")


def _sites_of(line: str, sites: list[str]) -> list[str]:
    tag = line.rpartition("  # ")[2] if "  # " in line else ""
    return [p for p in sites if tag.endswith(f": {p}")]


def _graph_rows(before: list[str], after: list[str], sites: list[str] | None = None,
                anchored: set[str] | None = None) -> str:
    rows = side_by_side(before, after)
    changed = [i for i, r in enumerate(rows) if r[0] != "equal"]
    shown = {j for i in changed for j in range(i - CONTEXT, i + CONTEXT + 1)}
    out, folded = [], []
    sites = sites or []
    anchored = anchored if anchored is not None else set()

    def row_html(kind: str, left: str, right: str) -> str:
        ids = ""
        if kind != "equal":
            new = [p for p in _sites_of(left, sites) + _sites_of(right, sites) if p not in anchored]
            if new:
                anchored.update(new)
                ids = f' id="{site_anchor(new[0])}"'
        return (f'<tr class="{kind}"{ids}><td class="left">{escape(left)}</td>'
                f'<td class="right">{escape(right)}</td></tr>')

    def flush() -> None:
        if folded:
            out.append(f'<tr class="fold"><td colspan="2"><details><summary>{len(folded)} unchanged nodes'
                       f'</summary><table class="graph">{"".join(folded)}</table></details></td></tr>')
            folded.clear()

    for i, (kind, left, right) in enumerate(rows):
        if kind == "equal" and i not in shown:
            folded.append(row_html(kind, left, right))
            continue
        flush()
        out.append(row_html(kind, left, right))
    flush()
    return "\n".join(out)


def render_html(report: ExplainReport) -> str:
    """The whole page as a string."""
    parts = [f"<h1>grouter explain: {escape(report.model)} ({escape(report.mode)} mode)</h1>"]
    verdict = '<span class="ok">PASS</span>' if report.parity_ok else '<span class="fail">FAIL</span>'
    parts.append(f'<p id="summary">{len(report.sites)} gating site(s) found, {len(report.rewritten)} rewritten; '
                 f"parity {verdict} (max relative error &le; {report.tolerance:g}).</p>")
    if report.prepared:
        parts.append("<ul>" + "".join(f"<li>prepared before Dynamo: {escape(p)}</li>" for p in report.prepared)
                     + "</ul>")

    parts.append('<h2 id="sites">Sites</h2>')
    table = _table(("module", "family", "E", "k", "gating", "experts", "routing", "became"),
                   [r for r in report.site_rows()], cls="sites")
    for s in report.rewritten:   # each rewritten site links to its hunk in the graph view below
        cell = f"<td>{escape(s.module_path)}</td>"
        table = table.replace(cell, f'<td><a href="#{site_anchor(s.module_path)}">{escape(s.module_path)}</a></td>', 1)
    parts.append(table)

    if report.mode != "exact":
        parts.append(f'<h2 id="agreement">Routing agreement: {escape(report.mode)} routing vs the model\'s own '
                     "router</h2>")
        parts.append(_table(report.agreement_header(), report.agreement_rows(), cls="agreement", numeric={1, 2}))
        parts.append('<h2 id="changes">What else changed</h2><ul>'
                     + "".join(f"<li>{escape(c)}</li>" for c in report.changes) + "</ul>")
    parts.append('<h2 id="parity">Parity: rewritten vs original, forward and backward</h2>')
    parts.append(_table(report.parity_header(), [r[:-1] + ("ok" if r[-1] else "FAIL",) for r in report.parity_rows()],
                        cls="parity", row_classes=["" if r[-1] else "failrow" for r in report.parity_rows()],
                        numeric={2, 3}).replace("<td>FAIL</td>", '<td class="fail">FAIL</td>')
                 .replace("<td>ok</td>", '<td class="ok">ok</td>'))

    gb, ga = report.graphs_before, report.graphs_after
    parts.append('<h2 id="graphs">Graphs</h2>')
    parts.append(_table(("", "graphs", "graph breaks", "break reasons"),
                        [("before", str(gb.graphs), str(gb.breaks), "; ".join(gb.reasons) or "-"),
                         ("after", str(ga.graphs), str(ga.breaks), "; ".join(ga.reasons) or "-")]))
    parts.append('<h2 id="ops">Op counts (changed ops)</h2>')
    parts.append(_table(("op", "before", "after"), [(o, str(b), str(a)) for o, b, a in report.op_counts],
                        numeric={1, 2}))

    site_paths = [s.module_path for s in report.rewritten]
    anchored: set[str] = set()
    for d in report.diffs:
        parts.append(f'<h2 id="graph-{d.index}">Graph {d.index}: before / after'
                     + ("" if d.changed else " (unchanged)") + "</h2>")
        parts.append('<table class="graph"><colgroup><col style="width:50%"><col style="width:50%"></colgroup>'
                     "<tr><th>before</th><th>after</th></tr>" + _graph_rows(d.before, d.after, site_paths, anchored)
                     + "</table>")

    title = escape(f"grouter explain: {report.model}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
