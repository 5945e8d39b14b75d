"""Import a Megatron-LM tokenized dataset (``PREFIX.bin`` + ``PREFIX.idx``) as a tokenized directory.

Megatron's preprocessing (``tools/preprocess_data.py``) writes the tokens of every document as
one flat ``.bin`` file and an ``.idx`` index: a 9-byte magic ``MMIDIDX\\0\\0``, version ``<Q`` (1),
a dtype code ``<B``, the sequence count ``<Q``, the document count ``<Q``, then the sequence
lengths (int32), the sequences' byte offsets into ``.bin`` (int64) and the document indices
(int64: document ``d`` is sequences ``document_indices[d]:document_indices[d + 1]``). A user
who already pre-processed C4 for Megatron should not tokenize it again: :func:`import_megatron`
copies the tokens into the directory layout pre-dispatch and the trainers read
(``tokens.bin``, ``doc_offsets.bin``, ``tokens.json``), in chunks (memory does not grow with the
corpus), with each Megatron document one document.

The index does not record the tokenizer: pass it (``tokenizer=``), so the directory carries its
fingerprint and a Grouter distilled on another tokenizer is refused, or at least its vocabulary
size, which every token id is checked against.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from grouter_pass.router.checkpoint import write_json_atomic
from grouter_pass.router.data import (
    OFFSETS_FILE,
    TOKENS_FILE,
    TOKENS_META,
    TokenizedCorpus,
    _token_dtype,
    load_tokenizer,
    tokenizer_fingerprint,
)
from grouter_pass.router.progress import Progress

log = logging.getLogger(__name__)

MAGIC = b"MMIDIDX\x00\x00"
#: Megatron's ``DType`` codes
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}


@dataclass(frozen=True)
class MegatronIndex:
    """The parsed ``.idx``; ``document_token_offsets[d]`` is where document ``d`` starts in ``.bin``
    (in tokens), the last entry the token count."""

    dtype: np.dtype
    sequence_lengths: np.ndarray        # [sequences] int32
    sequence_pointers: np.ndarray       # [sequences] int64, bytes
    document_indices: np.ndarray        # [documents + 1] int64, sequence ids

    @property
    def num_documents(self) -> int:
        return int(self.document_indices.shape[0]) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    @property
    def document_token_offsets(self) -> np.ndarray:
        starts = np.concatenate([[0], np.cumsum(self.sequence_lengths, dtype=np.int64)])
        return starts[self.document_indices]


def _paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(prefix)
    if p.suffix in (".bin", ".idx"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".bin"), p.with_name(p.name + ".idx")


def read_megatron_index(prefix: str | os.PathLike) -> MegatronIndex:
    """Parse ``PREFIX.idx`` and check it against ``PREFIX.bin``; errors name the values."""
    bin_path, idx_path = _paths(prefix)
    for f in (bin_path, idx_path):
        if not f.is_file():
            raise FileNotFoundError(f"Megatron dataset file not found: {f}")
    with idx_path.open("rb") as fh:
        head = fh.read(len(MAGIC) + 8 + 1 + 8 + 8)
        if len(head) < len(MAGIC) + 25 or head[:len(MAGIC)] != MAGIC:
            raise ValueError(f"{idx_path} is not a Megatron index (starts {head[:len(MAGIC)]!r}, expected {MAGIC!r})")
        version, code, sequences, documents = struct.unpack("<QBQQ", head[len(MAGIC):])
        if version != 1:
            raise ValueError(f"{idx_path}: index version {version}, only version 1 is known")
        if code not in DTYPES:
            raise ValueError(f"{idx_path}: unknown dtype code {code} (known: {sorted(DTYPES)})")
        dtype = np.dtype(DTYPES[code])
        if dtype.kind == "f":
            raise ValueError(f"{idx_path} holds {dtype.name} values, not token ids")
        lengths = np.fromfile(fh, dtype=np.int32, count=sequences)
        pointers = np.fromfile(fh, dtype=np.int64, count=sequences)
        doc_idx = np.fromfile(fh, dtype=np.int64, count=documents)
    if lengths.shape[0] != sequences or pointers.shape[0] != sequences or doc_idx.shape[0] != documents:
        raise ValueError(f"{idx_path} is truncated: the header says {sequences} sequences and {documents} document "
                         f"indices, the file holds {lengths.shape[0]}, {pointers.shape[0]}, {doc_idx.shape[0]}")
    index = MegatronIndex(dtype, lengths, pointers, doc_idx)
    expected = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)]) * dtype.itemsize
    if sequences and not np.array_equal(pointers, expected):
        bad = int(np.flatnonzero(pointers != expected)[0])
        raise ValueError(f"{idx_path}: sequence {bad} starts at byte {int(pointers[bad])}, not right after the "
                         f"previous one ({int(expected[bad])}); only contiguous .bin files can be imported")
    if documents and (doc_idx[0] != 0 or doc_idx[-1] != sequences or np.any(np.diff(doc_idx) < 0)):
        raise ValueError(f"{idx_path}: document indices must rise from 0 to the sequence count {sequences}, "
                         f"got {doc_idx[:3].tolist()} ... {doc_idx[-3:].tolist()}")
    size = bin_path.stat().st_size
    if size != index.num_tokens * dtype.itemsize:
        raise ValueError(f"{bin_path} holds {size} bytes but its index describes {index.num_tokens} tokens of "
                         f"{dtype.name} ({index.num_tokens * dtype.itemsize} bytes)")
    return index


def import_megatron(prefix: str | os.PathLike, out: str | os.PathLike, *, tokenizer: str | None = None,
                    vocab_size: int | None = None, chunk_tokens: int = 1 << 24, progress: bool = True
                    ) -> TokenizedCorpus:
    """Copy the Megatron dataset ``prefix`` into the tokenized directory ``out``; returns it memory-mapped.

    Args:
        tokenizer: the tokenizer the dataset was made with (a local directory, or ``"byte"``);
            its fingerprint and vocabulary size are recorded.
        vocab_size: without ``tokenizer``: the vocabulary size to record and check ids against.
        chunk_tokens: tokens copied per read (bounds the memory used).
    """
    if (tokenizer is None) == (vocab_size is None):
        raise ValueError("give the dataset's tokenizer (recommended: its fingerprint is recorded) or its vocab_size, "
                         "not both and not neither: a Megatron index does not record them")
    index = read_megatron_index(prefix)
    name, fingerprint = "unknown", ""
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        vocab_size, name, fingerprint = tok.vocab_size, tok.name, tokenizer_fingerprint(tok)
    assert vocab_size is not None
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / TOKENS_META).exists():
        raise ValueError(f"{out_dir} already holds a tokenized dataset ({TOKENS_META}); choose another --out")
    bin_path, _ = _paths(prefix)
    src = np.memmap(bin_path, dtype=index.dtype, mode="r", shape=(index.num_tokens,)) if index.num_tokens else \
        np.zeros(0, index.dtype)
    dtype = _token_dtype(vocab_size)
    bar = Progress(index.num_tokens, "import", unit="tok", enabled=progress)
    with (out_dir / TOKENS_FILE).open("wb") as fh:
        for start in range(0, index.num_tokens, chunk_tokens):
            chunk = np.asarray(src[start:start + chunk_tokens])
            lo, hi = int(chunk.min()), int(chunk.max())
            if lo < 0 or hi >= vocab_size:
                bad = int(np.flatnonzero((chunk < 0) | (chunk >= vocab_size))[0]) + start
                raise ValueError(f"{bin_path}: token {bad} has id {int(src[bad])}, outside vocab_size={vocab_size}")
            fh.write(chunk.astype(dtype, copy=False).tobytes())
            bar.update(min(start + chunk_tokens, index.num_tokens))
    bar.close()
    index.document_token_offsets.astype(np.int64).tofile(out_dir / OFFSETS_FILE)
    write_json_atomic(out_dir / TOKENS_META, {
        "num_tokens": index.num_tokens, "num_documents": index.num_documents, "vocab_size": int(vocab_size),
        "dtype": dtype.name, "tokenizer": name, "source": f"megatron:{Path(prefix)}",
        "tokenizer_fingerprint": fingerprint})
    log.info("imported %d documents, %d tokens from %s into %s", index.num_documents, index.num_tokens, prefix,
             out_dir)
    return TokenizedCorpus.load(out_dir)
