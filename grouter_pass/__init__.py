"""grouter-pass: find MoE gating in any PyTorch model and rewrite it into a decoupled router plus
a precomputed dispatch plan (Grouter, arXiv 2603.06626), as a torch.compile / FX graph pass.

Front doors::

    torch.compile(model, backend="grouter")                  # Dynamo backend (entry point)
    apply_grouter(model, GrouterConfig(...), verify=True)    # the same, with a config object
    torch.compile(model, options={"pre_grad_custom_pass": GrouterPreGradPass()})  # stay on Inductor

The data flow is visible in the layout: ``passes/`` (canonicalize -> detect -> rewrite, installed
as ``grouter_pass.passes``) turns Dynamo graphs into calls of the ``torch.ops.grouter`` ops defined
in ``grouter_pass/ops``; ``grouter_pass/backend.py`` hands the result to Inductor.
"""

from importlib import import_module as _import_module
from typing import Any as _Any

from grouter_pass import ops  # noqa: F401  (registers torch.ops.grouter.*)
from grouter_pass.routing_sources import GrouterRouting, HashRouting, PrecomputedRouting
from grouter_pass.runtime import routing

__version__ = "0.1.0"

# The public names, loaded on first use: importing the package registers the ops (that needs
# torch) but not the graph passes and Dynamo (another few seconds), so ``grouter --help`` and
# the workflow commands that never compile start fast.
_LAZY = {
    "PrepareReport": "grouter_pass.api", "apply_grouter": "grouter_pass.api", "grouter_reports": "grouter_pass.api",
    "prepare_model": "grouter_pass.api", "trainable_parameters": "grouter_pass.api",
    "unused_parameters": "grouter_pass.api",
    "GrouterBackend": "grouter_pass.backend", "grouter_backend": "grouter_pass.backend",
    "register_grouter_backend": "grouter_pass.backend",
    "GrouterConfig": "grouter_pass.config", "LearnedRouter": "grouter_pass.config",
    "ExplainReport": "grouter_pass.inspect", "explain": "grouter_pass.inspect",
    "GrouterPreGradPass": "grouter_pass.integrations.inductor",
    "ActivationSpec": "grouter_pass.spec", "ExpertMLP": "grouter_pass.spec", "ExpertsSpec": "grouter_pass.spec",
    "GatingSpec": "grouter_pass.spec",
    "PassReport": "grouter_pass.spec", "SiteReport": "grouter_pass.spec",
    "GrouterVerificationError": "grouter_pass.verify",
}


def __getattr__(name: str) -> _Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'grouter_pass' has no attribute {name!r}")
    value = getattr(_import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def _register_backend_without_entry_point() -> None:
    """``backend="grouter"`` comes from the package's entry point; a source checkout on
    ``PYTHONPATH`` has none, so register the name with Dynamo here (that loads the passes)."""
    from importlib.metadata import entry_points

    if not entry_points(group="torch_dynamo_backends", name="grouter"):
        _import_module("grouter_pass.backend").register_grouter_backend()


_register_backend_without_entry_point()
_import_module("grouter_pass.integrations.transformers").register_experts_implementation()

__all__ = [
    "ActivationSpec",
    "ExpertMLP",
    "ExpertsSpec",
    "ExplainReport",
    "GatingSpec",
    "GrouterBackend",
    "GrouterConfig",
    "GrouterPreGradPass",
    "GrouterRouting",
    "GrouterVerificationError",
    "HashRouting",
    "PrecomputedRouting",
    "LearnedRouter",
    "PassReport",
    "PrepareReport",
    "SiteReport",
    "apply_grouter",
    "explain",
    "grouter_backend",
    "grouter_reports",
    "prepare_model",
    "routing",
    "trainable_parameters",
    "unused_parameters",
]
