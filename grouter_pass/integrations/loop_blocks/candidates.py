"""Step 1 of the loop-block rewrite: candidate blocks, by structure only (shapes and parameter
roles; no class or attribute name is read): the lowest module that holds one router and E experts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Experts:
    """Per-expert weights, as functions of the block (so the replacement reads live parameters)."""

    num_experts: int
    hidden: int
    #: one entry per weight role candidate: (name, [E, a, b] getter, [E, a] bias getter or None)
    weights: list[tuple[str, Callable[[nn.Module], torch.Tensor], Callable[[nn.Module], torch.Tensor] | None]]
    #: the parameters of each expert, where each expert is its own module (a ``ModuleList``):
    #: eager autograd may leave an expert that got no tokens without a gradient
    per_expert: Callable[[nn.Module], list[list[nn.Parameter]]] | None = None


@dataclass(frozen=True)
class Router:
    """The router's weight ``[E, H]`` (and bias): an ``nn.Linear``'s, or a bare parameter
    applied with ``F.linear`` (Megatron-LM's router)."""

    owner: str                     # path of the module holding the parameters, relative to the block
    weight: str
    bias: str | None

    def params(self, block: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        owner = block.get_submodule(self.owner)
        return getattr(owner, self.weight), getattr(owner, self.bias) if self.bias else None


@dataclass
class Candidate:
    path: str
    block: nn.Module
    router: Router
    experts: Experts
    original_forward: Callable = field(repr=False, default=None)

    @property
    def router_weight(self) -> torch.Tensor:
        return self.router.params(self.block)[0]


def _relative(block: nn.Module, target: nn.Module) -> str:
    return next(name for name, m in block.named_modules() if m is target)


def _module_list_experts(block: nn.Module, lst: nn.ModuleList, hidden: int) -> Experts | None:
    """E identical MLPs: each ``nn.Linear`` position across the list is one weight role."""
    shapes = [tuple((n, tuple(p.shape)) for n, p in e.named_parameters()) for e in lst]
    if len(lst) < 2 or any(s != shapes[0] for s in shapes[1:]):
        return None
    linears = [n for n, m in lst[0].named_modules() if isinstance(m, nn.Linear)]
    if not 2 <= len(linears) <= 3 or len(shapes[0]) != sum(1 + (getattr(lst[0].get_submodule(n), "bias") is not None)
                                                              for n in linears):
        return None  # parameters outside plain Linear layers: roles unknown
    list_path = _relative(block, lst)
    weights = []
    for name in linears:
        def w(b, name=name):
            return torch.stack([e.get_submodule(name).weight for e in b.get_submodule(list_path)])

        has_bias = lst[0].get_submodule(name).bias is not None

        def bias(b, name=name):
            return torch.stack([e.get_submodule(name).bias for e in b.get_submodule(list_path)])

        weights.append((f"{list_path}.*.{name}", w, bias if has_bias else None))
    return Experts(len(lst), hidden, weights,
                    per_expert=lambda b: [list(e.parameters()) for e in b.get_submodule(list_path)])


def _stacked_param_experts(block: nn.Module, num_experts: int, hidden: int) -> Experts | None:
    """Parameters with a leading expert dim: 3-D ``[E, a, b]`` or flat ``[E*F, H]`` (DBRX)."""
    weights = []
    for name, p in block.named_parameters():
        if p.dim() == 3 and p.shape[0] == num_experts:
            weights.append((name, lambda b, name=name: b.get_parameter(name), None))
        elif p.dim() == 2 and p.shape[0] % num_experts == 0 and p.shape[0] > num_experts and p.shape[1] == hidden:
            f = p.shape[0] // num_experts
            weights.append((name, lambda b, name=name, f=f: b.get_parameter(name).view(num_experts, f, hidden), None))
    return Experts(num_experts, hidden, weights) if 2 <= len(weights) <= 3 else None


def _routers(block: nn.Module) -> list[tuple[Router, int, int]]:
    """``(router, E, H)`` for every ``Linear(H -> E)`` with E < H and every bare 2-D parameter
    ``[E, H]`` of a module that is not a Linear (by shapes only)."""
    out = []
    for mpath, m in block.named_modules():
        if isinstance(m, nn.Linear):
            if 2 <= m.out_features < m.in_features:
                out.append((Router(mpath, "weight", "bias" if m.bias is not None else None), m.out_features,
                            m.in_features))
            continue
        for pname, p in m.named_parameters(recurse=False):
            if p.dim() == 2 and 2 <= p.shape[0] < p.shape[1]:
                out.append((Router(mpath, pname, None), p.shape[0], p.shape[1]))
    return out


def find_loop_block_candidates(model: nn.Module) -> list[Candidate]:
    """The lowest modules holding a router (``[E, H]``) and E experts."""
    found: list[Candidate] = []
    for path, block in model.named_modules():
        experts = None
        for router, e, h in _routers(block):
            lists = [m for m in block.modules() if isinstance(m, nn.ModuleList) and len(m) == e]
            experts = _module_list_experts(block, lists[0], h) if len(lists) == 1 else \
                _stacked_param_experts(block, e, h)
            if experts is not None:
                found.append(Candidate(path, block, router, experts))
                break
    # keep the lowest: drop a candidate that contains another one
    return [c for c in found if not any(o is not c and o.path.startswith(c.path + ".") or (c.path == "" and o.path)
                                        for o in found)]
