"""The routing synthesis of one layer serves every layer with the same gating code.

The synthesis (specs tried on random logits, scales fitted, boundaries read) is most of the
detection's time on a deep model; a gating whose fingerprint matches an earlier one takes its
readings with the nodes mapped. These tests pin both halves: the work is done once, and a layer
whose gating differs in a constant (not only in names) is synthesised on its own.
"""

import dataclasses

import pytest
import torch

from grouter_pass.passes.canonicalize import canonicalize_gating_pass
from grouter_pass.passes.detect import find_gating_sites
from grouter_pass.passes.detect import routing as routing_module
from grouter_pass.testing.fuzz import FuzzLM, FuzzMoE, MoERecipe
from grouter_pass.testing.graphs import capture_graphs

RECIPE = MoERecipe(seed=3, hidden=16, ffn=12, experts=8, top_k=2, renorm="sum", scale=2.5, bias="selection")


@pytest.fixture
def synthesis_calls(monkeypatch):
    """How many times a gating is synthesised at a cut (the expensive step)."""
    calls = []
    original = routing_module._Synthesizer.candidates_at

    def counted(self, cut):
        calls.append(cut)
        return original(self, cut)

    monkeypatch.setattr(routing_module._Synthesizer, "candidates_at", counted)
    return calls


def _sites(model: torch.nn.Module):
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    (gm,) = capture_graphs(model, ids)
    canonicalize_gating_pass(gm)
    sites, rejected = find_gating_sites(gm)
    assert not rejected, [r.summary() for r in rejected]
    return sites


def test_layers_with_one_gating_are_synthesised_once(synthesis_calls):
    sites = _sites(FuzzLM(RECIPE, layers=4))
    assert len(sites) == 4
    assert len(synthesis_calls) == 1
    # each layer's reading names its own nodes: its own router, bias and boundary
    assert len({s.gating.router for s in sites}) == 4
    assert len({s.gating.bias for s in sites}) == 4 and all(s.gating.bias is not None for s in sites)
    assert all(s.gating.cut is s.gating.router for s in sites)
    specs = {s.gating.spec for s in sites}
    assert len(specs) == 1 and next(iter(specs)).scaling_factor == 2.5


def test_boundaries_of_mapped_layers_lie_in_their_own_layer(synthesis_calls):
    """The mapped boundary of layer i is computed from layer i's router (the residual stream
    makes every earlier layer an ancestor too, so only the own and the later routers tell)."""
    from grouter_pass.passes.graph_utils import ancestors

    sites = _sites(FuzzLM(RECIPE, layers=3))
    assert len(synthesis_calls) == 1
    for i, s in enumerate(sites):
        later = {t.gating.router for t in sites[i + 1:]}
        for node in [*s.gating.boundary, *s.gating.region]:
            upstream = ancestors([node]) | {node}
            assert s.gating.router in upstream and not (later & upstream), (i, node.name)


@pytest.mark.parametrize("change", [{"scale": 1.5}, {"renorm": "none"}, {"top_k": 3}])
def test_a_layer_whose_gating_differs_is_synthesised_on_its_own(synthesis_calls, change):
    model = FuzzLM(RECIPE, layers=3)
    other = dataclasses.replace(RECIPE, **change)
    model.blocks[1] = FuzzMoE(other, layer=1)
    sites = _sites(model)
    assert len(sites) == 3
    assert len(synthesis_calls) == 2
    want = [RECIPE, other, RECIPE]
    for s, recipe in zip(sites, want):
        assert s.gating.cut is s.gating.router   # read at the logits, as the first layer is
        assert s.gating.spec.top_k == recipe.top_k
        assert s.gating.spec.scaling_factor == recipe.scale
        assert s.gating.spec.renorm == recipe.renorm
