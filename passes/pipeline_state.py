"""What the passes of one pipeline run hand each other, as one typed object.

Why not ``gm.meta``: the passes used to share the detected sites, the report and the caller's
graph through untyped keys of the graph module's ``meta``, so a pass run on its own failed with a
``KeyError`` and a reader could not see from a signature what a pass reads or writes. Each pass
now takes ``state: PipelineState`` (a fresh one when it runs alone): detection fills ``sites``,
the translation to the caller's graph rewrites them, the rewrite consumes them and fills the
``report``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch.fx as fx

from grouter_pass.spec import PassReport, SiteReport

if TYPE_CHECKING:
    from grouter_pass.passes.detect import Site


@dataclass
class PipelineState:
    """One pipeline run's shared results.

    ``original``: the caller's graph, which the compiled graph is a copy of (None when the passes
    run alone on a graph of their own: the canonicalized graph is then what is rewritten).
    ``sites``: the detected sites, each with its report entry, in graph order.
    """

    original: fx.GraphModule | None = None
    report: PassReport = field(default_factory=PassReport)
    sites: list[tuple[Site, SiteReport]] = field(default_factory=list)

    def take_sites(self) -> list[tuple[Site, SiteReport]]:
        """The sites, handed to the one pass that rewrites them (a second rewrite finds none)."""
        sites, self.sites = self.sites, []
        return sites


__all__ = ["PipelineState"]
