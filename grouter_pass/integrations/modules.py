"""Pre-Dynamo rewrite of MoE blocks whose expert loop breaks the graph.

transformers 4.x-style blocks (``for e in range(E): torch.where(...)``, ``index_add_``),
``bincount().tolist()`` + ``split`` loops and DBRX's loop over ``nonzero()`` cannot be captured in
one Dynamo graph, so the graph pass never sees their experts. This module finds such blocks **by
structure** and replaces their ``forward`` (on the instance, reversibly) with one written in the
``grouter`` ops, after proving on random inputs that it computes the same outputs and gradients:

1. *Candidates* (shapes and parameter roles only): the lowest module that holds one router, a
   ``Linear(H -> E)``, and the experts: a ``ModuleList`` of E identical MLPs, or parameters with
   a leading expert dim (``[E, ., .]``, or flat ``[E*F, H]`` as in DBRX).
2. *Trace*: Dynamo is run on the block with a random ``[B, T, H]`` input. No graph break means
   nothing to do (the graph pass will handle the block). Otherwise the first graph holds the
   gating: the usual canonicalize + parse + family classification gives its ``GatingSpec``; the
   router is identified by identity of its weight among the graph's inputs.
3. *Experts*: which weight is the gate, the up and the down projection, in which layout, and which
   activation, is found by search: every assignment consistent with the shapes is built and the
   one that reproduces the block's output on random inputs is kept (an ambiguous or empty search
   leaves the block alone, with the reason).
4. *Outputs*: the replacement returns the same structure as the original (the MoE output, and the
   router logits when the block returns them).
5. *Proof*: forward outputs and input gradients of the replacement and the original agree on
   random inputs (spread and skewed routing), in train and eval mode; a block whose output is
   random in training (router jitter, dropout) is left alone.

The graph breaks of each block before and after are logged (counted in isolated Dynamo regions,
so nothing the caller compiled is reset).
"""

from __future__ import annotations

import itertools
import logging
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

import grouter_pass.ops  # noqa: F401  (registers torch.ops.grouter)
from grouter_pass.integrations.empty_expert_grads import EmptyExpertGrads
from grouter_pass.numerics import compare
from grouter_pass.spec import ActivationSpec, GatingSpec, NoMatch

log = logging.getLogger(__name__)

_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


@dataclass
class LoopBlockRewrite:
    """One block rewritten before Dynamo (or the reason it was not)."""

    path: str
    graph_breaks_before: int
    graph_breaks_after: int | None = None
    gating: GatingSpec | None = None
    activation: ActivationSpec | None = None
    reason: str | None = None
    _analysis: Any = field(default=None, repr=False)  # reused for identical blocks

    @property
    def rewritten(self) -> bool:
        return self.reason is None

    def summary(self) -> str:
        if not self.rewritten:
            return f"{self.path}: expert loop not rewritten: {self.reason}"
        return (f"{self.path}: expert loop rewritten before Dynamo [{self.gating.family}: {self.gating.describe()}; "
                f"{self.activation.describe()}]; graph breaks {self.graph_breaks_before} -> {self.graph_breaks_after}")


# ------------------------------------------------------------------------------------------------
# 1. candidates, by structure
# ------------------------------------------------------------------------------------------------


@dataclass
class _Experts:
    """Per-expert weights, as functions of the block (so the replacement reads live parameters)."""

    num_experts: int
    hidden: int
    #: one entry per weight role candidate: (name, [E, a, b] getter, [E, a] bias getter or None)
    weights: list[tuple[str, Callable[[nn.Module], torch.Tensor], Callable[[nn.Module], torch.Tensor] | None]]
    #: the parameters of each expert, where each expert is its own module (a ``ModuleList``):
    #: eager autograd may leave an expert that got no tokens without a gradient
    per_expert: Callable[[nn.Module], list[list[nn.Parameter]]] | None = None


@dataclass(frozen=True)
class _Router:
    """The router's weight ``[E, H]`` (and bias): an ``nn.Linear``'s, or a bare parameter
    applied with ``F.linear`` (Megatron-LM's router)."""

    owner: str                     # path of the module holding the parameters, relative to the block
    weight: str
    bias: str | None

    def params(self, block: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        owner = block.get_submodule(self.owner)
        return getattr(owner, self.weight), getattr(owner, self.bias) if self.bias else None


@dataclass
class _Candidate:
    path: str
    block: nn.Module
    router: _Router
    experts: _Experts
    original_forward: Callable = field(repr=False, default=None)

    @property
    def router_weight(self) -> torch.Tensor:
        return self.router.params(self.block)[0]


def _relative(block: nn.Module, target: nn.Module) -> str:
    return next(name for name, m in block.named_modules() if m is target)


def _module_list_experts(block: nn.Module, lst: nn.ModuleList, hidden: int) -> _Experts | None:
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
    return _Experts(len(lst), hidden, weights,
                    per_expert=lambda b: [list(e.parameters()) for e in b.get_submodule(list_path)])


def _stacked_param_experts(block: nn.Module, num_experts: int, hidden: int) -> _Experts | None:
    """Parameters with a leading expert dim: 3-D ``[E, a, b]`` or flat ``[E*F, H]`` (DBRX)."""
    weights = []
    for name, p in block.named_parameters():
        if p.dim() == 3 and p.shape[0] == num_experts:
            weights.append((name, lambda b, name=name: b.get_parameter(name), None))
        elif p.dim() == 2 and p.shape[0] % num_experts == 0 and p.shape[0] > num_experts and p.shape[1] == hidden:
            f = p.shape[0] // num_experts
            weights.append((name, lambda b, name=name, f=f: b.get_parameter(name).view(num_experts, f, hidden), None))
    return _Experts(num_experts, hidden, weights) if 2 <= len(weights) <= 3 else None


def _routers(block: nn.Module) -> list[tuple[_Router, int, int]]:
    """``(router, E, H)`` for every ``Linear(H -> E)`` with E < H and every bare 2-D parameter
    ``[E, H]`` of a module that is not a Linear (by shapes only)."""
    out = []
    for mpath, m in block.named_modules():
        if isinstance(m, nn.Linear):
            if 2 <= m.out_features < m.in_features:
                out.append((_Router(mpath, "weight", "bias" if m.bias is not None else None), m.out_features,
                            m.in_features))
            continue
        for pname, p in m.named_parameters(recurse=False):
            if p.dim() == 2 and 2 <= p.shape[0] < p.shape[1]:
                out.append((_Router(mpath, pname, None), p.shape[0], p.shape[1]))
    return out


def find_loop_block_candidates(model: nn.Module) -> list[_Candidate]:
    """The lowest modules holding a router (``[E, H]``) and E experts."""
    found: list[_Candidate] = []
    for path, block in model.named_modules():
        experts = None
        for router, e, h in _routers(block):
            lists = [m for m in block.modules() if isinstance(m, nn.ModuleList) and len(m) == e]
            experts = _module_list_experts(block, lists[0], h) if len(lists) == 1 else \
                _stacked_param_experts(block, e, h)
            if experts is not None:
                found.append(_Candidate(path, block, router, experts))
                break
    # keep the lowest: drop a candidate that contains another one
    return [c for c in found if not any(o is not c and o.path.startswith(c.path + ".") or (c.path == "" and o.path)
                                        for o in found)]


# ------------------------------------------------------------------------------------------------
# 2. trace: graph breaks and the gating spec
# ------------------------------------------------------------------------------------------------


def _graph_breaks(block: nn.Module, x: torch.Tensor) -> int:
    """Graph breaks Dynamo takes on ``block(x)``, counted in an isolated region (no reset)."""
    from grouter_pass.inspect.graph_breaks import graph_breaks

    return graph_breaks(block, x).breaks


def _gating_spec(block: nn.Module, x: torch.Tensor, router_weight: torch.Tensor
                 ) -> tuple[GatingSpec, str | None] | NoMatch:
    """The gating of ``block``, read from a recorded run of its forward (see ``function_trace``)
    by the graph pass's own routing synthesis: the selection whose router is ``router`` (by the
    identity of its weight among the recorded inputs), read as a spec ``grouter.route`` computes
    from that router's logits."""
    from grouter_pass.integrations.function_trace import record_forward
    from grouter_pass.passes.canonicalize import canonicalize_gating_pass
    from grouter_pass.passes.dataflow import GraphFacts, strip_pure_views
    from grouter_pass.passes.detect.anchors import find_anchors
    from grouter_pass.passes.detect.routing import analyse_routing

    gm, inputs, _ = record_forward(block, x)
    canonicalize_gating_pass(gm)
    facts = GraphFacts(gm.graph)
    reason: NoMatch = NoMatch("no top-k gating on the router's logits in a recorded run of the block")
    for anchor in find_anchors(gm.graph, facts):
        if anchor.kind == "lookup":
            continue
        analysis = analyse_routing(gm.graph, facts, anchor)
        if isinstance(analysis, NoMatch):
            reason = analysis
            continue
        weights = [strip_pure_views(a) for a in analysis.router.all_input_nodes if a is not analysis.router_input]
        if not any(inputs.get(w) is router_weight for w in weights):
            continue
        for cand in analysis.candidates:
            if cand.cut is not analysis.router or not cand.spec.uses_route_op:
                continue
            if cand.bias is None:
                return cand.spec, None
            bias = inputs.get(strip_pure_views(cand.bias))
            path = next((name for name, b in block.named_buffers() if b is bias), None) or next(
                (name for name, b in block.named_parameters() if b is bias), None)
            if path is not None:   # a selection bias the block owns
                return cand.spec, path
        reason = NoMatch("no gating spec computes the block's routing from its router's logits alone")
    return reason


# ------------------------------------------------------------------------------------------------
# 3. the replacement forward, and the search over weight roles
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Roles:
    gate: int | None       # index into _Experts.weights (a separate gate projection), else None
    up: int
    down: int
    activation: str
    #: "separate" (gate and up are two weights), "concat" / "interleaved" (one [2F, H] weight),
    #: "plain" (no gate)
    layout: str = "separate"

    @property
    def act_spec(self) -> ActivationSpec:
        return ActivationSpec(self.activation, gated=self.layout != "plain",
                              layout="interleaved" if self.layout == "interleaved" else "concat")


def _linear_layout(w: torch.Tensor, out_dim: int, in_dim: int) -> torch.Tensor | None:
    """``w`` [E, a, b] as ``[E, out, in]`` (nn.Linear layout), or None if the shape does not fit."""
    if w.shape[1:] == (out_dim, in_dim):
        return w
    if w.shape[1:] == (in_dim, out_dim):
        return w.transpose(1, 2)
    return None


def _expert_tensors(block: nn.Module, experts: _Experts, roles: _Roles, ffn: int):
    """(w_up [E, (2)F, H], w_down [E, H, F], b_up, b_down) in nn.Linear layout, or None."""
    ws = experts.weights
    h = experts.hidden
    up_width = 2 * ffn if roles.layout in ("concat", "interleaved") else ffn
    down = _linear_layout(ws[roles.down][1](block), h, ffn)
    up = _linear_layout(ws[roles.up][1](block), up_width, h)
    gate = _linear_layout(ws[roles.gate][1](block), ffn, h) if roles.gate is not None else None
    if down is None or up is None or (roles.gate is not None and gate is None):
        return None
    w_up = torch.cat([gate, up], dim=1) if gate is not None else up
    biases = [ws[i][2] for i in ((roles.gate,) if roles.gate is not None else ()) + (roles.up, roles.down)]
    if any(b is None for b in biases) != all(b is None for b in biases):
        return None
    if biases[0] is None:
        return w_up, down, None, None
    b_up = torch.cat([b(block) for b in biases[:-1]], dim=1)
    return w_up, down, b_up, biases[-1](block)


def _role_candidates(experts: _Experts, shapes: list[tuple[int, int]]) -> list[tuple[_Roles, int]]:
    """Every (roles, FFN width) the weight shapes allow."""
    n, h = len(experts.weights), experts.hidden
    out = []
    for perm in itertools.permutations(range(n)):
        if n == 3:
            gate, up, down = perm
        else:
            gate, (up, down) = None, perm
        for ffn in {d for d in shapes[down] if d != h} or {h}:
            if set(shapes[down]) != {h, ffn}:
                continue
            if n == 3:
                layouts = ["separate"] if set(shapes[gate]) == set(shapes[up]) == {h, ffn} else []
            elif set(shapes[up]) == {h, 2 * ffn}:
                layouts = ["concat", "interleaved"]
            elif set(shapes[up]) == {h, ffn}:
                layouts = ["plain"]
            else:
                layouts = []
            out.extend((_Roles(gate, up, down, act, layout), ffn) for layout in layouts for act in _ACTIVATIONS)
    return out


def _make_forward(cand: _Candidate, spec: tuple[GatingSpec, str | None], roles: _Roles, ffn: int,
                  out_tree: pytree.TreeSpec,
                  out_roles: list[str], grads: EmptyExpertGrads | None = None) -> Callable:
    experts = cand.experts
    router = cand.router
    act = roles.act_spec
    spec, bias_path = spec
    buffer_paths = {name for name, _ in cand.block.named_buffers()}
    route_kwargs = spec.route_kwargs()

    def forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        x = hidden_states.reshape(-1, experts.hidden)
        weight, bias = router.params(self)
        logits = nn.functional.linear(x, weight, bias)
        bias = self.get_buffer(bias_path) if bias_path in buffer_paths else (
            self.get_parameter(bias_path) if bias_path is not None else None)
        weights, ids = torch.ops.grouter.route(logits, bias, **route_kwargs)
        perm, inv_perm, counts, offsets = torch.ops.grouter.dispatch_plan(ids, experts.num_experts)
        if grads is not None and torch.is_grad_enabled():
            grads.record(counts)
        w_up, w_down, b_up, b_down = _expert_tensors(self, experts, roles, ffn)
        out, _ = torch.ops.grouter.moe_experts(x, weights, perm, inv_perm, offsets, w_up, w_down, b_up, b_down,
                                               up_transposed=False, down_transposed=False, weight_on_input=False,
                                               out_dtype=hidden_states.dtype, **act.op_kwargs())
        leaves = [out.view(hidden_states.shape) if role == "output" else logits if role == "logits" else None
                  for role in out_roles]
        return pytree.tree_unflatten(leaves, out_tree)

    return forward


def _output_roles(out: Any, x: torch.Tensor, logits: torch.Tensor) -> tuple[pytree.TreeSpec, list[str]] | NoMatch:
    leaves, tree = pytree.tree_flatten(out)
    roles = []
    for leaf in leaves:
        if leaf is None:   # e.g. Megatron's (output, None) when the experts have no bias
            roles.append("none")
        elif isinstance(leaf, torch.Tensor) and leaf.shape == x.shape:
            roles.append("output")
        elif isinstance(leaf, torch.Tensor) and leaf.shape == logits.shape and compare(leaf, logits).ok:
            roles.append("logits")
        else:
            return NoMatch("the block returns %s, which the rewrite cannot reproduce",
                           (type(leaf).__name__ if not isinstance(leaf, torch.Tensor) else list(leaf.shape),))
    if roles.count("output") != 1:
        return NoMatch("the block does not return exactly one tensor shaped like its input")
    return tree, roles


def _random_projection(leaves: list[torch.Tensor], seed: int) -> torch.Tensor:
    """A scalar that weighs every output element by a fixed random number (a random cotangent),
    drawn on the CPU from its own generator and moved to each output's device."""
    gen = torch.Generator().manual_seed(seed)
    return sum((t.float() * torch.randn(t.shape, generator=gen).to(t.device)).sum() for t in leaves)


def _run(block: nn.Module, x: torch.Tensor, grad: bool) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    xi = x.detach().clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = block(xi)
        leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        g = None
        if grad:
            (g,) = torch.autograd.grad(_random_projection(leaves, seed=7), [xi])
    return [t.detach() for t in leaves], g


def _params_without_grad(block: nn.Module, x: torch.Tensor) -> set[str]:
    """Names of the parameters whose ``.grad`` a backward through ``block(x)`` leaves ``None``
    (the caller's ``.grad`` values are put back afterwards)."""
    params = dict(block.named_parameters())
    saved = {n: p.grad for n, p in params.items()}
    try:
        for p in params.values():
            p.grad = None
        xi = x.detach().clone().requires_grad_(True)
        leaves = [t for t in pytree.tree_leaves(block(xi)) if isinstance(t, torch.Tensor) and t.requires_grad]
        _random_projection(leaves, seed=11).backward()
        return {n for n, p in params.items() if p.grad is None}
    finally:
        for n, p in params.items():
            p.grad = saved[n]


def _same(a: tuple, b: tuple) -> bool:
    outs_a, g_a = a
    outs_b, g_b = b
    if len(outs_a) != len(outs_b):
        return False
    pairs = list(zip(outs_a, outs_b)) + ([(g_a, g_b)] if g_a is not None and g_b is not None else [])
    return all(x.shape == y.shape and compare(x, y).ok for x, y in pairs)


def _probe_inputs(cand: _Candidate, tokens: int) -> list[torch.Tensor]:
    w = cand.router_weight
    gen = torch.Generator().manual_seed(3)
    spread = torch.randn(2, tokens // 2, cand.experts.hidden, generator=gen)
    # skewed: every token close to one direction, so most tokens pick the same experts
    skew = spread * 0.1 + torch.randn(1, 1, cand.experts.hidden, generator=gen) * 2
    return [t.to(device=w.device, dtype=w.dtype) for t in (spread, skew)]


@dataclass
class _Analysis:
    breaks_before: int
    breaks_after: int
    spec: tuple[GatingSpec, str | None]   # the spec and the path of the selection bias it reads
    roles: _Roles
    ffn: int
    outputs: tuple


def rewrite_loop_block(cand: _Candidate, *, tokens: int = 16, reuse: _Analysis | None = None) -> LoopBlockRewrite:
    """Try to rewrite one candidate block in place (see the module docstring). ``reuse``: the
    analysis of an identical block, so only the proof runs for this one.

    The probes run the block on random inputs; what a forward writes into the block's buffers
    (per-expert token counts, say) is put back afterwards, and the global random generators are
    forked around them, so probing leaves no trace."""
    saved = {name: b.detach().clone() for name, b in cand.block.named_buffers()}
    device = cand.router_weight.device
    # a block with dropout or router jitter draws from the global generators when probed: fork
    # them, so the user's random stream is the same as without the pass
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    try:
        with rng:
            return _rewrite_loop_block(cand, tokens=tokens, reuse=reuse, saved=saved)
    finally:
        with torch.no_grad():
            for name, b in cand.block.named_buffers():
                if name in saved:
                    b.copy_(saved[name])


def _rewrite_loop_block(cand: _Candidate, *, tokens: int, reuse: _Analysis | None,
                        saved: dict[str, torch.Tensor]) -> LoopBlockRewrite:
    block = cand.block
    inputs = _probe_inputs(cand, tokens)
    if reuse is None:
        try:
            breaks_before = _graph_breaks(block, inputs[0])
        except Exception as e:  # noqa: BLE001 - the block does not even run on a [B, T, H] input
            return LoopBlockRewrite(cand.path, -1, reason=f"could not run the block on a [B, T, H] input ({e})")
    else:
        breaks_before = reuse.breaks_before
    report = LoopBlockRewrite(cand.path, breaks_before)
    if breaks_before == 0:
        report.reason = "no graph break: the graph pass handles it"
        return report
    spec = reuse.spec if reuse is not None else _gating_spec(block, inputs[0], cand.router_weight)
    if isinstance(spec, NoMatch):
        report.reason = spec.detail
        return report
    report.gating = spec[0]   # from here on the block is an MoE block: a failure is worth reporting
    was_training = block.training
    try:
        refs = {mode: [_run(block.train(mode), x, True) for x in inputs] for mode in (True, False)}
        updated = [name for name, b in block.named_buffers() if name in saved and not torch.equal(b, saved[name])]
        if updated:   # a forward written in the grouter ops would lose the update
            report.reason = (f"the block updates its buffers {updated} in its forward (statistics such as "
                             "tokens per expert); a rewritten forward would not, so it is left unchanged")
            return report
        if not _same(refs[True][0], _run(block.train(True), inputs[0], True)):
            report.reason = "the block's output is random in training mode (router jitter, dropout...)"
            return report
        block.train(was_training)
        if reuse is not None:
            outputs, candidates = reuse.outputs, [(reuse.roles, reuse.ffn)]
        else:
            with torch.no_grad():
                x0 = inputs[0].reshape(-1, cand.experts.hidden)
                logits = nn.functional.linear(x0, *cand.router.params(block))
                outputs = _output_roles(block(inputs[0]), inputs[0], logits)
            if isinstance(outputs, NoMatch):
                report.reason = outputs.detail
                return report
            shapes = [tuple(get(block).shape[1:]) for _, get, _ in cand.experts.weights]
            candidates = _role_candidates(cand.experts, shapes)
            if not candidates:
                report.reason = f"no reading of the expert weight shapes {shapes} as gate/up/down projections"
                return report
        original = block.forward
        matches = []
        for roles, ffn in candidates:
            if _expert_tensors(block, cand.experts, roles, ffn) is None:
                continue
            block.forward = types.MethodType(_make_forward(cand, spec, roles, ffn, *outputs), block)
            ok = all(_same(ref, _run(block.train(mode), x, True))
                     for mode in (True, False) for ref, x in zip(refs[mode], inputs))
            del block.forward
            if ok:
                matches.append((roles, ffn))
        block.train(was_training)
        if len(matches) != 1:
            report.reason = ("no assignment of gate/up/down weights and activation reproduces the block"
                             if not matches else f"{len(matches)} different expert readings reproduce the block")
            return report
        roles, ffn = matches[0]
        one_token = inputs[0][:1, :1]
        eager_none = _params_without_grad(block.train(True), one_token)
        grads = EmptyExpertGrads(cand.experts.per_expert(block)) if eager_none and cand.experts.per_expert else None
        block.forward = types.MethodType(_make_forward(cand, spec, roles, ffn, *outputs, grads=grads), block)
        ours_none = _params_without_grad(block, one_token)
        block.train(was_training)
        if ours_none != eager_none:
            del block.forward
            if grads is not None:
                grads.remove()
            report.reason = (f"on one token eager leaves {sorted(eager_none)} without a gradient, the rewrite "
                             f"{sorted(ours_none)}; an optimizer would treat them differently")
            return report
        block._grouter_original_forward = original
        block._grouter_empty_expert_grads = grads
        report.activation = roles.act_spec
        report.graph_breaks_after = reuse.breaks_after if reuse is not None else _graph_breaks(block, inputs[0])
        report._analysis = _Analysis(breaks_before, report.graph_breaks_after, spec, roles, ffn, outputs)
        return report
    finally:
        block.train(was_training)


def _structure_key(block: nn.Module) -> tuple:
    return type(block), tuple((n, tuple(p.shape), p.dtype) for n, p in block.named_parameters())


def rewrite_loop_blocks(model: nn.Module) -> list[LoopBlockRewrite]:
    """Rewrite every loop-style MoE block of ``model`` in place; one report per candidate.

    Blocks with the same structure (class and parameter shapes: the layers of one model) are
    analysed once; each further block is still proven equal on its own weights before its
    forward is replaced. A block whose structure traced without a graph break, or did not run on
    a ``[B, T, H]`` input at all, is not traced again for the next layer (a trace per block was
    most of this step's time on deep models): such blocks are left to the graph pass, which
    proves each site on its own."""
    reports = []
    analysed: dict[tuple, _Analysis | None] = {}
    settled: dict[tuple, str] = {}   # structure -> the first block of it: one graph, or not runnable
    for cand in find_loop_block_candidates(model):
        key = _structure_key(cand.block)
        if key in settled:
            log.debug("grouter: %s: left to the graph pass, as %s of the same structure", cand.path, settled[key])
            continue
        report = rewrite_loop_block(cand, reuse=analysed.get(key))
        if report.rewritten and key not in analysed:
            analysed[key] = report._analysis
        if report.graph_breaks_before <= 0:
            settled[key] = cand.path
        if report.gating is None:
            # not an MoE block after all (e.g. attention: a Linear next to [E, ...] weights), or
            # one the graph pass handles because it has no graph break: nothing to tell the user
            log.debug("grouter: %s: %s", cand.path, report.reason)
            continue
        (log.info if report.rewritten else log.warning if report.graph_breaks_before > 0 else log.info)(
            "grouter: %s", report.summary())
        reports.append(report)
    return reports


def restore_loop_blocks(model: nn.Module) -> int:
    """Undo :func:`rewrite_loop_blocks`; returns how many blocks were restored."""
    n = 0
    for m in model.modules():
        if hasattr(m, "_grouter_original_forward"):
            del m.forward
            del m._grouter_original_forward
            grads = m.__dict__.pop("_grouter_empty_expert_grads", None)
            if grads is not None:
                grads.remove()
            n += 1
    return n
