"""The ``grouter`` op namespace (``torch.ops.grouter.*``).

Importing this package registers the ops; :mod:`grouter_pass.ops.reference` holds their
plain-PyTorch semantics. The ``triton_op`` forms that let Inductor see the kernels
(:mod:`grouter_pass.ops.triton_ops`) are registered when the graph pass first chooses them.
"""

from grouter_pass.ops import (  # noqa: F401  (registers the ops)
    dispatch_plan,
    expert_shard,
    external_routing,
    moe_experts,
    route,
    split_sizes,
)
from grouter_pass.ops.dispatch_plan import capacity_keep as capacity_keep_op
from grouter_pass.ops.dispatch_plan import dispatch_plan as dispatch_plan_op
from grouter_pass.ops.moe_experts import moe_experts as moe_experts_op
from grouter_pass.ops.route import route as route_op

__all__ = ["capacity_keep_op", "dispatch_plan_op", "moe_experts_op", "route_op"]
