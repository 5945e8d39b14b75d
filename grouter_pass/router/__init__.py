"""The Grouter workflow (arXiv 2603.06626): a small standalone router distilled from a trained
MoE, adapted to a target's expert count, tuned for balance, and optionally pre-dispatched.

Modules, one job each: ``config`` (GrouterModelConfig), ``network`` (Grouter, gate),
``checkpoint`` (save/load, reference layout), ``data`` (tokenizers, corpora, batches),
``capture`` (the source model's first router, found by the detection pass), ``distillation``,
``fold``, ``expand``, ``tuning``, ``predispatching``, ``progress``, ``training``, ``cli``. (The
modules are not named ``distill``/``tune``/``predispatch`` so that those names stay the
functions exported here.)
See docs/grouter.md.
"""

from grouter_pass.router.capture import RouterTeacher, load_source_model, load_teacher
from grouter_pass.router.checkpoint import (
    CheckpointError,
    Folding,
    convert_reference_state_dict,
    load_grouter,
    save_grouter,
)
from grouter_pass.router.config import GrouterModelConfig, check_compatible
from grouter_pass.router.data import ByteTokenizer, PackedBatches, TokenizedCorpus, load_corpus, load_tokenizer
from grouter_pass.router.distillation import DistillConfig, EvalResult, distill, evaluate
from grouter_pass.router.expand import expand_grouter
from grouter_pass.router.fold import coactivation_affinity, fold_grouter, greedy_groups, grouter_affinity
from grouter_pass.router.network import Grouter, gate
from grouter_pass.router.predispatching import PreDispatchedDataset, Routing, predispatch, predispatch_loader
from grouter_pass.router.tuning import TuneConfig, balance_loss, max_violation, measure_max_violation, tune

__all__ = [
    "ByteTokenizer", "CheckpointError", "DistillConfig", "EvalResult", "Folding", "Grouter", "GrouterModelConfig",
    "PackedBatches", "PreDispatchedDataset", "RouterTeacher", "Routing", "TokenizedCorpus", "TuneConfig",
    "balance_loss", "check_compatible", "coactivation_affinity", "convert_reference_state_dict", "distill", "evaluate",
    "expand_grouter", "fold_grouter", "gate", "greedy_groups", "grouter_affinity", "load_corpus", "load_grouter",
    "load_source_model", "load_teacher", "load_tokenizer", "max_violation", "measure_max_violation", "predispatch",
    "predispatch_loader", "save_grouter", "tune",
]
