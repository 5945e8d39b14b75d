"""The fuzzer of MoE layers (grouter_pass/testing/fuzz.py) on a fixed seed set.

Every generated MoE layer must be rewritten in every layer, with the forward output, every
gradient and every buffer equal to eager; every near-miss must compile bit-identical. The long
run (500 seeds, docs/support.md) is ``python -m grouter_pass.testing.fuzz --fuzz 500``.
"""

from __future__ import annotations

import pytest
import torch

from grouter_pass.testing.fuzz import CATEGORIES, NEAR_MISSES, check_near_miss, check_recipe, sample_recipe

SEEDS = range(24)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # every seed is a new layer class-wise identical to the others: Dynamo's per-code cache would
    # otherwise hit its recompile limit and run later seeds uncompiled
    torch._dynamo.reset()
    yield


@pytest.mark.parametrize("seed", SEEDS)
def test_generated_moe_layer_is_rewritten_exactly(seed):
    result = check_recipe(seed)
    assert result.ok, f"{result.recipe}\n{result.detail}"


@pytest.mark.parametrize("seed", range(2 * len(NEAR_MISSES)))
def test_near_miss_is_left_bit_identical(seed):
    result = check_near_miss(seed)
    assert result.ok, f"{result.kind}: {result.detail}"


def test_fixed_seeds_cover_every_category():
    recipes = [sample_recipe(s) for s in SEEDS]
    missing = [name for name, pred in CATEGORIES if not any(pred(r) for r in recipes)]
    assert not missing, missing


def test_recipes_are_reproducible_and_varied():
    assert sample_recipe(7) == sample_recipe(7)
    assert len({sample_recipe(s).describe() for s in range(50)}) == 50
