"""Routing sources: where the experts of every MoE layer and their gate weights come from.

* :class:`~grouter_pass.config.LearnedRouter` — the model's own router (exact mode).
* :class:`GrouterRouting` — a frozen Grouter network reading the token ids (online mode).
* :class:`PrecomputedRouting` — routing delivered with the batch (pre-dispatch), through
  ``with grouter_pass.routing(weights, ids): model(input_ids)``
  (:func:`grouter_pass.runtime.routing`).
* :class:`HashRouting` — a token-id -> experts table (DeepSeek-V4-style hash layers).

In the three non-learned modes routing does not depend on the model's representation, so the
pass computes it **once** per step, at the top of the graph, with one ``grouter.dispatch_plan``
that every MoE layer consumes (see ``passes/shared_routing.py``). The source is called through
one opaque op, ``torch.ops.grouter.external_routing``, whose fake implementation only needs the
token count: token counts stay symbolic and a new batch of precomputed routing never retraces.

Each source is registered with :mod:`grouter_pass.runtime.sources` when it is built (the op
receives the integer key; the table holds it weakly, the configuration strongly); its
``compute`` returns ``(weights [N, k] float32, ids [N, k] int64)`` in the graph's flattened
``[batch, seq]`` token order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from grouter_pass.runtime.sources import register_source
from grouter_pass.runtime.step import delivered_routing


class RouterNetwork(Protocol):
    """What :class:`GrouterRouting` needs from a router network (``grouter_pass.router.Grouter``)."""

    num_experts: int
    top_k: int

    def route(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True, kw_only=True, eq=False)
class GrouterRouting:
    """Route every MoE layer with a frozen Grouter reading the graph's token ids.

    Args:
        grouter: a :class:`grouter_pass.router.Grouter` (or anything with ``route(input_ids) ->
            (weights [B, S, k], ids [B, S, k])``, ``num_experts``, ``top_k`` and
            ``config.vocab_size``). It is put in eval mode and never trained by the pass.
    """

    grouter: Any
    kind: str = "grouter"
    key: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        for attr in ("route", "num_experts", "top_k"):
            if not hasattr(self.grouter, attr):
                raise TypeError(f"GrouterRouting needs a router network with .{attr}; "
                                f"got {type(self.grouter).__name__}")
        self.grouter.eval()
        for p in self.grouter.parameters():
            p.requires_grad_(False)
        object.__setattr__(self, "key", register_source(self))

    @property
    def num_experts(self) -> int:
        return int(self.grouter.num_experts)

    @property
    def top_k(self) -> int:
        return int(self.grouter.top_k)

    @property
    def vocab_size(self) -> int | None:
        cfg = getattr(self.grouter, "config", None)
        return getattr(cfg, "vocab_size", None)

    @property
    def needs_token_ids(self) -> bool:
        return True

    def compute(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids2d = tokens.reshape(tokens.shape[0], -1) if tokens.dim() != 2 else tokens
        if ids2d.device.type == "cpu" and ids2d.numel():   # a free check on CPU; no device sync
            hi = int(ids2d.max())
            vocab = self.vocab_size
            if vocab is not None and hi >= vocab:
                raise ValueError(f"token id {hi} is beyond the Grouter's vocab_size={vocab}")
        device = next(self.grouter.parameters()).device
        with torch.no_grad():
            weights, ids = self.grouter.route(ids2d.to(device))
        k = self.top_k
        return weights.reshape(-1, k).float().to(tokens.device), ids.reshape(-1, k).long().to(tokens.device)

    def describe(self) -> str:
        return f"grouter (E={self.num_experts}, k={self.top_k})"

    def __repr__(self) -> str:
        return f"GrouterRouting({type(self.grouter).__name__} E={self.num_experts} k={self.top_k}, key={self.key})"


@dataclass(frozen=True, kw_only=True, eq=False)
class PrecomputedRouting:
    """Routing delivered with each batch through :func:`routing` (pre-dispatch mode).

    Works for models fed ``inputs_embeds`` too: only the token count of the first MoE layer is
    needed. ``num_experts`` / ``top_k`` (optional) are checked against every site at compile time.
    """

    num_experts: int | None = None
    top_k: int | None = None
    kind: str = "precomputed"
    key: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", register_source(self))

    @property
    def needs_token_ids(self) -> bool:
        return False

    def compute(self, tokens: torch.Tensor, n_tokens: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        current = delivered_routing()
        if current is None:
            raise RuntimeError("PrecomputedRouting: no routing for this call; run the model inside "
                               "`with grouter_pass.routing(weights, ids): ...`")
        weights, ids = current.weights, current.ids
        if ids.shape[-1] != k or weights.shape[-1] != k:
            raise ValueError(f"precomputed routing has k={ids.shape[-1]} experts per token (ids {list(ids.shape)}, "
                             f"weights {list(weights.shape)}) but the model's MoE layers use k={k}")
        if ids.numel() // k != n_tokens or weights.numel() != ids.numel():
            raise ValueError(f"precomputed routing covers {ids.numel() // k} tokens (ids {list(ids.shape)}, "
                             f"weights {list(weights.shape)}) but this batch has {n_tokens} tokens")
        return (weights.reshape(n_tokens, k).to(tokens.device, torch.float32),
                ids.reshape(n_tokens, k).to(tokens.device, torch.int64))

    def describe(self) -> str:
        return "precomputed"


@dataclass(frozen=True, kw_only=True, eq=False)
class HashRouting:
    """Route each token by a fixed table of its id: ``ids = table[token]``.

    Args:
        table: ``[vocab, k]`` integer expert ids per token id.
        weights: ``[vocab, k]`` gate weights per token id; ``None`` gives uniform ``1/k``.
    """

    table: torch.Tensor
    weights: torch.Tensor | None = None
    kind: str = "hash"
    key: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.table.dim() != 2 or self.table.dtype.is_floating_point:
            raise ValueError(f"HashRouting table must be an integer [vocab, k] tensor, got "
                             f"{self.table.dtype} {list(self.table.shape)}")
        if self.weights is not None and self.weights.shape != self.table.shape:
            raise ValueError(f"HashRouting weights {list(self.weights.shape)} must match the table "
                             f"{list(self.table.shape)}")
        object.__setattr__(self, "key", register_source(self))

    @classmethod
    def random(cls, vocab_size: int, num_experts: int, top_k: int, *, seed: int = 0) -> HashRouting:
        """k distinct experts per token id, drawn uniformly (a balanced hash in expectation)."""
        gen = torch.Generator().manual_seed(seed)
        table = torch.rand(vocab_size, num_experts, generator=gen).argsort(dim=-1)[:, :top_k]
        return cls(table=table)

    @classmethod
    def balanced(cls, token_counts: torch.Tensor, num_experts: int, top_k: int) -> HashRouting:
        """A Balanced HashLayer: token ids in order of decreasing frequency, each given the
        ``top_k`` experts least loaded so far, so that every expert serves about as many tokens of
        the corpus ``token_counts`` were counted on (a random table only balances token *ids*;
        natural text is far from uniform over ids).

        Args:
            token_counts: ``[vocab]`` occurrences of each token id (a sample of the training data).
        """
        if token_counts.dim() != 1 or token_counts.is_complex() or bool((token_counts < 0).any()):
            raise ValueError(f"token_counts must be a [vocab] tensor of non-negative counts, got "
                             f"{token_counts.dtype} {list(token_counts.shape)}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        counts = token_counts.double()
        load = torch.zeros(num_experts, dtype=torch.float64)
        table = torch.empty(counts.numel(), top_k, dtype=torch.int64)
        for token in torch.argsort(counts, descending=True, stable=True).tolist():
            chosen = torch.argsort(load, stable=True)[:top_k]
            table[token] = chosen
            load[chosen] += counts[token]
        return cls(table=table)

    @property
    def num_experts(self) -> int:
        return int(self.table.max()) + 1 if self.table.numel() else 0

    @property
    def top_k(self) -> int:
        return int(self.table.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.table.shape[0])

    @property
    def needs_token_ids(self) -> bool:
        return True

    def compute(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = tokens.reshape(-1)
        if flat.device.type == "cpu" and flat.numel() and int(flat.max()) >= self.vocab_size:
            raise ValueError(f"token id {int(flat.max())} is beyond the hash table's vocab_size={self.vocab_size}")
        ids = self.table.to(flat.device)[flat].long()
        if self.weights is None:
            weights = torch.full(ids.shape, 1.0 / self.top_k, dtype=torch.float32, device=flat.device)
        else:
            weights = self.weights.to(flat.device)[flat].float()
        return weights, ids

    def describe(self) -> str:
        return f"hash table (vocab={self.vocab_size}, k={self.top_k})"

    def __repr__(self) -> str:
        return f"HashRouting(vocab={self.vocab_size}, k={self.top_k}, key={self.key})"


__all__ = ["GrouterRouting", "HashRouting", "PrecomputedRouting", "RouterNetwork"]
