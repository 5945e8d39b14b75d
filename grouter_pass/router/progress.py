"""A small progress bar on stderr (no dependency): step count, loss, tokens/s, ETA.

On a terminal it redraws one line; otherwise (logs, CI) it prints a line at most every
``log_every`` seconds so long runs stay readable in a file.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, desc: str, *, start: int = 0, enabled: bool = True, stream: TextIO | None = None,
                 log_every: float = 10.0) -> None:
        self.total, self.desc, self.step, self.enabled = total, desc, start, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.log_every = log_every
        self._t0 = time.perf_counter()
        self._start = start
        self._tokens = 0
        self._last_print = 0.0

    def update(self, step: int, *, tokens: int = 0, **metrics: float) -> None:
        """Record that ``step`` steps are done, ``tokens`` more tokens were processed."""
        self.step = step
        self._tokens += tokens
        if not self.enabled:
            return
        now = time.perf_counter()
        if not self.tty and now - self._last_print < self.log_every and step < self.total:
            return
        self._last_print = now
        elapsed = max(now - self._t0, 1e-9)
        done = step - self._start
        eta = (self.total - step) * elapsed / done if done else 0.0
        width = 24
        fill = int(width * step / max(self.total, 1))
        bar = "#" * fill + "." * (width - fill)
        parts = [f"{k} {v:.4g}" for k, v in metrics.items()]
        parts.append(f"{self._tokens / elapsed:,.0f} tok/s")
        line = f"{self.desc} [{bar}] {step}/{self.total} " + " | ".join(parts) + f" | eta {eta:.0f}s"
        self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
