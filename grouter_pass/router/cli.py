"""``grouter distill | fold | expand | tune | tokenize | predispatch | info``: the Grouter workflow's commands.

Registered by ``grouter_pass.cli`` (``register(subparsers)``). Every command reads and writes
checkpoint directories (:mod:`.checkpoint`); data options are shared: ``--data`` (``stdlib``, a
text/JSONL file or directory, a ``datasets`` directory, or a tokenized directory), ``--tokenizer``
(``byte`` or a local tokenizer directory) and ``--max-tokens``. User errors raise ``ValueError``
/ ``CLIError`` and are printed as one line by the top-level CLI.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _add_data_args(p: argparse.ArgumentParser, *, max_tokens: int | None = 2_000_000, val: bool = False) -> None:
    p.add_argument("--data", default="stdlib",
                   help="stdlib (default: the Python standard library's sources), a .txt/.jsonl(.gz)/.parquet file "
                        "or directory, a datasets.save_to_disk directory, or a tokenized directory (grouter tokenize, "
                        "grouter import-megatron)")
    if val:
        p.add_argument("--val-data", default=None,
                       help="held-out data (default: the validation split of --data)")
    p.add_argument("--tokenizer", default=None,
                   help="byte (default) or a local tokenizers/transformers tokenizer directory")
    p.add_argument("--text-field", default="text", help="JSONL / Parquet / datasets text field (default: text)")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to read (default: {max_tokens})")


def _add_train_args(p: argparse.ArgumentParser, *, steps: int, lr: float, warmup: int, seq_len: int,
                    batch_size: int) -> None:
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=batch_size, help="sequences per batch")
    p.add_argument("--seq-len", type=int, default=seq_len, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, default=warmup, help="linear warm-up steps before the cosine decay")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: no clipping)")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint period in steps (default: 100)")
    p.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens for the final evaluation")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and initialisation")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT has a checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default="cpu", help="where the Grouter trains (cpu, cuda, ...)")


def _tokenizer(args: argparse.Namespace, default: str | None = None):
    from grouter_pass.router.data import load_tokenizer

    return load_tokenizer(args.tokenizer or default or "byte")


def _corpus(args: argparse.Namespace, source: str, split: str, tokenizer, max_tokens: int | None = None,
            grouter=None):
    from grouter_pass.router.data import check_same_tokenizer, load_corpus

    corpus = load_corpus(source, split, tokenizer=tokenizer, max_tokens=max_tokens or args.max_tokens,
                         text_field=args.text_field)
    if grouter is not None:   # ids from another tokenizer would be routed as if they were its own
        check_same_tokenizer(grouter.tokenizer_fingerprint, corpus.tokenizer_fingerprint,
                             expected_what=f"the Grouter {args.checkpoint}",
                             got_what=f"the data {source} ({corpus.tokenizer})")
    return corpus


def _check_vocab(grouter, tokenizer) -> None:
    from grouter_pass.router.config import check_compatible

    check_compatible(grouter.config, vocab_size=tokenizer.vocab_size, what=f"tokenizer ({tokenizer.name})")


def _load(args: argparse.Namespace):
    """The checkpoint's Grouter with ``--top-k`` / ``--scaling-factor`` applied. A reference
    ``.pth`` does not record k: without ``--top-k`` it gets ``min(8, E)``, which is said."""
    from grouter_pass.router.checkpoint import load_grouter

    overrides = {k: v for k, v in (("top_k", getattr(args, "top_k", None)),
                                   ("scaling_factor", getattr(args, "scaling_factor", None))) if v is not None}
    grouter = load_grouter(args.checkpoint, **overrides)
    if Path(args.checkpoint).suffix in (".pth", ".pt") and "top_k" not in overrides:
        log.warning("%s is a reference checkpoint, which does not record k: using top_k=%d (pass --top-k to "
                    "choose; the reference's folded 64-expert Grouter uses 6)", args.checkpoint, grouter.config.top_k)
    return grouter


def _routing_override_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--top-k", type=int, default=None,
                   help="experts per token the Grouter routes to (default: the checkpoint's; a reference .pth "
                        "records none and gets min(8, E)); saved with the result")
    p.add_argument("--scaling-factor", type=float, default=None,
                   help="gate weight scale (default: the checkpoint's); saved with the result")


def _grouter_and_tokenizer(args: argparse.Namespace):
    """The checkpoint's Grouter and the tokenizer, refused when the vocabularies do not fit."""
    grouter = _load(args)
    tokenizer = _tokenizer(args)
    _check_vocab(grouter, tokenizer)
    return grouter, tokenizer


def _train_val(args: argparse.Namespace, tokenizer, grouter=None):
    train = _corpus(args, args.data, "train", tokenizer, grouter=grouter)
    val_source = args.val_data or args.data
    val = _corpus(args, val_source, "validation" if args.val_data is None else "all", tokenizer,
                  max_tokens=max(args.eval_tokens, args.seq_len), grouter=grouter)
    return train, val


def _eval_batches(args: argparse.Namespace, corpus):
    from grouter_pass.router.data import PackedBatches

    return list(PackedBatches(corpus, args.seq_len, args.batch_size, shuffle=False).eval_batches(args.max_tokens))


def _interrupted(out: str) -> int:
    import torch

    from grouter_pass.router.training import CHECKPOINT_DIR, STATE_FILE

    state = Path(out) / CHECKPOINT_DIR / STATE_FILE
    step = torch.load(state, map_location="cpu", weights_only=False)["step"] if state.exists() else None
    where = f"from step {step}" if step is not None else "from the start (no checkpoint was saved yet)"
    print(f"\ninterrupted; run the same command again to resume {where}", file=sys.stderr)
    return 130


def cmd_distill(args: argparse.Namespace) -> int:
    import torch

    from grouter_pass.router.capture import load_teacher
    from grouter_pass.router.config import GrouterModelConfig
    from grouter_pass.router.distillation import DistillConfig, distill

    source = Path(args.source)
    has_tok = (source / "tokenizer.json").exists() or (source / "tokenizer_config.json").exists()
    tokenizer = _tokenizer(args, str(source) if has_tok else "byte")
    world = _init_data_parallel(args.device)
    micro = args.micro_batch_size or args.batch_size // world
    # the router (E and k) is found with the training shape (one micro-batch), so the compiled teacher is reused
    teacher, layers = load_teacher(source, torch.zeros(micro, args.seq_len, dtype=torch.long),
                                   dtype=getattr(torch, args.source_dtype), device=args.device,
                                   num_layers=args.source_layers)
    vocab = teacher.vocab_size or tokenizer.vocab_size
    if tokenizer.vocab_size > vocab:
        raise ValueError(f"vocabulary mismatch: tokenizer ({tokenizer.name}) has vocab_size={tokenizer.vocab_size} "
                         f"but the source model has vocab_size={vocab}")
    loaded = f", {layers} source layer(s) loaded" if layers is not None else ""
    print(f"teacher router: {teacher.module_path} ({teacher.family}), E={teacher.num_experts}, k={teacher.top_k}"
          f"{loaded}")
    mcfg = GrouterModelConfig(vocab_size=vocab, hidden_size=args.hidden_size, num_heads=args.num_heads,
                              num_layers=args.num_layers, intermediate_size=args.intermediate_size,
                              num_experts=teacher.num_experts, top_k=args.top_k or teacher.top_k,
                              rope_theta=args.rope_theta, scaling_factor=args.scaling_factor, causal=args.causal)
    dcfg = DistillConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                         warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                         temperature=args.temperature, save_every=args.save_every, eval_every=args.eval_every,
                         eval_tokens=args.eval_tokens, seed=args.seed, device=args.device,
                         micro_batch_size=args.micro_batch_size)
    train, val = _train_val(args, tokenizer)
    print(f"data: {train.num_tokens} training tokens, {val.num_tokens} held-out tokens ({tokenizer.name} tokenizer)")
    try:
        _, result = distill(teacher, mcfg, train, val, dcfg, out_dir=args.out, resume=not args.no_resume,
                            progress=not args.no_progress)
    except KeyboardInterrupt:
        return _interrupted(args.out)
    print(f"distilled Grouter saved to {args.out}: {result}")
    return 0


def _init_data_parallel(device: str) -> int:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); returns the world size."""
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return world


def cmd_fold(args: argparse.Namespace) -> int:
    from grouter_pass.router.checkpoint import save_grouter
    from grouter_pass.router.fold import fold_grouter, greedy_groups, grouter_affinity

    grouter, tokenizer = _grouter_and_tokenizer(args)
    corpus = _corpus(args, args.data, "train", tokenizer, grouter=grouter)
    affinity = grouter_affinity(grouter, _eval_batches(args, corpus))
    groups = greedy_groups(affinity, args.experts)
    folded = fold_grouter(grouter, groups, top_k=args.top_k)
    save_grouter(folded, args.out)
    print(f"folded {grouter.config.num_experts} -> {args.experts} experts (top-{folded.config.top_k}) on "
          f"{corpus.num_tokens} tokens; groups: {groups}; saved to {args.out}")
    return 0


def cmd_expand(args: argparse.Namespace) -> int:
    from grouter_pass.router.checkpoint import save_grouter
    from grouter_pass.router.expand import expand_grouter

    grouter, tokenizer = _grouter_and_tokenizer(args)
    corpus = _corpus(args, args.data, "train", tokenizer, grouter=grouter)
    expanded = expand_grouter(grouter, args.experts, _eval_batches(args, corpus), top_k=args.top_k,
                              quantile=args.quantile, seed=args.seed)
    save_grouter(expanded, args.out)
    print(f"expanded {grouter.config.num_experts} -> {args.experts} experts (top-{expanded.config.top_k}) from "
          f"{expanded.expanding['low_confidence_tokens']} low-confidence tokens; saved to {args.out}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from grouter_pass.router.tuning import TuneConfig, tune

    grouter, tokenizer = _grouter_and_tokenizer(args)
    train, val = _train_val(args, tokenizer, grouter)
    cfg = TuneConfig(mode=args.mode, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                     weight_decay=args.weight_decay, warmup=args.warmup, grad_clip=args.grad_clip,
                     bias_rate=args.bias_rate, save_every=args.save_every, eval_tokens=args.eval_tokens, seed=args.seed,
                     device=args.device)
    try:
        _, result = tune(grouter, train, val, cfg, out_dir=args.out, resume=not args.no_resume,
                         progress=not args.no_progress)
    except KeyboardInterrupt:
        return _interrupted(args.out)
    print(f"tuned Grouter saved to {args.out}: {result}")
    return 0


def cmd_predispatch(args: argparse.Namespace) -> int:
    from grouter_pass.router.config import check_compatible
    from grouter_pass.router.data import TOKENS_META
    from grouter_pass.router.predispatching import parse_shard

    grouter = _load(args)
    check_compatible(grouter.config, num_experts=args.expect_experts, top_k=args.expect_top_k)
    if (Path(args.data) / TOKENS_META).is_file():
        directory = Path(args.data)
    else:
        if args.out is None:
            raise ValueError("--out is needed to store the tokenized dataset when --data is not a tokenized directory")
        _check_vocab(grouter, _tokenizer(args))
        _tokenize_streaming(args, args.data, args.split, args.out, processes=args.processes)
        directory = Path(args.out)
    if args.processes < 1:
        raise ValueError(f"--processes must be >= 1, got {args.processes}")
    if args.processes > 1:
        if args.shard is not None:
            raise ValueError("--processes starts the shards itself: give --shard or --processes, not both")
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        threads = max(1, _torch_threads() // args.processes)
        workers = [ctx.Process(target=_predispatch_shard, args=(args, str(directory), (i, args.processes), threads))
                   for i in range(args.processes)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        failed = [i for i, w in enumerate(workers) if w.exitcode != 0]
        if failed:
            print(f"shard(s) {failed} of {args.processes} failed; run the same command again to resume them",
                  file=sys.stderr)
            return 1
    else:
        shard = parse_shard(args.shard) if args.shard is not None else (0, 1)
        _predispatch_shard(args, str(directory), shard, None, grouter=grouter)
    meta = directory / f"{args.name}.json"
    if not meta.is_file():
        print(f"shard {args.shard} of {directory} done; the routing is complete once every shard is")
        return 0
    info = json.loads(meta.read_text())
    print(f"pre-dispatched {info['num_tokens']} tokens ({info['granularity']}, ids {info['ids_dtype']}, weights "
          f"{info['weights_dtype']}) into {directory}")
    return 0


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _predispatch_shard(args: argparse.Namespace, directory: str, shard: tuple[int, int], threads: int | None,
                       grouter=None) -> None:
    """One shard of ``grouter predispatch`` (in this process, or a spawned one with ``threads``)."""
    import torch

    from grouter_pass.router.predispatching import predispatch

    if threads is not None:
        torch.set_num_threads(threads)
    grouter = (grouter if grouter is not None else _load(args)).to(args.device)
    predispatch(grouter, directory, granularity=args.granularity, seq_len=args.seq_len,
                weights_dtype=args.weights_dtype, batch_tokens=args.batch_tokens, name=args.name,
                progress=not args.no_progress, shard=shard, resume=not args.no_resume)


def _tokenize_streaming(args: argparse.Namespace, source: str, split: str, out: str, *, processes: int):
    """``source``'s ``split`` tokenized into ``out`` in a stream (memory independent of its size)."""
    from grouter_pass.router.data import iter_documents
    from grouter_pass.router.tokenizing import tokenize_to_directory

    return tokenize_to_directory(iter_documents(source, split, text_field=args.text_field), out,
                                 tokenizer=args.tokenizer or "byte", max_tokens=args.max_tokens, processes=processes,
                                 source=f"{source} ({split})", resume=not args.no_resume,
                                 progress=not args.no_progress)


def cmd_tokenize(args: argparse.Namespace) -> int:
    corpus = _tokenize_streaming(args, args.data, args.split, args.out, processes=args.processes)
    print(f"tokenized {corpus.num_documents} documents, {corpus.num_tokens} tokens ({corpus.tokenizer}) into "
          f"{args.out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """A reference ``.pth`` (or any checkpoint ``load_grouter`` reads) written as a native directory,
    then read back and checked to give bitwise the same logits and routing."""
    import torch

    from grouter_pass.router.checkpoint import load_grouter, save_grouter

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"{out} exists and is not empty (pass --overwrite to replace its checkpoint files)")
    overrides = {k: v for k, v in (("top_k", args.top_k), ("scaling_factor", args.scaling_factor),
                                   ("num_heads", args.num_heads), ("rope_theta", args.rope_theta)) if v is not None}
    if args.causal:
        overrides["causal"] = True
    grouter = load_grouter(args.checkpoint, **overrides)
    if Path(args.checkpoint).suffix in (".pth", ".pt") and "top_k" not in overrides:
        log.warning("%s does not record k: using top_k=%d (pass --top-k: the reference's folded 64-expert Grouter "
                    "uses 6)", args.checkpoint, grouter.config.top_k)
    if args.tokenizer:
        from grouter_pass.router.data import tokenizer_fingerprint

        tokenizer = _tokenizer(args)
        _check_vocab(grouter, tokenizer)
        grouter.tokenizer_fingerprint = tokenizer_fingerprint(tokenizer)
    save_grouter(grouter, out)
    back = load_grouter(out)
    ids = torch.randint(0, grouter.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        same = torch.equal(back(ids), grouter(ids)) and all(
            torch.equal(a, b) for a, b in zip(back.route(ids), grouter.route(ids), strict=True))
    if not same:
        raise RuntimeError(f"{out} does not give the logits of {args.checkpoint} after the round trip")
    n = sum(p.numel() for p in back.parameters())
    cfg = back.config
    print(f"converted {args.checkpoint} -> {out}: {n:,} parameters, vocab {cfg.vocab_size}, width {cfg.hidden_size}, "
          f"{cfg.num_layers} layers x {cfg.num_heads} heads, E={cfg.num_experts}, k={cfg.top_k}, "
          f"scale {cfg.scaling_factor}, {'causal' if cfg.causal else 'bidirectional'}; round trip bitwise equal")
    return 0


def cmd_import_megatron(args: argparse.Namespace) -> int:
    from grouter_pass.router.megatron import import_megatron

    corpus = import_megatron(args.prefix, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                             progress=not args.no_progress)
    print(f"imported {corpus.num_documents} documents, {corpus.num_tokens} tokens ({corpus.tokenizer}, vocab "
          f"{corpus.vocab_size}) into {args.out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from grouter_pass.router.config import check_compatible

    grouter = _load(args)
    cfg = grouter.config
    n_params = sum(p.numel() for p in grouter.parameters())
    n_embed = grouter.embed_tokens.weight.numel()
    dtype = next(grouter.parameters()).dtype
    print(f"Grouter {args.checkpoint}")
    print(f"  parameters: {n_params:,} ({n_embed:,} in the embedding), dtype {str(dtype).replace('torch.', '')}")
    for key, value in cfg.to_dict().items():
        print(f"  {key}: {value}")
    folding = getattr(grouter, "folding", None)
    if folding is not None:
        print(f"  folded from {folding.source_experts} experts: {folding.groups}")
    if grouter.expanding is not None:
        print(f"  expanded from {grouter.expanding['source_experts']} experts")
    print(f"  distilled on tokenizer: {grouter.tokenizer_fingerprint or 'unknown (not recorded)'}")
    check_compatible(cfg, num_experts=args.expect_experts, top_k=args.expect_top_k)
    if args.tokenizer:
        from grouter_pass.router.data import check_same_tokenizer, tokenizer_fingerprint

        tokenizer = _tokenizer(args)
        _check_vocab(grouter, tokenizer)
        check_same_tokenizer(grouter.tokenizer_fingerprint, tokenizer_fingerprint(tokenizer),
                             expected_what=f"the Grouter {args.checkpoint}", got_what=f"--tokenizer {tokenizer.name}")
        print(f"  tokenizer {tokenizer.name}: vocab_size {tokenizer.vocab_size} fits")
    return 0


def _grouter_size_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Grouter architecture (reference: 512 wide, 8 heads, 3 layers, MLP 2736)")
    g.add_argument("--hidden-size", type=int, default=512, help="Grouter width")
    g.add_argument("--num-heads", type=int, default=8, help="attention heads per Grouter layer")
    g.add_argument("--num-layers", type=int, default=3, help="Grouter transformer layers")
    g.add_argument("--intermediate-size", type=int, default=2736, help="Grouter MLP width")
    g.add_argument("--rope-theta", type=float, default=1e6, help="rotary embedding base")
    g.add_argument("--scaling-factor", type=float, default=2.5, help="gate weights scale (reference: 2.5)")
    g.add_argument("--top-k", type=int, default=None, help="default: the teacher router's k")
    g.add_argument("--causal", action="store_true", help="causal attention instead of bidirectional")


def _expect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expect-experts", type=int, default=None, help="refuse unless the Grouter has this many experts")
    p.add_argument("--expect-top-k", type=int, default=None, help="refuse unless the Grouter's top-k is this")


def register(subparsers: Any) -> None:
    """Add the Grouter workflow's subcommands to the ``grouter`` CLI."""
    p = subparsers.add_parser("distill", help="distill a Grouter from a source MoE's first router",
                              description="Distill a Grouter from the first MoE layer's router of a transformers "
                                          "checkpoint directory (found by the grouter detection pass).")
    p.add_argument("--source", required=True, help="source MoE: a local transformers checkpoint directory")
    p.add_argument("--out", required=True, help="run/output directory (checkpoints, final Grouter)")
    p.add_argument("--source-layers", type=int, default=None,
                   help="load only the first N decoder layers of the source (default: the fewest that hold its first "
                        "MoE router, found by trying 1, 2, ...)")
    p.add_argument("--source-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype the source model is loaded and run in (its router logits are read in float32)")
    _add_data_args(p, max_tokens=5_000_000, val=True)
    _grouter_size_args(p)
    _add_train_args(p, steps=1000, lr=3e-4, warmup=100, seq_len=512, batch_size=8)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="softmax temperature of the distillation KL (teacher and student)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (default: only at the end)")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="sequences per forward (gradient accumulation: memory follows this, the step does not "
                        "change); under torchrun, --batch-size is the global batch, split over the ranks")
    p.set_defaults(func=cmd_distill)

    p = subparsers.add_parser("fold", help="fold a Grouter to fewer experts (E_T < E_S)")
    p.add_argument("checkpoint",
                   help="Grouter checkpoint directory (config.json + model.safetensors) or a reference .pth file")
    p.add_argument("--experts", type=int, required=True, help="target expert count E_T")
    p.add_argument("--top-k", type=int, default=None, help="target top-k (default: the source's, if it fits)")
    p.add_argument("--out", required=True, help="output directory (created; checkpoints and the result)")
    _add_data_args(p, max_tokens=1_000_000)
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    p.set_defaults(func=cmd_fold)

    p = subparsers.add_parser("expand", help="expand a Grouter to more experts (E_T > E_S)")
    p.add_argument("checkpoint",
                   help="Grouter checkpoint directory (config.json + model.safetensors) or a reference .pth file")
    p.add_argument("--experts", type=int, required=True, help="target expert count E_T")
    p.add_argument("--top-k", type=int, default=None, help="target top-k (default: the source's, if it fits)")
    p.add_argument("--out", required=True, help="output directory (created; checkpoints and the result)")
    p.add_argument("--quantile", type=float, default=0.2, help="low-confidence quantile (default: 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and initialisation")
    _add_data_args(p, max_tokens=1_000_000)
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    p.set_defaults(func=cmd_expand)

    p = subparsers.add_parser("tune", help="tune a Grouter's score layer for load balance on target data")
    p.add_argument("checkpoint",
                   help="Grouter checkpoint directory (config.json + model.safetensors) or a reference .pth file")
    p.add_argument("--out", required=True, help="output directory (created; checkpoints and the result)")
    p.add_argument("--mode", choices=("score", "bias"), default="score",
                   help="score: train the score layer on the balance loss (the reference); "
                        "bias: sign steps on the selection bias only")
    p.add_argument("--bias-rate", type=float, default=1e-3, help="bias mode: sign-update step")
    _routing_override_args(p)
    _add_data_args(p, max_tokens=5_000_000, val=True)
    _add_train_args(p, steps=400, lr=1e-3, warmup=0, seq_len=512, batch_size=8)
    p.set_defaults(func=cmd_tune)

    p = subparsers.add_parser("predispatch", help="store a dataset's routing beside its tokens")
    p.add_argument("checkpoint",
                   help="Grouter checkpoint directory (config.json + model.safetensors) or a reference .pth file")
    p.add_argument("--out", default=None, help="directory for the tokenized dataset (when --data is not one)")
    _add_data_args(p, max_tokens=None)
    p.add_argument("--split", choices=("train", "validation", "all"), default="all",
                   help="which split of --data to pre-dispatch")
    p.add_argument("--granularity", choices=("document", "packed"), default="document",
                   help="document: route each document on its own; packed: route --seq-len windows across documents")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence")
    p.add_argument("--weights-dtype", choices=("bfloat16", "float32", "bf16", "fp32"), default="bfloat16",
                   help="storage dtype of the gate weights")
    p.add_argument("--batch-tokens", type=int, default=65536, help="tokens per Grouter forward")
    p.add_argument("--name", default="routing", help="file name stem of the stored routing")
    p.add_argument("--shard", default=None,
                   help="I/N: route only shard I of N (start the N shards anywhere the directory is shared; the "
                        "last one to finish marks the routing complete)")
    p.add_argument("--processes", type=int, default=1, help="start this many local processes, one shard each")
    p.add_argument("--no-resume", action="store_true", help="ignore the shards' checkpoints and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default="cpu", help="where the Grouter runs (cpu, cuda, ...)")
    _expect_args(p)
    _routing_override_args(p)
    p.set_defaults(func=cmd_predispatch)

    p = subparsers.add_parser("tokenize", help="tokenize a corpus into a tokenized directory (streaming, "
                                               "multi-process, resumable)")
    p.add_argument("--out", required=True, help="the tokenized directory to write")
    _add_data_args(p, max_tokens=None)
    p.add_argument("--split", choices=("train", "validation", "all"), default="all", help="which split of --data")
    p.add_argument("--processes", type=int, default=1, help="tokenizer worker processes")
    p.add_argument("--no-resume", action="store_true", help="ignore a checkpoint in --out and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_tokenize)

    p = subparsers.add_parser("convert", help="write a reference checkpoint (grouter.pth, ...) as a native directory",
                              description="Read a published reference checkpoint (grouter.pth, grouter_ft_64.pth, "
                                          "...) or any checkpoint `grouter info` reads, write it as a native "
                                          "checkpoint directory (config.json + model.safetensors), and check that "
                                          "the directory gives bitwise the same logits and routing.")
    p.add_argument("checkpoint", help="reference .pth, .safetensors file or checkpoint directory")
    p.add_argument("--out", required=True, help="the checkpoint directory to write")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads (a .pth records none: default width // 64, the release's head dim)")
    p.add_argument("--rope-theta", type=float, default=None, help="rotary base (default: the release's 1e6)")
    p.add_argument("--causal", action="store_true", help="the checkpoint was trained causal (use_encoder: false)")
    p.add_argument("--tokenizer", default=None,
                   help="record this tokenizer's fingerprint with the result (and check its vocabulary fits)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    _routing_override_args(p)
    p.set_defaults(func=cmd_convert)

    p = subparsers.add_parser("import-megatron", help="import a Megatron-LM .bin/.idx dataset as a tokenized directory",
                              description="Copy a Megatron-LM tokenized dataset (PREFIX.bin + PREFIX.idx, as "
                                          "tools/preprocess_data.py writes it) into a tokenized directory that "
                                          "predispatch, distill and tune read, without tokenizing again.")
    p.add_argument("prefix", help="the dataset's path prefix (PREFIX.bin / PREFIX.idx), or either file")
    p.add_argument("--out", required=True, help="the tokenized directory to write")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--tokenizer", default=None,
                     help="the tokenizer the dataset was made with (recorded, so a Grouter of another is refused)")
    who.add_argument("--vocab-size", type=int, default=None, help="its vocabulary size, when the tokenizer is not at "
                                                                  "hand (ids are checked against it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_import_megatron)

    p = subparsers.add_parser("info", help="describe (and validate) a Grouter checkpoint")
    p.add_argument("checkpoint",
                   help="Grouter checkpoint directory (config.json + model.safetensors) or a reference .pth file")
    p.add_argument("--tokenizer", default=None, help="also check this tokenizer's vocabulary fits")
    _expect_args(p)
    _routing_override_args(p)
    p.set_defaults(func=cmd_info)
