"""Peak memory of `grouter distill` from a realistic-width source, and what it grows with.

    python examples/benchmarks/bench_distill_memory.py            # about 15 minutes on 2 cores

The source is a transformers Qwen3-MoE at Qwen3-30B-A3B's width (hidden 2048, 128 experts, top-8,
expert FFN 768, 32 heads of 128, 4 KV heads), 2 layers, random init, saved in bf16. Each run is
one `grouter distill` step on an 8 x 4096-token batch with the reference Grouter (width 512, 3
layers, MLP 2736, the source's vocabulary) plus the final held-out evaluation, and reports the
peak resident memory of the process. The runs vary one thing each:

* micro-batch 2 vs 8 sequences (gradient accumulation: memory follows the micro-batch);
* the source layers loaded, 1 vs 2 (``--source-layers``: the teacher stops at the first router),
  and 0 for the default (no ``--source-layers``: the fewest layers that hold the first router);
* the vocabulary, 151936 vs 32768 (what remains is the parameters' own size: the source's
  embedding and the Grouter's embedding with its AdamW state; no vocabulary-sized logits).

Results are printed as a table and written to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench_predispatch import grouter_cli, run_measured

ROOT = Path(__file__).resolve().parents[2]


def make_source(path: Path, vocab: int) -> None:
    if (path / "config.json").exists():
        return
    import torch
    import transformers

    cfg = transformers.AutoConfig.for_model(
        "qwen3_moe", vocab_size=vocab, hidden_size=2048, num_hidden_layers=2, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
        intermediate_size=6144, max_position_embeddings=8192, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)
    print(f"source {path}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters (bf16)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/grouter-bench-distill"))
    ap.add_argument("--json", type=Path, default=None, help="results file; runs already in it are kept")
    ap.add_argument("--runs", nargs="*", default=["151936:1:2", "151936:1:8", "151936:2:2", "32768:1:2"],
                    help="VOCAB:SOURCE_LAYERS:MICRO_BATCH of each run (SOURCE_LAYERS 0: not given)")
    args = ap.parse_args()
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    runs = [tuple(int(x) for x in r.split(":")) for r in args.runs]
    code = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    results = json.loads(args.json.read_text()) if args.json and args.json.exists() else {"runs": []}
    results.update(cpus=os.cpu_count())
    for vocab in sorted({r[0] for r in runs}):
        make_source(w / f"source-{vocab}", vocab)
    for vocab, layers, micro in runs:
        out = w / f"run-{vocab}-{layers}-{micro}"
        given = ["--source-layers", str(layers)] if layers else []
        cmd = grouter_cli("distill", "--source", str(w / f"source-{vocab}"), "--out", str(out), "--no-resume",
                          *given, "--source-dtype", "bfloat16", "--batch-size", "8",
                          "--seq-len", "4096", "--micro-batch-size", str(micro), "--steps", "1", "--warmup", "0",
                          "--save-every", "0", "--max-tokens", "300000", "--eval-tokens", "4096", "--no-progress")
        load = os.getloadavg()[0]
        r = run_measured(cmd)
        r.update(vocab=vocab, source_layers=layers or "default", micro_batch=micro, load_before=load,
                 load_after=os.getloadavg()[0], code=code)
        results["runs"].append(r)
        print(f"vocab {vocab}, {layers} source layer(s), micro-batch {micro}: peak {r['peak_rss_max_gb']:.2f} GB, "
              f"{r['seconds']:.0f} s", flush=True)
    print(f"\none step of an 8 x 4096-token batch + evaluation; {os.cpu_count()} CPUs")
    print("| source vocabulary | source layers loaded | micro-batch | peak RSS | wall | load before/after | code |")
    print("|---:|---:|---:|---:|---:|---|---|")
    for r in results["runs"]:
        print(f"| {r['vocab']} | {r['source_layers']} of 2 | {r['micro_batch']} x 4096 | "
              f"{r['peak_rss_max_gb']:.2f} GB | {r['seconds']:.0f} s | {r['load_before']:.2f} / {r['load_after']:.2f} "
              f"| {r['code']} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
