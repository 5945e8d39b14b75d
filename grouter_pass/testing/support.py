"""The support matrix: every model and MoE style the pass is tested on, with what it must do.

Each :class:`SupportCase` declares the expected outcome (gating family, expert style, how many
MoE layers are rewritten, Dynamo graph counts before and after, or the reason a case is left
unchanged). ``tests/integration/test_support_matrix.py`` checks every declaration against a
real run (parity of a training step for several token counts under ``dynamic=True``, and the
recompile count); ``docs/support.md`` is rendered from the same declarations by
``python -m grouter_pass.testing.support`` and a test keeps the file current. The table can
therefore not claim what the tests do not check.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from grouter_pass.testing import handwritten as hw
from grouter_pass.testing.models import tiny_hf_moe


@dataclass(frozen=True)
class SupportCase:
    name: str
    source: str                      # "transformers 5.24" or "hand-written"
    model: str                       # what users would call it
    build: Callable[[], torch.nn.Module]
    family: str | None               # gating family of the rewritten layers (None: left unchanged)
    experts: str | None              # expert style as detected; "module rewrite" for pre-Dynamo rewrites
    rewritten: int                   # MoE layers rewritten (by the graph pass or before Dynamo)
    graphs_before: int               # Dynamo graphs of the unmodified model
    graphs_after: int                # Dynamo graphs with apply_grouter
    reason: str | None = None        # for cases left unchanged: the reason users see (a substring)
    note: str = ""
    dtype: torch.dtype = torch.float32
    tolerance: float = 1e-5          # max relative error of output and every gradient
    recompiles: bool = False         # True: the *unmodified* model already specialises on the token count
    inputs: str = "embeds"           # "embeds": inputs_embeds (input gradient checked); "ids": input_ids


def _hf(model_type: str, **kw: Any) -> Callable[[], torch.nn.Module]:
    return functools.partial(lambda mt, kw: tiny_hf_moe(mt, **kw).train(), model_type, kw)


def _hf_eval(model_type: str, **kw: Any) -> Callable[[], torch.nn.Module]:
    return functools.partial(lambda mt, kw: tiny_hf_moe(mt, **kw).eval(), model_type, kw)


def _hand(block: type, dtype: torch.dtype = torch.float32, **kw: Any) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return hw.TinyMoELM(functools.partial(block, **kw)).to(dtype).train()
    return build


HF = "transformers 5.24"
HAND = "hand-written"

SUPPORT_CASES: tuple[SupportCase, ...] = (
    SupportCase("mixtral", HF, "Mixtral", _hf("mixtral"), "softmax_topk", "grouped_mm", 2, 1, 1),
    SupportCase("qwen2_moe", HF, "Qwen2-MoE", _hf("qwen2_moe"), "softmax_topk", "grouped_mm", 2, 1, 1,
                note="sigmoid-gated shared expert kept"),
    SupportCase("qwen3_moe", HF, "Qwen3-MoE", _hf("qwen3_moe"), "softmax_topk", "grouped_mm", 2, 1, 1),
    SupportCase("olmoe", HF, "OLMoE", _hf("olmoe"), "softmax_topk", "grouped_mm", 2, 1, 1),
    SupportCase("deepseek_v3", HF, "DeepSeek-V3", _hf("deepseek_v3"), "sigmoid_topk", "grouped_mm", 2, 1, 1,
                note="correction bias, group-limited top-k, scaling; shared experts kept"),
    SupportCase("gpt_oss", HF, "GPT-OSS", _hf("gpt_oss"), "topk_softmax", "grouped_mm", 2, 1, 1,
                note="router bias; transposed interleaved clamped SwiGLU with biases"),
    SupportCase("glm4_moe", HF, "GLM-4-MoE", _hf("glm4_moe"), "sigmoid_topk", "grouped_mm", 2, 1, 1,
                note="one group"),
    SupportCase("ernie4_5_moe", HF, "Ernie-4.5-MoE", _hf("ernie4_5_moe"), "softmax_topk", "grouped_mm", 2, 1, 1,
                note="selection-only bias, clamp(min) renorm"),
    SupportCase("granitemoe", HF, "GraniteMoE", _hf("granitemoe"), "topk_softmax", "grouped_mm", 2, 1, 1),
    SupportCase("jamba", HF, "Jamba", _hf("jamba"), "softmax_topk", "grouped_mm", 2, 1, 1,
                note="hybrid: a Mamba and an attention layer", recompiles=True),
    SupportCase("llama4", HF, "Llama 4 (text)", _hf("llama4_text"), "topk_sigmoid", "dense_bmm", 2, 1, 1,
                note="dense experts on every token become top-1 dispatch; routing weight on the expert input"),
    SupportCase("phimoe_eval", HF, "PhiMoE, eval()", _hf_eval("phimoe"), "sparsemixer", "grouped_mm", 2, 1, 1),
    SupportCase("phimoe_train", HF, "PhiMoE, train()", _hf("phimoe"), None, None, 0, 1, 1,
                reason="samples experts at random (training mode)"),
    SupportCase("dbrx", HF, "DBRX", _hf("dbrx"), "softmax_topk", "module rewrite", 2, 10, 1,
                note="own expert loop over flat [E*F, H] weights; L1 renorm", inputs="ids"),
    SupportCase("qwen3_moe_eager", HF, "Qwen3-MoE, experts_implementation='eager'",
                _hf("qwen3_moe", experts_implementation="eager"), "softmax_topk", "grouped_mm", 2, 12, 1,
                note="switched to the 'grouter' experts implementation (ExpertsInterface)"),
    SupportCase("mixtral_batched_mm", HF, "Mixtral, experts_implementation='batched_mm'",
                _hf("mixtral", experts_implementation="batched_mm"), "softmax_topk", "batched_mm", 2, 1, 1),
    SupportCase("qwen2_moe_sparse_step", HF, "Qwen2-MoE, decoder_sparse_step=2",
                _hf("qwen2_moe", decoder_sparse_step=2), "softmax_topk", "grouped_mm", 1, 1, 1,
                note="layer 0 dense, layer 1 MoE"),
    SupportCase("deepseek_v3_first_dense", HF, "DeepSeek-V3, first_k_dense_replace=1",
                _hf("deepseek_v3", first_k_dense_replace=1), "sigmoid_topk", "grouped_mm", 1, 1, 1),
    SupportCase("qwen3_moe_mlp_only", HF, "Qwen3-MoE, mlp_only_layers=[0]", _hf("qwen3_moe", mlp_only_layers=[0]),
                "softmax_topk", "grouped_mm", 1, 1, 1),
    SupportCase("torchtitan", HAND, "torchtitan-style (bf16, torch._grouped_mm)",
                _hand(hw.TorchtitanStyleMoE, torch.bfloat16), "sigmoid_topk", "grouped_mm", 2, 1, 1,
                note="separate gate/up weights, argsort dispatch, scatter_add into the shared expert",
                dtype=torch.bfloat16, tolerance=5e-2),
    SupportCase("einsum", HAND, "GShard-style einsum dispatch, capacity = tokens", _hand(hw.EinsumDispatchMoE),
                "softmax_topk", "einsum", 2, 1, 1, note="bare [H, E] router parameter with @", recompiles=True),
    SupportCase("dense_bmm", HAND, "dense bmm over all experts", _hand(hw.DenseBmmMoE), "softmax_topk", "dense_bmm",
                2, 1, 1, note="bare [E, H] router parameter with F.linear"),
    SupportCase("batched_gather", HAND, "per-slot gathered weights + bmm", _hand(hw.BatchedGatherMoE),
                "softmax_topk", "batched_mm", 2, 1, 1, note="bare [H, E] router parameter with torch.matmul"),
    SupportCase("loop_4x", HAND, "transformers 4.x loop (ModuleList, where, index_add_)", _hand(hw.LoopMoE),
                "softmax_topk", "module rewrite", 2, 3, 1),
    SupportCase("split_loop", HAND, "bincount().tolist() + split loop", _hand(hw.SplitLoopMoE), "topk_softmax",
                "module rewrite", 2, 3, 1),
    SupportCase("switch_capacity", HAND, "Switch top-1 (max), capacity factor 1.25", _hand(hw.SwitchCapacityMoE),
                None, None, 0, 1, 1, reason="capacity-based dispatch", recompiles=True),
    SupportCase("gshard_capacity", HAND, "GShard top-2 (argmax, one_hot), capacity factor 2",
                _hand(hw.GShardCapacityMoE), None, None, 0, 1, 1, reason="capacity-based dispatch", recompiles=True),
)

CASES_BY_NAME = {c.name: c for c in SUPPORT_CASES}


def make_inputs(case: SupportCase, model: torch.nn.Module, batch: int, seq: int, seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    if case.inputs == "ids":
        return {"input_ids": ids}
    with torch.no_grad():
        return {"inputs_embeds": model.get_input_embeddings()(ids).detach()}


# ------------------------------------------------------------------------------------------------
# docs/support.md
# ------------------------------------------------------------------------------------------------

_HEADER = """# What the pass supports

<!-- Generated by `python -m grouter_pass.testing.support > docs/support.md` from the test registry
(grouter_pass/testing/support.py); tests/integration/test_support_matrix.py checks every row and
that this file is current. Do not edit by hand. -->

Every row is a tiny (2-layer, random-init) model that a test compiles with `apply_grouter`
(`dynamic=True`) and trains one step at three token counts next to the unmodified model:
forward output, input gradient and every parameter gradient agree within the tolerance shown,
and no new token count recompiles (except where the unmodified model itself specialises on the
token count). "Graphs" counts Dynamo graphs for the unmodified model and with `apply_grouter`,
which first makes graph-breaking expert loops capturable (`prepare_model`).

"""

_FOOTER = """
## Families

| family | gating |
|---|---|
| `softmax_topk` | softmax → [selection bias] → [group-limited] top-k → [gather] → [renorm: sum / L-p, eps, clamp] → [scale] |
| `sigmoid_topk` | sigmoid → [correction bias] → [group-limited] top-k → gather of the unbiased scores → renorm → scale |
| `topk_softmax` | top-k on the logits → softmax over the k values |
| `topk_sigmoid` | top-k on the logits → scattered into −inf → sigmoid (dense scores, Llama 4) |
| `sparsemixer` | PhiMoE's two rounds of masked softmax around the best expert (evaluation mode) |

## Expert styles

| style | recognised as |
|---|---|
| `grouped_mm` | rows sorted by expert (sort / argsort), `torch._grouped_mm` or transformers' `grouped_mm_fallback`, combined by `view(N, K, H).sum(1)` or `scatter_add` / `index_add` |
| `batched_mm` | per-slot weights gathered by expert id, `bmm` |
| `dense_bmm` | every expert on every token (`bmm` over `[E, N, H]`), combined with dense routing weights |
| `einsum` | `[N, E, C]` dispatch / combine einsums (only when the capacity `C` can hold every token) |
| `module rewrite` | a graph-breaking loop over experts (`ModuleList` of MLPs, flat or 3-D weights), rewritten before Dynamo after a search of the weight roles that reproduces the block (`integrations/modules.py`) |

Activations: SwiGLU / GeGLU (exact or tanh) / ReGLU with concatenated or interleaved halves or
two separate GEMMs, plain SiLU / GELU / ReLU, GPT-OSS's clamped SwiGLU. Weights `[E, out, in]` or
`[E, in, out]` per GEMM, optional per-expert biases, the routing weight on the expert output or
its input. Shared experts are kept as they are.

## Left unchanged on purpose

* **Capacity-based dispatch that can drop tokens** (Switch, GShard with a capacity factor): the
  grouter ops never drop tokens, so rewriting would change numbers.
* **Stochastic routers** (PhiMoE in training mode: Gumbel sampling and a custom backward).
* A top-k whose ids feed no experts (an auxiliary loss, top-k sampling of vocabulary logits,
  attention top-k), a softmax over the vocabulary, a linear with E outputs that is not a router:
  not MoE sites; `tests/passes/test_near_misses.py` checks each stays untouched.
"""


def render_support_md() -> str:
    rows = ["| model | source | family | experts | MoE layers rewritten | graphs before → after | parity tol. | notes |",
            "|---|---|---|---|---:|---|---|---|"]
    for c in SUPPORT_CASES:
        family = f"`{c.family}`" if c.family else "—"
        experts = f"`{c.experts}`" if c.experts else "—"
        notes = c.note
        if c.reason:
            notes = (notes + "; " if notes else "") + f"left unchanged: {c.reason}"
        if c.recompiles:
            notes = (notes + "; " if notes else "") + "the unmodified model recompiles per token count"
        tol = "—" if c.rewritten == 0 else f"{c.tolerance:g}" + (" (bf16)" if c.dtype == torch.bfloat16 else "")
        rows.append(f"| {c.model} | {c.source} | {family} | {experts} | {c.rewritten} | {c.graphs_before} → "
                    f"{c.graphs_after} | {tol} | {notes} |")
    return _HEADER + "\n".join(rows) + "\n" + _FOOTER


if __name__ == "__main__":
    print(render_support_md(), end="")
