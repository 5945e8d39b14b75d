"""Token data for the Grouter workflow: tokenizers, corpora, tokenized token files, batches.

* Tokenizers: :class:`ByteTokenizer` (default, no download: ids 0..255 are UTF-8 bytes, 256 is
  the end-of-document token, ``vocab_size = 257``) or a local ``tokenizers`` / transformers
  tokenizer directory (:func:`load_tokenizer`). A Grouter distilled from a real MoE must use that
  model's tokenizer: it reads the source model's token ids.
* Corpora (:func:`iter_documents`): ``"stdlib"`` (the Python standard library's ``*.py`` files,
  sorted by relative path, split into train/validation by a CRC of the path, so the split is the
  same on every machine and does not shift when a file is added), a ``.txt`` file (one document),
  a ``.jsonl`` file (one document per line, field ``text``; C4's ``.json.gz`` and any gzipped
  ``.jsonl``/``.json``/``.txt`` are read the same), a ``.parquet`` file (column ``text``, streamed
  a record batch at a time; needs ``pyarrow``), a directory of those (other files are
  skipped, and the skipped ones are logged), a
  directory written by ``datasets.save_to_disk`` (needs the ``datasets`` package), or an
  in-memory ``datasets.Dataset``. A Megatron ``.bin``/``.idx`` pair is imported without
  re-tokenizing by :mod:`.megatron`. Outside the
  stdlib corpus, every 20th document is held out for validation.
* :class:`TokenizedCorpus`: a flat token array plus document offsets, saved as memory-mapped
  files (``tokens.bin``, ``doc_offsets.bin``, ``tokens.json``) that pre-dispatch writes beside.
* :class:`PackedBatches`: training batches as a pure function of ``(seed, step)``: resuming at
  step ``s`` sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
import os
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

log = logging.getLogger(__name__)

VALIDATION_PERCENT = 5          # stdlib files whose CRC32 % 100 falls below this are validation
VALIDATION_EVERY = 20           # other corpora: every 20th document is validation
TOKENS_FILE, OFFSETS_FILE, TOKENS_META = "tokens.bin", "doc_offsets.bin", "tokens.json"


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus an end-of-document id 256 (``vocab_size = 257``)."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))


class HFTokenizer:
    """A local tokenizer directory: transformers' ``AutoTokenizer`` (offline) if it loads, else a
    bare ``tokenizers`` ``tokenizer.json``."""

    def __init__(self, path: str | os.PathLike) -> None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"tokenizer not found: {p}")
        self.name = str(p)
        self._tok: Any = None
        try:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
            self.vocab_size = len(self._tok)
            self.eos_id = self._tok.eos_token_id
            self._encode = lambda text: self._tok(text, add_special_tokens=False)["input_ids"]
        except Exception as exc:  # fall back to the bare tokenizers file
            file = p / "tokenizer.json" if p.is_dir() else p
            if not file.is_file():
                raise ValueError(f"{p} is not a tokenizer directory (transformers said: {exc})") from None
            from tokenizers import Tokenizer as RawTokenizer

            self._tok = RawTokenizer.from_file(str(file))
            self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
            self.eos_id = None
            self._encode = lambda text: self._tok.encode(text, add_special_tokens=False).ids

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    @property
    def vocab(self) -> dict[str, int]:
        """Token string to id, added tokens included (what :func:`tokenizer_fingerprint` hashes)."""
        return dict(self._tok.get_vocab())


# text every tokenizer fingerprint encodes: ASCII prose and code, whitespace runs, accents, CJK,
# emoji and digits, where tokenizers with the same vocabulary size still disagree
_FINGERPRINT_TEXT = ("The quick brown fox jumps over the lazy dog.\n    def f(x):\n\treturn x ** 2  # ok\n"
                     "naïve café, Straße, Ωμέγα, 東京都, 🙂 👍, 1234567890, https://example.com/a?b=c&d=e\n")


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A short hash that identifies how ``tokenizer`` maps text to ids: its vocabulary size, its
    end-of-document id, its vocabulary (when it exposes one) and the ids of a fixed text. Two
    tokenizers with the same vocabulary size but other merges or another token order differ."""
    h = hashlib.sha256()
    h.update(json.dumps([tokenizer.vocab_size, tokenizer.eos_id, tokenizer.encode(_FINGERPRINT_TEXT)]).encode())
    vocab = getattr(tokenizer, "vocab", None)
    if vocab:
        h.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def check_same_tokenizer(expected: str | None, got: str | None, *, expected_what: str, got_what: str) -> None:
    """Refuse token ids from another tokenizer than the one ``expected`` was made with (both
    fingerprints known and different); unknown fingerprints (older files) are not refused."""
    if expected and got and expected != got:
        raise ValueError(f"tokenizer mismatch: {expected_what} was made with tokenizer {expected} but {got_what} "
                         f"uses tokenizer {got}; tokenize the data with the tokenizer the Grouter was distilled on")


def load_tokenizer(spec: str | os.PathLike | None = "byte") -> Tokenizer:
    """``"byte"`` (or None) for :class:`ByteTokenizer`, else a local tokenizer directory/file."""
    if spec is None or str(spec) == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)


# ----------------------------------------------------------------------------------- corpora

@functools.cache
def stdlib_files() -> tuple[tuple[str, Path], ...]:
    """``(relative path, path)`` of every ``*.py`` under the stdlib, sorted, without site-packages
    (cached: the walk takes seconds and the list never changes within a process)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/")) or "/site-packages/" in rel:
            continue
        files.append((rel, path))
    return tuple(sorted(files))


def stdlib_split(rel: str) -> str:
    return "validation" if zlib.crc32(rel.encode()) % 100 < VALIDATION_PERCENT else "train"


#: file kinds a corpus directory may hold, by name ending; each also read gzipped (``.jsonl.gz``)
TEXT_SUFFIXES, JSONL_SUFFIXES = (".txt", ".py"), (".jsonl", ".json")
#: Parquet files (needs ``pyarrow``), read a row group at a time; not gzipped (Parquet compresses itself)
PARQUET_SUFFIXES = (".parquet",)
_ALL_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES


def _kind(path: Path) -> str | None:
    """"jsonl", "text" or None (not a corpus file), by name: ``c4-train.00000-of-01024.json.gz``
    is JSON lines."""
    if path.name.lower().endswith(PARQUET_SUFFIXES):
        return "parquet"
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def _open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return path.open("r", encoding="utf-8", errors="replace")


def _read_text(path: Path) -> str:
    with _open_text(path) as fh:
        return fh.read()


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or text_field not in row:
                raise ValueError(f"{path}:{lineno}: no field {text_field!r} (keys: "
                                 f"{sorted(row) if isinstance(row, dict) else type(row).__name__})")
            yield str(row[text_field])


def _iter_parquet(path: Path, text_field: str, batch_rows: int = 1024) -> Iterator[str]:
    """The ``text_field`` column of a Parquet file, streamed in record batches (memory stays at one
    batch, whatever the file's size)."""
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise ValueError(f"{path} is a Parquet file; reading it needs the `pyarrow` package (pip install pyarrow, "
                         "or pip install 'grouter-pass[data]')") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a damaged file
        raise ValueError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {names})")
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield str(value)


def _iter_dataset_object(ds: Any, text_field: str) -> Iterator[str]:
    """Rows of an in-memory ``datasets.Dataset`` (or anything with ``column_names`` that iterates
    over dict rows)."""
    if text_field not in ds.column_names:
        raise ValueError(f"the dataset has no column {text_field!r} (columns: {ds.column_names})")
    for row in ds:
        yield str(row[text_field])


def _is_dataset_object(source: Any) -> bool:
    return not isinstance(source, (str, os.PathLike)) and hasattr(source, "column_names") and hasattr(source,
                                                                                                     "__iter__")


def _iter_hf_dataset(path: Path, split: str, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ModuleNotFoundError:
        raise ValueError(f"{path} is a `datasets` directory; reading it needs the `datasets` package "
                         "(pip install datasets), or export it to JSONL") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path} has splits {sorted(ds)}, not {split!r}")
        ds = ds[split]
    if text_field not in ds.column_names:
        raise ValueError(f"{path} has no column {text_field!r} (columns: {ds.column_names})")
    for row in ds:
        yield str(row[text_field])


def _files_of(path: Path) -> list[Path]:
    """The corpus files of ``path`` (sorted); files of other kinds are skipped and logged, and a
    directory with none is an error that says what was skipped."""
    if path.is_file():
        if _kind(path) is None:
            raise ValueError(f"{path}: not a corpus file (read: {', '.join(_ALL_SUFFIXES)}; text and JSON "
                             "optionally .gz)")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file())
    kept = [p for p in files if _kind(p) is not None]
    skipped = [p for p in files if _kind(p) is None]
    if skipped:
        names = ", ".join(str(p.relative_to(path)) for p in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        log.warning("%s: skipped %d file(s) that are not %s (optionally .gz): %s", path, len(skipped),
                    "/".join(_ALL_SUFFIXES), names)
    if not kept:
        raise ValueError(f"{path} holds no corpus files: {len(skipped)} file(s) skipped because their names do not end "
                         f"in {', '.join(_ALL_SUFFIXES)} (optionally .gz)"
                         + (f", e.g. {skipped[0].name}" if skipped else ""))
    return kept


def iter_documents(source: str | os.PathLike | Any, split: str = "train", *, text_field: str = "text",
                   split_documents: bool = True) -> Iterator[str]:
    """Documents of ``source`` in a deterministic order (see the module docstring).

    Args:
        source: ``"stdlib"``, a file or a directory, or an in-memory ``datasets.Dataset``.
        split: ``"train"``, ``"validation"`` or ``"all"``.
        split_documents: for sources other than the stdlib, hold out every 20th document as
            validation (False: every document belongs to every split; use it when the user
            passes a separate validation source).
    """
    if split not in ("train", "validation", "all"):
        raise ValueError(f"split must be 'train', 'validation' or 'all', got {split!r}")
    if _is_dataset_object(source):
        yield from _every_20th(_iter_dataset_object(source, text_field), split, split_documents)
        return
    if str(source) == "stdlib":
        for rel, path in stdlib_files():
            if split == "all" or stdlib_split(rel) == split:
                yield _read_text(path)
        return
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}")
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        docs: Iterator[str] = _iter_hf_dataset(path, "validation" if split == "validation" else "train", text_field)
        yield from docs
        return

    def all_docs() -> Iterator[str]:
        for f in _files_of(path):
            if _kind(f) == "jsonl":
                yield from _iter_jsonl(f, text_field)
            elif _kind(f) == "parquet":
                yield from _iter_parquet(f, text_field)
            else:
                yield _read_text(f)

    yield from _every_20th(all_docs(), split, split_documents)


def _every_20th(docs: Iterator[str], split: str, split_documents: bool) -> Iterator[str]:
    """The documents of ``split``: every 20th is validation (all of them when not splitting)."""
    for i, doc in enumerate(docs):
        if split == "all" or not split_documents or (i % VALIDATION_EVERY == VALIDATION_EVERY - 1) == (
                split == "validation"):
            yield doc


# ------------------------------------------------------------------------------- tokenized data

def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


@dataclass
class TokenizedCorpus:
    """A flat token stream with document boundaries: document ``d`` is
    ``tokens[doc_offsets[d]:doc_offsets[d + 1]]`` (end-of-document token included, if any)."""

    tokens: np.ndarray          # [T] uint16 / int32 (possibly a read-only memmap)
    doc_offsets: np.ndarray     # [D + 1] int64
    vocab_size: int
    tokenizer: str = "byte"
    source: str = ""
    #: ``tokenizer_fingerprint`` of the tokenizer that produced ``tokens`` ("" when unknown)
    tokenizer_fingerprint: str = ""

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_documents(self) -> int:
        return int(self.doc_offsets.shape[0]) - 1

    def document(self, d: int) -> np.ndarray:
        return self.tokens[self.doc_offsets[d]:self.doc_offsets[d + 1]]

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tokens.bin``, ``doc_offsets.bin`` and ``tokens.json`` into ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        np.ascontiguousarray(self.tokens, dtype=_token_dtype(self.vocab_size)).tofile(out / TOKENS_FILE)
        np.ascontiguousarray(self.doc_offsets, dtype=np.int64).tofile(out / OFFSETS_FILE)
        meta = {"num_tokens": self.num_tokens, "num_documents": self.num_documents, "vocab_size": self.vocab_size,
                "dtype": _token_dtype(self.vocab_size).name, "tokenizer": self.tokenizer, "source": self.source,
                "tokenizer_fingerprint": self.tokenizer_fingerprint}
        (out / TOKENS_META).write_text(json.dumps(meta, indent=2))
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike) -> TokenizedCorpus:
        """Memory-map a directory written by :meth:`save`; sizes are checked against the metadata."""
        d = Path(directory)
        meta_path = d / TOKENS_META
        if not meta_path.is_file():
            raise FileNotFoundError(f"not a tokenized dataset (no {TOKENS_META}): {d}")
        meta = json.loads(meta_path.read_text())
        n, docs, dtype = int(meta["num_tokens"]), int(meta["num_documents"]), np.dtype(meta["dtype"])
        for name, count, dt in ((TOKENS_FILE, n, dtype), (OFFSETS_FILE, docs + 1, np.dtype(np.int64))):
            f = d / name
            if not f.is_file():
                raise FileNotFoundError(f"{f} is missing")
            if f.stat().st_size != count * dt.itemsize:
                raise ValueError(f"{f} is truncated or corrupt: {f.stat().st_size} bytes, expected {count} x "
                                 f"{dt.itemsize} = {count * dt.itemsize}")
        tokens = np.memmap(d / TOKENS_FILE, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
        offsets = np.fromfile(d / OFFSETS_FILE, dtype=np.int64)
        return cls(tokens, offsets, int(meta["vocab_size"]), meta.get("tokenizer", ""), meta.get("source", ""),
                   meta.get("tokenizer_fingerprint", ""))


def tokenize_documents(docs: Iterator[str] | list[str], tokenizer: Tokenizer, *, max_tokens: int | None = None,
                       source: str = "") -> TokenizedCorpus:
    """Tokenize ``docs`` (each followed by the tokenizer's end-of-document id, if it has one),
    stopping once ``max_tokens`` tokens are collected. Empty documents are skipped.

    Raises ``ValueError`` if no token results (an empty dataset)."""
    chunks: list[np.ndarray] = []
    offsets = [0]
    total = 0
    dtype = _token_dtype(tokenizer.vocab_size)
    for doc in docs:
        ids = tokenizer.encode(doc)
        if not ids:
            continue
        if tokenizer.eos_id is not None:
            ids.append(tokenizer.eos_id)
        if max_tokens is not None and total + len(ids) > max_tokens:
            ids = ids[:max_tokens - total]
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.max() >= tokenizer.vocab_size or arr.min() < 0):
            raise ValueError(f"tokenizer {tokenizer.name} produced id {int(arr.max())} outside its vocab_size="
                             f"{tokenizer.vocab_size}")
        chunks.append(arr.astype(dtype))
        total += arr.size
        offsets.append(total)
        if max_tokens is not None and total >= max_tokens:
            break
    if total == 0:
        raise ValueError(f"empty dataset: {source or 'the corpus'} produced no tokens")
    tokens = np.concatenate(chunks)
    return TokenizedCorpus(tokens, np.asarray(offsets, dtype=np.int64), tokenizer.vocab_size, tokenizer.name, source,
                           tokenizer_fingerprint(tokenizer))


def load_corpus(source: str | os.PathLike | Any, split: str = "train", *, tokenizer: Tokenizer | None = None,
                max_tokens: int | None = None, text_field: str = "text") -> TokenizedCorpus:
    """Tokenized ``split`` of ``source`` (anything :func:`iter_documents` reads); ``source`` may
    also be a tokenized directory (``tokens.json`` inside), which is memory-mapped as is (then
    ``split`` is ignored)."""
    if _is_dataset_object(source):
        where = f"datasets.Dataset of {len(source)} rows ({split})"
        return tokenize_documents(iter_documents(source, split, text_field=text_field), tokenizer or ByteTokenizer(),
                                  max_tokens=max_tokens, source=where)
    if str(source) != "stdlib" and (Path(source) / TOKENS_META).is_file():
        corpus = TokenizedCorpus.load(source)
        if corpus.num_tokens == 0:
            raise ValueError(f"empty dataset: {source} holds no tokens")
        return corpus
    tokenizer = tokenizer or ByteTokenizer()
    where = f"{source} ({split})"
    return tokenize_documents(iter_documents(source, split, text_field=text_field), tokenizer, max_tokens=max_tokens,
                              source=where)


# ------------------------------------------------------------------------------------- batches

class PackedBatches:
    """Training batches of ``[batch_size, seq_len]`` packed token windows.

    The stream is cut into ``T // seq_len`` windows (the tail is dropped); each epoch visits them
    in a permutation drawn from ``seed + epoch``. :meth:`batch` is a pure function of the step, so
    a resumed run reads the same data as an uninterrupted one without saving a data cursor.
    """

    def __init__(self, corpus: TokenizedCorpus, seq_len: int, batch_size: int, *, seed: int = 0,
                 shuffle: bool = True) -> None:
        self.windows = corpus.num_tokens // seq_len
        if self.windows == 0:
            raise ValueError(f"empty dataset: {corpus.source or 'the corpus'} has {corpus.num_tokens} tokens, fewer "
                             f"than one sequence of seq_len={seq_len}")
        self.corpus, self.seq_len, self.batch_size, self.seed, self.shuffle = corpus, seq_len, batch_size, seed, shuffle
        self._perm: tuple[int, torch.Tensor] | None = None

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            order = torch.randperm(self.windows, generator=torch.Generator().manual_seed(self.seed + epoch)) \
                if self.shuffle else torch.arange(self.windows)
            self._perm = (epoch, order)
        return self._perm[1]

    def window(self, w: int) -> torch.Tensor:
        s = w * self.seq_len
        return torch.from_numpy(np.asarray(self.corpus.tokens[s:s + self.seq_len], dtype=np.int64))

    def batch(self, step: int) -> torch.Tensor:
        """The ``[batch_size, seq_len]`` int64 batch of ``step`` (0-based)."""
        rows = []
        for j in range(self.batch_size):
            flat = step * self.batch_size + j
            epoch, pos = divmod(flat, self.windows)
            rows.append(self.window(int(self._order(epoch)[pos])))
        return torch.stack(rows)

    def eval_batches(self, max_tokens: int | None = None) -> Iterator[torch.Tensor]:
        """Windows in order (no shuffling), in batches, up to ``max_tokens`` tokens. Only full
        batches are yielded when there is at least one, so every batch has the training shape
        (a compiled teacher then never recompiles for a ragged last batch)."""
        n = self.windows if max_tokens is None else min(self.windows, max(1, max_tokens // self.seq_len))
        if n >= self.batch_size:
            n -= n % self.batch_size
        for start in range(0, n, self.batch_size):
            yield torch.stack([self.window(w) for w in range(start, min(n, start + self.batch_size))])
