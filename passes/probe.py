"""Prove a classification by running it: extract a matched region and compare it with the ops'
reference semantics on random inputs.

Detection reads structure; structure can mislead (an unusual cast, a scale applied before a
renorm, an activation that merely *looks* like SwiGLU). Before anything is rewritten, the
region of the original graph that a site will replace is cut out into its own GraphModule and
run on concrete random tensors (shapes from the node metadata, symbolic sizes at the values
seen while tracing) next to the reference implementation of the spec it was classified as.
Two probes per region: well-spread random routing, and heavily skewed routing that leaves most
experts empty. A site whose probe disagrees is left untouched, with the measured error as the
reason. Probes run in eager mode on the example's device, outside any fake-tensor mode, at
compile time only; their cost is one MoE layer forward per site.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from grouter_pass.numerics import compare
from grouter_pass.ops import reference
from grouter_pass.passes.graph_utils import hint_int, meta_val, shape_of, tensor_meta
from grouter_pass.spec import ExpertsSpec, GatingSpec, NoMatch


class _ProbeError(Exception):
    pass


def _eager(fn: Callable) -> Callable:
    """Run a probe outside any active fake-tensor mode (Dynamo calls backends with one active:
    random tensors made there would be fake, and every comparison meaningless) and without
    autograd."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily(), torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


def extract_region(region: Sequence[fx.Node], inputs: Sequence[fx.Node], outputs: Sequence[fx.Node]
                   ) -> tuple[fx.GraphModule, list[fx.Node]]:
    """Copy ``region`` into a standalone GraphModule ``f(*inputs, *externals) -> outputs``.

    ``externals`` are the other values the region reads (symbolic sizes, placeholders); the
    caller supplies concrete values for them.
    """
    in_set = set(inputs)
    region_set = set(region) - in_set
    externals: list[fx.Node] = []
    for n in region:
        if n in in_set:
            continue
        if n.op == "placeholder":
            externals.append(n)
            continue
        for a in n.all_input_nodes:
            if a not in region_set and a not in in_set and a not in externals:
                externals.append(a)
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, n in enumerate(inputs):
        env[n] = g.placeholder(f"in_{i}")
    for i, n in enumerate(externals):
        env[n] = g.placeholder(f"ext_{i}")
    for n in region:
        if n not in env:
            env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(torch.nn.Module(), g), externals


def _concrete(val: Any) -> Any:
    if isinstance(val, (int, float, bool)) or val is None:
        return val
    if isinstance(val, torch.SymInt):
        return hint_int(val)
    if isinstance(val, (torch.SymFloat, torch.SymBool)) and val.node.hint is not None:
        return val.node.hint
    raise _ProbeError(f"cannot make a concrete value for {type(val).__name__}")


def _shape(node: fx.Node) -> list[int]:
    return [hint_int(d) for d in shape_of(node)]


def _run(region: Sequence[fx.Node], inputs: Sequence[fx.Node], values: Sequence[torch.Tensor],
         outputs: Sequence[fx.Node]) -> tuple:
    gm, externals = extract_region(region, inputs, outputs)
    region_set = set(region)
    ext_values = []
    for e in externals:
        t = tensor_meta(e)
        if t is None:
            ext_values.append(_concrete(meta_val(e)))
        elif all(_template_use(u, e) for u in e.users if u in region_set):
            # read only for its shape and dtype (zeros_like(probs)): any values will do
            ext_values.append(torch.zeros(_shape(e), dtype=t.dtype, device=t.device))
        else:
            raise _ProbeError(f"region reads tensor {e.name} that is not one of its inputs")
    return gm(*values, *ext_values)


_TEMPLATE_FUNCTIONS = (torch.zeros_like, torch.empty_like, torch.ones_like, torch.full_like)
_TEMPLATE_METHODS = ("new_zeros", "new_empty", "new_ones", "new_full", "size", "dim")


def _template_use(user: fx.Node, tensor: fx.Node) -> bool:
    """``user`` reads ``tensor`` only for its metadata (shape, dtype, device)."""
    if user.op == "call_function" and user.target in _TEMPLATE_FUNCTIONS:
        return user.args[0] is tensor and tensor not in user.args[1:] and tensor not in user.kwargs.values()
    return user.op == "call_method" and user.target in _TEMPLATE_METHODS and user.args[0] is tensor and \
        tensor not in user.args[1:]


def _close(actual: torch.Tensor, expected: torch.Tensor) -> tuple[bool, float]:
    c = compare(actual, expected)
    return c.ok, c.max_rel


def _device(node: fx.Node) -> torch.device:
    t = tensor_meta(node)
    return t.device if t is not None else torch.device("cpu")


@_eager
def probe_gating(spec: GatingSpec, region: Sequence[fx.Node], parse: Any, *, seed: int = 0) -> NoMatch | None:
    """Run the original gating region and ``route_reference(spec)`` on the same random logits."""
    logits, bias, weights, ids = parse.logits, parse.bias, parse.weights, parse.ids
    n, e = _shape(logits)
    dev, dtype = _device(logits), tensor_meta(logits).dtype
    gen = torch.Generator().manual_seed(seed)
    skew = torch.zeros(e)
    skew[: max(1, e // 4)] = 3.0
    trials = [torch.randn(n, e, generator=gen), torch.randn(n, e, generator=gen) * 0.5 + skew]
    for t, logits_val in enumerate(trials):
        logits_val = logits_val.to(device=dev, dtype=dtype)
        inputs, values = [logits], [logits_val]
        bias_val = None
        if bias is not None:
            bias_val = (torch.randn(_shape(bias), generator=gen) * 0.5).to(device=dev, dtype=tensor_meta(bias).dtype)
            inputs.append(bias)
            values.append(bias_val)
        try:
            got_w, got_ids = _run(region, inputs, values, [weights, ids])
        except _ProbeError as err:
            return NoMatch("gating probe could not run the original region: %s", (err,), partial=True)
        ref_w, ref_ids = reference.route_reference(logits_val, bias_val, **spec.route_kwargs())
        if not torch.equal(got_ids, ref_ids):
            # an unsorted top-k may order the same experts differently: compare as sets
            order_got, order_ref = got_ids.sort(dim=-1), ref_ids.sort(dim=-1)
            if not torch.equal(order_got.values, order_ref.values):
                return NoMatch("gating probe %d: classified as [%s] but selects different experts", (
                    t, spec.describe()), partial=True)
            if not parse.dense:
                got_w = got_w.gather(1, order_got.indices)
            ref_w = ref_w.gather(1, order_ref.indices)
            ref_ids = order_ref.values
        if parse.dense:  # the site hands the experts a dense [N, E]: zero where not selected
            ref_w = torch.zeros_like(got_w).scatter(1, ref_ids, ref_w.to(got_w.dtype))
        ok, err = _close(got_w, ref_w)
        if not ok:
            return NoMatch("gating probe %d: classified as [%s] but weights differ (rel err %.2e, dtypes %s/%s)", (
                t, spec.describe(), err, got_w.dtype, ref_w.dtype), partial=True)
    return None


def _random_ids(n: int, k: int, e: int, skewed: bool, gen: torch.Generator) -> torch.Tensor:
    if skewed:  # every token on the same k experts: all other experts are empty
        return torch.arange(k).expand(n, k).clone()
    return torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)]) if n else torch.empty(
        0, k, dtype=torch.int64)


@_eager
def probe_experts(match: Any, *, ids: fx.Node, weights: fx.Node, dense: bool = False, seed: int = 0
                  ) -> NoMatch | None:
    """Run the original expert region and ``moe_experts_reference(spec)`` on the same inputs.

    ``dense``: the region reads the routing weights as a dense ``[N, E]`` tensor (zero for
    unselected experts) rather than ``[N, K]``."""
    spec: ExpertsSpec = match.spec
    n, k = _shape(ids)
    e = spec.num_experts
    dev = _device(match.x)
    gen = torch.Generator().manual_seed(seed)

    def rand(node: fx.Node, scale: float) -> torch.Tensor:
        return (torch.randn(_shape(node), generator=gen) * scale).to(device=dev, dtype=tensor_meta(node).dtype)

    params = [p for p in (match.w_gate, match.w_up, match.w_down, match.b_gate, match.b_up, match.b_down)
              if p is not None]
    extra = [match.combine_base] if match.combine_base is not None else []
    up_dim = 2 if spec.up_transposed else 1
    for t, skewed in enumerate((False, True)):
        ids_val = _random_ids(n, k, e, skewed, gen).to(dev)
        w_sparse = (torch.rand(n, k, generator=gen) + 0.1).to(device=dev, dtype=tensor_meta(weights).dtype)
        w_val = torch.zeros(n, e, dtype=w_sparse.dtype, device=dev).scatter(1, ids_val, w_sparse) if dense else w_sparse
        x_val = rand(match.x, 1.0)
        p_vals = {p: rand(p, 0.2) for p in params}
        extra_vals = [rand(b, 1.0) for b in extra]
        try:
            (got,) = _run(match.region, [ids, weights, match.x, *params, *extra],
                          [ids_val, w_val, x_val, *p_vals.values(), *extra_vals], [match.output])
        except _ProbeError as err:
            return NoMatch("experts probe could not run the original region: %s", (err,), partial=True)
        except Exception as err:  # noqa: BLE001 - the region itself failed on valid inputs
            return NoMatch("experts probe: the original region failed on random routing: %s", (err,), partial=True)
        w_up = p_vals[match.w_up]
        b_up = p_vals.get(match.b_up)
        if match.w_gate is not None:  # the op takes [gate; up] concatenated
            w_up = torch.cat([p_vals[match.w_gate], w_up], dim=up_dim)
            if b_up is not None:
                b_up = torch.cat([p_vals[match.b_gate], b_up], dim=1)
        plan = reference.dispatch_plan_reference(ids_val, e)
        ref, _ = reference.moe_experts_reference(x_val, w_sparse, plan[0], plan[1], plan[3], w_up, p_vals[match.w_down],
                                                 b_up, p_vals.get(match.b_down), **spec.op_kwargs())
        if extra_vals:
            ref = (extra_vals[0] + ref).to(got.dtype)
        ok, err = _close(got, ref)
        if not ok:
            return NoMatch("experts probe %d (%s routing): classified as [%s] but outputs differ (rel err %.2e)", (
                t, "skewed" if skewed else "random", spec.describe(), err), partial=True)
    return None
