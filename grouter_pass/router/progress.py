"""Progress of the long workflow commands (distill, tune, pre-dispatch), drawn by ``tqdm``.

A thin adapter: the training loops report *absolute* steps (they resume from a checkpoint, so the
bar starts at ``start``) with the step's tokens and metrics; tqdm draws elapsed time, ETA and the
metrics, and throughput in tokens/s is added to them. On a terminal the line is redrawn; in a log
file or CI (not a TTY) a line is written at most every ``log_every`` seconds.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm.auto import tqdm


class Progress:
    def __init__(self, total: int | None, desc: str, *, start: int = 0, enabled: bool = True,
                 stream: TextIO | None = None, log_every: float = 10.0, unit: str = "step") -> None:
        stream = stream or sys.stderr
        tty = hasattr(stream, "isatty") and stream.isatty()
        self._bar = tqdm(total=total, initial=start, desc=desc, unit=unit, file=stream, disable=not enabled,
                         mininterval=0.1 if tty else log_every, dynamic_ncols=tty, ascii=not tty)
        self._t0 = time.perf_counter()
        self._tokens = 0

    def update(self, step: int, *, tokens: int = 0, **metrics: float) -> None:
        """Record that ``step`` steps are done, ``tokens`` more tokens were processed."""
        self._tokens += tokens
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        postfix = {k: f"{v:.4g}" for k, v in metrics.items()}
        if self._tokens:
            postfix["tok/s"] = f"{self._tokens / elapsed:,.0f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        self._bar.close()
