"""Benchmark: a whole tiny MoE LM training step (forward + backward), learned routing vs Grouter.

Model: transformers Qwen3-MoE from config, random init: 8 layers, E=64, k=8, hidden 256,
moe_intermediate 128, 4096 tokens per step (batch x seq), fp32, 2 threads, allocator pinned.

Rows (one process, same inputs, interleaved timed calls, median; compilation in the warm-up):
  hf grouped_mm + compile   transformers' default experts path under torch.compile (Inductor),
                            learned routers + auxiliary balance loss (output_router_logits=True)
  grouter exact             apply_grouter, the model's own routers (same numbers), + aux loss
  grouter online            apply_grouter(GrouterRouting(grouter)): one frozen Grouter
                            (1 layer, d=128) on the token ids, one dispatch plan for all layers
  grouter precomputed       apply_grouter(PrecomputedRouting()): the same routing delivered with
                            the batch (computed before the step, as pre-dispatch stores it)

    python examples/benchmarks/bench_training_step.py [--tokens 4096] [--seq 512] [--iters 5]
"""

from __future__ import annotations

import argparse
import os
import sys

# allocator pinned (docs/performance.md); OpenMP's wait policy stays at its default, what users
# run (PASSIVE charges a thread wake-up to every short parallel region, slowing the baseline's many
# small ATen ops far more than the grouter rows)
PINNED = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
if any(os.environ.get(k) != v for k, v in PINNED.items()):
    os.execvpe(sys.executable, [sys.executable, *sys.argv], {**os.environ, **PINNED})

import torch  # noqa: E402

import grouter_pass  # noqa: E402
from grouter_pass import GrouterConfig, GrouterRouting, PrecomputedRouting, apply_grouter  # noqa: E402
from grouter_pass.router import Grouter, GrouterModelConfig  # noqa: E402
from grouter_pass.testing.timing import lm_training_step, time_interleaved  # noqa: E402


def make_model(args: argparse.Namespace, aux: bool) -> torch.nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.AutoConfig.for_model(
        "qwen3_moe", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.ffn, num_experts=args.experts, num_experts_per_tok=args.topk,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        norm_topk_prob=True, output_router_logits=aux, router_aux_loss_coef=0.01, max_position_embeddings=4096)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).train()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.tokens // args.seq, args.seq), generator=gen)
    torch.manual_seed(1)
    grouter = Grouter(GrouterModelConfig(vocab_size=args.vocab, hidden_size=128, num_heads=2, num_layers=1,
                                         intermediate_size=256, num_experts=args.experts, top_k=args.topk))
    with torch.no_grad():
        weights, expert_ids = grouter.route(ids)

    rows = {
        "hf grouped_mm + compile": lm_training_step(torch.compile(make_model(args, aux=True)), ids),
        "grouter exact": lm_training_step(apply_grouter(make_model(args, aux=True)), ids),
        "grouter online": lm_training_step(apply_grouter(make_model(args, aux=False),
                                                GrouterConfig(routing=GrouterRouting(grouter=grouter))), ids),
        "grouter precomputed": lm_training_step(apply_grouter(make_model(args, aux=False),
                                                     GrouterConfig(routing=PrecomputedRouting())), ids,
                                       lambda: grouter_pass.routing(weights, expert_ids)),
    }
    ms = time_interleaved(rows, warmup=args.warmup, iters=args.iters)
    base = ms["hf grouped_mm + compile"]
    print(f"training step: {args.layers} layers, E={args.experts} k={args.topk} H={args.hidden} I={args.ffn}, "
          f"{args.tokens} tokens, fp32, {args.threads} threads, torch {torch.__version__}")
    print(f"{'row':28s} {'s/step':>8s} {'speed-up vs hf compiled':>24s}")
    for name, t in ms.items():
        print(f"{name:28s} {t / 1e3:8.2f} {base / t:23.2f}x")


if __name__ == "__main__":
    main()
