"""User configuration: one dataclass, validated on construction, stable enough to hash.

The same :class:`GrouterConfig` drives every front door: ``apply_grouter(model, config)``,
``torch.compile(model, backend="grouter", options={...})`` (options are its field names) and
``GrouterPreGradPass(config)`` for ``backend="inductor"`` users. Because the config changes what
the pass does, it is part of the pass's cache key (:meth:`GrouterConfig.fingerprint`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class LearnedRouter:
    """Route with the model's own router: exact mode, same numbers as the original model."""

    kind: str = "learned"


from grouter_pass.routing_sources import GrouterRouting, HashRouting, PrecomputedRouting  # noqa: E402

RoutingSource = LearnedRouter | GrouterRouting | PrecomputedRouting | HashRouting
ROUTING_SOURCES = (LearnedRouter, GrouterRouting, PrecomputedRouting, HashRouting)
COMPILERS = ("inductor", "aot_eager", "eager")

# random expert weights the probe may draw per site (bytes); above it, it reads the model's own
DEFAULT_PROBE_WEIGHT_BUDGET = 256 * 2**20


@dataclass(frozen=True, kw_only=True)
class GrouterConfig:
    """What the grouter pass does and how the result is compiled.

    Attributes:
        routing: where routing decisions come from. ``LearnedRouter()`` (the default) keeps the
            model's router: the rewritten model computes the same function. ``GrouterRouting(g)``,
            ``PrecomputedRouting()`` and ``HashRouting(table)`` route every MoE layer with one
            routing computed once per step (:mod:`grouter_pass.routing_sources`): the model's routers and
            auxiliary router losses are removed from the graph.
        rewrite_modules: before compiling, make MoE layers whose expert loop would break the graph
            capturable, in place and without changing a number: transformers models using the
            ``eager`` experts implementation switch to the ``"grouter"`` one, and loop-style blocks
            found by structure get a forward written in the grouter ops (see
            ``integrations/loop_blocks/``). Only :func:`~grouter_pass.apply_grouter` does this (a
            backend sees graphs, not modules).
        probe: also compare gradients when proving a site (detection reads specs by running
            the site's subgraphs next to the ``grouter`` ops on random inputs; values are always
            compared). Off saves about a third of the compile-time cost of detection.
        probe_ops: run the real ``grouter`` ops in the probe (the default), so that a site is
            rewritten only when the op that will run in the compiled graph reproduces the model.
            Off, the probe runs the ops' reference semantics instead: the spec is still proved,
            but a defect in an op itself is compiled in and shows in the numbers. For testing
            the ops (a parity suite runs this way); never needed in use.
        probe_weight_budget: the most bytes of random expert weights the probe draws for one site
            (default 256 MiB). Larger layers are probed on the model's own weights, read in place
            and never written, so detection needs no copy of them; their gradients are then
            proved by structure (nothing between the weights and the output stops gradients).
            Weights that cannot tell experts apart (constant, identical upcycled experts) still
            get random copies, with a warning that names the size.
        verify: on the first call of each compiled graph, also run the original graph on the
            same inputs and raise :class:`~grouter_pass.api.GrouterVerificationError` naming
            every output that differs by more than ``verify_rtol`` / ``verify_atol``.
        verify_rtol, verify_atol: tolerances of ``verify`` (``None``: by dtype, 1e-5 relative
            for fp32, 2e-2 for bf16).
        disable_passes: names of pipeline passes to skip (see ``passes.build_pass_pipeline``).
        compiler: what compiles the rewritten graph: ``"inductor"`` (``compile_fx``, the
            default), ``"aot_eager"`` (AOT autograd with eager kernels: the same forward/backward
            graphs without code generation, fast to compile, for tests and debugging) or
            ``"eager"`` (run the rewritten Dynamo graph as is).
        inductor_options: Inductor config patches for ``compile_fx`` (as ``torch.compile``'s
            ``options``).
        dynamic, fullgraph: passed to ``torch.compile`` by :func:`~grouter_pass.apply_grouter`.
        expert_parallel: run every rewritten MoE site expert-parallel over this group: a 1-D
            ``DeviceMesh``, a mesh with an ``"ep"`` dimension (or that dimension), or a
            ``ProcessGroup``. Rank ``r`` computes the experts ``[r*E/R, (r+1)*E/R)`` (or its
            placement's) for the tokens of every rank, moved with the functional
            ``all_to_all_single``. Split sizes: per layer in exact mode; once per step, before the
            compiled graph, in Grouter / precomputed / hash modes (see ``docs/distributed.md``).
        expert_placement: a :class:`~grouter_pass.distributed.placement_file.Placement` (or the
            path of a placement file from ``grouter placement``): which logical experts each rank
            owns. Refused when made for another E or EP size.
    """

    routing: RoutingSource = field(default_factory=LearnedRouter)
    rewrite_modules: bool = True
    probe: bool = True
    probe_ops: bool = True
    probe_weight_budget: int = DEFAULT_PROBE_WEIGHT_BUDGET
    verify: bool = False
    verify_rtol: float | None = None
    verify_atol: float | None = None
    disable_passes: tuple[str, ...] = ()
    compiler: str = "inductor"
    inductor_options: dict[str, Any] = field(default_factory=dict)
    dynamic: bool | None = None
    fullgraph: bool = False
    expert_parallel: Any = None
    expert_placement: Any = None

    def __post_init__(self) -> None:
        if self.compiler not in COMPILERS:
            raise ValueError(f"compiler={self.compiler!r}; choose one of {COMPILERS}")
        if not isinstance(self.routing, ROUTING_SOURCES):
            raise ValueError(f"routing={self.routing!r}; use one of {[c.__name__ for c in ROUTING_SOURCES]}")
        if self.verify and not self.exact:
            raise ValueError(f"verify=True compares against the original model, which only exact mode "
                             f"reproduces; routing={self.routing.kind!r} changes the function by design")
        if isinstance(self.disable_passes, str) or not isinstance(self.disable_passes, (tuple, list)):
            raise ValueError(f"disable_passes must be a tuple of pass names, got {self.disable_passes!r}")
        object.__setattr__(self, "disable_passes", tuple(self.disable_passes))
        if self.expert_placement is not None and self.expert_parallel is None:
            raise ValueError("expert_placement is set but expert_parallel is None: a placement says which rank "
                             "owns each expert, so it needs the expert-parallel group")
        if self.expert_parallel is not None and self.verify:
            raise ValueError("verify=True runs the original graph on this rank's tokens alone; under "
                             "expert_parallel its experts need every rank, so verify is not available")
        if isinstance(self.expert_placement, (str, os.PathLike)):
            from grouter_pass.distributed.placement_file import load_placement

            object.__setattr__(self, "expert_placement", load_placement(self.expert_placement))
        if not isinstance(self.probe_weight_budget, int) or self.probe_weight_budget < 0:
            raise ValueError(f"probe_weight_budget must be a number of bytes >= 0, got {self.probe_weight_budget!r}")
        for name in ("verify_rtol", "verify_atol"):
            v = getattr(self, name)
            if v is not None and not v >= 0:
                raise ValueError(f"{name} must be >= 0, got {v!r}")

    @property
    def exact(self) -> bool:
        """True when the model's own router routes (the rewritten model is the same function)."""
        return isinstance(self.routing, LearnedRouter)

    @classmethod
    def from_options(cls, options: dict[str, Any] | None, base: GrouterConfig | None = None) -> GrouterConfig:
        """Build a config from ``torch.compile(..., options={...})`` (on top of ``base`` when
        given); unknown keys are an error that lists the known ones."""
        if not options:
            return base or cls()
        if isinstance(options, GrouterConfig):
            return options
        if "config" in options and len(options) == 1:
            return options["config"]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown grouter option(s) {unknown}; known options: {sorted(known)}")
        return dataclasses.replace(base, **options) if base is not None else cls(**options)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["routing"] = {"kind": self.routing.kind, "key": getattr(self.routing, "key", None)}
        d["disable_passes"] = list(self.disable_passes)
        d["expert_parallel"] = None if self.expert_parallel is None else repr(self.expert_parallel)
        d["expert_placement"] = (None if self.expert_placement is None
                                 else [int(e) for e in self.expert_placement.expert_perm])
        return d

    def fingerprint(self) -> str:
        """A stable hash of every field that changes the rewritten graph."""
        relevant = {k: v for k, v in self.to_dict().items() if k not in ("verify", "verify_rtol", "verify_atol")}
        blob = json.dumps(relevant, sort_keys=True, default=repr)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
