"""Train a tiny, unmodified MoE with expert parallelism on CPU (gloo), launched by torchrun.

    torchrun --standalone --nproc-per-node 2 examples/distributed/train_ep.py --mode learned --fsdp
    torchrun --standalone --nproc-per-node 2 examples/distributed/train_ep.py --mode precomputed \\
        --routing routing.npz --placement placement.npz

The model (``TinyMoELM`` of ``BatchedGatherMoE`` blocks) is plain PyTorch: a router, top-k,
per-slot expert weights. ``apply_grouter(model, GrouterConfig(expert_parallel=mesh, ...))`` finds
its MoE layers in the graph and runs them expert-parallel: rank r stores and computes only its
experts (``shard_expert_parameters(keep_shape=True)``), for the tokens of every rank, moved with
the functional ``all_to_all_single``.

``--mode learned`` (exact mode): the model's routers route; each MoE layer exchanges its token
counts before its token all-to-all. ``--mode precomputed``: the routing of every sample is read
from ``--routing`` (a routing ``.npz``, e.g. from ``examples/distributed/make_routing.py``) and
delivered with the batch; each rank computes the step's split sizes from the routing of the
samples every rank reads in that step (the placement sampler is deterministic), so nothing is
exchanged before the tokens. ``--mode hash``: a random token-id hash table routes; the step runner
all-gathers the ``[E]`` counts once per step. ``--placement`` (from ``grouter placement``) binds
samples to ranks and permutes the experts; without it samples are dealt round robin and experts
sit in contiguous blocks.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

import grouter_pass
from grouter_pass import GrouterConfig, HashRouting, PrecomputedRouting, apply_grouter
from grouter_pass.distributed import fully_shard_non_experts, shard_expert_parameters, splits_from_step_routing
from grouter_pass.distributed.placement_file import Placement, load_placement
from grouter_pass.distributed.routing_data import load_routing
from grouter_pass.distributed.sampler import PlacementSampler
from grouter_pass.testing.handwritten import BatchedGatherMoE, TinyMoELM

log = logging.getLogger("train_ep")
VOCAB = 61


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("learned", "precomputed", "hash"), default="learned")
    p.add_argument("--routing", default=None, help="routing .npz (precomputed mode)")
    p.add_argument("--placement", default=None, help="placement .npz from `grouter placement`")
    p.add_argument("--experts", type=int, default=8, help="E (learned/hash mode; precomputed: the routing's)")
    p.add_argument("--samples", type=int, default=64, help="synthetic samples (learned/hash mode)")
    p.add_argument("--seq-len", type=int, default=16, help="tokens per sample (learned/hash mode)")
    p.add_argument("--batch-size", type=int, default=2, help="samples per rank per step")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--fsdp", action="store_true", help="FSDP2 on the non-expert parameters")
    p.add_argument("--compiler", default="aot_eager", choices=("aot_eager", "inductor"))
    return p.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))

    routing = load_routing(args.routing) if args.mode == "precomputed" else None
    if routing is not None:
        seq = int(routing.offsets[1])
        if not np.all(np.diff(routing.offsets) == seq):
            raise ValueError("this example needs samples of one length")
        num_samples, num_experts, top_k = routing.num_samples, routing.num_experts, routing.top_k
        ids_all = torch.from_numpy(routing.ids.astype(np.int64)).view(num_samples, seq, top_k)
    else:
        num_samples, num_experts, top_k, seq = args.samples, args.experts, 2, args.seq_len
    if args.placement:
        placement = load_placement(args.placement, num_experts=num_experts, ep_size=world, num_samples=num_samples)
    else:  # no placement: contiguous expert blocks, samples dealt round robin
        placement = Placement(expert_perm=np.arange(num_experts), sample_rank=np.arange(num_samples) % world,
                              num_experts=num_experts, ep_size=world)
    l2p = torch.from_numpy(placement.logical_to_physical)
    sampler = PlacementSampler(placement, rank, seed=0)

    g = torch.Generator().manual_seed(1234)           # the same synthetic tokens on every rank
    tokens = torch.randint(0, VOCAB, (num_samples, seq + 1), generator=g)

    torch.manual_seed(0)
    model = TinyMoELM(lambda: BatchedGatherMoE(hidden=16, ffn=12, experts=num_experts, top_k=top_k), hidden=16,
                      vocab=VOCAB)
    # store only this rank's experts ([E/R, ...]); the model still reads [E, ...] parameters, which the
    # rewrite replaces by the shards. Expert parameters are found by shape and dataflow (one forward).
    shards = shard_expert_parameters(model, mesh, num_experts=num_experts, example_inputs=(tokens[:1, :-1],),
                                     expert_perm=placement.expert_perm, keep_shape=True)
    if args.fsdp:
        fully_shard_non_experts(model, mesh, shards.names)
    source = {"learned": grouter_pass.LearnedRouter(), "precomputed": PrecomputedRouting(top_k=top_k),
              "hash": HashRouting.random(VOCAB, num_experts, top_k)}[args.mode]
    fast = apply_grouter(model, GrouterConfig(routing=source, expert_parallel=mesh, expert_placement=placement,
                                              compiler=args.compiler))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, foreach=False)

    steps = min(args.steps, len(sampler) // args.batch_size)
    global_tokens = world * args.batch_size * seq
    for step in range(steps):
        every_rank = sampler.step_samples(step, args.batch_size)   # what each rank reads this step
        mine = torch.from_numpy(every_rank[rank])
        batch = tokens[mine]
        ctx, splits = contextlib.nullcontext(), None
        if routing is not None:
            ids = ids_all[mine]
            splits = splits_from_step_routing(
                [l2p[ids_all[torch.from_numpy(s)]].reshape(-1, top_k) for s in every_rank], num_experts, rank)
            ctx = grouter_pass.routing(torch.full(ids.shape, 1.0 / top_k), ids, ep_splits=splits)  # stand-in gates
        opt.zero_grad()
        with ctx:
            logits = fast(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum") / global_tokens
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            sent = "" if splits is None else f", {sum(splits.input_splits) - splits.input_splits[rank]} of " \
                f"{sum(splits.input_splits)} slots leave rank 0"
            log.info("step %d: loss %.4f%s", step, float(total), sent)
    if rank == 0:
        report = grouter_pass.grouter_reports(fast)
        log.info("compiled graphs: %d; expert parallel: %s", len(report), report[0].expert_parallel if report else None)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
