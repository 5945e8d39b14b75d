"""Triton kernels of the grouter ops (dispatch plan, fused grouped GEMMs, their backward).

Importing this package does not import Triton: :func:`has_triton` says whether the kernels can
be loaded, and the submodules (``dispatch_kernels``, ``grouped_gemm_kernels``,
``grouped_gemm_backward_kernels``, ``moe``) import it themselves; ``autotune`` holds the
configs and the switch that disables autotuning. The plain-torch twin of every launcher, the
kernel tests' oracle, is ``tests/kernels/interpreted/twins.py``. The ops in
:mod:`grouter_pass.ops` choose between these kernels (CUDA) and the reference path (CPU).
"""

from __future__ import annotations

import functools
import importlib.util


@functools.cache
def has_triton() -> bool:
    """True when Triton is installed (the kernels also need a CUDA device or ``TRITON_INTERPRET=1``)."""
    return importlib.util.find_spec("triton") is not None


__all__ = ["has_triton"]
