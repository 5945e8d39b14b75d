"""Forward/backward parity of a rewritten model against the unmodified one.

Used by the tests, the demo and the benchmarks, so that "the same function" is checked the same
way everywhere: one forward and one backward of the original model in eager mode and of a deep
copy compiled with the grouter pass, on the same inputs; then the output, the gradient of every
floating-point input and the gradient of every parameter are compared with
:func:`grouter_pass.numerics.compare`. The loss is the output times a fixed random tensor, so
that every output element carries a distinct, non-trivial gradient (``out.sum()`` would hide
errors that cancel).

A gradient that is mathematically zero (the query/key projections of one-token attention, say)
holds only rounding noise in both runs; relative error is meaningless there. Gradients whose
magnitude is below ``ZERO_GRAD_FRACTION`` of the largest gradient are therefore compared against
the largest gradient's magnitude instead of their own.

Parity alone cannot tell a correct rewrite from none at all: when an op is wrong, the probe
refuses the site and the model compiles unchanged, with perfect parity. Every check therefore
also states what the compiled graphs must hold (``expect_ops``, the ``torch.ops.grouter`` calls
counted in ``counters["grouter_ops"]``) and fails when they hold anything else.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._dynamo.utils import counters

from grouter_pass.numerics import Comparison, compare

ZERO_GRAD_FRACTION = 1e-4


@dataclass
class ParityResult:
    output: Comparison
    input_grads: dict[str, Comparison] = field(default_factory=dict)
    param_grads: dict[str, Comparison] = field(default_factory=dict)
    missing_grads: list[str] = field(default_factory=list)
    #: ``torch.ops.grouter`` calls in the graphs compiled during the check (``{"grouter.route": 2, ...}``)
    ops: dict[str, int] = field(default_factory=dict)

    def all(self) -> dict[str, Comparison]:
        return {"output": self.output, **{f"grad[{k}]": v for k, v in self.input_grads.items()},
                **{f"grad[{k}]": v for k, v in self.param_grads.items()}}

    @property
    def worst(self) -> tuple[str, Comparison]:
        return max(self.all().items(), key=lambda kv: kv[1].max_rel)

    @property
    def ok(self) -> bool:
        return not self.missing_grads and all(c.ok for c in self.all().values())

    def max_rel(self, which: str = "all") -> float:
        if which == "output":
            return self.output.max_rel
        if which == "grads":
            vals = [c.max_rel for c in {**self.input_grads, **self.param_grads}.values()]
            return max(vals) if vals else 0.0
        return self.worst[1].max_rel

    def summary(self) -> str:
        name, c = self.worst
        grads = len(self.input_grads) + len(self.param_grads)
        return (f"output max rel err {self.output.max_rel:.2e}; {grads} gradients, worst {name} "
                f"max rel err {c.max_rel:.2e}" + (f"; MISSING {self.missing_grads}" if self.missing_grads else ""))


def default_output(out: Any) -> torch.Tensor:
    """The tensor to compare: ``.logits`` of a transformers output, the first element of a
    tuple, or the output itself."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def run_step(m: Callable, params: torch.nn.Module, inputs: dict[str, Any], output_fn: Callable, backward: bool,
          seed: int) -> tuple[torch.Tensor, dict, dict]:
    """One forward (+ backward of ``sum(out * fixed random)``); returns (out, input grads, param grads)."""
    for p in params.parameters():
        p.grad = None
    leaf = {k: (v.detach().clone().requires_grad_(backward) if isinstance(v, torch.Tensor) and v.is_floating_point()
                else v) for k, v in inputs.items()}
    out = output_fn(m(**leaf))
    if backward:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        proj = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out.device, out.dtype)
        (out * proj).sum().backward()
    in_grads = {k: v.grad for k, v in leaf.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    p_grads = {n.removeprefix("_orig_mod."): p.grad for n, p in params.named_parameters()}
    return out.detach(), in_grads, p_grads


def compare_steps(got: tuple, ref: tuple, rtol: float | None, atol: float | None) -> ParityResult:
    (got_out, got_in, got_p), (ref_out, ref_in, ref_p) = got, ref
    result = ParityResult(output=compare(got_out, ref_out, rtol=rtol, atol=atol))
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, g, other in [(f"in:{k}", g, got_in.get(k)) for k, g in ref_in.items()] + [
            (n, g, got_p.get(n)) for n, g in ref_p.items()]:
        if g is None and other is None:
            continue
        if g is None or other is None:
            # no gradient and an all-zero gradient are the same numbers (an expert that received
            # no token: a loop skips it, a grouped GEMM gives it zeros); anything else is missing
            present = g if g is not None else other
            if present.count_nonzero() > 0:
                result.missing_grads.append(name.removeprefix("in:"))
            continue
        pairs[name] = (other, g)
    largest = max((g.abs().max().item() for _, g in pairs.values() if g.numel()), default=0.0)
    for name, (g_got, g_want) in pairs.items():
        own = g_want.abs().max().item() if g_want.numel() else 0.0
        scale = largest if own < ZERO_GRAD_FRACTION * largest else None
        c = compare(g_got, g_want, rtol=rtol, atol=atol, scale=scale)
        if name.startswith("in:"):
            result.input_grads[name[3:]] = c
        else:
            result.param_grads[name] = c
    return result


class RewriteMismatch(AssertionError):
    """The compiled graphs hold other ``grouter`` ops than the check expected."""


def exact_ops(sites: int, *, route: bool = True, capacity: bool = False) -> dict[str, int]:
    """What ``sites`` MoE layers become in exact mode: a ``grouter.route`` each (unless the
    gating is kept as the model wrote it), a dispatch plan and the experts op (and a
    ``capacity_keep`` for capacity-based dispatch)."""
    ops = {"grouter.dispatch_plan": sites, "grouter.moe_experts": sites}
    if route:
        ops["grouter.route"] = sites
    if capacity:
        ops["grouter.capacity_keep"] = sites
    return ops


def _ops_since(before: Counter) -> dict[str, int]:
    return dict(sorted((Counter(counters["grouter_ops"]) - before).items()))


def _check_ops(got: dict[str, int], expect: Mapping[str, int] | None) -> None:
    if expect is not None and got != dict(sorted(expect.items())):
        raise RewriteMismatch(f"the compiled graphs hold grouter ops {got}, expected {dict(sorted(expect.items()))} "
                              "(a site the probe refused is compiled as the model wrote it)")


def check_parity(model: torch.nn.Module, inputs: dict[str, torch.Tensor], compile_fn: Callable[[torch.nn.Module],
                 Callable], *, expect_ops: Mapping[str, int] | None,
                 output_fn: Callable[[Any], torch.Tensor] = default_output, seed: int = 1234,
                 rtol: float | None = None, atol: float | None = None, backward: bool = True,
                 runs: int = 1) -> ParityResult:
    """Compare ``model`` (eager) with ``compile_fn(deepcopy(model))`` forward and backward.

    Float inputs get ``requires_grad`` so their gradients are compared too (feed
    ``inputs_embeds`` instead of ``input_ids`` to check the input gradient of an LM). With
    ``runs > 1`` the compiled model is called that many times and the last call is compared
    (recompiles and stale state would show). ``expect_ops`` (required): the ``grouter`` op calls
    the graphs compiled during the check must hold in all (:func:`exact_ops`; ``{}`` for a
    model that must stay unchanged); :class:`RewriteMismatch` otherwise. ``None`` skips that
    check, for callers that cannot know (the demo on an arbitrary model).
    """
    before = Counter(counters["grouter_ops"])
    candidate = copy.deepcopy(model)
    compiled = compile_fn(candidate)
    ref = run_step(model, model, inputs, output_fn, backward, seed)
    for _ in range(runs):
        got = run_step(compiled, candidate, inputs, output_fn, backward, seed)
    result = compare_steps(got, ref, rtol, atol)
    result.ops = _ops_since(before)
    _check_ops(result.ops, expect_ops)
    return result


def parity_sweep(model: torch.nn.Module, make_inputs: Callable[[int, int], dict[str, Any]],
                 sizes: list[tuple[int, int]], compile_fn: Callable[[torch.nn.Module], Callable], *,
                 expect_ops: Mapping[str, int] | None,
                 output_fn: Callable[[Any], torch.Tensor] = default_output, backward: bool = True,
                 rtol: float | None = None, atol: float | None = None) -> list[ParityResult]:
    """:func:`check_parity` for several ``(batch, seq)`` sizes with **one** compiled copy, so that
    a test can also count the compiles the sizes caused (``expect_ops``: summed over them)."""
    before = Counter(counters["grouter_ops"])
    candidate = copy.deepcopy(model)
    compiled = compile_fn(candidate)
    results = []
    for i, (batch, seq) in enumerate(sizes):
        inputs = make_inputs(batch, seq)
        ref = run_step(model, model, inputs, output_fn, backward, 1234 + i)
        got = run_step(compiled, candidate, inputs, output_fn, backward, 1234 + i)
        results.append(compare_steps(got, ref, rtol, atol))
    ops = _ops_since(before)
    for r in results:
        r.ops = ops
    _check_ops(ops, expect_ops)
    return results
