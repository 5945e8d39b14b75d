"""Settings of each ``--scale``: one frozen dataclass tree, so a run's settings are one value that
is saved with every phase's result and compared on resume (a changed setting never silently mixes
with an old checkpoint).

Sizes are chosen for the machine each scale targets:

* ``smoke``: the whole pipeline in well under a minute on 2 shared cores. Tiny everything and
  no Inductor (eager learned-router runs, ``compiler="eager"`` for the Grouter run): it checks
  that the pipeline works, not what it finds.
* ``cpu``: a ~0.9M-parameter Qwen3-MoE (4 layers, 16 experts, top-2, sequences of 256 bytes),
  compiled with Inductor; sized for an hour on 2 shared cores, it takes about 25 minutes once
  OpenMP threads wait passively (``train_grouter.py`` sets that).
* ``paper-cpu``: the ``cpu`` model in the paper's regime: the source is pre-trained on about ten
  times the target's token budget (~20.5M tokens vs ~2M; the paper distils from a source that saw
  far more data than its target's budget), from disjoint halves of the corpus.
* ``gpu``: the same code on CUDA, a ~118M-parameter model (8 layers, 64 experts, top-8, ~19M
  active per token) on the whole stdlib corpus (~30M byte tokens). Not run yet.

The target MoE has the source's architecture (so E and k match and no folding is needed); it is
only re-initialised with another seed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from grouter_pass.router import DistillConfig, GrouterModelConfig, TuneConfig

from .arms import ARMS, DEFAULT_ARMS, check_arms


@dataclass(frozen=True, kw_only=True)
class MoEModelConfig:
    """A Qwen3-MoE causal LM built from a config (random init, no download).

    ``norm_topk_prob=True`` as in Qwen3; every layer is an MoE layer, no shared expert.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    max_seq_len: int
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} is larger than num_experts={self.num_experts}")


@dataclass(frozen=True, kw_only=True)
class LMTrainConfig:
    """One language-model training run (source, or each target arm).

    Attributes:
        steps, batch_size, seq_len: optimizer steps and ``[batch_size, seq_len]`` token windows.
        lr, warmup, min_lr_ratio, weight_decay, grad_clip: AdamW with linear warmup and cosine
            decay (``grouter_pass.router.training.lr_at``), global-norm clipping.
        aux_loss_coef: ``router_aux_loss_coef`` of the learned-router runs (Switch/GShard balance
            loss as transformers computes it; the paper's "Aux Loss" baseline uses 0.01).
        eval_every: validation loss every this many steps (and at step 0 and at the end).
        eval_batches: validation batches (of ``batch_size`` windows) per evaluation.
        save_every: checkpoint period in steps (0: only at the end).
        timing_skip: steps excluded from the step-time median after each (re)start: the first
            calls compile, autotune and grow the allocator.
        data_seed: order of the training windows (both target arms read the same batches).
    """

    steps: int
    batch_size: int
    seq_len: int
    lr: float = 1e-3
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100
    timing_skip: int = 3
    data_seed: int = 0

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


@dataclass(frozen=True, kw_only=True)
class Scale:
    """Everything one ``--scale`` fixes.

    Attributes:
        name: the scale's name (also the default output sub-directory).
        model: the source and target MoE architecture.
        source_train, target_train: LM training of the source and of each target arm.
        grouter: the Grouter network (E and k are the model's; ``causal`` see below).
        distill, tune: Grouter distillation and balance tuning (``grouter_pass.router``).
        source_seed, target_seed: initialisation seeds; both target arms use ``target_seed``.
        train_tokens, validation_tokens: caps on the tokenized stdlib corpus. The train split is
            cut at a document boundary into a source part (source pre-training, distillation) and
            a target part (tuning, target training): the Grouter is tuned on "target data", as in
            the paper, and the target never re-reads the source's tokens.
        source_fraction: the source part's share of ``train_tokens`` (0.5: halves).
        arms: the target arms (names of ``arms.ARMS``), trained interleaved on the same batches.
        leak_test_batches: validation batches of the leak test (the first seed's Grouter arms).
        predispatch: the Grouter arms read routing computed before each step (``PrecomputedRouting``,
            the paper's setting: routing is stored with the data) instead of running the Grouter
            inside the step; their step times then leave the Grouter out.
        seeds: target initialisation seeds, one interleaved run of every arm each (empty: only
            ``target_seed``); seed ``i`` of the list also reads the batches in its own order.
        baseline_backend: ``torch.compile`` backend of the learned-router runs (source and
            baseline); ``"none"`` runs them eagerly (smoke: Dynamo tracing alone would take most
            of its minute).
        grouter_compiler: ``GrouterConfig.compiler`` of the Grouter run.
        threads: CPU threads (``torch.set_num_threads``); ignored on CUDA.
        target_gate_scale: if set, the Grouter's gate ``scaling_factor`` used in the target run
            (None: the Grouter's own, 2.5 as in the reference code). An ablation: the baseline's
            gates sum to 1 (``norm_topk_prob``), the Grouter's to 2.5.
    """

    name: str
    model: MoEModelConfig
    source_train: LMTrainConfig
    target_train: LMTrainConfig
    grouter: GrouterModelConfig
    distill: DistillConfig
    tune: TuneConfig
    source_seed: int = 1
    target_seed: int = 2
    train_tokens: int = 4_000_000
    validation_tokens: int = 262_144
    baseline_backend: str = "inductor"
    grouter_compiler: str = "inductor"
    threads: int = 2
    target_gate_scale: float | None = None
    source_fraction: float = 0.5
    arms: tuple[str, ...] = DEFAULT_ARMS
    seeds: tuple[int, ...] = ()
    leak_test_batches: int = 2
    predispatch: bool = False
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 < self.source_fraction < 1.0:
            raise ValueError(f"source_fraction={self.source_fraction} must lie strictly between 0 and 1")
        check_arms(tuple(self.arms))
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {list(self.seeds)} repeat a seed")

    @property
    def target_seeds(self) -> tuple[int, ...]:
        return tuple(self.seeds) or (self.target_seed,)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings (what changes the result); compared on resume."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Scale:
        return dataclasses.replace(self, **changes)


def _grouter(model: MoEModelConfig, **sizes: Any) -> GrouterModelConfig:
    # causal=True: a bidirectional Grouter (the reference default) lets the routing of position t
    # depend on token t+1, i.e. on the label of a causal LM; the target could then read the label
    # through its routing (method notes section 15.2). A causal Grouter rules this leak out.
    return GrouterModelConfig(vocab_size=257, num_experts=model.num_experts, top_k=model.top_k, causal=True,
                              rope_theta=1e4, **sizes)


def _smoke() -> Scale:
    model = MoEModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_experts=4, top_k=2,
                           moe_intermediate_size=16, max_seq_len=32)
    lm = LMTrainConfig(steps=6, batch_size=2, seq_len=32, lr=3e-3, warmup=2, eval_every=3, eval_batches=2,
                       save_every=3, timing_skip=1)
    return Scale(
        name="smoke", model=model, source_train=lm, target_train=lm,
        grouter=_grouter(model, hidden_size=16, num_heads=2, num_layers=1, intermediate_size=32),
        distill=DistillConfig(steps=4, batch_size=2, seq_len=32, lr=3e-3, warmup=1, save_every=2, eval_tokens=128),
        tune=TuneConfig(steps=2, batch_size=2, seq_len=32, save_every=1, eval_tokens=128),
        train_tokens=40_000, validation_tokens=4_096, baseline_backend="none", grouter_compiler="eager",
        arms=tuple(ARMS), seeds=(2, 3), predispatch=True,
        # one thread: at this size two threads only wait for each other, badly so on shared cores
        threads=1,
    )


def _cpu() -> Scale:
    # ~0.9M parameters (~0.8M in experts). Measured on the shared 2-core machine: even this size
    # takes seconds per step of 8 x 256 tokens when other jobs run, so the whole pipeline fits an
    # hour only at this size.
    model = MoEModelConfig(hidden_size=64, num_layers=4, num_heads=4, num_experts=16, top_k=2,
                           moe_intermediate_size=64, max_seq_len=256)
    source = LMTrainConfig(steps=200, batch_size=8, seq_len=256, lr=3e-3, warmup=20, eval_every=50, eval_batches=4,
                           save_every=25, data_seed=1)
    target = LMTrainConfig(steps=1000, batch_size=8, seq_len=256, lr=3e-3, warmup=20, eval_every=50, eval_batches=4,
                           save_every=25, timing_skip=5, data_seed=2)
    return Scale(
        name="cpu", model=model, source_train=source, target_train=target,
        grouter=_grouter(model, hidden_size=48, num_heads=4, num_layers=2, intermediate_size=96),
        distill=DistillConfig(steps=150, batch_size=8, seq_len=256, lr=3e-3, warmup=15, save_every=25,
                              eval_tokens=16_384),
        tune=TuneConfig(steps=40, batch_size=8, seq_len=256, lr=1e-3, save_every=10, eval_tokens=16_384),
        train_tokens=4_000_000, validation_tokens=131_072,
    )


def _paper_cpu() -> Scale:
    # The cpu model and target budget (1000 x 8 x 256 = 2.05M tokens); the source trains on 10x
    # that (5000 x 16 x 256 = 20.5M tokens), each of its tokens seen once: a 0.905 share of 23M
    # corpus tokens is 20.8M for the source and 2.2M for the target.
    cpu = _cpu()
    source = dataclasses.replace(cpu.source_train, steps=5000, batch_size=16, eval_every=250, save_every=100)
    return cpu.replace(name="paper-cpu", source_train=source, train_tokens=23_000_000, source_fraction=0.905,
                       arms=tuple(ARMS), seeds=(2, 3, 4), predispatch=True)


def _gpu() -> Scale:
    # The stdlib corpus holds ~30M byte tokens, so the halves are ~15M each: the source sees its
    # half about once (450 x 32K tokens), the targets see theirs about twice (900 steps).
    model = MoEModelConfig(hidden_size=384, num_layers=8, num_heads=8, num_experts=64, top_k=8,
                           moe_intermediate_size=192, max_seq_len=1024)
    source = LMTrainConfig(steps=450, batch_size=32, seq_len=1024, lr=1e-3, warmup=50, eval_every=50,
                           eval_batches=8, save_every=100, data_seed=1)
    target = LMTrainConfig(steps=900, batch_size=32, seq_len=1024, lr=1e-3, warmup=50, eval_every=25,
                           eval_batches=16, save_every=100, timing_skip=10, data_seed=2)
    return Scale(
        name="gpu", model=model, source_train=source, target_train=target,
        grouter=_grouter(model, hidden_size=256, num_heads=8, num_layers=3, intermediate_size=1024),
        distill=DistillConfig(steps=1000, batch_size=32, seq_len=1024, lr=3e-4, warmup=100, save_every=250,
                              eval_tokens=262_144),
        tune=TuneConfig(steps=200, batch_size=32, seq_len=1024, lr=1e-3, save_every=50, eval_tokens=262_144),
        train_tokens=30_000_000, validation_tokens=1_400_000,
    )


SCALES = {"smoke": _smoke, "cpu": _cpu, "paper-cpu": _paper_cpu, "gpu": _gpu}


def get_scale(name: str) -> Scale:
    """The :class:`Scale` called ``name``; an unknown name is an error listing the known ones."""
    try:
        return SCALES[name]()
    except KeyError:
        raise ValueError(f"unknown scale {name!r}; known: {sorted(SCALES)}") from None
