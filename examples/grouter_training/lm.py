"""The tiny Qwen3-MoE language models and their resumable, interleaved training loop.

Why interleaved: the two target arms (learned router + aux loss, and Grouter) train in one
process, one step of each in turn, on the same batch. The machine is shared and noisy, so
absolute step times drift; a slow spell then hits both arms alike and the *ratio* of their
median step times stays meaningful (the method of ``reference/benchmarking.md``). Data is a pure
function of the step (:class:`~grouter_pass.router.PackedBatches`), so both arms see the same
tokens in the same order, and a resumed run sees what an uninterrupted run would.

Each arm is an :class:`LMRun`: the eager module (owner of the weights, what checkpoints save), the
compiled callable that trains it, a lazily built optimizer (the Grouter arm's trainable
parameters are only known after the first forward), and the run's records: validation curve,
training losses, step times, expert load.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from grouter_pass.router import Grouter, PackedBatches
from grouter_pass.router.progress import Progress
from grouter_pass.router.training import lr_at

from .scales import LMTrainConfig, MoEModelConfig

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"

#: ``params_fn(compiled, eager) -> parameters``: what the optimizer trains, asked after the first
#: forward (Grouter mode only knows then which router weights went dead).
ParamsFn = Callable[[Any, torch.nn.Module], Iterable[torch.nn.Parameter]]
#: ``load_fn(input_ids, output) -> [L, E]`` int64 assignments of this step, or None.
LoadFn = Callable[[torch.Tensor, Any], torch.Tensor | None]


def build_moe_lm(config: MoEModelConfig, *, vocab_size: int, seed: int, aux_loss_coef: float,
                 learned_router: bool) -> torch.nn.Module:
    """A randomly initialised transformers Qwen3-MoE causal LM (built from a config, no download).

    Args:
        config: sizes.
        vocab_size: the tokenizer's vocabulary (257 for the byte tokenizer).
        seed: initialisation seed: two calls with the same seed give the same weights whatever
            ``learned_router`` is, so both target arms start from one init.
        aux_loss_coef: ``router_aux_loss_coef`` (only used with ``learned_router``).
        learned_router: True: ``output_router_logits=True`` so transformers adds the balance loss
            to ``loss`` and returns the router logits; False (Grouter arm): no aux loss at all (the
            router weights stay in the module; Grouter mode leaves them dead).
    """
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    hf = AutoConfig.for_model(
        "qwen3_moe", vocab_size=vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads,
        head_dim=config.hidden_size // config.num_heads, intermediate_size=4 * config.hidden_size,
        moe_intermediate_size=config.moe_intermediate_size, num_experts=config.num_experts,
        num_experts_per_tok=config.top_k, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=config.max_seq_len, use_cache=False, tie_word_embeddings=False,
        initializer_range=config.initializer_range, output_router_logits=learned_router,
        router_aux_loss_coef=aux_loss_coef if learned_router else 0.0, bos_token_id=None, eos_token_id=None,
        pad_token_id=None)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(hf)


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (what transformers computes for ``labels=input_ids``)."""
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), input_ids[:, 1:].reshape(-1))


def router_z_loss(router_logits: Sequence[torch.Tensor] | None) -> torch.Tensor:
    """ST-MoE's router z-loss: mean over layers and tokens of ``logsumexp(logits)^2`` (in fp32),
    which keeps the router logits small. ``router_logits``: one ``[tokens, E]`` tensor per layer."""
    if not router_logits:
        raise ValueError("the z-loss needs the router logits: build the model with output_router_logits=True")
    return torch.stack([torch.logsumexp(logits.float(), dim=-1).square().mean() for logits in router_logits]).mean()


class AuxFreeRouter(torch.nn.Module):
    """DeepSeek-V3's auxiliary-loss-free balancing in place of a Qwen3-MoE router: sigmoid
    scores, experts selected by score + a per-expert bias that is not learned but moved after each
    step towards balance (:class:`AuxFreeBalancer`), gates the selected scores renormalised. It
    keeps the router's own weight, so the arm starts from the same initialisation as the others;
    ``load`` counts the assignments of the forwards since the last ``start_step``."""

    def __init__(self, router: torch.nn.Module) -> None:
        super().__init__()
        self.top_k, self.num_experts, self.hidden_dim = router.top_k, router.num_experts, router.hidden_dim
        self.weight = router.weight
        self.register_buffer("selection_bias", torch.zeros(self.num_experts))
        self.register_buffer("load", torch.zeros(self.num_experts))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = F.linear(hidden_states, self.weight)
        scores = torch.sigmoid(logits.float())
        ids = torch.topk(scores + self.selection_bias, self.top_k, dim=-1).indices
        gates = scores.gather(-1, ids)
        gates = gates / gates.sum(dim=-1, keepdim=True)
        with torch.no_grad():
            self.load.index_add_(0, ids.reshape(-1), torch.ones(ids.numel(), device=ids.device))
        return logits, gates.to(logits.dtype), ids


class AuxFreeBalancer:
    """Replaces every Qwen3-MoE router of ``model`` with an :class:`AuxFreeRouter` and, after each
    step, moves each expert's selection bias by ``rate`` towards balance: up for an expert below
    the mean load, down above it (DeepSeek-V3: rate 0.001)."""

    def __init__(self, model: torch.nn.Module, rate: float = 1e-3) -> None:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

        self.rate = rate
        self.routers: list[AuxFreeRouter] = []
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, Qwen3MoeTopKRouter):
                    router = AuxFreeRouter(child)
                    setattr(module, name, router)
                    self.routers.append(router)
        if not self.routers:
            raise ValueError("the aux-loss-free arm needs a Qwen3-MoE model (no Qwen3MoeTopKRouter found)")

    def start_step(self) -> None:
        for r in self.routers:
            r.load.zero_()

    def loads(self) -> torch.Tensor:
        """``[L, E]`` assignments since the last :meth:`start_step`."""
        return torch.stack([r.load.detach().cpu() for r in self.routers])

    @torch.no_grad()
    def update(self) -> None:
        for r in self.routers:
            r.selection_bias += self.rate * torch.sign(r.load.mean() - r.load)


def learned_router_load(output: Any, top_k: int, num_experts: int) -> torch.Tensor | None:
    """``[L, E]`` assignments of each layer's learned router in ``output.router_logits``."""
    logits = getattr(output, "router_logits", None)
    if not logits:
        return None
    rows = [torch.bincount(z.detach().topk(top_k, dim=-1).indices.reshape(-1).cpu(), minlength=num_experts)
            for z in logits]
    return torch.stack(rows)


@dataclass
class LMRun:
    """One training arm; see the module docstring.

    Attributes:
        name: ``"source"``, ``"baseline"`` or ``"grouter"``.
        model: the eager module (weights live here; checkpoints save its state dict).
        compiled: the callable that trains it (``torch.compile`` / ``apply_grouter`` result).
        config: its training settings. run_dir: where its checkpoint goes.
        settings: what changes the result; a checkpoint with other settings is refused.
        params_fn: the optimizer's parameters, asked after the first forward.
        load_fn: per-step expert assignments (for MaxVio over the run), or None.
        aux_loss_coef: subtracted from ``loss`` to log the pure cross-entropy.
        z_loss_coef: weight of the router z-loss (ST-MoE: the mean squared log-sum-exp of each
            layer's router logits) added to the loss; needs ``output_router_logits``.
        routing_fn: pre-dispatch: ``input_ids -> (weights, ids)`` computed *before* the timed
            step, as if the routing were stored with the data, and delivered to the compiled
            callable with ``grouter_pass.routing`` (for ``PrecomputedRouting`` arms).
        balancer: an :class:`AuxFreeBalancer` whose selection biases follow each step's load.
    """

    name: str
    model: torch.nn.Module
    compiled: Any
    config: LMTrainConfig
    run_dir: Path
    settings: dict[str, Any]
    params_fn: ParamsFn
    load_fn: LoadFn | None = None
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    routing_fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    balancer: AuxFreeBalancer | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    step: int = 0
    curve: list[dict[str, float]] = field(default_factory=list)       # step, tokens, val_loss
    train_log: list[dict[str, float]] = field(default_factory=list)   # step, tokens, loss, ce, aux
    step_times: list[dict[str, float]] = field(default_factory=list)  # step, seconds, counted
    run_load: torch.Tensor | None = None                              # [L, E] over the whole run
    optimizer: torch.optim.Optimizer | None = None
    num_trainable: int = 0
    _pending_optimizer_state: dict[str, Any] | None = None
    _steps_since_start: int = 0

    # ---------------------------------------------------------------------------- checkpoints

    def save(self) -> Path:
        """Write the arm's state atomically (a crash mid-save keeps the previous checkpoint)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state = {"step": self.step, "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                 "curve": self.curve, "train_log": self.train_log, "step_times": self.step_times,
                 "run_load": self.run_load, "settings": self.settings}
        path = self.run_dir / CHECKPOINT_FILE
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        return path

    def try_resume(self) -> bool:
        """Load ``run_dir/checkpoint.pt`` if there is one; refuse one made with other settings."""
        path = self.run_dir / CHECKPOINT_FILE
        if not path.is_file():
            return False
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ValueError(f"{path} is corrupt or truncated ({type(exc).__name__}: {exc}); delete it or pass "
                             "--no-resume") from None
        if state["settings"] != self.settings:
            diff = sorted(k for k in set(state["settings"]) | set(self.settings)
                          if state["settings"].get(k) != self.settings.get(k))
            raise ValueError(f"cannot resume {self.run_dir}: its checkpoint was made with other settings (differing: "
                             f"{diff}); use another --out directory or --no-resume")
        self.model.load_state_dict(state["model"])
        self.step = int(state["step"])
        self.curve, self.train_log, self.step_times = state["curve"], state["train_log"], state["step_times"]
        self.run_load = state["run_load"]
        self._pending_optimizer_state = state["optimizer"]
        log.info("%s: resuming from step %d (%s)", self.name, self.step, path)
        return True

    # ------------------------------------------------------------------------------- training

    def _ensure_optimizer(self) -> None:
        if self.optimizer is not None:
            return
        params = [p for p in self.params_fn(self.compiled, self.model) if p.requires_grad]
        self.num_trainable = sum(p.numel() for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        if self._pending_optimizer_state is not None:
            self.optimizer.load_state_dict(self._pending_optimizer_state)
            self._pending_optimizer_state = None
        log.info("%s: optimizer over %d tensors, %d parameters", self.name, len(params), self.num_trainable)

    def train_step(self, input_ids: torch.Tensor) -> dict[str, float]:
        """One optimizer step on ``input_ids [B, S]`` (already on the device); times it."""
        cfg = self.config
        self.model.train()
        delivered = self._delivered(input_ids)   # pre-dispatched routing: computed before the clock starts
        if self.balancer is not None:
            self.balancer.start_step()
        t0 = time.perf_counter()
        with delivered:
            out = self.compiled(input_ids=input_ids, labels=input_ids)
        loss = out.loss
        z = router_z_loss(out.router_logits) if self.z_loss_coef else None
        if z is not None:
            loss = loss + self.z_loss_coef * z
        loss.backward()
        self._ensure_optimizer()
        assert self.optimizer is not None
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, base_lr=cfg.lr, warmup=cfg.warmup, total=cfg.steps,
                                min_ratio=cfg.min_lr_ratio)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        self._steps_since_start += 1
        self.step += 1
        aux = getattr(out, "aux_loss", None)
        aux_value = float(aux.detach()) if aux is not None else 0.0
        value = float(loss.detach())
        z_value = float(z.detach()) if z is not None else 0.0
        record = {"step": self.step, "tokens": self.step * cfg.tokens_per_step, "loss": value,
                  "ce": value - self.aux_loss_coef * aux_value - self.z_loss_coef * z_value, "aux": aux_value,
                  "z": z_value}
        self.train_log.append(record)
        self.step_times.append({"step": self.step, "seconds": seconds,
                                "counted": float(self._steps_since_start > cfg.timing_skip)})
        if self.load_fn is not None:
            load = self.load_fn(input_ids, out)
            if load is not None:
                self.run_load = load if self.run_load is None else self.run_load + load
        if self.balancer is not None:
            self.balancer.update()
        return record

    def _delivered(self, input_ids: torch.Tensor) -> Any:
        """The context that hands this batch's pre-dispatched routing to the compiled callable."""
        if self.routing_fn is None:
            return contextlib.nullcontext()
        from grouter_pass import routing

        with torch.no_grad():
            weights, ids = self.routing_fn(input_ids)
        return routing(weights, ids)

    def evaluate(self, batches: Sequence[torch.Tensor]) -> float:
        """Mean validation cross-entropy through the *compiled* callable.

        Called with grad enabled and the training call's signature, so it reuses the training
        graph instead of compiling an inference one (and, for the Grouter arm, it runs the
        rewritten model: the eager module would route with its own, untrained router).
        """
        total = 0.0
        for ids in batches:
            with self._delivered(ids):
                out = self.compiled(input_ids=ids, labels=ids)
            total += float(causal_lm_loss(out.logits.detach(), ids))
            del out
        return total / len(batches)

    def record_eval(self, batches: Sequence[torch.Tensor]) -> float:
        value = self.evaluate(batches)
        self.curve = [c for c in self.curve if c["step"] != self.step]
        self.curve.append({"step": self.step, "tokens": self.step * self.config.tokens_per_step, "val_loss": value})
        log.info("%s: step %d, %d tokens, validation loss %.4f", self.name, self.step,
                 self.step * self.config.tokens_per_step, value)
        return value


def validation_batches(batches: PackedBatches, count: int, device: torch.device) -> list[torch.Tensor]:
    """``count`` full validation batches, in order (partial batches are dropped: a new shape would
    recompile the training graph)."""
    out = [b.to(device) for b in batches.eval_batches(count * batches.batch_size * batches.seq_len)
           if b.shape[0] == batches.batch_size]
    if not out:
        raise ValueError(f"empty dataset: the validation split holds fewer than one batch of {batches.batch_size} x "
                         f"{batches.seq_len} tokens")
    return out[:count]


def train_interleaved(runs: Sequence[LMRun], batches: PackedBatches, val: Sequence[torch.Tensor], *,
                      progress: bool = True, desc: str = "train") -> None:
    """Train every arm of ``runs`` to ``config.steps``, one step of each in turn on the same batch.

    Evaluates at step 0, every ``eval_every`` steps and at the end; checkpoints every
    ``save_every`` steps and at the end. Arms resumed from different steps are first brought to
    the same step (each only trains while behind).
    """
    cfg = runs[0].config
    for run in runs:
        if run.config.steps != cfg.steps or run.config.tokens_per_step != cfg.tokens_per_step:
            raise ValueError(f"arms {runs[0].name} and {run.name} must train for the same steps and tokens")
        if not run.curve:
            run.record_eval(val)
    start = min(run.step for run in runs)
    bar = Progress(cfg.steps, desc, start=start, enabled=progress)
    for step in range(start, cfg.steps):
        ids = batches.batch(step).to(runs[0].device)
        metrics: dict[str, float] = {}
        for run in runs:
            if run.step > step:
                continue
            rec = run.train_step(ids)
            metrics[f"{run.name}_ce"] = rec["ce"]
        done = step + 1
        bar.update(done, tokens=ids.numel() * len(runs), **metrics)
        if done % cfg.eval_every == 0 or done == cfg.steps:
            for run in runs:
                run.record_eval(val)
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
            for run in runs:
                run.save()
    bar.close()


def grouter_load(grouter: Grouter, input_ids: torch.Tensor, num_layers: int) -> torch.Tensor:
    """``[L, E]`` assignments when ``grouter`` routes every one of ``num_layers`` layers."""
    with torch.no_grad():
        ids = grouter.route(input_ids)[1]
    row = torch.bincount(ids.reshape(-1).cpu(), minlength=grouter.config.num_experts)
    return row.expand(num_layers, -1).clone()


class GrouterHookedLM(torch.nn.Module):
    """A hand-written eager Grouter mode for Qwen3-MoE: every router returns the Grouter's
    ``(weights, ids)`` (flattened in ``[b, s]`` order) instead of its own.

    Specific to Qwen3-MoE on purpose: it is an independent reference for the structure-based
    graph rewrite (``apply_grouter(..., GrouterRouting(grouter))``), so it must not use the pass's
    detection. Used for the parity check at the end of training, and as ``--grouter-impl hooks``
    (a fallback that needs no Grouter-mode pass; its step times say nothing about the pass).
    """

    def __init__(self, model: torch.nn.Module, grouter: Grouter) -> None:
        super().__init__()
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

        self.model, self.grouter = model, grouter
        self._routing: tuple[torch.Tensor, torch.Tensor] | None = None
        routers = [m for m in model.modules() if isinstance(m, Qwen3MoeTopKRouter)]
        if not routers:
            raise ValueError("the hooked reference needs a Qwen3-MoE model (no Qwen3MoeTopKRouter found)")
        self.routers = routers
        for m in routers:
            m.register_forward_hook(self._hook)

    def _hook(self, _module: torch.nn.Module, _args: Any, out: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        assert self._routing is not None
        weights, ids = self._routing
        return out[0], weights.to(out[1].dtype), ids

    def router_parameters(self) -> set[torch.nn.Parameter]:
        return {p for m in self.routers for p in m.parameters()}

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        with torch.no_grad():
            self._routing = self.grouter.route_flat(input_ids)
        return self.model(input_ids=input_ids, labels=labels)


def grouter_reference_model(model: torch.nn.Module, grouter: Grouter) -> Callable[[torch.Tensor], torch.Tensor]:
    """``call(input_ids) -> logits`` of :class:`GrouterHookedLM` on a deep copy of ``model``
    (the copy keeps the trained weights; the original and its compiled graphs are untouched)."""
    ref = GrouterHookedLM(copy.deepcopy(model), grouter).eval()

    def call(input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return ref(input_ids).logits

    return call
