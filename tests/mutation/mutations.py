"""The fixed list of mutations. Each replaces one exact snippet (that must occur once) in one
product file; ``tests`` are the test files (or node ids) that must fail with it applied.

A mutation is meaningful when it is a defect a developer could plausibly write and that changes
what the product computes for some model; the harness first checks that the tests pass on the
unmutated copy, so "caught" always means "caught this defect".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str


OPS = "grouter_pass/ops/"

MUTATIONS: tuple[Mutation, ...] = (
    # ---- ops: routing ----------------------------------------------------------------------
    Mutation("group-score-max-as-min", OPS + "reference.py",
             "group_scores_NG = grouped_NGX.amax(dim=-1)", "group_scores_NG = grouped_NGX.amin(dim=-1)",
             ("tests/ops/test_ops.py",),
             "group-limited routing by the group's best expert (DeepSeek-V2) picks the worst groups"),
    Mutation("route-scale-applied-twice", OPS + "reference.py",
             "        w = w * scaling_factor\n", "        w = w * scaling_factor * scaling_factor\n",
             ("tests/ops/test_ops.py", "tests/ops/test_reference.py"),
             "routed_scaling_factor squared (DeepSeek-V3's 2.5 becomes 6.25)"),
    Mutation("bias-in-the-weights-ignored", OPS + "reference.py",
             "        if bias_mode == \"score\":\n            scores = sel\n",
             "        if bias_mode == \"score\":\n            pass\n",
             ("tests/ops/test_ops.py",),
             "a bias that is part of the score is dropped from the weights (kept in the selection)"),
    # ---- ops: the dispatch plan ------------------------------------------------------------
    Mutation("plan-offsets-exclusive", OPS + "reference.py",
             "    offsets_E = counts_E.cumsum(0).to(torch.int32)\n    return perm_S, inv_perm_S, counts_E, offsets_E",
             "    offsets_E = (counts_E.cumsum(0) - counts_E).to(torch.int32)\n"
             "    return perm_S, inv_perm_S, counts_E, offsets_E",
             ("tests/ops/test_reference.py", "tests/integration/test_config_paths.py"),
             "expert segment ends read as starts: every expert gets its predecessor's rows"),
    Mutation("plan-inverse-is-the-permutation", OPS + "reference.py",
             "inv_perm_S = torch.empty_like(perm_S).scatter_(0, perm_S, arange_S)",
             "inv_perm_S = perm_S.clone()",
             ("tests/ops/test_reference.py", "tests/ops/test_cpu_experts.py"),
             "the combine gathers slot outputs with the permutation instead of its inverse"),
    # ---- ops: experts ----------------------------------------------------------------------
    Mutation("bf16-experts-combine-in-bf16", OPS + "reference.py",
             "    combine_dtype = torch.promote_types(compute_dtype, weights_NK.dtype)\n"
             "    segs = _segments(offsets_E)\n"
             "    tok_S = torch.div(perm_S, k, rounding_mode=\"floor\")\n"
             "    w_sorted_S1 = weights_NK.reshape(-1).index_select(0, perm_S).unsqueeze(-1)\n"
             "    x_sorted_SH",
             "    combine_dtype = compute_dtype\n    segs = _segments(offsets_E)\n"
             "    tok_S = torch.div(perm_S, k, rounding_mode=\"floor\")\n"
             "    w_sorted_S1 = weights_NK.reshape(-1).index_select(0, perm_S).unsqueeze(-1)\n"
             "    x_sorted_SH",
             ("tests/ops/test_ops.py",),
             "bf16 experts weight and sum their outputs in bf16, not fp32 (a third of the elements change)"),
    Mutation("cpu-experts-unweighted", OPS + "cpu_experts.py",
             "        y_e.mul_(w_sorted_S1[s0:s1])\n", "",
             ("tests/ops/test_cpu_experts.py", "tests/integration/test_config_paths.py"),
             "the CPU fast path forgets the routing weight of every slot"),
    Mutation("cpu-experts-routing-grad-halved", OPS + "cpu_experts.py",
             "            gw = (ga * a).sum(dim=-1)\n", "            gw = (ga * a).sum(dim=-1) * 0.5\n",
             ("tests/ops/test_cpu_experts.py", "tests/integration/test_config_paths.py"),
             "the gradient of the routing weights (what trains the router) is off by a factor"),
    Mutation("experts-down-bias-grad-dropped", OPS + "reference.py",
             "            grad_b_down = _grouped_bias_grad(gy_SH, segs, b_down)",
             "            grad_b_down = torch.zeros_like(b_down)",
             ("tests/ops/test_ops.py", "tests/ops/test_reference.py"),
             "expert output biases (GPT-OSS) get no gradient"),
    Mutation("gelu-read-as-tanh-gelu", OPS + "reference.py",
             "    if kind == \"gelu\":\n        return torch.nn.functional.gelu(g)\n",
             "    if kind == \"gelu\":\n        return torch.nn.functional.gelu(g, approximate=\"tanh\")\n",
             ("tests/ops/test_ops.py", "tests/ops/test_reference.py"),
             "exact GELU experts computed with the tanh approximation"),
    # ---- detector --------------------------------------------------------------------------
    Mutation("probe-compares-shapes-only", "passes/detect/experts.py",
             "    return a.shape == b.shape and compare_max(a, b.to(a.dtype)).ok",
             "    return a.shape == b.shape",
             ("tests/passes/test_near_misses.py", "tests/integration/test_fuzz.py"),
             "the experts probe accepts any reading of the right shape"),
    Mutation("gradient-proof-always-passes", "passes/detect/experts.py",
             "    got, leaves = probe.run_region(trial, grad=True)\n    gen = torch.Generator().manual_seed(11)",
             "    return None\n    got, leaves = probe.run_region(trial, grad=True)\n"
             "    gen = torch.Generator().manual_seed(11)",
             ("tests/passes/test_gradient_proof.py", "tests/integration/test_fuzz.py"),
             "sites proved on forward values alone (a detached routing weight would get gradients)"),
    Mutation("synthesis-drops-the-scale", "passes/detect/routing.py",
             "renorm_eps=eps, renorm_clamp_min=clamp, renorm_p=p, scaling_factor=factor,",
             "renorm_eps=eps, renorm_clamp_min=clamp, renorm_p=p, scaling_factor=1.0,",
             ("tests/integration/test_support_matrix.py",),
             "the routing reading forgets the scaling factor it fitted"),
    Mutation("synthesis-reads-every-group-score-as-top2-sum", "passes/detect/routing.py",
             "bias_mode=sel.bias_mode, n_group=g[0], topk_group=g[1], group_score=g[2], renorm=renorm,",
             "bias_mode=sel.bias_mode, n_group=g[0], topk_group=g[1], group_score=\"top2_sum\", renorm=renorm,",
             ("tests/integration/test_support_matrix.py", "tests/integration/test_fuzz.py"),
             "a group score read as max is written into the spec as top-2 sum"),
    # ---- Grouter modes ---------------------------------------------------------------------
    Mutation("hash-weights-not-uniform", "grouter_pass/routing_sources.py",
             "weights = torch.full(ids.shape, 1.0 / self.top_k, dtype=torch.float32, device=flat.device)",
             "weights = torch.full(ids.shape, 1.0 / (self.top_k + 1), dtype=torch.float32, device=flat.device)",
             ("tests/grouter_mode/test_routing_sources.py",),
             "hash routing weights no longer 1/k"),
)
