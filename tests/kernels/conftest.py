"""The interpreter suite (``interpreted/``) needs ``TRITON_INTERPRET=1`` *before* Triton is
imported: ``triton.jit`` decides at decoration time whether a kernel is compiled or
interpreted. The main pytest process may already have imported Triton (Inductor does), so the
suite is collected only in a process started with the variable set;
``test_interpreter_suite.py`` starts that process from ``make test``."""

import os

collect_ignore_glob = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["interpreted/*"]
