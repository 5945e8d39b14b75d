"""Expert tuning (method notes section 8): rebalance a Grouter's load on target-domain tokens.

Everything but the score layer is frozen and the only objective is the per-sequence GShard-style
balance loss of the reference code (no ``E * alpha`` factor)::

    L_bal = mean_b  sum_i  P_i^(b) * f_i^(b)
    P_i^(b) = mean over the sequence of softmax(z_t)_i          (full-E softmax: carries the gradient)
    f_i^(b) = share of the sequence's top-k assignments to i    (piecewise constant)

``mode="bias"`` instead trains only the selection bias with the Aux-Loss-Free sign update
``b <- b - alpha * sign(F - 1/E)`` (F = observed load share) and turns bias routing on.

Balance is reported as MaxVio = max load / mean load - 1 over held-out tokens, before and after.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from grouter_pass._logging import RESULT
from grouter_pass.router.checkpoint import save_grouter
from grouter_pass.router.data import PackedBatches, TokenizedCorpus
from grouter_pass.router.network import Grouter
from grouter_pass.router.training import lr_at, resume_run, run_steps, save_trainer_checkpoint

log = logging.getLogger(__name__)

TUNE_MODES = ("score", "bias")


@dataclass(frozen=True, kw_only=True)
class TuneConfig:
    """Settings of :func:`tune` (reference values in brackets).

    Attributes:
        mode: ``"score"`` trains ``score.weight`` on the balance loss [reference]; ``"bias"``
            updates the selection bias by sign steps of ``bias_rate``.
        steps [400], batch_size x seq_len [8 x 4096 x 4 ranks], lr [1e-3], weight_decay
        [0.01], warmup [0], cosine decay, grad_clip [1.0]; save_every: checkpoint period;
        device: where the Grouter runs.
    """

    mode: str = "score"
    steps: int = 400
    batch_size: int = 8
    seq_len: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 0
    grad_clip: float = 1.0
    bias_rate: float = 1e-3
    save_every: int = 100
    eval_tokens: int = 65536
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.mode not in TUNE_MODES:
            raise ValueError(f"mode must be one of {TUNE_MODES}, got {self.mode!r}")
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def balance_loss(logits: torch.Tensor, ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Per-sequence ``sum_i P_i f_i`` averaged over sequences; logits ``[B, S, E]``, ids ``[B, S, K]``."""
    p = torch.softmax(logits.float(), dim=-1).mean(1)                              # [B, E]
    counts = torch.zeros(ids.shape[0], num_experts, device=ids.device).scatter_add_(
        1, ids.reshape(ids.shape[0], -1), torch.ones(ids.shape[0], ids[0].numel(), device=ids.device))
    f = counts / ids[0].numel()                                                    # [B, E]
    return (p * f).sum(1).mean()


def expert_load(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert ``[E]`` (int64) of ``ids [..., K]``."""
    return torch.bincount(ids.reshape(-1).long(), minlength=num_experts)


def max_violation(load: torch.Tensor) -> float:
    """MaxVio = max load / mean load - 1 (0 is perfectly balanced)."""
    load = load.double()
    if load.sum() == 0:
        raise ValueError("empty dataset: no assignments to measure balance on")
    return float(load.max() / load.mean() - 1)


@torch.no_grad()
def measure_max_violation(grouter: Grouter, batches: Iterable[torch.Tensor]) -> float:
    """MaxVio of ``grouter``'s routing over ``batches`` (all tokens pooled)."""
    load = torch.zeros(grouter.config.num_experts, dtype=torch.int64)
    device = next(grouter.parameters()).device
    for ids in batches:
        load += expert_load(grouter.route(ids.to(device))[1], grouter.config.num_experts).cpu()
    return max_violation(load)


@dataclass
class TuneResult:
    max_vio_before: float
    max_vio_after: float

    def __str__(self) -> str:
        return f"MaxVio {self.max_vio_before:.3f} -> {self.max_vio_after:.3f} on held-out tokens"


def _freeze_for(grouter: Grouter, mode: str) -> list[torch.nn.Parameter]:
    for p in grouter.parameters():
        p.requires_grad_(False)
    if mode == "score":
        grouter.score.weight.requires_grad_(True)
        return [grouter.score.weight]
    return []


def tune(grouter: Grouter, train: TokenizedCorpus, validation: TokenizedCorpus | None = None,
         config: TuneConfig | None = None, *, out_dir: str | os.PathLike | None = None, resume: bool = True,
         progress: bool = True, on_step: Callable[[int, float], None] | None = None
         ) -> tuple[Grouter, TuneResult | None]:
    """Tune ``grouter`` (in place, and returned) for balance on ``train``.

    Returns ``(grouter, TuneResult)``; the result is None without ``validation``. With
    ``out_dir``, checkpoints go to ``out_dir/checkpoint`` and the tuned Grouter to ``out_dir``.
    """
    config = config or TuneConfig()
    if train.vocab_size > grouter.config.vocab_size:
        raise ValueError(f"vocabulary mismatch: the tokenizer has vocab_size={train.vocab_size} but the Grouter's "
                         f"embedding has vocab_size={grouter.config.vocab_size}")
    from grouter_pass.router.checkpoint import grouter_fingerprint

    grouter.to(config.device)
    batches = PackedBatches(train, config.seq_len, config.batch_size, seed=config.seed)
    val = PackedBatches(validation, config.seq_len, config.batch_size, shuffle=False) if validation else None
    before = measure_max_violation(grouter, val.eval_batches(config.eval_tokens)) if val else None
    settings = {"tune": {k: v for k, v in dataclasses.asdict(config).items() if k != "device"},
                "grouter": grouter_fingerprint(grouter),
                "train_tokens": train.num_tokens}
    folding, start = getattr(grouter, "folding", None), 0
    loaded = resume_run(out_dir, settings, resume=resume, what="tuning")
    if loaded is not None:
        grouter, start = loaded[0], int(loaded[1]["step"])
        grouter.to(config.device)
        grouter.folding = folding
    if config.mode == "bias":
        grouter.config = grouter.config.replace(use_selection_bias=True)
    params = _freeze_for(grouter, config.mode)
    # the optimizer exists in bias mode too (no parameters), so checkpoints have one shape
    optimizer = torch.optim.AdamW(params or [torch.nn.Parameter(torch.zeros(1))], lr=config.lr,
                                  weight_decay=config.weight_decay)
    if loaded is not None:
        optimizer.load_state_dict(loaded[1]["optimizer"])
    grouter.eval()   # no dropout anywhere; eval keeps norms etc. in inference form
    e = grouter.config.num_experts

    def tune_step(step: int) -> tuple[float, dict[str, float]]:
        ids = batches.batch(step).to(config.device)
        if config.mode == "score":
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, base_lr=config.lr, warmup=config.warmup, total=config.steps)
            logits = grouter(ids)
            _, sel = grouter.gate(logits.detach())
            loss = balance_loss(logits, sel, e)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            value = float(loss.detach())
        else:
            with torch.no_grad():
                logits = grouter(ids)
                _, sel = grouter.gate(logits)
                share = expert_load(sel, e).to(grouter.bias.device).double() / sel.numel()
                grouter.bias -= config.bias_rate * torch.sign(share - 1.0 / e).to(grouter.bias.dtype)
                value = float(balance_loss(logits, sel, e))
        return value, {"tokens": ids.numel(), "balance": value}

    run_steps(f"tune[{config.mode}]", tune_step, start=start, steps=config.steps, grouter=grouter,
              optimizer=optimizer, settings=settings, run_dir=out_dir, save_every=config.save_every,
              progress=progress, on_step=on_step)
    for p in grouter.parameters():
        p.requires_grad_(True)
    result = None
    if val is not None:
        result = TuneResult(before, measure_max_violation(grouter, val.eval_batches(config.eval_tokens)))
        log.info("tuned Grouter: %s", result, extra=RESULT)
    if out_dir is not None:
        save_trainer_checkpoint(out_dir, grouter, optimizer, config.steps, settings)
        save_grouter(grouter, Path(out_dir), folding=folding)
    return grouter, result
