"""An independent re-implementation of the reference release's ``Grouter`` module, for tests.

Written from the release's description (method notes: structure ``mha``; key layout of the
published ``grouter.pth``), not from :mod:`grouter_pass.router.network`: modules nest the way the
release's do, so ``state_dict()`` has the official keys (``grouter_structure.model.embed_tokens.
embed_tokens.weight``, ``grouter_structure.score.score.weight``, ``bias``, ...), and the
computation is the reference's own spelling: eager attention that materialises the score
matrix with the softmax in fp32, Llama-style RMSNorm (variance in fp32), RoPE tables from
``inv_freq`` in fp32, and the gate ``2.5 * softmax(z[topk(z + b)])``.

A conversion that maps a key onto the wrong parameter, transposes a projection, drops the
doubled path segments or reads the heads wrongly gives different logits from this module.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class _RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class _EmbedTokens(nn.Module):          # the release wraps nn.Embedding once more: embed_tokens.embed_tokens
    def __init__(self, vocab: int, d: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)


class _SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, theta: float) -> None:
        super().__init__()
        self.heads, self.head_dim, self.theta = heads, d // heads, theta
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.v_proj, self.o_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        half = self.head_dim // 2
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        angles = positions.float()[:, :, None] * inv_freq[None, None, :]         # [B, S, Dh/2]
        cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None]                 # [B, 1, S, Dh]
        sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None]
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    def forward(self, h: torch.Tensor, positions: torch.Tensor, causal: bool) -> torch.Tensor:
        b, s, d = h.shape
        q = self.q_proj(h).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        q, k = self._rope(q, positions), self._rope(k, positions)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if causal:      # use_encoder: false keeps the causal mask; the release (true) zeroes it
            scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = (probs @ v).transpose(1, 2).reshape(b, s, d)
        return self.o_proj(out)


class _MLP(nn.Module):
    def __init__(self, d: int, inter: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, inter, bias=False), nn.Linear(d, inter, bias=False)
        self.down_proj = nn.Linear(inter, d, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


class _Layer(nn.Module):
    def __init__(self, d: int, heads: int, inter: int, theta: float) -> None:
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = _RMSNorm(d), _RMSNorm(d)
        self.self_attn, self.mlp = _SelfAttention(d, heads, theta), _MLP(d, inter)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, causal: bool) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), positions, causal)
        return h + self.mlp(self.post_attention_layernorm(h))


class _Model(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, inter: int, theta: float) -> None:
        super().__init__()
        self.embed_tokens = _EmbedTokens(vocab, d)
        self.layers = nn.ModuleList(_Layer(d, heads, inter, theta) for _ in range(layers))
        self.norm = _RMSNorm(d)


class _Score(nn.Module):                 # score.score in the release
    def __init__(self, d: int, experts: int) -> None:
        super().__init__()
        self.score = nn.Linear(d, experts, bias=False)


class _Structure(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, inter: int, experts: int, theta: float) -> None:
        super().__init__()
        self.model = _Model(vocab, d, layers, heads, inter, theta)
        self.score = _Score(d, experts)


class ReferenceGrouter(nn.Module):
    """``forward(input_ids) -> logits [B, S, E]`` (fp32) and ``route(input_ids, k) -> (weights, ids)``."""

    def __init__(self, *, vocab: int, d: int, layers: int, heads: int, inter: int, experts: int,
                 theta: float = 1e6, causal: bool = False) -> None:
        super().__init__()
        self.grouter_structure = _Structure(vocab, d, layers, heads, inter, experts, theta)
        self.bias = nn.Parameter(torch.zeros(experts))
        self.causal = causal

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        m = self.grouter_structure.model
        positions = torch.arange(input_ids.shape[1])[None].expand(input_ids.shape[0], -1)
        h = m.embed_tokens(input_ids)
        for layer in m.layers:
            h = layer(h, positions, self.causal)
        return self.grouter_structure.score.score(m.norm(h)).float()

    def route(self, input_ids: torch.Tensor, k: int, *, scale: float = 2.5, use_bias: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.forward(input_ids)
        ids = torch.topk(z + self.bias.float() if use_bias else z, k, dim=-1).indices
        return scale * torch.softmax(torch.gather(z, -1, ids), dim=-1), ids


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter drawn at random (norm weights around 1, a bias that changes the selection),
    so no key can be mapped onto the wrong parameter without changing the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name == "bias":
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    return module
