"""Helpers of ``examples/train_grouter.py``: the training evidence of issue 6 (arXiv 2603.06626).

One module per job: ``scales`` (the settings of each ``--scale``, one frozen dataclass tree),
``lm`` (the tiny Qwen3-MoE language models and their resumable training loop), ``metrics``
(data utilisation, throughput, MaxVio, expert load), ``plots`` (matplotlib, Agg) and
``pipeline`` (the phases, each skipped when its result is already on disk).
"""
