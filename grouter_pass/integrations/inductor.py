"""The pass for users who stay on ``backend="inductor"``: a ``pre_grad_custom_pass``.

Usage::

    torch.compile(model, options={"pre_grad_custom_pass": GrouterPreGradPass()})
    # or, process-wide:
    with torch._inductor.config.patch(pre_grad_custom_pass=GrouterPreGradPass()): ...

Inductor calls the pass with the Dynamo graph (``graph.owning_module`` is the GraphModule),
before autograd, once per graph. :meth:`uuid` hashes the source of every file that decides the
rewrite plus the config, so Inductor's FX graph cache stays enabled and is invalidated exactly
when the pass could produce a different graph.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

import grouter_pass
from grouter_pass import env
from grouter_pass._logging import log_report
from grouter_pass.config import GrouterConfig
from grouter_pass.passes import run_grouter_passes
from grouter_pass.passes.graph_utils import replace_graph_contents

log = logging.getLogger(__name__)


def _pass_source_files() -> tuple[Path, ...]:
    import grouter_pass.passes as passes

    roots = [Path(passes.__file__).parent, Path(grouter_pass.__file__).parent / "ops"]
    files = [p for r in roots for p in sorted(r.rglob("*.py"))]
    pkg = Path(grouter_pass.__file__).parent
    files += [pkg / "spec.py", pkg / "config.py"]
    return tuple(files)


class GrouterPreGradPass(CustomGraphPass):
    """``torch._inductor.config.pre_grad_custom_pass`` running the grouter pipeline in place."""

    def __init__(self, config: GrouterConfig | None = None) -> None:
        self.config = config or GrouterConfig()
        self._files_hash: str | None = None

    def __call__(self, graph: fx.Graph) -> None:
        gm = graph.owning_module
        new_gm, report = run_grouter_passes(gm, None, self.config)
        log_report(report, before=gm, after=new_gm)  # gm is still the original here
        if torch.distributed.is_available():
            from grouter_pass.integrations.ddp import warn_if_split

            warn_if_split()
        if report.changed:
            replace_graph_contents(graph, new_gm.graph)
            gm.recompile()

    def uuid(self) -> str:
        """The pass's source, its config and the kernel switches (``grouter_pass.env``): the pass
        writes the grouter ops or their Triton twins into the graph by those switches, so a graph
        cached under one setting must not be reused under another."""
        if self._files_hash is None:
            self._files_hash = get_hash_for_files(_pass_source_files()).hex()
        return f"{self._files_hash}-{self.config.fingerprint()}-{env.fingerprint()}"


class KernelChoiceKey(CustomGraphPass):
    """The pre-grad slot of an Inductor compile that the grouter backend starts: runs the user's
    own ``pre_grad_custom_pass`` (if any) and adds the kernel choice to its cache key, so the
    FX graph cache never serves a graph lowered for another ``GROUTER_KERNELS`` setting."""

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner

    def __call__(self, graph: fx.Graph) -> None:
        if self.inner is not None:
            self.inner(graph)

    def uuid(self) -> str | None:
        if self.inner is None:
            return f"no-pre-grad-pass-{env.fingerprint()}"
        inner = self.inner.uuid() if isinstance(self.inner, CustomGraphPass) else None
        return None if inner is None else f"{inner}-{env.fingerprint()}"   # None: Inductor bypasses the cache
