"""DDP's graph splitting, as the pass sees it.

Under ``DistributedDataParallel`` with ``torch._dynamo.config.optimize_ddp="ddp_optimizer"`` (the
default), Dynamo's DDPOptimizer cuts each graph at gradient-bucket boundaries and hands the
backend one piece at a time, so that each bucket's all-reduce can start while the rest of the
backward runs. The first bucket holds about 1 MB of parameters, whatever ``bucket_cap_mb`` says,
so any model larger than that arrives in pieces, and an MoE layer whose router and experts fall
into different pieces cannot be rewritten: no piece holds the whole site. This module tells when
that is happening, so the user hears why a layer was left alone and what to change.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)
_warned: weakref.WeakSet = weakref.WeakSet()


@dataclass(frozen=True)
class DDPSplit:
    """The active DDP module's parameter bytes and bucket caps (bytes)."""

    param_bytes: int
    first_bucket_bytes: int
    bucket_bytes: int


def active_ddp_split() -> tuple[torch.nn.Module, DDPSplit] | None:
    """The DDP module being compiled and how its graph is split, when DDPOptimizer splits it."""
    if not torch.distributed.is_available():
        return None
    from torch._dynamo.utils import get_optimize_ddp_mode
    from torch.nn.parallel import DistributedDataParallel

    if get_optimize_ddp_mode() != "ddp_optimizer":
        return None
    ddp = DistributedDataParallel._get_active_ddp_module()
    if ddp is None:
        return None
    param_bytes = sum(p.numel() * p.element_size() for p in ddp.module.parameters() if p.requires_grad)
    first = int(torch.distributed._DEFAULT_FIRST_BUCKET_BYTES)
    if param_bytes <= first:   # one bucket: DDPOptimizer compiles the graph whole
        return None
    return ddp, DDPSplit(param_bytes, first, int(ddp.bucket_bytes_cap))


def warn_if_split() -> None:
    """Once per DDP module: its graphs arrive in pieces, and MoE layers cut between pieces are left
    unchanged; say how to compile them whole."""
    split = active_ddp_split()
    if split is None:
        return
    ddp, s = split
    if ddp in _warned:
        return
    _warned.add(ddp)
    log.warning("grouter: DDP compiles this model in pieces cut at gradient-bucket boundaries "
                "(torch._dynamo.config.optimize_ddp='ddp_optimizer'; %.1f MB of parameters, buckets of %.1f MB "
                "after a first one of %.1f MB); an MoE layer whose router and experts fall into different pieces "
                "is left unchanged. To rewrite every layer, set "
                "torch._dynamo.config.optimize_ddp = False before compiling: the graph stays whole and DDP "
                "all-reduces the gradients after the backward.", s.param_bytes / 2**20, s.bucket_bytes / 2**20,
                s.first_bucket_bytes / 2**20)
