"""Distillation (method notes section 4): train a Grouter to match the source's first MoE router.

    loss = T^2 * KL( softmax(teacher_logits / T) || softmax(student_logits / T) )   over all E,
           averaged over tokens (T = 1 by default, as the paper and the released script)

The teacher is a :class:`~.capture.RouterTeacher` (or any callable ``input_ids -> [B, S, E]``):
it only runs forward. The student sees the same packed token windows. AdamW with linear warmup
and cosine decay, gradient clipping, periodic checkpoints (resumable, see :mod:`.training`),
a progress bar, and a held-out evaluation reporting KL and top-k agreement.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from grouter_pass._logging import RESULT
from grouter_pass.router.checkpoint import save_grouter
from grouter_pass.router.config import GrouterModelConfig
from grouter_pass.router.data import PackedBatches, TokenizedCorpus
from grouter_pass.router.network import Grouter
from grouter_pass.router.training import lr_at, resume_run, run_steps, save_trainer_checkpoint

log = logging.getLogger(__name__)

Teacher = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """Settings of :func:`distill` (reference script values in brackets).

    Attributes:
        steps: optimizer steps [10010]. batch_size, seq_len: sequences per step and their
            length [128 x 4096]. lr [3e-4], warmup [3000] steps, cosine to ``min_lr_ratio * lr``.
        weight_decay: AdamW weight decay. grad_clip: global grad-norm clip [1.0].
        temperature: KL temperature [1.0; the paper uses none, which is T = 1].
        save_every: checkpoint every this many steps (0: only at the end).
        eval_every: evaluate on held-out tokens every this many steps (0: only at the end).
        eval_tokens: held-out tokens per evaluation. seed: data order and initialisation.
        device: where the student trains (``"cuda"``...); the teacher model stays where it is
            and receives the batch on its own device.
        micro_batch_size: sequences per forward (gradient accumulation; default: the whole
            batch). Memory follows the micro-batch: the teacher and the student run on it, the
            gradients of a step add up to those of the whole batch.

    Data parallel: when ``torch.distributed`` is initialised, ``batch_size`` is the global batch;
    rank ``r`` of ``W`` takes rows ``r::W`` of every step's batch, gradients are summed over the
    ranks (as the reference all-reduces), and rank 0 alone writes checkpoints and the result.
    A run on W ranks computes the steps of one process with the same global batch.
    """

    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 512
    lr: float = 3e-4
    warmup: int = 100
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    temperature: float = 1.0
    save_every: int = 200
    eval_every: int = 0
    eval_tokens: int = 65536
    seed: int = 0
    device: str = "cpu"
    micro_batch_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@dataclass
class EvalResult:
    """Held-out agreement with the teacher.

    ``kl``: mean per-token KL(teacher || student); ``topk_agreement``: fraction of tokens whose
    top-k expert *set* equals the teacher's; ``topk_overlap``: mean |student set & teacher set| / k;
    ``tokens``: tokens evaluated.
    """

    kl: float
    topk_agreement: float
    topk_overlap: float
    tokens: int

    def __str__(self) -> str:
        return (f"KL {self.kl:.4f}, top-k set agreement {self.topk_agreement:.2%}, top-k overlap "
                f"{self.topk_overlap:.2%} on {self.tokens} held-out tokens")


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of ``T^2 KL(softmax(t/T) || softmax(s/T))`` over the last dim."""
    e = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, e) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, e) / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature ** 2


def topk_sets(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, E]`` boolean membership of each token's top-k set."""
    e = logits.shape[-1]
    flat = logits.reshape(-1, e)
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, flat.topk(k, dim=-1).indices, True)


@torch.no_grad()
def evaluate(grouter: Grouter, teacher: Teacher, batches: PackedBatches, *, max_tokens: int | None = None,
             top_k: int | None = None, micro_batch_size: int | None = None) -> EvalResult:
    """KL and top-k agreement of ``grouter`` with ``teacher`` on ``batches`` (in order), run
    ``micro_batch_size`` sequences at a time (the same tokens, no more memory than a training step)."""
    was_training = grouter.training
    grouter.eval()
    k = top_k or grouter.config.top_k
    kl_sum, agree, overlap, n = 0.0, 0, 0.0, 0
    device = next(grouter.parameters()).device
    for batch in batches.eval_batches(max_tokens):
        for ids in batch.split(micro_batch_size or batch.shape[0]):
            ids = ids.to(device)
            t_logits, s_logits = teacher(ids).to(device), grouter(ids)
            tokens = ids.numel()
            kl_sum += float(kl_loss(s_logits, t_logits)) * tokens
            ts, ss = topk_sets(t_logits, k), topk_sets(s_logits, k)
            agree += int((ts == ss).all(-1).sum())
            overlap += float((ts & ss).sum()) / k
            n += tokens
    grouter.train(was_training)
    return EvalResult(kl_sum / n, agree / n, overlap / n, n)


def _settings(config: DistillConfig, model_config: GrouterModelConfig, train: TokenizedCorpus) -> dict:
    return {"distill": dataclasses.asdict(config), "model": model_config.to_dict(), "train_tokens": train.num_tokens}


def distill(teacher: Teacher, model_config: GrouterModelConfig, train: TokenizedCorpus,
            validation: TokenizedCorpus | None = None, config: DistillConfig | None = None, *,
            out_dir: str | os.PathLike | None = None, resume: bool = True, progress: bool = True,
            on_step: Callable[[int, float], None] | None = None) -> tuple[Grouter, EvalResult | None]:
    """Distill a Grouter of ``model_config`` from ``teacher`` on ``train``.

    Args:
        teacher: ``input_ids [B, S] -> logits [B, S, E]``; usually ``RouterTeacher(model)``.
        model_config: the student's sizes; its ``num_experts`` must equal the teacher's E.
        train, validation: tokenized corpora (validation: held-out tokens for the evaluation).
        out_dir: run directory for checkpoints (``out_dir/checkpoint``) and the final Grouter
            (``out_dir``); None trains in memory only.
        resume: continue from ``out_dir/checkpoint`` if it exists (same settings required).
        on_step: called as ``on_step(step, loss)`` after each step (tests use it to interrupt).

    Returns:
        ``(grouter, evaluation on validation or None)``.
    """
    config = config or DistillConfig()
    settings = _settings(config, model_config, train)
    for key in ("device", "micro_batch_size"):   # a run may resume on another device, in other micro-batches
        settings["distill"].pop(key)
    batches = PackedBatches(train, config.seq_len, config.batch_size, seed=config.seed)
    if train.vocab_size > model_config.vocab_size:
        raise ValueError(f"vocabulary mismatch: the tokenizer has vocab_size={train.vocab_size} but the Grouter's "
                         f"embedding has vocab_size={model_config.vocab_size}")
    loaded = resume_run(out_dir, settings, resume=resume, what="distillation")
    if loaded is not None:
        grouter, start = loaded[0], int(loaded[1]["step"])
    else:
        torch.manual_seed(config.seed)
        grouter, start = Grouter(model_config), 0
    grouter.tokenizer_fingerprint = train.tokenizer_fingerprint or None
    grouter.to(config.device).train()
    optimizer = torch.optim.AdamW(grouter.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if loaded is not None:
        optimizer.load_state_dict(loaded[1]["optimizer"])
    rank, world = _data_parallel()
    if config.batch_size % world:
        raise ValueError(f"batch_size={config.batch_size} does not split over {world} data-parallel ranks")
    micro = config.micro_batch_size or config.batch_size // world
    val_batches = PackedBatches(validation, config.seq_len, config.batch_size, shuffle=False) \
        if validation is not None else None
    checked = False

    def train_step(step: int) -> tuple[float, dict[str, float]]:
        nonlocal checked
        ids = batches.batch(step).to(config.device)
        mine = ids[rank::world]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, base_lr=config.lr, warmup=config.warmup, total=config.steps,
                                min_ratio=config.min_lr_ratio)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for m0 in range(0, mine.shape[0], micro):
            part = mine[m0:m0 + micro]
            with torch.no_grad():
                t_logits = teacher(part).to(config.device)
            if not checked:
                if t_logits.shape[-1] != model_config.num_experts:
                    raise ValueError(f"expert count mismatch: the teacher router has num_experts={t_logits.shape[-1]} "
                                     f"but the Grouter config has num_experts={model_config.num_experts}")
                checked = True
            # the batch's loss is the mean over all its tokens: each micro-batch adds its share
            share = part.numel() / ids.numel()
            loss = kl_loss(grouter(part), t_logits, config.temperature) * share
            loss.backward()
            loss_sum += loss.detach().double().cpu()
        if world > 1:
            _all_reduce_sum([p.grad for p in grouter.parameters() if p.grad is not None] + [loss_sum])
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(grouter.parameters(), config.grad_clip)
        optimizer.step()
        value = float(loss_sum.float())
        return value, {"tokens": ids.numel(), "loss": value, "lr": optimizer.param_groups[0]["lr"]}

    def periodic_evaluation(done: int) -> None:
        if val_batches is not None and config.eval_every and done % config.eval_every == 0 and done < config.steps:
            log.info("step %d: %s", done, evaluate(grouter, teacher, val_batches, max_tokens=config.eval_tokens,
                                                   micro_batch_size=micro))

    run_steps("distill", train_step, start=start, steps=config.steps, grouter=grouter, optimizer=optimizer,
              settings=settings, run_dir=out_dir, save_every=config.save_every, progress=progress,
              writer=rank == 0, after_step=periodic_evaluation, on_step=on_step)
    grouter.eval()
    result = None
    if val_batches is not None:
        result = evaluate(grouter, teacher, val_batches, max_tokens=config.eval_tokens, micro_batch_size=micro)
        log.info("distilled Grouter: %s", result, extra=RESULT)
    if out_dir is not None and rank == 0:
        save_trainer_checkpoint(out_dir, grouter, optimizer, config.steps, settings)
        save_grouter(grouter, Path(out_dir), extra={"step": config.steps})
    return grouter, result


def _data_parallel() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum ``tensors`` over the ranks in place, flattened into one buffer (one collective per step)."""
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    torch.distributed.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
