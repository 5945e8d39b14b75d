"""Benchmark: a whole MoE LM training step at several sizes, the grouter backend against
``torch.compile``, on random ids and on real text.

Model: transformers Qwen3-MoE from config (random init, fp32), one process, allocator pinned,
OpenMP at its default wait policy (what users run), timed calls interleaved, median.

Rows, per size and data:
  compile + aux       torch.compile (Inductor), transformers' grouped_mm experts, aux balance loss
  exact + aux         apply_grouter, the model's own routers (the same function), aux loss
  compile             torch.compile without the aux loss
  exact               apply_grouter without the aux loss
  precomputed         apply_grouter(PrecomputedRouting()): routing from a 1-layer Grouter,
                      delivered with the batch (as pre-dispatch stores it)

Sizes: ``demo`` (2 layers, E=16, k=4, H=128, I=64, 4 x 256 tokens), ``mid`` (4 layers, E=32,
k=4, H=256, I=256, 4 x 512), ``large`` (8 layers, E=64, k=8, H=256, I=128, 8 x 512).

    python examples/benchmarks/bench_sizes.py [--sizes demo mid large] [--data random text]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

PINNED = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
if any(os.environ.get(k) != v for k, v in PINNED.items()):
    os.execvpe(sys.executable, [sys.executable, *sys.argv], {**os.environ, **PINNED})

import torch  # noqa: E402

import grouter_pass  # noqa: E402
from grouter_pass import GrouterConfig, PrecomputedRouting, apply_grouter  # noqa: E402
from grouter_pass.router import Grouter, GrouterModelConfig  # noqa: E402
from grouter_pass.testing.timing import lm_training_step, time_interleaved  # noqa: E402

SIZES = {   # layers, E, k, H, I, batch, seq
    "demo": (2, 16, 4, 128, 64, 4, 256),
    "mid": (4, 32, 4, 256, 256, 4, 512),
    "large": (8, 64, 8, 256, 128, 8, 512),
    "tiny": (1, 4, 2, 64, 32, 1, 16),   # not a benchmark: the smoke test's size (tests/examples)
}
BENCHMARK_SIZES = ["demo", "mid", "large"]
VOCAB = 512


def make_model(size: str, aux: bool) -> torch.nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    layers, e, k, h, i, _, seq = SIZES[size]
    cfg = transformers.AutoConfig.for_model(
        "qwen3_moe", vocab_size=VOCAB, hidden_size=h, intermediate_size=4 * h, moe_intermediate_size=i,
        num_experts=e, num_experts_per_tok=k, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, norm_topk_prob=True, output_router_logits=aux, router_aux_loss_coef=0.01,
        max_position_embeddings=max(4096, seq))
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).train()


def token_ids(size: str, data: str) -> torch.Tensor:
    *_, batch, seq = SIZES[size]
    if data == "random":
        return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))
    from grouter_pass.router.data import ByteTokenizer, load_corpus

    corpus = load_corpus("stdlib", "validation", tokenizer=ByteTokenizer(), max_tokens=batch * seq)
    return torch.from_numpy(corpus.tokens[: batch * seq].astype("int64")).reshape(batch, seq)


def rows_for(size: str, ids: torch.Tensor) -> dict:
    _, e, k, *_ = SIZES[size]
    torch.manual_seed(1)
    grouter = Grouter(GrouterModelConfig(vocab_size=VOCAB, hidden_size=128, num_heads=2, num_layers=1,
                                         intermediate_size=256, num_experts=e, top_k=k))
    with torch.no_grad():
        weights, expert_ids = grouter.route(ids)
    return {
        "compile + aux": lm_training_step(torch.compile(make_model(size, aux=True)), ids),
        "exact + aux": lm_training_step(apply_grouter(make_model(size, aux=True)), ids),
        "compile": lm_training_step(torch.compile(make_model(size, aux=False)), ids),
        "exact": lm_training_step(apply_grouter(make_model(size, aux=False)), ids),
        "precomputed": lm_training_step(
            apply_grouter(make_model(size, aux=False), GrouterConfig(routing=PrecomputedRouting())), ids,
            lambda: grouter_pass.routing(weights, expert_ids)),
    }


def load() -> float:
    return os.getloadavg()[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=BENCHMARK_SIZES, help="sizes to run")
    p.add_argument("--data", nargs="+", choices=("random", "text"), default=["random", "text"],
                   help="random ids, and/or byte-tokenized text of the stdlib corpus")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per row (compilation happens here)")
    p.add_argument("--iters", type=int, default=5, help="timed calls per row")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    # every row compiles the same transformers code objects (with different backends): without
    # room for them, Dynamo stops compiling after 8 and later rows would silently run eager
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"torch {torch.__version__}, {args.threads} threads, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'default')}, code {commit or '?'}; load before {load():.2f}")
    print("| size | data | compile + aux (ms) | exact + aux | compile (ms) | exact | precomputed |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        for data in args.data:
            start = time.perf_counter()
            ms = time_interleaved(rows_for(size, token_ids(size, data)), warmup=args.warmup, iters=args.iters)
            a, b = ms["compile + aux"], ms["compile"]
            print(f"| {size} | {data} | {a:.1f} | {ms['exact + aux']:.1f} ({a / ms['exact + aux']:.2f}x) | {b:.1f} "
                  f"| {ms['exact']:.1f} ({b / ms['exact']:.2f}x) | {ms['precomputed']:.1f} "
                  f"({a / ms['precomputed']:.2f}x) |", flush=True)
            print(f"  ({size}/{data}: {time.perf_counter() - start:.0f} s with compilation)", file=sys.stderr)
    print(f"load after {load():.2f} (1-minute average)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
