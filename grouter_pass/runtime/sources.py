"""The routing sources a compiled graph names by integer key.

Why a key: an op argument must be a plain value, so ``grouter.external_routing`` receives the
source's key and looks the source up here when it runs. Why weakly held: the source (possibly a
whole Grouter network) belongs to the configuration that made it; the compiled model's backend
holds that configuration, so the source lives exactly as long as something can still call the
graph, and a dropped configuration frees its network.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

_SOURCES: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_NEXT_KEY = itertools.count(1)


def register_source(source: Any) -> int:
    """A new key for ``source`` (held weakly)."""
    key = next(_NEXT_KEY)
    _SOURCES[key] = source
    return key


def source_of(key: int) -> Any:
    source = _SOURCES.get(key)
    if source is None:
        raise RuntimeError(f"routing source {key} is not registered in this process: either the configuration "
                           "that made it was freed while a graph still names it, or a graph compiled with a "
                           "Grouter routing source was reloaded from a cache in another process")
    return source


__all__ = ["register_source", "source_of"]
