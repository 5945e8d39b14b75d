"""Capture the first MoE layer's router of a source model, found by the project's own detection.

The source model is compiled with a small Dynamo backend that runs the same canonicalization and
gating detection as the grouter pass (``canonicalize_gating_pass`` + ``find_gating_sites``), picks
the first gating site in execution order, and inserts one call after that site's router linear::

    x_NH --linear--> logits_NE --> (softmax/topk ... unchanged)
                         \\--> record(x_NH, logits_NE)            <- inserted

Running the compiled model then records the router's input hidden states and its full-E logits,
and stops: ``record`` raises once it has them, so nothing after the first router runs (no later
layer, no LM head: at a 151936-token vocabulary the head's logits alone would be ~20 GB per
8 x 4096-token batch in fp32). With ``load_source_model(num_layers=..., lm_head=False)`` the later
layers and the head are not even loaded, and :func:`load_teacher` finds that number itself.
No module class or attribute name is looked at, so any model the pass understands can be a
teacher. "First" is the first graph Dynamo compiles that holds a site (graphs are compiled in
execution order) and, inside it, the first site in graph order; a recompile of the same frame is
hooked at the site with the same module path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from grouter_pass._logging import RESULT

log = logging.getLogger(__name__)


@dataclass
class RouterCapture:
    """One call's capture: ``hidden [N, H]`` entering the router and its ``logits [N, E]``."""

    hidden: torch.Tensor
    logits: torch.Tensor


@dataclass
class _State:
    module_path: str | None = None
    num_experts: int | None = None
    top_k: int | None = None
    family: str | None = None
    records: list[RouterCapture] = field(default_factory=list)
    keep_hidden: bool = True


class NoRouterFound(ValueError):
    """The source model has no MoE gating site the detection pass recognises."""


class _RouterCaptured(Exception):
    """Raised by the inserted ``record`` to end the source model's forward at the first router."""


class RouterTeacher:
    """The first MoE router of ``model`` as a function of token ids.

    Args:
        model: any ``nn.Module`` MoE (a transformers causal LM, or a hand-written model) taking
            ``input_ids`` as its first argument.
        prepare: make loop-style MoE layers capturable first (:func:`grouter_pass.prepare_model`;
            in place, changes no number).
        keep_hidden: also keep the router's input hidden states (costs memory; distillation does
            not need them).

    ``teacher(input_ids) -> logits [B, S, E]`` (float32); after the first call, ``num_experts``,
    ``top_k``, ``module_path`` and ``family`` describe the site.
    """

    def __init__(self, model: torch.nn.Module, *, prepare: bool = True, keep_hidden: bool = False) -> None:
        if prepare:
            from grouter_pass.api import prepare_model

            prepare_model(model)
        self.model = model.eval()
        self.vocab_size = _vocab_size_of(model)
        self._state = _State(keep_hidden=keep_hidden)
        self._compiled = torch.compile(model, backend=self._backend, dynamic=False)

    @property
    def num_experts(self) -> int | None:
        return self._state.num_experts

    @property
    def top_k(self) -> int | None:
        return self._state.top_k

    @property
    def module_path(self) -> str | None:
        return self._state.module_path

    @property
    def family(self) -> str | None:
        return self._state.family

    def _backend(self, gm: fx.GraphModule, example_inputs: Sequence[Any]):
        from grouter_pass.config import GrouterConfig
        from grouter_pass.passes.canonicalize import canonicalize_gating_pass
        from grouter_pass.passes.detect import find_gating_sites
        from grouter_pass.passes.graph_utils import copy_graph_module

        state = self._state
        work = canonicalize_gating_pass(copy_graph_module(gm), example_inputs, config=GrouterConfig())
        sites, _ = find_gating_sites(work, probe=True, example_inputs=example_inputs)
        if state.module_path is not None:
            sites = [s for s in sites if s.module_path == state.module_path]
        if not sites:
            return gm.forward
        site = sites[0]
        if state.module_path is None:
            state.module_path, state.family = site.module_path, site.gating.spec.describe()
            state.num_experts, state.top_k = site.gating.spec.num_experts, site.gating.spec.top_k
            log.info("grouter: teacher router is the first MoE layer, %s (%s, E=%d, k=%d)", site.module_path,
                     state.family, state.num_experts, state.top_k, extra=RESULT)
        logits, hidden = site.gating.logits, site.gating.router_input

        def record(h: torch.Tensor, z: torch.Tensor) -> None:
            state.records.append(RouterCapture(h.detach() if state.keep_hidden else h.new_empty(0),
                                               z.detach().float()))
            raise _RouterCaptured   # the rest of the model is not needed

        with work.graph.inserting_after(logits):
            work.graph.call_function(record, (hidden, logits))
        work.recompile()
        return work.forward

    def capture(self, input_ids: torch.Tensor) -> RouterCapture:
        """Run the model on ``input_ids [B, S]``; the first router's ``RouterCapture`` with
        ``logits`` reshaped to ``[B, S, E]`` (and ``hidden`` to ``[B, S, H]`` if kept)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {list(input_ids.shape)}")
        if self.vocab_size is not None and input_ids.numel() and int(input_ids.max()) >= self.vocab_size:
            raise ValueError(f"vocabulary mismatch: token id {int(input_ids.max())} is outside the source model's "
                             f"vocab_size={self.vocab_size}")
        self._state.records.clear()
        param = next(self.model.parameters(), None)
        if param is not None:
            input_ids = input_ids.to(param.device)
        with torch.no_grad():
            try:
                self._compiled(input_ids)
            except _RouterCaptured:
                pass
        if not self._state.records:
            raise NoRouterFound("no MoE gating site was found in the source model (run `grouter diff` or "
                                "grouter_pass.explain() on it to see why)")
        rec = self._state.records[0]
        self._state.records.clear()
        b, s = input_ids.shape
        if rec.logits.shape[0] != b * s:
            raise NoRouterFound(f"the router at {self.module_path} saw {rec.logits.shape[0]} tokens for a "
                                f"[{b}, {s}] input; it does not route every token once")
        hidden = rec.hidden.reshape(b, s, -1) if rec.hidden.numel() else rec.hidden
        return RouterCapture(hidden, rec.logits.reshape(b, s, -1))

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.capture(input_ids).logits


def _vocab_size_of(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is not None and isinstance(getattr(config, "vocab_size", None), int):
        return config.vocab_size
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        emb = get()
        if isinstance(emb, torch.nn.Embedding):
            return emb.num_embeddings
    return None


def load_source_model(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                      num_layers: int | None = None, lm_head: bool = True) -> torch.nn.Module:
    """A transformers causal LM from a local checkpoint directory (no download).

    Args:
        lm_head: False loads the base model only (``AutoModel``: no LM head, whose weights are a
            vocabulary-sized matrix, 0.6 GB in bf16 at Qwen3's 151936 x 2048); enough for a
            :class:`RouterTeacher`, which stops at the first router.
        num_layers: load only the first ``num_layers`` decoder layers (as the reference's
            ``--grouter-allow-partial-load``): distillation reads the first MoE layer's router
            only, so a large source fits in far less memory. The weights of the dropped layers
            are not read.
    """
    p = Path(path)
    if not p.is_dir() or not (p / "config.json").is_file():
        raise FileNotFoundError(f"source model not found: {p} is not a transformers checkpoint directory "
                                "(no config.json)")
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    kwargs = {}
    if num_layers is not None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(p), local_files_only=True)
        total = getattr(config, "num_hidden_layers", None)
        if not isinstance(total, int):
            raise ValueError(f"{p}: the config has no num_hidden_layers, so --source-layers cannot truncate it")
        if not 1 <= num_layers <= total:
            raise ValueError(f"source layers {num_layers} is out of range: the model has num_hidden_layers={total}")
        config.num_hidden_layers = num_layers
        for name in ("layer_types", "mlp_only_layers"):   # per-layer lists some configs carry
            value = getattr(config, name, None)
            if isinstance(value, list) and len(value) == total:
                setattr(config, name, value[:num_layers])
        kwargs["config"] = config
    try:
        auto = AutoModelForCausalLM if lm_head else AutoModel
        model = auto.from_pretrained(str(p), local_files_only=True, dtype=dtype, **kwargs)
    except OSError as exc:
        raise ValueError(f"cannot load the source model from {p}: {exc}") from None
    return model.eval()


def _num_hidden_layers(path: Path) -> int | None:
    from transformers import AutoConfig

    total = getattr(AutoConfig.from_pretrained(str(path), local_files_only=True), "num_hidden_layers", None)
    return total if isinstance(total, int) and total >= 1 else None


def load_teacher(path: str | os.PathLike, example_input_ids: torch.Tensor, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", num_layers: int | None = None) -> tuple[RouterTeacher, int | None]:
    """A :class:`RouterTeacher` over the fewest leading decoder layers of a transformers source
    that hold its first MoE router, already called once on ``example_input_ids``.

    Why: the teacher reads the first router only, but every layer that is loaded costs its weights
    and, for an MoE layer, its detection and probe when the teacher compiles (2.5 GB per layer at
    Qwen3-30B-A3B width), so loading the whole source makes the peak grow with its depth. Without
    ``num_layers``, 1, 2, 3, ... leading layers are loaded until the teacher finds a router (one
    try for a model whose first layer is MoE; DeepSeek-style sources with dense first layers take
    one more per dense layer, each a short forward of small layers). Which layer routes is read by
    the detection pass, never from config names. A given ``num_layers`` is used as is.

    Returns:
        ``(teacher, layers loaded)``; the count is None when the config has no
        ``num_hidden_layers`` (then the whole model is loaded).

    Raises:
        NoRouterFound: no router in any number of layers (the message names how many were tried).
    """
    p = Path(path)
    total = _num_hidden_layers(p) if num_layers is None and (p / "config.json").is_file() else None
    tries = [num_layers] if num_layers is not None or total is None else list(range(1, total + 1))
    for count in tries:
        model = load_source_model(p, num_layers=count, dtype=dtype, lm_head=False).to(device)
        teacher = RouterTeacher(model)
        try:
            teacher(example_input_ids)
        except NoRouterFound:
            if count is None or count == tries[-1]:
                raise
            log.info("grouter: no MoE router in the first %d layer(s) of %s; loading %d", count, p, count + 1)
            del teacher, model
            continue
        log.info("grouter: teacher loaded %s of %s decoder layers", count if count is not None else "all",
                 total if total is not None else "its", extra=RESULT)
        return teacher, count
    raise AssertionError("unreachable: the last try re-raises")
