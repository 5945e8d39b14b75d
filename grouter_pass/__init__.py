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

from grouter_pass import ops  # noqa: F401  (registers torch.ops.grouter.*)
from grouter_pass.api import (
    PrepareReport,
    apply_grouter,
    grouter_reports,
    prepare_model,
    trainable_parameters,
    unused_parameters,
)
from grouter_pass.backend import GrouterBackend, grouter_backend, register_grouter_backend
from grouter_pass.config import GrouterConfig, LearnedRouter
from grouter_pass.inspect import ExplainReport, explain
from grouter_pass.integrations.inductor import GrouterPreGradPass
from grouter_pass.routing import GrouterRouting, HashRouting, PrecomputedRouting, routing
from grouter_pass.spec import ActivationSpec, ExpertsSpec, GatingSpec, PassReport, SiteReport
from grouter_pass.verify import GrouterVerificationError

register_grouter_backend()

__version__ = "0.1.0"

__all__ = [
    "ActivationSpec",
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
