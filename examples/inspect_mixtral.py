"""Inspect the grouter rewrite of a tiny random-init Mixtral and write ``docs/inspection.md``.

    python examples/inspect_mixtral.py            # prints the report, rewrites docs/inspection.md
    python examples/inspect_mixtral.py --html mixtral.html

Everything in docs/inspection.md below the hand-written introduction is produced by this script
(the report is the real output of ``grouter_pass.explain`` on this machine), so the page cannot
drift from the code: re-run the script after changing the pass.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

import grouter_pass
from grouter_pass.testing.models import tiny_hf_moe

ROOT = Path(__file__).resolve().parent.parent

INTRO = """\
# Inspecting a rewrite

`grouter_pass.explain(model, *inputs)` shows what the pass matched in a model, what it became,
and whether the result is the same function. It never modifies the model: a copy is prepared,
compiled with the grouter backend (keeping each Dynamo graph before and after the pass) and run
forward and backward on the given inputs next to the original.

Three ways to look:

| where | how |
|---|---|
| Python / notebooks | `report = grouter_pass.explain(model, inputs_embeds=x)`; `print(report)`, `report.to_dict()`, `report.to_json()`, `report.to_html()` (a notebook shows the HTML) |
| command line | `grouter diff my_pkg.my_module:build` (a factory returning `(model, example_inputs)`), `grouter diff path/to/file.py:build`, or `grouter diff --hf-config mixtral` (a tiny random-init transformers model); `--html report.html` writes a self-contained page (side-by-side graphs, changed nodes highlighted, site and parity tables), `--json report.json` (or `--json -`) the machine-readable report; colour only on a terminal; exit status 1 when parity fails |
| inside any compile | `TORCH_LOGS="grouter_pass"`: one line per gating site; `TORCH_LOGS="+grouter_pass.inspect.diff"`: the tagged diff of each rewritten graph. Both work with `torch.compile(model, backend="grouter")` and with Inductor's `pre_grad_custom_pass=GrouterPreGradPass()` |

What the report holds:

* **Sites**: per gating site the module path (from `nn_module_stack`), family, E, k, the
  gating rule (score function, bias, groups, renormalisation, scaling), the expert style and
  activation, the routing source, and the ops it became.
* **Graphs**: graph count and graph breaks before and after (from `torch._dynamo.explain`), with
  the break reasons; loop-style blocks rewritten before Dynamo are listed as "prepared".
* **Op counts**: every op whose count changed.
* **Parity**: for the output and every gradient (each floating-point input and each parameter),
  the max absolute and relative error of the rewritten model against the original, forward and
  backward. A row fails above the tolerance (default 1e-5 relative).
* **Diff**: the graph code before and after, one line per node
  (`name = target(args) -> dtype[shape]`); each removed node is tagged with its site, each new
  node with its role (`router`, `dispatch plan`, `experts`, `combine`). Nodes outside the sites
  keep their names, so the diff shows only the rewrite.

The graph diff runs the rewritten graphs without Inductor by default (`compiler="eager"`: what is
inspected is the pass); `grouter diff --compiler inductor` or
`explain(..., config=GrouterConfig(compiler="inductor"))` checks through Inductor too.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--html", help="also write the HTML page here")
    parser.add_argument("--doc", default=str(ROOT / "docs" / "inspection.md"), help="where to write the markdown")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = tiny_hf_moe("mixtral", num_hidden_layers=2)
    embeds = torch.randn(2, 6, model.config.hidden_size)
    report = grouter_pass.explain(model, inputs_embeds=embeds)
    print(report.render_text(color=True))
    if args.html:
        Path(args.html).write_text(report.to_html(), encoding="utf-8")

    body = report.render_text(diff=False)
    diff = report.diffs[0].unified.split("\n@@")
    first_hunk = diff[0] + ("\n@@" + diff[1] if len(diff) > 1 else "")
    doc = [INTRO, "## A real report", "",
           f"Produced by `python examples/inspect_mixtral.py` (torch {torch.__version__}, "
           f"{platform.machine()}): a 2-layer tiny Mixtral (random init, 8 experts, top-2), "
           "inputs_embeds of shape [2, 6, 64].", "", "```text", body, "```", "",
           "The first hunk of the diff (layer 0; layer 1 is the same shape):", "", "```diff", first_hunk, "```", "",
           "The same report as a page: `grouter diff --hf-config mixtral --html mixtral.html`.", ""]
    Path(args.doc).write_text("\n".join(doc), encoding="utf-8")
    print(f"\nwrote {args.doc}")


if __name__ == "__main__":
    main()
