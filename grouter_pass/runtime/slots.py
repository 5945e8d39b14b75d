"""Per-thread values keyed by an integer, set for the duration of a ``with`` block.

Why: opaque ops (``grouter.external_routing``, ``grouter.step_split_size``) read per-call state
that the caller computed outside the compiled graph (the step's routing, its split sizes). The
value must be visible only inside the call that set it, per thread, and restored afterwards
(nested calls of two compiled models in one step).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any


class KeyedSlots:
    """``with slots.holding(key, value): ... slots.get(key)``."""

    def __init__(self) -> None:
        self._local = threading.local()

    def _table(self) -> dict[int, Any]:
        table = getattr(self._local, "table", None)
        if table is None:
            table = self._local.table = {}
        return table

    @contextlib.contextmanager
    def holding(self, key: int, value: Any) -> Iterator[None]:
        table = self._table()
        missing = object()
        prev = table.get(key, missing)
        table[key] = value
        try:
            yield
        finally:
            if prev is missing:
                table.pop(key, None)
            else:
                table[key] = prev

    def get(self, key: int) -> Any:
        return self._table().get(key)
