"""Train a transformers MoE with the Hugging Face ``Trainer`` and the grouter backend.

Two recipes, on a tiny Qwen3-MoE built from a config (no download):

* ``--mode exact``: the model compiled by ``apply_grouter(model)`` is handed to the Trainer; the
  pass rewrites every MoE layer, the numbers are the model's own. (``TrainingArguments(
  torch_compile_backend="grouter")`` does not work: accelerate accepts only the backend names of
  its ``DynamoBackend`` enum and refuses any other.)
* ``--mode precomputed``: Grouter mode with routing delivered per batch. The model is compiled
  with ``apply_grouter(model, GrouterConfig(routing=PrecomputedRouting()))`` and handed to the
  Trainer; each batch carries its routing (here computed by a Grouter on the fly, as a
  pre-dispatched dataset stores it) and ``GrouterTrainer.compute_loss`` runs the step inside
  ``grouter_pass.routing(weights, ids)``. One warm-up call compiles the graphs, then
  ``trainable_parameters`` freezes the routers the rewrite no longer uses, so the Trainer's own
  optimizer (which skips frozen parameters) never touches them. The first Trainer step compiles
  once more (Dynamo guards on ``requires_grad``, which the freeze changed); later batches do not.

Run: ``python examples/hf_trainer.py --mode precomputed --steps 4 --out runs/hf-trainer``.

Not covered here: DDP. Launched with ``torchrun``, the Trainer wraps the model in
``DistributedDataParallel``, and Dynamo's DDP optimizer (``torch._dynamo.config.optimize_ddp``)
splits each graph at gradient-bucket boundaries; whether a gating site cut by such a split is
still rewritten is not tested yet.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import transformers
from torch.utils.data import Dataset

import grouter_pass
from grouter_pass import GrouterConfig, PrecomputedRouting, apply_grouter, trainable_parameters
from grouter_pass.router import Grouter, GrouterModelConfig

VOCAB, SEQ, EXPERTS, TOP_K, BATCH = 97, 16, 8, 2, 2


def tiny_moe(seed: int = 0) -> transformers.PreTrainedModel:
    cfg = transformers.AutoConfig.for_model(
        "qwen3_moe", hidden_size=64, intermediate_size=80, moe_intermediate_size=48, num_experts=EXPERTS,
        num_experts_per_tok=TOP_K, norm_topk_prob=True, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, use_cache=False)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg)


class RandomTokens(Dataset):
    """Token sequences (``labels`` = ``input_ids``: the model shifts them); with ``grouter``, each
    also carries its ``[S, k]`` routing, as ``predispatch_loader`` yields it."""

    def __init__(self, n: int, grouter: Grouter | None = None, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        self.routing = None
        if grouter is not None:
            with torch.no_grad():
                self.routing = grouter.route(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"input_ids": self.ids[i], "labels": self.ids[i]}
        if self.routing is not None:
            item["routing_weights"], item["routing_ids"] = self.routing[0][i], self.routing[1][i]
        return item


class GrouterTrainer(transformers.Trainer):
    """A ``Trainer`` whose steps run inside the batch's routing (pre-dispatch mode)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weights, ids = inputs.pop("routing_weights"), inputs.pop("routing_ids")
        with grouter_pass.routing(weights, ids):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)


def arguments(out: Path, steps: int, **kw) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False, dataloader_num_workers=0, seed=0, **kw)


def train_eager(out: Path, steps: int) -> transformers.Trainer:
    """The same training without the pass, for comparison."""
    trainer = transformers.Trainer(model=tiny_moe(), args=arguments(out, steps), train_dataset=RandomTokens(2 * steps))
    trainer.train()
    return trainer


def train_exact(out: Path, steps: int, compiler: str = "inductor") -> transformers.Trainer:
    fast = apply_grouter(tiny_moe(), GrouterConfig(compiler=compiler))
    trainer = transformers.Trainer(model=fast, args=arguments(out, steps), train_dataset=RandomTokens(2 * steps))
    trainer.train()
    return trainer


def train_precomputed(out: Path, steps: int, compiler: str = "inductor") -> transformers.Trainer:
    model = tiny_moe()
    grouter = Grouter(GrouterModelConfig(vocab_size=VOCAB, hidden_size=32, num_heads=2, num_layers=1,
                                         intermediate_size=64, num_experts=EXPERTS, top_k=TOP_K))
    data = RandomTokens(2 * steps, grouter)
    fast = apply_grouter(model, GrouterConfig(routing=PrecomputedRouting(num_experts=EXPERTS, top_k=TOP_K),
                                              compiler=compiler))
    warm = transformers.default_data_collator([data[i] for i in range(BATCH)])   # a batch as the Trainer builds it
    with grouter_pass.routing(warm.pop("routing_weights"), warm.pop("routing_ids")):
        fast(**warm)   # compiles
    trainable_parameters(fast)   # freezes the routers the rewrite made unused
    trainer = GrouterTrainer(model=fast, args=arguments(out, steps), train_dataset=data)
    trainer.train()
    return trainer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=("exact", "precomputed"), default="exact", help="which recipe to run")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps")
    p.add_argument("--out", type=Path, default=Path("runs/hf-trainer"), help="Trainer output directory")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    trainer = (train_exact if args.mode == "exact" else train_precomputed)(args.out, args.steps)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"{args.mode}: {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
