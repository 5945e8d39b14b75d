"""Inspection: what the pass matched, what it became, and proof that it is the same function.

``explain(model, *inputs)`` returns an :class:`ExplainReport` (text, HTML, JSON); the same
per-site lines and graph diffs appear inside ordinary compiles with ``TORCH_LOGS="grouter"`` /
``TORCH_LOGS="grouter_diff"``; ``grouter diff`` is the command line.
"""

from grouter_pass.inspect.explain import explain
from grouter_pass.inspect.report import ExplainReport

__all__ = ["ExplainReport", "explain"]
