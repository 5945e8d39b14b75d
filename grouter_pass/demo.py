"""``make demo`` / ``python -m grouter_pass.demo``: the pass on a built-in model and data.

Builds a small Qwen3-MoE-style causal LM from a config (random init, no download), feeds it the
bytes of a short built-in text, compiles it with the grouter backend and prints:

* the MoE gating sites the pass found and rewrote (module path, family, E, k, what it became);
* parity of one training step against the unmodified model in eager mode (output and every
  gradient, max relative error);
* forward + backward time: eager, ``torch.compile`` (Inductor), the grouter backend in exact mode
  (the model's own routers, the same function) and in a Grouter mode (one routing for every
  layer from a fixed hash of the token ids: no routers, no per-layer dispatch plans; a different
  function by design, the idea behind Grouter's frozen shared router).

Timing follows docs/performance.md: glibc's allocator pinned (the Makefile sets it), fixed
threads, warm-up excluded, median of timed steps. On a shared 2-core machine absolute times
drift; the ratios in one run are what to read.
"""

from __future__ import annotations

import argparse
import copy
import time
from importlib import resources

import torch

from grouter_pass import GrouterConfig, HashRouting, apply_grouter, grouter_reports
from grouter_pass.testing.parity import check_parity, exact_ops
from grouter_pass.testing.timing import time_interleaved


def demo_tokens(batch: int, seq: int) -> torch.Tensor:
    """``batch`` windows of ``seq`` byte tokens from the built-in corpus (vocab 256)."""
    text = resources.files("grouter_pass").joinpath("data/demo_corpus.txt").read_bytes()
    data = torch.tensor(list(text), dtype=torch.long)
    starts = torch.linspace(0, len(data) - seq - 1, batch).long()
    return torch.stack([data[s: s + seq] for s in starts])


def demo_model(args: argparse.Namespace) -> torch.nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=2 * args.hidden, moe_intermediate_size=args.ffn,
        num_experts=args.experts, num_experts_per_tok=args.topk, norm_topk_prob=True, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4, max_position_embeddings=1024,
        use_cache=False)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).train()


def fwd_bwd_ms(models: dict[str, torch.nn.Module], ids: torch.Tensor, iters: int, warmup: int = 2
               ) -> dict[str, float]:
    """Median forward+backward time of each model (one training step per call), interleaved."""

    def step(model: torch.nn.Module):
        return lambda: model(ids, labels=ids).loss.backward()

    return time_interleaved({name: step(m) for name, m in models.items()}, warmup=warmup, iters=iters)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--ffn", type=int, default=64)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    model = demo_model(args)
    ids = demo_tokens(args.batch, args.seq)
    print(f"grouter-pass demo: {args.layers}-layer Qwen3-MoE-style LM (E={args.experts}, k={args.topk}, "
          f"hidden {args.hidden}, expert FFN {args.ffn}), {args.batch} x {args.seq} byte tokens of the built-in "
          f"text, fp32, {args.threads} threads, torch {torch.__version__}")

    compiled: list[torch.nn.Module] = []

    def compile_with_grouter(m: torch.nn.Module) -> torch.nn.Module:
        compiled.append(apply_grouter(m, GrouterConfig()))
        return compiled[-1]

    t0 = time.perf_counter()
    parity = check_parity(model, {"input_ids": ids}, compile_with_grouter, expect_ops=exact_ops(args.layers))
    compile_s = time.perf_counter() - t0
    ours = compiled[0]
    report = grouter_reports(ours)[-1]

    print(f"\nMoE gating sites (compiled in {compile_s:.0f} s, one training step included):")
    print(f"  {'module':22s} {'family':13s} {'E':>3s} {'k':>2s}  {'gating':34s} {'became'}")
    for site in report.sites:
        g = site.gating
        became = " + ".join(site.new_ops) if site.rewritten else f"unchanged: {site.reason}"
        print(f"  {site.module_path:22s} {site.family:13s} {g.num_experts:3d} {g.top_k:2d}  {g.describe():34s} "
              f"{became}")
    if not report.sites:
        print("  none found")

    print("\nParity of one training step, grouter vs the unmodified model (eager):")
    print(f"  output (logits)   max rel err {parity.output.max_rel:.2e}")
    grads = {**parity.input_grads, **parity.param_grads}
    worst_name, worst = max(grads.items(), key=lambda kv: kv[1].max_rel)
    router = max((c.max_rel for k, c in grads.items() if k.endswith("mlp.gate.weight")), default=0.0)
    experts = max((c.max_rel for k, c in grads.items() if ".experts." in k), default=0.0)
    print(f"  {len(grads)} gradients  max rel err {worst.max_rel:.2e} ({worst_name}); routers {router:.2e}, "
          f"experts {experts:.2e}")
    print(f"  {'PASS' if parity.max_rel() <= 1e-5 else 'FAIL'}: every max relative error <= 1e-5")

    print(f"\nForward + backward, median of {args.iters} interleaved steps:")
    hashed = apply_grouter(copy.deepcopy(model), GrouterConfig(
        routing=HashRouting.random(256, args.experts, args.topk, seed=0)))
    rows = fwd_bwd_ms({"eager": model, "torch.compile (inductor)": torch.compile(copy.deepcopy(model)),
                       "grouter, exact mode": ours, "grouter, hash routing": hashed}, ids, args.iters)
    base = rows["torch.compile (inductor)"]
    for name, ms in rows.items():
        print(f"  {name:26s} {ms:8.1f} ms   {base / ms:5.2f}x vs torch.compile")
    print("  (exact mode computes the model's function; hash routing replaces every router by one fixed\n"
          "   token-id table, a Grouter mode: a different model by design, trained as such)")
    print(f"\ndone in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
