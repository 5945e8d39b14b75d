"""The gating-family registry: ``name -> match_<family>(parse) -> GatingSpec | NoMatch``.

Families are tried in registration order (the import order in ``detect/__init__.py``); the
first that accepts a parse names the site. Adding a family: write ``detect/<family>.py`` with a
module docstring showing its graph before and after, decorate its matcher with
``@register_gating_family("<family>")``, import it in ``detect/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable

from grouter_pass.passes.detect.gating_chain import GatingParse
from grouter_pass.spec import GatingSpec, NoMatch

FamilyMatcher = Callable[[GatingParse], "GatingSpec | NoMatch"]
GATING_FAMILIES: dict[str, FamilyMatcher] = {}


def register_gating_family(name: str) -> Callable[[FamilyMatcher], FamilyMatcher]:
    def deco(fn: FamilyMatcher) -> FamilyMatcher:
        if name in GATING_FAMILIES:
            raise ValueError(f"gating family {name!r} is already registered")
        GATING_FAMILIES[name] = fn
        return fn
    return deco


def build_spec(family: str, parse: GatingParse) -> GatingSpec | NoMatch:
    """The :class:`GatingSpec` a parse describes (shared by all families)."""
    try:
        return GatingSpec(
            family=family, num_experts=parse.num_experts, top_k=parse.top_k, score_func=parse.score_func,
            order=parse.order, score_dtype=parse.score_dtype, bias_mode=parse.bias_mode, n_group=parse.n_group,
            topk_group=parse.topk_group, group_score=parse.group_score, renorm=parse.renorm,
            renorm_eps=parse.renorm_eps, renorm_clamp_min=parse.renorm_clamp_min, renorm_p=parse.renorm_p,
            scaling_factor=parse.scaling_factor, weights_dtype=parse.weights_dtype, sorted=parse.sorted,
            sparsemixer_threshold=parse.sparsemixer_threshold)
    except ValueError as e:
        return NoMatch("inconsistent gating parameters: %s", (e,), partial=True)


def classify(parse: GatingParse) -> GatingSpec | NoMatch:
    """Ask each registered family in turn."""
    for matcher in GATING_FAMILIES.values():
        spec = matcher(parse)
        if isinstance(spec, GatingSpec):
            return spec
    return NoMatch("no gating family accepts %s-%s with score %s", (parse.order, parse.bias_mode, parse.score_func),
                   partial=True)
