"""The target runs' arms: how each one routes and what its loss adds.

Every arm trains the same architecture from the same initialisation on the same batches (per
seed); they differ only in the routing and the balance terms. The table is data; the pipeline
builds each arm from it (``Pipeline._arm``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArmSpec:
    """One arm.

    Attributes:
        label: what the report calls it.
        routing: ``"learned"`` (the model's own router, trained), ``"grouter"`` (a frozen Grouter
            routes every layer, through the graph pass) or ``"hash"`` (a balanced hash table).
        grouter: which Grouter: ``"tuned"`` (distilled, then tuned for balance), ``"raw"``
            (distilled only), ``"random"`` (random initialisation, tuned for balance like
            ``"tuned"``: the control for "any frozen, balanced routing") or ``"bidirectional"``
            (distilled and tuned, attending to the whole sequence as the reference code does).
        aux_loss: the learned router's balance loss weight is the scale's ``aux_loss_coef``.
        z_loss_coef: router z-loss weight (learned routers only).
        aux_free: DeepSeek-V3's auxiliary-loss-free balancing (sigmoid scores, a selection bias
            moved by each step's load) in place of the softmax router (learned routers only).
    """

    label: str
    routing: str
    grouter: str | None = None
    aux_loss: bool = False
    z_loss_coef: float = 0.0
    aux_free: bool = False

    @property
    def learned(self) -> bool:
        return self.routing == "learned"


ARMS: dict[str, ArmSpec] = {
    "baseline": ArmSpec("learned router + aux loss", "learned", aux_loss=True),
    "zloss": ArmSpec("learned router + aux loss + z-loss 0.001", "learned", aux_loss=True, z_loss_coef=1e-3),
    "aux_free": ArmSpec("learned sigmoid router, aux-loss-free bias balancing", "learned", aux_free=True),
    "grouter": ArmSpec("Grouter, distilled and tuned (frozen)", "grouter", grouter="tuned"),
    "grouter_raw": ArmSpec("Grouter, distilled, not tuned (frozen)", "grouter", grouter="raw"),
    "random_grouter": ArmSpec("random Grouter, tuned for balance (frozen)", "grouter", grouter="random"),
    "hash": ArmSpec("balanced hash routing (frozen)", "hash"),
    "grouter_bidir": ArmSpec("bidirectional Grouter, distilled and tuned (frozen)", "grouter",
                             grouter="bidirectional"),
}

#: the two arms every scale runs (the report's headline compares them)
DEFAULT_ARMS = ("baseline", "grouter")


def check_arms(names: tuple[str, ...]) -> None:
    """Unknown names, or a list without the two headline arms, are errors naming the known ones."""
    unknown = [n for n in names if n not in ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; known: {sorted(ARMS)}")
    missing = [n for n in DEFAULT_ARMS if n not in names]
    if missing or len(set(names)) != len(names):
        raise ValueError(f"arms {list(names)} must hold {list(DEFAULT_ARMS)}, each arm once")
