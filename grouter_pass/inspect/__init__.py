"""Inspection: what the pass matched, what it became, and proof that it is the same function.

``explain(model, *inputs)`` returns an :class:`ExplainReport` (text, HTML, JSON); the same
per-site lines and graph diffs appear inside ordinary compiles with ``TORCH_LOGS="grouter_pass"`` /
``TORCH_LOGS="+grouter_pass.inspect.diff"``; ``grouter diff`` is the command line.
"""

from importlib import import_module as _import_module
from typing import Any as _Any

_LAZY = {"explain": "grouter_pass.inspect.explain", "ExplainReport": "grouter_pass.inspect.report"}


def __getattr__(name: str) -> _Any:   # loaded on first use: ``grouter --help`` need not load the passes
    if name not in _LAZY:
        raise AttributeError(f"module 'grouter_pass.inspect' has no attribute {name!r}")
    value = getattr(_import_module(_LAZY[name]), name)
    globals()[name] = value
    return value

__all__ = ["ExplainReport", "explain"]
