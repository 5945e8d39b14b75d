"""The ``grouter`` command line.

Each workflow owns its subcommands in its own package (``grouter_pass.inspect.cli`` for ``diff``,
``grouter_pass.router.cli`` for the Grouter workflow, ``grouter_pass.distributed.cli`` for
placement); this module only assembles them, so adding a command never touches another's code.
A subcommand module exposes ``register(subparsers)``, which adds its parsers and sets
``func=callable(args) -> int`` on each.

Errors a user can fix (bad paths, mismatched sizes) are raised as :class:`CLIError` or
``ValueError`` and printed as one line without a traceback; exit status 2.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import sys
from collections.abc import Sequence

from grouter_pass._logging import RESULT_ATTR

log = logging.getLogger(__name__)

SUBCOMMAND_MODULES = (
    "grouter_pass.inspect.cli",
    "grouter_pass.router.cli",
    "grouter_pass.distributed.cli",
)


class CLIError(Exception):
    """An error caused by the user's input; printed without a traceback."""


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``ArgumentDefaultsHelpFormatter`` that leaves out defaults saying nothing (None, False: the
    option is off unless given) and help that already explains its default in words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("grouter-pass")
    except PackageNotFoundError:   # a source checkout on PYTHONPATH
        return "unknown (not installed)"


class _DropLibraryResults(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # the library's one-line results (``extra=RESULT``): each command prints a fuller line itself
        return not getattr(record, RESULT_ATTR, False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grouter", formatter_class=DefaultsHelpFormatter,
        description="grouter-pass: inspect MoE rewrites and run the Grouter workflow.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level (and show tracebacks)")
    parser.add_argument("--version", action="version", version=f"grouter-pass {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                parser_class=functools.partial(argparse.ArgumentParser,
                                                               formatter_class=DefaultsHelpFormatter))
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not name.startswith(exc.name):
                # a real missing dependency inside the module: surface it
                raise
            continue
        module.register(sub)
    return parser


def _configure_logging(verbose: bool) -> None:
    """Workflow commands report progress at INFO; the pass's own per-graph chatter (and its
    diff channel) would repeat what ``grouter diff`` prints, so it stays at WARNING unless ``-v``."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    if verbose:
        return
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropLibraryResults())
    logging.getLogger("grouter_pass").setLevel(logging.WARNING)
    for name in ("grouter_pass.router", "grouter_pass.distributed"):
        logging.getLogger(name).setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError) as exc:
        if args.verbose:   # -v: the full traceback, for bug reports
            raise
        print(f"grouter {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
