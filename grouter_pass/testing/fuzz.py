"""A fuzzer of MoE layers: random but *equivalent* MoE layers, and near-misses that are not MoE.

Detection is measured on models nobody here has seen, so it is tested against a generator rather
than a list. :func:`sample_recipe` draws a :class:`MoERecipe` (pure data: sizes, and the spelling
of every step of a token-choice MoE layer); :class:`FuzzMoE` builds the layer it describes.
Every recipe computes the same kind of function,

    out[n] = base(x)[n] + sum_j keep[n, j] * w[n, j] * expert_{ids[n, j]}(x[n])

with ``(w, ids)`` a gating of the router logits and ``keep`` the capacity rule (1 without
capacity), but writes each part in one of the ways people write it:

* layout: tokens flattened before the router, a 3-D ``[B, T, E]`` router flattened after the
  top-k, or sequence-first ``[T, B, H]`` (Megatron-LM);
* router: ``nn.Linear`` (with or without bias), a bare ``[E, H]`` or ``[H, E]`` parameter, an
  einsum, fp32 casts, a temperature;
* score: softmax (with or without ``dtype=``), sigmoid, raw logits, ``sqrt(softplus)``, or a
  softmax / sigmoid over the k selected logits;
* selection bias: none, selection-only (weights from the unbiased scores), in the weights,
  passed in by the parent block, added under ``no_grad``;
* group-limited selection: group score by max or by the sum of its top 2, the mask built by
  ``scatter_`` into ``zeros_like`` / ``ones_like``, by ``one_hot``, or by comparison, applied
  with ``masked_fill(-inf)``, ``masked_fill(0.0)``, ``where`` or a multiply;
* selection: ``topk`` (sorted or not), ``sort`` / ``argsort`` + slice, k rounds of ``argmax``;
* weights: top-k values or a gather, renormalised by sum (in place, ``+eps``, ``clamp``),
  ``F.normalize``, scaled, cast;
* experts: 3-D stacked weights in either layout, gate/up concatenated, interleaved or separate,
  non-gated, per-expert biases, an ``nn.ModuleList`` of MLPs; activations SiLU / GELU / GELU-tanh
  / ReLU;
* dispatch: argsort + a third-party grouped-GEMM custom op, argsort + ``torch._grouped_mm`` in
  bf16 inside an fp32 model, gathered per-slot weights + ``bmm``, every expert on every token
  (routing weight on the output or the input), one-hot ``[N, E, C]`` einsums, slot buffers
  filled with ``index_copy``, a ``ModuleList`` loop over ``torch.where``, a dense masked loop;
* combine: ``view(N, K, H).sum(1)``, ``index_add_``, ``scatter_add``, a third-party custom
  scatter-add op, ``index_put_(accumulate=True)``;
* capacity (one-hot and slot-buffer dispatch): tokens past an expert's capacity dropped, in
  token order, in choice order (GShard) or by score;
* extras: a shared expert, zero-computation (identity) experts, hash routing (expert ids from a
  frozen ``table[input_ids]``, weights from the router).

:func:`sample_near_miss` draws models that contain a top-k, an E-way linear or a router-like
pattern but no rewritable MoE layer: they must compile bit-identical.

``python -m grouter_pass.testing.fuzz --fuzz 500`` runs the check of :func:`check_recipe` on 500
seeds with a progress bar, resuming from ``--results`` (one JSON line per seed); ``make test``
runs a fixed seed set (``tests/integration/test_fuzz.py``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# ------------------------------------------------------------------------------------------------
# third-party custom ops the generated layers use (stand-ins for a user's own kernels)
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("grouter_fuzz::grouped_linear", mutates_args=())
def _fuzz_grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows grouped by expert (``counts`` rows each) times ``w[e]`` stored ``[E, out, in]``."""
    out = x.new_zeros(x.shape[0], w.shape[1])
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c:
            out[start:start + c] = x[start:start + c] @ w[e].t()
        start += c
    return out


@_fuzz_grouped_linear.register_fake
def _(x, w, counts):
    return x.new_empty(x.shape[0], w.shape[1])


def _fuzz_grouped_linear_backward(ctx, grad):
    x, w, counts = ctx.saved_tensors
    gx = _fuzz_grouped_linear(grad.contiguous(), w.transpose(1, 2).contiguous(), counts)
    gw = torch.zeros_like(w)
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c:
            gw[e] = grad[start:start + c].t() @ x[start:start + c]
        start += c
    return gx, gw, None


def _fuzz_grouped_linear_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


_fuzz_grouped_linear.register_autograd(_fuzz_grouped_linear_backward, setup_context=_fuzz_grouped_linear_setup)


@torch.library.custom_op("grouter_fuzz::scatter_add_rows", mutates_args=())
def _fuzz_scatter_add_rows(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``out.index_add(0, index, src)`` in a fixed (sequential) order: a deterministic scatter-add."""
    result = out.clone()
    for i, row in enumerate(index.tolist()):
        result[row] += src[i]
    return result


@_fuzz_scatter_add_rows.register_fake
def _(out, index, src):
    return torch.empty_like(out)


def _fuzz_scatter_add_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return grad, None, grad.index_select(0, index)


def _fuzz_scatter_add_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


_fuzz_scatter_add_rows.register_autograd(_fuzz_scatter_add_backward, setup_context=_fuzz_scatter_add_setup)

# ------------------------------------------------------------------------------------------------
# recipes
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoERecipe:
    """One generated MoE layer: its sizes and how each step is written (see the module docstring)."""

    seed: int
    hidden: int
    ffn: int
    experts: int
    top_k: int
    layout: str = "flat"             # flat | 3d | seq_first
    router: str = "linear"           # linear | linear_bias | param_linear | param_matmul | einsum | fp32
    temperature: float | None = None
    score: str = "softmax"           # softmax | softmax_f32 | sigmoid | none | sqrt_softplus | post_softmax
    #                                  | post_sigmoid
    bias: str = "none"               # none | selection | score | selection_arg | selection_no_grad
    group: tuple | None = None       # (n_group, topk_group, group_score, mask_build, mask_apply)
    select: str = "topk"             # topk | topk_unsorted | sort | argsort | argmax_rounds
    renorm: str = "none"             # none | sum | sum_inplace | sum_eps | clamp | normalize
    scale: float = 1.0
    weights_cast: bool = False
    experts_layout: str = "stacked"  # stacked | stacked_t | concat | concat_t | interleaved | plain | modulelist
    activation: str = "silu"         # silu | gelu | gelu_tanh | relu
    expert_bias: bool = False
    dispatch: str = "gathered_bmm"   # sorted_op | sorted_bf16 | gathered_bmm | dense | dense_on_input | onehot_einsum
    #                                  | slot_buffer | loop_where | loop_dense
    combine: str = "sum_k"           # sum_k | index_add | scatter_add | custom_scatter_add | index_put
    capacity: tuple | None = None    # (capacity factor, priority: token | choice | score)
    shared: bool = False
    zero_experts: int = 0            # identity experts after the FFN experts
    hash_ids: bool = False           # expert ids from a frozen table[input_ids]
    track_load: bool = False         # count tokens per expert in a buffer, in place, in training

    @property
    def routed_experts(self) -> int:
        """E as the router sees it (FFN experts plus identity experts)."""
        return self.experts + self.zero_experts

    @property
    def needs_dynamic_output_shapes(self) -> bool:
        return self.dispatch == "loop_where"

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dispatch == "sorted_bf16" else torch.float32

    def describe(self) -> str:
        default = MoERecipe(0, 0, 0, 0, 0)
        parts = [f"E={self.routed_experts} k={self.top_k} H={self.hidden} F={self.ffn}"]
        for f in dataclasses.fields(self):
            if f.name in ("seed", "hidden", "ffn", "experts", "top_k"):
                continue
            v = getattr(self, f.name)
            if v != getattr(default, f.name):
                parts.append(f"{f.name}={v}")
        return " ".join(parts)


def _choice(rng: random.Random, options: list, weights: list[float] | None = None) -> Any:
    return rng.choices(options, weights=weights)[0]


def sample_recipe(seed: int) -> MoERecipe:
    """A random valid recipe (every combination it returns is a correct MoE layer)."""
    rng = random.Random(seed)
    experts = _choice(rng, [4, 6, 8, 16])
    hidden = _choice(rng, [24, 32, 40])
    ffn = _choice(rng, [12, 20, 28, hidden], [3, 3, 3, 1])
    dispatch = _choice(rng, ["sorted_op", "sorted_bf16", "gathered_bmm", "dense", "dense_on_input", "onehot_einsum",
                             "slot_buffer", "loop_where", "loop_dense"], [3, 1, 3, 1, 1, 2, 2, 2, 1])
    if dispatch == "sorted_bf16":   # torch._grouped_mm wants 16-byte aligned rows
        ffn = _choice(rng, [16, 24, 32])
    hash_ids = dispatch in ("gathered_bmm", "sorted_op", "loop_where") and rng.random() < 0.08
    select = "topk" if hash_ids else _choice(
        rng, ["topk", "topk_unsorted", "sort", "argsort", "argmax_rounds"], [5, 2, 1, 1, 1])
    top_k = _choice(rng, [1, 2, 2, 3]) if not hash_ids else _choice(rng, [1, 2])
    top_k = min(top_k, experts // 2)
    score = _choice(rng, ["softmax", "softmax_f32", "sigmoid", "none", "sqrt_softplus", "post_softmax",
                          "post_sigmoid"], [4, 2, 3, 1, 1, 2, 1])
    if select == "argmax_rounds" or hash_ids:
        score = _choice(rng, ["softmax", "sigmoid"])
    capacity = None
    if dispatch in ("onehot_einsum", "slot_buffer") and rng.random() < 0.6:
        capacity = (_choice(rng, [0.75, 1.0, 1.25, 2.0]), _choice(rng, ["token", "choice", "score"]))
    bias = "none"
    if score not in ("post_softmax", "post_sigmoid", "none") and not hash_ids:
        bias = _choice(rng, ["none", "selection", "score", "selection_arg", "selection_no_grad"], [5, 2, 1, 1, 1])
    group = None
    if (select in ("topk", "topk_unsorted", "sort", "argsort") and score in ("softmax", "softmax_f32", "sigmoid",
                                                                             "sqrt_softplus")
            and experts in (8, 16) and rng.random() < 0.3):
        n_group = _choice(rng, [2, 4])
        topk_group = rng.randint(1, n_group - 1)
        if top_k <= topk_group * experts // n_group:
            group = (n_group, topk_group, _choice(rng, ["top2_sum", "max"]),
                     _choice(rng, ["scatter_zeros", "scatter_ones", "one_hot", "compare"]),
                     # zero-filling is the same selection as -inf only on positive scores
                     _choice(rng, ["fill_inf", "fill_zero", "where", "mul"] if bias == "none"
                             else ["fill_inf", "where"]))
    renorm = "none"
    if score != "none" and top_k > 1 and score not in ("post_softmax",):
        renorm = _choice(rng, ["none", "sum", "sum_inplace", "sum_eps", "clamp", "normalize"], [3, 3, 1, 1, 1, 1])
    scale = _choice(rng, [1.0, 1.0, 2.5, 0.5])
    zero_experts = 0
    if (dispatch in ("gathered_bmm", "sorted_op", "loop_where", "loop_dense") and not hash_ids and group is None
            and rng.random() < 0.12):
        zero_experts = _choice(rng, [1, 2])
    experts_layout = _choice(rng, ["stacked", "stacked_t", "concat", "concat_t", "interleaved", "plain"],
                             [3, 2, 3, 1, 1, 1])
    if dispatch in ("loop_where", "loop_dense"):
        experts_layout = _choice(rng, ["modulelist", "stacked", "concat"])
    if dispatch in ("sorted_op", "sorted_bf16") and experts_layout in ("stacked_t", "concat_t"):
        experts_layout = "stacked"
    expert_bias = dispatch not in ("dense_on_input", "sorted_op", "sorted_bf16") and rng.random() < 0.2
    combine = "sum_k"
    if dispatch in ("sorted_op", "sorted_bf16", "gathered_bmm", "slot_buffer", "loop_where"):
        combine = _choice(rng, ["sum_k", "index_add", "scatter_add", "custom_scatter_add", "index_put"],
                          [3, 2, 2, 1, 1])
        if dispatch == "loop_where":
            combine = _choice(rng, ["index_add", "index_put"])
    return MoERecipe(
        seed=seed, hidden=hidden, ffn=ffn, experts=experts, top_k=top_k,
        layout=_choice(rng, ["flat", "3d", "seq_first"], [4, 3, 2]),
        router=_choice(rng, ["linear", "linear_bias", "param_linear", "param_matmul", "einsum", "fp32"]),
        temperature=_choice(rng, [None, None, None, 0.7]),
        score=score, bias=bias, group=group, select=select, renorm=renorm, scale=scale,
        weights_cast=rng.random() < 0.3, experts_layout=experts_layout,
        activation=_choice(rng, ["silu", "gelu", "gelu_tanh", "relu"]), expert_bias=expert_bias,
        dispatch=dispatch, combine=combine, capacity=capacity, shared=rng.random() < 0.25,
        zero_experts=zero_experts, hash_ids=hash_ids, track_load=rng.random() < 0.15)


# ------------------------------------------------------------------------------------------------
# the generated layer
# ------------------------------------------------------------------------------------------------

_ACT = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}


def _param(*shape: int, gen: torch.Generator, scale: float = 1.0) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape, generator=gen) * scale / math.sqrt(shape[-1]))


class _ExpertMLP(nn.Module):
    def __init__(self, r: MoERecipe, gen: torch.Generator) -> None:
        super().__init__()
        self.gated, self.act = r.experts_layout != "plain", _ACT[r.activation]
        self.w1 = nn.Linear(r.hidden, r.ffn, bias=r.expert_bias)
        self.w3 = nn.Linear(r.hidden, r.ffn, bias=r.expert_bias) if self.gated else None
        self.w2 = nn.Linear(r.ffn, r.hidden, bias=r.expert_bias)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.w1(x)) * self.w3(x) if self.gated else self.act(self.w1(x))
        return self.w2(h)


class FuzzMoE(nn.Module):
    """The MoE layer a :class:`MoERecipe` describes, ``[B, T, H] -> [B, T, H]`` (hash routing
    also reads the token ids: ``forward(x, input_ids)``)."""

    def __init__(self, recipe: MoERecipe, vocab: int = 97, layer: int = 0) -> None:
        super().__init__()
        r = self.r = recipe
        gen = torch.Generator().manual_seed(recipe.seed * 7 + layer)
        e_route, h, f, e = r.routed_experts, r.hidden, r.ffn, r.experts
        if r.router in ("linear", "linear_bias", "fp32"):
            self.router = nn.Linear(h, e_route, bias=r.router == "linear_bias")
            with torch.no_grad():
                self.router.weight.copy_(torch.randn(e_route, h, generator=gen) / math.sqrt(h) * 2)
                if self.router.bias is not None:
                    self.router.bias.copy_(torch.randn(e_route, generator=gen) * 0.3)
        elif r.router == "param_matmul":
            self.router_w = _param(h, e_route, gen=gen, scale=2.0)
        else:
            self.router_w = _param(e_route, h, gen=gen, scale=2.0)
        if r.bias in ("selection", "score", "selection_no_grad"):
            self.register_buffer("correction_bias", torch.randn(e_route, generator=gen) * 0.3)
        if r.hash_ids:
            self.register_buffer("hash_table", torch.randint(0, e_route, (vocab, r.top_k), generator=gen))
            # a table row must not repeat an expert (a token picks k distinct experts)
            for row in range(vocab):
                self.hash_table[row] = torch.randperm(e_route, generator=gen)[: r.top_k]
        # experts
        if r.experts_layout == "modulelist":
            self.experts = nn.ModuleList([_ExpertMLP(r, gen) for _ in range(e)])
        else:
            gated = r.experts_layout != "plain"
            if r.experts_layout in ("concat", "interleaved"):
                self.w_gate_up = _param(e, 2 * f, h, gen=gen)
            elif r.experts_layout == "concat_t":
                self.w_gate_up = _param(e, h, 2 * f, gen=gen)
            elif r.experts_layout == "stacked_t":
                self.w_gate, self.w_up = _param(e, h, f, gen=gen), _param(e, h, f, gen=gen)
            else:
                self.w_gate = _param(e, f, h, gen=gen)
                if gated:
                    self.w_up = _param(e, f, h, gen=gen)
            transposed_down = r.experts_layout in ("stacked_t", "concat_t")
            self.w_down = _param(e, f, h, gen=gen) if transposed_down else _param(e, h, f, gen=gen)
            if r.expert_bias:
                self.b_up = nn.Parameter(torch.randn(e, (2 if gated else 1) * f, generator=gen) * 0.1)
                self.b_down = nn.Parameter(torch.randn(e, h, generator=gen) * 0.1)
        if r.track_load:
            self.register_buffer("load", torch.zeros(e_route))
        if r.shared:
            self.shared = nn.Sequential(nn.Linear(h, f, bias=False), nn.SiLU(), nn.Linear(f, h, bias=False))

    # ---- routing --------------------------------------------------------------------------

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        r = self.r
        if r.router in ("linear", "linear_bias"):
            logits = self.router(x)
        elif r.router == "fp32":
            logits = F.linear(x.float(), self.router.weight.float())
        elif r.router == "param_linear":
            logits = F.linear(x, self.router_w)
        elif r.router == "param_matmul":
            logits = x @ self.router_w
        else:
            logits = torch.einsum("...h,eh->...e", x, self.router_w)
        if r.temperature is not None:
            logits = logits / r.temperature
        return logits

    def _score(self, logits: torch.Tensor) -> torch.Tensor:
        s = self.r.score
        if s == "softmax":
            return logits.softmax(dim=-1)
        if s == "softmax_f32":
            return F.softmax(logits, dim=-1, dtype=torch.float32)
        if s == "sigmoid":
            return torch.sigmoid(logits.float())
        if s == "sqrt_softplus":
            return F.softplus(logits).sqrt()
        return logits   # none, post_*

    def _group_limit(self, sel: torch.Tensor) -> torch.Tensor:
        n_group, topk_group, group_score, build, apply = self.r.group
        e = sel.shape[-1]
        grouped = sel.unflatten(-1, (n_group, e // n_group))
        if group_score == "max":
            gs = grouped.amax(dim=-1) if build != "compare" else grouped.max(dim=-1).values
        else:
            gs = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        if build == "compare":
            kth = gs.topk(topk_group, dim=-1)[0][..., -1:]
            keep = gs >= kth
        else:
            gidx = torch.topk(gs, k=topk_group, dim=-1, sorted=False)[1]
            if build == "scatter_zeros":
                keep = torch.zeros_like(gs).scatter_(-1, gidx, 1.0).bool()
            elif build == "scatter_ones":
                keep = ~torch.ones_like(gs, dtype=torch.bool).scatter_(-1, gidx, False)
            else:
                keep = F.one_hot(gidx, n_group).sum(dim=-2).bool()
        keep_e = keep.unsqueeze(-1).expand(grouped.shape).flatten(-2)
        if apply == "fill_inf":
            return sel.masked_fill(~keep_e, float("-inf"))
        if apply == "fill_zero":
            return sel.masked_fill(~keep_e, 0.0)
        if apply == "where":
            return torch.where(keep_e, sel, torch.full_like(sel, float("-inf")))
        return sel * keep_e.to(sel.dtype)

    def _select(self, sel: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.r.select
        if s == "topk":
            return torch.topk(sel, k, dim=-1)
        if s == "topk_unsorted":
            v, i = sel.topk(k, dim=-1, sorted=False)
            return v, i
        if s == "sort":
            v, i = torch.sort(sel, dim=-1, descending=True)
            return v[..., :k], i[..., :k]
        if s == "argsort":
            i = torch.argsort(sel, dim=-1, descending=True)[..., :k]
            return sel.gather(-1, i), i
        # k rounds of argmax, each masking the experts already picked
        ids, masked = [], sel
        for _ in range(k):
            i = masked.argmax(dim=-1)
            ids.append(i)
            masked = masked.masked_fill(F.one_hot(i, sel.shape[-1]).bool(), float("-inf"))
        i = torch.stack(ids, dim=-1)
        return sel.gather(-1, i), i

    def _route(self, x: torch.Tensor, bias: torch.Tensor | None, input_ids: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.r
        logits = self._logits(x)
        scores = self._score(logits)
        k = r.top_k
        if r.hash_ids:
            ids = self.hash_table[input_ids]          # [B, T, K] ([T, B, K] sequence-first)
            if r.layout == "flat":
                ids = ids.reshape(-1, k)
            w = scores.gather(-1, ids)
        elif r.score in ("post_softmax", "post_sigmoid"):
            vals, ids = self._select(logits, k)
            w = torch.softmax(vals, dim=-1) if r.score == "post_softmax" else torch.sigmoid(vals)
        else:
            if r.bias == "none":
                sel = scores
            elif r.bias == "selection_no_grad":
                with torch.no_grad():
                    sel = scores + self.correction_bias
            elif r.bias == "selection_arg":
                sel = scores + bias
            else:
                sel = scores + self.correction_bias
            if r.group is not None:
                sel = self._group_limit(sel)
            vals, ids = self._select(sel, k)
            w = vals if (r.bias == "score" or r.bias == "none") and r.group is None else scores.gather(-1, ids)
            if r.bias == "score" and r.group is not None:
                w = (scores + self.correction_bias).gather(-1, ids)
        if r.renorm == "sum":
            w = w / w.sum(dim=-1, keepdim=True)
        elif r.renorm == "sum_inplace":
            w = w.clone()
            w /= w.sum(dim=-1, keepdim=True)
        elif r.renorm == "sum_eps":
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        elif r.renorm == "clamp":
            w = w / w.sum(dim=-1, keepdim=True).clamp(min=1e-12)
        elif r.renorm == "normalize":
            w = F.normalize(w, p=1.0, dim=-1)
        if r.scale != 1.0:
            w = w * r.scale
        if r.weights_cast:
            w = w.to(x.dtype)
        return w, ids

    # ---- experts ---------------------------------------------------------------------------

    def _expert_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(w_in [E, (2)F, H] with gate rows first, w_out [E, H, F], b_in, b_out) read from the params."""
        r = self.r
        if r.experts_layout in ("concat", "interleaved"):
            w_in = self.w_gate_up
        elif r.experts_layout == "concat_t":
            w_in = self.w_gate_up.transpose(1, 2)
        elif r.experts_layout == "stacked_t":
            w_in = torch.cat([self.w_gate, self.w_up], dim=2).transpose(1, 2)
        elif r.experts_layout == "plain":
            w_in = self.w_gate
        else:
            w_in = torch.cat([self.w_gate, self.w_up], dim=1)
        w_out = self.w_down.transpose(1, 2) if r.experts_layout in ("stacked_t", "concat_t") else self.w_down
        b_in = b_out = None
        if r.expert_bias:
            b_in, b_out = self.b_up, self.b_down
        return w_in, w_out, b_in, b_out

    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        act = _ACT[self.r.activation]
        if self.r.experts_layout == "plain":
            return act(h)
        if self.r.experts_layout == "interleaved":
            return act(h[..., ::2]) * h[..., 1::2]
        gate, up = h.chunk(2, dim=-1)
        return act(gate) * up

    def _slot_experts(self, xs: torch.Tensor, eid: torch.Tensor) -> torch.Tensor:
        """Per-slot experts with weights gathered by expert id (batched_mm style)."""
        r = self.r
        w_in, w_out, b_in, b_out = self._expert_weights()
        if r.experts_layout in ("stacked_t", "concat_t"):  # gather the stored [E, H, X] and use x @ W
            w_in_t = self.w_gate_up if r.experts_layout == "concat_t" else torch.cat([self.w_gate, self.w_up], 2)
            h = torch.bmm(xs.unsqueeze(1), w_in_t[eid]).squeeze(1)
        else:
            h = torch.bmm(w_in[eid], xs.unsqueeze(-1)).squeeze(-1)
        if b_in is not None:
            h = h + b_in[eid]
        a = self._activate(h)
        if r.experts_layout in ("stacked_t", "concat_t"):
            y = torch.bmm(a.unsqueeze(1), self.w_down[eid]).squeeze(1)
        else:
            y = torch.bmm(w_out[eid], a.unsqueeze(-1)).squeeze(-1)
        if b_out is not None:
            y = y + b_out[eid]
        return y

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on rows ``x`` (loops)."""
        r = self.r
        if r.experts_layout == "modulelist":
            return self.experts[e](x)
        w_in, w_out, b_in, b_out = self._expert_weights()
        h = F.linear(x, w_in[e], None if b_in is None else b_in[e])
        return F.linear(self._activate(h), w_out[e], None if b_out is None else b_out[e])

    def _combine(self, n: int, tok: torch.Tensor, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        c = self.r.combine
        if c == "index_add":
            return torch.zeros_like(like).index_add_(0, tok, y)
        if c == "scatter_add":
            return torch.zeros_like(like).scatter_add(0, tok.unsqueeze(-1).expand(-1, like.shape[-1]), y)
        if c == "custom_scatter_add":
            return torch.ops.grouter_fuzz.scatter_add_rows(torch.zeros_like(like), tok, y)
        out = torch.zeros_like(like)
        out.index_put_((tok,), y, accumulate=True)
        return out

    def _experts(self, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Routed experts on flat tokens: ``x [N, H]``, ``w, ids [N, K]`` -> ``[N, H]``."""
        r = self.r
        n, k, e = x.shape[0], ids.shape[-1], r.experts
        ffn_ids, ffn_w, identity = ids, w, None
        if r.zero_experts and r.dispatch != "loop_where":   # the loop runs identity experts itself
            is_ffn = ids < e
            ffn_ids = ids.clamp(max=e - 1)
            ffn_w = w * is_ffn.to(w.dtype)
            identity = (w * (~is_ffn).to(w.dtype)).sum(dim=-1, keepdim=True) * x
        d = r.dispatch
        if d in ("sorted_op", "sorted_bf16"):
            flat = ffn_ids.reshape(-1)
            order = torch.argsort(flat, stable=True)
            tok = order // k
            xs = x[tok]
            # (bincount(minlength) has a data-dependent size and breaks the graph: the module path's case)
            counts = F.one_hot(flat, e).sum(dim=0) if d == "sorted_op" else torch.histc(
                flat.float(), bins=e, min=0, max=e - 1)
            w_in, w_out, _, _ = self._expert_weights()
            if d == "sorted_op":
                h = torch.ops.grouter_fuzz.grouped_linear(xs, w_in, counts)
                y = torch.ops.grouter_fuzz.grouped_linear(self._activate(h), w_out, counts)
            else:
                offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
                h = torch._grouped_mm(xs.bfloat16(), w_in.bfloat16().transpose(-2, -1), offs=offs)
                y = torch._grouped_mm(self._activate(h), w_out.bfloat16().transpose(-2, -1), offs=offs).type_as(x)
            ws = ffn_w.reshape(-1)[order]
            if r.combine == "sum_k":
                inv = torch.empty_like(order)
                inv[order] = torch.arange(order.numel(), device=order.device)
                out = (y * ws.unsqueeze(-1))[inv].view(n, k, -1).sum(dim=1)
            else:
                out = self._combine(n, tok, y * ws.unsqueeze(-1), x)
        elif d == "gathered_bmm":
            flat = ffn_ids.reshape(-1)
            xs = x.repeat_interleave(k, dim=0)
            y = self._slot_experts(xs, flat)
            if r.combine == "sum_k":
                out = (y.view(n, k, -1) * ffn_w.unsqueeze(-1)).sum(dim=1)
            else:
                tok = torch.arange(n, device=x.device).repeat_interleave(k)
                out = self._combine(n, tok, y * ffn_w.reshape(-1, 1), x)
        elif d in ("dense", "dense_on_input"):
            dense = torch.zeros(n, e, dtype=w.dtype, device=w.device).scatter(1, ffn_ids, ffn_w)
            w_in, w_out, b_in, b_out = self._expert_weights()
            if d == "dense":
                h = torch.einsum("nh,efh->enf", x, w_in)
                if b_in is not None:
                    h = h + b_in.unsqueeze(1)
                y = torch.bmm(self._activate(h), w_out.transpose(1, 2))
                if b_out is not None:
                    y = y + b_out.unsqueeze(1)
                out = (y * dense.t().unsqueeze(-1)).sum(dim=0)
            else:
                xe = x.unsqueeze(0) * dense.t().unsqueeze(-1)               # [E, N, H]
                out = torch.bmm(self._activate(torch.bmm(xe, w_in.transpose(1, 2))), w_out.transpose(1, 2)).sum(0)
        elif d == "onehot_einsum":
            out = self._onehot_experts(x, ffn_w, ffn_ids)
        elif d == "slot_buffer":
            out = self._slot_buffer_experts(x, ffn_w, ffn_ids)
        elif d == "loop_where":
            out = None
            for ex in range(r.routed_experts):
                tok, slot = torch.where(ids == ex)
                rows = x[tok]
                y = rows if ex >= e else self._expert(ex, rows)
                y = y * w[tok, slot].unsqueeze(-1)
                if out is None:
                    out = torch.zeros_like(x)
                if r.combine == "index_put":
                    out.index_put_((tok,), y, accumulate=True)
                else:
                    out.index_add_(0, tok, y)
            identity = None
        else:  # loop_dense: every expert on every token, masked by the routing
            out = torch.zeros_like(x)
            for ex in range(e):
                w_e = (ffn_w * (ffn_ids == ex).to(w.dtype)).sum(dim=-1, keepdim=True)
                out = out + w_e * self._expert(ex, x)
        if identity is not None:
            out = out + identity
        return out

    def _keep(self, w: torch.Tensor, ids: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Capacity: ``(keep [N, K] bool, position [N, K])`` of every slot in its expert."""
        n, k = ids.shape
        e = self.r.experts
        priority = self.r.capacity[1] if self.r.capacity is not None else "token"
        mask = F.one_hot(ids, e)                                           # [N, K, E]
        if priority == "choice":   # all first choices before any second choice (GShard)
            flat = mask.transpose(0, 1).reshape(k * n, e)
            pos = (torch.cumsum(flat, dim=0) - 1).reshape(k, n, e).transpose(0, 1)
        elif priority == "score":  # highest routing weight first (batch priority routing)
            order = torch.argsort(w.reshape(-1), descending=True, stable=True)
            flat = mask.reshape(n * k, e)[order]
            pos_sorted = torch.cumsum(flat, dim=0) - 1
            pos = torch.empty_like(pos_sorted).index_copy_(0, order, pos_sorted).reshape(n, k, e)
        else:                      # token order, the k choices of a token in turn
            pos = (torch.cumsum(mask.reshape(n * k, e), dim=0) - 1).reshape(n, k, e)
        position = (pos * mask).sum(dim=-1)
        return position < capacity, position

    def _capacity(self, n: int) -> int:
        if self.r.capacity is None:
            return n
        return int(math.ceil(self.r.capacity[0] * n * self.r.top_k / self.r.experts))

    def _onehot_experts(self, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        n, e = x.shape[0], self.r.experts
        cap = self._capacity(n)
        keep, position = self._keep(w, ids, cap)
        slot = F.one_hot(position.clamp(0, cap - 1), cap) * keep.unsqueeze(-1)        # [N, K, C]
        combine = torch.einsum("nk,nke,nkc->nec", w, F.one_hot(ids, e).to(w.dtype), slot.to(w.dtype))
        dispatch = torch.einsum("nke,nkc->nec", F.one_hot(ids, e).to(x.dtype), slot.to(x.dtype))
        xe = torch.einsum("nec,nh->ech", dispatch, x)
        w_in, w_out, b_in, b_out = self._expert_weights()
        h = torch.einsum("ech,efh->ecf", xe, w_in)
        if b_in is not None:
            h = h + b_in.unsqueeze(1)
        y = torch.einsum("ecf,ehf->ech", self._activate(h), w_out)
        if b_out is not None:
            y = y + b_out.unsqueeze(1)
        return torch.einsum("nec,ech->nh", combine, y)

    def _slot_buffer_experts(self, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        n, k = ids.shape
        e, hdim = self.r.experts, x.shape[-1]
        cap = self._capacity(n)
        keep, position = self._keep(w, ids, cap)
        slot = ids * cap + position.clamp(0, cap - 1)                     # [N, K] row in the buffer
        tok = torch.arange(n, device=x.device).unsqueeze(-1).expand(n, k)
        keep_f, slot_f, tok_f = keep.reshape(-1), slot.reshape(-1), tok.reshape(-1)
        rows = torch.where(keep_f, slot_f, torch.full_like(slot_f, e * cap))  # dropped slots: a spare row
        buf = x.new_zeros(e * cap + 1, hdim).index_copy(0, rows, x[tok_f])
        w_in, w_out, b_in, b_out = self._expert_weights()
        xb = buf[: e * cap].view(e, cap, hdim)
        h = torch.bmm(xb, w_in.transpose(1, 2))
        if b_in is not None:
            h = h + b_in.unsqueeze(1)
        y = torch.bmm(self._activate(h), w_out.transpose(1, 2))
        if b_out is not None:
            y = y + b_out.unsqueeze(1)
        y_rows = torch.cat([y.reshape(e * cap, hdim), y.new_zeros(1, hdim)])[rows]
        contrib = y_rows * (w.reshape(-1) * keep_f.to(w.dtype)).unsqueeze(-1)
        if self.r.combine == "sum_k":
            return contrib.view(n, k, hdim).sum(dim=1)
        return self._combine(n, tok_f, contrib, x)

    # ---- forward ---------------------------------------------------------------------------

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        r = self.r
        b, t, hdim = hidden.shape
        x = hidden
        if r.layout == "seq_first":
            x = hidden.transpose(0, 1)                  # [T, B, H]
            if input_ids is not None:
                input_ids = input_ids.transpose(0, 1)
        if r.layout == "flat":
            x = x.reshape(-1, hdim)
        w, ids = self._route(x, bias, input_ids)
        if r.track_load and self.training:   # load-balancing statistics, as aux-loss-free routers keep
            with torch.no_grad():
                self.load.add_(F.one_hot(ids.reshape(-1), r.routed_experts).sum(dim=0).to(self.load.dtype))
        x_flat = x.reshape(-1, hdim)
        out = self._experts(x_flat, w.reshape(-1, r.top_k), ids.reshape(-1, r.top_k))
        if r.shared:
            out = out + self.shared(x_flat)
        if r.layout == "seq_first":
            return out.view(t, b, hdim).transpose(0, 1)
        return out.view(b, t, hdim)


class FuzzLM(nn.Module):
    """Embedding -> ``layers`` x (RMSNorm -> generated MoE layer, residual) -> head."""

    def __init__(self, recipe: MoERecipe, layers: int = 2, vocab: int = 97) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(recipe.seed)
        self.recipe = recipe
        self.embed = nn.Embedding(vocab, recipe.hidden)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(vocab, recipe.hidden, generator=gen))
        self.norms = nn.ModuleList([nn.RMSNorm(recipe.hidden) for _ in range(layers)])
        self.blocks = nn.ModuleList([FuzzMoE(recipe, vocab, layer=i) for i in range(layers)])
        if recipe.bias == "selection_arg":   # the parent owns the selection bias and passes it down
            self.register_buffer("routing_bias", torch.randn(recipe.routed_experts, generator=gen) * 0.3)
        self.head = nn.Linear(recipe.hidden, vocab, bias=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        bias = getattr(self, "routing_bias", None)
        for norm, block in zip(self.norms, self.blocks):
            h = h + block(norm(h), input_ids if self.recipe.hash_ids else None, bias)
        return self.head(h)


# ------------------------------------------------------------------------------------------------
# near-misses: a top-k / an E-way linear that is not a rewritable MoE layer
# ------------------------------------------------------------------------------------------------

NEAR_MISSES = ("vocab_topk", "aux_only", "jitter", "expert_choice", "memory_lookup", "classifier_topk",
               "attention_topk")


class NearMissLM(nn.Module):
    """A small model with a router-like pattern that must be left bit-identical."""

    def __init__(self, kind: str, seed: int, hidden: int = 32, experts: int = 8, vocab: int = 97) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.kind, self.k = kind, 2
        self.embed = nn.Embedding(vocab, hidden)
        self.router = nn.Linear(hidden, experts, bias=False)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        self.memory = nn.Parameter(torch.randn(experts, hidden, generator=gen) * 0.2)
        self.w_experts = nn.Parameter(torch.randn(experts, hidden, hidden, generator=gen) * 0.1)
        self.head = nn.Linear(hidden, vocab, bias=False)
        with torch.no_grad():
            for p in (self.embed.weight, self.router.weight):
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        b, t, hdim = h.shape
        x = h.reshape(-1, hdim)
        kind = self.kind
        if kind == "vocab_topk":          # sampling-style top-k of the vocabulary
            logits = self.head(h + self.mlp(h))
            vals, _ = torch.topk(torch.softmax(logits, dim=-1), 4, dim=-1)
            return logits + vals.sum(-1, keepdim=True)
        if kind == "aux_only":            # the router's top-k only feeds a statistic
            probs = self.router(x).softmax(-1)
            _, ids = probs.topk(self.k, dim=-1)
            load = F.one_hot(ids, probs.shape[-1]).float().mean(dim=(0, 1))
            return self.head(h + self.mlp(h)) + (load * probs.mean(0)).sum()
        if kind == "jitter":              # a router with noise in training: not a function of its input
            logits = self.router(x)
            logits = logits + torch.randn_like(logits) * 0.5
            w, ids = logits.softmax(-1).topk(self.k, dim=-1)
            y = torch.bmm(self.w_experts[ids.reshape(-1)], x.repeat_interleave(self.k, 0).unsqueeze(-1)).squeeze(-1)
            out = (y.view(-1, self.k, hdim) * w.unsqueeze(-1)).sum(1)
            return self.head(h + out.view(b, t, hdim))
        if kind == "expert_choice":       # each expert picks its top tokens (top-k over the token dim)
            probs = self.router(x).softmax(-1)                   # [N, E]
            cap = max(1, x.shape[0] // 4)
            g, tok = torch.topk(probs.t(), cap, dim=-1)          # [E, C]
            y = torch.bmm(x[tok], self.w_experts)                # [E, C, H]
            out = torch.zeros_like(x).index_add_(0, tok.reshape(-1), (y * g.unsqueeze(-1)).reshape(-1, hdim))
            return self.head(h + out.view(b, t, hdim))
        if kind == "memory_lookup":       # top-k keys select rows of a value table (no expert computation)
            w, ids = self.router(x).softmax(-1).topk(self.k, dim=-1)
            out = (self.memory[ids] * w.unsqueeze(-1)).sum(1)
            return self.head(h + out.view(b, t, hdim))
        if kind == "classifier_topk":     # top-k class predictions returned with the logits
            cls = self.router(h.mean(1))
            vals, idx = cls.topk(self.k, dim=-1)
            return self.head(h) + vals.sum() + idx.float().sum()
        # attention_topk: sparse attention keeping each query's top-k keys
        q = h @ self.w_experts[0]
        scores = q @ h.transpose(1, 2) / math.sqrt(hdim)
        vals, idx = scores.topk(min(self.k, t), dim=-1)
        attn = torch.full_like(scores, float("-inf")).scatter(-1, idx, vals).softmax(-1)
        return self.head(h + attn @ h)


def sample_near_miss(seed: int) -> tuple[str, nn.Module]:
    kind = NEAR_MISSES[seed % len(NEAR_MISSES)]
    return kind, NearMissLM(kind, seed).train()


# ------------------------------------------------------------------------------------------------
# the check
# ------------------------------------------------------------------------------------------------


@dataclass
class FuzzResult:
    seed: int
    kind: str              # "moe" or the near-miss kind
    ok: bool
    detail: str
    recipe: str = ""
    seconds: float = 0.0
    version: str = ""


def _tolerance(recipe: MoERecipe) -> float:
    return 1e-5 if recipe.compute_dtype == torch.float32 else 2e-2


class _Float64Everywhere(torch.overrides.TorchFunctionMode):
    """Casts to fp32 (``.float()``, ``.to(torch.float32)``, ``dtype=torch.float32``) become casts to
    fp64, so a model with fp32 casts in it runs entirely in fp64."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name == "float" and args and isinstance(args[0], torch.Tensor):
            return args[0].double()
        args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        kwargs = {k: torch.float64 if v is torch.float32 else v for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _as_accurate_as_eager(model: nn.Module, inputs: dict, got: tuple, ref: tuple, seed: int, tol: float) -> bool:
    """When the rewritten model and eager differ by more than ``tol`` (a gradient through an
    ill-conditioned chain, where two summation orders part by more than fp32's epsilon), measure
    both against an fp64 run of the same step: the rewrite passes when no output or gradient of
    it is further from fp64 than twice eager's own error (or than ``tol``)."""
    from grouter_pass.testing.parity import run_step

    exact = copy.deepcopy(model).double()
    with _Float64Everywhere():
        ref64 = run_step(exact, exact, inputs, lambda o: o, True, seed)
    pairs = [(got[0], ref[0], ref64[0])] + [(got[2][n], ref[2][n], ref64[2][n]) for n in ref[2]]
    for ours, eager, truth in pairs:
        if truth is None or ours is None or eager is None:
            if (ours is None) != (eager is None):
                return False
            continue
        scale = truth.abs().max().item() or 1.0
        err_ours = (ours.double() - truth).abs().max().item() / scale
        err_eager = (eager.double() - truth).abs().max().item() / scale
        if err_ours > max(tol, 2 * err_eager):
            return False
    return True


def check_recipe(seed: int, *, dynamic: bool | None = None, layers: int = 2) -> FuzzResult:
    """Build the layer of ``seed``, compile it with the grouter pass and check it: every layer
    rewritten, forward and every gradient within tolerance of eager, for two token counts."""
    from grouter_pass import GrouterConfig, apply_grouter, grouter_reports
    from grouter_pass.testing.parity import compare_steps, default_output, run_step

    recipe = sample_recipe(seed)
    t0 = time.perf_counter()
    dynamic = (seed % 2 == 0) if dynamic is None else dynamic
    torch.manual_seed(seed)
    model = FuzzLM(recipe, layers=layers).train()
    candidate = copy.deepcopy(model)
    patch = torch._dynamo.config.patch(capture_dynamic_output_shape_ops=recipe.needs_dynamic_output_shapes)
    try:
        with patch:
            compiled = apply_grouter(candidate, GrouterConfig(compiler="eager", dynamic=dynamic, fullgraph=True))
            for i, (b, t) in enumerate([(2, 7), (3, 5)]):
                ids = torch.randint(0, 97, (b, t), generator=torch.Generator().manual_seed(seed + i))
                ref = run_step(model, model, {"input_ids": ids}, default_output, True, seed + i)
                got = run_step(compiled, candidate, {"input_ids": ids}, default_output, True, seed + i)
                result = compare_steps(got, ref, None, None)
                if result.missing_grads or (result.max_rel() > _tolerance(recipe) and not _as_accurate_as_eager(
                        model, {"input_ids": ids}, got, ref, seed + i, _tolerance(recipe))):
                    return FuzzResult(seed, "moe", False, f"parity at {(b, t)}: {result.summary()}",
                                      recipe.describe(), time.perf_counter() - t0)
                for (name, want), have in zip(model.named_buffers(), candidate.buffers()):
                    if not torch.equal(have, want):
                        return FuzzResult(seed, "moe", False, f"buffer {name} differs at {(b, t)}",
                                          recipe.describe(), time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - a crash is a failed case, reported with its message
        return FuzzResult(seed, "moe", False, f"{type(e).__name__}: {e}"[:500], recipe.describe(),
                          time.perf_counter() - t0)
    reports = grouter_reports(compiled)
    rewritten = [s for s in reports[0].rewritten] if reports else []
    # blocks whose expert loop breaks the graph are rewritten before Dynamo (prepare_model)
    rewritten += [b for b in compiled._grouter_prepared.loop_blocks if b.rewritten]
    if len(rewritten) != layers:
        reasons = [s.summary() for r in reports[:1] for s in r.sites if not s.rewritten] or ["no site found"]
        return FuzzResult(seed, "moe", False, f"{len(rewritten)} of {layers} layers rewritten: {reasons}",
                          recipe.describe(), time.perf_counter() - t0)
    return FuzzResult(seed, "moe", True, "; ".join(s.summary() for s in rewritten[:1]), recipe.describe(),
                      time.perf_counter() - t0)


def check_near_miss(seed: int) -> FuzzResult:
    """A near-miss must be left unchanged: no site rewritten, forward and gradients bit-identical."""
    from grouter_pass import GrouterConfig, apply_grouter, grouter_reports
    from grouter_pass.testing.parity import run_step

    kind, model = sample_near_miss(seed)
    t0 = time.perf_counter()
    candidate = copy.deepcopy(model)
    try:
        compiled = apply_grouter(candidate, GrouterConfig(compiler="eager", dynamic=seed % 2 == 0))
        ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)
        ref = run_step(model, model, {"input_ids": ids}, lambda o: o, True, seed)
        torch.manual_seed(seed)
        got = run_step(compiled, candidate, {"input_ids": ids}, lambda o: o, True, seed)
    except Exception as e:  # noqa: BLE001
        return FuzzResult(seed, kind, False, f"{type(e).__name__}: {e}"[:500], seconds=time.perf_counter() - t0)
    rewritten = [s for r in grouter_reports(compiled) for s in r.rewritten]
    if rewritten:
        return FuzzResult(seed, kind, False, f"rewrote {rewritten[0].summary()}", seconds=time.perf_counter() - t0)
    same = torch.equal(got[0], ref[0]) and all(
        (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
        for a, b in ((got[2][n], ref[2][n]) for n in ref[2]))
    return FuzzResult(seed, kind, same, "unchanged" if same else "outputs differ",
                      seconds=time.perf_counter() - t0)


#: the categories a recipe exercises (for the pass-rate table of docs/support.md)
CATEGORIES: tuple[tuple[str, Any], ...] = (
    ("3-D or sequence-first routing", lambda r: r.layout != "flat"),
    ("group-limited selection", lambda r: r.group is not None),
    ("selection bias (choice only, in the weights, parent-owned, under no_grad)", lambda r: r.bias != "none"),
    ("score beyond softmax/sigmoid, temperature, fp32 router", lambda r: r.score in ("none", "sqrt_softplus")
     or r.temperature is not None or r.router == "fp32"),
    ("top-k / max after the score (softmax or sigmoid over k)", lambda r: r.score.startswith("post_")),
    ("selection by sort, argsort or argmax rounds", lambda r: r.select in ("sort", "argsort", "argmax_rounds")),
    ("hash routing (ids from table[input_ids])", lambda r: r.hash_ids),
    ("zero-computation (identity) experts", lambda r: r.zero_experts > 0),
    ("capacity-based dispatch (token / choice / score priority)", lambda r: r.capacity is not None),
    ("slot buffers (index_copy, bmm, gather back)", lambda r: r.dispatch == "slot_buffer"),
    ("ModuleList / per-expert loop over torch.where", lambda r: r.dispatch == "loop_where"),
    ("dense masked loop over experts", lambda r: r.dispatch == "loop_dense"),
    ("bf16 torch._grouped_mm experts in an fp32 model", lambda r: r.dispatch == "sorted_bf16"),
    ("third-party custom op (grouped GEMM or combine)", lambda r: r.dispatch == "sorted_op"
     or r.combine == "custom_scatter_add"),
    ("one-hot [N, E, C] einsums", lambda r: r.dispatch == "onehot_einsum"),
    ("dense experts on every token (weight on output or input)", lambda r: r.dispatch.startswith("dense")),
    ("gathered per-slot weights + bmm", lambda r: r.dispatch == "gathered_bmm"),
    ("buffer updated in place (load statistics)", lambda r: r.track_load),
)


def code_version() -> str:
    """The git revision of the checkout (with ``-dirty``), recorded with every result."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return rev or "unknown"


def run_fuzz(seeds: list[int], results_path: Path | None = None, near_misses: bool = True) -> list[FuzzResult]:
    """Check ``seeds`` (and as many near-misses), resuming from ``results_path`` (JSON lines).

    Results recorded by another code version are run again (and replaced)."""
    from tqdm import tqdm

    version = code_version()
    done: dict[tuple[str, int], FuzzResult] = {}
    if results_path is not None and results_path.exists():
        stale = 0
        for line in results_path.read_text().splitlines():
            d = json.loads(line)
            if d.get("version") != version:
                stale += 1
                continue
            done[("nm" if d["kind"] != "moe" else "moe", d["seed"])] = FuzzResult(**d)
        if stale:
            print(f"fuzz: {stale} results in {results_path} are from another code version; running them again")
            results_path.write_text("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in done.values()))
    jobs = [("moe", s) for s in seeds] + ([("nm", s) for s in seeds] if near_misses else [])
    out = []
    with tqdm(jobs, desc="fuzz", unit="case") as bar:
        for kind, seed in bar:
            if (kind, seed) in done:
                out.append(done[(kind, seed)])
                continue
            torch._dynamo.reset()
            r = check_recipe(seed) if kind == "moe" else check_near_miss(seed)
            r.version = version
            out.append(r)
            if results_path is not None:
                with results_path.open("a") as f:
                    f.write(json.dumps(dataclasses.asdict(r)) + "\n")
            bar.set_postfix(failed=sum(not x.ok for x in out))
    return out


def summarize(results: list[FuzzResult], command: str) -> dict[str, Any]:
    """Pass rates overall, per category and per near-miss kind (what docs/support.md shows)."""
    moe = [r for r in results if r.kind == "moe"]
    nm = [r for r in results if r.kind != "moe"]
    recipes = {r.seed: sample_recipe(r.seed) for r in moe}
    categories = []
    for name, pred in CATEGORIES:
        hit = [r for r in moe if pred(recipes[r.seed])]
        categories.append({"category": name, "layers": len(hit), "passed": sum(r.ok for r in hit)})
    kinds = {}
    for r in nm:
        k = kinds.setdefault(r.kind, {"models": 0, "passed": 0})
        k["models"] += 1
        k["passed"] += int(r.ok)
    seeds = sorted({r.seed for r in results})
    return {"command": command, "version": sorted({r.version for r in results}), "seeds": [seeds[0], seeds[-1]]
            if seeds else [], "moe_layers": len(moe), "moe_passed": sum(r.ok for r in moe),
            "near_misses": len(nm), "near_misses_passed": sum(r.ok for r in nm),
            "failed": [{"seed": r.seed, "kind": r.kind, "detail": r.detail[:300]} for r in results if not r.ok],
            "categories": categories, "near_miss_kinds": kinds,
            "seconds": round(sum(r.seconds for r in results), 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m grouter_pass.testing.fuzz",
                                description="Generate MoE layers and near-misses; check each is rewritten "
                                            "exactly (or left bit-identical).")
    p.add_argument("--fuzz", type=int, default=100, help="number of seeds (default 100)")
    p.add_argument("--start", type=int, default=0, help="first seed")
    p.add_argument("--results", type=Path, default=None, help="JSON-lines file to resume from and append to")
    p.add_argument("--summary", type=Path, default=None, help="write the pass rates as JSON (docs/fuzz-summary.json)")
    p.add_argument("--no-near-misses", action="store_true")
    args = p.parse_args(argv)
    results = run_fuzz(list(range(args.start, args.start + args.fuzz)), args.results, not args.no_near_misses)
    moe = [r for r in results if r.kind == "moe"]
    nm = [r for r in results if r.kind != "moe"]
    for r in results:
        if not r.ok:
            print(f"FAIL seed {r.seed} ({r.kind}) {r.recipe}\n     {r.detail}")
    print(f"MoE layers: {sum(r.ok for r in moe)}/{len(moe)} rewritten exactly; near-misses: "
          f"{sum(r.ok for r in nm)}/{len(nm)} left bit-identical")
    if args.summary is not None:
        command = "python -m grouter_pass.testing.fuzz " + " ".join(argv if argv is not None else sys.argv[1:])
        args.summary.write_text(json.dumps(summarize(results, command), indent=2) + "\n")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
