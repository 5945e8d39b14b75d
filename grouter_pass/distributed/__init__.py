"""Expert parallelism on ``torch.distributed`` and offline expert/sample placement (Grouter §10).

Runtime (one function per MoE layer, sharded parameters, split sizes known per step):

* :func:`ep_moe_experts`: the EP twin of ``grouter.moe_experts`` (all-to-all dispatch with the
  autograd-aware functional collectives, local experts, all-to-all combine).
* :class:`EPSplits`, :func:`compute_ep_splits`, :func:`splits_from_step_routing`,
  :func:`gather_step_splits`: the send/receive split sizes of a step, computed once, before the
  first layer, when routing is known ahead (Grouter, precomputed, hash).
* :func:`find_expert_parameters`, :func:`shard_expert_parameters`, :func:`fully_shard_non_experts`:
  experts sharded along E over the ``ep`` mesh dimension, FSDP2 for the rest.

Offline (numpy, no devices): :mod:`~grouter_pass.distributed.placement` (affinity, expert
grouping, capacity-constrained sample placement), the placement file, a sampler that honours it,
and the traffic simulator behind ``grouter placement`` / ``grouter traffic``.
"""

from grouter_pass.distributed.example_model import TinyEPMoELM
from grouter_pass.distributed.experts import ep_moe_experts, exchange_layer_splits
from grouter_pass.distributed.group import EPGroup, check_divides, resolve_ep_group
from grouter_pass.distributed.shard import (
    ExpertShardReport,
    find_expert_parameters,
    fully_shard_non_experts,
    shard_expert_parameters,
)
from grouter_pass.distributed.splits import (
    EPSplits,
    compute_ep_splits,
    expert_counts,
    gather_step_splits,
    splits_from_step_routing,
)

__all__ = [
    "EPGroup",
    "EPSplits",
    "ExpertShardReport",
    "TinyEPMoELM",
    "check_divides",
    "compute_ep_splits",
    "ep_moe_experts",
    "exchange_layer_splits",
    "expert_counts",
    "find_expert_parameters",
    "fully_shard_non_experts",
    "gather_step_splits",
    "resolve_ep_group",
    "shard_expert_parameters",
    "splits_from_step_routing",
]
