"""Public entry points: :func:`apply_grouter`, :func:`prepare_model` and :func:`grouter_reports`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from grouter_pass.backend import GrouterBackend
from grouter_pass.config import GrouterConfig
from grouter_pass.integrations.loop_blocks import LoopBlockRewrite
from grouter_pass.spec import PassReport


@dataclass
class PrepareReport:
    """What :func:`prepare_model` changed before Dynamo."""

    experts_switched: list[str] = field(default_factory=list)
    loop_blocks: list[LoopBlockRewrite] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.experts_switched) or any(b.rewritten for b in self.loop_blocks)


def prepare_model(model: torch.nn.Module) -> PrepareReport:
    """Make the MoE layers of ``model`` whose expert loop breaks the graph capturable, in place,
    without changing a number (see ``GrouterConfig.rewrite_modules``). Call it before
    ``torch.compile(model, backend="grouter")``; :func:`apply_grouter` calls it for you."""
    from grouter_pass.integrations.loop_blocks import rewrite_loop_blocks
    from grouter_pass.integrations.transformers import use_grouter_experts

    report = PrepareReport(experts_switched=use_grouter_experts(model))
    report.loop_blocks = rewrite_loop_blocks(model)
    return report


def apply_grouter(model: torch.nn.Module, config: GrouterConfig | None = None, *, verify: bool | None = None,
                  mode: str | None = None) -> torch.nn.Module:
    """Compile ``model`` with the grouter pass and Inductor; returns the compiled model.

    Nothing is compiled until the first call. Each MoE gating site the pass finds is replaced
    by ``grouter.route`` / ``grouter.dispatch_plan`` / ``grouter.moe_experts``; everything else
    is left to Inductor. The model's code and weights are not modified; MoE layers whose expert
    loop would break the graph are first made capturable in place (:func:`prepare_model`,
    ``config.rewrite_modules``), which changes no number.

    Args:
        model: any ``nn.Module`` (or callable) containing MoE layers; no annotations needed.
        config: a :class:`GrouterConfig` (default: exact mode with probes).
        verify: shortcut for ``config.verify``: on the first call, also run the original graph
            and raise :class:`~grouter_pass.verify.GrouterVerificationError` naming each output
            that differs.
        mode: Inductor's mode, as for ``torch.compile`` (``"max-autotune"``, ``"reduce-overhead"``...).

    Example::

        model = apply_grouter(model, GrouterConfig(dynamic=True), verify=True)
        loss = model(input_ids).logits.sum(); loss.backward()
    """
    config = config or GrouterConfig()
    if verify is not None:
        config = dataclasses.replace(config, verify=verify)
    prepared = prepare_model(model) if config.rewrite_modules else PrepareReport()
    loops = [b.path for b in prepared.loop_blocks if b.rewritten]
    if loops and not config.exact:
        from grouter_pass.integrations.loop_blocks import restore_loop_blocks

        restore_loop_blocks(model)
        raise ValueError(f"{config.routing.kind} routing needs MoE layers the graph pass captures; the "
                         f"loop-style blocks {loops} are only supported in exact mode (LearnedRouter())")
    backend = GrouterBackend(config)
    compiled = torch.compile(model, backend=backend, dynamic=config.dynamic, fullgraph=config.fullgraph, mode=mode)
    compiled._grouter_backend = backend
    compiled._grouter_prepared = prepared
    return compiled


def grouter_reports(compiled: torch.nn.Module) -> list[PassReport]:
    """The pass reports of every graph compiled so far for a model returned by :func:`apply_grouter`
    (empty before its first call)."""
    backend = getattr(compiled, "_grouter_backend", None)
    if backend is None:
        raise TypeError("grouter_reports() takes a model returned by apply_grouter()")
    return backend.reports


def unused_parameters(compiled: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters the rewritten graphs no longer read (the routers, in Grouter modes)."""
    reports = grouter_reports(compiled)
    seen: dict[int, torch.nn.Parameter] = {}
    for r in reports:
        for p in r.unused_parameters:
            seen[id(p)] = p
    return list(seen.values())


def trainable_parameters(compiled: torch.nn.Module, *, freeze_unused: bool = True) -> list[torch.nn.Parameter]:
    """The parameters an optimizer should update: those of the model minus the ones the rewrite
    made unused (each MoE layer's router in Grouter, precomputed and hash modes).

    Call it after the first forward (the graphs are compiled then). With ``freeze_unused`` the
    unused ones also get ``requires_grad=False``, so nothing (weight decay, a grad-norm) touches
    them. Their ``.grad`` stays ``None`` either way.

    Example::

        fast = apply_grouter(model, GrouterConfig(routing=GrouterRouting(grouter)))
        fast(batch)                                           # compiles
        opt = torch.optim.AdamW(trainable_parameters(fast), lr=3e-4)
    """
    if not grouter_reports(compiled):
        raise RuntimeError("trainable_parameters() needs the compiled graphs: call the model once first")
    unused = {id(p) for p in unused_parameters(compiled)}
    if freeze_unused:
        for p in unused_parameters(compiled):
            p.requires_grad_(False)
    model = getattr(compiled, "_orig_mod", compiled)
    return [p for p in model.parameters() if id(p) not in unused and (p.requires_grad or not freeze_unused)]
