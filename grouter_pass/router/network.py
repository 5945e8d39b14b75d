"""The Grouter network (arXiv 2603.06626, section 3): token ids -> E expert logits.

::

    input_ids [B, S] -> embed_tokens -> N x block -> norm -> score (no bias) -> logits [B, S, E]
    block:  h = h + o_proj(MHA(RoPE(q_proj(rms(h))), RoPE(k_proj(..)), v_proj(..)))   bidirectional
            h = h + down_proj(silu(gate_proj(rms(h))) * up_proj(rms(h)))                (or causal)

Parameter names follow the reference release with its wrapper prefixes removed
(``embed_tokens.weight``, ``layers.{i}.self_attn.q_proj.weight``, ..., ``norm.weight``,
``score.weight``, ``bias``); :mod:`.checkpoint` maps the release's keys onto them.

The gate (:func:`gate`) is the reference code's: experts = top-k of ``logits (+ bias)``, weights =
``scaling_factor * softmax(logits[selected])`` over the k selected unbiased logits.

Shape legend: B batch, S sequence, D hidden, E experts, K top-k, N tokens.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from grouter_pass.router.config import GrouterModelConfig

log = logging.getLogger(__name__)


def gate(logits: torch.Tensor, top_k: int, scaling_factor: float, bias: torch.Tensor | None = None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference gate: ``(weights [..., K] float32, ids [..., K] int64)`` from ``logits [..., E]``.

    ``bias`` (``[E]``) only changes which experts are selected, never the weights, as in the
    reference "bias routing". The weights of a token sum to ``scaling_factor``.
    """
    logits = logits.float()
    select = logits if bias is None else logits + bias.float()
    ids = torch.topk(select, top_k, dim=-1).indices
    weights = torch.softmax(logits.gather(-1, ids), dim=-1) * scaling_factor
    return weights, ids


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Llama-style RoPE (``rotate_half`` convention, as in the reference's Qwen3-derived code)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.float()[..., None] * self.inv_freq          # [B, S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]                  # [B, 1, S, Dh]
        return emb.cos(), emb.sin()


class Attention(nn.Module):
    def __init__(self, config: GrouterModelConfig) -> None:
        super().__init__()
        d, self.num_heads, self.head_dim = config.hidden_size, config.num_heads, config.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                causal: bool) -> torch.Tensor:
        b, s, d = h.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(h)), heads(self.k_proj(h)), heads(self.v_proj(h))
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)   # a bf16 Grouter stays bf16 (fp32 tables would upcast q, k)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, d))


class SwiGLU(nn.Module):
    def __init__(self, config: GrouterModelConfig) -> None:
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Block(nn.Module):
    """Pre-norm Llama-style encoder block."""

    def __init__(self, config: GrouterModelConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                causal: bool) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, causal)
        return h + self.mlp(self.post_attention_layernorm(h))


class Grouter(nn.Module):
    """The standalone router: reads token ids only and routes every MoE layer of a target.

    Args:
        config: sizes and gate settings (:class:`GrouterModelConfig`).

    ``forward(input_ids) -> logits [B, S, E]`` (float32); :meth:`route` applies the gate;
    :meth:`final_hidden` gives the normed hidden states entering ``score`` (expanding uses them).

    Example::

        grouter = Grouter(GrouterModelConfig(num_experts=64, top_k=6))
        weights, ids = grouter.route(input_ids)        # [B, S, 6] float32, [B, S, 6] int64
    """

    def __init__(self, config: GrouterModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.num_layers)])
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.score = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        #: per-expert selection bias (reference ``bias``); used only with ``use_selection_bias``
        self.bias = nn.Parameter(torch.zeros(config.num_experts))
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        #: provenance saved with the checkpoint: a ``checkpoint.Folding`` after folding, a dict
        #: after expanding (see ``fold.py`` / ``expand.py``)
        self.folding = None
        self.expanding: dict | None = None
        #: the fingerprint of the tokenizer the Grouter was distilled on (``data.tokenizer_fingerprint``;
        #: None when unknown, e.g. a reference checkpoint): routing other token ids is refused
        self.tokenizer_fingerprint: str | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) for every matrix (the HF/Megatron default), ones for norms."""
        for name, p in self.named_parameters():
            with torch.no_grad():
                if p.dim() == 2:
                    nn.init.normal_(p, std=0.02)
                elif name == "bias":
                    p.zero_()
                else:
                    p.fill_(1.0)

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def top_k(self) -> int:
        return self.config.top_k

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {list(input_ids.shape)}")
        if input_ids.dtype.is_floating_point:
            raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        if not torch.compiler.is_compiling() and input_ids.numel():
            hi = int(input_ids.max())
            if hi >= self.config.vocab_size or int(input_ids.min()) < 0:
                raise ValueError(f"vocabulary mismatch: token id {hi} is outside the Grouter's "
                                 f"vocab_size={self.config.vocab_size}")

    def final_hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normed hidden states entering ``score``: ``[B, S, D]``.

        Args:
            input_ids: ``[B, S]`` token ids.
            position_ids: ``[B, S]`` (default ``0..S-1`` per row). Packed sequences keep running
                positions across documents, as the reference's online mode does.
            attention_mask: ``[B, S]``, 1 for real tokens and 0 for padding: padded keys are
                masked, so a padded row routes exactly like the unpadded sequence would.
        """
        self._check_ids(input_ids)
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        cos, sin = self.rotary(position_ids)
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :].expand(b, 1, s, s)
            if self.config.causal:
                mask = mask & torch.ones(s, s, dtype=torch.bool, device=mask.device).tril()
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, self.config.causal)
        return self.norm(h)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Expert logits ``[B, S, E]`` in float32 (the score layer runs in the model's dtype)."""
        return self.score(self.final_hidden(input_ids, position_ids, attention_mask)).float()

    def gate(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights, ids)`` for given logits with this Grouter's k, scale and selection bias."""
        bias = self.bias if self.config.use_selection_bias else None
        return gate(logits, self.config.top_k, self.config.scaling_factor, bias)

    def route(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
              attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing for every token: ``(weights [B, S, K] float32, ids [B, S, K] int64)``.

        ``weights`` sum to ``scaling_factor`` per token; ids are in descending order of the
        (biased) selection score. This is what the graph-level Grouter mode feeds to every MoE
        layer (flattened to ``[B*S, K]`` in ``[b, s]`` token order).
        """
        return self.gate(self(input_ids, position_ids, attention_mask))

    def route_flat(self, input_ids: torch.Tensor, **kwargs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`route` flattened to ``(weights [N, K], ids [N, K])``, N = B*S in ``[b, s]`` order."""
        weights, ids = self.route(input_ids, **kwargs)
        return weights.reshape(-1, self.config.top_k), ids.reshape(-1, self.config.top_k)

    def extra_repr(self) -> str:
        c = self.config
        return (f"vocab={c.vocab_size}, d={c.hidden_size}, layers={c.num_layers}, E={c.num_experts}, k={c.top_k}, "
                f"causal={c.causal}")
