"""The explain report: what was matched, what it became, and whether it is the same function.

:class:`ExplainReport` is plain data (``to_dict`` / ``to_json`` for machines) with a text
rendering for terminals (``str(report)``, optionally coloured) and an HTML one (``html.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from grouter_pass.numerics import Comparison
from grouter_pass.spec import SiteReport


@dataclass
class GraphDiff:
    """One Dynamo graph before and after the pass."""

    index: int
    before: list[str]
    after: list[str]
    unified: str

    @property
    def changed(self) -> bool:
        return self.before != self.after


@dataclass
class ParityRow:
    name: str          # "output", "grad[input x]", "grad[model.layers.0.mlp.gate.weight]"
    shape: list[int]
    max_abs: float
    max_rel: float
    ok: bool

    @classmethod
    def of(cls, name: str, shape: list[int], c: Comparison, tolerance: float) -> ParityRow:
        return cls(name, shape, c.max_abs, c.max_rel, bool(c.ok and c.max_rel <= tolerance))


@dataclass
class GraphCounts:
    graphs: int
    breaks: int
    reasons: list[str] = field(default_factory=list)


@dataclass
class ExplainReport:
    model: str
    mode: str                                  # "exact" (the model's own router)
    sites: list[SiteReport]
    diffs: list[GraphDiff]
    op_counts: list[tuple[str, int, int]]      # (op, before, after), changed ops only
    graphs_before: GraphCounts
    graphs_after: GraphCounts
    parity: list[ParityRow]
    tolerance: float
    prepared: list[str] = field(default_factory=list)   # pre-Dynamo module rewrites, one line each
    #: Grouter modes: per-site agreement of the routing source with the model's own router, and
    #: what the rewrite changed besides the routing (unused router parameters, removed losses)
    agreement: list[Any] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)

    # ---- summaries -------------------------------------------------------------------------
    @property
    def rewritten(self) -> list[SiteReport]:
        return [s for s in self.sites if s.rewritten]

    @property
    def parity_ok(self) -> bool:
        return all(r.ok for r in self.parity)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "mode": self.mode, "tolerance": self.tolerance, "parity_ok": self.parity_ok,
            "sites": [s.to_dict() for s in self.sites],
            "prepared": list(self.prepared),
            "graphs": {"before": vars(self.graphs_before), "after": vars(self.graphs_after)},
            "op_counts": [{"op": o, "before": b, "after": a} for o, b, a in self.op_counts],
            "parity": [vars(r) for r in self.parity],
            "agreement": [vars(a) for a in self.agreement], "changes": list(self.changes),
            "diffs": [{"graph": d.index, "unified": d.unified} for d in self.diffs],
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **{"indent": 2, **kwargs})

    # ---- rows shared by the text and HTML renderings ----------------------------------------
    def site_rows(self) -> list[tuple[str, ...]]:
        rows = []
        for s in self.sites:
            g = s.gating
            where = f" ({s.step} at node {s.node})" if s.step and s.node else (f" ({s.step})" if s.step else "")
            became = " + ".join(op.removeprefix("grouter.") for op in s.new_ops) if s.rewritten else \
                f"unchanged{where}: {s.reason}"
            routing = ("learned (exact)" if self.mode == "exact" else self.mode) if s.rewritten else "-"
            rows.append((s.module_path, s.family if g else "-", str(g.num_experts) if g else "-",
                         str(g.top_k) if g else "-", g.describe() if g else "-",
                         s.experts.describe() if s.experts else "-", routing, became))
        return rows

    @staticmethod
    def agreement_header() -> tuple[str, ...]:
        return ("site", "mean top-k overlap", "same top-k set")

    def agreement_rows(self) -> list[tuple[str, ...]]:
        return [(a.site, f"{a.overlap:.1%}", f"{a.exact:.1%}") for a in self.agreement]

    @staticmethod
    def parity_header() -> tuple[str, ...]:
        return ("tensor", "shape", "max abs err", "max rel err", "")

    def parity_rows(self, numbers: bool = True) -> list[tuple[str, str, str, str, bool]]:
        return [(r.name, str(r.shape), f"{r.max_abs:.2e}" if numbers else "-",
                 f"{r.max_rel:.2e}" if numbers else "-", r.ok) for r in self.parity]

    # ---- text -------------------------------------------------------------------------------
    def render_text(self, *, color: bool = False, numbers: bool = True, diff: bool = True) -> str:
        """The report as text. ``numbers=False`` prints pass/fail instead of measured errors
        (stable across machines, for snapshots)."""
        c = _Colors(color)
        out = [c.bold(f"grouter explain: {self.model} ({self.mode} mode)")]
        out += [f"  prepared before Dynamo: {line}" for line in self.prepared]
        out.append("")
        out.append(c.bold(f"Sites: {len(self.sites)} found, {len(self.rewritten)} rewritten"))
        out += _table([("module", "family", "E", "k", "gating", "experts", "routing", "became"),
                       *self.site_rows()])
        out.append("")
        gb, ga = self.graphs_before, self.graphs_after
        out.append(c.bold(f"Graphs: {gb.graphs} ({gb.breaks} breaks) before -> {ga.graphs} ({ga.breaks} breaks) after"))
        for label, counts in (("before", gb), ("after", ga)):
            out += [f"  break {label}: {r}" for r in counts.reasons]
        out.append("")
        out.append(c.bold("Op counts (changed ops)"))
        out += _table([("op", "before", "after")] + [(o, str(b), str(a)) for o, b, a in self.op_counts])
        out.append("")
        if self.mode != "exact":
            out.append(c.bold(f"Routing agreement: {self.mode} routing vs the model's own router (top-k sets)"))
            out += _table([self.agreement_header(), *self.agreement_rows()])
            out.append("")
            out.append(c.bold("What else changed"))
            out += [f"  {line}" for line in self.changes] or ["  (nothing)"]
            if diff:
                for d in self.diffs:
                    out.append("")
                    out.append(c.bold(f"Diff of graph {d.index}" + ("" if d.changed else " (unchanged)")))
                    out += [c.diff_line(line) for line in d.unified.splitlines()]
            return "\n".join(out)
        verdict = c.green("PASS") if self.parity_ok else c.red("FAIL")
        out.append(c.bold(f"Parity, rewritten vs original, forward and backward: {verdict} "
                          f"(max rel err <= {self.tolerance:g})"))
        prow = [self.parity_header()]
        for name, shape, max_abs, max_rel, ok in self.parity_rows(numbers):
            prow.append((name, shape, max_abs, max_rel, c.green("ok") if ok else c.red("FAIL")))
        out += _table(prow)
        if diff:
            for d in self.diffs:
                out.append("")
                out.append(c.bold(f"Diff of graph {d.index}" + ("" if d.changed else " (unchanged)")))
                out += [c.diff_line(line) for line in d.unified.splitlines()]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.render_text()

    def to_html(self) -> str:
        """A self-contained HTML page (side-by-side graphs, site and parity tables)."""
        from grouter_pass.inspect.html import render_html

        return render_html(self)

    def _repr_html_(self) -> str:  # notebooks
        return self.to_html()


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    if len(rows) <= 1:
        return ["  (none)"]
    widths = [max(_visible_len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [cell + " " * (w - _visible_len(cell)) for cell, w in zip(r, widths)]
        lines.append(("  " + "  ".join(cells)).rstrip())
    return lines


def _visible_len(s: str) -> int:
    import re

    return len(re.sub(r"\x1b\[[0-9;]*m", "", s))


class _Colors:
    def __init__(self, on: bool) -> None:
        self.on = on

    def _wrap(self, code: str, s: str) -> str:
        return f"\x1b[{code}m{s}\x1b[0m" if self.on else s

    def bold(self, s: str) -> str:
        return self._wrap("1", s)

    def green(self, s: str) -> str:
        return self._wrap("32", s)

    def red(self, s: str) -> str:
        return self._wrap("31", s)

    def diff_line(self, line: str) -> str:
        if line.startswith("+") and not line.startswith("+++"):
            return self.green(line)
        if line.startswith("-") and not line.startswith("---"):
            return self.red(line)
        if line.startswith("@@"):
            return self._wrap("36", line)
        return line
