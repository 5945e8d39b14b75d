"""Run-time, per-call state: what the compiled graph's opaque ops read that is not a graph input.

Everything a call of a compiled model needs besides its inputs lives here, in one place, so a
reader can see all of it and the ops stay functions of their arguments plus this:

* :mod:`~grouter_pass.runtime.sources`: the routing sources a graph names by integer key
  (``grouter.external_routing(tokens, key, ...)``). Held weakly: a source lives as long as the
  configuration that made it (which the compiled model's backend holds), no longer.
* :mod:`~grouter_pass.runtime.step`: what one call delivers or precomputes:
  :func:`routing` (the ``with grouter_pass.routing(weights, ids):`` block, a
  :class:`DeliveredRouting`) and the :class:`StepPlan` the expert-parallel step runner computes
  before the graph runs (the step's routing and all-to-all split sizes).

All of it is per thread and restored when its block ends, so nested calls of two compiled models
in one step and concurrent threads see their own values. Compile-time code (``passes/``) never
reads it.
"""

from grouter_pass.runtime.sources import register_source, source_of
from grouter_pass.runtime.step import DeliveredRouting, StepPlan, delivered_routing, routing, running_step, step_plan

__all__ = ["DeliveredRouting", "StepPlan", "delivered_routing", "register_source", "routing", "running_step",
           "source_of", "step_plan"]
