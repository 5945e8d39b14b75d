"""``grouter diff TARGET``: the explain report from the command line.

TARGET is ``package.module:factory`` or ``path/to/file.py:factory``, where ``factory()`` returns
``(model, example_inputs)`` (inputs as a tuple of positional arguments or a dict of keyword
arguments), or ``--hf-config NAME`` builds a tiny random-init transformers model of that type
(the configs of :mod:`grouter_pass.testing.models`) fed random ``inputs_embeds`` so the input
gradient is checked too. Exit status 0 when parity holds, 1 when it does not.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from grouter_pass.cli import CLIError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "diff", help="show what the pass matched and rewrote, with a parity report",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?", help="module.path:factory or file.py:factory returning (model, inputs)")
    p.add_argument("--hf-config", metavar="NAME", help="a tiny random-init transformers model of this type")
    p.add_argument("--tokens", type=int, default=8, help="sequence length of the --hf-config inputs (default 8)")
    p.add_argument("--batch", type=int, default=2, help="batch size of the --hf-config inputs (default 2)")
    p.add_argument("--html", metavar="PATH", help="also write a self-contained HTML page")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON ('-' for stdout, then no text)")
    p.add_argument("--no-diff", action="store_true", help="leave the graph diff out of the text")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour the text report: auto (when stdout is a terminal), always, never")
    p.add_argument("--compiler", choices=("eager", "aot_eager", "inductor"), default="eager",
                   help="what runs the rewritten graphs in the parity check (default eager: checks the pass)")
    p.add_argument("--tolerance", type=float, default=1e-5, help="max relative error of a parity row")
    p.set_defaults(func=run_diff)


def _load_factory(target: str) -> Any:
    if ":" not in target:
        raise CLIError(f"TARGET must look like module.path:factory or file.py:factory, got {target!r}")
    where, name = target.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise CLIError(f"no such file: {where}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.parent.resolve()))
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as exc:
            raise CLIError(f"cannot import {where!r}: {exc}") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise CLIError(f"{where} has no callable {name!r}")
    return factory


def _hf_target(name: str, batch: int, tokens: int) -> tuple[Any, tuple, dict]:
    import torch

    from grouter_pass.testing.models import HF_TINY_CONFIGS, tiny_hf_moe

    if name not in HF_TINY_CONFIGS:
        raise CLIError(f"no tiny config for model type {name!r}; known: {', '.join(sorted(HF_TINY_CONFIGS))}")
    model = tiny_hf_moe(name)
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(batch, tokens, model.config.hidden_size, generator=gen)
    return model, (), {"inputs_embeds": embeds}


def _resolve(args: argparse.Namespace) -> tuple[Any, tuple, dict]:
    if (args.target is None) == (args.hf_config is None):
        raise CLIError("give exactly one of TARGET or --hf-config NAME")
    if args.hf_config is not None:
        return _hf_target(args.hf_config, args.batch, args.tokens)
    made = _load_factory(args.target)()
    if not (isinstance(made, tuple) and len(made) == 2):
        raise CLIError(f"{args.target} must return (model, example_inputs), got {type(made).__name__}")
    model, inputs = made
    if isinstance(inputs, dict):
        return model, (), dict(inputs)
    return model, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,), {}


def run_diff(args: argparse.Namespace) -> int:
    from grouter_pass.config import GrouterConfig
    from grouter_pass.inspect.explain import explain

    model, pos, kw = _resolve(args)
    report = explain(model, *pos, config=GrouterConfig(compiler=args.compiler), tolerance=args.tolerance, **kw)
    if args.json == "-":
        print(report.to_json())
    else:
        color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
        print(report.render_text(color=color, diff=not args.no_diff))
        if args.json:
            Path(args.json).write_text(report.to_json())
    if args.html:
        Path(args.html).write_text(report.to_html(), encoding="utf-8")
        print(f"wrote {args.html}", file=sys.stderr)
    return 0 if report.parity_ok else 1


__all__ = ["register", "run_diff"]
