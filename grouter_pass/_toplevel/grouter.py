"""``grouter``: the command line (``python -m grouter`` / the ``grouter`` script) and the
``TORCH_LOGS="grouter"`` log channel (one line per MoE site found by the pass)."""

from __future__ import annotations

import sys


def main() -> int:
    from grouter_pass.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
