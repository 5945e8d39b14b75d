"""Spawned workers of tests/router/test_distill_scaling.py (top-level, so spawn can pickle them)."""

from __future__ import annotations

import torch

from grouter_pass.router import DistillConfig, GrouterModelConfig, distill
from tests.distributed._spawn import Recorder
from tests.router.test_distill import linear_teacher, random_corpus

CONFIG = GrouterModelConfig(vocab_size=16, hidden_size=16, num_heads=2, num_layers=1, intermediate_size=16,
                            num_experts=4, top_k=2)
SETTINGS = DistillConfig(steps=4, batch_size=4, seq_len=16, lr=1e-2, warmup=1, save_every=2, eval_tokens=64)


def run_distill(micro_batch_size: int | None = None, out_dir=None) -> dict[str, list[float]]:
    settings = DistillConfig(**{**SETTINGS.__dict__, "micro_batch_size": micro_batch_size})
    grouter, result = distill(linear_teacher(), CONFIG, random_corpus(3000, 1, 16), random_corpus(256, 2, 16),
                              settings, out_dir=out_dir, progress=False)
    return {"kl": [result.kl], **{k: v.flatten().tolist() for k, v in grouter.state_dict().items()}}


def worker_data_parallel(rec: Recorder, rank: int, world: int) -> None:
    import tempfile
    from pathlib import Path

    torch.manual_seed(100 + rank)   # the ranks' own RNG states must not matter
    out = Path(tempfile.mkdtemp(prefix=f"distill-rank{rank}-"))
    rec.check("ddp", lambda: {"state": run_distill(out_dir=out),
                              "wrote": sorted(p.name for p in out.iterdir())})
    rec.check("ddp_micro", lambda: {"state": run_distill(micro_batch_size=1)})
