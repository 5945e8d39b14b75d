"""The kernel suite (``interpreted/``) needs ``TRITON_INTERPRET=1`` *before* Triton is imported:
``triton.jit`` decides at decoration time whether a kernel is compiled or interpreted. The main
pytest process may already have imported Triton (Inductor does), so the suite is collected only
in a process started with the variable set (``test_interpreter_suite.py`` starts that process
from ``make test``), or with ``GROUTER_TEST_DEVICE=cuda``, where ``examples/gpu_check.py`` runs
the same tests compiled for the GPU."""

import os

_RUN_SUITE = os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("GROUTER_TEST_DEVICE") == "cuda"
collect_ignore_glob = [] if _RUN_SUITE else ["interpreted/*"]
