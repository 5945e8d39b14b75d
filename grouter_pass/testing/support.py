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
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grouter_pass.testing import handwritten as hw
from grouter_pass.testing import third_party
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


def _hand(block: type, dtype: torch.dtype = torch.float32, seq_first: bool = False, **kw: Any
          ) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return hw.TinyMoELM(functools.partial(block, **kw), seq_first=seq_first).to(dtype).train()
    return build


HF = "transformers 5.24"
HAND = "hand-written"
TORCHTITAN = "torchtitan 0.3.0 (PyPI)"

SUPPORT_CASES: tuple[SupportCase, ...] = (
    SupportCase("mixtral", HF, "Mixtral", _hf("mixtral"), "softmax_topk", "grouped_mm", 2, 1, 1),
    SupportCase("qwen2_moe", HF, "Qwen2-MoE", _hf("qwen2_moe"), "softmax_topk", "grouped_mm", 2, 1, 1,
                note="sigmoid-gated shared expert kept"),
    SupportCase("qwen3_moe", HF, "Qwen3-MoE", _hf("qwen3_moe"), "softmax_topk", "grouped_mm", 2, 1, 1),
    SupportCase("olmoe", HF, "OLMoE", _hf("olmoe"), "softmax_topk", "grouped_mm", 2, 1, 1),
    SupportCase("deepseek_v3", HF, "DeepSeek-V3", _hf("deepseek_v3"), "sigmoid_topk", "grouped_mm", 2, 1, 1,
                note="correction bias, group-limited top-k, scaling; shared experts kept"),
    SupportCase("deepseek_v2", HF, "DeepSeek-V2, group_limited_greedy", _hf("deepseek_v2"), "softmax_topk",
                "grouped_mm", 2, 1, 1, note="groups ranked by their best expert (max), other groups zeroed, scaled"),
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
                reason="samples experts at random (training-mode noise or sampling"),
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
                "softmax_topk", "einsum", 2, 1, 1, recompiles=True,
                note="capacity-based dispatch: tokens past capacity dropped in token order, exactly"),
    SupportCase("gshard_capacity", HAND, "GShard top-2 (argmax, one_hot), capacity factor 2",
                _hand(hw.GShardCapacityMoE), "softmax_topk", "einsum", 2, 1, 1, recompiles=True,
                note="two argmax rounds; capacity with every first choice before any second (choice priority)"),
    SupportCase("torchtitan_pypi", TORCHTITAN, "torchtitan MoE (sigmoid, expert bias, shared expert)",
                functools.partial(third_party.torchtitan_moe_lm), "sigmoid_topk", "grouped_mm", 2, 1, 1,
                tolerance=5e-2, note="torchtitan's own layer: [B, L, E] routing, bias passed in by the parent, "
                "bf16 torch._grouped_mm experts in an fp32 model, its deterministic scatter-add op, token "
                "counts updated in place"),
    SupportCase("torchtitan_pypi_groups", TORCHTITAN, "torchtitan MoE (softmax, node-limited groups)",
                functools.partial(third_party.torchtitan_moe_lm, score="softmax", route_norm=False, route_scale=1.0,
                                  groups=(4, 2), shared=False), "softmax_topk", "grouped_mm", 2, 1, 1,
                tolerance=5e-2, note="group mask by scatter_ into ones_like, masked_fill on the [B, L, G, E/G] view"),
    SupportCase("megatron", HAND, "Megatron-LM-style (sequence-first, SequentialMLP loop)",
                _hand(hw.MegatronStyleMoE, seq_first=True), "softmax_topk", "module rewrite", 2, 5, 1,
                note="bare [E, H] router in fp32, dense probs + routing map, masked_select permutation, "
                     "split(tolist()) expert loop"),
    SupportCase("megatron_sigmoid", HAND, "Megatron-LM-style, sigmoid + expert bias",
                _hand(hw.MegatronStyleMoE, seq_first=True, score="sigmoid"), "sigmoid_topk", "module rewrite", 2,
                5, 1, note="selection bias owned by the router module"),
    SupportCase("nanogpt", HAND, "nanoGPT-MoE-style (capacity, [N, E*C] matmul combine)",
                _hand(hw.NanoGPTStyleMoE), "topk_softmax", "dense_bmm", 2, 1, 1, recompiles=True,
                note="top-k scattered into -inf then softmax; choice-priority capacity; [E, C, H] bmm experts"),
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

_CATEGORIES = """
## Categories of unseen models, and what tests each

| category | support rows (above) | fuzzer spellings (`grouter_pass/testing/fuzz.py`) |
|---|---|---|
| routers on 3-D or sequence-first tensors, flattening after the top-k | torchtitan (`[B, L, E]`), Megatron-LM-style (`[S, B, H]`), nanoGPT-style | `layout=3d`, `layout=seq_first` |
| group-limited selection spelled differently (max / top-2 sum; `scatter_` into `zeros_like` or `ones_like`, `one_hot`, comparison; `masked_fill(-inf / 0)`, `where`, multiply) | DeepSeek-V3, torchtitan with node-limited groups | `group=(G, tg, score, build, apply)` |
| selection bias owned elsewhere (passed in by the parent, added under `no_grad`, choice only) | torchtitan, Megatron-LM-style sigmoid, DeepSeek-V3 | `bias=selection_arg / selection_no_grad / selection / score` |
| score functions beyond softmax/sigmoid, temperature, fp32 router casts | Megatron-LM-style (fp32 router) | `score=sqrt_softplus / none`, `temperature`, `router=fp32` |
| routing that is not a linear of the hidden state: hash layers, zero-computation experts | — | `hash_ids`, `zero_experts` |
| dispatch styles: slot buffers, `ModuleList` loops over `torch.where`, bf16 experts in an fp32 model, a third-party op in the combine, sequence-first outputs | torchtitan (bf16 `torch._grouped_mm`, its scatter-add op), Megatron-LM-style (`SequentialMLP`) | `dispatch=slot_buffer / loop_where / loop_dense / sorted_bf16 / sorted_op`, `combine=custom_scatter_add` |
| capacity-based dispatch, tokens dropped exactly | Switch top-1, GShard top-2, nanoGPT-style | `capacity=(factor, token / choice / score)` |

`tests/integration/test_fuzz.py` runs a fixed set of 24 seeds that covers every fuzzer category
(and 14 near-misses) in `make test`.
"""

_FOOTER = """
## Families

A family is a name for the spec that was found, not a pattern that was matched:

| family | gating |
|---|---|
| `softmax_topk` | softmax → [selection bias] → [group-limited] top-k → [gather] → [renorm: sum / L-p, eps, clamp] → [scale] |
| `sigmoid_topk` | sigmoid → [bias] → [group-limited] top-k → gather → renorm → scale |
| `topk_softmax` | top-k on the logits → softmax over the k values |
| `topk_sigmoid` | top-k on the logits → sigmoid of the k values (dense scores, Llama 4) |
| `topk` | top-k of raw logits, or of a score the model computes itself (that part stays in the graph) |
| `sparsemixer` | PhiMoE's two rounds of masked softmax around the best expert (evaluation mode) |
| `hash`, `kept` | ids from a token-id table, or a gating no spec reproduces: kept as the model wrote it, experts rewritten |

## Expert styles

The style is a name for the report; detection reads the experts by running them.

| style | what the dispatch looks like |
|---|---|
| `grouped_mm` | rows sorted by expert, `torch._grouped_mm` or transformers' `grouped_mm_fallback` |
| `batched_mm` | per-slot weights gathered by expert id, `bmm` |
| `dense_bmm` | every expert on every token (`bmm`), combined with dense routing weights |
| `einsum` | `[N, E, C]` one-hot dispatch / combine einsums (capacity or not) |
| `slot_buffer` | tokens copied into an `[E * C, H]` buffer, `bmm`, gathered back |
| `loop` | a loop over experts with `torch.where` / `nonzero` traced by Dynamo |
| `dense`, `custom op ...` | per-expert GEMMs on every token, or a third-party op doing the grouped GEMMs |
| `module rewrite` | a graph-breaking loop over experts, rewritten before Dynamo after a search of the weight roles that reproduces the block (`integrations/loop_blocks/`) |

Activations: SwiGLU / GeGLU (exact or tanh) / ReGLU with concatenated or interleaved halves or
two separate GEMMs, plain SiLU / GELU / ReLU, GPT-OSS's clamped SwiGLU. Weights `[E, out, in]` or
`[E, in, out]`, per-expert biases, the routing weight on the expert output or its input, identity
experts, capacity with token / choice / score priority. Shared experts are kept as they are.

## Left unchanged on purpose

* **Stochastic routers** (PhiMoE in training mode: Gumbel sampling and a custom backward): the
  routing is not a function of the logits.
* **Expert computations the ops cannot express** (an activation they do not have): left with the
  step and the node that failed.
* A top-k whose ids feed no experts (an auxiliary loss, top-k sampling of vocabulary logits,
  attention top-k, expert-choice routing over tokens, a memory lookup), a softmax over the
  vocabulary, a linear with E outputs that is not a router: not MoE sites;
  `tests/passes/test_near_misses.py` and the fuzzer's near-misses check each stays bit-identical.
"""

SUMMARY_PATH = Path(__file__).resolve().parents[2] / "docs" / "fuzz-summary.json"


def _fuzz_section() -> str:
    if not SUMMARY_PATH.exists():
        return "\n## Fuzzer\n\nNot run yet (`python -m grouter_pass.testing.fuzz --fuzz 500 --summary docs/fuzz-summary.json`).\n"
    d = json.loads(SUMMARY_PATH.read_text())
    lines = ["", "## Fuzzer: generated layers", "",
             f"Seeds {d['seeds'][0]}-{d['seeds'][1]}, code version {', '.join(d['version'])}, command "
             f"`{d['command']}` ({d['seconds'] / 60:.0f} min of checking in all, on the 2-core CPU machine):", "",
             f"* **MoE layers rewritten exactly: {d['moe_passed']} / {d['moe_layers']}** (every layer of the "
             "2-layer model rewritten; forward, every gradient and every buffer equal to eager within 1e-5, "
             "2e-2 for bf16 experts; two token counts; `dynamic=True` for even seeds)",
             f"* **near-misses left bit-identical: {d['near_misses_passed']} / {d['near_misses']}**", "",
             "| category | layers | rewritten exactly |", "|---|---:|---:|"]
    lines += [f"| {c['category']} | {c['layers']} | {c['passed']} |" for c in d["categories"]]
    lines += ["", "| near-miss | models | left bit-identical |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['models']} | {v['passed']} |" for k, v in sorted(d["near_miss_kinds"].items())]
    if d["failed"]:
        lines += ["", "Failures (each is a bug to fix, not an exclusion):", ""]
        lines += [f"* seed {f['seed']} ({f['kind']}): {f['detail']}" for f in d["failed"]]
    return "\n".join(lines) + "\n"


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
    return _HEADER + "\n".join(rows) + "\n" + _CATEGORIES + _fuzz_section() + _FOOTER


if __name__ == "__main__":
    print(render_support_md(), end="")
