"""``python -m grouter_pass``: the ``grouter`` command line."""

import sys

from grouter_pass.cli import main

if __name__ == "__main__":
    sys.exit(main())
