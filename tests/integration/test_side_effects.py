"""Nothing outside the rewrite changes: a user's other compiled functions, the buffers of their
blocks and the gradients their optimizer sees are as they would be without the pass."""

import copy

import torch
from torch import nn

from grouter_pass import GrouterConfig, apply_grouter, explain
from grouter_pass.testing.handwritten import LoopMoE
from grouter_pass.testing.models import tiny_hf_moe, tiny_token_ids


class _CountingBackend:
    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return gm.forward


def test_apply_grouter_and_explain_leave_other_compiled_functions_compiled():
    other = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4))
    backend = _CountingBackend()
    compiled_other = torch.compile(other, backend=backend)
    x = torch.randn(3, 8)
    compiled_other(x)
    assert backend.compiles == 1

    # a loop-style block (graph breaks counted before and after its rewrite) and an HF model
    loop = nn.Sequential(LoopMoE(hidden=16, ffn=12, experts=4, top_k=2))
    apply_grouter(loop, GrouterConfig(compiler="eager"))(torch.randn(2, 3, 16))
    hf = tiny_hf_moe("qwen3_moe")
    ids = tiny_token_ids()
    apply_grouter(hf, GrouterConfig(compiler="eager"))(ids)
    explain(copy.deepcopy(loop), torch.randn(2, 3, 16))

    compiled_other(x)
    assert backend.compiles == 1, "the user's compiled function was recompiled: Dynamo was reset"
