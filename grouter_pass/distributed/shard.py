"""Shard a model's expert parameters along E over the expert-parallel group, and compose with
FSDP2 for the rest.

Which parameters are experts is decided by shape and dataflow, not by attribute names: a
parameter is a candidate when its leading dimension is E and it has at least two dimensions
(``[E, 2F, H]`` weights, ``[E, O]`` biases). A 2-D candidate is a *router* instead when a forward
pass uses it (directly or through a view) as the weight of a ``linear`` / ``matmul`` whose output
ends in E (``[N, E]`` logits): a router ``nn.Linear(H, E)`` weight and an expert down-projection
bias ``[E, H]`` have the same shape, and only the dataflow tells them apart. Routers are
replicated (or go to FSDP) like every other non-expert parameter.

After sharding, rank r holds the physical experts ``[r*L, (r+1)*L)`` (L = E / ep): with a
placement, physical expert p is logical expert ``expert_perm[p]``, so the rows kept are
``expert_perm[r*L:(r+1)*L]``; without one, the identity.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

import grouter_pass.ops  # noqa: F401  (registers torch.ops.grouter.experts_from_shard)
from grouter_pass.distributed.group import EPGroup, check_divides, resolve_ep_group

log = logging.getLogger(__name__)

# ops through which a parameter keeps its identity as "the same weight"
_VIEW_FUNCS = {"t", "transpose", "permute", "view", "reshape", "to", "float", "contiguous", "__get__", "detach",
               "type_as", "bfloat16", "half", "clone"}
_MATMUL_FUNCS = {"linear", "matmul", "mm", "addmm", "__matmul__", "__rmatmul__"}


class _RouterUseRecorder(TorchFunctionMode):
    """Records which candidate parameters feed a matmul whose output ends in E."""

    def __init__(self, roots: dict[int, str], num_experts: int) -> None:
        super().__init__()
        self.roots = dict(roots)  # id(tensor) -> parameter name, grown through views
        self.num_experts = num_experts
        self.routers: set[str] = set()
        self._keep: list[torch.Tensor] = []  # keep views alive so their ids stay unique

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        flat = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        hit = [self.roots[id(a)] for a in flat if id(a) in self.roots]
        if hit and isinstance(out, torch.Tensor):
            if name in _VIEW_FUNCS:
                self.roots[id(out)] = hit[0]
                self._keep.append(out)
            elif name in _MATMUL_FUNCS and out.dim() >= 1 and out.shape[-1] == self.num_experts:
                self.routers.update(hit)
        return out


def find_expert_parameters(model: nn.Module, example_inputs: Sequence[Any] | None, *, num_experts: int,
                           example_kwargs: dict[str, Any] | None = None) -> list[str]:
    """Names of the parameters of ``model`` that hold per-expert weights (leading dim E).

    Args:
        model: the unsharded model.
        example_inputs: inputs for one forward pass (no gradient is taken); the pass is what
            tells routers from ``[E, H]`` expert biases. ``None`` skips it: every 2-D ``[E, X]``
            parameter is then taken as an expert parameter.
        num_experts: E.
    """
    candidates = {name: p for name, p in model.named_parameters() if p.dim() >= 2 and p.shape[0] == num_experts}
    routers: set[str] = set()
    two_d = {id(p): name for name, p in candidates.items() if p.dim() == 2}
    if example_inputs is not None and two_d:
        recorder = _RouterUseRecorder(two_d, num_experts)
        with torch.no_grad(), recorder:
            model(*example_inputs, **(example_kwargs or {}))
        routers = recorder.routers
    names = [n for n in candidates if n not in routers]
    log.debug("expert parameters (E=%d): %s; routers left replicated: %s", num_experts, names, sorted(routers))
    return names


@dataclass
class ExpertShardReport:
    """What :func:`shard_expert_parameters` did on this rank."""

    num_experts: int
    ep_size: int
    rank: int
    names: list[str] = field(default_factory=list)
    #: logical expert ids held by this rank, in local order
    local_experts: list[int] = field(default_factory=list)

    @property
    def num_local(self) -> int:
        return self.num_experts // self.ep_size


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def shard_expert_parameters(
    model: nn.Module,
    ep: EPGroup | DeviceMesh | dist.ProcessGroup | None,
    *,
    num_experts: int,
    names: Iterable[str] | None = None,
    example_inputs: Sequence[Any] | None = None,
    expert_perm: Sequence[int] | torch.Tensor | None = None,
    filter_fn: Callable[[str, nn.Parameter], bool] | None = None,
    keep_shape: bool = False,
) -> ExpertShardReport:
    """Replace every expert parameter ``[E, ...]`` of ``model`` by this rank's ``[E/ep, ...]`` rows,
    in place.

    Two forms. ``keep_shape=False`` (model-level EP): the attribute *becomes* the ``[E/ep, ...]``
    shard; the model's code must be written for it (``ep_moe_experts``). ``keep_shape=True``
    (for ``GrouterConfig(expert_parallel=...)`` on an unmodified model): the shard is stored as
    the parametrization's ``original`` and the attribute still reads ``[E, ...]`` through
    ``grouter.experts_from_shard``, which the expert-parallel rewrite removes: only the shard
    exists in memory and in the optimizer.

    Args:
        model: the model, with the same full weights on every rank (e.g. built from one seed).
        ep: the expert-parallel group: a 1-D mesh, a mesh with an ``"ep"`` dimension, a process
            group or ``None`` (world).
        num_experts: E.
        names: the expert parameters; found with :func:`find_expert_parameters` when ``None``.
        example_inputs: inputs for that search (see there).
        expert_perm: physical -> logical expert order from a placement (identity when ``None``).
        filter_fn: ``(name, param) -> bool`` to keep a found parameter out of the sharding.
        keep_shape: see above. ``report.names`` are the names of the stored shards either way
            (``...parametrizations.<attr>.original`` with ``keep_shape``), as FSDP and optimizers see them.

    Raises:
        ValueError: when the EP size does not divide E, or the permutation is not one of E experts.
    """
    epg = resolve_ep_group(ep) if not isinstance(ep, EPGroup) else ep
    local = check_divides(num_experts, epg.size)
    perm = torch.arange(num_experts) if expert_perm is None else torch.as_tensor(expert_perm, dtype=torch.int64)
    if perm.numel() != num_experts or not torch.equal(perm.sort().values, torch.arange(num_experts)):
        raise ValueError(f"expert permutation of length {perm.numel()} is not a permutation of "
                         f"num_experts={num_experts} experts")
    if names is None:
        names = find_expert_parameters(model, example_inputs, num_experts=num_experts)
    rows = perm[epg.rank * local:(epg.rank + 1) * local]
    report = ExpertShardReport(num_experts=num_experts, ep_size=epg.size, rank=epg.rank,
                               local_experts=rows.tolist())
    params = dict(model.named_parameters())
    for name in names:
        p = params[name]
        if p.shape[0] != num_experts:
            raise ValueError(f"parameter {name} has leading dimension {p.shape[0]}, expected num_experts={num_experts}")
        if filter_fn is not None and not filter_fn(name, p):
            continue
        owner, attr = _owner(model, name)
        if keep_shape:
            parametrize.register_parametrization(owner, attr, ExpertsFromShard(num_experts, rows.tolist()),
                                                 unsafe=True)
            prefix = name.rpartition(".")[0]
            report.names.append(f"{prefix}{'.' if prefix else ''}parametrizations.{attr}.original")
            continue
        shard = nn.Parameter(p.detach().index_select(0, rows.to(p.device)).clone(), requires_grad=p.requires_grad)
        setattr(owner, attr, shard)
        report.names.append(name)
    log.info("rank %d/%d: sharded %d expert parameters along E=%d (local experts %s)", epg.rank, epg.size,
             len(report.names), num_experts, report.local_experts)
    return report


class ExpertsFromShard(nn.Module):
    """Parametrization: the stored ``[E/ep, ...]`` shard reads as the ``[E, ...]`` parameter
    through ``grouter.experts_from_shard`` (see :func:`shard_expert_parameters`)."""

    def __init__(self, num_experts: int, rows: list[int]) -> None:
        super().__init__()
        self.num_experts, self.rows = num_experts, list(rows)

    def forward(self, shard: torch.Tensor) -> torch.Tensor:
        return torch.ops.grouter.experts_from_shard(shard, self.num_experts, self.rows)

    def right_inverse(self, full: torch.Tensor) -> torch.Tensor:
        return full.detach().index_select(0, torch.tensor(self.rows, device=full.device)).clone()


def fully_shard_non_experts(model: nn.Module, mesh: DeviceMesh, expert_names: Iterable[str],
                            **fsdp_kwargs: Any) -> nn.Module:
    """FSDP2 ``fully_shard`` over ``mesh`` for every parameter except the expert shards.

    The expert shards are left out (``ignored_params``) because the all-to-all's backward already
    delivers each of them its full gradient: reducing it again over the same ranks would be
    wrong. FSDP's reduce-scatter is set to *sum* (divide factor 1, with sum-only collectives,
    which gloo also needs: it has no ``PREMUL_SUM``), so that one convention serves both kinds
    of parameters: each rank's loss is its share of the global loss (divided by the global token
    count), and the gradients add up to the single-process ones.
    """
    from torch.distributed.fsdp import fully_shard

    params = dict(model.named_parameters())
    ignored = {params[n] for n in expert_names}
    fully_shard(model, mesh=mesh, ignored_params=ignored, **fsdp_kwargs)
    model.set_gradient_divide_factor(1.0)
    model.set_force_sum_reduction_for_comms(True)
    return model
