"""The Grouter network's configuration: one dataclass, validated on construction, saved as JSON.

Named :class:`GrouterModelConfig` (not ``GrouterConfig``) because ``grouter_pass.GrouterConfig``
is the graph pass's configuration; this one only describes the standalone router network of
arXiv 2603.06626 (section 3). The defaults are the released reference architecture except the
vocabulary, which defaults to this package's byte-level tokenizer (:mod:`.data`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

CONFIG_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class GrouterModelConfig:
    """Sizes and gate settings of a :class:`~grouter_pass.router.network.Grouter`.

    Attributes:
        vocab_size: token ids the embedding accepts; must cover the tokenizer's vocabulary.
        hidden_size, num_heads, num_layers, intermediate_size: encoder sizes (reference: 512, 8,
            3, 2736). Multi-head attention without grouped KV, as in the release.
        num_experts, top_k: E and k of the routing the Grouter produces.
        rope_theta: RoPE base (reference: 1e6).
        rms_norm_eps: epsilon of every RMSNorm (reference: 1e-6).
        scaling_factor: gate weights are ``scaling_factor * softmax(top-k logits)`` (reference
            code: 2.5; the paper does not mention it, so it is a setting, not a constant).
        causal: causal attention instead of the reference's bidirectional encoder (for targets
            that decode with a KV cache, see the method notes section 15.3).
        use_selection_bias: add the per-expert ``bias`` to the logits when *selecting* experts
            (weights still come from the unbiased logits). Set by bias-only tuning.
    """

    vocab_size: int = 257
    hidden_size: int = 512
    num_heads: int = 8
    num_layers: int = 3
    intermediate_size: int = 2736
    num_experts: int = 128
    top_k: int = 8
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    scaling_factor: float = 2.5
    causal: bool = False
    use_selection_bias: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_heads", "num_layers", "intermediate_size", "num_experts",
                     "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "num_layers" else 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"head dim hidden_size/num_heads={self.hidden_size // self.num_heads} must be even "
                             "for RoPE")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} is larger than num_experts={self.num_experts}")
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ValueError(f"rope_theta={self.rope_theta} and rms_norm_eps={self.rms_norm_eps} must be > 0")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def replace(self, **changes: Any) -> GrouterModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {"version": CONFIG_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GrouterModelConfig:
        """Build from :meth:`to_dict` output; unknown keys are an error that names them."""
        data = dict(data)
        version = data.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ValueError(f"Grouter config version {version} is not supported (this release reads "
                             f"{CONFIG_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown Grouter config key(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def check_compatible(config: GrouterModelConfig, *, vocab_size: int | None = None, num_experts: int | None = None,
                     top_k: int | None = None, what: str = "target") -> None:
    """Refuse a Grouter that cannot drive ``what``: a tokenizer whose ids exceed the embedding, or
    a target MoE with another expert count or top-k. Raises ``ValueError`` naming both values."""
    if vocab_size is not None and vocab_size > config.vocab_size:
        raise ValueError(f"vocabulary mismatch: the {what} has vocab_size={vocab_size} but the Grouter's embedding "
                         f"has vocab_size={config.vocab_size}")
    if num_experts is not None and num_experts != config.num_experts:
        raise ValueError(f"expert count mismatch: the {what} has num_experts={num_experts} but the Grouter routes to "
                         f"num_experts={config.num_experts} (fold or expand it first)")
    if top_k is not None and top_k != config.top_k:
        raise ValueError(f"top-k mismatch: the {what} has top_k={top_k} but the Grouter has top_k={config.top_k}")
