"""Finding loop-style MoE blocks traces each candidate block under Dynamo; the layers of one model
share a structure, and one trace per structure says whether it breaks the graph."""

from grouter_pass.integrations import loop_blocks
from grouter_pass.integrations.loop_blocks import install
from grouter_pass.testing.models import tiny_hf_moe


def test_blocks_of_one_structure_are_traced_once(monkeypatch):
    traced = []
    original = install.graph_breaks

    def counted(block, x):
        traced.append(block)
        return original(block, x)

    monkeypatch.setattr(install, "graph_breaks", counted)
    model = tiny_hf_moe("qwen3_moe", num_hidden_layers=4)
    candidates = loop_blocks.find_loop_block_candidates(model)
    assert len(candidates) == 8   # attention and MoE block of each layer
    assert loop_blocks.rewrite_loop_blocks(model) == []   # transformers' grouped_mm experts: no graph break
    assert [type(b).__name__ for b in traced] == ["Qwen3MoeAttention", "Qwen3MoeSparseMoeBlock"]
