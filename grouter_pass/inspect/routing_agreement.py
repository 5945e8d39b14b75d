"""Grouter modes in the explain report: how far the new routing is from the model's own router.

A Grouter-mode rewrite is a different function by design, so instead of output/gradient parity
the report shows, per MoE layer, how the routing source's top-k sets compare with the top-k the
model's own router picks on the same inputs: the mean overlap ``|A ∩ B| / k`` and the fraction
of tokens whose sets are equal. Both routings are read while the rewritten graphs run (an
``fx.Interpreter`` records the ``grouter.route`` outputs of the exact rewrite and the
``grouter.external_routing`` output of the Grouter one), so nothing is re-implemented here.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from grouter_pass.config import GrouterConfig, LearnedRouter
from grouter_pass.passes import run_grouter_passes
from grouter_pass.passes.graph_utils import clean_module_path


@dataclass
class AgreementRow:
    site: str
    overlap: float       # mean |A ∩ B| / k over tokens
    exact: float         # fraction of tokens with the same set


def _recording_backend(config: GrouterConfig, records: list[tuple[str, torch.Tensor]]):
    def backend(gm: fx.GraphModule, example_inputs: Any):
        new_gm, _ = run_grouter_passes(gm, example_inputs, config)

        class Recorder(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                out = super().run_node(n)
                if n.target in (torch.ops.grouter.route.default, torch.ops.grouter.external_routing.default):
                    stack = n.meta.get("nn_module_stack") or {}
                    path = list(stack.values())[-1][0] if stack else "shared"
                    records.append((clean_module_path(str(path)), out[1].detach().clone()))
                return out

        return lambda *args: Recorder(new_gm).run(*args)
    return backend


def _routings(model: torch.nn.Module, config: GrouterConfig, call: Any) -> list[tuple[str, torch.Tensor]]:
    records: list[tuple[str, torch.Tensor]] = []
    compiled = torch.compile(copy.deepcopy(model), backend=_recording_backend(config, records),
                             isolate_recompiles=True)
    with torch.no_grad():
        call(compiled)
    return records


def routing_agreement(model: torch.nn.Module, config: GrouterConfig, call: Any) -> list[AgreementRow]:
    """Per site: overlap of the model's own top-k with the routing source's (``call(m)`` runs ``m``
    on the example inputs, inside any ``grouter_pass.routing`` block the source needs)."""
    exact = _routings(model, dataclasses.replace(config, routing=LearnedRouter(), compiler="eager"), call)
    shared = _routings(model, dataclasses.replace(config, compiler="eager"), call)
    if not shared:
        return []
    new_ids = shared[-1][1]
    rows = []
    for path, ids in exact:
        if ids.shape != new_ids.shape:
            continue
        a = torch.sort(ids, dim=-1).values
        b = torch.sort(new_ids, dim=-1).values
        inter = (ids.unsqueeze(-1) == new_ids.unsqueeze(-2)).any(-1).sum(-1).float()
        rows.append(AgreementRow(path, float((inter / ids.shape[-1]).mean()), float((a == b).all(-1).float().mean())))
    return rows
