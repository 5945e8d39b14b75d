"""Cross-rank all-to-all traffic with and without expert grouping / sample placement, for EP 8,
16 and 32 (simulated: no devices), as recorded in docs/distributed.md and docs/performance.md.

    python examples/distributed/traffic.py                       # the default corpus, stand-in router
    python examples/distributed/traffic.py --routing DIR_OR_NPZ  # a real pre-dispatched dataset

Without ``--routing`` it builds the routing of the built-in default corpus (the Python standard
library's sources, byte tokens, ``--tokens`` of the train split) through the real pre-dispatch
path (``grouter_pass.router.predispatch``, packed windows of ``--seq-len``), but with an
**untrained, randomly initialised Grouter** (E=128, k=8, small encoder) standing in for a
distilled one: no distilled checkpoint ships with the project. Its routing depends on the tokens
and their context, but it has not learnt the topic-level specialisation a router distilled from
a trained MoE has, which is what placement exploits; the numbers show the mechanism and the
bookkeeping, not the paper's gains. Re-run with ``--routing`` on a dataset pre-dispatched with a
distilled Grouter for the real table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from grouter_pass.distributed.placement import PlacementConfig
from grouter_pass.distributed.routing_data import load_routing
from grouter_pass.distributed.traffic import TrafficConfig, format_table, simulate_traffic


def standin_default_corpus(directory: Path, tokens: int, seq_len: int, seed: int) -> Path:
    """Pre-dispatch the default corpus with a randomly initialised Grouter (see the docstring)."""
    from grouter_pass.router.config import GrouterModelConfig
    from grouter_pass.router.data import ByteTokenizer, load_corpus
    from grouter_pass.router.network import Grouter
    from grouter_pass.router.predispatch import predispatch

    corpus = load_corpus("stdlib", "train", tokenizer=ByteTokenizer(), max_tokens=tokens)
    corpus.save(directory)
    torch.manual_seed(seed)
    grouter = Grouter(GrouterModelConfig(hidden_size=128, num_heads=4, num_layers=2, intermediate_size=256,
                                         num_experts=128, top_k=8))
    predispatch(grouter, directory, granularity="packed", seq_len=seq_len, progress=True)
    return directory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--routing", default=None, help="routing .npz or pre-dispatched dataset directory")
    p.add_argument("--tokens", type=int, default=1 << 19, help="default corpus: tokens to route")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--ep", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = args.routing or standin_default_corpus(Path(tmp), args.tokens, args.seq_len, args.seed)
        routing = load_routing(source, seq_len=args.seq_len)
        start = time.perf_counter()
        rows = simulate_traffic(routing, tuple(args.ep), traffic=TrafficConfig(),
                                placement_config=PlacementConfig(ep_size=1))
        elapsed = time.perf_counter() - start
    t = TrafficConfig()
    print(f"{routing.num_samples} samples x {args.seq_len} tokens, E={routing.num_experts}, k={routing.top_k}; "
          f"bytes for hidden={t.hidden}, {t.moe_layers} MoE layers, bf16, {t.samples_per_rank_per_step} samples "
          f"per rank per step; placement + simulation {elapsed:.1f} s")
    print(format_table(rows))


if __name__ == "__main__":
    main()
