"""Public entry points: :func:`apply_grouter`."""

from __future__ import annotations

import dataclasses

import torch

from grouter_pass.backend import GrouterBackend
from grouter_pass.config import GrouterConfig


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
    return torch.compile(model, backend=GrouterBackend(config), dynamic=config.dynamic, fullgraph=config.fullgraph)
