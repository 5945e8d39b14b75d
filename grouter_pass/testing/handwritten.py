"""MoE blocks written the ways people write them outside transformers (for tests and the support
matrix). Each is a small ``nn.Module`` mapping ``[B, T, H] -> [B, T, H]`` (some also return the
router logits), wrapped in :class:`TinyMoELM` to make a 2-layer model.

None of them is known to the pass by name: they are found by structure like any user model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _init(*shape: int, scale: float = 0.2) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * scale / math.sqrt(shape[-1]) * 4)


class TorchtitanStyleMoE(nn.Module):
    """torchtitan's token-choice MoE: ``nn.Linear`` router, sigmoid or softmax scores, optional
    selection bias, renorm and scale; ``argsort`` dispatch; separate gate/up/down 3-D weights run
    with ``torch._grouped_mm``; ``scatter_add`` combine into the shared expert's output."""

    def __init__(self, hidden: int = 64, ffn: int = 48, experts: int = 8, top_k: int = 2, score: str = "sigmoid",
                 shared: bool = True, route_scale: float = 1.5) -> None:
        super().__init__()
        self.top_k, self.num_experts, self.score, self.route_scale = top_k, experts, score, route_scale
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.expert_bias = nn.Parameter(torch.randn(experts) * 0.1, requires_grad=False)
        self.w1, self.w3 = _init(experts, ffn, hidden), _init(experts, ffn, hidden)
        self.w2 = _init(experts, hidden, ffn)
        self.shared = nn.Sequential(nn.Linear(hidden, ffn, bias=False), nn.SiLU(), nn.Linear(ffn, hidden, bias=False)) \
            if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs, slen, dim = x.shape
        x = x.view(-1, dim)
        scores = self.gate(x)
        scores = torch.sigmoid(scores.to(torch.float32)) if self.score == "sigmoid" else F.softmax(
            scores.to(torch.float32), dim=1)
        _, selected = torch.topk(scores + self.expert_bias, k=self.top_k, dim=1)
        top_scores = scores.gather(dim=1, index=selected)
        top_scores = top_scores / (top_scores.sum(dim=-1, keepdim=True) + 1e-20)
        top_scores = top_scores * self.route_scale
        num_tokens_per_expert = torch.histc(selected.view(-1).float(), bins=self.num_experts, min=0,
                                            max=self.num_experts - 1)
        order = torch.argsort(selected.view(-1), stable=True)
        top_scores_sorted = top_scores.view(-1)[order]
        token_indices = order // self.top_k
        routed_input = x[token_indices]
        offsets = torch.cumsum(num_tokens_per_expert, dim=0, dtype=torch.int32)
        h = F.silu(torch._grouped_mm(routed_input, self.w1.transpose(-2, -1), offs=offsets))
        h = h * torch._grouped_mm(routed_input, self.w3.transpose(-2, -1), offs=offsets)
        routed_output = torch._grouped_mm(h, self.w2.transpose(-2, -1), offs=offsets)
        routed_output = (routed_output.to(torch.float32) * top_scores_sorted.reshape(-1, 1)).to(x.dtype)
        out = self.shared(x) if self.shared is not None else torch.zeros_like(x)
        out = out.scatter_add(dim=0, index=token_indices.reshape(-1, 1).expand(-1, dim), src=routed_output)
        return out.reshape(bs, slen, dim)


class EinsumDispatchMoE(nn.Module):
    """GShard-style dense dispatch/combine with einsums over ``[N, E, C]`` one-hot tensors, at a
    capacity of one slot per token (``C = N``), so no token can ever be dropped. The router is a
    bare ``[H, E]`` parameter used with ``@``."""

    def __init__(self, hidden: int = 64, ffn: int = 48, experts: int = 8, top_k: int = 2) -> None:
        super().__init__()
        self.top_k, self.num_experts = top_k, experts
        self.wg = nn.Parameter(torch.randn(hidden, experts) * 0.3)
        self.wi = _init(experts, hidden, 2 * ffn)
        self.wo = _init(experts, ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs, slen, dim = x.shape
        x = x.reshape(-1, dim)
        n = x.shape[0]
        probs = torch.softmax((x @ self.wg).float(), dim=-1)
        w, ids = torch.topk(probs, self.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        expert_mask = F.one_hot(ids, self.num_experts)                           # [N, K, E]
        position = (torch.cumsum(expert_mask.reshape(n * self.top_k, -1), dim=0).reshape(n, self.top_k, -1)
                    * expert_mask).sum(-1) - 1                                    # [N, K] slot of each pick
        slot = F.one_hot(position, n)                                            # [N, K, C=N]
        combine = torch.einsum("nk,nke,nkc->nec", w, expert_mask.to(w.dtype), slot.to(w.dtype))
        dispatch = (combine > 0).to(x.dtype)
        expert_in = torch.einsum("nec,nh->ech", dispatch, x)
        h = torch.einsum("ech,ehf->ecf", expert_in, self.wi)
        gate, up = h.chunk(2, dim=-1)
        y = torch.einsum("ecf,efh->ech", F.silu(gate) * up, self.wo)
        out = torch.einsum("nec,ech->nh", combine.to(y.dtype), y)
        return out.reshape(bs, slen, dim)


class DenseBmmMoE(nn.Module):
    """Every expert on every token (``bmm`` over ``[E, N, H]``), combined with dense routing
    weights that are zero for unselected experts. Router: a bare ``[E, H]`` parameter with
    ``F.linear``."""

    def __init__(self, hidden: int = 64, ffn: int = 48, experts: int = 8, top_k: int = 2) -> None:
        super().__init__()
        self.top_k, self.num_experts = top_k, experts
        self.router_weight = nn.Parameter(torch.randn(experts, hidden) * 0.3)
        self.w_in = _init(experts, hidden, 2 * ffn)
        self.w_out = _init(experts, ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs, slen, dim = x.shape
        x = x.reshape(-1, dim)
        probs = F.linear(x, self.router_weight).softmax(dim=-1)
        w, ids = probs.topk(self.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        dense = torch.zeros_like(probs).scatter(1, ids, w)                     # [N, E]
        h = torch.bmm(x.unsqueeze(0).expand(self.num_experts, -1, -1), self.w_in)
        gate, up = h.chunk(2, dim=-1)
        y = torch.bmm(F.gelu(gate, approximate="tanh") * up, self.w_out)         # [E, N, H]
        out = (y * dense.t().unsqueeze(-1)).sum(dim=0)
        return out.reshape(bs, slen, dim)


class BatchedGatherMoE(nn.Module):
    """Per-slot weights gathered by expert id and ``bmm`` (transformers' batched_mm, written by
    hand), with a router that is a bare ``[H, E]`` parameter used with ``torch.matmul``;
    ``return_logits=True`` also returns the router logits."""

    def __init__(self, hidden: int = 64, ffn: int = 48, experts: int = 8, top_k: int = 2,
                 return_logits: bool = False) -> None:
        super().__init__()
        self.top_k, self.return_logits = top_k, return_logits
        self.router = nn.Parameter(torch.randn(hidden, experts) * 0.3)
        self.up = _init(experts, 2 * ffn, hidden)
        self.down = _init(experts, hidden, ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs, slen, dim = x.shape
        x = x.reshape(-1, dim)
        logits = torch.matmul(x, self.router)
        w, ids = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        flat = ids.reshape(-1)
        xs = x.repeat_interleave(self.top_k, dim=0)
        h = torch.bmm(self.up[flat], xs.unsqueeze(-1)).squeeze(-1)
        gate, up = h.chunk(2, dim=-1)
        y = torch.bmm(self.down[flat], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
        out = (y * w.reshape(-1, 1)).view(-1, self.top_k, dim).sum(dim=1).reshape(bs, slen, dim)
        # return_logits: also the router logits, as transformers blocks do for an auxiliary loss
        return (out, logits) if self.return_logits else out


class ExpertMLP(nn.Module):
    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, ffn, bias=False)
        self.w2 = nn.Linear(ffn, hidden, bias=False)
        self.w3 = nn.Linear(hidden, ffn, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LoopMoE(nn.Module):
    """transformers 4.x Mixtral: ``Linear`` router, a ``ModuleList`` of E expert MLPs, a Python
    loop over experts with ``torch.where`` and ``index_add_`` (a graph break per expert)."""

    def __init__(self, hidden: int = 64, ffn: int = 48, experts: int = 8, top_k: int = 2) -> None:
        super().__init__()
        self.top_k, self.num_experts, self.hidden = top_k, experts, hidden
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList([ExpertMLP(hidden, ffn) for _ in range(experts)])

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq, hidden = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final = torch.zeros((batch * seq, hidden), dtype=hidden_states.dtype, device=hidden_states.device)
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for expert_idx in range(self.num_experts):
            idx, top_x = torch.where(expert_mask[expert_idx])
            if top_x.shape[0] == 0:
                continue
            current = hidden_states[None, top_x].reshape(-1, hidden)
            current = self.experts[expert_idx](current) * routing_weights[top_x, idx, None]
            final.index_add_(0, top_x, current.to(hidden_states.dtype))
        return final.reshape(batch, seq, hidden), router_logits


class SplitLoopMoE(nn.Module):
    """Tokens sorted by expert, ``bincount(...).tolist()`` + ``split``, a loop over the chunks (a
    host sync and a graph break), softmax over the k selected logits."""

    def __init__(self, hidden: int = 64, ffn: int = 48, experts: int = 8, top_k: int = 2) -> None:
        super().__init__()
        self.top_k, self.num_experts = top_k, experts
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList([ExpertMLP(hidden, ffn) for _ in range(experts)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x)
        vals, ids = torch.topk(logits, self.top_k, dim=-1)
        w = torch.softmax(vals, dim=-1)
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tokens = x[order // self.top_k]
        outs = [self.experts[e](chunk) for e, chunk in enumerate(tokens.split(counts))]
        y = torch.cat(outs) * w.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros_like(x).index_add_(0, order // self.top_k, y)
        return out.reshape(shape)


class SwitchCapacityMoE(nn.Module):
    """Switch Transformer top-1 (``max`` over softmax scores) with a capacity factor: tokens past
    an expert's capacity are dropped (their output is zero)."""

    def __init__(self, hidden: int = 64, ffn: int = 48, experts: int = 8, capacity_factor: float = 1.25) -> None:
        super().__init__()
        self.num_experts, self.capacity_factor = experts, capacity_factor
        self.router = nn.Linear(hidden, experts, bias=False)
        self.wi = _init(experts, hidden, ffn)
        self.wo = _init(experts, ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs, slen, dim = x.shape
        x = x.reshape(-1, dim)
        n = x.shape[0]
        capacity = int(math.ceil(self.capacity_factor * n / self.num_experts))
        probs = torch.softmax(self.router(x).float(), dim=-1)
        gate, expert = probs.max(dim=-1)
        mask = F.one_hot(expert, self.num_experts)                               # [N, E]
        position = torch.cumsum(mask, dim=0) * mask - 1                          # slot in the expert
        keep = (position < capacity) & (mask > 0)
        dispatch = F.one_hot(position.clamp(0, capacity - 1), capacity) * keep.unsqueeze(-1)   # [N, E, C]
        expert_in = torch.einsum("nec,nh->ech", dispatch.to(x.dtype), x)
        y = torch.einsum("ecf,efh->ech", F.relu(torch.einsum("ech,ehf->ecf", expert_in, self.wi)), self.wo)
        out = torch.einsum("nec,ech->nh", dispatch.to(x.dtype) * gate[:, None, None], y)
        return out.reshape(bs, slen, dim)


class GShardCapacityMoE(nn.Module):
    """GShard top-2 by two ``argmax`` rounds over ``one_hot``-masked scores, with a capacity
    factor and token dropping."""

    def __init__(self, hidden: int = 64, ffn: int = 48, experts: int = 8, capacity_factor: float = 2.0) -> None:
        super().__init__()
        self.num_experts, self.capacity_factor = experts, capacity_factor
        self.wg = nn.Linear(hidden, experts, bias=False)
        self.wi = _init(experts, hidden, ffn)
        self.wo = _init(experts, ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs, slen, dim = x.shape
        x = x.reshape(-1, dim)
        n, e = x.shape[0], self.num_experts
        capacity = int(math.ceil(self.capacity_factor * n / e))
        probs = torch.softmax(self.wg(x).float(), dim=-1)
        idx1 = torch.argmax(probs, dim=-1)
        mask1 = F.one_hot(idx1, e)
        idx2 = torch.argmax(probs.masked_fill(mask1.bool(), float("-inf")), dim=-1)
        mask2 = F.one_hot(idx2, e)
        gate1, gate2 = (probs * mask1).sum(-1), (probs * mask2).sum(-1)
        denom = gate1 + gate2
        gate1, gate2 = gate1 / denom, gate2 / denom
        pos1 = torch.cumsum(mask1, dim=0) * mask1 - 1
        pos2 = (torch.cumsum(mask2, dim=0) - 1 + mask1.sum(0, keepdim=True)) * mask2
        mask1 = mask1 * (pos1 < capacity)
        mask2 = mask2 * (pos2 < capacity)
        slot1 = F.one_hot((pos1 * mask1).sum(-1), capacity)
        slot2 = F.one_hot((pos2 * mask2).sum(-1), capacity)
        combine = (gate1[:, None, None] * mask1[..., None] * slot1[:, None, :]
                   + gate2[:, None, None] * mask2[..., None] * slot2[:, None, :])      # [N, E, C]
        expert_in = torch.einsum("nec,nh->ech", (combine > 0).to(x.dtype), x)
        y = torch.einsum("ecf,efh->ech", F.relu(torch.einsum("ech,ehf->ecf", expert_in, self.wi)), self.wo)
        out = torch.einsum("nec,ech->nh", combine.to(x.dtype), y)
        return out.reshape(bs, slen, dim)


class _GatedMLP(nn.Module):
    """One expert with its gate and up projections in one ``[2F, H]`` linear (Megatron's ``fc1``)."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(hidden, 2 * ffn, bias=False)
        self.linear_fc2 = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)


class _MegatronStyleRouter(nn.Module):
    """Megatron-LM's top-k router, written from its description: a bare ``[E, H]`` weight applied
    in fp32, softmax or sigmoid scores (sigmoid with a load-balancing bias used for the choice
    only, weights renormalised), and the routing as *dense* ``[N, E]`` probabilities plus a
    boolean routing map."""

    def __init__(self, hidden: int, experts: int, top_k: int, score: str) -> None:
        super().__init__()
        self.top_k, self.score = top_k, score
        self.weight = nn.Parameter(torch.randn(experts, hidden) * 0.3)
        if score == "sigmoid":
            self.register_buffer("expert_bias", torch.randn(experts) * 0.1)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(hidden.to(torch.float32), self.weight.to(torch.float32))
        if self.score == "softmax":
            scores = torch.softmax(logits, dim=-1)
            probs, top_indices = torch.topk(scores, k=self.top_k, dim=1)
        else:
            scores = torch.sigmoid(logits)
            _, top_indices = torch.topk(scores + self.expert_bias, k=self.top_k, dim=1)
            probs = torch.gather(scores, dim=1, index=top_indices)
            probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-20)
        routing_map = torch.zeros_like(logits).int().scatter(1, top_indices, 1).bool()
        dense_probs = torch.zeros_like(logits).scatter(1, top_indices, probs)
        return dense_probs, routing_map


class MegatronStyleMoE(nn.Module):
    """A Megatron-LM-style MoE layer (our own look-alike): sequence-first ``[S, B, H]`` input, the
    router above, tokens permuted expert-major with ``masked_select`` over the transposed routing
    map, and a ``SequentialMLP``: a loop over the ``nn.ModuleList`` experts on the chunks
    ``torch.split(tokens, tokens_per_expert.tolist())`` (a host sync and a graph break), then
    un-permuted with ``scatter_add``."""

    def __init__(self, hidden: int = 64, ffn: int = 48, experts: int = 8, top_k: int = 2,
                 score: str = "softmax") -> None:
        super().__init__()
        self.hidden = hidden
        self.router = _MegatronStyleRouter(hidden, experts, top_k, score)
        self.local_experts = nn.ModuleList([_GatedMLP(hidden, ffn) for _ in range(experts)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        s, b, h = hidden_states.shape
        tokens = hidden_states.view(-1, h)
        probs, routing_map = self.router(tokens)
        n, e = routing_map.shape
        routing_map_t = routing_map.t().contiguous()                       # [E, N]
        token_indices = torch.arange(n, device=tokens.device).unsqueeze(0).expand(e, -1)
        sorted_indices = token_indices.masked_select(routing_map_t)       # expert-major token order
        permuted_probs = probs.t().contiguous().masked_select(routing_map_t)
        permuted = tokens.index_select(0, sorted_indices)
        tokens_per_expert = routing_map_t.sum(dim=1)
        chunks = torch.split(permuted, tokens_per_expert.tolist())
        outs = [expert(chunk) for expert, chunk in zip(self.local_experts, chunks)]
        expert_out = torch.cat(outs) * permuted_probs.unsqueeze(-1).to(tokens.dtype)
        out = torch.zeros_like(tokens).scatter_add(0, sorted_indices.unsqueeze(1).expand(-1, h), expert_out)
        return out.view(s, b, h)


class NanoGPTStyleMoE(nn.Module):
    """A nanoGPT-MoE-style layer (our own look-alike): a router on ``[B, T, H]``, top-k of the
    logits scattered into ``-inf`` and softmaxed into dense probabilities, an expert capacity with
    positions counted choice by choice (every first choice before any second), ``[N, E, C]``
    combine weights, experts as batched ``[E, C, H]`` matmuls (``bmm`` with GELU), and the combine
    as one matmul of ``[N, E*C]`` weights with ``[E*C, H]`` outputs."""

    def __init__(self, hidden: int = 64, ffn: int = 48, experts: int = 8, top_k: int = 2,
                 capacity_factor: float = 1.25) -> None:
        super().__init__()
        self.top_k, self.num_experts, self.capacity_factor = top_k, experts, capacity_factor
        self.w_g = nn.Linear(hidden, experts, bias=False)
        self.c_fc = _init(experts, hidden, ffn)
        self.c_proj = _init(experts, ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        n, e, k = b * t, self.num_experts, self.top_k
        logits = self.w_g(x)                                                       # [B, T, E]
        top_k_logits, top_k_indices = logits.topk(k, dim=-1)
        router_probs = torch.full_like(logits, float("-inf")).scatter(-1, top_k_indices, top_k_logits)
        router_probs = F.softmax(router_probs, dim=-1)
        capacity = math.floor(k * self.capacity_factor * n / e)
        capacity += capacity % 2
        exp_mask = F.one_hot(top_k_indices, num_classes=e).view(n, k, e).permute(1, 0, 2)   # [K, N, E]
        exp_rank = (torch.cumsum(exp_mask.reshape(k * n, e), dim=0) - 1).reshape(k, n, e)
        exp_mask = exp_mask * torch.lt(exp_rank, capacity)
        exp_rank = torch.sum(exp_mask * exp_rank, dim=-1)                          # [K, N]
        exp_weights = exp_mask * router_probs.view(n, e)[None, :]                 # [K, N, E]
        exp_rank_sc = F.one_hot(exp_rank, num_classes=capacity)                    # [K, N, C]
        cb_weight = torch.sum(exp_weights.unsqueeze(3) * exp_rank_sc.unsqueeze(2), dim=0)   # [N, E, C]
        sec_mask = cb_weight.bool()
        x = x.view(n, d)
        exp_batches = sec_mask.permute(1, 2, 0).type_as(x) @ x                     # [E, C, H]
        h = F.gelu(torch.bmm(exp_batches, self.c_fc))
        exp_out = torch.bmm(h, self.c_proj)                                        # [E, C, H]
        out = cb_weight.view(n, -1).type_as(x) @ exp_out.view(-1, d)
        return out.view(b, t, d)


class TinyMoELM(nn.Module):
    """Embedding -> ``layers`` x (RMSNorm -> MoE block, residual) -> head. The MoE block may
    return ``(out, router_logits)``; the logits are ignored here as an LM without aux loss would."""

    def __init__(self, block_factory, layers: int = 2, hidden: int = 64, vocab: int = 97,
                 seq_first: bool = False) -> None:
        super().__init__()
        self.seq_first = seq_first   # blocks see [S, B, H] (Megatron-LM's layout)
        self.embed = nn.Embedding(vocab, hidden)
        self.norms = nn.ModuleList([nn.RMSNorm(hidden) for _ in range(layers)])
        self.blocks = nn.ModuleList([block_factory() for _ in range(layers)])
        self.head = nn.Linear(hidden, vocab, bias=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if self.seq_first:
            h = h.transpose(0, 1)
        for norm, block in zip(self.norms, self.blocks):
            out = block(norm(h))
            h = h + (out[0] if isinstance(out, tuple) else out)
        if self.seq_first:
            h = h.transpose(0, 1)
        return self.head(h)
