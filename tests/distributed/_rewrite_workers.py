"""Checks of ``GrouterConfig(expert_parallel=...)``: the graph rewrite emits expert parallelism
for an unmodified model (``TinyMoELM`` of ``BatchedGatherMoE`` blocks: no grouter code in it).

Reference for each check, rebuilt from the same seed in every process:

* exact mode: the original eager model on the global batch;
* Grouter modes: the single-process rewrite with the same routing source on the global batch
  (its own parity with hand-written and transformers references is tested in tests/grouter_mode).

Loss convention (see ``docs/distributed.md``): each rank's loss is its summed loss divided by
the global token count, so losses and non-expert gradients add up over ranks. Expert gradients:
rank r's rows of each ``[E, ...]`` parameter must equal the reference's, its other rows are 0.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.distributed.device_mesh import init_device_mesh

import grouter_pass
from grouter_pass import GrouterConfig, HashRouting, PrecomputedRouting, apply_grouter
from grouter_pass.distributed import fully_shard_non_experts, shard_expert_parameters, splits_from_step_routing
from grouter_pass.distributed.placement_file import Placement
from grouter_pass.testing.handwritten import BatchedGatherMoE, TinyMoELM

from ._spawn import Recorder

E, K, B, T, V, H = 8, 2, 4, 6, 61, 16
RTOL = 1e-5
A2A = torch.ops._c10d_functional.all_to_all_single.default
EXPERT_PARAMS = ("up", "down")  # BatchedGatherMoE's [E, ...] parameters


def make_model(experts: int = E) -> TinyMoELM:
    torch.manual_seed(0)
    return TinyMoELM(lambda: BatchedGatherMoE(hidden=H, ffn=12, experts=experts, top_k=K), layers=2, hidden=H,
                     vocab=V)


def batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(B, T, K, generator=g) + 0.1
    ids = torch.rand(B, T, E, generator=g).topk(K, dim=-1).indices
    if seed % 2:   # skewed step: most tokens on expert 3, one expert of a rank left empty
        ids = torch.where(torch.rand(B, T, K, generator=g) < 0.7, ids.new_tensor(3), ids)
        ids[..., 1] = torch.where(ids[..., 0] == ids[..., 1], (ids[..., 0] + 1) % E, ids[..., 1])
    return {"tokens": torch.randint(0, V, (B, T), generator=g), "labels": torch.randint(0, V, (B, T), generator=g),
            "weights": w / w.sum(-1, keepdim=True), "ids": ids}


def rows(world: int, rank: int) -> slice:
    per = B // world
    return slice(rank * per, (rank + 1) * per)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def loss_of(model, tokens, labels, routing=None) -> torch.Tensor:
    ctx = grouter_pass.routing(*routing) if routing is not None else contextlib.nullcontext()
    with ctx:
        logits = model(tokens)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / (B * T)


def capture_aot_eager(graphs: dict[str, list]):
    """An aot_eager that keeps the forward and backward ATen graphs (patched in for the check)."""
    def keep(kind):
        def compiler(gm, _inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler
    return lambda gm, inputs: aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw"))(gm, inputs)


def collectives(gm: torch.fx.GraphModule) -> dict[str, list]:
    """Every collective and host read in an ATen graph: all_to_all input dtypes, other names."""
    out: dict[str, list] = {"all_to_all": [], "other": [], "host_reads": []}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        if node.target is A2A:
            out["all_to_all"].append(str(node.args[0].meta["val"].dtype).removeprefix("torch."))
        elif "_c10d_functional" in name and "wait_tensor" not in name:
            out["other"].append(name)
        elif "_local_scalar_dense" in name or "grouter.split_size" in name:
            out["host_reads"].append(name)
    return out


def placement_for(world: int, perm: list[int]) -> Placement:
    return Placement(expert_perm=np.array(perm), sample_rank=np.zeros(0, dtype=np.int64), num_experts=E,
                     ep_size=world)


def source(mode: str):
    if mode == "precomputed":
        return PrecomputedRouting(num_experts=E, top_k=K)
    if mode == "hash":
        return HashRouting.random(V, E, K, seed=3)
    if mode == "grouter":
        from grouter_pass.router import Grouter, GrouterModelConfig

        torch.manual_seed(7)
        return grouter_pass.GrouterRouting(grouter=Grouter(GrouterModelConfig(
            vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24, num_experts=E, top_k=K)))
    return grouter_pass.LearnedRouter()


def local_experts(rank: int, world: int, placement: Placement | None) -> list[int]:
    per = E // world
    return ([int(e) for e in placement.expert_perm[rank * per:(rank + 1) * per]] if placement is not None
            else list(range(rank * per, (rank + 1) * per)))


def compare_grads(model, ref, rank: int, world: int, placement: Placement | None) -> dict[str, float]:
    """Expert parameters: full ``[E, ...]`` (rows of other ranks must get exactly 0) or stored
    ``[E/R, ...]`` shards (``...parametrizations.<name>.original``); the rest summed over ranks."""
    errs = {}
    mine = local_experts(rank, world, placement)
    others = [e for e in range(E) if e not in mine]
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        r = ref_params[name.replace("parametrizations.", "").replace(".original", "")]
        if r.grad is None:   # routers in Grouter modes: no gradient in either
            assert p.grad is None, f"{name} has a gradient but the reference has none"
            continue
        if name.endswith(".original"):   # a stored shard: this rank's experts, in local order
            assert p.shape[0] == E // world, f"{name} stores {p.shape[0]} experts, expected {E // world}"
            errs[name] = rel(p.grad, r.grad[mine])
        elif name.rsplit(".", 1)[-1] in EXPERT_PARAMS:
            errs[name] = rel(p.grad[mine], r.grad[mine])
            assert float(p.grad[others].abs().max()) == 0.0, f"{name}: rows of other ranks' experts got a gradient"
        else:
            g = p.grad.clone()
            dist.all_reduce(g)
            errs[name] = rel(g, r.grad)
    return errs


def check_rewrite_parity(rank: int, world: int, mode: str, *, perm: list[int] | None = None, steps: int = 3,
                         given_splits: bool = False, compiler: str = "aot_eager", keep_shape: bool = False) -> dict:
    """``steps`` steps (a new batch and routing each, one skewed): loss and every gradient against
    the reference; the AOT graphs' collectives (aot_eager); one compilation for all steps."""
    torch._dynamo.reset()   # each check compiles the same code objects afresh (recompile limit)
    placement = placement_for(world, perm) if perm is not None else None
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    routing_source = source(mode)
    ref_model, model = make_model(), make_model()
    exact = mode == "learned"
    ref = ref_model if exact else apply_grouter(ref_model, GrouterConfig(routing=routing_source, compiler="aot_eager",
                                                                         fullgraph=True))
    cfg = GrouterConfig(routing=routing_source, expert_parallel=mesh, expert_placement=placement,
                        compiler=compiler, fullgraph=True)
    if keep_shape:   # store only this rank's experts; the model still reads [E, ...] parameters
        names = [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in EXPERT_PARAMS]
        shard_expert_parameters(model, mesh, num_experts=E, names=names, keep_shape=True,
                                expert_perm=placement.expert_perm if placement is not None else None)
    fast = apply_grouter(model, cfg)
    graphs: dict[str, list] = {"fw": [], "bw": []}
    from torch._dynamo.backends import debugging

    saved, debugging.aot_eager = debugging.aot_eager, capture_aot_eager(graphs)
    worst: dict[str, float] = {}
    try:
        for step in range(steps):
            b = batch(100 + step)
            s = rows(world, rank)
            for p in [*ref_model.parameters(), *model.parameters()]:
                p.grad = None
            debugging.aot_eager = saved   # the reference compiles with the plain aot_eager
            ref_loss = loss_of(ref, b["tokens"], b["labels"], None if exact or mode != "precomputed"
                               else (b["weights"], b["ids"]))
            ref_loss.backward()
            debugging.aot_eager = capture_aot_eager(graphs)
            routing = None
            if mode == "precomputed":
                splits = None
                if given_splits:   # every rank knows every rank's routing: no collective at all
                    l2p = torch.as_tensor(placement.logical_to_physical) if placement is not None else torch.arange(E)
                    splits = splits_from_step_routing([l2p[b["ids"][rows(world, r)].reshape(-1, K)]
                                                       for r in range(world)], E, rank)
                routing = (b["weights"][s], b["ids"][s])
                with grouter_pass.routing(*routing, ep_splits=splits):
                    logits = fast(b["tokens"][s])
                loss = F.cross_entropy(logits.flatten(0, 1), b["labels"][s].flatten(), reduction="sum") / (B * T)
            else:
                loss = loss_of(fast, b["tokens"][s], b["labels"][s])
            loss.backward()
            total = loss.detach().clone()
            dist.all_reduce(total)
            errs = {"loss": rel(total, ref_loss), **compare_grads(model, ref_model, rank, world, placement)}
            for k, v in errs.items():
                worst[k] = max(worst.get(k, 0.0), v)
    finally:
        debugging.aot_eager = saved
    name = max(worst, key=worst.get)
    assert worst[name] <= RTOL, f"{name}: relative error {worst[name]:.3g} > {RTOL} ({worst})"
    reports = grouter_pass.grouter_reports(fast)
    assert len(reports) == 1, f"{len(reports)} compilations for {steps} steps (expected 1)"
    rewritten = [s for s in reports[0].sites if s.rewritten]
    assert len(rewritten) == 2, reports[0].sites
    out = {"max_rel_err": worst[name], "expert_parallel": reports[0].expert_parallel}
    if compiler == "aot_eager":
        assert len(graphs["fw"]) == 1 and len(graphs["bw"]) == 1, f"{len(graphs['fw'])} forward graphs"
        out.update(fw=collectives(graphs["fw"][0]), bw=collectives(graphs["bw"][0]))
        built = [n.name for gm in graphs["fw"] + graphs["bw"] for n in gm.graph.nodes
                 if "experts_from_shard" in str(n.target)]
        assert not built, f"the full expert tensors are still built in the compiled graphs: {built}"
    return out


def check_2d_mesh(rank: int, world: int) -> dict:
    """A ``(dp=2, ep=2)`` mesh over 4 processes, exact mode, stored expert shards: each ``ep`` group
    runs EP on its own quarter-pair of the batch; after summing the expert gradients over ``dp``
    and the other gradients over the world, loss and every gradient match the single process."""
    torch._dynamo.reset()
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "ep"))
    ep_world, ep_rank = mesh["ep"].size(), mesh["ep"].get_local_rank()
    ref, model = make_model(), make_model()
    names = [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in EXPERT_PARAMS]
    report = shard_expert_parameters(model, mesh, num_experts=E, names=names, keep_shape=True)
    fast = apply_grouter(model, GrouterConfig(expert_parallel=mesh, compiler="aot_eager", fullgraph=True))
    b = batch(300)
    ref_loss = loss_of(ref, b["tokens"], b["labels"])
    ref_loss.backward()
    s = rows(world, rank)
    loss = loss_of(fast, b["tokens"][s], b["labels"][s])
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    errs = {"loss": rel(total, ref_loss)}
    ref_params = dict(ref.named_parameters())
    mine = local_experts(ep_rank, ep_world, None)
    for name, p in model.named_parameters():
        g = p.grad.clone()
        if name in report.names:    # complete within the ep group: sum the dp replicas
            dist.all_reduce(g, group=mesh["dp"].get_group())
            errs[name] = rel(g, ref_params[name.replace("parametrizations.", "").replace(".original", "")].grad[mine])
        else:
            dist.all_reduce(g)
            errs[name] = rel(g, ref_params[name].grad)
    worst = max(errs, key=errs.get)
    assert errs[worst] <= RTOL, f"{worst}: relative error {errs[worst]:.3g} ({errs})"
    return {"max_rel_err": errs[worst], "expert_parallel": grouter_pass.grouter_reports(fast)[0].expert_parallel}


def check_fsdp_with_ep_rewrite(rank: int, world: int, steps: int = 3) -> dict:
    """FSDP2 (non-expert parameters, summed gradients) + EP by the rewrite over stored expert shards,
    exact mode, SGD for a few steps: every step's loss matches single-process training on the same
    global batches."""
    torch._dynamo.reset()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    ref, model = make_model(), make_model()
    names = [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in EXPERT_PARAMS]
    report = shard_expert_parameters(model, mesh, num_experts=E, names=names, keep_shape=True)
    fully_shard_non_experts(model, mesh, report.names)   # experts: [E/R] shards, FSDP2: the rest
    fast = apply_grouter(model, GrouterConfig(expert_parallel=mesh, compiler="aot_eager"))
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, foreach=False)
    errs = []
    for step in range(steps):
        b = batch(200 + step)
        opt_ref.zero_grad()
        ref_loss = loss_of(ref, b["tokens"], b["labels"])
        ref_loss.backward()
        opt_ref.step()
        opt.zero_grad()
        s = rows(world, rank)
        loss = loss_of(fast, b["tokens"][s], b["labels"][s])
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        errs.append(rel(total, ref_loss))
    assert max(errs) <= RTOL, f"per-step loss relative errors {errs}"
    rewritten = sum(len([s for s in r.sites if s.rewritten]) for r in grouter_pass.grouter_reports(fast))
    assert rewritten >= 2, f"{rewritten} MoE sites rewritten under FSDP2"
    return {"loss_rel_errs": errs, "sites_rewritten": rewritten}


def check_refusals(rank: int, world: int) -> dict:
    """An EP size that does not divide E, and placements made for another E or EP size."""
    torch._dynamo.reset()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    messages = {}
    odd = {2: 7, 4: 6}[world]
    tokens = batch(1)["tokens"][:1]
    cases = {
        "ep_size": (make_model(experts=odd), GrouterConfig(expert_parallel=mesh, fullgraph=True, compiler="eager"),
                    (f"expert-parallel size {world}", f"number of experts {odd}")),
        "placement_E": (make_model(), GrouterConfig(expert_parallel=mesh, fullgraph=True, compiler="eager",
                                                    expert_placement=Placement(
                                                        expert_perm=np.arange(2 * E), sample_rank=np.zeros(0, int),
                                                        num_experts=2 * E, ep_size=world)),
                        (f"num_experts={2 * E}", f"num_experts={E}")),
        "placement_ep": (make_model(), GrouterConfig(expert_parallel=mesh, fullgraph=True, compiler="eager",
                                                     expert_placement=Placement(
                                                         expert_perm=np.arange(E), sample_rank=np.zeros(0, int),
                                                         num_experts=E, ep_size=2 * world)),
                         (f"ep_size={2 * world}", f"ep_size={world}")),
    }
    sharded = make_model()
    shard_expert_parameters(sharded, mesh, num_experts=E, keep_shape=True,
                            names=[n for n, _ in sharded.named_parameters() if n.rsplit(".", 1)[-1] in EXPERT_PARAMS])
    cases["sharded_without_ep"] = (sharded, GrouterConfig(fullgraph=True, compiler="eager"),
                                   ("sharded for expert parallelism", "GrouterConfig(expert_parallel=...)"))
    for name, (model, cfg, needles) in cases.items():
        try:
            apply_grouter(model, cfg)(tokens)
        except Exception as exc:   # Dynamo wraps the backend's ValueError
            msg = str(exc)
            assert all(n in msg for n in needles), f"{name}: {needles} not in {msg}"
            messages[name] = msg.splitlines()[0][:300]
            continue
        raise AssertionError(f"{name}: accepted")
    return {"messages": messages}


def worker_rewrite_ep2(rec: Recorder, rank: int, world: int) -> None:
    rec.check("exact", lambda: check_rewrite_parity(rank, world, "learned"))
    rec.check("exact_placed", lambda: check_rewrite_parity(rank, world, "learned", perm=[5, 2, 7, 0, 1, 6, 3, 4],
                                                           steps=2))
    rec.check("precomputed_placed", lambda: check_rewrite_parity(rank, world, "precomputed",
                                                                 perm=[3, 0, 6, 1, 7, 2, 5, 4]))
    rec.check("precomputed_given_splits", lambda: check_rewrite_parity(rank, world, "precomputed", steps=2,
                                                                       given_splits=True))
    rec.check("hash", lambda: check_rewrite_parity(rank, world, "hash", steps=2))
    rec.check("exact_sharded", lambda: check_rewrite_parity(rank, world, "learned", steps=2, keep_shape=True))
    rec.check("precomputed_sharded_placed", lambda: check_rewrite_parity(
        rank, world, "precomputed", steps=2, perm=[3, 0, 6, 1, 7, 2, 5, 4], keep_shape=True))
    rec.check("grouter", lambda: check_rewrite_parity(rank, world, "grouter", steps=2))
    rec.check("precomputed_inductor", lambda: check_rewrite_parity(rank, world, "precomputed", steps=2,
                                                                   perm=[3, 0, 6, 1, 7, 2, 5, 4], compiler="inductor"))
    rec.check("exact_inductor", lambda: check_rewrite_parity(rank, world, "learned", steps=2, compiler="inductor"))
    rec.check("fsdp_ep", lambda: check_fsdp_with_ep_rewrite(rank, world))
    rec.check("refusals", lambda: check_refusals(rank, world))


def worker_rewrite_ep4(rec: Recorder, rank: int, world: int) -> None:
    rec.check("exact", lambda: check_rewrite_parity(rank, world, "learned", steps=2))
    rec.check("exact_sharded", lambda: check_rewrite_parity(rank, world, "learned", steps=2, keep_shape=True))
    rec.check("precomputed_placed", lambda: check_rewrite_parity(rank, world, "precomputed",
                                                                 perm=[6, 1, 4, 3, 0, 7, 2, 5], steps=2))
    rec.check("mesh_2d", lambda: check_2d_mesh(rank, world))
    rec.check("refusals", lambda: check_refusals(rank, world))
