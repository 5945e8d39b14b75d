"""The ``grouter`` Dynamo backend: run the pass pipeline on each Dynamo graph, then Inductor.

``torch.compile(model, backend="grouter")`` finds this module through the
``torch_dynamo_backends`` entry point (declared in ``pyproject.toml``), so it works in a fresh
process without importing ``grouter_pass`` first. ``options={...}`` are the field names of
:class:`~grouter_pass.config.GrouterConfig`; ``mode=`` is Inductor's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from grouter_pass._logging import log_report
from grouter_pass.config import GrouterConfig
from grouter_pass.passes import run_grouter_passes
from grouter_pass.spec import PassReport
from grouter_pass.verify import VerifyFirstCall

log = logging.getLogger(__name__)


def compile_with_grouter(gm: fx.GraphModule, example_inputs: Sequence[Any], config: GrouterConfig,
                         *, mode: str | None = None, reports: list[PassReport] | None = None,
                         graphs: list[tuple[fx.GraphModule, fx.GraphModule, PassReport]] | None = None) -> Callable:
    """Rewrite ``gm`` (a Dynamo graph) and compile it with Inductor (or not, per ``config``)."""
    new_gm, report = run_grouter_passes(gm, example_inputs, config)
    log_report(report, before=gm, after=new_gm)
    if torch.distributed.is_available():
        from grouter_pass.integrations.ddp import warn_if_split

        warn_if_split()
    if reports is not None:
        reports.append(report)
    if graphs is not None:
        graphs.append((gm, new_gm, report))
    if report.expert_parallel is not None:
        _allow_split_size_outputs(example_inputs)
    if config.compiler == "inductor":
        from torch._inductor.compile_fx import compile_fx

        from grouter_pass.integrations.inductor import KernelChoiceKey

        patches = dict(config.inductor_options)
        if mode and mode != "default":
            patches = {**torch._inductor.list_mode_options(mode, config.dynamic), **patches}
        patches["pre_grad_custom_pass"] = KernelChoiceKey(
            patches.get("pre_grad_custom_pass", torch._inductor.config.pre_grad_custom_pass))
        compiled = compile_fx(new_gm, list(example_inputs), config_patches=patches)
    elif config.compiler == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        compiled = aot_eager(new_gm, list(example_inputs))
    else:
        compiled = new_gm.forward
    if config.verify and report.changed:
        compiled = VerifyFirstCall(compiled, gm, report, config)
    if report.ep_step is not None:
        from grouter_pass.distributed.runtime import wrap_for_expert_parallel

        compiled = wrap_for_expert_parallel(compiled, report.ep_step)
    return compiled


def _allow_split_size_outputs(example_inputs: Sequence[Any]) -> None:
    """Let AOT autograd trace ``grouter.split_size`` / ``grouter.step_split_size``, whose fake
    implementations return fresh unbacked sizes (the all-to-all split sizes of expert
    parallelism). Dynamo allows such ops only under ``fullgraph=True``
    (``ShapeEnv(allow_dynamic_output_shape_ops=one_graph)``); the rewrite inserted them, so the
    frame's shape environment is told so, for this graph's compilation and the ones after it."""
    import dataclasses

    from torch._guards import detect_fake_mode

    mode = detect_fake_mode(list(example_inputs))
    env = getattr(mode, "shape_env", None)
    if env is not None and not env.settings.allow_dynamic_output_shape_ops:
        env.settings = dataclasses.replace(env.settings, allow_dynamic_output_shape_ops=True)


def grouter_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: dict | None = None,
                    mode: str | None = None) -> Callable:
    """Dynamo backend entry point (``backend="grouter"``)."""
    return compile_with_grouter(gm, example_inputs, GrouterConfig.from_options(options), mode=mode)


class GrouterBackend:
    """A backend bound to one config: ``torch.compile(model, backend=GrouterBackend(config))``.

    ``reports`` collects the :class:`~grouter_pass.spec.PassReport` of every graph it compiled,
    in order (Dynamo may compile a frame more than once: a recompile for new guards, or a
    restart of the trace, which ``dynamic=True`` triggers for models with float attributes).
    """

    def __init__(self, config: GrouterConfig | None = None, *, keep_graphs: bool = False) -> None:
        self.config = config or GrouterConfig()
        self.reports: list[PassReport] = []
        #: with ``keep_graphs``: ``(graph before, graph after, report)`` of every compile (inspection)
        self.graphs: list[tuple[fx.GraphModule, fx.GraphModule, PassReport]] | None = [] if keep_graphs else None

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], *, mode: str | None = None,
                 options: dict | None = None) -> Callable:
        """``mode`` / ``options`` are what ``torch.compile(..., mode=..., options=...)`` passes a
        callable backend: Inductor's mode, and config fields that override this backend's config."""
        config = GrouterConfig.from_options(options, base=self.config)
        return compile_with_grouter(gm, example_inputs, config, mode=mode, reports=self.reports, graphs=self.graphs)

    def __repr__(self) -> str:
        return f"GrouterBackend({self.config!r})"


def register_grouter_backend() -> None:
    """Register ``"grouter"`` with Dynamo when the entry point is not installed (e.g. a source
    checkout on ``PYTHONPATH``). With the entry point present, Dynamo registers it itself on first
    lookup, and registering here too would collide."""
    from importlib.metadata import entry_points

    from torch._dynamo.backends.registry import _BACKENDS, _COMPILER_FNS, register_backend

    if "grouter" in _COMPILER_FNS or entry_points(group="torch_dynamo_backends", name="grouter"):
        return
    if _BACKENDS.get("grouter") is None:
        register_backend(compiler_fn=grouter_backend, name="grouter")
