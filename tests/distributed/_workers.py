"""The checks run inside the spawned gloo process groups (see ``_spawn.py``).

Every parity check compares an expert-parallel run with the single-process model on the same
global batch: the single-process model is rebuilt from the same seed in every process, so no
reference has to be shipped between processes. Convention: each rank's loss is its summed loss
divided by the *global* token count, so the losses and every gradient add up over ranks.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.distributed.device_mesh import init_device_mesh

from grouter_pass.distributed import (
    TinyEPMoELM,
    ep_moe_experts,
    fully_shard_non_experts,
    resolve_ep_group,
    shard_expert_parameters,
    splits_from_step_routing,
)
from grouter_pass.spec import ExpertMLP

from ._spawn import Recorder

E, K, B, T = 8, 2, 4, 6
RTOL = 1e-5
A2A = torch.ops._c10d_functional.all_to_all_single.default


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 61, (B, T), generator=g)
    labels = torch.randint(0, 61, (B, T), generator=g)
    experts = torch.rand(B, T, E, generator=g).topk(K, dim=-1).indices
    w = torch.rand(B, T, K, generator=g) + 0.1
    return ids, labels, (w / w.sum(-1, keepdim=True), experts)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _rows(world: int, rank: int) -> slice:
    per = B // world
    return slice(rank * per, (rank + 1) * per)


class _Case:
    """A single-process reference and its expert-parallel copy, sharded and ready."""

    def __init__(self, rank: int, world: int, *, learned: bool, perm: torch.Tensor | None) -> None:
        torch.manual_seed(0)
        self.rank, self.world, self.learned = rank, world, learned
        self.ref = TinyEPMoELM(experts=E, top_k=K, learned_router=learned)
        self.model = copy.deepcopy(self.ref)
        self.perm = perm if perm is not None else torch.arange(E)
        self.input_ids, self.labels, self.routing = _batch()
        self.epg = resolve_ep_group(None)
        example = (self.input_ids[:1], self.labels[:1], None if learned else tuple(r[:1] for r in self.routing))
        self.report = shard_expert_parameters(self.model, self.epg, num_experts=E, example_inputs=example,
                                              expert_perm=self.perm)
        self.model.enable_expert_parallel(self.epg, self.perm)

    def local_inputs(self):
        s = _rows(self.world, self.rank)
        routing = None if self.learned else tuple(r[s] for r in self.routing)
        splits = None
        if not self.learned:
            l2p = torch.argsort(self.perm)
            per_rank = [l2p[self.routing[1][_rows(self.world, r)].reshape(-1, K)] for r in range(self.world)]
            splits = splits_from_step_routing(per_rank, E, self.rank)
        return self.input_ids[s], self.labels[s], routing, splits

    def ref_loss(self) -> torch.Tensor:
        return self.ref(self.input_ids, self.labels, None if self.learned else self.routing) / (B * T)

    def compare(self, loss_local: torch.Tensor) -> dict:
        """Loss and every gradient against the reference (which must have run backward)."""
        loss = loss_local.detach().clone()
        dist.all_reduce(loss)
        errs = {"loss": _rel(loss, self.ref_loss_value)}
        ref_params = dict(self.ref.named_parameters())
        local = self.perm[self.rank * (E // self.world):(self.rank + 1) * (E // self.world)]
        for name, p in self.model.named_parameters():
            want = ref_params[name].grad
            if name in self.report.names:
                errs[name] = _rel(p.grad, want[local])
            else:
                g = p.grad.clone()
                dist.all_reduce(g)
                errs[name] = _rel(g, want)
        worst = max(errs, key=errs.get)
        assert errs[worst] <= RTOL, f"{worst}: relative error {errs[worst]:.3g} > {RTOL} ({errs})"
        return {"max_rel_err": errs[worst]}

    def run_reference(self) -> None:
        loss = self.ref_loss()
        loss.backward()
        self.ref_loss_value = loss.detach()


def _expected_expert_names(layers: int = 2) -> list[str]:
    return [f"layers.{i}.{n}" for i in range(layers) for n in ("w_up", "w_down", "b_up", "b_down")]


def check_parity(rank: int, world: int, *, learned: bool, perm: torch.Tensor | None) -> dict:
    case = _Case(rank, world, learned=learned, perm=perm)
    assert case.report.names == _expected_expert_names(), case.report.names
    case.run_reference()
    ids, labels, routing, splits = case.local_inputs()
    loss = case.model(ids, labels, routing, splits) / (B * T)
    loss.backward()
    return case.compare(loss)


def _capture_backend(graphs: dict[str, list]):
    def fw(gm, _inputs):
        graphs["fw"].append(gm)
        return make_boxed_func(gm.forward)

    def bw(gm, _inputs):
        graphs["bw"].append(gm)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=fw, bw_compiler=bw)


def _collectives(gm: torch.fx.GraphModule) -> list[torch.dtype]:
    """Input dtype of every all_to_all in the graph; and no other collective / host read may appear."""
    dtypes = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        if node.target is A2A:
            dtypes.append(node.args[0].meta["val"].dtype)
        elif "_c10d_functional" in name and "wait_tensor" not in name:
            raise AssertionError(f"unexpected collective {name} in the compiled graph")
        elif "_local_scalar_dense" in name:
            raise AssertionError(f"host read {name} in the compiled graph")
    return dtypes


def check_compiled_precomputed(rank: int, world: int) -> dict:
    """Grouter mode under torch.compile: same numbers, and the only collectives in the forward and
    backward graphs are the token all-to-alls (2 per MoE layer, float): no count exchange."""
    from torch._dynamo.utils import counters

    perm = torch.tensor([3, 0, 6, 1, 7, 2, 5, 4])
    case = _Case(rank, world, learned=False, perm=perm)
    case.run_reference()
    graphs: dict[str, list] = {"fw": [], "bw": []}
    compiled = torch.compile(case.model, backend=_capture_backend(graphs))
    ids, labels, routing, splits = case.local_inputs()
    loss = compiled(ids, labels, routing, splits) / (B * T)
    loss.backward()
    out = case.compare(loss)
    layers = len(case.model.layers)
    for kind in ("fw", "bw"):
        assert len(graphs[kind]) == 1, f"{len(graphs[kind])} {kind} graphs (graph break?)"
        dtypes = _collectives(graphs[kind][0])
        assert dtypes == [torch.float32] * (2 * layers), f"{kind} all_to_all inputs: {dtypes}"
    # new routing every step: the split sizes change; Dynamo recompiles once with them symbolic,
    # then never again
    for seed in (2, 3):
        case.input_ids, case.labels, case.routing = _batch(seed)
        ids, labels, routing, splits = case.local_inputs()
        compiled(ids, labels, routing, splits).backward()
    out["unique_graphs"] = counters["stats"]["unique_graphs"]
    assert out["unique_graphs"] <= 2, f"{out['unique_graphs']} compilations for 3 steps (automatic dynamic: 2)"
    return out


def check_fsdp_with_ep(rank: int, world: int, steps: int = 3) -> dict:
    """FSDP2 on the non-expert parameters + EP on the experts: train a few SGD steps; the loss of
    every step matches single-process training on the same global batches."""
    torch.manual_seed(0)
    ref = TinyEPMoELM(experts=E, top_k=K, learned_router=True)
    model = copy.deepcopy(ref)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    epg = resolve_ep_group(mesh)
    input_ids, labels, _ = _batch()
    report = shard_expert_parameters(model, mesh, num_experts=E, example_inputs=(input_ids[:1], labels[:1]))
    model.enable_expert_parallel(epg)
    fully_shard_non_experts(model, mesh, report.names)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, foreach=False)
    errs = []
    for step in range(steps):
        input_ids, labels, _ = _batch(10 + step)
        opt_ref.zero_grad()
        ref_loss = ref(input_ids, labels) / (B * T)
        ref_loss.backward()
        opt_ref.step()
        opt.zero_grad()
        s = _rows(world, rank)
        loss = model(input_ids[s], labels[s]) / (B * T)
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        errs.append(_rel(total, ref_loss.detach()))
    assert max(errs) <= RTOL, f"per-step loss relative errors {errs}"
    assert errs and float(ref_loss.detach()) != 0
    return {"loss_rel_errs": errs}


def check_bad_ep_size(rank: int, world: int) -> dict:
    """An EP size that does not divide E is refused naming both values."""
    odd = {2: 7, 4: 6}[world]
    torch.manual_seed(0)
    model = TinyEPMoELM(experts=odd, top_k=K)
    try:
        shard_expert_parameters(model, None, num_experts=odd)
    except ValueError as exc:
        msg = str(exc)
        assert f"expert-parallel size {world}" in msg and f"number of experts {odd}" in msg, msg
        return {"message": msg}
    raise AssertionError(f"E={odd} over ep={world} was accepted")


def check_op_variants(rank: int, world: int) -> dict:
    """``ep_moe_experts`` against ``grouter.moe_experts`` on the full batch for the layouts the
    model does not use: transposed weights without biases; non-gated GELU with the routing weight
    on the input (Llama 4); output and gradients of x, routing weights and every expert weight."""
    g = torch.Generator().manual_seed(5)
    n, h, f, k = 5 * world, 8, 6, 3
    local = E // world
    epg = resolve_ep_group(None)
    worst = 0.0
    for v in (dict(activation="silu", gated=True, up_t=True, down_t=True, woi=False, bias=False),
              dict(activation="gelu", gated=False, up_t=False, down_t=False, woi=True, bias=True)):
        up_out = 2 * f if v["gated"] else f
        x = torch.randn(n, h, generator=g)
        ids = torch.rand(n, E, generator=g).topk(k, dim=-1).indices
        w = torch.rand(n, k, generator=g)
        params = [torch.randn(E, h, up_out, generator=g) if v["up_t"] else torch.randn(E, up_out, h, generator=g),
                  torch.randn(E, f, h, generator=g) if v["down_t"] else torch.randn(E, h, f, generator=g)]
        params += [torch.randn(E, up_out, generator=g), torch.randn(E, h, generator=g)] if v["bias"] else [None, None]
        proj = torch.randn(n, h, generator=g)
        mlp = ExpertMLP(activation=v["activation"], gated=v["gated"], up_transposed=v["up_t"],
                        down_transposed=v["down_t"], weight_on_input=v["woi"])
        full = [t.clone().requires_grad_() if t is not None else None for t in (x, w, *params)]
        perm, inv, _, offsets = torch.ops.grouter.dispatch_plan(ids, E)
        out, _ = torch.ops.grouter.moe_experts(full[0], full[1], perm, inv, offsets, *full[2:], *mlp.kwargs().values(),
                                               None)
        (out * proj).sum().backward()
        rows = slice(rank * (n // world), (rank + 1) * (n // world))
        experts = slice(rank * local, (rank + 1) * local)
        mine = [x[rows].clone(), w[rows].clone()] + [t[experts].clone() if t is not None else None for t in params]
        mine = [t.requires_grad_() if t is not None else None for t in mine]
        out_r = ep_moe_experts(mine[0], mine[1], ids[rows], *mine[2:], ep=epg, num_experts=E, mlp=mlp)
        (out_r * proj[rows]).sum().backward()
        pairs = [(out_r, out[rows]), (mine[0].grad, full[0].grad[rows]), (mine[1].grad, full[1].grad[rows])]
        pairs += [(m.grad, fu.grad[experts]) for m, fu in zip(mine[2:], full[2:]) if m is not None]
        errs = [_rel(a, b) for a, b in pairs]
        assert max(errs) <= RTOL, f"{v}: relative errors {errs}"
        worst = max(worst, *errs)
    return {"max_rel_err": worst}


def worker_ep2(rec: Recorder, rank: int, world: int) -> None:
    perm = torch.tensor([5, 2, 7, 0, 1, 6, 3, 4])
    rec.check("exact", lambda: check_parity(rank, world, learned=True, perm=None))
    rec.check("op_variants", lambda: check_op_variants(rank, world))
    rec.check("exact_placed", lambda: check_parity(rank, world, learned=True, perm=perm))
    rec.check("precomputed", lambda: check_parity(rank, world, learned=False, perm=perm))
    rec.check("compiled_precomputed", lambda: check_compiled_precomputed(rank, world))
    rec.check("fsdp_ep", lambda: check_fsdp_with_ep(rank, world))
    rec.check("bad_ep_size", lambda: check_bad_ep_size(rank, world))


def worker_ep4(rec: Recorder, rank: int, world: int) -> None:
    perm = torch.tensor([6, 1, 4, 3, 0, 7, 2, 5])
    rec.check("exact", lambda: check_parity(rank, world, learned=True, perm=None))
    rec.check("op_variants", lambda: check_op_variants(rank, world))
    rec.check("precomputed", lambda: check_parity(rank, world, learned=False, perm=perm))
    rec.check("bad_ep_size", lambda: check_bad_ep_size(rank, world))
