"""Every environment variable the library reads, in one place.

They choose *which implementation* runs, never *what* is computed, so they are troubleshooting
switches rather than configuration (a configuration is a :class:`~grouter_pass.config.GrouterConfig`):

* ``GROUTER_KERNELS``: ``auto`` (default; the Triton kernels on CUDA, the CPU path on CPU),
  ``reference`` (the plain-PyTorch reference everywhere), ``triton`` (also send CPU tensors to
  the kernels; only under ``TRITON_INTERPRET=1``).
* ``TRITON_INTERPRET``: Triton's own switch for its CPU interpreter (how the kernel tests run
  without a GPU).
* ``GROUTER_TRITON_AUTOTUNE``: ``0`` turns the kernels' autotuning off.
* ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT`` (OpenMP's own): whether idle OpenMP threads sleep,
  which decides the CPU experts path (:func:`openmp_threads_sleep`).

All are read at each use (except where Triton itself decides at import). :func:`fingerprint` is
the part of every cache key that depends on them: a graph compiled under one setting is never
reused under another.
"""

from __future__ import annotations

import os

KERNEL_MODES = ("auto", "reference", "triton")


def kernels_mode() -> str:
    """``GROUTER_KERNELS``: auto, reference or triton."""
    mode = os.environ.get("GROUTER_KERNELS", "auto")
    if mode not in KERNEL_MODES:
        raise ValueError(f"GROUTER_KERNELS must be one of {KERNEL_MODES}, got {mode!r}")
    return mode


def triton_interpret() -> bool:
    """``TRITON_INTERPRET=1``: Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_autotune() -> bool:
    """``GROUTER_TRITON_AUTOTUNE`` (default on)."""
    return os.environ.get("GROUTER_TRITON_AUTOTUNE", "1") != "0"


def openmp_threads_sleep() -> bool:
    """Whether idle OpenMP threads sleep at once (``OMP_WAIT_POLICY=PASSIVE`` or
    ``GOMP_SPINCOUNT=0``) rather than spin for a while (OpenMP's default)."""
    return (os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"
            or os.environ.get("GOMP_SPINCOUNT", "").strip() == "0")


def fingerprint() -> str:
    """What the switches above make a compiled graph depend on (the kernel choice), for cache keys."""
    from grouter_pass.kernels import has_triton

    return f"kernels={kernels_mode()},interpret={int(triton_interpret())},triton={int(has_triton())}"
