"""Resolve the expert-parallel group from what a user holds: a ``ProcessGroup``, a 1-D
``DeviceMesh``, or a multi-dimensional mesh with an ``"ep"`` dimension.

Why one place: the functional collectives accept a group in several spellings, but the EP code
also needs the group's size and this process's rank in it (to know which experts are local), and
the error for a mesh without an ``ep`` dimension must be the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

EP_DIM = "ep"


@dataclass(frozen=True)
class EPGroup:
    """The expert-parallel process group with its size and this process's rank in it."""

    group: dist.ProcessGroup
    size: int
    rank: int


def resolve_ep_group(ep: EPGroup | DeviceMesh | dist.ProcessGroup | None = None) -> EPGroup:
    """``ep`` as an :class:`EPGroup`.

    Args:
        ep: a 1-D ``DeviceMesh``, a mesh with a dimension named ``"ep"``, a ``ProcessGroup``, an
            :class:`EPGroup` (returned as is) or ``None`` (the default world group).
    """
    if isinstance(ep, EPGroup):
        return ep
    if isinstance(ep, DeviceMesh):
        names = ep.mesh_dim_names or ()
        if ep.ndim == 1:
            group = ep.get_group()
        elif EP_DIM in names:
            group = ep.get_group(EP_DIM)
        else:
            raise ValueError(f"the device mesh has dimensions {names} (ndim={ep.ndim}); "
                             f"expert parallelism needs a 1-D mesh or a dimension named {EP_DIM!r}")
    else:
        group = ep if ep is not None else dist.group.WORLD
    if group is None:
        raise RuntimeError("torch.distributed is not initialised: call init_process_group first")
    return EPGroup(group=group, size=dist.get_world_size(group), rank=dist.get_rank(group))


def check_divides(num_experts: int, ep_size: int) -> int:
    """Experts per rank; raises when ``ep_size`` does not divide ``num_experts``."""
    if ep_size < 1 or num_experts % ep_size:
        raise ValueError(f"expert-parallel size {ep_size} does not divide the number of experts {num_experts}")
    return num_experts // ep_size
