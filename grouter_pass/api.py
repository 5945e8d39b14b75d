"""Public entry points: :func:`apply_grouter` and :func:`grouter_reports`."""

from __future__ import annotations

import dataclasses

import torch

from grouter_pass.backend import GrouterBackend
from grouter_pass.config import GrouterConfig
from grouter_pass.spec import PassReport


def apply_grouter(model: torch.nn.Module, config: GrouterConfig | None = None, *, verify: bool | None = None
                  ) -> torch.nn.Module:
    """Compile ``model`` with the grouter pass and Inductor; returns the compiled model.

    Nothing is compiled until the first call. Each MoE gating site the pass finds is replaced
    by ``grouter.route`` / ``grouter.dispatch_plan`` / ``grouter.moe_experts``; everything else
    is left to Inductor. The model object itself is not modified.

    Args:
        model: any ``nn.Module`` (or callable) containing MoE layers; no annotations needed.
        config: a :class:`GrouterConfig` (default: exact mode with probes).
        verify: shortcut for ``config.verify``: on the first call, also run the original graph
            and raise :class:`~grouter_pass.verify.GrouterVerificationError` naming each output
            that differs.

    Example::

        model = apply_grouter(model, GrouterConfig(dynamic=True), verify=True)
        loss = model(input_ids).logits.sum(); loss.backward()
    """
    config = config or GrouterConfig()
    if verify is not None:
        config = dataclasses.replace(config, verify=verify)
    backend = GrouterBackend(config)
    compiled = torch.compile(model, backend=backend, dynamic=config.dynamic, fullgraph=config.fullgraph)
    compiled._grouter_backend = backend
    return compiled


def grouter_reports(compiled: torch.nn.Module) -> list[PassReport]:
    """The pass reports of every graph compiled so far for a model returned by :func:`apply_grouter`
    (empty before its first call)."""
    backend = getattr(compiled, "_grouter_backend", None)
    if backend is None:
        raise TypeError("grouter_reports() takes a model returned by apply_grouter()")
    return backend.reports
