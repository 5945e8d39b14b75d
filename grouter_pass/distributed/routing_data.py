"""The routing of a dataset as the offline placement tools read it.

A routing is the top-k expert ids of every token, ``ids [T, K]`` (uint8 when E <= 256, int16
beyond, as the pre-dispatch files store them), with sample boundaries ``offsets [S + 1]`` (sample
``s`` is tokens ``offsets[s]:offsets[s+1]``). Gate weights are not needed for placement: only
which experts a token visits decides where its bytes go.

On disk (``.npz``): ``ids``, ``offsets``, ``num_experts``; a ``[S, T, K]`` ``ids`` array (fixed
sequence length) is accepted without ``offsets``. A pre-dispatched dataset directory (issue 5's
``grouter predispatch``: ``routing.json`` + ``routing_ids.bin`` beside the tokens) is read as
its packed training windows: sample ``i`` is tokens ``[i*seq_len, (i+1)*seq_len)``, the items of
``PreDispatchedDataset``, so sample indices in a placement are that dataset's indices.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoutingData:
    """Top-k expert ids of every token and the sample boundaries.

    Attributes:
        ids: ``[T, K]`` integer expert ids (logical).
        offsets: ``[S + 1]`` int64 token offsets of the samples, ``offsets[0] == 0``,
            ``offsets[-1] == T``.
        num_experts: E.
    """

    ids: np.ndarray
    offsets: np.ndarray
    num_experts: int

    def __post_init__(self) -> None:
        if self.ids.ndim != 2:
            raise ValueError(f"routing ids must be [tokens, k], got shape {self.ids.shape}")
        if self.offsets.ndim != 1 or self.offsets[0] != 0 or self.offsets[-1] != self.ids.shape[0]:
            raise ValueError(f"sample offsets must run from 0 to the token count {self.ids.shape[0]}, got "
                             f"{self.offsets[:1].tolist()}..{self.offsets[-1:].tolist()}")
        if np.any(np.diff(self.offsets) <= 0):
            raise ValueError("every sample must hold at least one token (offsets strictly increasing)")
        if self.ids.size and (int(self.ids.min()) < 0 or int(self.ids.max()) >= self.num_experts):
            raise ValueError(f"expert ids range over [{int(self.ids.min())}, {int(self.ids.max())}], "
                             f"outside [0, num_experts={self.num_experts})")

    @property
    def num_samples(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return self.ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.ids.shape[1]

    def sample_of_token(self) -> np.ndarray:
        """``[T]`` index of the sample each token belongs to."""
        return np.repeat(np.arange(self.num_samples), np.diff(self.offsets))

    @classmethod
    def from_sequences(cls, ids_SQK: np.ndarray, num_experts: int) -> RoutingData:
        """From fixed-length sequences ``[S, seq, K]``."""
        s, q, k = ids_SQK.shape
        return cls(ids=ids_SQK.reshape(s * q, k), offsets=np.arange(s + 1, dtype=np.int64) * q,
                   num_experts=num_experts)


def save_routing(path: str | Path, routing: RoutingData) -> None:
    dtype = np.uint8 if routing.num_experts <= 256 else np.int16
    np.savez(path, ids=routing.ids.astype(dtype), offsets=routing.offsets.astype(np.int64),
             num_experts=np.int64(routing.num_experts))


PREDISPATCH_FORMAT, PREDISPATCH_VERSION = "grouter-predispatch", 1


def load_predispatched(directory: str | Path, *, seq_len: int | None = None, name: str = "routing") -> RoutingData:
    """The routing of a pre-dispatched dataset directory, cut into its packed training windows.

    Reads ``{name}.json`` and memory-maps ``{name}_ids.bin`` (the weights are not needed); the
    tail shorter than ``seq_len`` is dropped, as the dataset drops it.

    Args:
        directory: the tokenized dataset directory holding ``{name}.json``.
        seq_len: window length (default: the stored ``seq_len``; a ``packed`` routing must be read
            with its own).
    """
    directory = Path(directory)
    meta_path = directory / f"{name}.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"no pre-dispatched routing in {directory} (missing {meta_path.name})")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != PREDISPATCH_FORMAT or meta.get("version") != PREDISPATCH_VERSION:
        raise ValueError(f"{meta_path} is not a {PREDISPATCH_FORMAT} v{PREDISPATCH_VERSION} file")
    stored = int(meta["seq_len"])
    seq_len = int(seq_len or stored)
    if meta.get("granularity") == "packed" and seq_len != stored:
        raise ValueError(f"routing was computed on packed windows of seq_len={stored}; cannot read it with "
                         f"seq_len={seq_len}")
    n, k = int(meta["num_tokens"]), int(meta["top_k"])
    ids = np.memmap(directory / f"{name}_ids.bin", dtype=np.dtype(meta["ids_dtype"]), mode="r", shape=(n, k))
    windows = n // seq_len
    if windows == 0:
        raise ValueError(f"{directory}: {n} tokens make no window of seq_len={seq_len}")
    offsets = np.arange(windows + 1, dtype=np.int64) * seq_len
    return RoutingData(ids=np.asarray(ids[: windows * seq_len]), offsets=offsets, num_experts=int(meta["num_experts"]))


def load_routing(path: str | Path, *, seq_len: int | None = None) -> RoutingData:
    """Read a routing ``.npz`` or a pre-dispatched dataset directory (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"routing file {path} does not exist")
    if path.is_dir():
        return load_predispatched(path, seq_len=seq_len)
    with np.load(path) as z:
        if "num_experts" not in z:
            raise ValueError(f"{path}: no num_experts entry (keys: {sorted(z.keys())})")
        e = int(z["num_experts"])
        ids = z["ids"]
        if ids.ndim == 3:
            return RoutingData.from_sequences(ids, e)
        if "offsets" not in z:
            raise ValueError(f"{path}: 2-D ids need an offsets entry (sample boundaries)")
        return RoutingData(ids=ids, offsets=z["offsets"].astype(np.int64), num_experts=e)
