"""Which implementation an op call runs: the Triton kernels or the plain-torch reference.

Why here and not in the ops: the three ops and the graph pass that picks their Triton twins
(``passes/select_kernels.py``) must agree, and
the choice must never change CPU numerics by accident. ``auto`` (default) uses the kernels on
CUDA tensors when Triton is installed and the configuration is fused
(:func:`grouter_pass.kernels.moe.unsupported_reason`); on CPU the expert-queue path of
:mod:`grouter_pass.ops.cpu_experts` where it applies and idle OpenMP threads sleep
(:func:`use_cpu_experts`); the reference otherwise.

Troubleshooting: ``GROUTER_KERNELS=reference`` forces the reference everywhere (escape hatch
for a suspected kernel or CPU-path bug); ``GROUTER_KERNELS=triton`` also sends CPU tensors to the kernels,
which only works under ``TRITON_INTERPRET=1`` (how the kernel tests run on machines without a
GPU). tf32 GEMMs follow ``torch.backends.cuda.matmul.allow_tf32`` (off by default).
"""

from __future__ import annotations

import functools
import logging

import torch

from grouter_pass import env

log = logging.getLogger(__name__)

def kernels_mode() -> str:
    """``GROUTER_KERNELS``: auto, reference or triton (read at each call; :mod:`grouter_pass.env`)."""
    return env.kernels_mode()


def _interpreting() -> bool:
    return env.triton_interpret()


def kernels_available_for(t: torch.Tensor) -> bool:
    """Whether the Triton kernels may run on ``t``'s device."""
    from grouter_pass.kernels import has_triton

    mode = kernels_mode()
    if mode == "reference" or not has_triton():
        return False
    return t.device.type == "cuda" or (mode == "triton" and _interpreting() and t.device.type == "cpu")


@functools.cache
def _log_fallback(reason: str) -> None:
    log.warning("grouter.moe_experts runs the reference implementation: %s", reason)


def use_moe_kernels(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, *, activation: str,
                    weight_on_input: bool) -> bool:
    """Whether ``moe_experts`` (and its backward) run the fused kernels for these inputs."""
    if not kernels_available_for(x):
        return False
    from grouter_pass.kernels.moe import unsupported_reason

    reason = unsupported_reason(x, w_up, w_down, activation=activation, weight_on_input=weight_on_input)
    if reason is not None:
        _log_fallback(reason)
        return False
    return True


def use_cpu_experts(x: torch.Tensor, weights: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, *,
                    weight_on_input: bool) -> bool:
    """Whether ``moe_experts`` on CPU runs the expert-queue path of
    :mod:`grouter_pass.ops.cpu_experts` rather than the reference's multi-threaded ATen calls.

    Chosen by measurement (``examples/benchmarks/bench_cpu_paths.py``, docs/performance.md, 2
    cores, fwd+bwd of one MoE block): where idle OpenMP threads sleep (``OMP_WAIT_POLICY=PASSIVE``)
    every short parallel region of the reference pays a thread wake-up and the queue path is
    1.4-2.3x faster; at OpenMP's default (threads spin a while before sleeping, what users run)
    the spinning team competes with the queue's threads for the cores: the reference is 1.8x
    faster on small blocks and within 5% on larger ones, so it runs there."""
    from grouter_pass.ops import cpu_experts

    return (kernels_mode() != "reference" and env.openmp_threads_sleep()
            and cpu_experts.supported(x, weights, w_up, w_down, weight_on_input))


def allow_tf32() -> bool:
    """The user's opt-in to tf32 GEMMs (torch's own flag)."""
    return bool(torch.backends.cuda.matmul.allow_tf32)
