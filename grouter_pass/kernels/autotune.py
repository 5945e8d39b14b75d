"""Autotuning switch and launch-configuration tables of the grouter Triton kernels.

Why a switch: autotuning benchmarks every config on the first call of each (E, k, H, I) key,
which costs seconds on a GPU and makes the first step's timing and memory use unrepresentative;
CI, the interpreter and users who want reproducible launches turn it off and get the first
(default) config of each table instead.

Troubleshooting: ``GROUTER_TRITON_AUTOTUNE=0`` (read at each launch) or
:func:`set_autotune` ``(False)`` disables autotuning; under ``TRITON_INTERPRET=1`` it is always
off (the interpreter runs the kernels on the CPU, where timing configs means nothing).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from grouter_pass import env

log = logging.getLogger(__name__)

_override: bool | None = None

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); the first row is the default when
# autotuning is off. Grouped GEMMs over tokens: BLOCK_M tiles an expert's rows.
GEMM_CONFIGS: tuple[tuple[int, int, int, int, int], ...] = (
    (128, 128, 64, 8, 3),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (128, 256, 64, 8, 3),
    (64, 64, 64, 4, 3),
    (128, 128, 32, 4, 4),
)
# Weight gradients reduce over an expert's rows (BLOCK_K tiles rows); M, N tile the weight.
DW_CONFIGS: tuple[tuple[int, int, int, int, int], ...] = (
    (128, 128, 64, 8, 3),
    (64, 128, 64, 4, 4),
    (128, 64, 32, 4, 4),
    (64, 64, 64, 4, 3),
)
# Smallest legal tiles, used under the interpreter so that tests with tiny shapes still cross
# block boundaries (sizes not a multiple of the block).
INTERPRET_CONFIG = (16, 32, 32, 1, 1)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return env.triton_interpret()


def autotune_enabled() -> bool:
    """Whether launchers autotune (see the module docstring for the switches)."""
    if interpreting():
        return False
    if _override is not None:
        return _override
    return env.triton_autotune()


def set_autotune(enabled: bool | None) -> None:
    """Force autotuning on or off for this process; ``None`` returns to the environment's choice."""
    global _override
    _override = enabled


@contextlib.contextmanager
def autotune(enabled: bool) -> Iterator[None]:
    """Context manager form of :func:`set_autotune` that restores the previous setting."""
    global _override
    before = _override
    _override = enabled
    try:
        yield
    finally:
        _override = before


def default_config(table: tuple[tuple[int, int, int, int, int], ...]) -> tuple[int, int, int, int, int]:
    """The config used when autotuning is off."""
    return INTERPRET_CONFIG if interpreting() else table[0]


def triton_configs(table: tuple[tuple[int, int, int, int, int], ...]) -> list:
    """``triton.Config`` objects of a table (imported lazily: this module must load without Triton)."""
    import triton

    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in table]
