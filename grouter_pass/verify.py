"""``verify=True``: run the original graph next to the rewritten one on the first call.

The check is per output of the Dynamo graph (the model's outputs and anything Dynamo returns
from the graph), forward only, with the tolerances of :mod:`grouter_pass.numerics`. Inputs the
graph mutates in place are cloned for the reference run so they are not mutated twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from grouter_pass.config import GrouterConfig
from grouter_pass.numerics import compare
from grouter_pass.passes.graph_utils import is_view, mutated_arg
from grouter_pass.spec import PassReport


class GrouterVerificationError(RuntimeError):
    """The rewritten graph's outputs differ from the original graph's."""


def _mutated_placeholders(gm: fx.GraphModule) -> set[int]:
    """Indices of the graph inputs that some in-place node writes to (directly or via a view)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index = {n: i for i, n in enumerate(placeholders)}
    out = set()
    for n in gm.graph.nodes:
        base = mutated_arg(n)
        while base is not None and base.op in ("call_method", "call_function") and is_view(base):
            base = base.args[0] if isinstance(base.args[0], fx.Node) else None
        if base in index:
            out.add(index[base])
    return out


class VerifyFirstCall:
    """Wraps a compiled graph; the first call also runs ``original`` and compares outputs."""

    def __init__(self, compiled: Callable, original: fx.GraphModule, report: PassReport,
                 config: GrouterConfig) -> None:
        self.compiled = compiled
        self.original = original
        self.report = report
        self.config = config
        self.checked = False
        self._mutated = _mutated_placeholders(original)

    def __call__(self, *args: Any) -> Any:
        if self.checked:
            return self.compiled(*args)
        self.checked = True
        flat = list(args)  # Dynamo calls backend callables with the flat graph inputs
        ref_inputs = [a.clone() if i in self._mutated and isinstance(a, torch.Tensor) else a
                      for i, a in enumerate(flat)]
        with torch.no_grad():
            expected = self.original(*ref_inputs)
        actual = self.compiled(*args)
        self._check(actual, expected)
        return actual

    def _check(self, actual: Any, expected: Any) -> None:
        got, want = pytree.tree_leaves(actual), pytree.tree_leaves(expected)
        if len(got) != len(want):
            raise GrouterVerificationError(f"rewritten graph returned {len(got)} outputs, original {len(want)}")
        failures, rows = [], []
        for i, (a, e) in enumerate(zip(got, want)):
            if not isinstance(e, torch.Tensor):
                continue
            c = compare(a.detach(), e.detach(), rtol=self.config.verify_rtol, atol=self.config.verify_atol)
            rows.append({"output": i, "dtype": str(e.dtype).removeprefix("torch."), "shape": list(e.shape),
                         "ok": c.ok, "comparison": str(c)})
            if not c.ok:
                failures.append(f"  output {i} {str(e.dtype).removeprefix('torch.')}{list(e.shape)}: {c}")
        from grouter_pass._logging import trace_artifact

        trace_artifact("grouter_parity", lambda: {"rtol": self.config.verify_rtol, "atol": self.config.verify_atol,
                                                  "outputs": rows})
        if failures:
            sites = "\n".join(f"  {s.summary()}" for s in self.report.rewritten)
            raise GrouterVerificationError(
                "grouter verify: the rewritten graph differs from the original\n" + "\n".join(failures)
                + "\nrewritten sites:\n" + sites)
